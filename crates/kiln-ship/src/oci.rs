//! OCI artifacts, compatible with ORAS: an image manifest whose config is the empty descriptor,
//! one layer per file named by its `org.opencontainers.image.title` annotation, and an
//! `artifactType` naming what the artifact is.
//!
//! Specs: OCI distribution-spec v1.1 (push: HEAD blob, POST upload, PUT `?digest=` or PATCH
//! chunks, PUT manifest; pull: GET manifest, GET blob with `Range`; referrers API and its
//! tag-schema fallback `sha256-<hex>`), OCI image-spec v1.1 (manifest, index, descriptors,
//! `subject`, `artifactType`), the Docker token authentication spec (Bearer challenge, realm,
//! service, scope).
//!
//! This is a thin client over reqwest rather than the `oci-client` crate: kiln needs to resume
//! a blob download with `Range` into a partial file, to stream blob uploads from disk in
//! PATCH chunks of a chosen size, and to push and read referrers with the tag fallback; doing
//! those through `oci-client` meant working around its API at every step.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use futures::StreamExt;
use kiln_tree::progress::{Progress, Silent};
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE,
};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// OCI image manifest media type.
pub const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest (accepted on pull, for registries that convert).
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The empty descriptor's media type (image-spec "Guidance for an Empty Descriptor").
pub const MT_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Digest of the two bytes `{}`.
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// Layer media type for a file stored as is.
pub const MT_FILE: &str = "application/vnd.kiln.file.v1";
/// Layer media type for a file stored zstd-compressed (OCI's `+zstd` suffix convention). Its
/// title ends in `.zst`; kiln pull writes the decompressed file without that suffix.
pub const MT_FILE_ZSTD: &str = "application/vnd.kiln.file.v1+zstd";
/// Default `artifactType` of what `kiln push` uploads.
pub const ARTIFACT_TYPE_IMAGE: &str = "application/vnd.kiln.image.v1";
/// `artifactType` of minisign signatures attached as referrers.
pub const ARTIFACT_TYPE_SIGNATURE: &str = "application/vnd.kiln.signature.v1+minisign";
/// `artifactType` of SPDX SBOMs attached as referrers.
pub const ARTIFACT_TYPE_SBOM: &str = "application/spdx+json";
/// The file name annotation ORAS uses.
pub const ANN_TITLE: &str = "org.opencontainers.image.title";
/// Digest of the uncompressed file of a `+zstd` layer.
pub const ANN_UNCOMPRESSED_DIGEST: &str = "dev.kiln.uncompressed.digest";
/// Size in bytes of the uncompressed file of a `+zstd` layer.
pub const ANN_UNCOMPRESSED_SIZE: &str = "dev.kiln.uncompressed.size";

/// Environment variables for credentials (they win over the docker config file).
pub const ENV_USERNAME: &str = "KILN_REGISTRY_USERNAME";
/// See [`ENV_USERNAME`].
pub const ENV_PASSWORD: &str = "KILN_REGISTRY_PASSWORD";
/// A bearer token used as is (for registries that hand out long-lived tokens).
pub const ENV_TOKEN: &str = "KILN_REGISTRY_TOKEN";

/// A content descriptor (image-spec `descriptor.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// Size of the content in bytes.
    pub size: u64,
    /// Artifact type (on manifest descriptors in an index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations, sorted by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// The annotation `key`, if any.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// An OCI image manifest (image-spec `manifest.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`MT_MANIFEST`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// What the artifact is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob; the empty descriptor for artifacts.
    pub config: Descriptor,
    /// One layer per file.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// The manifest this one refers to (signatures, SBOMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Manifest annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An OCI image index (image-spec `image-index.md`), as the referrers API and its fallback tag
/// return it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// [`MT_INDEX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests listed.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// `oci://REGISTRY/REPO[:TAG][@DIGEST]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// Repository path, lowercase, `/`-separated.
    pub repository: String,
    /// Tag, if given.
    pub tag: Option<String>,
    /// `sha256:<hex>`, if given.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `oci://host[:port]/repo/path[:tag][@sha256:hex]` (the `oci://` is optional).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let rest = s.strip_prefix("oci://").unwrap_or(s);
        let (registry, path) = rest
            .split_once('/')
            .with_context(|| format!("{s:?}: expected oci://REGISTRY/REPOSITORY[:TAG]"))?;
        if registry.is_empty() {
            bail!("{s:?}: empty registry host");
        }
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => {
                crate::digest::oci_hex(d).with_context(|| format!("{s:?}"))?;
                (p, Some(d.to_string()))
            }
            None => (path, None),
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            bail!(
                "{s:?}: repository {repository:?} must be lowercase letters, digits, `._-` and `/`"
            );
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                bail!("{s:?}: tag {t:?} must match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}");
            }
        }
        Ok(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The manifest reference: the digest when given, else the tag, else `latest`.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// True when the registry host is a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
    pub fn is_loopback(&self) -> bool {
        host_is_loopback(&self.registry)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// True for `localhost`, `127.x.y.z` and `[::1]`, with or without a port.
pub fn host_is_loopback(hostport: &str) -> bool {
    let host = if let Some(rest) = hostport.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Allow plain HTTP to a non-loopback registry.
    pub insecure: bool,
    /// Blobs larger than this are uploaded in PATCH chunks of this size.
    pub chunk_size: u64,
    /// How many times an interrupted blob download is resumed within one run.
    pub retries: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            insecure: false,
            chunk_size: 64 << 20,
            retries: 5,
        }
    }
}

#[derive(Clone)]
enum Credentials {
    None,
    Basic { user: String, password: String },
    Token(String),
}

