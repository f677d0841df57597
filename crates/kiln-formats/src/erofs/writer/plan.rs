//! The entry point for indexed sources (directories, uncompressed tar files), whose file bytes
//! can be read in any order: [`plan`] validates the tree and sizes the image, [`Plan::write`]
//! runs the data pipeline over the files in tree order and then writes the metadata.

use super::data::{copy_ranges, copy_spans, DataCore, FileWrite};
use super::meta::MetaPrep;
use super::store::Store;
use super::{Compression, Error, Options, SizeEstimate, Summary, PIECE};
use crate::erofs::layout::*;
use crate::fstree::{Contents, NodeKind, Tree};
use crate::sink::Sink;

/// A planned image for an indexed tree.
pub struct Plan<'t> {
    tree: &'t Tree,
    opts: Options,
    meta: MetaPrep,
    estimate: SizeEstimate,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("estimate", &self.estimate)
            .finish()
    }
}

/// Plans an image of `tree`: validates everything that can be checked without file bytes
/// and sizes the image.
pub fn plan<'t>(tree: &'t Tree, opts: &Options) -> Result<Plan<'t>, Error> {
    opts.check()?;
    crate::erofs::check_file_sizes(tree)?;
    let meta = MetaPrep::new(tree, opts)?;
    let estimate = if opts.compression == Compression::None {
        // Lay the data out for real (no bytes needed) to get the exact size.
        let sink = crate::sink::MemSink::new(0);
        let mut core = DataCore::new(&sink, opts);
        for &id in &meta.files {
            let node = tree.node(id);
            if let NodeKind::File(f) = &node.kind {
                let (st, _) = core.layout_plain(f, node.slot.as_ref())?;
                core.set(id as usize, st);
            }
        }
        let data_end = core.next_block;
        let m = meta.layout(tree, &core.stores, data_end)?;
        SizeEstimate {
            bytes: m.total_blocks * BLOCK,
            exact: true,
        }
    } else {
        SizeEstimate {
            bytes: meta.bound(tree)?,
            exact: false,
        }
    };
    Ok(Plan {
        tree,
        opts: opts.clone(),
        meta,
        estimate,
    })
}

impl Plan<'_> {
    /// The image size (exact when uncompressed, an upper bound when compressed).
    pub fn size(&self) -> SizeEstimate {
        self.estimate
    }

    /// Writes the image into `sink` (which must read as zeroes and hold [`Plan::size`] bytes).
    /// `progress` is called with the bytes of file data written so far.
    pub fn write(
        &self,
        contents: &dyn Contents,
        sink: &dyn Sink,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Summary, Error> {
        if sink.len() < self.estimate.bytes {
            return Err(Error::NoRoom {
                need: self.estimate.bytes,
                have: sink.len(),
            });
        }
        let tree = self.tree;
        let mut core = DataCore::new(sink, &self.opts);
        let sizes: Vec<u64> = self
            .meta
            .files
            .iter()
            .filter_map(|&id| {
                let node = tree.node(id);
                match &node.kind {
                    NodeKind::File(f)
                        if f.size <= PIECE && core.batched(f, node.slot.is_some()) =>
                    {
                        Some(f.size)
                    }
                    _ => None,
                }
            })
            .collect();
        core.dedupe_sizes(sizes.into_iter());
        let done = std::sync::atomic::AtomicU64::new(0);
        let mut direct: Vec<FileWrite<'_>> = Vec::new();
        for &id in &self.meta.files {
            let node = tree.node(id);
            let NodeKind::File(f) = &node.kind else {
                continue;
            };
            if f.size == 0 && node.slot.is_none() {
                // No data: nothing to order, no batch to flush.
                core.set(id as usize, Store::Empty);
            } else if core.batched(f, node.slot.is_some()) {
                core.push_source(id as usize, f, contents)?;
                progress(done.fetch_add(f.size, std::sync::atomic::Ordering::Relaxed) + f.size);
            } else {
                if core.level.is_some() {
                    // Keep data in tree order: earlier batched files go first.
                    core.flush(contents)?;
                }
                let (st, writes) = core.layout_plain(f, node.slot.as_ref())?;
                core.set(id as usize, st);
                if core.level.is_some() {
                    copy_ranges(sink, contents, f, &writes)?;
                } else {
                    direct.extend(writes.into_iter().map(|w| (f, w)));
                }
            }
        }
        core.drain(contents)?;
        // Uncompressed data: every address is known, copy in parallel.
        direct.sort_by_key(|w| w.1 .0);
        copy_spans(sink, contents, &direct, &|n| {
            progress(done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n)
        })?;
        let data_end = core.next_block;
        let compressed_files = core.compressed_files;
        let (shared_files, shared_bytes) = core.shared();
        let stores = std::mem::take(&mut core.stores);
        let mut s = self
            .meta
            .write(tree, &stores, data_end, sink, Some(contents), &self.opts)?;
        s.compressed_files = compressed_files;
        s.shared_files = shared_files;
        s.shared_bytes = shared_bytes;
        Ok(s)
    }
}
