//! Content policy: literal byte patterns that must not appear in a tree, neither in a path nor
//! in a symlink target nor inside a file. Files are streamed in 1 MiB pieces with an overlap of
//! the longest pattern minus one byte, so a match across a piece boundary is found and no file
//! is ever held whole. Every hit is reported, not just the first.
//!
//! The policy is the `[policy]` table of a kiln spec, or a file holding just that table (or a
//! bare top-level `forbid`): `forbid = ["internal.example.com", "BEGIN OPENSSH PRIVATE KEY"]`.

use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use anyhow::{bail, Context};
use kiln_formats::fstree::{Contents, NodeKind, Tree};
use serde::Deserialize;

/// Size of the pieces file contents are scanned in.
const PIECE: usize = 1 << 20;

/// What must not be in a tree.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Literal patterns (case-sensitive bytes, UTF-8 as written).
    #[serde(default)]
    pub forbid: Vec<String>,
}

impl Policy {
    /// Parses TOML holding a `[policy]` table or a top-level `forbid` list.
    pub fn from_toml(text: &str, what: &str) -> anyhow::Result<Self> {
        let v: toml::Table = toml::from_str(text).with_context(|| format!("{what}: not TOML"))?;
        let p = match v.get("policy") {
            Some(t) => t
                .clone()
                .try_into::<Policy>()
                .with_context(|| format!("{what}: [policy]"))?,
            None => {
                let forbid = match v.get("forbid") {
                    Some(f) => f
                        .clone()
                        .try_into::<Vec<String>>()
                        .with_context(|| format!("{what}: forbid"))?,
                    None => bail!("{what}: no [policy] table and no forbid list"),
                };
                Policy { forbid }
            }
        };
        if let Some(i) = p.forbid.iter().position(String::is_empty) {
            bail!("{what}: forbid[{i}] is empty; an empty pattern would match everywhere");
        }
        Ok(p)
    }

    /// Reads a policy file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: read", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

/// Where a pattern was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// In the path (the match ends in this entry's own name).
    Name,
    /// In the symlink's target.
    SymlinkTarget,
    /// Inside the file, starting at this byte offset.
    Content {
        /// Byte offset of the match's first byte in the file.
        offset: u64,
    },
}

/// One policy violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Path in the tree (starting with `/`; lossy UTF-8).
    pub path: String,
    /// Where in that entry.
    pub place: Place,
    /// The pattern found.
    pub pattern: String,
}

impl std::fmt::Display for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.place {
            Place::Name => write!(
                f,
                "{}: name contains forbidden pattern {:?}",
                self.path, self.pattern
            ),
            Place::SymlinkTarget => write!(
                f,
                "{}: symlink target contains forbidden pattern {:?}",
                self.path, self.pattern
            ),
            Place::Content { offset } => {
                write!(
                    f,
                    "{}: byte offset {offset}: forbidden pattern {:?}",
                    self.path, self.pattern
                )
            }
        }
    }
}