/// A registry client bound to one repository.
pub struct Client {
    http: reqwest::Client,
    base: String,
    repository: String,
    registry: String,
    opts: Options,
    creds: Credentials,
    /// The `Authorization` value in force, once a challenge was answered.
    auth: Mutex<Option<HeaderValue>>,
    insecure: bool,
    /// Where transfer notices go (resumed and interrupted downloads, pushed and pulled files).
    progress: Arc<dyn Progress + Send>,
}

impl Client {
    /// A client for `r`'s repository. Plain HTTP is used for loopback registries and with
    /// `opts.insecure`; every other registry is spoken to over HTTPS.
    pub fn new(r: &Reference, opts: Options) -> anyhow::Result<Self> {
        let scheme = if r.is_loopback() || opts.insecure {
            "http"
        } else {
            "https"
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        let creds = credentials(&r.registry)?;
        let auth = match &creds {
            Credentials::Token(t) => Some(bearer(t)?),
            _ => None,
        };
        Ok(Self {
            http,
            base: format!("{scheme}://{}", r.registry),
            repository: r.repository.clone(),
            registry: r.registry.clone(),
            insecure: opts.insecure,
            opts,
            creds,
            auth: Mutex::new(auth),
            progress: Arc::new(Silent),
        })
    }

    /// Reports transfers to `progress` (by default nothing is reported).
    pub fn with_progress(mut self, progress: Arc<dyn Progress + Send>) -> Self {
        self.progress = progress;
        self
    }

    fn note(&self, message: &str) {
        self.progress.note(message);
    }

    /// The registry's base URL (`http://` only for loopback or with `insecure`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    fn current_auth(&self) -> Option<HeaderValue> {
        self.auth.lock().ok().and_then(|g| g.clone())
    }

