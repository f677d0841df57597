//! Release manifests: which artifacts make up a release, per slice, per architecture, with the
//! object key, sha256, size and version of each.
//!
//! Schema (version 1), serialised with sorted keys so the same content gives the same bytes:
//!
//! ```json
//! { "schemaVersion": 1,
//!   "mediaType": "application/vnd.kiln.manifest.v1+json",
//!   "slices": {
//!     "<slice>": { "version": "<version>",
//!                  "artifacts": { "<arch>": { "<name>": { "key": "…", "sha256": "<hex>",
//!                                                         "size": 123, "version": "…" } } } } } }
//! ```
//!
//! A slice is what one build job owns (an image flavour, a board). Updating a slice replaces it
//! and keeps every other slice of the baseline; a slice update without a baseline is refused
//! unless the caller says this is the first manifest (`init`). Keys are relative to the
//! manifest's own location.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kiln_tree::progress::{Progress, Silent};
use serde::{Deserialize, Serialize};

use crate::store::Remote;

/// The manifest `mediaType`.
pub const MEDIA_TYPE: &str = "application/vnd.kiln.manifest.v1+json";
/// The schema version this code writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;
/// Manifests larger than this are refused when read.
pub const MAX_BYTES: u64 = 64 << 20;

/// One artifact of one architecture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Object key (or URL path) relative to the manifest's location.
    pub key: String,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Release version the artifact belongs to.
    pub version: String,
}

/// Everything one slice publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// The slice's release version.
    pub version: String,
    /// Architecture → artifact name → artifact.
    pub artifacts: BTreeMap<String, BTreeMap<String, Artifact>>,
}

/// A release manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseManifest {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// [`MEDIA_TYPE`].
    pub media_type: String,
    /// Slice name → slice.
    pub slices: BTreeMap<String, Slice>,
}

impl Default for ReleaseManifest {
    fn default() -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            media_type: MEDIA_TYPE.into(),
            slices: BTreeMap::new(),
        }
    }
}

/// One artifact with where it sits in the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Slice name.
    pub slice: String,
    /// Architecture.
    pub arch: String,
    /// Artifact name.
    pub name: String,
    /// The artifact.
    pub artifact: Artifact,
}

impl ReleaseManifest {
    /// Parses and checks a manifest: schema version, media type, hex digests, relative keys.
    pub fn from_slice(bytes: &[u8], what: &str) -> anyhow::Result<Self> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).with_context(|| format!("{what}: not JSON"))?;
        let sv = v.get("schemaVersion").and_then(|s| s.as_u64());
        match sv {
            Some(1) => {}
            Some(n) => bail!("{what}: schemaVersion {n} is newer than this kiln understands (1)"),
            None => bail!("{what}: no schemaVersion; not a kiln manifest"),
        }
        let m: Self = serde_json::from_value(v)
            .with_context(|| format!("{what}: does not follow the kiln manifest schema v1"))?;
        if m.media_type != MEDIA_TYPE {
            bail!(
                "{what}: mediaType {:?}, expected {MEDIA_TYPE:?}",
                m.media_type
            );
        }
        for e in m.entries() {
            let at = format!("{what}: slices.{}.artifacts.{}.{}", e.slice, e.arch, e.name);
            if !crate::digest::is_sha256_hex(&e.artifact.sha256) {
                bail!(
                    "{at}: sha256 {:?} is not 64 lowercase hex digits",
                    e.artifact.sha256
                );
            }
            check_key(&e.artifact.key).with_context(|| at.clone())?;
        }
        Ok(m)
    }

    /// Serialises with two-space indentation and a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Every artifact in slice, arch, name order.
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for (slice, s) in &self.slices {
            for (arch, arts) in &s.artifacts {
                for (name, a) in arts {
                    out.push(Entry {
                        slice: slice.clone(),
                        arch: arch.clone(),
                        name: name.clone(),
                        artifact: a.clone(),
                    });
                }
            }
        }
        out
    }
}

/// Refuses keys that are absolute or climb out with `..`.
pub fn check_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() || key.starts_with('/') || key.contains('\0') || key.contains('\\') {
        bail!("key {key:?}: expected a relative path");
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("key {key:?}: empty, `.` or `..` component");
    }
    Ok(())
}

