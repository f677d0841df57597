//! Reading a source tree from a host directory.
//!
//! One `lstat` per entry, names sorted as bytes, xattrs through `llistxattr`, holes through
//! `SEEK_DATA`/`SEEK_HOLE`, hardlinks by (device, inode). File bytes are referenced by path and
//! read later, in parallel, by the writer.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_formats::fstree::{
    DataRef, FileData, Meta, Node, NodeId, NodeKind, Segment, Timestamp, Tree, Xattr, ROOT,
};

use crate::Error;

/// Reads the directory `root` into a tree.
pub fn read_dir_tree(root: &Path) -> Result<Tree, Error> {
    let md = fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !md.is_dir() {
        return Err(Error::Source {
            path: root.display().to_string(),
            msg: "not a directory".into(),
        });
    }
    let mut tree = Tree::new(meta_of(root, &md)?);
    let mut links: HashMap<(u64, u64), NodeId> = HashMap::new();
    walk(&mut tree, ROOT, root, &mut links)?;
    Ok(tree)
}

/// Lays the host directory `dir` over `tree`: its files, links and special files replace the
/// tree's at the same paths, its directories merge with the tree's (their metadata replaces the
/// tree's). Returns how many entries were added or replaced. A directory where the tree has a
/// symlink (Debian's `/lib`) or anything else that is not a directory, or a non-directory
/// where the tree has a directory, is an error naming the path: write the path the link
/// points to.
pub fn add_dir(tree: &mut Tree, dir: &Path) -> Result<usize, Error> {
    let layer = read_dir_tree(dir)?;
    let mut paths: Vec<(Vec<u8>, NodeId)> = Vec::new();
    layer.walk_paths(|p, id| paths.push((p.to_vec(), id)));
    let parent_meta = layer.node(ROOT).meta.clone();
    let mut count = 0;
    for (path, id) in paths {
        if path == b"/" {
            continue; // the root directory's metadata stays the tree's
        }
        let mut node = layer.node(id).clone();
        if let NodeKind::Dir(children) = &mut node.kind {
            // Children are inserted by their own paths.
            children.clear();
        }
        let host = || {
            dir.join(String::from_utf8_lossy(&path[1..]).as_ref())
                .display()
                .to_string()
        };
        // A directory over a symlink would cut the tree's link (Debian's /lib -> usr/lib) and a
        // file over a directory would drop its contents: neither is what anyone means.
        if let Some(old) = tree.resolve(&path) {
            let old = tree.node(old);
            if old.is_dir() != node.is_dir() {
                let link = match &old.kind {
                    NodeKind::Symlink(t) => format!(
                        " (-> {}): add it under the link's target",
                        String::from_utf8_lossy(t)
                    ),
                    _ => String::new(),
                };
                return Err(Error::Source {
                    path: host(),
                    msg: format!(
                        "cannot add a {} where the tree has a {}{link}",
                        node.kind.name(),
                        old.kind.name()
                    ),
                });
            }
        }
        tree.insert(&path, node, &parent_meta)
            .map_err(|e| Error::Source {
                path: host(),
                msg: format!("cannot add it to the tree: {e}"),
            })?;
        count += 1;
    }
    Ok(count)
}

fn walk(
    tree: &mut Tree,
    dir: NodeId,
    path: &Path,
    links: &mut HashMap<(u64, u64), NodeId>,
) -> Result<(), Error> {
    let mut names: Vec<_> = fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::io(path, e))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let child = path.join(&name);
        let bytes = name.as_bytes();
        kiln_formats::fstree::check_name(bytes, child.as_os_str().as_bytes()).map_err(|e| {
            Error::Source {
                path: child.display().to_string(),
                msg: e.to_string(),
            }
        })?;
        let md = fs::symlink_metadata(&child).map_err(|e| Error::io(&child, e))?;
        let key = (md.dev(), md.ino());
        if !md.is_dir() && md.nlink() > 1 {
            if let Some(&id) = links.get(&key) {
                tree.link(dir, bytes, id);
                continue;
            }
        }
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            NodeKind::Dir(Vec::new())
        } else if ft.is_file() {
            NodeKind::File(file_data(&child, &md)?)
        } else if ft.is_symlink() {
            let t = fs::read_link(&child).map_err(|e| Error::io(&child, e))?;
            NodeKind::Symlink(t.as_os_str().as_bytes().into())
        } else if ft.is_char_device() {
            NodeKind::CharDev {
                major: major(md.rdev()),
                minor: minor(md.rdev()),
            }
        } else if ft.is_block_device() {
            NodeKind::BlockDev {
                major: major(md.rdev()),
                minor: minor(md.rdev()),
            }
        } else if ft.is_fifo() {
            NodeKind::Fifo
        } else {
            NodeKind::Socket
        };
        let is_dir = matches!(kind, NodeKind::Dir(_));
        let id = tree.push(Node {
            kind,
            meta: meta_of(&child, &md)?,
            slot: None,
        });
        tree.link(dir, bytes, id);
        if is_dir {
            walk(tree, id, &child, links)?;
        } else if md.nlink() > 1 {
            links.insert(key, id);
        }
    }
    Ok(())
}

fn meta_of(path: &Path, md: &fs::Metadata) -> Result<Meta, Error> {
    Ok(Meta {
        perm: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: Timestamp {
            sec: md.mtime(),
            nsec: md.mtime_nsec() as u32,
        },
        xattrs: xattrs(path)?,
    })
}