/// Scans every name, symlink target and regular file of `tree` (hardlinked files once, under
/// their first path). Returns all hits in tree order; an unreadable file is an error.
pub fn scan(tree: &Tree, contents: &dyn Contents, policy: &Policy) -> anyhow::Result<Vec<Hit>> {
    if policy.forbid.is_empty() {
        return Ok(Vec::new());
    }
    let ac = AhoCorasick::builder()
        .match_kind(MatchKind::Standard)
        .build(&policy.forbid)
        .context("compiling the policy patterns")?;
    let overlap = policy.forbid.iter().map(String::len).max().unwrap_or(1) - 1;
    let mut hits = Vec::new();
    let mut err = None;
    let mut buf = vec![0u8; PIECE + overlap];
    tree.walk_paths(|path, id| {
        if err.is_some() {
            return;
        }
        let shown = String::from_utf8_lossy(path).into_owned();
        // Name: report matches that end inside this entry's own name, so a directory's name is
        // reported once and not again for everything below it.
        let own_start = path.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        for m in ac.find_overlapping_iter(path) {
            if m.end() > own_start {
                hits.push(Hit {
                    path: shown.clone(),
                    place: Place::Name,
                    pattern: policy.forbid[m.pattern().as_usize()].clone(),
                });
            }
        }
        match &tree.node(id).kind {
            NodeKind::Symlink(target) => {
                for m in ac.find_overlapping_iter(&**target) {
                    hits.push(Hit {
                        path: shown.clone(),
                        place: Place::SymlinkTarget,
                        pattern: policy.forbid[m.pattern().as_usize()].clone(),
                    });
                }
            }
            NodeKind::File(fd) => {
                for run in fd.runs() {
                    let mut carried = 0usize;
                    let mut pos = run.offset;
                    let end = run.offset + run.len;
                    while pos < end {
                        let n = ((end - pos) as usize).min(PIECE);
                        if let Err(e) = contents.read_at(fd, pos, &mut buf[carried..carried + n]) {
                            err = Some(anyhow::anyhow!("{shown}: reading at byte {pos}: {e}"));
                            return;
                        }
                        let window = &buf[..carried + n];
                        let base = pos - carried as u64;
                        for m in ac.find_overlapping_iter(window) {
                            // Matches entirely inside the carried bytes were reported last time.
                            if m.end() > carried {
                                hits.push(Hit {
                                    path: shown.clone(),
                                    place: Place::Content {
                                        offset: base + m.start() as u64,
                                    },
                                    pattern: policy.forbid[m.pattern().as_usize()].clone(),
                                });
                            }
                        }
                        let keep = overlap.min(window.len());
                        let from = window.len() - keep;
                        buf.copy_within(from..from + keep, 0);
                        carried = keep;
                        pos += n as u64;
                    }
                }
            }
            _ => {}
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(hits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::fstree::{DataRef, FileData, HostContents, Meta, Node};

    fn file(bytes: Vec<u8>) -> Node {
        Node {
            kind: NodeKind::File(FileData::dense(
                bytes.len() as u64,
                DataRef::Inline(bytes.into()),
            )),
            meta: Meta::default(),
            slot: None,
        }
    }

    #[test]
    fn finds_every_hit_with_offsets_across_pieces() {
        let mut t = Tree::default();
        let m = Meta::default();
        // A match straddling the 1 MiB piece boundary, one at the start, one at the very end.
        let mut big = vec![b'.'; 3 * PIECE];
        big[..6].copy_from_slice(b"SECRET");
        big[PIECE - 3..PIECE + 3].copy_from_slice(b"SECRET");
        let n = big.len();
        big[n - 6..].copy_from_slice(b"SECRET");
        t.insert(b"/data/big.bin", file(big), &m).unwrap();
        t.insert(b"/etc/SECRET.conf", file(b"clean".to_vec()), &m)
            .unwrap();
        t.insert(b"/SECRETdir/inner", file(b"x".to_vec()), &m)
            .unwrap();
        let p = Policy {
            forbid: vec!["SECRET".into(), "CRE".into()],
        };
        let hits = scan(&t, &HostContents, &p).unwrap();
        let content: Vec<u64> = hits
            .iter()
            .filter(|h| h.pattern == "SECRET")
            .filter_map(|h| match h.place {
                Place::Content { offset } => Some(offset),
                _ => None,
            })
            .collect();
        assert_eq!(content, vec![0, PIECE as u64 - 3, 3 * PIECE as u64 - 6]);
        let names: Vec<&str> = hits
            .iter()
            .filter(|h| h.place == Place::Name && h.pattern == "SECRET")
            .map(|h| h.path.as_str())
            .collect();
        assert_eq!(names, vec!["/SECRETdir", "/etc/SECRET.conf"]);
        // Overlapping patterns are each reported.
        assert_eq!(
            hits.iter()
                .filter(|h| h.pattern == "CRE" && h.path == "/data/big.bin")
                .count(),
            3
        );
    }

    #[test]
    fn policy_files() {
        assert_eq!(
            Policy::from_toml("[policy]\nforbid = [\"a\"]\n", "p")
                .unwrap()
                .forbid,
            vec!["a"]
        );
        assert_eq!(
            Policy::from_toml("forbid = [\"b\"]\n", "p").unwrap().forbid,
            vec!["b"]
        );
        assert!(Policy::from_toml("[policy]\nforbid = [\"\"]\n", "p").is_err());
        assert!(Policy::from_toml("[image]\nname = \"x\"\n", "p").is_err());
    }
}
