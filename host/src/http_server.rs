//! Serves the HTTP API on `--http`: one hyper HTTP/1 connection per socket,
//! each bounded in time and in number, so that clients that stall or pile up
//! cannot hold the node's resources forever. On shutdown, open connections
//! finish the request they are serving and close. With `--tls-*`, every
//! connection (a turned-away one too) is TLS; the handshake is bounded by
//! the header timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::stall_timeout::StallTimeout;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a turned-away connection gets to take its 503.
const TURN_AWAY_TIMEOUT: Duration = Duration::from_secs(1);

/// The bounds of every HTTP connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time to send a request's headers, counted from the connection's start
    /// (after the TLS handshake, which has as long again) or the end of the
    /// previous response: it also closes idle keep-alive connections.
    pub header_timeout: Duration,
    /// How long a request body, or the client reading the response, may make
    /// no progress.
    pub idle_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for
/// the open connections to finish. With `tls`, only HTTPS is served: a
/// client that does not complete the handshake gets nothing.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (router, closing, tls) = (router.clone(), closing.clone(), tls.clone());
                        connections.spawn(serve_connection(stream, tls, router, limits, closing, permit));
                    }
                    Err(_) => {
                        connections.spawn(turn_away(stream, tls.clone(), limits.max_connections));
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    closing.cancel();
    while connections.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
    slot: OwnedSemaphorePermit,
) {
    // A response goes out as soon as it is written, not after the client's
    // delayed acknowledgement of the previous one (Nagle).
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "http: cannot set TCP_NODELAY");
    }
    // Reads are bounded by the header timeout and the body timeout below; a
    // read timeout on the socket would also cut off slow handlers, because
    // hyper keeps a read pending to notice a client going away.
    let stream = StallTimeout::new(stream, None, Some(limits.idle_timeout));
    let Some(tls) = tls else {
        return serve_http(stream, router, limits, closing, slot).await;
    };
    // The connection holds its slot during the handshake, so stalled
    // handshakes count against the cap and are dropped at the deadline.
    match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(stream, router, limits, closing, slot).await,
        Ok(Err(error)) => tracing::debug!(%error, "http: tls handshake failed"),
        Err(_) => tracing::debug!("http: no tls handshake within the header timeout"),
    }
}

/// Serves HTTP/1 on one (plain or TLS) connection until it closes.
async fn serve_http<S>(
    stream: S,
    router: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
    _slot: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let service = tower_http::timeout::RequestBodyTimeout::new(router, limits.idle_timeout);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = served {
        tracing::debug!(%error, "http connection closed");
    }
}

/// Answers 503 on a connection over the cap and closes it, after draining
/// what the client sent so that the close does not reset the answer away.
/// With `tls`, the handshake comes first, within the same short time.
async fn turn_away(stream: TcpStream, tls: Option<TlsAcceptor>, max: usize) {
    let body = format!(
        "this node is serving its maximum of {max} connections (--max-connections); retry shortly\n"
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(TURN_AWAY_TIMEOUT, async {
        match tls {
            None => answer_and_close(stream, &answer).await,
            Some(tls) => answer_and_close(tls.accept(stream).await?, &answer).await,
        }
    })
    .await;
}

/// Writes `answer` once the client has started its request, then closes
/// and drains. An HTTP client takes an answer that arrives before it sent
/// its request for an error; over TLS, an answer written right after the
/// handshake often does.
async fn answer_and_close<S>(mut stream: S, answer: &str) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut sink = [0u8; 1024];
    if stream.read(&mut sink).await? == 0 {
        return Ok(());
    }
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}
