//! The data pipeline: [`DataCore`] writes regular files' data into the data region, in tree
//! (or stream arrival) order, from block 1 on. Compressed files go through batches (compressed
//! in `compress.rs` while the previous batch is placed here), may share an earlier file's
//! clusters (whole-file dedupe) or fall back to plain storage; slots, chunk-based (sparse) files
//! and uncompressed images are laid out plain and copied from the source or the stream. What
//! it leaves per file is a [`Store`], which the metadata side turns into inodes.

use std::collections::BTreeMap;
use std::io::Read;

use sha2::Digest;

use super::compress::{
    build_indexes, compress_batch, ext_blocks, flat_blocks, Batch, Job, JobData, UnitOut, ZExt,
};
use super::store::{chunk_blocks, chunk_plan, chunked, tail_inline, Store, Tail};
use super::{
    block_u32, blocks_of, read_source, write_sink, Compression, Error, Options, BATCH_BYTES,
    COPY_CHUNK, PIECE, UNIT,
};
use crate::erofs::layout::*;
use crate::fstree::{Contents, FileData, SlotReservation};
use crate::lz4;
use crate::sink::{AlignedBuf, Sink};

/// Writes file data into the data region, in order, compressing in parallel batches. While
/// one batch is compressed, the previous one is placed (written and indexed), so the cores
/// stay busy.
pub(super) struct DataCore<'s> {
    pub(super) sink: &'s dyn Sink,
    pub(super) level: Option<lz4::Level>,
    pcluster: usize,
    pub(super) next_block: u64,
    pending: Vec<Job>,
    pending_bytes: u64,
    /// Compressed, not yet placed.
    ready: Option<Batch>,
    pub(super) stores: Vec<Option<Store>>,
    building: BTreeMap<usize, Vec<ZExt>>,
    pub(super) compressed_files: u64,
    /// Whole-file dedupe, when enabled.
    dedupe: Option<Dedupe>,
    /// Placed bytes not yet written.
    stage: Stage,
}

/// Bytes of the data region gathered for one large aligned write. Placement moves forward
/// through the region, so consecutive pieces (compressed clusters, flat files) join here and
/// reach the sink in [`STAGE_BYTES`] writes, which a file sink sends around the page cache.
struct Stage {
    /// Allocated on first use (an uncompressed image never stages).
    buf: Option<AlignedBuf>,
    /// Image offset of `buf[0]`, always block-aligned.
    start: u64,
    /// Bytes of `buf` in use.
    filled: usize,
}

/// The size of a staged write.
const STAGE_BYTES: usize = 8 << 20;

/// Whole-file dedupe state: which files to hash, and the compressed files placed so far by
/// content.
struct Dedupe {
    /// Hash only files of these sizes (an indexed source knows every size up front and can
    /// skip files whose size is unique); `None` hashes every file (streams).
    sizes: Option<std::collections::HashSet<u64>>,
    /// Content digest (of the unit digests and the size) -> the store of its first copy.
    seen: std::collections::HashMap<[u8; 32], Store>,
    /// Files that share an earlier copy, and the bytes they did not store again.
    shared: u64,
    saved_bytes: u64,
}

impl<'s> DataCore<'s> {
    pub(super) fn new(sink: &'s dyn Sink, opts: &Options) -> Self {
        Self {
            sink,
            level: opts.compression.level(),
            pcluster: (opts.pcluster_blocks as u64 * BLOCK) as usize,
            next_block: 1,
            pending: Vec::new(),
            pending_bytes: 0,
            ready: None,
            stores: Vec::new(),
            building: BTreeMap::new(),
            compressed_files: 0,
            dedupe: (opts.dedupe && opts.compression != Compression::None).then(|| Dedupe {
                sizes: None,
                seen: Default::default(),
                shared: 0,
                saved_bytes: 0,
            }),
            stage: Stage {
                buf: None,
                start: 0,
                filled: 0,
            },
        }
    }

