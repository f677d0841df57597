//! Routes.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | HTML page: images, piece name or upload, SSE progress, download |
//! | `GET\|HEAD /os/{image}/{piece}.{img\|iso}` | the personalised image |
//! | `GET /os/{image}/{piece}.manifest` (`.manifest.minisig`) | signed manifest |
//! | `POST /os/{image}` | upload a piece → content-addressed id |
//! | `GET /api/prepare/{image}/{piece}` | SSE: fetching → preparing → ready |
//! | `GET /api/catalog` | JSON catalog |
//! | `GET /api/minisign.pub` | the manifest signing key |
//! | `GET /healthz`, `GET /metrics` | health, Prometheus text |
//!
//! Ranges: one `bytes=` range per request (first-last, first-, -suffix) → 206; a range that
//! starts past the end → 416 with `Content-Range: bytes */LEN`; a syntactically broken byte
//! range → 416 as well; **several ranges are not served as multipart: the request gets the
//! whole image (200)**, which RFC 9110 §14.2 permits; another range unit is ignored (200).
//! `If-Range` with the current strong ETag keeps the range, anything else gets 200.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::limits::Refused;
use crate::pieces::upload_id;
use crate::state::{AppState, Prepared, Step};

/// The client's address, put into every request by the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limited = Router::new()
        .route("/", get(page))
        .route("/os/{image}/{file}", get(download))
        .route("/os/{image}", axum::routing::post(upload))
        .route("/api/prepare/{image}/{piece}", get(prepare_events))
        .route("/api/catalog", get(catalog))
        .route("/api/minisign.pub", get(public_key))
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(limited)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), count_status))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

fn client_ip(req: &Request) -> std::net::IpAddr {
    req.extensions()
        .get::<ClientAddr>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

async fn rate_limit(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match st.rate.check(client_ip(&req)) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            st.metrics.limited.fetch_add(1, Relaxed);
            ApiError::busy(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded", wait)
                .into_response()
        }
    }
}

async fn count_status(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    st.metrics.response(r.status().as_u16());
    r
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(st.slots.active()),
    )
        .into_response()
}

async fn page(State(st): State<Arc<AppState>>) -> Html<String> {
    Html(crate::page::render(&st))
}

#[derive(Serialize)]
struct CatalogImage {
    name: String,
    extension: String,
    size: u64,
    base_digest: String,
    slot: String,
    slots: Vec<CatalogSlot>,
    pieces: Vec<String>,
}

#[derive(Serialize)]
struct CatalogSlot {
    name: String,
    kind: String,
    path: String,
    capacity: u64,
}

async fn catalog(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let pieces = st.sources.list();
    let images: Vec<CatalogImage> = st
        .images
        .values()
        .map(|im| CatalogImage {
            name: im.config.name.clone(),
            extension: im.config.extension.clone(),
            size: im.len(),
            base_digest: im.digest.to_string(),
            slot: im.config.slot.clone(),
            slots: im
                .table
                .slots
                .iter()
                .map(|s| CatalogSlot {
                    name: s.name.clone(),
                    kind: s.kind().to_string(),
                    path: s.path.clone(),
                    capacity: s.capacity,
                })
                .collect(),
            pieces: pieces.clone(),
        })
        .collect();
    Json(serde_json::json!({ "images": images }))
}

async fn public_key(State(st): State<Arc<AppState>>) -> Result<Response, ApiError> {
    match st.signer.as_ref().and_then(|s| s.pk_text.clone()) {
        Some(t) => Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], t).into_response()),
        None => Err(ApiError::not_found("no public key configured")),
    }
}

/// What a Range header asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeReq {
    /// No (usable) Range: the whole body.
    Full,
    /// Bytes `first..=last`.
    Single(u64, u64),
    /// Nothing satisfiable (416).
    Unsatisfiable,
    /// A broken byte range (416).
    Malformed,
}

