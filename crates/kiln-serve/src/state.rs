//! Shared server state and the preparation of a personalised download: fetch the piece, plan
//! the injection, compute the composed image's chunked digest (O(patched chunks)) and its
//! strong ETag. Preparations are cached per (image, piece) with one fetch in flight per key.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use kiln_inject::slots::PayloadInfo;
use kiln_inject::{
    plan_injection, AsyncComposed, ChunkTable, ChunkedDigest, ComposedImage, PatchPlan, Payload,
    ReadAt,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, OnceCell};

use crate::catalog::Image;
use crate::config::{valid_name, Config, Limits};
use crate::error::ApiError;
use crate::limits::{DownloadSlots, RateLimiter};
use crate::metrics::Metrics;
use crate::pieces::Sources;
use crate::store::{now_secs, PreparedRecord, SharedStore};

/// A loaded minisign key.
pub struct Signer {
    /// Secret key.
    pub sk: minisign::SecretKey,
    /// Public key text (the .pub file), if configured.
    pub pk_text: Option<String>,
    /// Public key, if configured (used to self-check signatures).
    pub pk: Option<minisign::PublicKey>,
}

/// The plain sha256 of a personalised image: resumed from the base's midstate before the
/// first patched byte, so only the tail is read. Without such a midstate (it cannot happen for
/// a slot the catalog prepared midstates for) the whole image is hashed, loudly.
fn plain_sha256(
    im: &Image,
    composed: &(dyn ReadAt + Sync),
    plan: &PatchPlan,
    metrics: &crate::metrics::Metrics,
) -> Result<[u8; 32], ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let t0 = Instant::now();
    let read_err = |e: kiln_inject::Error| ApiError::bad_gateway(format!("reading the base: {e}"));
    let (sha, hashed) = match im
        .chunks
        .composed_sha256(composed, plan)
        .map_err(read_err)?
    {
        Some(x) => x,
        None => {
            tracing::warn!(image = %im.config.name,
                "no SHA-256 midstate before the first patched byte; hashing the whole image");
            let sha = kiln_inject::chunks::plain_sha256(composed)
                .map_err(|e| ApiError::bad_gateway(format!("reading the base: {e}")))?;
            (sha, composed.len())
        }
    };
    metrics.sha256_bytes.fetch_add(hashed, Relaxed);
    metrics.sha256_count.fetch_add(1, Relaxed);
    tracing::debug!(image = %im.config.name, hashed, ms = t0.elapsed().as_secs_f64() * 1e3,
        "plain sha256");
    Ok(sha)
}

/// Everything the handlers share.
pub struct AppState {
    /// Catalog by name.
    pub images: BTreeMap<String, Arc<Image>>,
    /// Piece sources.
    pub sources: Sources,
    /// Limits.
    pub limits: Limits,
    /// Per-IP rate limiter.
    pub rate: RateLimiter,
    /// Download caps.
    pub slots: Arc<DownloadSlots>,
    /// Counters.
    pub metrics: Metrics,
    /// Manifest signing.
    pub signer: Option<Signer>,
    /// False once shutdown began (`/readyz` answers 503).
    pub ready: AtomicBool,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    cache: Mutex<HashMap<(String, String), CacheEntry>>,
}

struct CacheEntry {
    cell: Arc<OnceCell<Arc<Prepared>>>,
    created: Instant,
}

/// A personalised download, ready to stream.
pub struct Prepared {
    /// The image.
    pub image: Arc<Image>,
    /// The piece name.
    pub piece: String,
    /// The payload.
    pub payload: PayloadInfo,
    /// Base + patches.
    pub composed: AsyncComposed,
    /// Chunk table of the composed image.
    pub chunks: ChunkTable,
    /// Its chunked digest.
    pub digest: ChunkedDigest,
    /// Its plain sha256.
    pub sha256: [u8; 32],
    /// Strong ETag (with quotes).
    pub etag: String,
}

/// Progress of a preparation, for the SSE page.
#[derive(Clone, Debug)]
pub enum Step {
    /// Fetching the piece.
    Fetching,
    /// Planning the injection and hashing the patched chunks.
    Preparing,
}

