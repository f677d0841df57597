//! The entry point for once-read sources: [`StreamWriter`] is the [`Placer`] a tree reader
//! hands each file's bytes to as they arrive, and they enter the data pipeline in that order;
//! [`StreamWriter::finish`] adds the files that did not come from the stream (their bytes are
//! read from the source) and writes the metadata when the tree is complete.

use std::io::{self, Read};

use super::compress::{Job, JobData};
use super::data::{copy_ranges, DataCore};
use super::meta::{node_path, MetaPrep};
use super::store::{Store, Tail};
use super::{Error, Options, Summary, PIECE};
use crate::erofs::layout::*;
use crate::fstree::{Contents, DataRef, FileData, NodeKind, Placer, Tree};
use crate::sink::Sink;

/// Writes an image from a once-read source: implement [`Placer`] for the tree reader, then
/// [`StreamWriter::finish`] with the complete tree.
pub struct StreamWriter<'s> {
    core: DataCore<'s>,
    opts: Options,
    placed: usize,
}

impl std::fmt::Debug for StreamWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("placed", &self.placed)
            .finish()
    }
}

/// Contents reader for streams: placed data is already in the image.
struct NoContents;

impl Contents for NoContents {
    fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        crate::fstree::read_host_or_inline(file, offset, buf)
    }
}

impl<'s> StreamWriter<'s> {
    /// A writer into `sink` (zeroed, large enough for the image; trim it to
    /// [`Summary::size`] afterwards).
    pub fn new(opts: &Options, sink: &'s dyn Sink) -> Result<Self, Error> {
        opts.check()?;
        Ok(Self {
            core: DataCore::new(sink, opts),
            opts: opts.clone(),
            placed: 0,
        })
    }

    fn place_inner(&mut self, file: &FileData, data: &mut dyn Read) -> Result<u32, Error> {
        let key = self.placed;
        let index =
            u32::try_from(key).map_err(|_| Error::TooLarge("more than 2^32 files".into()))?;
        self.placed += 1;
        if file.size == 0 {
            self.core.set(key, Store::Empty);
        } else if self.core.batched(file, false) {
            // A sparse file compressed whole: its holes read as zeroes.
            let mut unpack;
            let data: &mut dyn Read = if file.segments.is_some() {
                unpack = crate::fstree::Unpack::new(file, data);
                &mut unpack
            } else {
                data
            };
            let size = file.size;
            let whole = size <= PIECE;
            let mut start = 0;
            while start < size {
                let len = (size - start).min(PIECE);
                let mut v = vec![0u8; len as usize];
                data.read_exact(&mut v).map_err(|e| {
                    Error::io(format!("reading stream data at file offset {start}"), e)
                })?;
                self.core.push(
                    Job {
                        key,
                        size,
                        start,
                        len,
                        whole,
                        compress: !whole || size > BLOCK,
                        digest: whole && size > BLOCK && self.core.digest_for(size),
                        data: JobData::Mem(v),
                    },
                    &NoContents,
                )?;
                start += len;
            }
        } else {
            self.core.flush(&NoContents)?;
            let (mut st, writes) = self.core.layout_plain(file, None)?;
            // The tail is not in the image yet: read it after the blocks and keep it.
            let stored: u64 = writes.iter().map(|w| w.2).sum();
            self.core.copy_stream(data, &writes)?;
            if let Store::Flat {
                size,
                tail: Tail::Inline(t),
                ..
            } = &mut st
            {
                let mut b = vec![0u8; (*size - stored) as usize];
                data.read_exact(&mut b)
                    .map_err(|e| Error::io("reading stream data (file tail)", e))?;
                *t = Some(b.into());
            }
            self.core.set(key, st);
        }
        Ok(index)
    }

    /// Writes the metadata for the complete `tree` (whose placed files carry
    /// [`DataRef::Placed`] indexes from this writer). Files with other data references (added
    /// after reading, e.g. by a build) are written now, from `contents`.
    pub fn finish(mut self, tree: &Tree, contents: &dyn Contents) -> Result<Summary, Error> {
        crate::erofs::check_file_sizes(tree)?;
        let meta = MetaPrep::new(tree, &self.opts)?;
        self.core.flush(contents)?;
        let placed = std::mem::take(&mut self.core.stores);
        let base = placed.len().max(self.placed);
        let mut by_node: Vec<Option<Store>> = vec![None; tree.nodes.len()];
        // First the placed files (already in the image), then the rest in tree order.
        for &id in &meta.files {
            let node = tree.node(id);
            let NodeKind::File(f) = &node.kind else {
                continue;
            };
            if let DataRef::Placed(i) = f.data {
                if let Some(s) = &node.slot {
                    return Err(Error::Slot {
                        name: s.name.clone(),
                        reason: "its data came from a stream; a slot must be a file the build adds"
                            .into(),
                    });
                }
                let st = placed.get(i as usize).cloned().flatten().ok_or_else(|| {
                    Error::Unsupported {
                        path: node_path(tree, id),
                        reason: format!("placed data index {i} was never written"),
                    }
                })?;
                by_node[id as usize] = Some(st);
            }
        }
        for &id in &meta.files {
            let node = tree.node(id);
            let NodeKind::File(f) = &node.kind else {
                continue;
            };
            if matches!(f.data, DataRef::Placed(_)) {
                continue;
            }
            let key = base + id as usize;
            if self.core.batched(f, node.slot.is_some()) {
                self.core.push_source(key, f, contents)?;
            } else {
                self.core.flush(contents)?;
                let (st, writes) = self.core.layout_plain(f, node.slot.as_ref())?;
                copy_ranges(self.core.sink, contents, f, &writes)?;
                self.core.set(key, st);
            }
        }
        self.core.drain(contents)?;
        for &id in &meta.files {
            if by_node[id as usize].is_none() {
                by_node[id as usize] = self.core.stores.get(base + id as usize).cloned().flatten();
            }
        }
        let data_end = self.core.next_block;
        let mut s = meta.write(
            tree,
            &by_node,
            data_end,
            self.core.sink,
            Some(contents),
            &self.opts,
        )?;
        s.compressed_files = self.core.compressed_files;
        (s.shared_files, s.shared_bytes) = self.core.shared();
        Ok(s)
    }
}

impl Placer for StreamWriter<'_> {
    fn place(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        crate::erofs::check_file_size(file.size)?;
        self.place_inner(file, data)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}
