//! Read-only loop devices over files (linux/loop.h): a free device from /dev/loop-control, then
//! LOOP_CONFIGURE (Linux 5.8+) or, on older kernels, LOOP_SET_FD + LOOP_SET_STATUS64. No
//! autoclear: the device must outlive this process's file descriptor until it is mounted.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const LOOP_SET_FD: u64 = 0x4C00;
const LOOP_SET_STATUS64: u64 = 0x4C04;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
/// lo_flags: read-only.
const LO_FLAGS_READ_ONLY: u32 = 1;
/// Size of `struct loop_info64`.
const LOOP_INFO64_SIZE: usize = 232;
/// Offset of `lo_flags` in `struct loop_info64`.
const LO_FLAGS_OFFSET: usize = 52;
/// Offset of `lo_file_name` in `struct loop_info64`.
const LO_FILE_NAME_OFFSET: usize = 56;

fn info64(file: &str) -> [u8; LOOP_INFO64_SIZE] {
    let mut info = [0u8; LOOP_INFO64_SIZE];
    info[LO_FLAGS_OFFSET..LO_FLAGS_OFFSET + 4].copy_from_slice(&LO_FLAGS_READ_ONLY.to_ne_bytes());
    let n = file.len().min(63);
    info[LO_FILE_NAME_OFFSET..LO_FILE_NAME_OFFSET + n].copy_from_slice(&file.as_bytes()[..n]);
    info
}

/// Attaches `file` read-only to a free loop device; returns the device path and its number.
pub fn attach_readonly(file: &str) -> Result<(String, (u32, u32)), String> {
    use std::os::unix::fs::MetadataExt;
    let backing = std::fs::File::open(file).map_err(|e| format!("open {file}: {e}"))?;
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| format!("open /dev/loop-control (is the loop module loaded?): {e}"))?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    if n < 0 {
        return Err(format!(
            "find a free loop device: {}",
            std::io::Error::last_os_error()
        ));
    }
    let path = format!("/dev/loop{n}");
    // devtmpfs creates the node as the device is added; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let dev = loop {
        match std::fs::OpenOptions::new().read(true).open(&path) {
            Ok(f) => break f,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("open {path}: {e}")),
        }
    };
    let mut cfg = [0u8; 8 + LOOP_INFO64_SIZE + 64];
    cfg[0..4].copy_from_slice(&(backing.as_raw_fd() as u32).to_ne_bytes());
    cfg[8..8 + LOOP_INFO64_SIZE].copy_from_slice(&info64(file));
    // SAFETY: cfg is a struct loop_config; the kernel only reads it.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, cfg.as_ptr()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOTTY) {
            return Err(format!("configure {path} over {file}: {e}"));
        }
        // Older kernels: two steps.
        // SAFETY: LOOP_SET_FD takes the backing fd as its argument.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) } != 0 {
            return Err(format!(
                "attach {file} to {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let info = info64(file);
        // SAFETY: info is a struct loop_info64.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64 as _, info.as_ptr()) } != 0 {
            return Err(format!(
                "set {path} read-only: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let md = dev.metadata().map_err(|e| format!("stat {path}: {e}"))?;
    let rdev = md.rdev();
    Ok((path, (libc::major(rdev), libc::minor(rdev))))
}
