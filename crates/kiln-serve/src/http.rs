//! Routes.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | HTML page: images, piece name or upload, SSE progress, download, sha256 |
//! | `GET /get?image=I&piece=P` | the page's form without JavaScript: 303 to `/os/I/P` |
//! | `GET /os/{image}/{piece}` | HTML page of one piece: facts, sha256, download link |
//! | `GET\|HEAD /os/{image}/{piece}.{img\|iso}` | the personalised image |
//! | `GET /os/{image}/{piece}.{img\|iso}.sha256` (`.sha256.minisig`) | `sha256sum` line, signed |
//! | `GET /os/{image}/{piece}.manifest` (`.manifest.minisig`) | signed manifest |
//! | `POST /os/{image}` | upload a piece → content-addressed id |
//! | `GET /api/prepare/{image}/{piece}` | SSE: fetching → preparing → ready (with the sha256) |
//! | `GET /api/catalog` | JSON catalog |
//! | `GET /api/minisign.pub` | the signing key |
//! | `GET /assets/{file}` | the page's stylesheet and script (content-hashed names) |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | alive; accepting work; Prometheus text |
//!
//! Downloads and checksum files take `?name=LABEL`, a friendlier name for the piece in the file
//! name (the page passes an uploaded file's name); it changes only `Content-Disposition`.
//!
//! Ranges: one `bytes=` range per request (first-last, first-, -suffix) → 206; a range that
//! starts past the end → 416 with `Content-Range: bytes */LEN`; a syntactically broken byte
//! range → 416 as well; **several ranges are not served as multipart: the request gets the
//! whole image (200)**, which RFC 9110 §14.2 permits; another range unit is ignored (200).
//! `If-Range` with the current strong ETag keeps the range, anything else gets 200.
//!
//! Digests: every image response carries `Repr-Digest: sha-256=:…:` (RFC 9530: the digest of
//! the whole image, also on a 206) and the older `Digest: SHA-256=…` (RFC 3230). The sha256 is
//! resumed from the base's stored midstate, so it costs the bytes after the first patch only.
//!
//! Caching (for a CDN in front): an image, checksum or manifest of an upload id is
//! content-addressed and served `immutable` for a year; one of a named piece (whose source may
//! change) `no-cache`, so caches revalidate with the ETag; assets are immutable (their names
//! carry their hash); everything else, errors included, `no-store`. Immutability assumes a base
//! is never replaced under the same image name: publish a new base as a new `[[image]]`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::catalog::piece_label;
use crate::config::valid_name;
use crate::conn::FileBody;
use crate::error::ApiError;
use crate::limits::Refused;
use crate::state::{AppState, Prepared, Step};
use crate::store::upload_id;

/// The client's address, put into every request by the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limited = Router::new()
        .route("/", get(page))
        .route("/get", get(form_get))
        .route("/os/{image}/{file}", get(download))
        .route("/os/{image}", axum::routing::post(upload))
        .route("/api/prepare/{image}/{piece}", get(prepare_events))
        .route("/api/catalog", get(catalog))
        .route("/api/minisign.pub", get(public_key))
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/assets/{file}", get(asset))
        .merge(limited)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(default_cache_control))
        .layer(middleware::from_fn_with_state(state.clone(), count_status))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// `Cache-Control` for an image (or its checksum, signature or manifest) of `piece`: upload
/// ids are content-addressed, so their responses never change; a named piece's source may.
fn cache_control(piece: &str) -> HeaderValue {
    if crate::store::is_upload_id(piece) {
        HeaderValue::from_static("public, max-age=31536000, immutable")
    } else {
        HeaderValue::from_static("public, no-cache")
    }
}

