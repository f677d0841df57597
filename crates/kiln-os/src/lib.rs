//! kiln's one OS boundary: every system call the libraries make beyond `std` —
//! `copy_file_range`, `FICLONE`, `SEEK_DATA`/`SEEK_HOLE`, `sendfile`, extended attributes,
//! `statvfs`, `sync_file_range`, `O_DIRECT` — behind safe functions with one error convention, so that
//! kiln-formats, kiln-tree, kiln-inject, kiln-build, kiln-ship and kiln-serve carry
//! `#![forbid(unsafe_code)]`.
//!
//! Built on rustix's safe wrappers. The single `unsafe` block left is `sync_file_range`, which
//! rustix does not wrap; it passes no memory to the kernel.

#![deny(unsafe_code)]

use std::fs::File;
use std::io;
use std::path::Path;

/// Why a kernel copy could not be used, so the caller falls back to read/write.
fn copy_unsupported(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    matches!(
        e,
        Errno::XDEV | Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP | Errno::BADF
    )
}

/// How far one [`copy_range`] call got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copied {
    /// The whole range.
    All,
    /// The source ended after this many bytes.
    Short(u64),
    /// The kernel or filesystem pair cannot copy; nothing was copied by this call.
    Unsupported,
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` with `copy_file_range`
/// (which shares extents where the filesystem can), in chunks of at most 1 GiB.
pub fn copy_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<Copied> {
    let mut done = 0u64;
    while done < len {
        let mut from = src_off + done;
        let mut to = dst_off + done;
        let want = (len - done).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), want) {
            Ok(0) => return Ok(Copied::Short(done)),
            Ok(n) => done += n as u64,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) if done == 0 && copy_unsupported(e) => return Ok(Copied::Unsupported),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Copied::All)
}

/// Makes `dst` share all of `src`'s extents (`FICLONE`, btrfs and XFS). `false` when the
/// filesystem cannot.
pub fn reflink(src: &File, dst: &File) -> bool {
    rustix::fs::ioctl_ficlone(dst, src).is_ok()
}

/// `lseek(SEEK_DATA)`: the next offset at or after `from` holding data, `None` past the last
/// data (ENXIO). Filesystems without hole reporting say everything is data.
pub fn next_data(f: &File, from: u64) -> io::Result<Option<u64>> {
    seek_or_none(f, rustix::fs::SeekFrom::Data(from))
}

/// `lseek(SEEK_HOLE)`: the next hole at or after `from` (the end of the file counts as one).
pub fn next_hole(f: &File, from: u64) -> io::Result<Option<u64>> {
    seek_or_none(f, rustix::fs::SeekFrom::Hole(from))
}

fn seek_or_none(f: &File, to: rustix::fs::SeekFrom) -> io::Result<Option<u64>> {
    match rustix::fs::seek(f, to) {
        Ok(o) => Ok(Some(o)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The data runs `(offset, len)` of the first `size` bytes of `f`, by `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_runs(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = next_data(f, pos)? else {
            break; // no more data: the rest is a hole
        };
        if data >= size {
            break;
        }
        let hole = next_hole(f, data)?.unwrap_or(size).min(size);
        if hole > data {
            runs.push((data, hole - data));
        }
        pos = hole.max(data + 1);
    }
    Ok(runs)
}

/// What a [`send_range`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// The whole range went out.
    All,
    /// `sendfile` cannot write to this descriptor; continue from this offset another way.
    Unsupported(u64),
}

/// Sends bytes `from..to` of `src` to `out` with `sendfile`.
pub fn send_range(
    src: &File,
    out: std::os::fd::BorrowedFd<'_>,
    from: u64,
    to: u64,
) -> io::Result<Sent> {
    use rustix::io::Errno;
    let mut off = from;
    while off < to {
        let mut o = off;
        let want = (to - off).min(1 << 30) as usize;
        match rustix::fs::sendfile(out, src, Some(&mut o), want) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("source ends at offset {off} while streaming"),
                ))
            }
            Ok(n) => off += n as u64,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) if off == from => {
                return Ok(Sent::Unsupported(off))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Sent::All)
}