/// Data runs of a regular file. Only files with fewer allocated blocks than their size are
/// probed for holes, so dense files cost no extra system calls.
fn file_data(path: &Path, md: &fs::Metadata) -> Result<FileData, Error> {
    let size = md.len();
    let data = DataRef::Host(Arc::from(path));
    if size == 0 || md.blocks() * 512 >= size {
        return Ok(FileData::dense(size, data));
    }
    let f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let segments = data_runs(&f, size).map_err(|e| Error::io(path, e))?;
    if segments.len() == 1
        && segments[0]
            == (Segment {
                offset: 0,
                len: size,
            })
    {
        return Ok(FileData::dense(size, data));
    }
    let data = if segments.is_empty() {
        DataRef::Empty
    } else {
        data
    };
    Ok(FileData {
        size,
        data,
        segments: Some(segments.into()),
    })
}

fn data_runs(f: &fs::File, size: u64) -> io::Result<Vec<Segment>> {
    Ok(kiln_os::data_runs(f, size)?
        .into_iter()
        .map(|(offset, len)| Segment { offset, len })
        .collect())
}

fn major(rdev: u64) -> u32 {
    kiln_os::dev_numbers(rdev).0
}

fn minor(rdev: u64) -> u32 {
    kiln_os::dev_numbers(rdev).1
}

/// All extended attributes of `path` (not following symlinks), sorted by name.
pub fn xattrs(path: &Path) -> Result<Vec<Xattr>, Error> {
    let mut out: Vec<Xattr> = kiln_os::xattrs(path)
        .map_err(|e| Error::io(path, e))?
        .into_iter()
        .map(|(name, value)| Xattr {
            name: name.into(),
            value: value.into(),
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The path of `path` relative to a root, for messages.
pub fn display_rel(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn add_dir_replaces_files_and_merges_directories() {
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        fs::create_dir_all(b.join("etc/systemd/system")).unwrap();
        fs::create_dir_all(b.join("usr/lib")).unwrap();
        fs::write(b.join("etc/hostname"), b"debian\n").unwrap();
        fs::write(b.join("etc/keep"), b"kept\n").unwrap();
        symlink("usr/lib", b.join("lib")).unwrap();
        let mut tree = read_dir_tree(b).unwrap();
        let layer = tempfile::tempdir().unwrap();
        let l = layer.path();
        fs::create_dir_all(l.join("etc/systemd/system/multi-user.target.wants")).unwrap();
        fs::write(l.join("etc/hostname"), b"kiosk\n").unwrap();
        fs::write(l.join("etc/systemd/system/x.service"), b"[Unit]\n").unwrap();
        symlink(
            "../x.service",
            l.join("etc/systemd/system/multi-user.target.wants/x.service"),
        )
        .unwrap();
        let n = add_dir(&mut tree, l).unwrap();
        assert_eq!(
            n, 7,
            "etc, hostname, systemd, system, its wants dir and link, x.service"
        );
        let read = |t: &Tree, p: &str| {
            kiln_formats::fstree::read_file(t, &crate::SourceContents::Host, p, 1 << 20)
                .unwrap()
                .map(|b| String::from_utf8(b).unwrap())
        };
        assert_eq!(read(&tree, "/etc/hostname").as_deref(), Some("kiosk\n"));
        assert_eq!(read(&tree, "/etc/keep").as_deref(), Some("kept\n"));
        assert_eq!(
            read(
                &tree,
                "/etc/systemd/system/multi-user.target.wants/x.service"
            )
            .as_deref(),
            Some("[Unit]\n")
        );
        // Through Debian's /lib symlink: an error naming the path, not a silent new /lib.
        let bad = tempfile::tempdir().unwrap();
        fs::create_dir_all(bad.path().join("lib/systemd")).unwrap();
        let e = add_dir(&mut tree, bad.path()).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "/lib: cannot add a directory where the tree has a symlink (-> usr/lib): add it under the link's target"
            ),
            "{e}"
        );
        assert!(
            tree.resolve(b"/lib/systemd").is_none(),
            "nothing added through the link"
        );
    }

    #[test]
    fn reads_kinds_links_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("b/c")).unwrap();
        fs::write(r.join("a"), b"hello").unwrap();
        fs::hard_link(r.join("a"), r.join("b/c/a2")).unwrap();
        symlink("../a", r.join("b/l")).unwrap();
        let f = fs::File::create(r.join("sparse")).unwrap();
        f.set_len(1 << 24).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"x", 1 << 20).unwrap();
        drop(f);

        let t = read_dir_tree(r).unwrap();
        let a = t.resolve(b"/a").unwrap();
        assert_eq!(t.resolve(b"/b/c/a2"), Some(a), "hardlink shares the node");
        assert!(
            matches!(&t.node(t.resolve(b"/b/l").unwrap()).kind, NodeKind::Symlink(s) if &**s == b"../a")
        );
        let NodeKind::File(sp) = &t.node(t.resolve(b"/sparse").unwrap()).kind else {
            panic!()
        };
        assert_eq!(sp.size, 1 << 24);
        let segs = sp.segments.as_ref().expect("sparse file probed");
        assert!(segs
            .iter()
            .any(|s| s.offset <= 1 << 20 && s.offset + s.len > 1 << 20));
        assert!(sp.stored_len() < 1 << 22);
    }
}