    /// Places `data` at image offset `at`. Pieces that continue the staged run (up to the end
    /// of its last block, which only the same allocation can share) join it; anything else
    /// writes the stage out first. Bytes of the stage past `filled` are left over from earlier
    /// runs: the gap before a piece is zeroed when the piece lands, and the rest of the last
    /// block when the stage is written, so gaps inside a block read as zeroes as the sink
    /// contract requires (zeroing all of the stage after each write cost as much as a copy of
    /// every compressed byte).
    fn put(&mut self, at: u64, data: &[u8]) -> Result<(), Error> {
        let end = self.stage.start + self.stage.filled as u64;
        let joins = self.stage.filled > 0 && at >= end && at / BLOCK <= end.div_ceil(BLOCK);
        if !joins {
            self.write_stage()?;
            self.stage.start = at / BLOCK * BLOCK;
        }
        let mut at = at;
        let mut data = data;
        while !data.is_empty() {
            let buf = self
                .stage
                .buf
                .get_or_insert_with(|| AlignedBuf::new(STAGE_BYTES));
            let from = (at - self.stage.start) as usize;
            if from >= buf.len() {
                // Full: write the whole blocks, carry the partial last one over.
                let whole = self.stage.filled / BLOCK as usize * BLOCK as usize;
                write_sink(self.sink, self.stage.start, &buf.bytes()[..whole])?;
                buf.bytes_mut().copy_within(whole..self.stage.filled, 0);
                self.stage.start += whole as u64;
                self.stage.filled -= whole;
                continue;
            }
            let n = data.len().min(buf.len() - from);
            let bytes = buf.bytes_mut();
            bytes[self.stage.filled..from].fill(0);
            bytes[from..from + n].copy_from_slice(&data[..n]);
            self.stage.filled = from + n;
            at += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes the staged bytes, up to the end of their last block.
    fn write_stage(&mut self) -> Result<(), Error> {
        if self.stage.filled == 0 {
            return Ok(());
        }
        if let Some(buf) = &mut self.stage.buf {
            let n = (self.stage.filled as u64).div_ceil(BLOCK) as usize * BLOCK as usize;
            buf.bytes_mut()[self.stage.filled..n].fill(0);
            write_sink(self.sink, self.stage.start, &buf.bytes()[..n])?;
        }
        self.stage.filled = 0;
        Ok(())
    }

    /// Limits hashing to files whose size occurs more than once among `sizes` (only a file
    /// with a twin of the same size can share its data).
    pub(super) fn dedupe_sizes(&mut self, sizes: impl Iterator<Item = u64>) {
        if let Some(d) = &mut self.dedupe {
            let mut count: std::collections::HashMap<u64, u32> = Default::default();
            for s in sizes {
                *count.entry(s).or_default() += 1;
            }
            d.sizes = Some(
                count
                    .into_iter()
                    .filter(|&(_, n)| n > 1)
                    .map(|(s, _)| s)
                    .collect(),
            );
        }
    }

    /// Files sharing an earlier copy, and the compressed bytes they did not store again.
    pub(super) fn shared(&self) -> (u64, u64) {
        self.dedupe
            .as_ref()
            .map_or((0, 0), |d| (d.shared, d.saved_bytes))
    }

    /// Whether a whole-file job of `size` bytes is hashed.
    pub(super) fn digest_for(&self, size: u64) -> bool {
        self.dedupe
            .as_ref()
            .is_some_and(|d| d.sizes.as_ref().is_none_or(|s| s.contains(&size)))
    }

    pub(super) fn set(&mut self, key: usize, store: Store) {
        if self.stores.len() <= key {
            self.stores.resize(key + 1, None);
        }
        self.stores[key] = Some(store);
    }

    fn alloc(&mut self, blocks: u64) -> u64 {
        let b = self.next_block;
        self.next_block += blocks;
        b
    }

    /// True when a file of this shape goes through compression batches.
    pub(super) fn batched(&self, file: &FileData, slot: bool) -> bool {
        self.level.is_some() && !slot && file.size > 0 && !chunked(true, file)
    }

    /// Adds a file whose bytes the pass reads from the source.
    pub(super) fn push_source(
        &mut self,
        key: usize,
        file: &FileData,
        contents: &dyn Contents,
    ) -> Result<(), Error> {
        let size = file.size;
        if size <= PIECE {
            self.push(
                Job {
                    key,
                    size,
                    start: 0,
                    len: size,
                    whole: true,
                    compress: size > BLOCK,
                    digest: size > BLOCK && self.digest_for(size),
                    data: JobData::Source(file.clone()),
                },
                contents,
            )?;
        } else {
            let mut start = 0;
            while start < size {
                let len = (size - start).min(PIECE);
                self.push(
                    Job {
                        key,
                        size,
                        start,
                        len,
                        whole: false,
                        compress: true,
                        digest: false,
                        data: JobData::Source(file.clone()),
                    },
                    contents,
                )?;
                start += len;
            }
        }
        Ok(())
    }

    pub(super) fn push(&mut self, job: Job, contents: &dyn Contents) -> Result<(), Error> {
        self.pending_bytes += job.len.max(BLOCK);
        self.pending.push(job);
        if self.pending_bytes >= BATCH_BYTES {
            self.advance(contents)?;
        }
        Ok(())
    }

    /// Compresses the pending jobs while the previously compressed batch is placed.
    fn advance(&mut self, contents: &dyn Contents) -> Result<(), Error> {
        let jobs = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let prev = self.ready.take();
        let level = self.level.unwrap_or(lz4::Level::Fast);
        let pcluster = self.pcluster;
        let (placed, next) = rayon::join(
            || prev.map_or(Ok(()), |b| self.place_batch(b)),
            || (!jobs.is_empty()).then(|| compress_batch(jobs, contents, level, pcluster)),
        );
        placed?;
        self.ready = next;
        Ok(())
    }

    /// Compresses and writes every pending job, in order.
    pub(super) fn flush(&mut self, contents: &dyn Contents) -> Result<(), Error> {
        if !self.pending.is_empty() {
            self.advance(contents)?;
        }
        match self.ready.take() {
            Some(b) => self.place_batch(b),
            None => Ok(()),
        }
    }

    /// Flushes, then writes out the staged bytes: after this every placed byte is in the sink.
    pub(super) fn drain(&mut self, contents: &dyn Contents) -> Result<(), Error> {
        self.flush(contents)?;
        self.write_stage()
    }

    /// Writes a compressed batch's jobs in order.
    fn place_batch(&mut self, batch: Batch) -> Result<(), Error> {
        let mut results = batch.units.into_iter();
        for job in batch.jobs {
            let nunits = job.len.div_ceil(UNIT) as usize;
            let mut outs = Vec::with_capacity(nunits);
            for _ in 0..nunits {
                match results.next() {
                    Some(r) => outs.push(r?),
                    None => {
                        return Err(Error::corrupt(job.start, "internal: unit results missing"))
                    }
                }
            }
            self.place_job(job, outs)?;
        }
        Ok(())
    }

    fn place_job(&mut self, job: Job, outs: Vec<UnitOut>) -> Result<(), Error> {
        // The file's content digest: over its units' digests and its size.
        let digest: Option<[u8; 32]> = outs
            .iter()
            .map(|o| o.digest)
            .collect::<Option<Vec<_>>>()
            .map(|ds| {
                let mut h = sha2::Sha256::new();
                h.update(job.size.to_le_bytes());
                for d in ds {
                    h.update(d);
                }
                h.finalize().into()
            });
        if let (Some(d), Some(dd)) = (&digest, &mut self.dedupe) {
            if let Some(st) = dd.seen.get(d) {
                if let Store::Compressed { blocks, .. } = st {
                    dd.saved_bytes += blocks * BLOCK;
                }
                dd.shared += 1;
                let st = st.clone();
                self.compressed_files += 1;
                self.set(job.key, st);
                return Ok(());
            }
        }
        if job.whole {
            let comp_blocks: Option<u64> =
                outs.iter().map(|o| o.exts.as_deref().map(ext_blocks)).sum();
            if comp_blocks.is_none_or(|c| c >= flat_blocks(job.size)) {
                let raws = outs
                    .into_iter()
                    .map(|o| o.raw)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Error::corrupt(job.start, "internal: unit bytes not kept"))?;
                return self.place_flat_mem(job.key, job.size, raws.into_iter());
            }
        }
        let mut base = job.start;
        let mut exts = self.building.remove(&job.key).unwrap_or_default();
        for o in outs {
            let Some(e) = o.exts else {
                return Err(Error::corrupt(
                    base,
                    "internal: uncompressed unit in a compressed file",
                ));
            };
            let mut pos = 0u64;
            for x in e {
                match &x.bytes {
                    Some(b) => {
                        let nb = blocks_of(b.len() as u64);
                        let blk = self.alloc(nb);
                        self.put(blk * BLOCK + nb * BLOCK - b.len() as u64, b)?;
                        exts.push(ZExt {
                            start: base + pos,
                            len: x.len,
                            plain: false,
                            blkaddr: block_u32(blk, "compressed data")?,
                            blocks: nb as u32,
                        });
                    }
                    None => {
                        let blk = self.alloc(1);
                        let r = o
                            .raw
                            .as_ref()
                            .and_then(|r| r.get(pos as usize..(pos + x.len) as usize))
                            .ok_or_else(|| {
                                Error::corrupt(pos, "internal: plain extent past unit")
                            })?;
                        self.put(blk * BLOCK, r)?;
                        exts.push(ZExt {
                            start: base + pos,
                            len: x.len,
                            plain: true,
                            blkaddr: block_u32(blk, "file data")?,
                            blocks: 1,
                        });
                    }
                }
                pos += x.len;
            }
            base += o.len;
        }
        if job.start + job.len >= job.size {
            let blocks = exts.iter().map(|e| u64::from(e.blocks)).sum();
            let indexes = build_indexes(job.size, &exts);
            self.compressed_files += 1;
            let store = Store::Compressed {
                size: job.size,
                indexes,
                blocks,
            };
            if let (Some(d), Some(dd)) = (digest, &mut self.dedupe) {
                dd.seen.insert(d, store.clone());
            }
            self.set(job.key, store);
        } else {
            self.building.insert(job.key, exts);
        }
        Ok(())
    }

    /// Stores a dense file flat from in-memory pieces (its full blocks in the data region, the
    /// tail inline or in one more block).
    fn place_flat_mem(
        &mut self,
        key: usize,
        size: u64,
        pieces: impl Iterator<Item = Vec<u8>>,
    ) -> Result<(), Error> {
        let inline = tail_inline(size);
        let full = size / BLOCK;
        let nblocks = full + u64::from(!size.is_multiple_of(BLOCK) && !inline);
        let blk = self.alloc(nblocks);
        let mut pos = 0u64;
        let mut tail = Vec::new();
        for p in pieces {
            let keep = if inline {
                (full * BLOCK).saturating_sub(pos).min(p.len() as u64) as usize
            } else {
                p.len()
            };
            if keep > 0 {
                self.put(blk * BLOCK + pos, &p[..keep])?;
            }
            tail.extend_from_slice(&p[keep..]);
            pos += p.len() as u64;
        }
        self.set(
            key,
            if size == 0 {
                Store::Empty
            } else {
                Store::Flat {
                    blkaddr: if nblocks == 0 { 0 } else { blk },
                    size,
                    tail: if inline {
                        Tail::Inline(Some(tail.into()))
                    } else {
                        Tail::InBlocks
                    },
                }
            },
        );
        Ok(())
    }

    /// Lays out a file stored uncompressed (slots, sparse files, uncompressed mode); returns
    /// the store and the data writes still to do as (image offset, logical offset, length).
    pub(super) fn layout_plain(
        &mut self,
        file: &FileData,
        slot: Option<&SlotReservation>,
    ) -> Result<(Store, Vec<Write>), Error> {
        let size = file.size;
        if let Some(s) = slot {
            let nb = blocks_of(s.capacity);
            let blk = self.alloc(nb);
            let writes = runs_within(file, 0, size, blk * BLOCK);
            return Ok((
                Store::Flat {
                    blkaddr: blk,
                    size,
                    tail: Tail::InBlocks,
                },
                writes,
            ));
        }
        if size == 0 {
            return Ok((Store::Empty, Vec::new()));
        }
        if let Some(segs) = &file.segments {
            let (cb, has) = chunk_plan(size, segs);
            let csize = BLOCK << cb;
            let mut map = Vec::with_capacity(has.len());
            let mut writes = Vec::new();
            for (c, h) in has.iter().enumerate() {
                if !h {
                    map.push(NULL_ADDR);
                    continue;
                }
                let c = c as u64;
                let blk = self.alloc(chunk_blocks(size, cb, c));
                map.push(block_u32(blk, "chunk")?);
                let end = ((c + 1) * csize).min(size);
                writes.extend(runs_within(file, c * csize, end, blk * BLOCK));
            }
            return Ok((
                Store::Chunked {
                    size,
                    chunkbits: cb,
                    map,
                },
                writes,
            ));
        }
        let inline = tail_inline(size);
        let full = size / BLOCK;
        let nb = full + u64::from(!size.is_multiple_of(BLOCK) && !inline);
        let blk = self.alloc(nb);
        let stored = if inline { full * BLOCK } else { size };
        let writes = if stored > 0 {
            vec![(blk * BLOCK, 0, stored)]
        } else {
            Vec::new()
        };
        Ok((
            Store::Flat {
                blkaddr: if nb == 0 { 0 } else { blk },
                size,
                tail: if inline {
                    Tail::Inline(None)
                } else {
                    Tail::InBlocks
                },
            },
            writes,
        ))
    }
}

/// A data copy: (image offset, logical offset in the file, length).
pub(super) type Write = (u64, u64, u64);

/// The parts of `file`'s data runs inside `[from, to)`, as writes relative to `image_base`
/// (which is where logical offset `from` lands).
fn runs_within(file: &FileData, from: u64, to: u64, image_base: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for r in file.runs() {
        let s = r.offset.max(from);
        let e = (r.offset + r.len).min(to);
        if s < e {
            out.push((image_base + (s - from), s, e - s));
        }
    }
    out
}

/// Copies logical ranges of a file from the source into the image.
pub(super) fn copy_ranges(
    sink: &dyn Sink,
    contents: &dyn Contents,
    file: &FileData,
    writes: &[(u64, u64, u64)],
) -> Result<(), Error> {
    let mut buf = vec![0u8; COPY_CHUNK.min(writes.iter().map(|w| w.2).max().unwrap_or(0) as usize)];
    for &(img, logical, len) in writes {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            read_source(contents, file, logical + done, &mut buf[..n])?;
            write_sink(sink, img + done, &buf[..n])?;
            done += n as u64;
        }
    }
    Ok(())
}

