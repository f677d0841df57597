//! One client connection: kiln answers GET and HEAD itself, and hands the connection to hyper
//! at the first request it does not take.
//!
//! Why not hyper throughout: hyper writes every body byte from user memory, so an image left
//! the base file through a read into a buffer and a copy into the socket, with a hop to the
//! blocking pool per 128 KiB. nginx sends a file with sendfile(2): the page cache feeds the
//! socket and no byte passes through user space. A download here does the same: its response
//! carries a [`FileBody`] (the plan, the range, the open base), and this loop sends the base's
//! unchanged ranges with sendfile and only the patch bytes with write(2). Every request still
//! goes through the same axum router and middleware (rate limits, download slots, metrics,
//! cache headers); only the bytes on the wire are written here.
//!
//! What this loop takes: GET and HEAD without a request body (no `Content-Length` other than
//! 0, no `Transfer-Encoding`, `Expect` or `Upgrade`), HTTP/1.0 and 1.1, keep-alive and
//! pipelining (requests are answered in order; bytes after a head stay buffered). Everything
//! else — an upload, a head httparse rejects or one over [`MAX_HEAD`] — goes to hyper together
//! with the bytes already read, and hyper serves the rest of that connection (its 400 and 431
//! answers included). Response bodies: [`FileBody`] by sendfile; a declared or exactly known
//! length as is; an open-ended stream (the SSE progress) chunked, or to HTTP/1.0 clients
//! delimited by closing the connection (RFC 9112 §6.3).
//!
//! Time limits, as with hyper: a request head must arrive within the header timeout (which
//! also closes idle keep-alive connections), and a write that makes no progress for the write
//! timeout ends the connection, so a client that stops reading frees its download slot.
//! sendfile may block its worker thread on a page-cache miss, as in nginx without thread
//! pools; a served base is read often and stays cached.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::{Body, HttpBody};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Version};
use axum::Router;
use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use kiln_inject::{FileSource, PatchPlan, Segment};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tower::ServiceExt;

use crate::http::ClientAddr;
use crate::limits::SlotGuard;
use crate::state::AppState;

/// Largest request head read here; a longer one goes to hyper, which answers 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers per request, as hyper's default.
const MAX_HEADERS: usize = 100;
/// Bytes per sendfile call: as nginx's `sendfile_max_chunk` default, so that one fast client
/// does not hold a worker thread for long.
const SENDFILE_CHUNK: usize = 2 << 20;
/// A body of a known length up to this size goes out in one write with its head.
const SMALL_BODY: u64 = 16 * 1024;

/// Limits of one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// For a whole request head, and for an idle keep-alive connection.
    pub header_timeout: Duration,
    /// For any write to make progress.
    pub write_timeout: Duration,
}

/// How the loop ended.
pub enum End {
    /// The connection is done (closed by either side, timed out, or the server stopped).
    Closed,
    /// hyper takes over: the socket and the bytes read from it but not consumed.
    Handoff(TcpStream, BytesMut),
}

/// A download's body, for this loop to send: `range` of the image that `plan` makes from
/// `file`. Put into the response's extensions by the handler; the response's own body (the
/// same bytes as a stream) is what hyper sends when it has the connection.
#[derive(Clone)]
pub struct FileBody {
    /// Base + patches.
    pub plan: Arc<PatchPlan>,
    /// The bytes of the image to send.
    pub range: Range<u64>,
    /// The base, open.
    pub file: Arc<FileSource>,
    /// Its metrics count the bytes sent and the failures.
    pub state: Arc<AppState>,
    /// The download slot, held until the last byte is out or the client is gone.
    pub slot: Arc<SlotGuard>,
}

/// Serves `tcp` until it closes or a request goes to hyper.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) -> io::Result<End> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let (req, mut keep_alive) =
            match next_request(&tcp, &mut buf, limits.header_timeout, &mut stopped).await? {
                Next::Native(req, keep) => (req, keep),
                Next::Handoff => return Ok(End::Handoff(tcp, buf)),
                Next::Closed => return Ok(End::Closed),
            };
        let head_only = req.method() == Method::HEAD;
        let version = req.version();
        let mut req = *req;
        req.extensions_mut().insert(ClientAddr(peer));
        let resp = match router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        keep_alive &= !*stopped.borrow();
        if !respond(&tcp, resp, head_only, version, keep_alive, limits).await? {
            return Ok(End::Closed);
        }
    }
}