/// Parses a Range header value for a body of `len` bytes (see the module docs).
pub fn parse_range(h: &str, len: u64) -> RangeReq {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeReq::Malformed;
    };
    let (a, b) = (a.trim(), b.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if a.is_empty() {
        let Some(n) = digits(b).then(|| b.parse::<u64>().ok()).flatten() else {
            return RangeReq::Malformed;
        };
        if n == 0 || len == 0 {
            return RangeReq::Unsatisfiable;
        }
        return RangeReq::Single(len.saturating_sub(n), len - 1);
    }
    let Some(first) = digits(a).then(|| a.parse::<u64>().ok()).flatten() else {
        return RangeReq::Malformed;
    };
    let last = if b.is_empty() {
        u64::MAX
    } else {
        match digits(b).then(|| b.parse::<u64>().ok()).flatten() {
            Some(l) if l >= first => l,
            _ => return RangeReq::Malformed,
        }
    };
    if first >= len {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Single(first, last.min(len - 1))
}

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn common_headers(p: &Prepared, h: &mut HeaderMap) {
    h.insert(header::ETAG, hv(&p.etag));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("kiln-chunked-digest", hv(&p.digest.to_string()));
    h.insert("kiln-base-digest", hv(&p.image.digest.to_string()));
    h.insert("kiln-payload-sha256", hv(&p.payload.sha256));
}

async fn download(
    State(st): State<Arc<AppState>>,
    Path((image, file)): Path<(String, String)>,
    method: Method,
    req: Request,
) -> Result<Response, ApiError> {
    let ip = client_ip(&req);
    let headers = req.headers().clone();
    let im = st.image(&image)?;
    if let Some(piece) = file.strip_suffix(".manifest.minisig") {
        let p = st.prepare(&image, piece, None).await?;
        return signature(&st, &p);
    }
    if let Some(piece) = file.strip_suffix(".manifest") {
        let p = st.prepare(&image, piece, None).await?;
        return Ok(manifest_response(&p));
    }
    let Some(piece) = file.strip_suffix(&format!(".{}", im.config.extension)) else {
        return Err(ApiError::not_found(format!(
            "{file:?}: expected PIECE.{} or PIECE.manifest",
            im.config.extension
        )));
    };
    let p = st.prepare(&image, piece, None).await?;
    let len = p.composed.len();
    let mut h = HeaderMap::new();
    common_headers(&p, &mut h);

    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if etag_matches(inm, &p.etag) {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().extend(h);
            return Ok(r);
        }
    }
    let mut range = match headers.get(header::RANGE).map(|v| v.to_str()) {
        None => RangeReq::Full,
        Some(Ok(v)) => parse_range(v, len),
        Some(Err(_)) => RangeReq::Malformed,
    };
    if range != RangeReq::Full {
        if let Some(ir) = headers.get(header::IF_RANGE) {
            // Only a strong, matching entity tag keeps the range; a date or another tag means
            // the client's partial copy is of something else: send everything.
            if ir.to_str().ok().map(str::trim) != Some(p.etag.as_str()) {
                range = RangeReq::Full;
            }
        }
    }
    let (status, start, end) = match range {
        RangeReq::Full => (StatusCode::OK, 0, len),
        RangeReq::Single(a, b) => {
            h.insert(header::CONTENT_RANGE, hv(&format!("bytes {a}-{b}/{len}")));
            (StatusCode::PARTIAL_CONTENT, a, b + 1)
        }
        RangeReq::Unsatisfiable | RangeReq::Malformed => {
            let mut r = ApiError {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                message: format!("range not satisfiable for a {len}-byte image"),
                retry_after: None,
            }
            .into_response();
            r.headers_mut()
                .insert(header::CONTENT_RANGE, hv(&format!("bytes */{len}")));
            return Ok(r);
        }
    };
    let ctype = if im.config.extension == "iso" {
        "application/x-iso9660-image"
    } else {
        "application/octet-stream"
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        header::CONTENT_DISPOSITION,
        hv(&format!("attachment; filename=\"{}\"", im.filename(piece))),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));

    if method == Method::HEAD {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = status;
        *r.headers_mut() = h;
        return Ok(r);
    }
    let guard = st.slots.acquire(ip).map_err(|why| {
        st.metrics.limited.fetch_add(1, Relaxed);
        match why {
            Refused::PerIp => ApiError::busy(
                StatusCode::TOO_MANY_REQUESTS,
                "too many downloads from your address at once",
                5,
            ),
            Refused::Total => ApiError::busy(StatusCode::SERVICE_UNAVAILABLE, "server busy", 5),
        }
    })?;
    st.metrics.download(&image);
    tracing::info!(%image, %piece, %ip, start, end, "download");
    let st2 = st.clone();
    let body = p.composed.stream(start..end).map(move |r| {
        // The guard lives as long as the body stream: dropped when it ends or the client goes.
        let _held = &guard;
        match &r {
            Ok(b) => {
                st2.metrics.bytes.fetch_add(b.len() as u64, Relaxed);
            }
            Err(e) => {
                st2.metrics.stream_errors.fetch_add(1, Relaxed);
                tracing::warn!("download stream failed: {e}");
            }
        }
        r
    });
    let mut r = Response::new(Body::from_stream(body));
    *r.status_mut() = status;
    *r.headers_mut() = h;
    Ok(r)
}