/// Where an architecture's build outputs are.
#[derive(Clone, Debug)]
pub struct OutDir {
    /// Architecture name (`x86_64`, `aarch64`, …).
    pub arch: String,
    /// The directory.
    pub dir: PathBuf,
}

impl OutDir {
    /// Parses `ARCH=DIR`, or `DIR` (for the machine's own architecture).
    pub fn parse(s: &str) -> Self {
        match s.split_once('=') {
            Some((a, d)) if !a.is_empty() && !a.contains('/') => Self {
                arch: a.into(),
                dir: d.into(),
            },
            _ => Self {
                arch: std::env::consts::ARCH.into(),
                dir: s.into(),
            },
        }
    }
}

/// Expands a key template: `{slice}`, `{version}`, `{arch}`, `{name}`.
pub fn expand_key(template: &str, slice: &str, version: &str, arch: &str, name: &str) -> String {
    template
        .replace("{slice}", slice)
        .replace("{version}", version)
        .replace("{arch}", arch)
        .replace("{name}", name)
}

/// The default key template.
pub const DEFAULT_KEY: &str = "{slice}/{version}/{arch}/{name}";

/// Describes the files under each output directory (recursively; names are paths relative to
/// the directory; hidden files and `.sha256` sidecars are skipped) as a slice.
pub fn slice_from_dirs(
    dirs: &[OutDir],
    slice: &str,
    version: &str,
    key_template: &str,
) -> anyhow::Result<Slice> {
    let mut artifacts: BTreeMap<String, BTreeMap<String, Artifact>> = BTreeMap::new();
    for od in dirs {
        let files = files_under(&od.dir, &|n| n.ends_with(".sha256"))?;
        let arch = artifacts.entry(od.arch.clone()).or_default();
        for (name, path) in files {
            let (sha256, size) = crate::digest::sha256_file(&path)?;
            let key = expand_key(key_template, slice, version, &od.arch, &name);
            check_key(&key)
                .with_context(|| format!("{}: key template {key_template:?}", path.display()))?;
            if arch
                .insert(
                    name.clone(),
                    Artifact {
                        key,
                        sha256,
                        size,
                        version: version.into(),
                    },
                )
                .is_some()
            {
                bail!("{name}: listed twice for architecture {}", od.arch);
            }
        }
    }
    Ok(Slice {
        version: version.into(),
        artifacts,
    })
}