    /// Sends a request, answering one 401 challenge (Basic or Bearer) and retrying. `body`
    /// builds the body afresh for the retry.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: &(dyn Fn() -> anyhow::Result<Option<reqwest::Body>> + Sync),
    ) -> anyhow::Result<reqwest::Response> {
        for attempt in 0..2 {
            let mut rb = self
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(a) = self.current_auth() {
                rb = rb.header(AUTHORIZATION, a);
            }
            if let Some(b) = body()? {
                rb = rb.body(b);
            }
            let resp = rb.send().await.with_context(|| format!("{method} {url}"))?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.answer_challenge(&challenge, &method)
                    .await
                    .with_context(|| format!("{method} {url}: authenticating"))?;
                continue;
            }
            if resp.status() == StatusCode::UNAUTHORIZED {
                break;
            }
            return Ok(resp);
        }
        bail!("{method} {url}: still unauthorized after authenticating (check the credentials)")
    }

    async fn answer_challenge(&self, challenge: &str, method: &Method) -> anyhow::Result<()> {
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => match &self.creds {
                Credentials::Basic { user, password } => {
                    self.set_auth(basic(user, password)?);
                    Ok(())
                }
                _ => bail!(
                    "{} wants credentials: set ${ENV_USERNAME} and ${ENV_PASSWORD} or log in with a docker config",
                    self.registry
                ),
            },
            "bearer" => {
                let realm = params
                    .get("realm")
                    .context("bearer challenge without a realm")?;
                let realm_url = reqwest::Url::parse(realm)
                    .with_context(|| format!("token realm {realm:?} is not a URL"))?;
                if realm_url.scheme() != "https"
                    && !self.insecure
                    && !realm_url.host_str().is_some_and(host_is_loopback)
                {
                    bail!("token realm {realm:?} is plain HTTP; refusing to send credentials (use --insecure to allow)");
                }
                let action = if *method == Method::GET || *method == Method::HEAD {
                    "pull"
                } else {
                    "pull,push"
                };
                let ours = format!("repository:{}:{action}", self.repository);
                let scope = params.get("scope").cloned().unwrap_or(ours);
                let mut q: Vec<(&str, &str)> = vec![("scope", scope.as_str())];
                if let Some(s) = params.get("service") {
                    q.push(("service", s.as_str()));
                }
                let mut rb = self.http.get(realm_url).query(&q);
                if let Credentials::Basic { user, password } = &self.creds {
                    rb = rb.header(AUTHORIZATION, basic(user, password)?);
                }
                let resp = rb.send().await.context("token request")?;
                if !resp.status().is_success() {
                    bail!("token endpoint answered {}", resp.status());
                }
                #[derive(Deserialize)]
                struct Tok {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let body = body_capped(resp, MAX_MANIFEST, "token response").await?;
                let t: Tok = serde_json::from_slice(&body).context("token response is not JSON")?;
                let tok = t
                    .token
                    .or(t.access_token)
                    .context("token response has neither `token` nor `access_token`")?;
                self.set_auth(bearer(&tok)?);
                Ok(())
            }
            _ => bail!(
                "{} answered 401 with an unsupported challenge {:?}",
                self.registry,
                scheme
            ),
        }
    }

    fn set_auth(&self, v: HeaderValue) {
        if let Ok(mut g) = self.auth.lock() {
            *g = Some(v);
        }
    }

    /// True when the repository has a blob with this digest.
    pub async fn has_blob(&self, digest: &str) -> anyhow::Result<bool> {
        let url = self.url(&format!("blobs/{digest}"));
        let r = self
            .send(Method::HEAD, &url, HeaderMap::new(), &|| Ok(None))
            .await?;
        match r.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => bail!("HEAD {url}: {s}"),
        }
    }

    /// Uploads `len` bytes of `path` from `offset` as the blob `digest` (skipped when present):
    /// POST to open an upload session, then a single PUT `?digest=` or, above
    /// [`Options::chunk_size`], PATCH chunks and a closing PUT.
    pub async fn push_blob_file(
        &self,
        path: &Path,
        digest: &str,
        len: u64,
    ) -> anyhow::Result<bool> {
        if self.has_blob(digest).await? {
            return Ok(false);
        }
        let mut location = self.start_upload().await?;
        let chunk = self.opts.chunk_size.max(1);
        if len > chunk {
            let mut off = 0u64;
            while off < len {
                let n = chunk.min(len - off);
                let mut h = HeaderMap::new();
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                h.insert(CONTENT_LENGTH, HeaderValue::from(n));
                h.insert(
                    "Content-Range",
                    HeaderValue::from_str(&format!("{off}-{}", off + n - 1))?,
                );
                let p = path.to_path_buf();
                let r = self
                    .send(Method::PATCH, &location, h, &|| {
                        Ok(Some(file_body(&p, off, n)?))
                    })
                    .await?;
                if r.status() != StatusCode::ACCEPTED {
                    bail!(
                        "PATCH {location} (bytes {off}..{}): {}: {}",
                        off + n,
                        r.status(),
                        text(r).await
                    );
                }
                location = self.location(&r)?;
                off += n;
            }
            let url = with_digest(&location, digest);
            let mut h = HeaderMap::new();
            h.insert(CONTENT_LENGTH, HeaderValue::from(0u64));
            let r = self.send(Method::PUT, &url, h, &|| Ok(None)).await?;
            if r.status() != StatusCode::CREATED {
                bail!("PUT {url}: {}: {}", r.status(), text(r).await);
            }
        } else {
            let url = with_digest(&location, digest);
            let mut h = HeaderMap::new();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(CONTENT_LENGTH, HeaderValue::from(len));
            let p = path.to_path_buf();
            let r = self
                .send(Method::PUT, &url, h, &|| Ok(Some(file_body(&p, 0, len)?)))
                .await?;
            if r.status() != StatusCode::CREATED {
                bail!("PUT {url}: {}: {}", r.status(), text(r).await);
            }
        }
        Ok(true)
    }

    /// Uploads a small in-memory blob (configs, the empty blob).
    pub async fn push_blob_bytes(&self, bytes: &[u8], digest: &str) -> anyhow::Result<()> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        let location = self.start_upload().await?;
        let url = with_digest(&location, digest);
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len() as u64));
        let b = bytes::Bytes::copy_from_slice(bytes);
        let r = self
            .send(Method::PUT, &url, h, &|| {
                Ok(Some(reqwest::Body::from(b.clone())))
            })
            .await?;
        if r.status() != StatusCode::CREATED {
            bail!("PUT {url}: {}: {}", r.status(), text(r).await);
        }
        Ok(())
    }

    async fn start_upload(&self) -> anyhow::Result<String> {
        let url = self.url("blobs/uploads/");
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, HeaderValue::from(0u64));
        let r = self.send(Method::POST, &url, h, &|| Ok(None)).await?;
        if r.status() != StatusCode::ACCEPTED {
            bail!("POST {url}: {}: {}", r.status(), text(r).await);
        }
        self.location(&r)
    }

    fn location(&self, r: &reqwest::Response) -> anyhow::Result<String> {
        let loc = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("{}: upload response without a Location", r.url()))?;
        let base = reqwest::Url::parse(&self.base).context("registry URL")?;
        Ok(base
            .join(loc)
            .with_context(|| format!("upload Location {loc:?}"))?
            .to_string())
    }

    /// PUTs a manifest under `reference` (a tag or its digest). Returns its digest and whether
    /// the registry processed its `subject` (the `OCI-Subject` header).
    pub async fn put_manifest(
        &self,
        body: &[u8],
        media_type: &str,
        reference: &str,
    ) -> anyhow::Result<(String, bool)> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(body)));
        let url = self.url(&format!("manifests/{reference}"));
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(media_type)?);
        let b = bytes::Bytes::copy_from_slice(body);
        let r = self
            .send(Method::PUT, &url, h, &|| {
                Ok(Some(reqwest::Body::from(b.clone())))
            })
            .await?;
        if r.status() != StatusCode::CREATED {
            bail!("PUT {url}: {}: {}", r.status(), text(r).await);
        }
        if let Some(d) = r
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
        {
            if d != digest {
                bail!("PUT {url}: registry stored digest {d}, expected {digest}");
            }
        }
        let subject_ok = r.headers().contains_key("OCI-Subject");
        Ok((digest, subject_ok))
    }

    /// GETs a manifest or index by tag or digest, returning its bytes, media type and digest.
    /// When fetched by digest the bytes are checked against it. `Ok(None)` on 404.
    pub async fn get_manifest(
        &self,
        reference: &str,
    ) -> anyhow::Result<Option<(Vec<u8>, String, String)>> {
        let url = self.url(&format!("manifests/{reference}"));
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            HeaderValue::from_str(&format!("{MT_MANIFEST}, {MT_INDEX}, {MT_DOCKER_MANIFEST}"))?,
        );
        let r = self.send(Method::GET, &url, h, &|| Ok(None)).await?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status().is_success() {
            bail!("GET {url}: {}: {}", r.status(), text(r).await);
        }
        let ct = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = body_capped(r, MAX_MANIFEST, "manifest").await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if reference.starts_with("sha256:") {
            crate::digest::check(&format!("manifest {reference}"), reference, &digest)?;
        }
        let mt = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(String::from)
            })
            .unwrap_or(ct);
        Ok(Some((body.to_vec(), mt, digest)))
    }

    /// Starts a GET of blob `digest` and returns the response once its status is 200, for the
    /// caller to stream and verify (container image layers, see [`crate::image_source`]).
    pub async fn get_blob(&self, digest: &str) -> anyhow::Result<reqwest::Response> {
        crate::digest::oci_hex(digest)?;
        let url = self.url(&format!("blobs/{digest}"));
        let r = self
            .send(Method::GET, &url, HeaderMap::new(), &|| Ok(None))
            .await?;
        if r.status() != StatusCode::OK {
            bail!("GET {url}: {}: {}", r.status(), text(r).await);
        }
        Ok(r)
    }

    /// Downloads blob `desc` into `partial`, resuming from the bytes already there with a
    /// `Range` request, retrying an interrupted transfer up to [`Options::retries`] times. On
    /// return the file holds exactly the blob (size and digest verified). A digest mismatch
    /// removes the partial file and is [`crate::Error::DigestMismatch`].
    pub async fn download_blob(
        &self,
        desc: &Descriptor,
        partial: &Path,
        what: &str,
    ) -> anyhow::Result<()> {
        let want = crate::digest::oci_hex(&desc.digest)?.to_string();
        let url = self.url(&format!("blobs/{}", desc.digest));
        let mut last_err = None;
        for attempt in 0..=self.opts.retries {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                // Never through a link placed where the partial file goes.
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(partial)
                .with_context(|| format!("{}: open", partial.display()))?;
            let mut have = f
                .metadata()
                .with_context(|| format!("{}: stat", partial.display()))?
                .len();
            if have > desc.size {
                f.set_len(0)?;
                have = 0;
            }
            // Hash what a previous attempt (or run) left, then continue from there.
            let mut hasher = Sha256::new();
            if have > 0 {
                f.seek(SeekFrom::Start(0))?;
                let mut buf = vec![0u8; crate::digest::BUF];
                let mut left = have;
                while left > 0 {
                    let n = (buf.len() as u64).min(left) as usize;
                    f.read_exact(&mut buf[..n])
                        .with_context(|| format!("{}: read", partial.display()))?;
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                }
            }
            if have < desc.size {
                let mut h = HeaderMap::new();
                if have > 0 {
                    h.insert(
                        reqwest::header::RANGE,
                        HeaderValue::from_str(&format!("bytes={have}-"))?,
                    );
                    self.note(&format!("{what}: resuming at byte {have} of {}", desc.size));
                }
                let r = self.send(Method::GET, &url, h, &|| Ok(None)).await?;
                match r.status() {
                    StatusCode::PARTIAL_CONTENT if have > 0 => {
                        let start = r
                            .headers()
                            .get(reqwest::header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("bytes "))
                            .and_then(|v| v.split('-').next())
                            .and_then(|v| v.parse::<u64>().ok());
                        if start != Some(have) {
                            bail!("GET {url}: asked for bytes from {have}, got Content-Range starting at {start:?}");
                        }
                    }
                    StatusCode::OK => {
                        if have > 0 {
                            // The server ignored Range: start over.
                            f.set_len(0)?;
                            hasher = Sha256::new();
                            have = 0;
                        }
                    }
                    StatusCode::RANGE_NOT_SATISFIABLE => {
                        f.set_len(0)?;
                        continue;
                    }
                    s => bail!("GET {url}: {s}: {}", text(r).await),
                }
                f.seek(SeekFrom::Start(have))?;
                let mut stream = r.bytes_stream();
                let mut interrupted = None;
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(c) => {
                            if have + c.len() as u64 > desc.size {
                                // A blob that is not the size its descriptor says will never
                                // verify: there is nothing to resume, so nothing is kept.
                                drop(f);
                                let _ = std::fs::remove_file(partial);
                                return Err(crate::Error::SizeMismatch {
                                    what: what.to_string(),
                                    expected: desc.size,
                                    actual: have + c.len() as u64,
                                }
                                .into());
                            }
                            f.write_all(&c)
                                .with_context(|| format!("{}: write", partial.display()))?;
                            hasher.update(&c);
                            have += c.len() as u64;
                        }
                        Err(e) => {
                            interrupted = Some(e);
                            break;
                        }
                    }
                }
                if have < desc.size {
                    let why = interrupted
                        .map_or_else(|| "connection closed".to_string(), |e| format!("{e}"));
                    tracing::info!(what, have, size = desc.size, attempt, error = %why, "blob download interrupted");
                    self.note(&format!(
                        "{what}: transfer interrupted at byte {have} of {} ({why}); attempt {} of {}",
                        desc.size,
                        attempt + 1,
                        self.opts.retries + 1
                    ));
                    last_err = Some(why);
                    continue;
                }
            }
            f.flush()?;
            let got = hex::encode(hasher.finalize());
            if got != want {
                drop(f);
                let _ = std::fs::remove_file(partial);
                return Err(crate::Error::DigestMismatch {
                    what: what.to_string(),
                    expected: desc.digest.clone(),
                    actual: format!("sha256:{got}"),
                }
                .into());
            }
            f.sync_data()
                .with_context(|| format!("{}: sync", partial.display()))?;
            return Ok(());
        }
        bail!(
            "{what}: download interrupted {} times ({}); the partial file {} is kept, run again to resume",
            self.opts.retries + 1,
            last_err.unwrap_or_default(),
            partial.display()
        )
    }

    /// Manifests that refer to `subject` (digest), via the referrers API or, where the registry
    /// has none (404), the `sha256-<hex>` fallback tag.
    pub async fn referrers(&self, subject: &str) -> anyhow::Result<Vec<Descriptor>> {
        let url = self.url(&format!("referrers/{subject}"));
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(MT_INDEX));
        let r = self.send(Method::GET, &url, h, &|| Ok(None)).await?;
        if r.status().is_success() {
            let body = body_capped(r, MAX_MANIFEST, "referrers index").await?;
            let idx: Index = serde_json::from_slice(&body)
                .with_context(|| format!("GET {url}: not an index"))?;
            return Ok(idx.manifests);
        }
        if r.status() != StatusCode::NOT_FOUND {
            bail!("GET {url}: {}", r.status());
        }
        match self.get_manifest(&fallback_tag(subject)?).await? {
            Some((body, _, _)) => {
                let idx: Index = serde_json::from_slice(&body)
                    .with_context(|| format!("referrers tag of {subject}: not an index"))?;
                Ok(idx.manifests)
            }
            None => Ok(Vec::new()),
        }
    }

    /// Adds `desc` to the fallback referrers index of `subject` (tag `sha256-<hex>`).
    pub async fn add_fallback_referrer(
        &self,
        subject: &str,
        desc: Descriptor,
    ) -> anyhow::Result<()> {
        let tag = fallback_tag(subject)?;
        let mut idx = match self.get_manifest(&tag).await? {
            Some((body, _, _)) => serde_json::from_slice::<Index>(&body)
                .with_context(|| format!("tag {tag}: not an index"))?,
            None => Index {
                schema_version: 2,
                media_type: Some(MT_INDEX.into()),
                manifests: Vec::new(),
            },
        };
        idx.manifests.retain(|d| d.digest != desc.digest);
        idx.manifests.push(desc);
        let body = serde_json::to_vec(&idx)?;
        self.put_manifest(&body, MT_INDEX, &tag).await?;
        Ok(())
    }
}

