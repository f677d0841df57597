//! Shared state of a deployment: uploads (content-addressed), and, in an object store,
//! prepared-payload records that let every replica serve the same bytes for a piece.
//!
//! `uploads = "DIR"` keeps uploads in a local directory (one process). `uploads =
//! "s3://bucket/prefix"` keeps them in an S3-compatible store, so replicas behind a load
//! balancer see each other's uploads. Keys under the prefix:
//!
//! | key | what |
//! |---|---|
//! | `u-<32 hex>` | an upload; the id is the first 16 bytes of its sha256 |
//! | `payloads/<sha256 hex>` | a piece fetched from a directory or upstream source |
//! | `prepared/<image>/<piece>.json` | [`PreparedRecord`]: which payload the piece resolved to |
//!
//! Why prepared records: a piece named in a URL comes from a directory or an upstream site,
//! whose content can change. The page shows the sha256 computed by one replica and the browser
//! may download (or resume with Range) from another; both must use the same payload. The first
//! replica to prepare a piece stores the payload and a record; others use them until the
//! record is `cache_ttl` old, then fetch again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Upload ids: `u-` + the first 16 bytes of the payload's sha256, hex.
pub fn upload_id(data: &[u8]) -> String {
    format!("u-{}", hex::encode(&Sha256::digest(data)[..16]))
}

/// True for an upload id (`u-` and 32 lowercase hex digits).
pub fn is_upload_id(p: &str) -> bool {
    p.len() == 34
        && p.starts_with("u-")
        && p[2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// An S3-compatible store for `s3://bucket/key` with `options` (`endpoint`, `region`,
/// `access_key_id`, …; AWS_* environment variables also apply). Returns the store and the key.
pub fn s3(
    url: &str,
    options: &BTreeMap<String, String>,
) -> anyhow::Result<(Arc<dyn ObjectStore>, String)> {
    let Some(rest) = url.strip_prefix("s3://") else {
        bail!("{url:?}: only s3:// object URLs are supported");
    };
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("{url:?}: expected s3://bucket/key");
    }
    // object_store's default 30 s limit covers a whole request including its body, which
    // would cut long downloads to slow clients; requests are bounded per range piece and by
    // an idle timeout instead (see catalog::ObjectBase::stream). A `timeout` option still wins.
    //
    // The client options go in first: `with_client_options` replaces all of them, so applied
    // after `AmazonS3Builder::from_env()` it would drop AWS_ALLOW_HTTP and friends. The AWS_*
    // variables are applied next (as from_env does), then the URL's bucket and the config's
    // options, which win.
    let mut b =
        AmazonS3Builder::new().with_client_options(ClientOptions::new().with_timeout_disabled());
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        if k.starts_with("AWS_") {
            if let Ok(ck) = AmazonS3ConfigKey::from_str(&k.to_ascii_lowercase()) {
                b = b.with_config(ck, v);
            }
        }
    }
    b = b.with_bucket_name(bucket);
    for (k, v) in options {
        let ck = AmazonS3ConfigKey::from_str(k)
            .with_context(|| format!("{url}: unknown store option {k:?}"))?;
        b = b.with_config(ck, v);
    }
    let store: Arc<dyn ObjectStore> = Arc::new(b.build().with_context(|| url.to_string())?);
    Ok((store, key.trim_matches('/').to_string()))
}

/// Which payload a piece resolved to, shared between replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedRecord {
    /// sha256 of the payload (hex); the payload is at `payloads/<this>`.
    pub payload_sha256: String,
    /// Payload length in bytes.
    pub len: u64,
    /// Where the payload came from (for logs).
    pub origin: String,
    /// When it was fetched, Unix seconds.
    pub created: u64,
}