impl DataCore<'_> {
    /// Reads from a stream into the writes of a placed file (the stream yields the runs
    /// packed), through the stage.
    pub(super) fn copy_stream(
        &mut self,
        data: &mut dyn Read,
        writes: &[(u64, u64, u64)],
    ) -> Result<(), Error> {
        let mut buf =
            vec![0u8; COPY_CHUNK.min(writes.iter().map(|w| w.2).max().unwrap_or(0) as usize)];
        for &(img, _, len) in writes {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                data.read_exact(&mut buf[..n])
                    .map_err(|e| Error::io("reading stream data", e))?;
                self.put(img + done, &buf[..n])?;
                done += n as u64;
            }
        }
        Ok(())
    }
}

/// One data copy of [`copy_spans`]: the file and its write.
pub(super) type FileWrite<'t> = (&'t FileData, Write);

/// Copies file data whose image addresses are all known, in parallel, as aligned spans of up
/// to [`STAGE_BYTES`]: each span's files are read into one aligned buffer and written with one
/// call (which a file sink sends around the page cache). Spans never share a block, so the
/// parallel writes never overlap. `progress` gets the bytes copied by each span.
pub(super) fn copy_spans(
    sink: &dyn Sink,
    contents: &dyn Contents,
    writes: &[FileWrite<'_>],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), Error> {
    use rayon::prelude::*;
    // Cut the writes (in image order) into spans (block-aligned start, end). A write joins the
    // open span while there is room or while it shares the span's last block; one that runs
    // past the room is cut at a block boundary.
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &(_, (img, _, len)) in writes {
        let (mut s, e) = (img, img + len);
        while s < e {
            if let Some(last) = spans.last_mut() {
                let cap = (last.0 + STAGE_BYTES as u64).max(last.1.div_ceil(BLOCK) * BLOCK);
                if s < cap {
                    let t = e.min(cap);
                    last.1 = last.1.max(t);
                    s = t;
                    continue;
                }
            }
            let from = s / BLOCK * BLOCK;
            let t = e.min(from + STAGE_BYTES as u64);
            spans.push((from, t));
            s = t;
        }
    }
    let starts: Vec<u64> = writes.iter().map(|w| w.1 .0).collect();
    spans.par_iter().try_for_each_init(
        || AlignedBuf::new(0),
        |buf, &(from, to)| {
            let len = (to.div_ceil(BLOCK) * BLOCK - from) as usize;
            if buf.len() < len {
                *buf = AlignedBuf::new(len.max(STAGE_BYTES));
            }
            let bytes = &mut buf.bytes_mut()[..len];
            bytes.fill(0);
            // The writes overlapping [from, to).
            let first = starts.partition_point(|&st| st < from).saturating_sub(1);
            let mut copied = 0;
            for &(file, (img, logical, wlen)) in &writes[first..] {
                if img >= to {
                    break;
                }
                let s = img.max(from);
                let e = (img + wlen).min(to);
                if s >= e {
                    continue;
                }
                let at = (s - from) as usize;
                read_source(
                    contents,
                    file,
                    logical + (s - img),
                    &mut bytes[at..at + (e - s) as usize],
                )?;
                copied += e - s;
            }
            write_sink(sink, from, bytes)?;
            progress(copied);
            Ok(())
        },
    )
}