/// One `sendfile` call for a non-blocking `out` (a socket): sends up to `want` bytes of `src`
/// from `*offset` and advances it by what went out. `WouldBlock` when the socket is full,
/// `Ok(0)` at the end of `src`.
pub fn send_some(
    src: &File,
    out: std::os::fd::BorrowedFd<'_>,
    offset: &mut u64,
    want: usize,
) -> io::Result<usize> {
    Ok(rustix::fs::sendfile(out, src, Some(offset), want)?)
}

/// Every extended attribute of `path`, not following a final symlink, as (name, value); an
/// empty list where the filesystem has none (ENOTSUP). Retries when the set changes between
/// the size query and the read.
pub fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use rustix::io::Errno;
    let names = loop {
        let n = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(m) => {
                buf.truncate(m);
                break buf;
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in an xattr name"))?;
        let value = loop {
            let n = rustix::fs::lgetxattr_query(path, cname.as_c_str())?;
            let mut v = vec![0u8; n];
            if n == 0 {
                break v;
            }
            match rustix::fs::lgetxattr(path, cname.as_c_str(), &mut v[..]) {
                Ok(m) => {
                    v.truncate(m);
                    break v;
                }
                Err(Errno::RANGE) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        out.push((name.to_vec(), value));
    }
    Ok(out)
}

/// Free and total bytes of the filesystem holding `path` (`statvfs`).
pub fn space(path: &Path) -> io::Result<(u64, u64)> {
    let s = rustix::fs::statvfs(path)?;
    Ok((s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize))
}

/// The major and minor numbers of a device number.
pub fn dev_numbers(rdev: u64) -> (u32, u32) {
    (rustix::fs::major(rdev), rustix::fs::minor(rdev))
}

/// A second descriptor for the file behind `file`, opened for writing with `O_DIRECT`, so
/// large aligned writes go to the device without passing through the page cache (on virtual
/// disks buffered writeback can be ten times slower than direct writes). `None` when the
/// system or the filesystem does not offer direct I/O (tmpfs before Linux 6.6, other systems):
/// the caller keeps writing through `file`.
#[cfg(target_os = "linux")]
pub fn open_direct(file: &File) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::open(
        path.as_str(),
        OFlags::WRONLY | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .map(File::from)
}

/// Not on this system.
#[cfg(not(target_os = "linux"))]
pub fn open_direct(_file: &File) -> Option<File> {
    None
}

/// Starts asynchronous writeback of every dirty page of `file` (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). A hint: errors surface at the final `fsync`, so none is reported.
#[cfg(target_os = "linux")]
pub fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor `file` keeps open; no memory is passed.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Not on this system.
#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_file: &File) {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn runs_copies_and_reflinks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", 1 << 20).unwrap();
        let runs = data_runs(&f, (1 << 20) + 4).unwrap();
        assert_eq!(runs.first().map(|r| r.0), Some(0));
        assert!(runs.iter().map(|r| r.1).sum::<u64>() >= 8);
        let q = d.path().join("copy");
        let g = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&q)
            .unwrap();
        assert!(matches!(
            copy_range(&f, 0, &g, 0, 4).unwrap(),
            Copied::All | Copied::Unsupported
        ));
        let mut b = [0u8; 4];
        if g.metadata().unwrap().len() == 4 {
            g.read_exact_at(&mut b, 0).unwrap();
            assert_eq!(&b, b"head");
        }
        assert!(matches!(
            copy_range(&f, (1 << 20) + 2, &g, 0, 100).unwrap(),
            Copied::Short(2) | Copied::Unsupported
        ));
        let (free, total) = space(d.path()).unwrap();
        assert!(total >= free && total > 0);
        let _ = reflink(&f, &g);
        assert_eq!(dev_numbers(rustix::fs::makedev(8, 3)), (8, 3));
        assert!(xattrs(&p).is_ok());
    }
}