/// The regular files under `root`, recursively, as (path relative to `root`, full path),
/// sorted by relative path; names starting with `.` are skipped, and so is every file whose
/// name `skip` accepts. The one directory walk of the release commands (manifests, pushes).
pub fn files_under(
    root: &Path,
    skip: &dyn Fn(&str) -> bool,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    fn walk(
        root: &Path,
        dir: &Path,
        skip: &dyn Fn(&str) -> bool,
        out: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        let rd =
            std::fs::read_dir(dir).with_context(|| format!("{}: read directory", dir.display()))?;
        for e in rd {
            let e = e.with_context(|| format!("{}: read directory", dir.display()))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let ft = e
                .file_type()
                .with_context(|| format!("{}: stat", e.path().display()))?;
            if ft.is_dir() {
                walk(root, &e.path(), skip, out)?;
            } else if ft.is_file() && !skip(&name) {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push((rel, e.path()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, skip, &mut out)?;
    out.sort();
    Ok(out)
}

/// Puts `slice` under `name` into `base`, keeping every other slice. Without a baseline the
/// update is refused unless `init` says this is the first manifest.
pub fn merge(
    base: Option<ReleaseManifest>,
    name: &str,
    slice: Slice,
    init: bool,
) -> anyhow::Result<ReleaseManifest> {
    let mut m = match base {
        Some(m) => m,
        None if init => ReleaseManifest::default(),
        None => bail!(
            "refusing to write slice {name:?} without a baseline manifest: it would drop every other slice (give the current manifest to merge from, or say this is the first one)"
        ),
    };
    m.slices.insert(name.to_string(), slice);
    Ok(m)
}

/// Reads a manifest from a file or a remote; `Ok(None)` when it does not exist.
pub async fn read(src: &Remote) -> anyhow::Result<Option<ReleaseManifest>> {
    match src.get_small(MAX_BYTES).await? {
        Some((b, _)) => Ok(Some(ReleaseManifest::from_slice(&b, &src.to_string())?)),
        None => Ok(None),
    }
}

/// Publishes `slice` into the manifest at `dest` (an object store key) with a conditional put:
/// read the manifest and its ETag, merge, write only if the ETag still matches (or, for a new
/// manifest, only if none exists). A lost race re-reads and merges again, so two publishers of
/// different slices never drop each other's work. Returns the manifest written.
pub async fn publish_slice(
    dest: &Remote,
    name: &str,
    slice: &Slice,
    init: bool,
    progress: &dyn Progress,
) -> anyhow::Result<ReleaseManifest> {
    publish(dest, name, slice, init, &mut |_| {}, progress).await
}

/// [`publish_slice`], calling `between(attempt)` after each read and before the conditional
/// write (attempts count from 1). Tests use it to let another publisher in at exactly the
/// moment a lost update would happen.
pub async fn publish_slice_with(
    dest: &Remote,
    name: &str,
    slice: &Slice,
    init: bool,
    between: &mut dyn FnMut(u32),
) -> anyhow::Result<ReleaseManifest> {
    publish(dest, name, slice, init, between, &Silent).await
}

async fn publish(
    dest: &Remote,
    name: &str,
    slice: &Slice,
    init: bool,
    between: &mut dyn FnMut(u32),
    progress: &dyn Progress,
) -> anyhow::Result<ReleaseManifest> {
    const ATTEMPTS: u32 = 8;
    for attempt in 1..=ATTEMPTS {
        let (base, version) = match dest.get_small(MAX_BYTES).await? {
            Some((b, v)) => (Some(ReleaseManifest::from_slice(&b, &dest.to_string())?), v),
            None => (None, None),
        };
        if base.is_some()
            && version
                .as_ref()
                .is_none_or(|v| v.e_tag.is_none() && v.version.is_none())
        {
            bail!("{dest}: the store gave no ETag; cannot publish safely");
        }
        let m = merge(base, name, slice.clone(), init)?;
        between(attempt);
        match dest.put_conditional(m.to_bytes(), version).await {
            Ok(()) => return Ok(m),
            Err(e)
                if matches!(
                    e.downcast_ref::<crate::Error>(),
                    Some(crate::Error::Conflict { .. })
                ) =>
            {
                progress.note(&format!(
                    "{dest}: changed while publishing (attempt {attempt} of {ATTEMPTS}); merging again"
                ));
            }
            Err(e) => return Err(e),
        }
    }
    bail!("{dest}: lost the publishing race {ATTEMPTS} times; giving up")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(sha: char) -> Artifact {
        Artifact {
            key: "k/a".into(),
            sha256: sha.to_string().repeat(64),
            size: 1,
            version: "1".into(),
        }
    }

    fn slice(sha: char) -> Slice {
        let mut arts = BTreeMap::new();
        arts.insert("a".to_string(), art(sha));
        let mut by_arch = BTreeMap::new();
        by_arch.insert("x86_64".to_string(), arts);
        Slice {
            version: "1".into(),
            artifacts: by_arch,
        }
    }

    #[test]
    fn merges_keep_other_slices_and_need_a_baseline() {
        assert!(merge(None, "a", slice('a'), false).is_err());
        let m = merge(None, "a", slice('a'), true).unwrap();
        let m = merge(Some(m), "b", slice('b'), false).unwrap();
        let m = merge(Some(m), "a", slice('c'), false).unwrap();
        assert_eq!(m.slices.len(), 2);
        assert_eq!(m.slices["a"], slice('c'));
        assert_eq!(m.slices["b"], slice('b'));
        let back = ReleaseManifest::from_slice(&m.to_bytes(), "m").unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn bad_manifests_refused() {
        let mut m = merge(None, "a", slice('a'), true).unwrap();
        let good = m.to_bytes();
        let newer = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"schemaVersion\": 1", "\"schemaVersion\": 2");
        assert!(ReleaseManifest::from_slice(newer.as_bytes(), "m")
            .unwrap_err()
            .to_string()
            .contains("newer"));
        m.slices
            .get_mut("a")
            .unwrap()
            .artifacts
            .get_mut("x86_64")
            .unwrap()
            .get_mut("a")
            .unwrap()
            .key = "../x".into();
        assert!(ReleaseManifest::from_slice(&m.to_bytes(), "m").is_err());
        assert!(ReleaseManifest::from_slice(b"{}", "m").is_err());
    }
}