/// Responses that chose no caching policy (errors, APIs, probes) are not to be stored.
async fn default_cache_control(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    r.headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if st.ready.load(std::sync::atomic::Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (ctype, body) =
        crate::page::asset(&file).ok_or_else(|| ApiError::not_found("no such asset"))?;
    Ok((
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response())
}

/// An HTML page with the page policy headers.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(crate::page::CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// The client's address: the peer, or, when the peer is one of `trusted_proxies` (a load
/// balancer in front), the rightmost address in `X-Forwarded-For` that is not itself a trusted
/// proxy. Entries left of it are whatever the client claimed and are never used.
fn client_ip(st: &AppState, req: &Request) -> std::net::IpAddr {
    let peer = req
        .extensions()
        .get::<ClientAddr>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    forwarded_client(peer, &st.trusted_proxies, req.headers())
}

/// See [`client_ip`].
pub fn forwarded_client(
    peer: std::net::IpAddr,
    trusted: &[std::net::IpAddr],
    headers: &HeaderMap,
) -> std::net::IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let mut client = peer;
    for v in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(v) = v.to_str() else { return client };
        for part in v.rsplit(',') {
            match part.trim().parse::<std::net::IpAddr>() {
                Ok(ip) if trusted.contains(&ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
    }
    client
}

async fn rate_limit(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match st.rate.check(client_ip(&st, &req)) {
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

async fn page(State(st): State<Arc<AppState>>) -> Response {
    html(StatusCode::OK, crate::page::index(&st))
}

#[derive(Deserialize)]
struct FormQuery {
    image: Option<String>,
    piece: Option<String>,
}

/// The page's form submitted without JavaScript.
async fn form_get(State(st): State<Arc<AppState>>, Query(q): Query<FormQuery>) -> Response {
    let image = q.image.unwrap_or_default();
    let piece = q.piece.unwrap_or_default();
    let piece = piece.trim();
    if let Err(e) = st.image(&image) {
        return html(e.status, crate::page::error_page(&e.message));
    }
    if piece.is_empty() {
        return html(
            StatusCode::BAD_REQUEST,
            crate::page::error_page("Name a piece to put into the image."),
        );
    }
    if !valid_name(piece) {
        return html(
            StatusCode::BAD_REQUEST,
            crate::page::error_page(&format!(
                "{piece:?} is not a piece name: use letters, digits, '.', '_' and '-'."
            )),
        );
    }
    axum::response::Redirect::to(&format!("/os/{image}/{piece}")).into_response()
}

#[derive(Deserialize)]
struct NameQuery {
    name: Option<String>,
}

#[derive(Serialize)]
struct CatalogImage {
    name: String,
    title: String,
    version: Option<String>,
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
            title: im.title().to_string(),
            version: im.version.clone(),
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
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(p.sha256);
    h.insert(header::ETAG, hv(&p.etag));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, cache_control(&p.piece));
    // RFC 9530 §3: the digest of the selected representation (the whole image, on 206 too).
    h.insert("repr-digest", hv(&format!("sha-256=:{b64}:")));
    // RFC 3230 §4.3.2, for clients that predate RFC 9530.
    h.insert("digest", hv(&format!("SHA-256={b64}")));
    h.insert("kiln-chunked-digest", hv(&p.digest.to_string()));
    h.insert("kiln-base-digest", hv(&p.image.digest.to_string()));
    h.insert("kiln-payload-sha256", hv(&p.payload.sha256));
}

/// The `sha256sum` line of a prepared download.
pub fn sha256_line(p: &Prepared, filename: &str) -> String {
    format!("{}  {filename}\n", hex::encode(p.sha256))
}

async fn download(
    State(st): State<Arc<AppState>>,
    Path((image, file)): Path<(String, String)>,
    Query(q): Query<NameQuery>,
    method: Method,
    req: Request,
) -> Result<Response, ApiError> {
    let ip = client_ip(&st, &req);
    let headers = req.headers().clone();
    let im = st.image(&image)?;
    let label = q.name.as_deref().and_then(piece_label);
    let label = label.as_deref();
    let ext = format!(".{}", im.config.extension);
    if let Some(piece) = file.strip_suffix(".manifest.minisig") {
        let p = st.prepare(&image, piece, None).await?;
        return signature(&st, &p);
    }
    if let Some(piece) = file.strip_suffix(".manifest") {
        let p = st.prepare(&image, piece, None).await?;
        return Ok(manifest_response(&p));
    }
    if let Some(piece) = file.strip_suffix(&format!("{ext}.sha256.minisig")) {
        let p = st.prepare(&image, piece, None).await?;
        return sha256_signature(&st, &p, label);
    }
    if let Some(piece) = file.strip_suffix(&format!("{ext}.sha256")) {
        let p = st.prepare(&image, piece, None).await?;
        let line = sha256_line(&p, &im.filename(piece, label));
        let mut r = ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], line).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, cache_control(piece));
        return Ok(r);
    }
    let Some(piece) = file.strip_suffix(&ext) else {
        // A bare piece name: its page, for browsers without JavaScript and for sharing.
        return Ok(match st.prepare(&image, &file, None).await {
            Ok(p) => html(StatusCode::OK, crate::page::piece_page(&st, &p, label)),
            Err(e) => html(e.status, crate::page::error_page(&e.message)),
        });
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
        hv(&format!(
            "attachment; filename=\"{}\"",
            im.filename(piece, label)
        )),
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
    let guard = Arc::new(guard);
    // Sent by the connection loop with sendfile(2) when the base is a local file and the loop
    // has the connection; the body stream below is what hyper sends otherwise.
    let file_body = im.base.file.clone().map(|file| FileBody {
        plan: p.composed.plan().clone(),
        range: start..end,
        file,
        state: st.clone(),
        slot: guard.clone(),
    });
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
    if let Some(f) = file_body {
        r.extensions_mut().insert(f);
    }
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
    sha256: String,
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
        file: p.image.filename(&p.piece, None),
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
        sha256: format!("sha256:{}", hex::encode(p.sha256)),
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
    r.headers_mut()
        .insert(header::CACHE_CONTROL, cache_control(&p.piece));
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

/// The minisign signature of the `.sha256` file: `minisign -Vm FILE.sha256` then
/// `sha256sum -c FILE.sha256` verifies the image. (Signing the image itself would mean
/// hashing all of it with BLAKE2b for every download, which the sha256 midstate avoids.)
fn sha256_signature(
    st: &AppState,
    p: &Prepared,
    label: Option<&str>,
) -> Result<Response, ApiError> {
    let Some(s) = &st.signer else {
        return Err(ApiError::not_found("signing is not configured"));
    };
    let filename = p.image.filename(&p.piece, label);
    let line = sha256_line(p, &filename);
    let trusted = format!(
        "file:{filename}\tsha256:{}\timage:{}",
        hex::encode(p.sha256),
        p.image.config.name
    );
    let sig = minisign::sign(
        s.pk.as_ref(),
        &s.sk,
        std::io::Cursor::new(line.as_bytes()),
        Some(&trusted),
        Some("signature from kiln serve"),
    )
    .map_err(|e| ApiError::internal(format!("signing: {e}")))?;
    let mut r = (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        sig.to_string(),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, cache_control(&p.piece));
    Ok(r)
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
    let Some(store) = st.sources.uploads().cloned() else {
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
    let len = body.len() as u64;
    let sha = hex::encode(Sha256::digest(&body));
    store.put_upload(&id, body).await?;
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
    Query(q): Query<NameQuery>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let label = q.name.as_deref().and_then(piece_label);
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
            Ok(p) => {
                let l = crate::page::links(&st, &p, label.as_deref());
                serde_json::json!({
                    "step": "ready",
                    "url": l.url,
                    "filename": l.filename,
                    "sha256_url": l.sha256_url,
                    "minisig_url": l.minisig_url,
                    "title": p.image.title(),
                    "version": p.image.version,
                    "size": p.composed.len(),
                    "size_text": crate::page::human_size(p.composed.len()),
                    "sha256": hex::encode(p.sha256),
                    "chunked_digest": p.digest.to_string(),
                    "payload_sha256": p.payload.sha256,
                })
            }
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
    fn forwarded_clients_only_through_trusted_proxies() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let trusted = [ip("127.0.0.1"), ip("10.0.0.2")];
        let hdrs = |vals: &[&str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let cases = [
            ("203.0.113.9", &["1.2.3.4"][..], "203.0.113.9"), // untrusted peer: header ignored
            ("127.0.0.1", &[][..], "127.0.0.1"),
            ("127.0.0.1", &["198.51.100.7"][..], "198.51.100.7"),
            ("127.0.0.1", &["6.6.6.6, 198.51.100.7"][..], "198.51.100.7"), // spoofed left part
            ("127.0.0.1", &["198.51.100.7, 10.0.0.2"][..], "198.51.100.7"), // two proxies
            (
                "127.0.0.1",
                &["6.6.6.6", "198.51.100.7"][..],
                "198.51.100.7",
            ),
            ("127.0.0.1", &["garbage"][..], "127.0.0.1"),
        ];
        for (peer, xff, want) in cases {
            assert_eq!(
                forwarded_client(ip(peer), &trusted, &hdrs(xff)),
                ip(want),
                "{peer} {xff:?}"
            );
        }
    }

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
