//! Remote locations kiln reads and writes: S3-compatible object stores (AWS S3, Cloudflare R2,
//! MinIO, through `object_store`), plain HTTP(S) URLs (read only) and local paths.
//!
//! Object stores are configured from the standard environment: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`; R2
//! uses `auto`), `AWS_ENDPOINT` (or `AWS_ENDPOINT_URL`) for R2/MinIO. Plain HTTP endpoints are
//! allowed for loopback hosts, elsewhere only with `AWS_ALLOW_HTTP=true`. Credentials are
//! never printed: messages name the bucket and key only.
//!
//! Uploads write a `.sha256` sidecar next to each object, in `sha256sum` format
//! (`<hex>  <name>`), after the object itself, so a sidecar never names missing data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

/// A place bytes can be fetched from (and, for object stores, written to).
#[derive(Clone)]
pub enum Remote {
    /// `s3://BUCKET/KEY`.
    S3 {
        /// The store for the bucket.
        store: Arc<dyn ObjectStore>,
        /// Bucket name, for messages.
        bucket: String,
        /// Object key (no leading `/`).
        key: String,
    },
    /// `http://` or `https://` URL (read only).
    Http(reqwest::Url),
    /// A local file path.
    File(PathBuf),
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Remote::S3 { bucket, key, .. } => write!(f, "s3://{bucket}/{key}"),
            Remote::Http(u) => {
                // Never print userinfo or query strings (presigned URLs carry secrets there).
                let mut u = u.clone();
                let _ = u.set_username("");
                let _ = u.set_password(None);
                u.set_query(None);
                write!(f, "{u}")
            }
            Remote::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Splits `s3://bucket/key` into bucket and key.
pub fn parse_s3(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{url:?}: expected s3://BUCKET/KEY"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("{url:?}: empty bucket name");
    }
    Ok((bucket.to_string(), key.trim_start_matches('/').to_string()))
}

/// Builds the object store for `bucket` from the environment.
pub fn s3_store(bucket: &str) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = std::env::var("AWS_ENDPOINT")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok();
    if let Some(ep) = &endpoint {
        b = b.with_endpoint(ep.clone());
        let url =
            reqwest::Url::parse(ep).with_context(|| format!("AWS_ENDPOINT {ep:?} is not a URL"))?;
        if url.scheme() == "http" {
            let loopback = url.host_str().is_some_and(crate::oci::host_is_loopback);
            let allowed =
                std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
            if !loopback && !allowed {
                bail!("AWS_ENDPOINT {ep:?} is plain HTTP and not loopback; set AWS_ALLOW_HTTP=true to allow it");
            }
            b = b.with_allow_http(true);
        }
    }
    if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        b = b.with_region("us-east-1");
    }
    let s = b.build().map_err(|e| {
        anyhow::anyhow!(
            "configuring the object store for bucket {bucket:?}: {}",
            scrub(&e.to_string())
        )
    })?;
    Ok(Arc::new(s))
}

/// Removes anything that looks like a configured secret from a message.
pub fn scrub(msg: &str) -> String {
    let mut out = msg.to_string();
    for var in [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        crate::oci::ENV_PASSWORD,
        crate::oci::ENV_TOKEN,
    ] {
        if let Ok(v) = std::env::var(var) {
            if v.len() >= 4 {
                out = out.replace(&v, "[redacted]");
            }
        }
    }
    out
}

fn store_err(what: &str, r: &Remote, e: object_store::Error) -> anyhow::Error {
    anyhow::anyhow!("{what} {r}: {}", scrub(&e.to_string()))
}