/// Where uploads and prepared records live.
pub enum SharedStore {
    /// A local directory (uploads only).
    Dir(PathBuf),
    /// An object store prefix.
    Object {
        /// The store.
        store: Arc<dyn ObjectStore>,
        /// Key prefix (no trailing slash; may be empty).
        prefix: String,
        /// The configured URL, for messages.
        url: String,
    },
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SharedStore {
    /// From the config's `uploads` value (already resolved) and `[store]` options.
    pub fn open(uploads: &str, options: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        if uploads.contains("://") {
            let (store, prefix) = s3(uploads, options).context("uploads")?;
            Ok(Self::Object {
                store,
                prefix,
                url: uploads.to_string(),
            })
        } else {
            Ok(Self::Dir(PathBuf::from(uploads)))
        }
    }

    /// True when prepared records are shared (an object store).
    pub fn shares_prepared(&self) -> bool {
        matches!(self, Self::Object { .. })
    }

    fn key(prefix: &str, rel: &str) -> ObjPath {
        if prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{prefix}/{rel}"))
        }
    }

    fn describe(&self, rel: &str) -> String {
        match self {
            Self::Dir(d) => d.join(rel).display().to_string(),
            Self::Object { url, .. } => format!("{}/{rel}", url.trim_end_matches('/')),
        }
    }