/// The referrers fallback tag of a digest: `sha256:<hex>` becomes `sha256-<hex>`.
pub fn fallback_tag(digest: &str) -> anyhow::Result<String> {
    Ok(format!("sha256-{}", crate::digest::oci_hex(digest)?))
}

fn with_digest(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    // `:` is allowed in a query, but some registries want it escaped.
    format!("{location}{sep}digest={}", digest.replace(':', "%3A"))
}

async fn text(r: reqwest::Response) -> String {
    // An error body is only quoted: its first 64 KiB are plenty, the rest is not read.
    let t = body_capped(r, 64 << 10, "error body")
        .await
        .or_else(|e| match e.downcast::<Capped>() {
            Ok(c) => Ok(c.0),
            Err(e) => Err(e),
        })
        .unwrap_or_default();
    String::from_utf8_lossy(&t).chars().take(500).collect()
}

/// Manifests, indexes and token responses are small by spec (registries cap manifests at
/// 4 MiB); kiln never buffers more of one than this.
pub const MAX_MANIFEST: usize = 4 << 20;

/// A body cut off at its cap; holds what was read.
#[derive(Debug)]
struct Capped(Vec<u8>);

impl std::fmt::Display for Capped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "body larger than {} bytes", self.0.len())
    }
}

impl std::error::Error for Capped {}

