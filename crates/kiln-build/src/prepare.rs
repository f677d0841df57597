//! Turning one source tree into the trees of each partition: subtrees for `/var`, `/home` and
//! friends, the root minus what other partitions claim (left as empty mount points), slot files
//! placed with their reservations, and the image's identity stamped into os-release.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_formats::fstree::{
    Contents, DataRef, FileData, Meta, Node, NodeId, NodeKind, SlotReservation, Timestamp, Tree,
    ROOT,
};
use kiln_formats::repart::Uuid;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::spec::{self, Spec};

/// Copies the subtree at `at` of `src` into a new tree (node ids renumbered, hardlinks inside
/// the subtree preserved), skipping the directories in `exclude` (they stay as empty mount
/// points with their own metadata).
pub fn subtree(src: &Tree, at: NodeId, exclude: &[NodeId]) -> Tree {
    let mut out = Tree::new(src.node(at).meta.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    map.insert(at, ROOT);
    let mut stack = vec![at];
    while let Some(old_dir) = stack.pop() {
        let new_dir = map[&old_dir];
        if exclude.contains(&old_dir) && old_dir != at {
            continue;
        }
        for e in src.entries(old_dir) {
            let child = match map.get(&e.node) {
                Some(&n) => n,
                None => {
                    let n = src.node(e.node);
                    let kind = match &n.kind {
                        NodeKind::Dir(_) => NodeKind::Dir(Vec::new()),
                        k => k.clone(),
                    };
                    let id = out.push(Node {
                        kind,
                        meta: n.meta.clone(),
                        slot: n.slot.clone(),
                    });
                    map.insert(e.node, id);
                    if n.is_dir() {
                        stack.push(e.node);
                    }
                    id
                }
            };
            out.link(new_dir, &e.name, child);
        }
    }
    out
}

/// The tree of every spec partition (`None` for partitions without a filesystem tree).
pub fn split(spec: &Spec, src: &Tree) -> Result<Vec<Option<Tree>>> {
    // Subtrees claimed by partitions other than the root.
    let mut claimed: Vec<NodeId> = Vec::new();
    for p in &spec.partitions {
        if let spec::Contents::Tree(path) = &p.contents {
            if path != "/" {
                if let Some(id) = src.resolve(path.as_bytes()) {
                    if !src.node(id).is_dir() {
                        bail!("partition {} (line {}): contents {path:?} is a {} in the source tree, not a directory", p.type_name, p.at.line, src.node(id).kind.name());
                    }
                    claimed.push(id);
                }
            }
        }
    }
    let mut out = Vec::new();
    for p in &spec.partitions {
        let t = match &p.contents {
            spec::Contents::Empty => {
                if p.fs == spec::FsKind::None {
                    None
                } else {
                    Some(Tree::new(Meta {
                        perm: 0o755,
                        ..Meta::default()
                    }))
                }
            }
            spec::Contents::Tree(path) => match src.resolve(path.as_bytes()) {
                Some(id) => Some(subtree(src, id, &claimed)),
                // A /var partition for a tree without /var: an empty filesystem.
                None => Some(Tree::new(src.node(ROOT).meta.clone())),
            },
            spec::Contents::Host(dir) => {
                Some(kiln_tree::dir::read_dir_tree(dir).with_context(|| {
                    format!("partition {} (line {}): copy", p.type_name, p.at.line)
                })?)
            }
        };
        out.push(t);
    }
    Ok(out)
}

/// Places each slot file of partition `p` in its tree, with its reservation and default
/// payload: the spec's `default` file, else the tree's file at that path, else empty.
pub fn place_slots(
    p: &spec::Partition,
    tree: &mut Tree,
    contents: &dyn Contents,
    mtime: i64,
) -> Result<()> {
    // A slot file that is not in the tree (a default payload from the host, or none) is dated
    // like everything else the build makes, not 1970.
    let new_meta = Meta {
        perm: 0o644,
        mtime: Timestamp::from_secs(mtime),
        ..Meta::default()
    };
    for s in &p.slot {
        let existing = tree.resolve(s.path.as_bytes());
        let (data, meta) = match (&s.default, existing) {
            (Some(path), _) => {
                let md = std::fs::metadata(path).with_context(|| {
                    format!("slot {} default payload {}", s.name, path.display())
                })?;
                let meta = existing
                    .map(|e| tree.node(e).meta.clone())
                    .unwrap_or_else(|| new_meta.clone());
                (
                    FileData::dense(md.len(), DataRef::Host(Arc::from(path.as_path()))),
                    meta,
                )
            }
            (None, Some(id)) => match &tree.node(id).kind {
                NodeKind::File(f) => {
                    // Read it now: the slot file must be dense and small enough.
                    let mut buf = vec![
                        0u8;
                        usize::try_from(f.size)
                            .unwrap_or(usize::MAX)
                            .min(s.capacity as usize + 1)
                    ];
                    if f.size <= s.capacity {
                        contents
                            .read_at(f, 0, &mut buf)
                            .with_context(|| format!("slot {}: reading {}", s.name, s.path))?;
                    }
                    (
                        FileData::dense(f.size, DataRef::Inline(buf.into())),
                        tree.node(id).meta.clone(),
                    )
                }
                k => bail!(
                    "slot {} (line {}): {} is a {} in the tree, not a file",
                    s.name,
                    s.at.line,
                    s.path,
                    k.name()
                ),
            },
            (None, None) => (FileData::dense(0, DataRef::Empty), new_meta.clone()),
        };
        if data.size > s.capacity {
            bail!(
                "slot {} (line {}): default payload is {} bytes, over the slot's capacity of {}",
                s.name,
                s.at.line,
                data.size,
                s.capacity
            );
        }
        let node = Node {
            kind: NodeKind::File(data),
            meta,
            slot: Some(SlotReservation {
                name: s.name.clone(),
                capacity: s.capacity,
            }),
        };
        let parent_meta = Meta {
            perm: 0o755,
            ..new_meta.clone()
        };
        tree.insert(s.path.as_bytes(), node, &parent_meta)
            .with_context(|| format!("slot {} (line {})", s.name, s.at.line))?;
    }
    Ok(())
}

/// Reads a small file of the tree whole (configuration files), following symlinks.
pub fn read_small(
    tree: &Tree,
    contents: &dyn Contents,
    path: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>> {
    Ok(kiln_formats::fstree::read_file(
        tree, contents, path, limit,
    )?)
}

/// Resolves a path in the tree, following symlinks.
pub fn resolve_follow(tree: &Tree, path: &str) -> Option<NodeId> {
    tree.resolve_follow(path.as_bytes())
}

/// The tree's machine id (`/etc/machine-id`, 32 hex digits), if it has a real one.
pub fn machine_id(tree: &Tree, contents: &dyn Contents) -> Result<Option<Uuid>> {
    let Some(bytes) = read_small(tree, contents, "/etc/machine-id", 4096)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let t = text.trim();
    if t.is_empty() || t == "uninitialized" {
        return Ok(None);
    }
    match Uuid::try_parse(t) {
        Ok(u) if t.len() == 32 => Ok(Some(u)),
        _ => bail!("/etc/machine-id in the tree is not 32 hex digits: {t:?}"),
    }
}

/// The os-release text of the tree (`/etc/os-release`, else `/usr/lib/os-release`) with
/// `IMAGE_ID` and `IMAGE_VERSION` set — what systemd-boot sorts by and systemd-sysupdate reads
/// as the running version.
pub fn os_release(
    tree: &Tree,
    contents: &dyn Contents,
    name: &str,
    version: &str,
) -> Result<String> {
    let base = match read_small(tree, contents, "/etc/os-release", 1 << 16)? {
        Some(b) => Some(b),
        None => read_small(tree, contents, "/usr/lib/os-release", 1 << 16)?,
    };
    let base = base
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|| {
            format!("NAME=\"{name}\"\nID={name}\nPRETTY_NAME=\"{name} {version}\"\n")
        });
    let mut out = String::new();
    for line in base.lines() {
        if line.starts_with("IMAGE_ID=") || line.starts_with("IMAGE_VERSION=") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!("IMAGE_ID={name}\nIMAGE_VERSION={version}\n"));
    Ok(out)
}

/// Replaces the tree's os-release (the file the symlinks lead to) with `text`.
pub fn stamp_os_release(tree: &mut Tree, text: &str) -> Result<()> {
    let target = resolve_follow(tree, "/etc/os-release")
        .or_else(|| resolve_follow(tree, "/usr/lib/os-release"));
    let bytes: Arc<[u8]> = text.as_bytes().into();
    match target {
        Some(id) if matches!(tree.node(id).kind, NodeKind::File(_)) => {
            tree.node_mut(id).kind =
                NodeKind::File(FileData::dense(bytes.len() as u64, DataRef::Inline(bytes)));
        }
        _ => {
            let node = Node {
                kind: NodeKind::File(FileData::dense(bytes.len() as u64, DataRef::Inline(bytes))),
                meta: Meta {
                    perm: 0o644,
                    ..Meta::default()
                },
                slot: None,
            };
            tree.insert(b"/usr/lib/os-release", node, &Meta::default())?;
        }
    }
    Ok(())
}

/// A digest of the whole input tree: every path, its metadata and its bytes, in canonical
/// order. Two sources that give the same tree give the same digest, whatever their format.
pub fn tree_digest(tree: &Tree, contents: &dyn Contents) -> Result<[u8; 32]> {
    let mut entries: Vec<(Vec<u8>, NodeId)> = Vec::new();
    tree.walk_paths(|p, id| entries.push((p.to_vec(), id)));
    // File contents hashed in parallel; the listing hashed in order.
    let file_hashes: Vec<Option<[u8; 32]>> = entries
        .par_iter()
        .map(|(path, id)| match &tree.node(*id).kind {
            NodeKind::File(f) => {
                let mut h = Sha256::new();
                // Sized to the file: most files are small, and zeroing a 1 MiB buffer per file
                // would cost more than hashing them.
                let mut buf = vec![0u8; f.stored_len().min(1 << 20) as usize];
                for run in f.runs() {
                    h.update(run.offset.to_le_bytes());
                    h.update(run.len.to_le_bytes());
                    let mut off = run.offset;
                    let end = run.offset + run.len;
                    while off < end {
                        let n = (end - off).min(buf.len() as u64) as usize;
                        contents.read_at(f, off, &mut buf[..n]).with_context(|| {
                            format!(
                                "reading {} for the input digest",
                                String::from_utf8_lossy(path)
                            )
                        })?;
                        h.update(&buf[..n]);
                        off += n as u64;
                    }
                }
                Ok(Some(h.finalize().into()))
            }
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    let mut h = Sha256::new();
    for ((path, id), fh) in entries.iter().zip(file_hashes) {
        let n = tree.node(*id);
        h.update((path.len() as u64).to_le_bytes());
        h.update(path);
        h.update(n.mode().to_le_bytes());
        h.update(n.meta.uid.to_le_bytes());
        h.update(n.meta.gid.to_le_bytes());
        h.update(n.meta.mtime.sec.to_le_bytes());
        h.update(n.meta.mtime.nsec.to_le_bytes());
        for x in &n.meta.xattrs {
            h.update((x.name.len() as u64).to_le_bytes());
            h.update(&x.name);
            h.update((x.value.len() as u64).to_le_bytes());
            h.update(&x.value);
        }
        match &n.kind {
            NodeKind::File(f) => {
                h.update(f.size.to_le_bytes());
                h.update(fh.unwrap_or_default());
            }
            NodeKind::Symlink(t) => h.update(t),
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                h.update(major.to_le_bytes());
                h.update(minor.to_le_bytes());
            }
            _ => {}
        }
        h.update(b"\n");
    }
    Ok(h.finalize().into())
}

/// `[source] service = "NAME"`: writes `/etc/systemd/system/NAME.service` running the container
/// image's entrypoint and command (see [`kiln_tree::oci::service_unit`]) and enables it for
/// `multi-user.target`. Returns the unit's path.
pub fn image_service(
    tree: &mut Tree,
    image: Option<&kiln_tree::oci::ImageConfig>,
    name: &str,
    mtime: i64,
) -> Result<String> {
    let Some(config) = image else {
        bail!("[source] service = {name:?} needs a container image source (oci://, oci-layout:, docker-archive:)");
    };
    let Some(unit) = kiln_tree::oci::service_unit(config, name) else {
        bail!(
            "[source] service = {name:?}: the config of {} has neither Entrypoint nor Cmd",
            config.reference
        );
    };
    let meta = Meta {
        perm: 0o644,
        mtime: Timestamp::from_secs(mtime),
        ..Meta::default()
    };
    let dir_meta = Meta {
        perm: 0o755,
        ..meta.clone()
    };
    let path = format!("/etc/systemd/system/{name}.service");
    let bytes: Arc<[u8]> = unit.into_bytes().into();
    tree.insert(
        path.as_bytes(),
        Node {
            kind: NodeKind::File(FileData::dense(bytes.len() as u64, DataRef::Inline(bytes))),
            meta: meta.clone(),
            slot: None,
        },
        &dir_meta,
    )
    .with_context(|| format!("adding {path}"))?;
    let wants = format!("/etc/systemd/system/multi-user.target.wants/{name}.service");
    tree.insert(
        wants.as_bytes(),
        Node {
            kind: NodeKind::Symlink(format!("../{name}.service").into_bytes().into()),
            meta: Meta {
                perm: 0o777,
                ..meta
            },
            slot: None,
        },
        &dir_meta,
    )
    .with_context(|| format!("adding {wants}"))?;
    Ok(path)
}

/// Where a tree's own executables live: every regular executable file directly in these
/// directories (following a merged-/usr symlink) is checked by [`check_arch`].
const EXECUTABLE_DIRS: &[&str] = &[
    "/bin",
    "/sbin",
    "/usr/bin",
    "/usr/sbin",
    "/usr/libexec",
    "/usr/lib/systemd",
];

/// Checks that the tree's executables are for `arch`: its init (`/sbin/init`, else `/init`)
/// must be an ELF executable of that machine when it is an ELF file at all, and no
/// executable directly in `/bin`, `/sbin`, `/usr/bin`, `/usr/sbin`, `/usr/libexec` or
/// `/usr/lib/systemd` may be a 64-bit ELF file of another architecture kiln builds for (32-bit
/// and other machines are left alone: multilib and emulators have them legitimately). The
/// error names the first file at fault. Returns how many ELF files were looked at.
pub fn check_arch(
    tree: &Tree,
    contents: &dyn Contents,
    arch: kiln_formats::arch::Arch,
) -> Result<usize> {
    use kiln_formats::arch::elf_machine;
    let head = |id: NodeId| -> Result<Option<kiln_formats::arch::ElfMachine>> {
        let NodeKind::File(fd) = &tree.node(id).kind else {
            return Ok(None);
        };
        let Some(first) = fd.runs().first().copied() else {
            return Ok(None);
        };
        if first.offset != 0 || first.len < 20 {
            return Ok(None);
        }
        let mut b = [0u8; 20];
        contents.read_at(fd, 0, &mut b)?;
        Ok(elf_machine(&b))
    };
    let wrong = |path: &str, m: kiln_formats::arch::ElfMachine| {
        anyhow::anyhow!(
            "{path} is an ELF executable for {}, but the image is {arch} ([image] arch = \"{}\"): set [image] arch to the tree's architecture, or build from a tree for {arch}",
            m.describe(),
            m.arch().map(|a| a.name()).unwrap_or("?"),
        )
    };
    let mut seen = 0;
    for init in ["/sbin/init", "/init"] {
        if let Some(id) = tree.resolve_follow(init.as_bytes()) {
            if let Some(m) = head(id).with_context(|| format!("reading {init}"))? {
                seen += 1;
                if m.arch() != Some(arch) {
                    return Err(wrong(init, m));
                }
            }
            break;
        }
    }
    let mut dirs_seen = Vec::new();
    for dir in EXECUTABLE_DIRS {
        let Some(d) = tree.resolve_follow(dir.as_bytes()) else {
            continue;
        };
        if !tree.node(d).is_dir() || dirs_seen.contains(&d) {
            continue;
        }
        dirs_seen.push(d);
        for e in tree.entries(d) {
            let n = tree.node(e.node);
            if n.meta.perm & 0o111 == 0 {
                continue;
            }
            let path = format!("{dir}/{}", String::from_utf8_lossy(&e.name));
            if let Some(m) = head(e.node).with_context(|| format!("reading {path}"))? {
                seen += 1;
                if m.arch().is_some_and(|a| a != arch) {
                    return Err(wrong(&path, m));
                }
            }
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::fstree::HostContents;
    use std::path::Path;

    fn file(bytes: &[u8]) -> Node {
        Node {
            kind: NodeKind::File(FileData::dense(
                bytes.len() as u64,
                DataRef::Inline(bytes.into()),
            )),
            meta: Meta::default(),
            slot: None,
        }
    }

    fn sample() -> Tree {
        let mut t = Tree::default();
        let m = Meta::default();
        t.insert(
            b"/etc/machine-id",
            file(b"0123456789abcdef0123456789abcdef\n"),
            &m,
        )
        .unwrap();
        t.insert(
            b"/usr/lib/os-release",
            file(b"NAME=Debian\nIMAGE_VERSION=old\n"),
            &m,
        )
        .unwrap();
        t.insert(
            b"/etc/os-release",
            Node {
                kind: NodeKind::Symlink((*b"../usr/lib/os-release").into()),
                meta: m.clone(),
                slot: None,
            },
            &m,
        )
        .unwrap();
        t.insert(b"/var/lib/x", file(b"x"), &m).unwrap();
        t.insert(b"/usr/bin/sh", file(b"#!"), &m).unwrap();
        let sh = t.resolve(b"/usr/bin/sh").unwrap();
        let var = t.resolve(b"/var/lib").unwrap();
        t.link(var, b"hardlink-to-sh", sh);
        t
    }

    #[test]
    fn split_claims_subtrees_and_keeps_mount_points() {
        let spec = Spec::parse(Path::new("k.toml"), "[image]\nname=\"a\"\nversion=\"1\"\n[[partition]]\ntype=\"root\"\n[[partition]]\ntype=\"var\"\n").unwrap();
        let t = sample();
        let parts = split(&spec, &t).unwrap();
        let root = parts[0].as_ref().unwrap();
        let var = parts[1].as_ref().unwrap();
        assert!(root.resolve(b"/var").is_some(), "mount point stays");
        assert!(root.resolve(b"/var/lib").is_none(), "but empty");
        assert!(var.resolve(b"/lib/x").is_some());
        assert!(
            var.resolve(b"/lib/hardlink-to-sh").is_some(),
            "link across partitions becomes a copy"
        );
        assert!(root.resolve(b"/usr/bin/sh").is_some());
    }

    #[test]
    fn machine_id_and_os_release() {
        let mut t = sample();
        let c = HostContents;
        assert_eq!(machine_id(&t, &c).unwrap().unwrap().as_bytes()[0], 0x01);
        let text = os_release(&t, &c, "kiosk", "2").unwrap();
        assert!(
            text.contains("NAME=Debian\n") && text.ends_with("IMAGE_ID=kiosk\nIMAGE_VERSION=2\n")
        );
        assert!(!text.contains("old"));
        stamp_os_release(&mut t, &text).unwrap();
        assert_eq!(
            read_small(&t, &c, "/etc/os-release", 4096)
                .unwrap()
                .unwrap(),
            text.as_bytes()
        );
    }

    #[test]
    fn digest_depends_on_content_and_metadata_only() {
        let a = sample();
        let mut b = sample();
        assert_eq!(
            tree_digest(&a, &HostContents).unwrap(),
            tree_digest(&b, &HostContents).unwrap()
        );
        let id = b.resolve(b"/var/lib/x").unwrap();
        b.node_mut(id).meta.perm = 0o600;
        assert_ne!(
            tree_digest(&a, &HostContents).unwrap(),
            tree_digest(&b, &HostContents).unwrap()
        );
    }
}
