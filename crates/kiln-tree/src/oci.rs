//! Container images as sources: an image in a registry (`oci://`), an OCI image layout on disk
//! (`oci-layout:DIR[:TAG]`) or the output of `docker save` (`docker-archive:FILE`), flattened
//! layer by layer into one [`Tree`].
//!
//! Specs: OCI image-spec v1.1 `image-layout.md` (`index.json`, `blobs/<alg>/<hex>`,
//! `org.opencontainers.image.ref.name`), `image-index.md` (platform selection), `manifest.md`,
//! `config.md` (`rootfs.diff_ids`, `config.Env/Entrypoint/Cmd/WorkingDir/User`) and `layer.md`
//! (changesets applied in order; `.wh.NAME` hides NAME and `.wh..wh..opq` empties a directory,
//! both for lower layers only; a hard link may name a file of a lower layer). Docker's archive
//! format: `manifest.json` = `[{"Config", "RepoTags", "Layers"}]`, paths inside the tar.
//!
//! Nothing is extracted: each layer blob is read once, front to back, hashed as it passes (the
//! blob digest), decompressed once (gzip or zstd, detected by magic) and hashed again (the
//! `diff_id`), and its entries go straight into the tree builder, file bytes to the writer's
//! [`Placer`]. A file that a later layer hides or replaces is handed back to the placer. Every
//! digest is checked: the manifest (when the reference or the index pins it), the config, and
//! each layer's blob and `diff_id`, the last two when the layer has been read to its end, which
//! is before any writer commits its output.
//!
//! The registry client lives in kiln-ship, above this crate: it registers itself with
//! [`set_registry_opener`], so the arrows still point down.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_formats::fstree::{Contents, FileData, NodeKind, Placer, Tree};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tar::{self, Builder};
use crate::{Error, Opened, SourceContents};

/// Largest manifest or index read (the distribution spec suggests registries accept 4 MiB).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config read.
pub const MAX_CONFIG: u64 = 16 << 20;
/// The annotation naming a manifest in an image layout's `index.json`.
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where an image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci://REGISTRY/REPO[:TAG][@sha256:…]`, kept as written for the registry client.
    Registry(String),
    /// An OCI image layout directory and, optionally, the `ref.name` to pick in its index.
    Layout { dir: PathBuf, tag: Option<String> },
    /// An uncompressed tar as `docker save` / `podman save` write it.
    DockerArchive(PathBuf),
}

impl ImageRef {
    /// Recognises `oci://…`, `oci-layout:DIR[:TAG]` and `docker-archive:FILE`.
    pub fn parse(arg: &str) -> Option<Self> {
        if arg.starts_with("oci://") {
            return Some(ImageRef::Registry(arg.to_string()));
        }
        if let Some(rest) = arg.strip_prefix("oci-layout:") {
            // A directory name may itself hold a colon: only split off a tag when the whole
            // is not a directory.
            if Path::new(rest).is_dir() {
                return Some(ImageRef::Layout {
                    dir: rest.into(),
                    tag: None,
                });
            }
            return Some(match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !t.is_empty() => ImageRef::Layout {
                    dir: d.into(),
                    tag: Some(t.to_string()),
                },
                _ => ImageRef::Layout {
                    dir: rest.into(),
                    tag: None,
                },
            });
        }
        arg.strip_prefix("docker-archive:")
            .map(|f| ImageRef::DockerArchive(f.into()))
    }

    /// The reference for messages.
    pub fn display(&self) -> String {
        match self {
            ImageRef::Registry(s) => s.clone(),
            ImageRef::Layout { dir, tag: None } => format!("oci-layout:{}", dir.display()),
            ImageRef::Layout { dir, tag: Some(t) } => {
                format!("oci-layout:{}:{t}", dir.display())
            }
            ImageRef::DockerArchive(f) => format!("docker-archive:{}", f.display()),
        }
    }
}