/// Reads a response body of at most `max` bytes, chunk by chunk, failing as soon as it grows
/// past `max`. A body without `Content-Length` (chunked, or closed by the server) is never
/// buffered past the cap, which `Response::bytes` would do.
async fn body_capped(r: reqwest::Response, max: usize, what: &str) -> anyhow::Result<Vec<u8>> {
    let url = r.url().to_string();
    if let Some(n) = r.content_length().filter(|&n| n > max as u64) {
        bail!("GET {url}: {what} of {n} bytes is larger than {max} bytes");
    }
    let mut out = Vec::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("GET {url}: {what}"))?;
        if out.len() + chunk.len() > max {
            out.extend_from_slice(&chunk[..max - out.len()]);
            return Err(anyhow::Error::new(Capped(out))
                .context(format!("GET {url}: {what} larger than {max} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn file_body(path: &Path, offset: u64, len: u64) -> anyhow::Result<reqwest::Body> {
    use tokio::io::AsyncReadExt;
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: open", path.display()))?;
    f.seek(SeekFrom::Start(offset))
        .with_context(|| format!("{}: seek to {offset}", path.display()))?;
    let f = tokio::fs::File::from_std(f).take(len);
    Ok(reqwest::Body::wrap_stream(
        tokio_util::io::ReaderStream::with_capacity(f, crate::digest::BUF),
    ))
}

fn basic(user: &str, password: &str) -> anyhow::Result<HeaderValue> {
    use base64::Engine;
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut v = HeaderValue::from_str(&format!("Basic {enc}")).map_err(|_| {
        anyhow::anyhow!("registry username or password holds characters not allowed in a header")
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn bearer(token: &str) -> anyhow::Result<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| anyhow::anyhow!("registry token holds characters not allowed in a header"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Splits `Bearer realm="…",service="…",scope="…"` into the scheme and its parameters.
fn parse_challenge(s: &str) -> (String, BTreeMap<String, String>) {
    let s = s.trim();
    let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(k, v.to_string());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_string(), params)
}

/// Credentials for `registry`: `KILN_REGISTRY_TOKEN`, else `KILN_REGISTRY_USERNAME` and
/// `KILN_REGISTRY_PASSWORD`, else the `auths` entry of `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json` (credential helpers are not run). Never logged.
fn credentials(registry: &str) -> anyhow::Result<Credentials> {
    if let Ok(t) = std::env::var(ENV_TOKEN) {
        return Ok(Credentials::Token(t));
    }
    if let (Ok(user), Ok(password)) = (std::env::var(ENV_USERNAME), std::env::var(ENV_PASSWORD)) {
        return Ok(Credentials::Basic { user, password });
    }
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".docker/config.json"),
            None => return Ok(Credentials::None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::None),
        Err(e) => return Err(e).with_context(|| format!("{}: read", path.display())),
    };
    docker_config_credentials(&text, registry)
        .with_context(|| format!("{}: docker config", path.display()))
}

fn docker_config_credentials(text: &str, registry: &str) -> anyhow::Result<Credentials> {
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        registrytoken: Option<String>,
    }
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    let cfg: Config =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not valid JSON: {e}"))?;
    let norm = |k: &str| {
        let k = k
            .strip_prefix("https://")
            .or_else(|| k.strip_prefix("http://"))
            .unwrap_or(k);
        k.split('/').next().unwrap_or(k).to_string()
    };
    let Some(e) = cfg
        .auths
        .iter()
        .find(|(k, _)| norm(k) == registry)
        .map(|(_, e)| e)
    else {
        return Ok(Credentials::None);
    };
    if let Some(t) = &e.registrytoken {
        return Ok(Credentials::Token(t.clone()));
    }
    if let Some(a) = &e.auth {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| anyhow::anyhow!("auths[{registry:?}].auth is not base64"))?;
        let s = String::from_utf8(raw)
            .map_err(|_| anyhow::anyhow!("auths[{registry:?}].auth is not UTF-8"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("auths[{registry:?}].auth is not user:password"))?;
        return Ok(Credentials::Basic {
            user: u.to_string(),
            password: p.to_string(),
        });
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(Credentials::Basic {
            user: u.clone(),
            password: p.clone(),
        });
    }
    Ok(Credentials::None)
}

/// One file to push.
#[derive(Clone, Debug)]
pub struct PushFile {
    /// Where the bytes are.
    pub path: PathBuf,
    /// The title (file name) recorded in the layer.
    pub title: String,
}

/// How to push.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// The manifest's `artifactType`.
    pub artifact_type: String,
    /// Store each file zstd-compressed ([`MT_FILE_ZSTD`]).
    pub zstd: bool,
    /// Make the artifact a referrer of this manifest (same repository).
    pub subject: Option<Descriptor>,
    /// Manifest annotations.
    pub annotations: BTreeMap<String, String>,
}

/// What a push produced.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// The manifest's digest.
    pub digest: String,
    /// The manifest's size in bytes.
    pub size: u64,
    /// The layers, in file order.
    pub layers: Vec<Descriptor>,
}

/// Pushes `files` as one ORAS-style artifact to `reference` (tagged with its tag, or stored
/// by digest only when it has none). With a subject, also records the artifact in the
/// subject's fallback referrers tag when the registry did not process the subject.
pub async fn push(
    client: &Client,
    reference: &Reference,
    files: &[PushFile],
    opts: &PushOptions,
) -> anyhow::Result<Pushed> {
    let mut seen = std::collections::BTreeSet::new();
    let mut layers = Vec::with_capacity(files.len());
    for f in files {
        check_title(&f.title)?;
        if !seen.insert(f.title.clone()) {
            bail!("two files share the title {:?}", f.title);
        }
        let (blob_path, _tmp, desc) = if opts.zstd {
            let (raw_hex, raw_size) = crate::digest::sha256_file(&f.path)?;
            let tmp = compress_zstd(&f.path)?;
            let (hex, size) = crate::digest::sha256_file(tmp.path())?;
            let mut ann = BTreeMap::new();
            ann.insert(ANN_TITLE.to_string(), format!("{}.zst", f.title));
            ann.insert(
                ANN_UNCOMPRESSED_DIGEST.to_string(),
                format!("sha256:{raw_hex}"),
            );
            ann.insert(ANN_UNCOMPRESSED_SIZE.to_string(), raw_size.to_string());
            let d = Descriptor {
                media_type: MT_FILE_ZSTD.into(),
                digest: format!("sha256:{hex}"),
                size,
                artifact_type: None,
                annotations: Some(ann),
            };
            (tmp.path().to_path_buf(), Some(tmp), d)
        } else {
            let (hex, size) = crate::digest::sha256_file(&f.path)?;
            let mut ann = BTreeMap::new();
            ann.insert(ANN_TITLE.to_string(), f.title.clone());
            let d = Descriptor {
                media_type: MT_FILE.into(),
                digest: format!("sha256:{hex}"),
                size,
                artifact_type: None,
                annotations: Some(ann),
            };
            (f.path.clone(), None, d)
        };
        let uploaded = client
            .push_blob_file(&blob_path, &desc.digest, desc.size)
            .await
            .with_context(|| format!("{}: uploading", f.path.display()))?;
        client.note(&format!(
            "{} {} ({} bytes) {}",
            if uploaded { "pushed" } else { "exists" },
            f.title,
            desc.size,
            desc.digest
        ));
        layers.push(desc);
    }
    client.push_blob_bytes(b"{}", EMPTY_DIGEST).await?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MT_MANIFEST.into()),
        artifact_type: Some(opts.artifact_type.clone()),
        config: Descriptor {
            media_type: MT_EMPTY.into(),
            digest: EMPTY_DIGEST.into(),
            size: 2,
            artifact_type: None,
            annotations: None,
        },
        layers: layers.clone(),
        subject: opts.subject.clone(),
        annotations: if opts.annotations.is_empty() {
            None
        } else {
            Some(opts.annotations.clone())
        },
    };
    let body = serde_json::to_vec(&manifest)?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    let target = reference.tag.clone().unwrap_or_else(|| digest.clone());
    let (stored, subject_ok) = client.put_manifest(&body, MT_MANIFEST, &target).await?;
    if let Some(subject) = &opts.subject {
        if !subject_ok {
            let desc = Descriptor {
                media_type: MT_MANIFEST.into(),
                digest: stored.clone(),
                size: body.len() as u64,
                artifact_type: Some(opts.artifact_type.clone()),
                annotations: manifest.annotations.clone(),
            };
            client
                .add_fallback_referrer(&subject.digest, desc)
                .await
                .context("recording the referrer under the fallback tag")?;
        }
    }
    Ok(Pushed {
        digest: stored,
        size: body.len() as u64,
        layers,
    })
}

