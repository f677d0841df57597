//! Writing a composed image. Three destinations, one plan, identical bytes:
//!
//! - [`write_in_place`]: only the patched ranges are written into the base file, then
//!   `fdatasync`. Everything is validated before the first write.
//! - [`write_new_file`]: the base is cloned (`FICLONE` reflink where the filesystem shares
//!   extents), else copied extent by extent with `copy_file_range` (holes stay holes), into an
//!   [`AtomicFile`] beside the destination; the patches are written over it; then the file is
//!   renamed into place. An error leaves nothing under the destination name.
//! - [`write_stream`]: base bytes go to the output descriptor with `sendfile` (page-cache to
//!   pipe/socket/file without a user-space copy), falling back to 1 MiB read/write; patch bytes
//!   and zero fill are written in between.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kiln_tree::output::AtomicFile;

use crate::region::{PatchPlan, Segment};
use crate::{Error, Result};

const BUF: usize = 1 << 20;
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Writes every region of `plan` into `file` at its offset (regions only; the rest of the file
/// is untouched) and flushes the data to disk.
pub fn write_regions(file: &File, plan: &PatchPlan, place: &str) -> Result<()> {
    for r in plan.regions() {
        file.write_all_at(&r.data, r.offset)
            .map_err(|e| Error::io(format!("{place}: writing at offset {}", r.offset), e))?;
        let mut off = r.offset + r.data.len() as u64;
        while off < r.end() {
            let k = (r.end() - off).min(ZEROES.len() as u64) as usize;
            file.write_all_at(&ZEROES[..k], off)
                .map_err(|e| Error::io(format!("{place}: writing at offset {off}"), e))?;
            off += k as u64;
        }
    }
    Ok(())
}

/// Patches the image at `path` in place. The file must be exactly `plan.image_len()` bytes.
pub fn write_in_place(path: &Path, plan: &PatchPlan) -> Result<()> {
    let place = path.display().to_string();
    let f = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(&place, e))?;
    let len = f.metadata().map_err(|e| Error::io(&place, e))?.len();
    if len != plan.image_len() {
        return Err(Error::ImageSize {
            place,
            expected: plan.image_len(),
            actual: len,
        });
    }
    write_regions(&f, plan, &place)?;
    f.sync_data()
        .map_err(|e| Error::io(format!("{place}: fdatasync"), e))
}

/// Writes base + plan to a new file `dest` atomically. Returns how the base was copied.
pub fn write_new_file(
    base: &File,
    base_path: &Path,
    plan: &PatchPlan,
    dest: &Path,
) -> Result<CopyMethod> {
    let dplace = dest.display().to_string();
    let out = AtomicFile::create(dest).map_err(|e| Error::io(&dplace, e))?;
    let len = base
        .metadata()
        .map_err(|e| Error::io(base_path.display(), e))?
        .len();
    if len != plan.image_len() {
        return Err(Error::ImageSize {
            place: base_path.display().to_string(),
            expected: plan.image_len(),
            actual: len,
        });
    }
    let method = clone_or_copy(base, out.file(), len).map_err(|e| {
        Error::io(
            format!(
                "copying {} to {}",
                base_path.display(),
                out.tmp_path().display()
            ),
            e,
        )
    })?;
    write_regions(out.file(), plan, &dplace)?;
    out.commit().map_err(|e| Error::io(&dplace, e))?;
    Ok(method)
}

/// How a base was copied into a new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// Extents shared with `FICLONE` (btrfs, XFS): no data copied.
    Reflink,
    /// Data extents copied in the kernel with `copy_file_range`; holes kept.
    CopyFileRange,
    /// Read and written through a user-space buffer; holes kept.
    ReadWrite,
}