impl AppState {
    /// Opens every image and builds the state.
    pub async fn new(config: &Config) -> anyhow::Result<Arc<Self>> {
        let mut images = BTreeMap::new();
        for ic in &config.images {
            let im = crate::catalog::open(ic).await?;
            images.insert(ic.name.clone(), Arc::new(im));
        }
        let signer = match &config.signing {
            Some(s) => {
                let password = match &s.password_env {
                    Some(v) => std::env::var(v)
                        .map_err(|_| anyhow::anyhow!("[signing] password_env {v:?} is not set"))?,
                    None => String::new(),
                };
                let sk = kiln_ship::sign::load_secret_key(&s.secret_key, &password)?;
                let (pk, pk_text) = match &s.public_key {
                    Some(p) => {
                        let text = std::fs::read_to_string(p)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                        let pk = minisign::PublicKey::from_file(p)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                        (Some(pk), Some(text))
                    }
                    None => (None, None),
                };
                Some(Signer { sk, pk_text, pk })
            }
            None => None,
        };
        let shared = match &config.uploads {
            Some(u) => Some(Arc::new(SharedStore::open(u, &config.store)?)),
            None => None,
        };
        let l = &config.limits;
        Ok(Arc::new(Self {
            images,
            sources: Sources::new(&config.sources, shared),
            ready: AtomicBool::new(true),
            trusted_proxies: config.trusted_proxies.clone(),
            limits: l.clone(),
            rate: RateLimiter::new(l.requests_per_second, l.burst),
            slots: DownloadSlots::new(l.downloads_per_ip, l.downloads_total),
            metrics: Metrics::default(),
            signer,
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// The image called `name`.
    pub fn image(&self, name: &str) -> Result<Arc<Image>, ApiError> {
        self.images
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no image {name:?}")))
    }

    /// Prepares (or finds prepared) the download of `piece` in `image`, reporting steps.
    pub async fn prepare(
        self: &Arc<Self>,
        image: &str,
        piece: &str,
        progress: Option<&mpsc::Sender<Step>>,
    ) -> Result<Arc<Prepared>, ApiError> {
        let im = self.image(image)?;
        if !valid_name(piece) {
            return Err(ApiError::bad_request(format!(
                "invalid piece name {piece:?}"
            )));
        }
        let key = (image.to_string(), piece.to_string());
        let cell = {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let ttl = self.limits.cache_ttl.0;
            let fresh = c.get(&key).is_some_and(|e| e.created.elapsed() < ttl);
            if !fresh {
                c.insert(
                    key.clone(),
                    CacheEntry {
                        cell: Arc::new(OnceCell::new()),
                        created: Instant::now(),
                    },
                );
            }
            c.get(&key).map(|e| e.cell.clone())
        };
        let Some(cell) = cell else {
            return Err(ApiError::internal("cache entry vanished"));
        };
        let mut ran = false;
        let prepared = cell
            .get_or_try_init(|| {
                ran = true;
                self.clone()
                    .prepare_uncached(im, piece.to_string(), progress.cloned())
            })
            .await;
        let prepared = match prepared {
            Ok(p) => p.clone(),
            Err(e) => {
                // Failures are not cached: the next request tries again.
                let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if c.get(&key).is_some_and(|e| Arc::ptr_eq(&e.cell, &cell)) {
                    c.remove(&key);
                }
                return Err(e);
            }
        };
        if !ran {
            if let Some(tx) = progress {
                let _ = tx.send(Step::Fetching).await;
                let _ = tx.send(Step::Preparing).await;
            }
        } else {
            self.evict();
        }
        Ok(prepared)
    }

    async fn prepare_uncached(
        self: Arc<Self>,
        im: Arc<Image>,
        piece: String,
        progress: Option<mpsc::Sender<Step>>,
    ) -> Result<Arc<Prepared>, ApiError> {
        let t0 = Instant::now();
        let slot = im
            .slot()
            .ok_or_else(|| ApiError::internal("configured slot missing"))?
            .clone();
        if let Some(tx) = &progress {
            let _ = tx.send(Step::Fetching).await;
        }
        let fetched = self
            .fetch_shared(&im.config.name, &piece, slot.capacity)
            .await?;
        tracing::info!(image = %im.config.name, %piece, origin = %fetched.origin,
            len = fetched.data.len(), "piece fetched");
        if let Some(tx) = &progress {
            let _ = tx.send(Step::Preparing).await;
        }
        let payload = PayloadInfo::of(&fetched.data);
        let data: Bytes = fetched.data;
        let im2 = im.clone();
        let st = self.clone();
        let slot_name = slot.name.clone();
        // Planning may read base bytes (format kinds) and hashing the patched chunks reads
        // them: both block, so they run on the blocking pool.
        let (plan, chunks, sha256) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            let plan = plan_injection(&im2.table, &im2.base.sync, &[Payload::new(slot_name, data)])
                .map_err(|e| match e {
                    kiln_inject::Error::TooLarge { .. } => ApiError::too_large(e.to_string()),
                    _ => ApiError::internal(e.to_string()),
                })?;
            let plan = Arc::new(plan);
            let composed = ComposedImage::new(&im2.base.sync, plan.clone())
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let chunks = im2
                .chunks
                .compose(&composed, &plan)
                .map_err(|e| ApiError::bad_gateway(format!("reading the base: {e}")))?;
            let sha256 = plain_sha256(&im2, &composed, &plan, &st.metrics)?;
            Ok((plan, chunks, sha256))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        let composed = AsyncComposed::new(im.base.stream.clone(), plan)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let digest = chunks.digest();
        let mut h = Sha256::new();
        h.update(im.digest.0);
        h.update(slot.name.as_bytes());
        h.update([0]);
        h.update(payload.sha256.as_bytes());
        let etag = format!("\"{}\"", hex::encode(&h.finalize()[..16]));
        self.metrics.injection(t0.elapsed().as_secs_f64());
        Ok(Arc::new(Prepared {
            image: im,
            piece,
            payload,
            composed,
            chunks,
            digest,
            sha256,
            etag,
        }))
    }

    /// Fetches `piece`, through the shared prepared-payload records when the uploads live in
    /// an object store (see [`crate::store`]): a fresh record's payload is used as is, so every
    /// replica serves the same bytes; otherwise the piece is fetched and recorded.
    async fn fetch_shared(
        &self,
        image: &str,
        piece: &str,
        limit: u64,
    ) -> Result<crate::pieces::Piece, ApiError> {
        let shared = self
            .sources
            .uploads()
            .filter(|s| s.shares_prepared() && !crate::store::is_upload_id(piece));
        let Some(shared) = shared else {
            return self.sources.fetch(piece, limit).await;
        };
        let ttl = self.limits.cache_ttl.0.as_secs();
        let now = now_secs();
        match shared.get_prepared(image, piece).await {
            Ok(Some(rec)) if now.saturating_sub(rec.created) < ttl => {
                match shared.get_payload(&rec.payload_sha256, limit).await {
                    Ok(Some(data)) => {
                        return Ok(crate::pieces::Piece {
                            data,
                            origin: format!("{} (recorded by a replica)", rec.origin),
                        })
                    }
                    Ok(None) => {
                        tracing::warn!(%image, %piece, "prepared record without its payload")
                    }
                    Err(e) => tracing::warn!(%image, %piece, "prepared payload: {}", e.message),
                }
            }
            Ok(_) => {}
            // The store being down must not stop pieces from being served.
            Err(e) => tracing::warn!(%image, %piece, "reading the prepared record: {}", e.message),
        }
        let fetched = self.sources.fetch(piece, limit).await?;
        let rec = PreparedRecord {
            payload_sha256: hex::encode(Sha256::digest(&fetched.data)),
            len: fetched.data.len() as u64,
            origin: fetched.origin.clone(),
            created: now,
        };
        if let Err(e) = shared
            .put_prepared(image, piece, &rec, fetched.data.clone())
            .await
        {
            tracing::warn!(%image, %piece, "recording the prepared payload: {}", e.message);
        }
        Ok(fetched)
    }

    /// Drops the oldest preparations while their payloads exceed the cache budget.
    fn evict(&self) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let size = |e: &CacheEntry| e.cell.get().map_or(0, |p| p.payload.len);
        let mut total: u64 = c.values().map(size).sum();
        if total <= self.limits.cache_bytes.0 {
            return;
        }
        let mut by_age: Vec<((String, String), Instant, u64)> = c
            .iter()
            .map(|(k, e)| (k.clone(), e.created, size(e)))
            .collect();
        by_age.sort_by_key(|x| x.1);
        for (k, _, s) in by_age {
            if total <= self.limits.cache_bytes.0 {
                break;
            }
            c.remove(&k);
            total -= s;
        }
    }
}
