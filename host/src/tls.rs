//! TLS on both ports (`--tls-cert`, `--tls-key`, `--tls-ca`): reads the PEM
//! files once at startup and builds the rustls configurations of the HTTP
//! server, the peer server (mutual TLS), the peer client and the node's own
//! HTTP client.
//!
//! Every configuration names the ring provider itself, so nothing depends on
//! a process-wide default provider. A cluster is all-TLS or all-plain: the
//! scheme of the URLs a node builds for other members follows its own flags.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why the TLS flags cannot be used. Each message names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate without its private key, or the other way round.
    #[error(
        "--tls-cert and --tls-key go together (a certificate and its private key); give both, or neither"
    )]
    CertWithoutKey,
    /// TLS on without a CA: peers could not verify each other.
    #[error(
        "--tls-cert and --tls-key need --tls-ca, the PEM CA bundle that peers' certificates are \
         verified against"
    )]
    MissingCa,
    /// A CA without a certificate of this node's own.
    #[error(
        "--tls-ca needs --tls-cert and --tls-key: with TLS on, this node serves both ports with \
         its own certificate"
    )]
    CaWithoutCert,
    /// A file that cannot be read.
    #[error("cannot read --{flag} {}: {source}", path.display())]
    Read {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// A file that is not PEM, or holds nothing of what the flag needs.
    #[error("--{flag} {} holds no usable PEM {what} ({reason}); give a PEM file", path.display())]
    Pem {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
        /// What the parser found wrong.
        reason: String,
    },
    /// A CA certificate rustls cannot use as a trust anchor.
    #[error("--tls-ca {} is not a usable CA bundle: {reason}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A certificate and key rustls refuses (wrong key, unsupported type).
    #[error(
        "--tls-cert and --tls-key are not a usable pair: {0}; give the certificate chain (this \
         node's certificate first) and the private key of that certificate"
    )]
    CertAndKey(rustls::Error),
}

/// The rustls configurations of one node, built once at startup.
#[derive(Clone)]
pub struct Tls {
    /// The HTTP API: this node's certificate; clients are not asked for one
    /// (the cluster token authorizes them).
    pub http: TlsAcceptor,
    /// The peer port: this node's certificate, and a client certificate
    /// signed by `--tls-ca` is required.
    pub peer_server: TlsAcceptor,
    /// Connections to peers: the peer's certificate must chain to
    /// `--tls-ca` and name its address; this node presents its own.
    pub peer_client: TlsConnector,
    /// The node's own HTTP requests to other members (join, forwarding,
    /// read index): trusts `--tls-ca` only.
    pub http_client: ClientConfig,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate chain, its key and the CA bundle, and builds
    /// every configuration from them.
    ///
    /// # Errors
    /// [`TlsError`] naming the file and flag at fault.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain = read_certs("tls-cert", cert)?;
        let key = read_key(key)?;
        let roots = Arc::new(read_roots(ca)?);
        let provider = provider();

        let http = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::CertAndKey)?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::CertAndKey)?;

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Ca {
                path: ca.to_owned(),
                reason: e.to_string(),
            })?;
        let peer_server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::CertAndKey)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::CertAndKey)?;

        let peer_client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::CertAndKey)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::CertAndKey)?;

        Ok(Self {
            http: TlsAcceptor::from(Arc::new(http)),
            peer_server: TlsAcceptor::from(Arc::new(peer_server)),
            peer_client: TlsConnector::from(Arc::new(peer_client)),
            http_client: client_config(roots)?,
        })
    }
}

/// An HTTP client builder for the `bench` and `guest` subcommands: with
/// `ca` (their `--tls-ca`), it trusts that CA bundle and nothing else.
///
/// # Errors
/// [`TlsError`] when the file cannot be read or holds no CA certificate.
pub fn http_client_builder(ca: Option<&Path>) -> Result<reqwest::ClientBuilder, TlsError> {
    let builder = reqwest::Client::builder();
    Ok(match ca {
        Some(ca) => builder.use_preconfigured_tls(client_config(Arc::new(read_roots(ca)?))?),
        None => builder,
    })
}