enum Next {
    Native(Box<Request<Body>>, bool),
    Handoff,
    Closed,
}

/// Reads the next request head into `buf` and decides who answers it.
async fn next_request(
    tcp: &TcpStream,
    buf: &mut BytesMut,
    header_timeout: Duration,
    stopped: &mut watch::Receiver<bool>,
) -> io::Result<Next> {
    let deadline = Instant::now() + header_timeout;
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => {
                    let next = native_request(&req);
                    if matches!(next, Next::Native(..)) {
                        buf.advance(n);
                    }
                    return Ok(next);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                // Too long, or not HTTP as httparse reads it: hyper gives the answer.
                _ => return Ok(Next::Handoff),
            }
        } else if *stopped.borrow_and_update() {
            return Ok(Next::Closed);
        }
        let idle = buf.is_empty();
        tokio::select! {
            r = timeout_at(deadline, tcp.readable()) => match r {
                Ok(r) => r?,
                Err(_) => return Ok(Next::Closed),
            },
            // Shutdown closes an idle connection; a request already begun is answered.
            r = stopped.changed(), if idle => {
                if r.is_err() || *stopped.borrow() {
                    return Ok(Next::Closed);
                }
                continue;
            }
        }
        match tcp.try_read_buf(buf) {
            Ok(0) => return Ok(Next::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// The request as axum takes it, if it is one this loop answers, and whether the client keeps
/// the connection open afterwards.
fn native_request(req: &httparse::Request<'_, '_>) -> Next {
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Next::Handoff;
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return Next::Handoff,
    };
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut keep_alive = version == Version::HTTP_11;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Next::Handoff;
        };
        let Ok(value) = HeaderValue::from_bytes(h.value) else {
            return Next::Handoff;
        };
        if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return Next::Handoff;
        }
        if name == header::CONTENT_LENGTH && value.as_bytes().trim_ascii() != b"0" {
            return Next::Handoff;
        }
        if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
        headers.append(name, value);
    }
    let Ok(mut r) = Request::builder()
        .method(method)
        .uri(path)
        .version(version)
        .body(Body::empty())
    else {
        return Next::Handoff;
    };
    *r.headers_mut() = headers;
    Next::Native(Box::new(r), keep_alive)
}

/// How a response body is delimited on the wire (RFC 9112 §6).
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Bodyless,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (an open-ended body to an HTTP/1.0 client).
    Close,
}

/// Writes `resp`; returns whether the connection stays open for another request.
async fn respond(
    tcp: &TcpStream,
    resp: Response<Body>,
    head_only: bool,
    version: Version,
    mut keep_alive: bool,
    limits: Limits,
) -> io::Result<bool> {
    let (mut parts, body) = resp.into_parts();
    let file = parts.extensions.remove::<FileBody>();
    let status = parts.status;
    let h = &mut parts.headers;
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let exact = declared.or(body.size_hint().exact());
    if declared.is_none() {
        if let Some(n) = exact.filter(|_| status.as_u16() != 204 && status.as_u16() != 304) {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    let framing = if head_only
        || status.is_informational()
        || status.as_u16() == 204
        || status.as_u16() == 304
    {
        Framing::Bodyless
    } else if let Some(n) = exact {
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        Framing::Chunked
    } else {
        keep_alive = false;
        Framing::Close
    };
    if !keep_alive {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if version == Version::HTTP_10 {
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    if !h.contains_key(header::DATE) {
        if let Ok(d) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
            h.insert(header::DATE, d);
        }
    }
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in h.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");

    let w = limits.write_timeout;
    match framing {
        Framing::Bodyless => write_all(tcp, &out, w).await?,
        Framing::Length(n) => match file.filter(|f| f.range.end - f.range.start == n) {
            Some(f) => {
                write_all(tcp, &out, w).await?;
                f.send(tcp, w).await?;
            }
            None if n <= SMALL_BODY => {
                let bytes = body.collect().await.map_err(io::Error::other)?.to_bytes();
                if bytes.len() as u64 != n {
                    return Err(length_mismatch(n, bytes.len() as u64));
                }
                out.extend_from_slice(&bytes);
                write_all(tcp, &out, w).await?;
            }
            None => {
                write_all(tcp, &out, w).await?;
                let sent = copy_body(tcp, body, false, Some(n), w).await?;
                if sent != n {
                    return Err(length_mismatch(n, sent));
                }
            }
        },
        Framing::Chunked => {
            write_all(tcp, &out, w).await?;
            copy_body(tcp, body, true, None, w).await?;
            write_all(tcp, b"0\r\n\r\n", w).await?;
        }
        Framing::Close => {
            write_all(tcp, &out, w).await?;
            copy_body(tcp, body, false, None, w).await?;
        }
    }
    Ok(keep_alive)
}

fn length_mismatch(declared: u64, sent: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("response body of {sent} bytes where Content-Length says {declared}"),
    )
}

/// Writes the data frames of `body`; returns the bytes written (never more than `limit`).
async fn copy_body(
    tcp: &TcpStream,
    mut body: Body,
    chunked: bool,
    limit: Option<u64>,
    w: Duration,
) -> io::Result<u64> {
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(io::Error::other)?.into_data() else {
            continue; // trailers: not sent
        };
        if data.is_empty() {
            continue;
        }
        if limit.is_some_and(|l| sent + data.len() as u64 > l) {
            return Err(length_mismatch(
                limit.unwrap_or(0),
                sent + data.len() as u64,
            ));
        }
        if chunked {
            write_all(tcp, format!("{:x}\r\n", data.len()).as_bytes(), w).await?;
            write_all(tcp, &data, w).await?;
            write_all(tcp, b"\r\n", w).await?;
        } else {
            write_all(tcp, &data, w).await?;
        }
        sent += data.len() as u64;
    }
    Ok(sent)
}

/// The error for a write that made no progress for `w`.
fn stalled(w: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("client accepted no data within the write timeout ({w:?})"),
    )
}