fn compress_zstd(path: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let src = std::fs::File::open(path).with_context(|| format!("{}: open", path.display()))?;
    let tmp = tempfile::NamedTempFile::new().context("creating a temp file for compression")?;
    // Level 3, single-threaded: the same input gives the same compressed bytes.
    zstd::stream::copy_encode(
        std::io::BufReader::with_capacity(crate::digest::BUF, src),
        tmp.as_file(),
        3,
    )
    .with_context(|| format!("{}: zstd compression", path.display()))?;
    Ok(tmp)
}

/// Refuses a title that is empty, absolute, has `..`, `.` or empty components, NUL or `\`.
pub fn check_title(title: &str) -> Result<(), crate::Error> {
    let bad = |reason| {
        Err(crate::Error::UnsafeTitle {
            title: title.to_string(),
            reason,
        })
    };
    if title.is_empty() {
        return bad("empty");
    }
    if title.starts_with('/') {
        return bad("absolute path");
    }
    if title.contains('\0') || title.contains('\\') {
        return bad("NUL or backslash in name");
    }
    for c in title.split('/') {
        if c == ".." {
            return bad("`..` component escapes the output directory");
        }
        if c.is_empty() || c == "." {
            return bad("empty or `.` path component");
        }
    }
    for c in Path::new(title).components() {
        if !matches!(c, Component::Normal(_)) {
            return bad("not a plain relative path");
        }
    }
    Ok(())
}