fn clone_or_copy(src: &File, dst: &File, len: u64) -> io::Result<CopyMethod> {
    if kiln_os::reflink(src, dst) {
        return Ok(CopyMethod::Reflink);
    }
    dst.set_len(len)?;
    let mut method = CopyMethod::CopyFileRange;
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = kiln_os::next_data(src, pos)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = kiln_os::next_hole(src, data)?.unwrap_or(len).min(len);
        if method == CopyMethod::CopyFileRange {
            match kiln_os::copy_range(src, data, dst, data, hole - data)? {
                kiln_os::Copied::All => {}
                kiln_os::Copied::Unsupported => method = CopyMethod::ReadWrite,
                kiln_os::Copied::Short(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("base ends at offset {} while copying", data + n),
                    ))
                }
            }
        }
        if method == CopyMethod::ReadWrite {
            copy_range_user(src, dst, data, hole)?;
        }
        pos = hole.max(data + 1);
    }
    Ok(method)
}

fn copy_range_user(src: &File, dst: &File, from: u64, to: u64) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    let mut off = from;
    while off < to {
        let k = (to - off).min(BUF as u64) as usize;
        src.read_exact_at(&mut buf[..k], off)?;
        dst.write_all_at(&buf[..k], off)?;
        off += k as u64;
    }
    Ok(())
}

/// Streams base + plan to `out` (any descriptor: pipe, socket, file, /dev/null). Base bytes
/// move with `sendfile` where the kernel supports it for `out`, else with read/write.
pub fn write_stream<W: Write + AsFd>(base: &File, plan: &PatchPlan, out: &mut W) -> io::Result<()> {
    let mut kernel = true;
    let mut buf: Vec<u8> = Vec::new();
    for seg in plan.segments(0..plan.image_len()) {
        match seg {
            Segment::Base { offset, len } => {
                let mut off = offset;
                let end = offset + len;
                if kernel {
                    out.flush()?;
                    match kiln_os::send_range(base, out.as_fd(), off, end)? {
                        kiln_os::Sent::All => continue,
                        kiln_os::Sent::Unsupported(at) => {
                            kernel = false;
                            off = at;
                        }
                    }
                }
                if buf.is_empty() {
                    buf = vec![0u8; BUF];
                }
                while off < end {
                    let k = (end - off).min(BUF as u64) as usize;
                    base.read_exact_at(&mut buf[..k], off)?;
                    out.write_all(&buf[..k])?;
                    off += k as u64;
                }
            }
            Segment::Data(b) => out.write_all(&b)?,
            Segment::Zero(mut n) => {
                while n > 0 {
                    let k = n.min(ZEROES.len() as u64) as usize;
                    out.write_all(&ZEROES[..k])?;
                    n -= k as u64;
                }
            }
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;
    use std::io::Read;

    #[test]
    fn three_outputs_agree_and_base_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let base_path = d.path().join("base.img");
        let mut base: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        base[1_000_000..2_000_000].fill(0);
        std::fs::write(&base_path, &base).unwrap();
        let plan = PatchPlan::new(
            base.len() as u64,
            vec![
                Region {
                    offset: 10,
                    len: 200_000,
                    data: vec![5u8; 150_000].into(),
                },
                Region::bytes(2_999_990, vec![1u8; 10]),
            ],
        )
        .unwrap();
        let mut want = base.clone();
        want[10..150_010].fill(5);
        want[150_010..200_010].fill(0);
        want[2_999_990..].fill(1);

        let f = File::open(&base_path).unwrap();
        let out = d.path().join("out.img");
        write_new_file(&f, &base_path, &plan, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), want);

        // Streaming into a regular file and into a pipe.
        let sf = d.path().join("stream.img");
        let mut w = File::create(&sf).unwrap();
        write_stream(&f, &plan, &mut w).unwrap();
        assert_eq!(std::fs::read(&sf).unwrap(), want);
        let (mut rd, mut wr) = std::io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            rd.read_to_end(&mut v).unwrap();
            v
        });
        let f2 = File::open(&base_path).unwrap();
        write_stream(&f2, &plan, &mut wr).unwrap();
        drop(wr);
        assert_eq!(reader.join().unwrap(), want);

        assert_eq!(std::fs::read(&base_path).unwrap(), base, "base untouched");
        write_in_place(&base_path, &plan).unwrap();
        assert_eq!(std::fs::read(&base_path).unwrap(), want);
    }
}