impl Remote {
    /// Parses `s3://…`, `http(s)://…` or a local path.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if s.starts_with("s3://") {
            let (bucket, key) = parse_s3(s)?;
            Ok(Remote::S3 {
                store: s3_store(&bucket)?,
                bucket,
                key,
            })
        } else if s.starts_with("http://") || s.starts_with("https://") {
            Ok(Remote::Http(
                reqwest::Url::parse(s).with_context(|| format!("{s:?}: not a URL"))?,
            ))
        } else {
            Ok(Remote::File(PathBuf::from(
                s.strip_prefix("file://").unwrap_or(s),
            )))
        }
    }

    /// The location `rel` names relative to this one's directory (like a relative URL).
    /// `rel` must be a plain relative key: no `..`, no leading `/`.
    pub fn join(&self, rel: &str) -> anyhow::Result<Self> {
        if rel.is_empty()
            || rel.starts_with('/')
            || rel.split('/').any(|c| c == ".." || c.is_empty())
        {
            bail!("key {rel:?}: expected a relative key without `..` or empty components");
        }
        Ok(match self {
            Remote::S3 { store, bucket, key } => {
                let dir = key.rsplit_once('/').map_or("", |(d, _)| d);
                Remote::S3 {
                    store: store.clone(),
                    bucket: bucket.clone(),
                    key: if dir.is_empty() {
                        rel.to_string()
                    } else {
                        format!("{dir}/{rel}")
                    },
                }
            }
            Remote::Http(u) => Remote::Http(
                u.join(rel)
                    .with_context(|| format!("{rel:?} relative to {self}"))?,
            ),
            Remote::File(p) => Remote::File(p.parent().unwrap_or(Path::new(".")).join(rel)),
        })
    }

    /// This location with `suffix` appended to its last component (`KEY` → `KEY.sha256`).
    pub fn with_suffix(&self, suffix: &str) -> Self {
        match self {
            Remote::S3 { store, bucket, key } => Remote::S3 {
                store: store.clone(),
                bucket: bucket.clone(),
                key: format!("{key}{suffix}"),
            },
            Remote::Http(u) => {
                let mut u = u.clone();
                let p = format!("{}{suffix}", u.path());
                u.set_path(&p);
                Remote::Http(u)
            }
            Remote::File(p) => {
                let mut s = p.as_os_str().to_owned();
                s.push(suffix);
                Remote::File(PathBuf::from(s))
            }
        }
    }

    /// Fetches a small object whole (at most `max` bytes), with its version for a later
    /// conditional write. `Ok(None)` when it does not exist.
    pub async fn get_small(
        &self,
        max: u64,
    ) -> anyhow::Result<Option<(Vec<u8>, Option<UpdateVersion>)>> {
        match self {
            Remote::S3 { store, key, .. } => {
                let r = match store.get(&ObjPath::from(key.as_str())).await {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(store_err("GET", self, e)),
                };
                if r.meta.size > max {
                    bail!(
                        "{self}: {} bytes, more than the {max} expected",
                        r.meta.size
                    );
                }
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let bytes = r.bytes().await.map_err(|e| store_err("GET", self, e))?;
                Ok(Some((bytes.to_vec(), Some(version))))
            }
            Remote::Http(u) => {
                let r = reqwest::get(u.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("GET {self}: {}", e.without_url()))?;
                if r.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !r.status().is_success() {
                    bail!("GET {self}: {}", r.status());
                }
                if r.content_length().is_some_and(|n| n > max) {
                    bail!("GET {self}: more than the {max} bytes expected");
                }
                let b = r
                    .bytes()
                    .await
                    .map_err(|e| anyhow::anyhow!("GET {self}: {}", e.without_url()))?;
                if b.len() as u64 > max {
                    bail!("GET {self}: more than the {max} bytes expected");
                }
                Ok(Some((b.to_vec(), None)))
            }
            Remote::File(p) => match std::fs::metadata(p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("{}: stat", p.display())),
                Ok(m) if m.len() > max => bail!(
                    "{}: {} bytes, more than the {max} expected",
                    p.display(),
                    m.len()
                ),
                Ok(_) => Ok(Some((
                    std::fs::read(p).with_context(|| format!("{}: read", p.display()))?,
                    None,
                ))),
            },
        }
    }

    /// Streams the object into `dest` through an atomic temp file, checking its sha256 (hex)
    /// and, when given, its size. On any failure `dest` is left as it was.
    pub async fn download_to(
        &self,
        dest: &Path,
        sha256: &str,
        size: Option<u64>,
    ) -> anyhow::Result<u64> {
        let a = kiln_tree::output::AtomicFile::create(dest)
            .with_context(|| format!("{}: create", dest.display()))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut w = std::io::BufWriter::with_capacity(crate::digest::BUF, a.file());
        let mut put = |c: &[u8]| -> anyhow::Result<()> {
            n += c.len() as u64;
            if let Some(s) = size {
                if n > s {
                    return Err(crate::Error::SizeMismatch {
                        what: self.to_string(),
                        expected: s,
                        actual: n,
                    }
                    .into());
                }
            }
            h.update(c);
            w.write_all(c)
                .with_context(|| format!("{}: write", dest.display()))
        };
        match self {
            Remote::S3 { store, key, .. } => {
                let r = store
                    .get(&ObjPath::from(key.as_str()))
                    .await
                    .map_err(|e| store_err("GET", self, e))?;
                let mut s = r.into_stream();
                while let Some(c) = s.next().await {
                    put(&c.map_err(|e| store_err("GET", self, e))?)?;
                }
            }
            Remote::Http(u) => {
                let r = reqwest::get(u.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("GET {self}: {}", e.without_url()))?;
                if !r.status().is_success() {
                    bail!("GET {self}: {}", r.status());
                }
                let mut s = r.bytes_stream();
                while let Some(c) = s.next().await {
                    put(&c.map_err(|e| anyhow::anyhow!("GET {self}: {}", e.without_url()))?)?;
                }
            }
            Remote::File(p) => {
                use std::io::Read;
                let mut f =
                    std::fs::File::open(p).with_context(|| format!("{}: open", p.display()))?;
                let mut buf = vec![0u8; crate::digest::BUF];
                loop {
                    let k = f
                        .read(&mut buf)
                        .with_context(|| format!("{}: read", p.display()))?;
                    if k == 0 {
                        break;
                    }
                    put(&buf[..k])?;
                }
            }
        }
        w.flush()
            .with_context(|| format!("{}: write", dest.display()))?;
        drop(w);
        if let Some(s) = size {
            if n != s {
                return Err(crate::Error::SizeMismatch {
                    what: self.to_string(),
                    expected: s,
                    actual: n,
                }
                .into());
            }
        }
        let got = hex::encode(h.finalize());
        crate::digest::check(&self.to_string(), sha256, &got)?;
        a.commit()
            .with_context(|| format!("{}: commit", dest.display()))?;
        Ok(n)
    }

    fn s3(&self) -> anyhow::Result<(&Arc<dyn ObjectStore>, &str)> {
        match self {
            Remote::S3 { store, key, .. } => Ok((store, key)),
            _ => bail!("{self}: writing needs an object store (s3://) location"),
        }
    }

    /// Streams a local file to this object (multipart above 10 MiB).
    pub async fn upload_file(&self, path: &Path) -> anyhow::Result<()> {
        let (store, key) = self.s3()?;
        let mut w = object_store::buffered::BufWriter::new(store.clone(), ObjPath::from(key));
        let mut f = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("{}: open", path.display()))?;
        let copy = tokio::io::copy(&mut f, &mut w).await;
        match copy {
            Ok(_) => w
                .shutdown()
                .await
                .map_err(|e| anyhow::anyhow!("PUT {self}: {}", scrub(&e.to_string()))),
            Err(e) => {
                let _ = w.abort().await;
                Err(anyhow::anyhow!(
                    "PUT {self} from {}: {}",
                    path.display(),
                    scrub(&e.to_string())
                ))
            }
        }
    }

    /// Writes `bytes` unconditionally.
    pub async fn put_bytes(&self, bytes: Vec<u8>) -> anyhow::Result<()> {
        let (store, key) = self.s3()?;
        store
            .put(&ObjPath::from(key), PutPayload::from(bytes))
            .await
            .map_err(|e| store_err("PUT", self, e))?;
        Ok(())
    }

    /// Writes `bytes` only if the object is still at `version` (If-Match on its ETag), or,
    /// with `None`, only if it does not exist yet (If-None-Match: *). A lost race is
    /// [`crate::Error::Conflict`].
    pub async fn put_conditional(
        &self,
        bytes: Vec<u8>,
        version: Option<UpdateVersion>,
    ) -> anyhow::Result<()> {
        let (store, key) = self.s3()?;
        let mode = match version {
            Some(v) => PutMode::Update(v),
            None => PutMode::Create,
        };
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        match store
            .put_opts(&ObjPath::from(key), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => Err(crate::Error::Conflict {
                key: self.to_string(),
            }
            .into()),
            Err(e) => Err(store_err("conditional PUT", self, e)),
        }
    }
}