    /// Stores `data` under `rel` (`u-…`, `payloads/…`, `prepared/…`). Writes are whole-object
    /// (a local file is renamed into place), so a reader never sees a partial one.
    async fn put(&self, rel: &str, data: Bytes) -> Result<(), ApiError> {
        let what = self.describe(rel);
        match self {
            Self::Dir(dir) => {
                let dest = dir.join(rel);
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    let f = kiln_tree::output::AtomicFile::create(&dest)?;
                    std::io::Write::write_all(&mut f.file(), &data)?;
                    f.commit()
                })
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::internal(format!("storing {what}: {e}")))
            }
            Self::Object { store, prefix, .. } => store
                .put(&Self::key(prefix, rel), PutPayload::from(data))
                .await
                .map(|_| ())
                .map_err(|e| ApiError::bad_gateway(format!("storing {what}: {e}"))),
        }
    }

    /// Reads `rel` if it exists and is at most `limit` bytes.
    async fn get(&self, rel: &str, limit: u64) -> Result<Option<Bytes>, ApiError> {
        let what = self.describe(rel);
        let too_large = |n: u64| {
            ApiError::too_large(format!(
                "{what} is {n} bytes, more than the limit of {limit}"
            ))
        };
        match self {
            Self::Dir(dir) => {
                let p = dir.join(rel);
                match tokio::fs::metadata(&p).await {
                    Ok(m) if !m.is_file() => return Ok(None),
                    Ok(m) if m.len() > limit => return Err(too_large(m.len())),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(ApiError::internal(format!("{what}: {e}"))),
                }
                let data = tokio::fs::read(&p)
                    .await
                    .map_err(|e| ApiError::internal(format!("{what}: {e}")))?;
                if data.len() as u64 > limit {
                    return Err(too_large(data.len() as u64));
                }
                Ok(Some(data.into()))
            }
            Self::Object { store, prefix, .. } => {
                let r = match store.get(&Self::key(prefix, rel)).await {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(ApiError::bad_gateway(format!("{what}: {e}"))),
                };
                if r.meta.size > limit {
                    return Err(too_large(r.meta.size));
                }
                let data = r
                    .bytes()
                    .await
                    .map_err(|e| ApiError::bad_gateway(format!("{what}: {e}")))?;
                if data.len() as u64 > limit {
                    return Err(too_large(data.len() as u64));
                }
                Ok(Some(data))
            }
        }
    }

    /// Stores an upload under its id. Ids are content-addressed, so storing twice is harmless.
    pub async fn put_upload(&self, id: &str, data: Bytes) -> Result<(), ApiError> {
        if let Self::Dir(dir) = self {
            if tokio::fs::try_exists(dir.join(id)).await.unwrap_or(false) {
                return Ok(());
            }
        }
        self.put(id, data).await
    }

    /// An upload by id, checked against its id (a damaged or foreign object is an error, not
    /// a silently different image).
    pub async fn get_upload(&self, id: &str, limit: u64) -> Result<Option<Bytes>, ApiError> {
        let Some(data) = self.get(id, limit).await? else {
            return Ok(None);
        };
        if upload_id(&data) != id {
            return Err(ApiError::bad_gateway(format!(
                "{} does not hash to its id",
                self.describe(id)
            )));
        }
        Ok(Some(data))
    }

    /// The record of `piece` in `image`, if one exists and parses.
    pub async fn get_prepared(
        &self,
        image: &str,
        piece: &str,
    ) -> Result<Option<PreparedRecord>, ApiError> {
        let rel = format!("prepared/{image}/{piece}.json");
        let Some(b) = self.get(&rel, 64 << 10).await? else {
            return Ok(None);
        };
        match serde_json::from_slice(&b) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                tracing::warn!(record = %self.describe(&rel), "ignoring an unreadable record: {e}");
                Ok(None)
            }
        }
    }

    /// Stores the payload and the record for `piece` in `image`.
    pub async fn put_prepared(
        &self,
        image: &str,
        piece: &str,
        rec: &PreparedRecord,
        payload: Bytes,
    ) -> Result<(), ApiError> {
        self.put(&format!("payloads/{}", rec.payload_sha256), payload)
            .await?;
        let json = serde_json::to_vec(rec).map_err(|e| ApiError::internal(e.to_string()))?;
        self.put(&format!("prepared/{image}/{piece}.json"), json.into())
            .await
    }

    /// A stored payload by sha256, checked.
    pub async fn get_payload(&self, sha256: &str, limit: u64) -> Result<Option<Bytes>, ApiError> {
        let rel = format!("payloads/{sha256}");
        let Some(data) = self.get(&rel, limit).await? else {
            return Ok(None);
        };
        if hex::encode(Sha256::digest(&data)) != sha256 {
            return Err(ApiError::bad_gateway(format!(
                "{} does not hash to its name",
                self.describe(&rel)
            )));
        }
        Ok(Some(data))
    }

    /// The local directory, for a `Dir` store.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Self::Dir(d) => Some(d),
            Self::Object { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn uploads_and_records_round_trip_and_are_checked() {
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let d = tempfile::tempdir().unwrap();
        let stores = [
            SharedStore::Object {
                store: mem.clone(),
                prefix: "up".into(),
                url: "s3://b/up".into(),
            },
            SharedStore::Dir(d.path().to_path_buf()),
        ];
        for st in &stores {
            let page = Bytes::from_static(b"<p>hi</p>");
            let id = upload_id(&page);
            assert_eq!(st.get_upload(&id, 100).await.unwrap(), None);
            st.put_upload(&id, page.clone()).await.unwrap();
            st.put_upload(&id, page.clone()).await.unwrap();
            assert_eq!(st.get_upload(&id, 100).await.unwrap(), Some(page.clone()));
            let e = st.get_upload(&id, 3).await.unwrap_err();
            assert_eq!(e.status, 413, "{}", e.message);

            let rec = PreparedRecord {
                payload_sha256: hex::encode(Sha256::digest(&page)),
                len: page.len() as u64,
                origin: "test".into(),
                created: 7,
            };
            st.put_prepared("demo", "hello", &rec, page.clone())
                .await
                .unwrap();
            assert_eq!(
                st.get_prepared("demo", "hello").await.unwrap(),
                Some(rec.clone())
            );
            assert_eq!(
                st.get_payload(&rec.payload_sha256, 100).await.unwrap(),
                Some(page.clone())
            );
            // A payload that does not match its name is refused.
            st.put(&format!("payloads/{}", rec.payload_sha256), "other".into())
                .await
                .unwrap();
            assert!(st.get_payload(&rec.payload_sha256, 100).await.is_err());
            st.put(&id, "other".into()).await.unwrap();
            assert!(st.get_upload(&id, 100).await.is_err());
        }
        // Keys in the object store sit under the prefix.
        let keys: Vec<String> = futures::StreamExt::collect::<Vec<_>>(mem.list(None))
            .await
            .into_iter()
            .map(|m| m.unwrap().location.to_string())
            .collect();
        assert!(keys.iter().all(|k| k.starts_with("up/")), "{keys:?}");
        assert!(
            keys.iter().any(|k| k == "up/prepared/demo/hello.json"),
            "{keys:?}"
        );
    }
}