/// One file a pull wrote.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// Where it is now.
    pub path: PathBuf,
    /// sha256 (hex) of the written file.
    pub sha256: String,
    /// Bytes written.
    pub size: u64,
    /// False when an identical file was already there.
    pub downloaded: bool,
}

/// Resolves `reference` to its manifest (by tag or digest) and descriptor.
pub async fn resolve(
    client: &Client,
    reference: &Reference,
) -> anyhow::Result<(Manifest, Descriptor)> {
    let (body, mt, digest) = client
        .get_manifest(reference.reference())
        .await?
        .with_context(|| format!("{reference}: no such manifest"))?;
    if mt == MT_INDEX || mt.contains("manifest.list") {
        bail!("{reference}: is an image index (multi-platform), not an artifact manifest; pull one of its manifests by digest");
    }
    let m: Manifest = serde_json::from_slice(&body)
        .with_context(|| format!("{reference}: manifest is not valid OCI JSON"))?;
    let desc = Descriptor {
        media_type: if mt.is_empty() {
            MT_MANIFEST.into()
        } else {
            mt
        },
        digest,
        size: body.len() as u64,
        artifact_type: m.artifact_type.clone(),
        annotations: None,
    };
    Ok((m, desc))
}

/// Pulls every titled layer of `reference` into `outdir`. Titles are checked before any byte
/// is written; each blob streams into `.<name>.<digest>.kiln-partial` beside its final name (so an
/// interrupted run resumes there), is verified, then renamed. `+zstd` layers are decompressed
/// to the title without `.zst` and checked against their uncompressed digest.
pub async fn pull(
    client: &Client,
    reference: &Reference,
    outdir: &Path,
) -> anyhow::Result<Vec<Pulled>> {
    let (m, desc) = resolve(client, reference).await?;
    client.note(&format!("pulling {reference} ({})", desc.digest));
    let mut plan = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for l in &m.layers {
        let Some(title) = l.annotation(ANN_TITLE) else {
            client.note(&format!("skipping untitled layer {}", l.digest));
            continue;
        };
        check_title(title)?;
        crate::digest::oci_hex(&l.digest).with_context(|| format!("layer {title:?}"))?;
        let (name, zstd) = match title.strip_suffix(".zst") {
            Some(stem) if l.media_type == MT_FILE_ZSTD && !stem.is_empty() => {
                (stem.to_string(), true)
            }
            _ => (title.to_string(), false),
        };
        if !seen.insert(name.clone()) {
            bail!("layer title {title:?} appears twice");
        }
        plan.push((l.clone(), name, zstd));
    }
    std::fs::create_dir_all(outdir).with_context(|| format!("{}: create", outdir.display()))?;
    let mut out = Vec::new();
    for (l, name, zstd) in plan {
        let dest = dest_beneath(outdir, &name)?;
        let want_final = if zstd {
            let d = l.annotation(ANN_UNCOMPRESSED_DIGEST).with_context(|| {
                format!("layer {name:?}: zstd layer without {ANN_UNCOMPRESSED_DIGEST}")
            })?;
            crate::digest::oci_hex(d)?.to_string()
        } else {
            crate::digest::oci_hex(&l.digest)?.to_string()
        };
        if dest.is_file() {
            let (h, n) = crate::digest::sha256_file(&dest)?;
            if h == want_final {
                client.note(&format!("{name}: up to date"));
                out.push(Pulled {
                    path: dest,
                    sha256: h,
                    size: n,
                    downloaded: false,
                });
                continue;
            }
        }
        let partial = partial_path(&dest, &l.digest);
        refuse_symlink(&partial)?;
        client.download_blob(&l, &partial, &name).await?;
        let done = dest.clone();
        if zstd {
            let size: u64 = l
                .annotation(ANN_UNCOMPRESSED_SIZE)
                .and_then(|v| v.parse().ok())
                .with_context(|| {
                    format!("layer {name:?}: zstd layer without a numeric {ANN_UNCOMPRESSED_SIZE}")
                })?;
            let a = kiln_tree::output::AtomicFile::create(&dest)
                .with_context(|| format!("{}: create", dest.display()))?;
            let src = std::fs::File::open(&partial)?;
            let mut w = HashWriter {
                inner: a.file(),
                h: Sha256::new(),
                n: 0,
                max: size,
            };
            let decoded = zstd::stream::copy_decode(
                std::io::BufReader::with_capacity(crate::digest::BUF, src),
                &mut w,
            );
            if let Err(e) = decoded {
                let _ = std::fs::remove_file(&partial);
                return Err(anyhow::Error::new(e).context(format!(
                    "{name}: zstd decompression (the layer says {size} bytes uncompressed)"
                )));
            }
            if w.n != size {
                let _ = std::fs::remove_file(&partial);
                return Err(crate::Error::SizeMismatch {
                    what: format!("{name} (decompressed)"),
                    expected: size,
                    actual: w.n,
                }
                .into());
            }
            let got = hex::encode(w.h.finalize());
            let n = w.n;
            crate::digest::check(
                &format!("{name} (decompressed)"),
                &format!("sha256:{want_final}"),
                &format!("sha256:{got}"),
            )?;
            a.commit()
                .with_context(|| format!("{}: commit", dest.display()))?;
            let _ = std::fs::remove_file(&partial);
            out.push(Pulled {
                path: dest,
                sha256: got,
                size: n,
                downloaded: true,
            });
        } else {
            std::fs::rename(&partial, &dest)
                .with_context(|| format!("{} -> {}", partial.display(), dest.display()))?;
            out.push(Pulled {
                path: dest,
                sha256: want_final,
                size: l.size,
                downloaded: true,
            });
        }
        remove_stale_partials(&done);
        client.note(&format!(
            "pulled {name} ({} bytes)",
            out.last().map_or(0, |p| p.size)
        ));
    }
    Ok(out)
}