#[derive(Serialize)]
struct Manifest<'a> {
    kiln_manifest: u32,
    image: &'a str,
    piece: &'a str,
    file: String,
    size: u64,
    base: ManifestBase,
    payload: ManifestPayload<'a>,
    patches: Vec<ManifestPatch>,
    chunk_size: u64,
    chunked_digest: String,
    chunks: Vec<String>,
}

#[derive(Serialize)]
struct ManifestBase {
    chunked_digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

#[derive(Serialize)]
struct ManifestPayload<'a> {
    slot: &'a str,
    len: u64,
    sha256: &'a str,
}

#[derive(Serialize)]
struct ManifestPatch {
    offset: u64,
    len: u64,
    sha256: String,
}

/// The manifest bytes for a prepared download (deterministic).
pub fn manifest_bytes(p: &Prepared) -> Vec<u8> {
    let patches = p
        .composed
        .plan()
        .regions()
        .iter()
        .map(|r| {
            let mut h = Sha256::new();
            h.update(&r.data);
            let mut left = r.len - r.data.len() as u64;
            let zeroes = [0u8; 8192];
            while left > 0 {
                let k = left.min(zeroes.len() as u64) as usize;
                h.update(&zeroes[..k]);
                left -= k as u64;
            }
            ManifestPatch {
                offset: r.offset,
                len: r.len,
                sha256: hex::encode(h.finalize()),
            }
        })
        .collect();
    let m = Manifest {
        kiln_manifest: 1,
        image: &p.image.config.name,
        piece: &p.piece,
        file: p.image.filename(&p.piece),
        size: p.composed.len(),
        base: ManifestBase {
            chunked_digest: p.image.digest.to_string(),
            sha256: p
                .image
                .chunks
                .sha256
                .map(|s| format!("sha256:{}", hex::encode(s))),
        },
        payload: ManifestPayload {
            slot: &p.image.config.slot,
            len: p.payload.len,
            sha256: &p.payload.sha256,
        },
        patches,
        chunk_size: p.chunks.chunk_size,
        chunked_digest: p.digest.to_string(),
        chunks: p.chunks.digests.iter().map(hex::encode).collect(),
    };
    let mut v = serde_json::to_vec_pretty(&m).unwrap_or_default();
    v.push(b'\n');
    v
}

fn manifest_response(p: &Prepared) -> Response {
    let mut r = (
        [(header::CONTENT_TYPE, "application/json")],
        manifest_bytes(p),
    )
        .into_response();
    r.headers_mut().insert(header::ETAG, hv(&p.etag));
    r
}

fn signature(st: &AppState, p: &Prepared) -> Result<Response, ApiError> {
    let Some(s) = &st.signer else {
        return Err(ApiError::not_found("manifest signing is not configured"));
    };
    let m = manifest_bytes(p);
    let trusted = format!(
        "kiln manifest {}/{} {}",
        p.image.config.name, p.piece, p.digest
    );
    let sig = minisign::sign(
        s.pk.as_ref(),
        &s.sk,
        std::io::Cursor::new(&m),
        Some(&trusted),
        Some("signature from kiln serve"),
    )
    .map_err(|e| ApiError::internal(format!("signing: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        sig.to_string(),
    )
        .into_response())
}

/// Most bytes of a refused upload the server still reads (and discards) after answering 413.
const DRAIN_MAX: u64 = 64 << 20;
/// How long it keeps reading them.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(15);

/// 413 with `Connection: close`: the server will not read another request on this connection.
fn too_large(msg: String) -> Response {
    let mut r = ApiError::too_large(msg).into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Keeps reading a refused upload's body, bounded in bytes and time, while the 413 goes out.
/// Closing a socket with unread data makes the kernel send a reset, and a client still
/// sending then often reports a broken connection instead of the status (curl, browsers, and
/// the flaky `IncompleteMessage` in the serve test). A body declared larger than
/// [`DRAIN_MAX`] is not drained: the connection closes at once.
fn drain_after_response(mut body: axum::body::BodyDataStream, declared: u64) {
    if declared != u64::MAX && declared > DRAIN_MAX {
        return;
    }
    tokio::spawn(async move {
        let mut n = 0u64;
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(Ok(c)) = body.next().await {
                n += c.len() as u64;
                if n > DRAIN_MAX {
                    break;
                }
            }
        })
        .await;
    });
}

#[derive(Serialize)]
struct Uploaded {
    id: String,
    url: String,
    len: u64,
    sha256: String,
}