/// The sidecar text for a file: `<hex>  <name>\n`, as `sha256sum` prints it.
pub fn sidecar_text(hex: &str, name: &str) -> String {
    format!("{hex}  {name}\n")
}

/// Reads the sha256 out of a sidecar: the first whitespace-separated field, 64 hex digits.
pub fn parse_sidecar(text: &[u8], what: &str) -> anyhow::Result<String> {
    let s = std::str::from_utf8(text)
        .map_err(|_| anyhow::anyhow!("{what}: sidecar is not UTF-8 text"))?;
    let h = s
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if !crate::digest::is_sha256_hex(&h) {
        bail!("{what}: sidecar does not start with a sha256 (64 hex digits)");
    }
    Ok(h)
}

/// Uploads `file` to `dest` and then `dest.sha256`. Returns the sha256 (hex) and size.
pub async fn upload_with_sidecar(file: &Path, dest: &Remote) -> anyhow::Result<(String, u64)> {
    let (hex, size) = crate::digest::sha256_file(file)?;
    dest.upload_file(file).await?;
    // The file may have changed while it was uploading; the sidecar must describe what went up.
    let (hex2, size2) = crate::digest::sha256_file(file)?;
    if (hex2.as_str(), size2) != (hex.as_str(), size) {
        bail!(
            "{}: changed while uploading; not writing a sidecar",
            file.display()
        );
    }
    let name = match dest {
        Remote::S3 { key, .. } => key.rsplit('/').next().unwrap_or(key).to_string(),
        _ => file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    dest.with_suffix(".sha256")
        .put_bytes(sidecar_text(&hex, &name).into_bytes())
        .await?;
    Ok((hex, size))
}

/// Downloads `src` to `dest`, verified against `src.sha256`. Returns the sha256 and size.
pub async fn download_with_sidecar(src: &Remote, dest: &Path) -> anyhow::Result<(String, u64)> {
    let side = src.with_suffix(".sha256");
    let (text, _) = side
        .get_small(4096)
        .await?
        .with_context(|| format!("{side}: no sidecar; refusing an unverifiable download"))?;
    let hex = parse_sidecar(&text, &side.to_string())?;
    let n = src.download_to(dest, &hex, None).await?;
    Ok((hex, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_and_joins() {
        assert_eq!(
            parse_s3("s3://b/a/c.img").unwrap(),
            ("b".into(), "a/c.img".into())
        );
        assert_eq!(parse_s3("s3://b").unwrap(), ("b".into(), "".into()));
        assert!(parse_s3("s3:///x").is_err());
        let r = Remote::File(PathBuf::from("/m/manifest.json"));
        assert_eq!(
            r.join("x86_64/disk.img").unwrap().to_string(),
            "/m/x86_64/disk.img"
        );
        assert!(r.join("../etc/passwd").is_err());
        assert!(r.join("/etc/passwd").is_err());
        let u = Remote::Http(
            reqwest::Url::parse("http://u:secret@h/r/manifest.json?sig=secret").unwrap(),
        );
        assert_eq!(u.join("a.img").unwrap().to_string(), "http://h/r/a.img");
        assert!(!u.to_string().contains("secret"));
    }

    #[test]
    fn sidecars() {
        let h = "ab".repeat(32);
        assert_eq!(
            parse_sidecar(sidecar_text(&h, "x").as_bytes(), "x").unwrap(),
            h
        );
        assert!(parse_sidecar(b"nothex  x\n", "x").is_err());
    }
}