/// The GOARCH name of the machine kiln runs on (`amd64`, `arm64`, …): the default platform.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Content-addressed storage an image is read from.
pub trait ImageStore: Send {
    /// The image reference, for messages.
    fn name(&self) -> String;
    /// The top-level manifest or index the reference names, and the digest it must have when
    /// the reference pins one. For an image layout this is `index.json`.
    fn top(&mut self) -> Result<(Vec<u8>, Option<String>), Error>;
    /// A manifest or index by digest (the caller verifies it).
    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, Error>;
    /// A blob's bytes, as a stream (the caller verifies them as they pass).
    fn blob(&mut self, digest: &str) -> Result<Box<dyn Read + Send>, Error>;
}

/// Opens registry references; kiln-ship provides it (see the module comment).
pub type RegistryOpener = fn(&str) -> Result<Box<dyn ImageStore>, Error>;

static REGISTRY: OnceLock<RegistryOpener> = OnceLock::new();

/// Makes `oci://` sources usable. Later calls are ignored.
pub fn set_registry_opener(f: RegistryOpener) {
    let _ = REGISTRY.set(f);
}

/// What the image's configuration says about running it, for the build report and for a
/// systemd unit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImageConfig {
    /// The image reference as given.
    pub reference: String,
    /// Digest of the image manifest used.
    pub manifest_digest: String,
    /// Digest of the config blob.
    pub config_digest: String,
    /// `os` of the config.
    pub os: String,
    /// `architecture` of the config.
    pub architecture: String,
    /// `config.Env`: `NAME=value` strings.
    pub env: Vec<String>,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.WorkingDir`.
    pub working_dir: String,
    /// `config.User`.
    pub user: String,
    /// The layers applied, bottom first: blob digest (when known) and `diff_id`.
    pub layers: Vec<LayerInfo>,
}

/// One layer as recorded in the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// Digest of the blob as stored (compressed), when the source names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    /// Media type, when the manifest gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
}

/// An image whose manifest and config have been read and verified; its layers are read by
/// [`Image::apply`].
pub struct Image {
    store: Box<dyn ImageStore>,
    config: ImageConfig,
    /// Per layer: the key to ask the store for, and the blob size when the manifest says.
    keys: Vec<(String, Option<u64>)>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn src_err(path: &str, msg: impl Into<String>) -> Error {
    Error::Source {
        path: path.into(),
        msg: msg.into(),
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The hex of a `sha256:` digest; other algorithms and malformed digests are refused (a
/// digest is also a file name in a layout, so it must not hold a `/`).
fn digest_hex<'a>(what: &str, d: &'a str) -> Result<&'a str, Error> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(h),
        _ => Err(src_err(
            what,
            format!("digest {d:?} is not sha256:<64 hex digits>"),
        )),
    }
}

fn verify(what: &str, want: &str, bytes: &[u8]) -> Result<(), Error> {
    let want_hex = digest_hex(what, want)?;
    let got = sha256_hex(bytes);
    if !got.eq_ignore_ascii_case(want_hex) {
        return Err(src_err(
            what,
            format!("sha256 mismatch: expected {want}, got sha256:{got}"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Desc {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Desc>>,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Option<Vec<Desc>>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<ExecConfig>,
    rootfs: RootFs,
}

#[derive(Default, Deserialize)]
struct ExecConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Opens `r`, picking `arch` (GOARCH name; default [`host_arch`]) from a multi-platform index.
/// The manifest and the config are read and verified now; the layers when the tree is read.
pub fn open(r: &ImageRef, arch: Option<&str>) -> Result<Opened, Error> {
    let arch = arch.unwrap_or(host_arch());
    let image = match r {
        ImageRef::Registry(s) => {
            let opener = REGISTRY.get().ok_or_else(|| {
                src_err(
                    s,
                    "registry sources need kiln's registry client (not linked in)",
                )
            })?;
            from_manifests(opener(s)?, r, None, arch)?
        }
        ImageRef::Layout { dir, tag } => from_manifests(
            Box::new(Layout { dir: dir.clone() }),
            r,
            tag.as_deref(),
            arch,
        )?,
        ImageRef::DockerArchive(f) => docker_archive(f, r)?,
    };
    Ok(Opened::Stream(tar::TarStream::image(image)))
}

fn parse_doc(what: &str, bytes: &[u8]) -> Result<Doc, Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| src_err(what, format!("not a manifest or index: {e}")))
}

fn from_manifests(
    mut store: Box<dyn ImageStore>,
    r: &ImageRef,
    tag: Option<&str>,
    arch: &str,
) -> Result<Image, Error> {
    let name = store.name();
    let (top, pinned) = store.top()?;
    let mut what = match &pinned {
        Some(d) => {
            verify(&format!("{name}: manifest"), d, &top)?;
            format!("{name}: manifest {d}")
        }
        None => format!("{name}: top-level manifest"),
    };
    let mut digest = pinned.unwrap_or_else(|| format!("sha256:{}", sha256_hex(&top)));
    let mut doc = parse_doc(&what, &top)?;
    let mut first = matches!(r, ImageRef::Layout { .. });
    // An index may point at an index (a layout's index.json at a multi-platform index).
    for _ in 0..4 {
        let Some(list) = doc.manifests.take() else {
            break;
        };
        let pick = pick(&what, list, if first { tag } else { None }, first, arch)?;
        first = false;
        what = format!("{name}: manifest {}", pick.digest);
        let bytes = store.manifest(&pick.digest)?;
        if bytes.len() as u64 != pick.size {
            return Err(src_err(
                &what,
                format!(
                    "size mismatch: the index says {} bytes, got {}",
                    pick.size,
                    bytes.len()
                ),
            ));
        }
        verify(&what, &pick.digest, &bytes)?;
        digest = pick.digest;
        doc = parse_doc(&what, &bytes)?;
    }
    if doc.manifests.is_some() {
        return Err(src_err(&what, "indexes nested more than 4 deep"));
    }
    let (Some(cdesc), Some(layers)) = (doc.config, doc.layers) else {
        return Err(src_err(
            &what,
            format!(
                "not an image manifest (media type {:?}): no config or layers",
                doc.media_type.unwrap_or_default()
            ),
        ));
    };
    let cwhat = format!("{name}: config {}", cdesc.digest);
    digest_hex(&cwhat, &cdesc.digest)?;
    if cdesc.size > MAX_CONFIG {
        return Err(src_err(
            &cwhat,
            format!("{} bytes is too large", cdesc.size),
        ));
    }
    let mut cbytes = Vec::new();
    store
        .blob(&cdesc.digest)?
        .take(MAX_CONFIG + 1)
        .read_to_end(&mut cbytes)
        .map_err(|e| src_err(&cwhat, format!("reading: {e}")))?;
    if cbytes.len() as u64 != cdesc.size {
        return Err(src_err(
            &cwhat,
            format!(
                "size mismatch: expected {} bytes, got {}",
                cdesc.size,
                cbytes.len()
            ),
        ));
    }
    verify(&cwhat, &cdesc.digest, &cbytes)?;
    let mut keys = Vec::new();
    let mut infos = Vec::new();
    for (i, l) in layers.into_iter().enumerate() {
        let lwhat = format!("{name}: layer {} ({})", i + 1, l.digest);
        digest_hex(&lwhat, &l.digest)?;
        let mt = l.media_type.clone().unwrap_or_default();
        if !(mt.is_empty() || mt.contains("tar") || mt.contains("rootfs.diff")) {
            return Err(src_err(
                &lwhat,
                format!("media type {mt:?} is not a tar layer"),
            ));
        }
        keys.push((l.digest.clone(), Some(l.size)));
        infos.push(LayerInfo {
            digest: Some(l.digest),
            diff_id: String::new(),
            media_type: l.media_type,
        });
    }
    let config = config_from(&cwhat, &cbytes, r, digest, cdesc.digest, infos)?;
    Ok(Image {
        store,
        config,
        keys,
    })
}

/// Picks one descriptor of an index: by `ref.name` when a tag is given (layouts), then by
/// platform when more than one is left or any has a platform.
fn pick(
    what: &str,
    mut list: Vec<Desc>,
    tag: Option<&str>,
    top: bool,
    arch: &str,
) -> Result<Desc, Error> {
    if let Some(t) = tag {
        list.retain(|d| {
            d.annotations
                .get(ANN_REF_NAME)
                .is_some_and(|n| n == t || n.rsplit_once(':').is_some_and(|(_, x)| x == t))
        });
        if list.is_empty() {
            return Err(src_err(what, format!("no manifest is named {t:?}")));
        }
    }
    // A layout's index.json names one image (after the tag), usually with no platform: take it;
    // a platform index is picked by platform.
    if top && list.len() == 1 && list[0].platform.is_none() {
        return list.pop().ok_or_else(|| src_err(what, "empty index"));
    }
    let have: Vec<String> = list
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    let mut fits = list.into_iter().filter(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    });
    fits.next().ok_or_else(|| {
        src_err(
            what,
            format!(
                "the index has no manifest for linux/{arch} (it has: {})",
                if have.is_empty() {
                    "no platforms".to_string()
                } else {
                    have.join(", ")
                }
            ),
        )
    })
}

fn config_from(
    what: &str,
    bytes: &[u8],
    r: &ImageRef,
    manifest_digest: String,
    config_digest: String,
    mut layers: Vec<LayerInfo>,
) -> Result<ImageConfig, Error> {
    let c: ConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| src_err(what, format!("not an image config: {e}")))?;
    if c.rootfs.kind != "layers" {
        return Err(src_err(
            what,
            format!("rootfs.type is {:?}, not \"layers\"", c.rootfs.kind),
        ));
    }
    if c.rootfs.diff_ids.len() != layers.len() {
        return Err(src_err(
            what,
            format!(
                "{} diff_ids for {} layers",
                c.rootfs.diff_ids.len(),
                layers.len()
            ),
        ));
    }
    for (l, d) in layers.iter_mut().zip(c.rootfs.diff_ids) {
        digest_hex(what, &d)?;
        l.diff_id = d;
    }
    let x = c.config.unwrap_or_default();
    Ok(ImageConfig {
        reference: r.display(),
        manifest_digest,
        config_digest,
        os: c.os,
        architecture: c.architecture,
        env: x.env.unwrap_or_default(),
        entrypoint: x.entrypoint.unwrap_or_default(),
        cmd: x.cmd.unwrap_or_default(),
        working_dir: x.working_dir.unwrap_or_default(),
        user: x.user.unwrap_or_default(),
        layers,
    })
}

/// An OCI image layout directory.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn path(&self, digest: &str) -> Result<PathBuf, Error> {
        let hex = digest_hex(&self.name(), digest)?;
        Ok(self.dir.join("blobs/sha256").join(hex.to_ascii_lowercase()))
    }
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut v = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut v)
        .map_err(|e| Error::io(path, e))?;
    if v.len() as u64 > max {
        return Err(src_err(
            &path.display().to_string(),
            format!("larger than the {max} bytes a manifest may have"),
        ));
    }
    Ok(v)
}

impl ImageStore for Layout {
    fn name(&self) -> String {
        format!("oci-layout:{}", self.dir.display())
    }

    fn top(&mut self) -> Result<(Vec<u8>, Option<String>), Error> {
        let lay = self.dir.join("oci-layout");
        let text = read_bounded(&lay, 4096)?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| src_err(&lay.display().to_string(), format!("not JSON: {e}")))?;
        if v.get("imageLayoutVersion")
            .and_then(|x| x.as_str())
            .is_none()
        {
            return Err(src_err(
                &lay.display().to_string(),
                "no imageLayoutVersion: not an OCI image layout",
            ));
        }
        Ok((
            read_bounded(&self.dir.join("index.json"), MAX_MANIFEST)?,
            None,
        ))
    }

    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, Error> {
        read_bounded(&self.path(digest)?, MAX_MANIFEST)
    }

    fn blob(&mut self, digest: &str) -> Result<Box<dyn Read + Send>, Error> {
        let p = self.path(digest)?;
        let f = File::open(&p).map_err(|e| Error::io(&p, e))?;
        Ok(Box::new(io::BufReader::with_capacity(1 << 20, f)))
    }
}

/// The members of a `docker save` tar, read by offset.
struct DockerArchive {
    path: PathBuf,
    tree: Tree,
    contents: Arc<SourceContents>,
}

impl DockerArchive {
    fn member(&self, name: &str) -> Result<FileData, Error> {
        let what = format!("docker-archive:{}", self.path.display());
        let id = self
            .tree
            .resolve_follow(name.as_bytes())
            .ok_or_else(|| src_err(&what, format!("no member {name:?}")))?;
        match &self.tree.node(id).kind {
            NodeKind::File(f) if f.segments.is_none() => Ok(f.clone()),
            k => Err(src_err(
                &what,
                format!(
                    "member {name:?} is a {} (or sparse), not a plain file",
                    k.name()
                ),
            )),
        }
    }
}

impl ImageStore for DockerArchive {
    fn name(&self) -> String {
        format!("docker-archive:{}", self.path.display())
    }
    fn top(&mut self) -> Result<(Vec<u8>, Option<String>), Error> {
        Err(src_err(&self.name(), "has no OCI manifest"))
    }
    fn manifest(&mut self, _digest: &str) -> Result<Vec<u8>, Error> {
        Err(src_err(&self.name(), "has no OCI manifest"))
    }
    fn blob(&mut self, key: &str) -> Result<Box<dyn Read + Send>, Error> {
        let file = self.member(key)?;
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            MemberReader {
                contents: self.contents.clone(),
                file,
                pos: 0,
            },
        )))
    }
}

struct MemberReader {
    contents: Arc<SourceContents>,
    file: FileData,
    pos: u64,
}

impl Read for MemberReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.file.size - self.pos;
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.contents.read_at(&self.file, self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn docker_archive(path: &Path, r: &ImageRef) -> Result<Image, Error> {
    let name = r.display();
    let (tree, contents) = match tar::open_file(path)? {
        Opened::Indexed(t, c) => (t, c),
        Opened::Stream(_) => {
            return Err(src_err(
                &name,
                "is compressed or not a regular file: docker-archive reads the uncompressed tar `docker save` writes",
            ))
        }
    };
    let mut a = DockerArchive {
        path: path.to_path_buf(),
        tree,
        contents: Arc::new(contents),
    };
    let mf = kiln_formats::fstree::read_file(&a.tree, &*a.contents, "manifest.json", MAX_MANIFEST)
        .map_err(|e| src_err(&name, format!("manifest.json: {e}")))?
        .ok_or_else(|| src_err(&name, "no manifest.json: not a docker save archive"))?;
    let mut list: Vec<DockerManifest> =
        serde_json::from_slice(&mf).map_err(|e| src_err(&name, format!("manifest.json: {e}")))?;
    if list.len() != 1 {
        return Err(src_err(
            &name,
            format!(
                "manifest.json lists {} images; kiln reads archives of one",
                list.len()
            ),
        ));
    }
    let m = list.remove(0);
    let cwhat = format!("{name}: config {}", m.config);
    let cfile = a.member(&m.config)?;
    if cfile.size > MAX_CONFIG {
        return Err(src_err(&cwhat, "too large"));
    }
    let mut cbytes = Vec::new();
    a.blob(&m.config)?
        .read_to_end(&mut cbytes)
        .map_err(|e| src_err(&cwhat, format!("reading: {e}")))?;
    let config_digest = format!("sha256:{}", sha256_hex(&cbytes));
    // The config's file name is its digest (`<hex>.json`, or `blobs/sha256/<hex>` since
    // Docker 25): check it where the name says it.
    if let Some(h) = content_hex(&m.config) {
        verify(&cwhat, &format!("sha256:{h}"), &cbytes)?;
    }
    let mut keys = Vec::new();
    let mut infos = Vec::new();
    for l in &m.layers {
        keys.push((l.clone(), None));
        infos.push(LayerInfo {
            digest: content_hex(l).map(|h| format!("sha256:{h}")),
            diff_id: String::new(),
            media_type: None,
        });
    }
    let config = config_from(&cwhat, &cbytes, r, String::new(), config_digest, infos)?;
    Ok(Image {
        store: Box::new(a),
        config,
        keys,
    })
}

/// The hex digest a member's name carries (`<hex>.json`, `blobs/sha256/<hex>`).
fn content_hex(member: &str) -> Option<&str> {
    let base = member.rsplit('/').next()?;
    let base = base.strip_suffix(".json").unwrap_or(base);
    let in_blobs = member.contains("blobs/sha256/");
    (base.len() == 64
        && base.bytes().all(|b| b.is_ascii_hexdigit())
        && (in_blobs || member.ends_with(".json")))
    .then_some(base)
}

/// Hashes and counts what passes through.
struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0.update(&buf[..n]);
        s.1 += n as u64;
        Ok(n)
    }
}

type HashState = Arc<Mutex<(Sha256, u64)>>;

fn hashing<R: Read>(inner: R) -> (Hashing<R>, HashState) {
    let state = Arc::new(Mutex::new((Sha256::new(), 0)));
    (
        Hashing {
            inner,
            state: state.clone(),
        },
        state,
    )
}

fn finish(state: &HashState) -> (String, u64) {
    let s = state.lock().unwrap_or_else(|e| e.into_inner());
    (
        format!("sha256:{}", hex::encode(s.0.clone().finalize())),
        s.1,
    )
}

impl Image {
    /// What the image config says.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// Reads every layer, bottom first, into one tree; file bytes go to `placer`. `limit`
    /// bounds each layer's uncompressed bytes.
    pub fn apply(mut self, limit: Option<u64>, placer: &mut dyn Placer) -> Result<Tree, Error> {
        let mut b = Builder::new();
        let n = self.keys.len();
        for (i, ((key, size), info)) in self.keys.iter().zip(&self.config.layers).enumerate() {
            let what = format!(
                "{}: layer {} of {n} ({})",
                self.store.name(),
                i + 1,
                info.digest.as_deref().unwrap_or(key)
            );
            let wrap = |e: Error| Error::Layer {
                layer: what.clone(),
                source: Box::new(e),
            };
            b.begin_layer();
            let raw = self.store.blob(key).map_err(wrap)?;
            let (raw, blob_hash) = hashing(raw);
            let mut raw: Box<dyn Read + Send> = Box::new(raw);
            let magic =
                tar::read_magic(&mut raw).map_err(|e| src_err(&what, format!("reading: {e}")))?;
            let c = tar::detect(&magic).map_err(|m| src_err(&what, m))?;
            let dec = tar::decoder(c, Cursor::new(magic).chain(raw))
                .map_err(|e| src_err(&what, format!("starting the {c:?} decoder: {e}")))?;
            let (dec, diff_hash) = hashing(dec);
            tar::read_entries(Box::new(dec), limit, &mut b, placer, true).map_err(wrap)?;
            let (got, len) = finish(&blob_hash);
            if let Some(want) = size.filter(|&s| s != len) {
                return Err(src_err(
                    &what,
                    format!("blob is {len} bytes, the manifest says {want} (truncated or padded)"),
                ));
            }
            if let Some(want) = &info.digest {
                if !got.eq_ignore_ascii_case(want) {
                    return Err(src_err(
                        &what,
                        format!("blob sha256 mismatch: expected {want}, got {got}"),
                    ));
                }
            }
            let (diff, _) = finish(&diff_hash);
            if !diff.eq_ignore_ascii_case(&info.diff_id) {
                return Err(src_err(
                    &what,
                    format!(
                        "diff_id mismatch: the config says {}, the uncompressed layer is {diff}",
                        info.diff_id
                    ),
                ));
            }
        }
        Ok(b.finish())
    }
}

/// A systemd service that runs the image's entrypoint and command as the config says, for
/// `[source] service = "NAME"`. `None` when the config has neither.
pub fn service_unit(c: &ImageConfig, name: &str) -> Option<String> {
    let argv: Vec<&String> = c.entrypoint.iter().chain(&c.cmd).collect();
    if argv.is_empty() {
        return None;
    }
    let mut u = String::new();
    u.push_str(&format!(
        "# Made by kiln from the config of {} ({}).\n",
        c.reference, c.config_digest
    ));
    u.push_str("[Unit]\n");
    u.push_str(&format!("Description={name} (from the image config)\n"));
    u.push_str("After=network.target\n\n[Service]\nType=simple\n");
    for e in &c.env {
        u.push_str(&format!("Environment={}\n", quote(e)));
    }
    if !c.working_dir.is_empty() {
        u.push_str(&format!("WorkingDirectory={}\n", c.working_dir));
    }
    if !c.user.is_empty() {
        let (user, group) = match c.user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (c.user.as_str(), None),
        };
        u.push_str(&format!("User={user}\n"));
        if let Some(g) = group {
            u.push_str(&format!("Group={g}\n"));
        }
    }
    let cmd: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    u.push_str(&format!("ExecStart={}\n", cmd.join(" ")));
    u.push_str("StandardOutput=journal+console\n\n[Install]\nWantedBy=multi-user.target\n");
    Some(u)
}

/// Quotes one word for a unit file: double quotes, with `\`, `"`, `$` and `%` escaped so
/// systemd passes it as is (systemd.syntax(7), systemd.service(7) "Command lines").
fn quote(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '$' => o.push_str("$$"),
            '%' => o.push_str("%%"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!(
            ImageRef::parse("oci://127.0.0.1:5000/a/b:1"),
            Some(ImageRef::Registry("oci://127.0.0.1:5000/a/b:1".into()))
        );
        assert_eq!(
            ImageRef::parse("oci-layout:/nonexistent/x:v2"),
            Some(ImageRef::Layout {
                dir: "/nonexistent/x".into(),
                tag: Some("v2".into())
            })
        );
        assert_eq!(
            ImageRef::parse("docker-archive:a.tar"),
            Some(ImageRef::DockerArchive("a.tar".into()))
        );
        assert_eq!(ImageRef::parse("rootfs.tar"), None);
    }

    #[test]
    fn content_names() {
        let h = "a".repeat(64);
        assert_eq!(content_hex(&format!("{h}.json")), Some(h.as_str()));
        assert_eq!(content_hex(&format!("blobs/sha256/{h}")), Some(h.as_str()));
        assert_eq!(content_hex(&format!("{h}/layer.tar")), None);
    }

    #[test]
    fn unit_quotes_and_runs_entrypoint_then_cmd() {
        let c = ImageConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo \"$HOME\" 100%".into()],
            env: vec!["A=b c".into()],
            user: "1000:1000".into(),
            working_dir: "/srv".into(),
            ..Default::default()
        };
        let u = service_unit(&c, "agent").unwrap();
        assert!(
            u.contains("ExecStart=\"/bin/sh\" \"-c\" \"echo \\\"$$HOME\\\" 100%%\"\n"),
            "{u}"
        );
        assert!(u.contains("Environment=\"A=b c\"\n"));
        assert!(u.contains("User=1000\nGroup=1000\n"));
        assert!(u.contains("WorkingDirectory=/srv\n"));
        assert!(service_unit(&ImageConfig::default(), "x").is_none());
    }
}
