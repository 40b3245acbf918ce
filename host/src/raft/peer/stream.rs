//! [`PeerStream`]: one peer-port connection, plain TCP or TLS, and how it is
//! opened on either side. The frame code reads and writes it like a socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

/// A peer connection: plain TCP without `--tls-*`, mutual TLS with them.
#[derive(Debug)]
pub enum PeerStream {
    /// No TLS: the cluster token travels in clear text.
    Plain(TcpStream),
    /// TLS, both sides verified against `--tls-ca`. Boxed: the TLS state is
    /// large and connections are moved in and out of pools.
    Tls(Box<TlsStream<TcpStream>>),
}

impl PeerStream {
    /// Dials `addr`; with `tls`, completes a handshake that verifies the
    /// peer's certificate against the CA and the host part of `addr`, and
    /// presents this node's certificate.
    ///
    /// # Errors
    /// When the connection cannot be made or the handshake fails (for
    /// example, a certificate that does not verify).
    pub async fn connect(addr: &str, tls: Option<&TlsConnector>) -> io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        match tls {
            None => Ok(Self::Plain(tcp)),
            Some(connector) => {
                let name = crate::tls::server_name(addr)?;
                let stream = connector.connect(name, tcp).await?;
                Ok(Self::Tls(Box::new(stream.into())))
            }
        }
    }

    /// Takes an accepted connection; with `tls`, completes a handshake that
    /// requires a client certificate signed by the CA. The caller bounds the
    /// handshake in time.
    ///
    /// # Errors
    /// When the handshake fails: no certificate, one from another CA, or
    /// not TLS at all.
    pub async fn accept(tcp: TcpStream, tls: Option<&TlsAcceptor>) -> io::Result<Self> {
        match tls {
            None => Ok(Self::Plain(tcp)),
            Some(acceptor) => {
                let stream = acceptor.accept(tcp).await?;
                Ok(Self::Tls(Box::new(stream.into())))
            }
        }
    }

    /// Whether an idle connection (one the peer sends nothing on between
    /// RPCs) is still usable: the socket has nothing to read. Bytes or an
    /// end of stream mean the peer closed it (for TLS, its close alert) or
    /// broke the protocol.
    pub fn is_quiet(&self) -> bool {
        let tcp = match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        };
        let mut probe = [0u8; 1];
        matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork as _, RaftNetworkFactory as _};
    use openraft::raft::{AppendEntriesResponse, VoteRequest, VoteResponse};

    use super::*;
    use crate::raft::peer::client::NetworkFactory;
    use crate::raft::peer::server::{PeerLimits, serve_with};
    use crate::raft::peer::wire::{PeerRequest, PeerResponse};
    use crate::raft::{NodeId, NodeInfo};
    use crate::tls::Tls;
    use crate::tls::test_certs::{NodeFiles, TestCa};

    fn load(files: &NodeFiles) -> anyhow::Result<Tls> {
        Ok(Tls::from_files(&files.cert, &files.key, &files.ca)?)
    }

    /// A TLS peer port that grants every vote and counts the requests that
    /// reached it.
    async fn tls_peer(
        tls: &Tls,
    ) -> anyhow::Result<(String, Arc<AtomicUsize>, tokio::sync::oneshot::Sender<()>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let handler = move |request| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                match request {
                    PeerRequest::Vote(rpc) => {
                        PeerResponse::Vote(Ok(VoteResponse::new(rpc.vote, rpc.last_log_id, true)))
                    }
                    _ => PeerResponse::AppendEntries(Ok(AppendEntriesResponse::Success)),
                }
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_with(
            listener,
            None,
            Some(tls.peer_server.clone()),
            PeerLimits::default(),
            async move {
                let _ = stopped.await;
            },
            handler,
        ));
        Ok((addr, served, stop))
    }

    async fn vote(
        factory: NetworkFactory,
        addr: &str,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, openraft::error::RaftError<NodeId>>>
    {
        let node = NodeInfo {
            api_addr: String::new(),
            raft_addr: addr.to_owned(),
        };
        let mut factory = factory;
        let mut client = factory.new_client(2, &node).await;
        let request = VoteRequest::new(openraft::Vote::new(5, 1), None);
        client
            .vote(request, RPCOption::new(Duration::from_secs(5)))
            .await
    }

    #[tokio::test]
    async fn only_peers_with_a_certificate_from_the_cluster_ca_get_through() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("cluster ca")?;
        let server = load(&ca.node_files(dir.path(), "server")?)?;
        let member = load(&ca.node_files(dir.path(), "member")?)?;
        // Signed by another CA, but trusting the cluster's: the server, not
        // the client, is the one that says no.
        let mut stranger = TestCa::new("other ca")?.node_files(dir.path(), "stranger")?;
        stranger.ca = ca.node_files(dir.path(), "unused")?.ca;
        let stranger = load(&stranger)?;
        let (addr, served, _stop) = tls_peer(&server).await?;

        let granted = vote(
            NetworkFactory::new(1, None).with_tls(member.peer_client.clone()),
            &addr,
        )
        .await?;
        assert!(granted.vote_granted, "a member's RPC goes through");
        assert_eq!(served.load(Ordering::SeqCst), 1);

        // Trusts the server, but presents no certificate of its own.
        let no_certificate = TlsConnector::from(Arc::new(member.http_client.clone()));
        let refused = [
            (
                "no certificate",
                NetworkFactory::new(1, None).with_tls(no_certificate),
            ),
            (
                "another CA's certificate",
                NetworkFactory::new(1, None).with_tls(stranger.peer_client.clone()),
            ),
            ("no tls", NetworkFactory::new(1, None)),
        ];
        for (what, factory) in refused {
            let result = vote(factory, &addr).await;
            assert!(
                matches!(result, Err(RPCError::Unreachable(_) | RPCError::Network(_))),
                "{what}: {result:?}"
            );
        }
        assert_eq!(
            served.load(Ordering::SeqCst),
            1,
            "no refused client's request reached the handler"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_peer_whose_certificate_names_another_host_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("cluster ca")?;
        let server = ca.node_files_for(dir.path(), "server", &["node9.example"])?;
        let server = load(&server)?;
        let member = load(&ca.node_files(dir.path(), "member")?)?;
        let (addr, served, _stop) = tls_peer(&server).await?;
        let result = vote(
            NetworkFactory::new(1, None).with_tls(member.peer_client.clone()),
            &addr,
        )
        .await;
        assert!(
            matches!(&result, Err(RPCError::Unreachable(e)) if e.to_string().contains("certificate")),
            "{result:?}"
        );
        assert_eq!(served.load(Ordering::SeqCst), 0);
        Ok(())
    }
}
