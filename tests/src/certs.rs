//! Test certificates: a CA made for one test, and node certificates it
//! signs, written as PEM files for the `--tls-*` flags.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA that signs node certificates; its certificate is written to a PEM
/// file so that nodes (`--tls-ca`) and clients can trust it.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate, PEM.
    pub pem: String,
    /// Where the CA certificate was written.
    pub file: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// One node's certificate and key files.
#[derive(Debug, Clone)]
pub struct NodeCert {
    /// The certificate, PEM (`--tls-cert`).
    pub cert: PathBuf,
    /// Its private key, PEM (`--tls-key`).
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, written to `dir/<name>.crt`.
    ///
    /// # Errors
    /// When the key cannot be made or the file cannot be written.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        let file = dir.join(format!("{name}.crt"));
        std::fs::write(&file, &pem)?;
        Ok(Self {
            cert,
            key,
            pem,
            file,
        })
    }

    /// A certificate for a node on 127.0.0.1 (IP SAN, and `localhost`),
    /// good as a server and as a client certificate, written to
    /// `dir/<name>.crt` and `dir/<name>.key`.
    ///
    /// # Errors
    /// When the key cannot be made or the files cannot be written.
    pub fn node_cert(&self, dir: &Path, name: &str) -> anyhow::Result<NodeCert> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let files = NodeCert {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
