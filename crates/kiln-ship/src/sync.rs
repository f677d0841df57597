//! Cache sync: bring a local directory up to date with a release manifest.
//!
//! The cache keeps the manifest of its last sync in `.kiln-manifest.json`. A sync plans first
//! (an artifact is fetched when the cache has no file for it, or when its sha256 or size in the
//! remote manifest differs from the cached manifest), prints the plan, then downloads only those
//! artifacts, each verified against the manifest's sha256 and size and renamed over the old file
//! only when complete. A failed download keeps the old file and its old manifest entry, so the
//! next sync tries it again.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_tree::progress::Progress;

use crate::manifest::{check_key, Entry, ReleaseManifest};
use crate::store::Remote;

/// The cached manifest's file name inside the cache directory.
pub const STATE_FILE: &str = ".kiln-manifest.json";

/// What to do with one artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Download it; the reason is `missing` or `changed`.
    Fetch(&'static str),
    /// The cached file is current.
    Keep,
}

/// One line of the plan.
#[derive(Clone, Debug)]
pub struct Step {
    /// The artifact.
    pub entry: Entry,
    /// Its file in the cache.
    pub dest: PathBuf,
    /// What will happen.
    pub action: Action,
}

/// What a sync did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The plan, in manifest order.
    pub plan: Vec<Step>,
    /// Keys downloaded and verified.
    pub downloaded: Vec<String>,
    /// Keys whose download failed, with the error.
    pub failed: Vec<(String, String)>,
}

/// Plans a sync of `remote` (already fetched) into `cache` for the given architectures (all
/// when empty).
pub fn plan(
    remote: &ReleaseManifest,
    cache: &Path,
    arches: &[String],
) -> anyhow::Result<Vec<Step>> {
    let local = read_state(cache)?;
    let mut by_key: std::collections::BTreeMap<String, String> = Default::default();
    let mut steps = Vec::new();
    for e in remote.entries() {
        if !arches.is_empty() && !arches.contains(&e.arch) {
            continue;
        }
        check_key(&e.artifact.key)?;
        if let Some(prev) = by_key.insert(e.artifact.key.clone(), e.artifact.sha256.clone()) {
            if prev != e.artifact.sha256 {
                anyhow::bail!(
                    "key {:?} appears twice in the manifest with different sha256",
                    e.artifact.key
                );
            }
            continue;
        }
        let dest = cache.join(&e.artifact.key);
        let cached = local.as_ref().and_then(|m| {
            m.entries()
                .into_iter()
                .find(|l| l.artifact.key == e.artifact.key)
                .map(|l| l.artifact)
        });
        let action = match std::fs::metadata(&dest) {
            Ok(md) if md.is_file() => match cached {
                Some(c)
                    if c.sha256 == e.artifact.sha256
                        && c.size == e.artifact.size
                        && md.len() == c.size =>
                {
                    Action::Keep
                }
                _ => Action::Fetch("changed"),
            },
            _ => Action::Fetch("missing"),
        };
        steps.push(Step {
            entry: e,
            dest,
            action,
        });
    }
    Ok(steps)
}

fn read_state(cache: &Path) -> anyhow::Result<Option<ReleaseManifest>> {
    let p = cache.join(STATE_FILE);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(ReleaseManifest::from_slice(
            &b,
            &p.display().to_string(),
        )?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: read", p.display())),
    }
}

/// Syncs the manifest at `url` into `cache`. Tells `progress` the plan (and each download),
/// then downloads. Returns what happened; failed downloads are in [`Outcome::failed`] (the
/// caller decides the exit status), everything else is an error.
pub async fn sync(
    url: &Remote,
    cache: &Path,
    arches: &[String],
    progress: &dyn Progress,
) -> anyhow::Result<Outcome> {
    let remote = crate::manifest::read(url)
        .await?
        .with_context(|| format!("{url}: no manifest there"))?;
    std::fs::create_dir_all(cache).with_context(|| format!("{}: create", cache.display()))?;
    let steps = plan(&remote, cache, arches)?;
    let fetch = steps.iter().filter(|s| s.action != Action::Keep).count();
    progress.note(&format!(
        "plan: {fetch} to download, {} up to date",
        steps.len() - fetch
    ));
    for s in &steps {
        progress.note(&match s.action {
            Action::Fetch(why) => format!(
                "  fetch {} ({why}, {} bytes)",
                s.entry.artifact.key, s.entry.artifact.size
            ),
            Action::Keep => format!("  keep  {}", s.entry.artifact.key),
        });
    }
    let mut out = Outcome {
        plan: steps.clone(),
        ..Default::default()
    };
    for s in &steps {
        if s.action == Action::Keep {
            continue;
        }
        let key = &s.entry.artifact.key;
        let res = async {
            if let Some(parent) = s.dest.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("{}: create", parent.display()))?;
            }
            let src = url.join(key)?;
            src.download_to(
                &s.dest,
                &s.entry.artifact.sha256,
                Some(s.entry.artifact.size),
            )
            .await
        }
        .await;
        match res {
            Ok(_) => {
                progress.note(&format!("downloaded {key}"));
                out.downloaded.push(key.clone());
            }
            Err(e) => {
                progress.note(&format!(
                    "failed {key}: {e:#} (the cached file, if any, is kept)"
                ));
                out.failed.push((key.clone(), format!("{e:#}")));
            }
        }
    }
    write_state(cache, &remote, arches, &out)?;
    Ok(out)
}

/// Records the new cache state: the remote manifest's selected entries, except that a failed
/// artifact keeps its previous entry (or none), so the next sync retries it.
fn write_state(
    cache: &Path,
    remote: &ReleaseManifest,
    arches: &[String],
    out: &Outcome,
) -> anyhow::Result<()> {
    let old = read_state(cache)?;
    let mut m = remote.clone();
    for slice in m.slices.values_mut() {
        slice
            .artifacts
            .retain(|arch, _| arches.is_empty() || arches.contains(arch));
    }
    for (slice_name, slice) in m.slices.iter_mut() {
        for (arch, arts) in slice.artifacts.iter_mut() {
            let names: Vec<String> = arts.keys().cloned().collect();
            for name in names {
                let key = arts.get(&name).map(|a| a.key.clone()).unwrap_or_default();
                if out.failed.iter().any(|(k, _)| *k == key) {
                    let prev = old.as_ref().and_then(|o| {
                        o.slices
                            .get(slice_name)?
                            .artifacts
                            .get(arch)?
                            .get(&name)
                            .cloned()
                    });
                    match prev {
                        Some(p) => {
                            arts.insert(name, p);
                        }
                        None => {
                            arts.remove(&name);
                        }
                    }
                }
            }
        }
    }
    let dest = cache.join(STATE_FILE);
    let a = kiln_tree::output::AtomicFile::create(&dest)
        .with_context(|| format!("{}: create", dest.display()))?;
    std::io::Write::write_all(&mut a.file(), &m.to_bytes())
        .with_context(|| format!("{}: write", dest.display()))?;
    a.commit()
        .with_context(|| format!("{}: commit", dest.display()))?;
    Ok(())
}
