//! Random access to a source that can only be read once (a compressed tar, stdin): each file's
//! bytes go, packed, into one unlinked temp file as the stream goes by. Memory stays bounded
//! by the number of files; the spool costs disk equal to the tree's data. Used where a whole
//! tree must be known before any output can be laid out (a disk image, an SBOM scan), as
//! opposed to `kiln mkfs`, whose writers place stream data straight into the image.

use kiln_formats::fstree::{stream_blocks, DataRef, FileData, NodeKind, NonzeroRuns, Placer, Tree};
use std::fs::File;
use std::io::{self, Read, Write};

use crate::tar::TarContents;

/// A [`Placer`] that appends each file's packed bytes to a temp file.
#[derive(Debug)]
pub struct Spool {
    file: File,
    len: u64,
    /// Start offset in the spool of each placed file.
    starts: Vec<u64>,
    /// With holes from zeroes: the data runs found in each placed file as it went by (only
    /// its non-zero blocks are spooled, packed).
    found: Option<Vec<FileData>>,
}

impl Spool {
    /// An empty spool in the system temp directory (unlinked at once).
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            file: tempfile::tempfile()?,
            len: 0,
            starts: Vec::new(),
            found: None,
        })
    }

    /// A spool that turns the all-zero blocks of every file into holes as the data goes by
    /// (see [`crate::holes`]): only non-zero blocks are spooled.
    pub fn zero_holes() -> io::Result<Self> {
        let mut s = Self::new()?;
        s.found = Some(Vec::new());
        Ok(s)
    }

    /// Bytes spooled so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was spooled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Turns the spool into a reader of the tree's file bytes: every [`DataRef::Placed`] index
    /// this spool returned becomes [`DataRef::Tar`] with the file's offset in the spool, whose
    /// packed runs are laid out exactly as an uncompressed tar stores a file's data. Writers
    /// then treat a spooled tree like an indexed tar; `Placed` keeps meaning "written by this
    /// writer's own streaming placer" (the spool's indexes must never reach a writer).
    pub fn into_contents(self, tree: &mut Tree) -> io::Result<TarContents> {
        for n in &mut tree.nodes {
            if let NodeKind::File(f) = &mut n.kind {
                if let DataRef::Placed(i) = f.data {
                    let start = *self.starts.get(i as usize).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, format!("spooled file {i} unknown"))
                    })?;
                    if let Some(found) = self.found.as_ref().and_then(|v| v.get(i as usize)) {
                        *f = found.clone();
                        if matches!(f.data, DataRef::Placed(_)) {
                            f.data = DataRef::Tar(start);
                        }
                    } else {
                        f.data = DataRef::Tar(start);
                    }
                }
            }
        }
        Ok(TarContents::new(self.file))
    }
}

impl Placer for Spool {
    fn place(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        if self.found.is_some() {
            return self.place_sparse(file, data);
        }
        let start = self.len;
        let mut w = io::BufWriter::with_capacity(1 << 20, &self.file);
        let n = io::copy(data, &mut w)?;
        w.flush()?;
        drop(w);
        if n != file.stored_len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file data: expected {} bytes, got {n}", file.stored_len()),
            ));
        }
        self.len += n;
        let i = u32::try_from(self.starts.len())
            .map_err(|_| io::Error::other("more than 4 billion files"))?;
        self.starts.push(start);
        Ok(i)
    }
}

impl Spool {
    fn place_sparse(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        let start = self.len;
        let mut runs = NonzeroRuns::new(file.size);
        let mut buf = Vec::new();
        let mut w = io::BufWriter::with_capacity(1 << 20, &self.file);
        let mut n = 0u64;
        stream_blocks(file, data, &mut buf, 1 << 20, &mut |at, b| {
            for &(s, e) in runs.scan(at, b) {
                w.write_all(&b[s..e])?;
                n += (e - s) as u64;
            }
            Ok(())
        })?;
        w.flush()?;
        drop(w);
        self.len += n;
        let i = u32::try_from(self.starts.len())
            .map_err(|_| io::Error::other("more than 4 billion files"))?;
        self.starts.push(start);
        if let Some(found) = &mut self.found {
            found.push(runs.finish(DataRef::Placed(i)));
        }
        Ok(i)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kiln_formats::fstree::{Meta, Node, Segment};

    fn file_node(fd: FileData) -> Node {
        Node {
            kind: NodeKind::File(fd),
            meta: Meta::default(),
            slot: None,
        }
    }

    #[test]
    fn spooled_files_read_back_dense_and_sparse() {
        let mut s = Spool::new().unwrap();
        let dense = FileData::dense(5, DataRef::Empty);
        let i = s.place(&dense, &mut &b"hello"[..]).unwrap();
        // A sparse file: 3 bytes at 0, a hole, 4 bytes at 100; stored packed.
        let sparse = FileData {
            size: 104,
            data: DataRef::Empty,
            segments: Some(
                vec![
                    Segment { offset: 0, len: 3 },
                    Segment {
                        offset: 100,
                        len: 4,
                    },
                ]
                .into(),
            ),
        };
        let j = s.place(&sparse, &mut &b"abcWXYZ"[..]).unwrap();
        let mut tree = Tree::default();
        let m = Meta::default();
        let d = FileData {
            data: DataRef::Placed(i),
            ..dense.clone()
        };
        let sp = FileData {
            data: DataRef::Placed(j),
            ..sparse.clone()
        };
        tree.insert(b"/d", file_node(d), &m).unwrap();
        tree.insert(b"/s", file_node(sp), &m).unwrap();
        let c = s.into_contents(&mut tree).unwrap();
        let get = |p: &[u8]| match &tree.node(tree.resolve(p).unwrap()).kind {
            NodeKind::File(f) => f.clone(),
            _ => unreachable!(),
        };
        let (d, sp) = (get(b"/d"), get(b"/s"));
        assert!(
            matches!(d.data, DataRef::Tar(_)) && matches!(sp.data, DataRef::Tar(_)),
            "no spool index may reach a writer as Placed: {d:?} {sp:?}"
        );
        let mut buf = [0u8; 5];
        c.read_at(&d, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let mut b3 = [0u8; 3];
        c.read_at(&sp, 101, &mut b3).unwrap();
        assert_eq!(&b3, b"XYZ");
        c.read_at(&sp, 0, &mut b3).unwrap();
        assert_eq!(&b3, b"abc");
        c.read_at(&sp, 50, &mut b3).unwrap();
        assert_eq!(b3, [0; 3], "a hole reads as zeroes");
        // A short stream is an error, not a silently truncated file.
        let mut s2 = Spool::new().unwrap();
        assert!(s2
            .place(&FileData::dense(10, DataRef::Empty), &mut &b"short"[..])
            .is_err());
    }
}