async fn upload(
    State(st): State<Arc<AppState>>,
    Path(image): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let im = st.image(&image)?;
    let Some(dir) = st.sources.uploads().map(|p| p.to_path_buf()) else {
        return Err(ApiError::forbidden("uploads are disabled on this server"));
    };
    let limit = st
        .limits
        .upload_max
        .0
        .min(im.slot().map_or(0, |s| s.capacity));
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if !st
        .limits
        .upload_types
        .iter()
        .any(|t| t.eq_ignore_ascii_case(&ctype))
    {
        return Err(ApiError::unsupported_type(format!(
            "content type {ctype:?} is not accepted (accepted: {})",
            st.limits.upload_types.join(", ")
        )));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut stream = req.into_body().into_data_stream();
    if let Some(n) = declared.filter(|&n| n > limit) {
        // A client that waits for 100 Continue has sent nothing: answering is enough.
        if !expects_continue {
            drain_after_response(stream, n);
        }
        return Ok(too_large(format!(
            "upload of {n} bytes exceeds the limit of {limit} bytes"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        if (body.len() + chunk.len()) as u64 > limit {
            drain_after_response(stream, u64::MAX);
            return Ok(too_large(format!(
                "upload exceeds the limit of {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let body = bytes::Bytes::from(body);
    if ctype.starts_with("text/") && (std::str::from_utf8(&body).is_err() || body.contains(&0)) {
        return Err(ApiError::unsupported_type(
            "text upload is not valid UTF-8 text",
        ));
    }
    let id = upload_id(&body);
    let dest = dir.join(&id);
    let len = body.len() as u64;
    let sha = hex::encode(Sha256::digest(&body));
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if dest.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir)?;
        let f = kiln_tree::output::AtomicFile::create(&dest)?;
        std::io::Write::write_all(&mut f.file(), &body)?;
        f.commit()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("storing the upload: {e}")))?;
    st.metrics.uploads.fetch_add(1, Relaxed);
    let url = format!("/os/{image}/{id}.{}", im.config.extension);
    tracing::info!(%image, %id, len, "upload stored");
    Ok((
        StatusCode::CREATED,
        Json(Uploaded {
            id,
            url,
            len,
            sha256: sha,
        }),
    )
        .into_response())
}

async fn prepare_events(
    State(st): State<Arc<AppState>>,
    Path((image, piece)): Path<(String, String)>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Step>(4);
    let (etx, erx) = mpsc::channel::<Event>(8);
    tokio::spawn(async move {
        let fwd = {
            let etx = etx.clone();
            async move {
                let mut rx = rx;
                while let Some(s) = rx.recv().await {
                    let name = match s {
                        Step::Fetching => "fetching",
                        Step::Preparing => "preparing",
                    };
                    let ev = Event::default()
                        .event("step")
                        .data(serde_json::json!({ "step": name }).to_string());
                    let _ = etx.send(ev).await;
                }
            }
        };
        let fwd = tokio::spawn(fwd);
        let res = st.prepare(&image, &piece, Some(&tx)).await;
        drop(tx);
        let _ = fwd.await;
        let data = match res {
            Ok(p) => serde_json::json!({
                "step": "ready",
                "url": format!("/os/{image}/{piece}.{}", p.image.config.extension),
                "size": p.composed.len(),
                "chunked_digest": p.digest.to_string(),
                "payload_sha256": p.payload.sha256,
            }),
            Err(e) => serde_json::json!({
                "step": "error",
                "status": e.status.as_u16(),
                "message": e.message,
            }),
        };
        let _ = etx
            .send(Event::default().event("step").data(data.to_string()))
            .await;
    });
    let stream = tokio_stream_from(erx).map(Ok);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeReq::*;
        let cases = [
            ("bytes=0-9", Single(0, 9)),
            ("bytes=5-", Single(5, 99)),
            ("bytes=-10", Single(90, 99)),
            ("bytes=-1000", Single(0, 99)),
            ("bytes=90-200", Single(90, 99)),
            ("bytes=100-", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            ("bytes=5-1", Malformed),
            ("bytes=abc", Malformed),
            ("bytes=1-x", Malformed),
            ("bytes=+1-2", Malformed),
            ("bytes=0-1,5-6", Full),
            ("items=0-1", Full),
            ("bytes=99999999999999999999999-", Malformed),
        ];
        for (h, want) in cases {
            assert_eq!(parse_range(h, 100), want, "{h}");
        }
        assert!(etag_matches("\"a\", \"b\"", "\"b\""));
        assert!(etag_matches("*", "\"b\""));
        assert!(!etag_matches("\"a\"", "\"b\""));
    }
}