/// The partial-download file for blob `digest` going to `dest`:
/// `.<name>.<first 16 hex digits>.kiln-partial` in the same directory. Keying it by digest
/// means a tag that moved to new bytes never resumes from the old blob's prefix.
pub fn partial_path(dest: &Path, digest: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let short = hex.get(..16).unwrap_or(hex);
    dest.with_file_name(format!(".{name}.{short}.kiln-partial"))
}

/// Removes partial downloads of other blobs for `dest` (left by runs that pulled an older
/// version of the tag).
fn remove_stale_partials(dest: &Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(mid) = n
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".kiln-partial"))
        {
            if mid.len() == 16 && mid.bytes().all(|b| b.is_ascii_hexdigit()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The path `name` (a checked title, possibly with `/`) below `outdir`, with every directory
/// on the way created and none of them, nor the file itself, a symlink: a link already inside
/// `outdir` (`outdir/sub -> /etc`) must not carry the pull outside it. `outdir` itself is the
/// user's choice and may be a link.
fn dest_beneath(outdir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let mut at = outdir.to_path_buf();
    let parts: Vec<&str> = name.split('/').filter(|c| !c.is_empty()).collect();
    for (i, c) in parts.iter().enumerate() {
        at.push(c);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => bail!(
                "{}: is a symbolic link; kiln pull writes only below {} and never through a link",
                at.display(),
                outdir.display()
            ),
            Ok(m) if !last && !m.is_dir() => {
                bail!("{}: exists and is not a directory", at.display())
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !last {
                    // create_dir (not _all): it fails rather than follow a link raced in.
                    std::fs::create_dir(&at)
                        .with_context(|| format!("{}: create", at.display()))?;
                }
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{}", at.display()))),
        }
    }
    Ok(at)
}

/// Refuses to write through `path` if it is a symbolic link.
fn refuse_symlink(path: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "{}: is a symbolic link; kiln pull never writes through a link",
            path.display()
        );
    }
    Ok(())
}

struct HashWriter<W> {
    inner: W,
    h: Sha256,
    n: u64,
    /// Refuse to write past this many bytes (a layer's declared size): a few KiB of zstd can
    /// expand to GiBs.
    max: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.n + buf.len() as u64 > self.max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("decompresses to more than {} bytes", self.max),
            ));
        }
        let k = self.inner.write(buf)?;
        self.h.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("oci://127.0.0.1:5000/kiln/img:1.0").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "kiln/img", Some("1.0"))
        );
        assert!(r.is_loopback());
        let r = Reference::parse(&format!("ghcr.io/a/b@{EMPTY_DIGEST}")).unwrap();
        assert_eq!(r.reference(), EMPTY_DIGEST);
        assert!(!r.is_loopback());
        assert_eq!(
            Reference::parse("localhost:1/x").unwrap().reference(),
            "latest"
        );
        for bad in [
            "oci://host",
            "oci:///repo",
            "h/Upper",
            "h/a:b c",
            "h/a@sha256:zz",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        assert!(
            host_is_loopback("[::1]:80")
                && host_is_loopback("127.3.2.1")
                && !host_is_loopback("10.0.0.1:5000")
        );
    }

    #[test]
    fn plain_http_only_for_loopback_or_insecure() {
        let base = |r: &str, insecure: bool| {
            let r = Reference::parse(r).unwrap();
            Client::new(
                &r,
                Options {
                    insecure,
                    ..Default::default()
                },
            )
            .unwrap()
            .base_url()
            .to_string()
        };
        assert_eq!(base("127.0.0.1:5000/a", false), "http://127.0.0.1:5000");
        assert_eq!(base("localhost:5000/a", false), "http://localhost:5000");
        assert_eq!(
            base("registry.example:5000/a", false),
            "https://registry.example:5000"
        );
        assert_eq!(base("10.1.2.3:5000/a", false), "https://10.1.2.3:5000");
        assert_eq!(base("10.1.2.3:5000/a", true), "http://10.1.2.3:5000");
    }

    #[test]
    fn titles() {
        for ok in ["disk.img", "a/b.txt", "x..y"] {
            check_title(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(check_title(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "reg");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("Basic", "Registry Realm")
        );
    }

    #[test]
    fn docker_config() {
        let cfg = r#"{"auths":{"https://reg.example:5000":{"auth":"dTpw"},"other":{"username":"a","password":"b"}}}"#;
        match docker_config_credentials(cfg, "reg.example:5000").unwrap() {
            Credentials::Basic { user, password } => {
                assert_eq!((user.as_str(), password.as_str()), ("u", "p"))
            }
            _ => panic!("expected basic credentials"),
        }
        assert!(matches!(
            docker_config_credentials(cfg, "nope").unwrap(),
            Credentials::None
        ));
        assert!(matches!(
            docker_config_credentials(cfg, "other").unwrap(),
            Credentials::Basic { .. }
        ));
    }
}