/// Writes all of `data`, failing when a write makes no progress for `w`.
async fn write_all(tcp: &TcpStream, mut data: &[u8], w: Duration) -> io::Result<()> {
    while !data.is_empty() {
        tokio::time::timeout(w, tcp.writable())
            .await
            .map_err(|_| stalled(w))??;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `offset`, failing when a send makes no progress for `w`.
async fn send_file(
    tcp: &TcpStream,
    file: &FileSource,
    mut offset: u64,
    len: u64,
    w: Duration,
) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        tokio::time::timeout(w, tcp.writable())
            .await
            .map_err(|_| stalled(w))??;
        let want = usize::try_from(end - offset)
            .unwrap_or(usize::MAX)
            .min(SENDFILE_CHUNK);
        match tcp.try_io(Interest::WRITABLE, || {
            send_chunk(tcp, file, &mut offset, want)
        }) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: ends at offset {offset}, {} bytes short of the image",
                        file.path().display(),
                        end - offset
                    ),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One sendfile(2) call; advances `offset` by what it sent.
fn send_chunk(
    tcp: &TcpStream,
    file: &FileSource,
    offset: &mut u64,
    want: usize,
) -> io::Result<usize> {
    use std::os::fd::AsFd;
    kiln_os::send_some(file.file(), tcp.as_fd(), offset, want)
}

impl FileBody {
    /// Sends the body: base ranges by sendfile, patch bytes and fill by write.
    async fn send(&self, tcp: &TcpStream, w: Duration) -> io::Result<()> {
        static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
        for seg in self.plan.segments(self.range.clone()) {
            let n = seg.len();
            let by_sendfile = matches!(seg, Segment::Base { .. });
            let r = match seg {
                Segment::Base { offset, len } => send_file(tcp, &self.file, offset, len, w).await,
                Segment::Data(b) => write_all(tcp, &b, w).await,
                Segment::Zero(mut left) => {
                    let mut r = Ok(());
                    while left > 0 && r.is_ok() {
                        let k = left.min(ZEROES.len() as u64);
                        r = write_all(tcp, &ZEROES[..k as usize], w).await;
                        left -= k;
                    }
                    r
                }
            };
            if let Err(e) = r {
                // The client going away is its business; a base that fails to read is ours.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::TimedOut
                ) {
                    self.state.metrics.stream_errors.fetch_add(1, Relaxed);
                    tracing::warn!("download failed: {e}");
                }
                return Err(e);
            }
            self.state.metrics.bytes.fetch_add(n, Relaxed);
            if by_sendfile {
                self.state.metrics.sendfile_bytes.fetch_add(n, Relaxed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use axum::routing::{get, post};
    use futures::stream;

    use super::*;

    /// A server with the accept loop of [`crate::server`] over a few plain routes.
    async fn start(header_timeout: Duration) -> crate::Running {
        let router = Router::new()
            .route("/small", get(|| async { "small body\n" }))
            .route(
                "/stream",
                get(|| async {
                    let parts =
                        ["one ", "two ", "three"].map(|s| Ok::<_, io::Error>(s.to_string()));
                    Body::from_stream(stream::iter(parts))
                }),
            )
            .route(
                "/echo",
                post(|body: String| async move { format!("echo {body}") }),
            );
        crate::server::serve(
            router,
            "127.0.0.1:0".parse().unwrap(),
            16,
            header_timeout,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    }

    /// Sends `request` on one connection and reads until the server closes it.
    fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The status codes of the responses in `answer` (no body here holds "HTTP/1.1 ").
    fn statuses(answer: &str) -> Vec<&str> {
        answer
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|r| r.get(..3).unwrap_or(r))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_are_answered_in_order_then_an_upload_goes_to_hyper() {
        let srv = start(Duration::from_secs(5)).await;
        let addr = srv.addr;
        let answer = tokio::task::spawn_blocking(move || {
            exchange(
                addr,
                "GET /small HTTP/1.1\r\nHost: x\r\n\r\n\
                 HEAD /small HTTP/1.1\r\nHost: x\r\n\r\n\
                 GET /stream HTTP/1.1\r\nHost: x\r\n\r\n\
                 GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n\
                 POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
                 GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        })
        .await
        .unwrap();
        assert_eq!(
            statuses(&answer),
            ["200", "200", "200", "404", "200", "200"],
            "{answer}"
        );
        // The GET's body once with its length, the HEAD's length without a body.
        assert_eq!(
            answer.matches("content-length: 11\r\n").count(),
            3,
            "{answer}"
        );
        assert_eq!(answer.matches("small body\n").count(), 2, "{answer}");
        // An open-ended body is chunked.
        assert!(
            answer.contains("transfer-encoding: chunked\r\n")
                && answer.contains("4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n"),
            "{answer}"
        );
        // hyper answered the upload from the bytes the loop had already read.
        assert!(answer.contains("echo hello"), "{answer}");
        srv.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http10_closes_unless_kept_alive_and_gets_no_chunks() {
        let srv = start(Duration::from_secs(5)).await;
        let addr = srv.addr;
        let (plain, kept, open_ended) = tokio::task::spawn_blocking(move || {
            (
                exchange(addr, "GET /small HTTP/1.0\r\n\r\n"),
                exchange(
                    addr,
                    "GET /small HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
                     GET /small HTTP/1.0\r\n\r\n",
                ),
                exchange(addr, "GET /stream HTTP/1.0\r\n\r\n"),
            )
        })
        .await
        .unwrap();
        assert_eq!(statuses(&plain), ["200"], "{plain}");
        assert!(plain.contains("connection: close\r\n"), "{plain}");
        assert_eq!(statuses(&kept), ["200", "200"], "{kept}");
        assert!(kept.contains("connection: keep-alive\r\n"), "{kept}");
        assert!(
            !open_ended.contains("chunked") && open_ended.ends_with("\r\n\r\none two three"),
            "{open_ended}"
        );
        srv.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broken_and_oversized_heads_get_hyper_s_answers() {
        let srv = start(Duration::from_secs(5)).await;
        let addr = srv.addr;
        let (broken, huge) = tokio::task::spawn_blocking(move || {
            let long = format!(
                "GET /small HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
                "a".repeat(1024 * 1024)
            );
            (
                exchange(addr, "GET /small HTTP/1.1\r\nBad Header\r\n\r\n"),
                exchange(addr, &long),
            )
        })
        .await
        .unwrap();
        assert_eq!(statuses(&broken), ["400"], "{broken}");
        assert_eq!(statuses(&huge), ["431"], "{huge}");
        srv.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_or_idle_client_is_closed_after_the_header_timeout() {
        let srv = start(Duration::from_millis(300)).await;
        let addr = srv.addr;
        let (partial, idle) = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let partial = exchange(addr, "GET /small HTTP/1.1\r\nHost:");
            let idle = exchange(addr, "GET /small HTTP/1.1\r\nHost: x\r\n\r\n");
            ((partial, t.elapsed()), (idle, std::time::Instant::now()))
        })
        .await
        .unwrap();
        assert_eq!(partial.0, "", "a partial head gets no answer");
        assert!(partial.1 < Duration::from_secs(5), "{:?}", partial.1);
        // The answered connection stayed open (keep-alive) until the idle timeout closed it.
        assert_eq!(statuses(&idle.0), ["200"], "{}", idle.0);
        srv.stop().await;
    }
}
