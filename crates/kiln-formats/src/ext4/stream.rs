//! Writing from a one-pass source: file data goes to the sink as it arrives, in arrival
//! order, through the same allocator [`super::plan`] uses; the metadata is laid out once the
//! tree is complete. For a `tar --sort=name` stream arrival order is the canonical tree order,
//! so the image equals the one made from the extracted directory.

use std::io::{self, Read};

use super::alloc::Full;
use super::layout::BLOCK_SIZE;
use super::plan::{alloc_runs, append_run, block_runs, limit_blocks, plan_with, DataState};
use super::write::{copy_file, CopyErr, CHUNK};
use super::{Options, Progress, Report, Result};
use crate::fstree::{nonzero_ranges, stream_blocks, Contents, FileData, Placer, Tree};
use crate::sink::Sink;

/// A [`Placer`] that writes file data straight into an ext4 image being built.
pub struct StreamWriter<'a> {
    opts: Options,
    sink: &'a dyn Sink,
    data: DataState,
    buf: Vec<u8>,
    progress: Progress<'a>,
}

impl<'a> StreamWriter<'a> {
    /// Starts an image on `sink`. With [`super::Size::Fixed`] data that overflows the size is
    /// refused as it arrives; with [`super::Size::Minimize`] the sink's length bounds it.
    pub fn new(opts: &Options, sink: &'a dyn Sink) -> Result<Self> {
        if opts.layout == super::Layout::Stable {
            return Err(super::Error::Layout(
                "a one-pass stream places data as it arrives; give a directory or an indexed archive",
            ));
        }
        let limit = limit_blocks(opts)?.min(sink.len() / super::layout::BLOCK_SIZE);
        Ok(Self {
            opts: opts.clone(),
            sink,
            data: DataState::new(limit),
            buf: Vec::new(),
            progress: &|_| {},
        })
    }

    /// Reports copied file bytes to `progress`.
    pub fn with_progress(mut self, progress: Progress<'a>) -> Self {
        self.progress = progress;
        self
    }

    /// Lays out and writes the metadata for the finished `tree` (whose placed files carry
    /// [`crate::fstree::DataRef::Placed`] indexes from this writer), plus the data of any
    /// file that was not streamed (read through `contents`).
    pub fn finish(self, tree: &Tree, contents: &dyn Contents) -> Result<Report> {
        let plan = plan_with(tree, &self.opts, self.data)?;
        plan.write_with_progress(tree, contents, self.sink, self.progress)
    }

    fn full(&self) -> io::Error {
        io::Error::other(match self.opts.size {
            super::Size::Fixed(b) => {
                format!("image full: file data alone exceeds the {b}-byte filesystem size")
            }
            super::Size::Minimize { .. } => format!(
                "image full: file data exceeds the {}-byte output limit",
                self.sink.len()
            ),
        })
    }
}

impl StreamWriter<'_> {
    /// Places a file whose all-zero blocks become holes: each chunk is scanned as it arrives
    /// and only its non-zero blocks are allocated (with [`append_run`], so the extents equal
    /// those the plan gives the same file with its holes found beforehand) and written.
    fn place_sparse(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        block_runs(file).map_err(io::Error::other)?;
        let first = self.data.extents.len();
        let mut buf = std::mem::take(&mut self.buf);
        let mut ranges = Vec::new();
        let mut full = false;
        let (sink, progress) = (self.sink, self.progress);
        let alloc = &mut self.data.alloc;
        let extents = &mut self.data.extents;
        let r = stream_blocks(file, data, &mut buf, CHUNK, &mut |at, b| {
            nonzero_ranges(b, &mut ranges);
            for &(s, e) in &ranges {
                let lb = (at + s as u64) / BLOCK_SIZE;
                let nb = (e - s).div_ceil(BLOCK_SIZE as usize) as u64;
                let mut werr = Ok(());
                let mut put = |l: u64, p: u64, n: u64| {
                    let from = (l * BLOCK_SIZE - at) as usize;
                    let to = (from + (n * BLOCK_SIZE) as usize).min(e);
                    if werr.is_ok() {
                        let off = p * BLOCK_SIZE;
                        werr = sink.write_at(off, &b[from..to]).map_err(|err| {
                            io::Error::new(
                                err.kind(),
                                format!("writing the image at byte {off}: {err}"),
                            )
                        });
                    }
                };
                if append_run(alloc, extents, first, lb, nb, &mut put).is_err() {
                    full = true;
                    return Err(io::Error::other("image full"));
                }
                werr?;
            }
            progress(b.len() as u64);
            Ok(())
        });
        self.buf = buf;
        if full {
            return Err(self.full());
        }
        r?;
        let idx = u32::try_from(self.data.placed.len()).map_err(io::Error::other)?;
        let count = (self.data.extents.len() - first) as u32;
        self.data.placed.push(Some((first as u32, count)));
        Ok(idx)
    }
}

impl Placer for StreamWriter<'_> {
    fn place(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        if self.opts.zero_holes {
            return self.place_sparse(file, data);
        }
        let runs = block_runs(file).map_err(io::Error::other)?;
        let (start, count) = match alloc_runs(&mut self.data.alloc, &runs, &mut self.data.extents) {
            Ok(r) => r,
            Err(Full) => return Err(self.full()),
        };
        let exts = &self.data.extents[start as usize..(start + count) as usize];
        let mut read = |_off: u64, b: &mut [u8]| data.read_exact(b);
        copy_file(
            file,
            exts,
            self.sink,
            &mut self.buf,
            &mut read,
            self.progress,
        )
        .map_err(|e| match e {
            CopyErr::Read(e) => e,
            CopyErr::Write(off, e) => {
                io::Error::new(e.kind(), format!("writing the image at byte {off}: {e}"))
            }
        })?;
        // Whatever the source still has for this entry (it must be nothing) is not ours.
        let idx = u32::try_from(self.data.placed.len()).map_err(io::Error::other)?;
        self.data.placed.push(Some((start, count)));
        Ok(idx)
    }

    fn discard(&mut self, index: u32) {
        if let Some(slot) = self.data.placed.get_mut(index as usize) {
            if let Some((s, n)) = slot.take() {
                for e in &self.data.extents[s as usize..(s + n) as usize] {
                    self.data.alloc.free(e.pblk, u64::from(e.len));
                }
            }
        }
    }
}