/// The name a peer's certificate must carry: the host part of its address
/// (an IP address SAN for `127.0.0.1:7000`, a DNS name for `node1:7000`).
///
/// # Errors
/// When the address has no valid host part.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, std::io::Error> {
    let host = match addr.parse::<std::net::SocketAddr>() {
        Ok(socket) => return Ok(ServerName::IpAddress(socket.ip().into())),
        Err(_) => addr.rsplit_once(':').map_or(addr, |(host, _)| host),
    };
    ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} has no host name a certificate can be checked against: {e}"),
        )
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(roots: Arc<RootCertStore>) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::CertAndKey)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        flag,
        path: path.to_owned(),
        what: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&read(flag, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE section".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read("tls-key", path)?).map_err(|e| TlsError::Pem {
        flag: "tls-key",
        path: path.to_owned(),
        what: "private key",
        reason: e.to_string(),
    })
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("tls-ca", path)? {
        roots.add(cert).map_err(|e| TlsError::Ca {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Certificates for tests: a CA and node certificates it signs, written as
/// PEM files.
#[cfg(test)]
pub(crate) mod test_certs {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    /// A test CA that signs node certificates.
    pub struct TestCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    /// The PEM files of one node.
    pub struct NodeFiles {
        pub cert: PathBuf,
        pub key: PathBuf,
        pub ca: PathBuf,
    }

    impl TestCa {
        pub fn new(name: &str) -> anyhow::Result<Self> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            Ok(Self {
                cert: params.self_signed(&key)?,
                key,
            })
        }

        /// Writes `<name>.crt`, `<name>.key` (for 127.0.0.1 and localhost)
        /// and `<name>-ca.crt` into `dir`.
        pub fn node_files(&self, dir: &Path, name: &str) -> anyhow::Result<NodeFiles> {
            self.node_files_for(dir, name, &["127.0.0.1", "localhost"])
        }

        /// [`TestCa::node_files`] for a certificate that names `hosts`.
        pub fn node_files_for(
            &self,
            dir: &Path,
            name: &str,
            hosts: &[&str],
        ) -> anyhow::Result<NodeFiles> {
            let key = KeyPair::generate()?;
            let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
            let mut params = CertificateParams::new(hosts)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.cert, &self.key)?;
            let files = NodeFiles {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
                ca: dir.join(format!("{name}-ca.crt")),
            };
            std::fs::write(&files.cert, cert.pem())?;
            std::fs::write(&files.key, key.serialize_pem())?;
            std::fs::write(&files.ca, self.cert.pem())?;
            Ok(files)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_certs::TestCa;
    use super::*;

    #[test]
    fn node_files_from_a_ca_load() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let files = TestCa::new("test ca")?.node_files(dir.path(), "node")?;
        Tls::from_files(&files.cert, &files.key, &files.ca)?;
        http_client_builder(Some(&files.ca))?.build()?;
        Ok(())
    }

    #[test]
    fn unreadable_and_garbage_files_name_their_flag() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let files = TestCa::new("test ca")?.node_files(dir.path(), "node")?;
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"not a certificate\n")?;

        let err = Tls::from_files(&missing, &files.key, &files.ca).map(|_| ());
        assert!(
            matches!(&err, Err(e @ TlsError::Read { flag: "tls-cert", .. }) if e.to_string().contains("missing.pem")),
            "{err:?}"
        );
        let err = Tls::from_files(&files.cert, &garbage, &files.ca).map(|_| ());
        assert!(
            matches!(
                &err,
                Err(TlsError::Pem {
                    flag: "tls-key",
                    ..
                })
            ),
            "{err:?}"
        );
        let err = Tls::from_files(&files.cert, &files.key, &garbage).map(|_| ());
        assert!(
            matches!(&err, Err(TlsError::Pem { flag: "tls-ca", .. })),
            "{err:?}"
        );
        // A key that is not the certificate's.
        let other = TestCa::new("test ca")?.node_files(dir.path(), "other")?;
        let err = Tls::from_files(&files.cert, &other.key, &files.ca).map(|_| ());
        assert!(matches!(&err, Err(TlsError::CertAndKey(_))), "{err:?}");
        Ok(())
    }

    #[test]
    fn server_name_is_the_address_host() -> anyhow::Result<()> {
        assert!(matches!(
            server_name("127.0.0.1:7000")?,
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:7000")?,
            ServerName::IpAddress(_)
        ));
        assert_eq!(
            server_name("node1.example:7000")?,
            ServerName::try_from("node1.example")?
        );
        assert!(server_name("bad host:7000").is_err());
        Ok(())
    }
}
