//! The accept loop: a cap on open connections; each connection is served by the loop in
//! [`conn`](crate::conn) (GET and HEAD, downloads by sendfile) and, from its first request that
//! loop hands over, by hyper, both with a header timeout and a write timeout on every socket so
//! that a client that stops reading is disconnected (freeing its download slot) instead of
//! holding resources forever.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::conn;
use crate::http::ClientAddr;

/// A socket whose writes fail with `TimedOut` when no progress is made for `timeout`.
pub struct TimeoutIo {
    inner: TcpStream,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl TimeoutIo {
    /// Wraps `inner`.
    pub fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }

    fn pending<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                if !self.armed {
                    self.sleep.as_mut().reset(Instant::now() + self.timeout);
                    self.armed = true;
                }
                if self.sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client accepted no data within the write timeout",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.armed = false;
                ready
            }
        }
    }
}

impl AsyncRead for TimeoutIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TimeoutIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        me.pending(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        me.pending(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_flush(cx);
        me.pending(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A running server.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    kill: watch::Sender<bool>,
    conns: Arc<Semaphore>,
    limit: u32,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting and drops every open connection at once.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.kill.send(true);
        let _ = self.task.await;
    }

    /// Graceful shutdown: stops accepting (the listening socket closes, so a load balancer
    /// sends new requests elsewhere), lets idle keep-alive connections close and running
    /// responses finish, and after `grace` drops whatever is still open. A client cut off
    /// then can resume with a Range request on another replica: the ETag is the same there.
    /// Returns the number of connections that had to be dropped.
    pub async fn shutdown(self, grace: Duration) -> u32 {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let all = self.conns.clone().acquire_many_owned(self.limit);
        match tokio::time::timeout(grace, all).await {
            Ok(_) => 0,
            Err(_) => {
                let open = self.limit - self.conns.available_permits() as u32;
                tracing::warn!(
                    open,
                    ?grace,
                    "shutdown grace over; dropping open connections"
                );
                let _ = self.kill.send(true);
                // Each connection task ends on the kill signal and returns its permit.
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.conns.clone().acquire_many_owned(self.limit),
                )
                .await;
                open
            }
        }
    }

    /// Waits until the accept loop ends (it ends only on `stop` or a fatal listener error).
    pub async fn wait(self) {
        // The senders stay alive while waiting: dropping them reads as a stop signal.
        let Running {
            task, stop, kill, ..
        } = self;
        let _ = task.await;
        drop((stop, kill));
    }
}

/// Serves the rest of a connection with hyper (uploads, and anything the connection loop in
/// [`conn`] hands over), finishing the response in flight when the server stops.
async fn hyper_connection(
    io: Prefixed,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    stopped: &mut watch::Receiver<bool>,
    killed: &mut watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ClientAddr(peer));
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // hyper queues body chunks up to this many bytes per connection before it stops
        // polling the body: with two 128 KiB reads in flight that bounds a download at about
        // 512 KiB however slow the client.
        .max_buf_size(256 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let stop = *stopped.borrow_and_update();
        if stop && !draining {
            // Shutdown: finish the response in flight, then close (no keep-alive).
            draining = true;
            conn.as_mut().graceful_shutdown();
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection: {e}");
                }
                return;
            }
            r = stopped.changed(), if !draining => {
                if r.is_err() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = killed.changed() => return,
        }
    }
}

/// The socket hyper reads from after the connection loop: first the bytes that loop read but
/// did not consume, then the socket.
pub struct Prefixed {
    read: bytes::BytesMut,
    inner: TimeoutIo,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.read.is_empty() {
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        }
        let n = me.read.len().min(buf.remaining());
        buf.put_slice(&me.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Binds `addr` and serves `router`.
pub async fn serve(
    router: Router,
    addr: SocketAddr,
    connections: u32,
    header_timeout: Duration,
    write_timeout: Duration,
) -> io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let (kill, killed) = watch::channel(false);
    let limit = connections.max(1);
    let sem = Arc::new(Semaphore::new(limit as usize));
    let conns = sem.clone();
    let task = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = stopped.changed() => break,
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stopped.changed() => break,
            };
            let _ = tcp.set_nodelay(true);
            let router = router.clone();
            let mut stopped2 = stopped.clone();
            let mut killed2 = killed.clone();
            tokio::spawn(async move {
                let limits = conn::Limits {
                    header_timeout,
                    write_timeout,
                };
                let native = conn::serve(tcp, peer, router.clone(), limits, stopped2.clone());
                let end = tokio::select! {
                    r = native => r,
                    _ = killed2.changed() => Ok(conn::End::Closed),
                };
                match end {
                    Ok(conn::End::Closed) => {}
                    Err(e) => tracing::debug!(%peer, "connection: {e}"),
                    Ok(conn::End::Handoff(tcp, read)) => {
                        let io = Prefixed {
                            read,
                            inner: TimeoutIo::new(tcp, write_timeout),
                        };
                        hyper_connection(
                            io,
                            peer,
                            router,
                            header_timeout,
                            &mut stopped2,
                            &mut killed2,
                        )
                        .await;
                    }
                }
                drop(permit);
            });
        }
        // The listener is dropped here: new connections are refused from now on.
    });
    Ok(Running {
        addr,
        stop,
        kill,
        conns,
        limit,
        task,
    })
}
