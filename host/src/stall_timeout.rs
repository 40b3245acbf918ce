//! [`StallTimeout`]: a socket wrapper that fails a read or a write that has
//! made no progress for a set time, so a peer that stops sending (or stops
//! reading) cannot hold a connection open forever.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Wraps `S`; a read (or write) that stays pending for its timeout fails
/// with [`io::ErrorKind::TimedOut`]. The clock starts when an operation first
/// waits and restarts after every operation that completes, so a slow but
/// moving transfer is never cut off; only silence is.
#[derive(Debug)]
pub struct StallTimeout<S> {
    inner: S,
    read: Option<Timer>,
    write: Option<Timer>,
}

#[derive(Debug)]
struct Timer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl Timer {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }

    /// Called when the operation is pending: whether it has waited too long.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            self.sleep.as_mut().reset(Instant::now() + self.timeout);
            self.armed = true;
        }
        self.sleep.as_mut().poll(cx).is_ready()
    }

    fn error(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} made no progress for {:?}", self.timeout),
        )
    }
}

impl<S> StallTimeout<S> {
    /// Wraps `inner`; `None` leaves that direction without a timeout.
    pub fn new(inner: S, read: Option<Duration>, write: Option<Duration>) -> Self {
        Self {
            inner,
            read: read.map(Timer::new),
            write: write.map(Timer::new),
        }
    }

    /// The wrapped socket.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

/// Passes `poll` through, failing it once `timer` says it waited too long.
fn guard<T>(
    timer: &mut Option<Timer>,
    what: &str,
    poll: Poll<io::Result<T>>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    let Some(timer) = timer else {
        return poll;
    };
    match poll {
        Poll::Ready(result) => {
            timer.armed = false;
            Poll::Ready(result)
        }
        Poll::Pending if timer.expired(cx) => Poll::Ready(Err(timer.error(what))),
        Poll::Pending => Poll::Pending,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        guard(&mut this.read, "reading", poll, cx)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        guard(&mut this.write, "writing", poll, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        guard(&mut this.write, "writing", poll, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // On tokio's paused clock, so that a loaded machine cannot stretch the
    // writer's pauses past the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_silent_reader_times_out_and_a_moving_one_does_not() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut client = StallTimeout::new(client, Some(Duration::from_millis(100)), None);
        let writer = tokio::spawn(async move {
            for _ in 0..5 {
                server.write_all(b"x").await.expect("write");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            server
        });
        let mut buf = [0u8; 5];
        client
            .read_exact(&mut buf)
            .await
            .expect("bytes that keep coming are read");
        let _server = writer.await.expect("writer");
        let error = client.read(&mut buf).await.expect_err("silence times out");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
