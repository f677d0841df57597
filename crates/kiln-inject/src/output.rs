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
use std::os::fd::AsRawFd;
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

/// Linux `FICLONE` = `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

fn clone_or_copy(src: &File, dst: &File, len: u64) -> io::Result<CopyMethod> {
    // SAFETY: both descriptors are open for the duration of the call; FICLONE takes the source
    // descriptor as its argument and touches no user memory.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        return Ok(CopyMethod::Reflink);
    }
    dst.set_len(len)?;
    let mut method = CopyMethod::CopyFileRange;
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek_data(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = seek_data(src, data, libc::SEEK_HOLE)?
            .unwrap_or(len)
            .min(len);
        if method == CopyMethod::CopyFileRange && !copy_range_kernel(src, dst, data, hole)? {
            method = CopyMethod::ReadWrite;
        }
        if method == CopyMethod::ReadWrite {
            copy_range_user(src, dst, data, hole)?;
        }
        pos = hole;
    }
    Ok(method)
}

/// `lseek(SEEK_DATA|SEEK_HOLE)`; `None` when there is no more data (ENXIO). Filesystems
/// without hole reporting treat the whole file as data, which is still correct.
fn seek_data(f: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(from) = libc::off_t::try_from(from) else {
        return Ok(None);
    };
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Copies `[from, to)` with copy_file_range; `Ok(false)` if the kernel or filesystem cannot
/// (nothing was copied then for this call's first chunk, so the caller falls back).
fn copy_range_kernel(src: &File, dst: &File, from: u64, to: u64) -> io::Result<bool> {
    let mut off = from;
    while off < to {
        let mut in_off = off as libc::loff_t;
        let mut out_off = off as libc::loff_t;
        let want = (to - off).min(1 << 30) as usize;
        // SAFETY: the offset pointers point at live locals; descriptors are open.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut in_off,
                dst.as_raw_fd(),
                &mut out_off,
                want,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
                    if off == from =>
                {
                    return Ok(false)
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("base ends at offset {off} while copying"),
            ));
        }
        off += n as u64;
    }
    Ok(true)
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
pub fn write_stream<W: Write + AsRawFd>(
    base: &File,
    plan: &PatchPlan,
    out: &mut W,
) -> io::Result<()> {
    let mut kernel = true;
    let mut buf: Vec<u8> = Vec::new();
    for seg in plan.segments(0..plan.image_len()) {
        match seg {
            Segment::Base { offset, len } => {
                let mut off = offset;
                let end = offset + len;
                if kernel {
                    out.flush()?;
                    match sendfile_range(base, out.as_raw_fd(), off, end)? {
                        Sent::All => continue,
                        Sent::Unsupported(at) => {
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

enum Sent {
    All,
    /// sendfile cannot write to this descriptor; continue from this offset another way.
    Unsupported(u64),
}

fn sendfile_range(base: &File, out_fd: libc::c_int, from: u64, to: u64) -> io::Result<Sent> {
    let mut off = from;
    while off < to {
        let mut o = off as libc::off_t;
        let want = (to - off).min(1 << 30) as usize;
        // SAFETY: `o` is a live local; both descriptors are open.
        let n = unsafe { libc::sendfile(out_fd, base.as_raw_fd(), &mut o, want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN) => continue,
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) if off == from => {
                    return Ok(Sent::Unsupported(off))
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("base ends at offset {off} while streaming"),
            ));
        }
        off += n as u64;
    }
    Ok(Sent::All)
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
