//! Read-only loop devices over files (linux/loop.h): a free device from /dev/loop-control, then
//! LOOP_CONFIGURE (Linux 5.8+) or, on older kernels, LOOP_SET_FD + LOOP_SET_STATUS64. No
//! autoclear: the device must outlive this process's file descriptor until it is mounted.

use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

const LOOP_SET_FD: u64 = 0x4C00;
const LOOP_SET_STATUS64: u64 = 0x4C04;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
/// lo_flags: read-only.
const LO_FLAGS_READ_ONLY: u32 = 1;
/// `struct loop_info64` (linux/loop.h), native byte order.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct LoopInfo64 {
    /// Out: device number of the backing file's filesystem.
    lo_device: u64,
    /// Out: inode of the backing file.
    lo_inode: u64,
    /// Out: device number of the loop device.
    lo_rdevice: u64,
    /// Byte offset into the backing file.
    lo_offset: u64,
    /// Bytes of the backing file to use (0: to its end).
    lo_sizelimit: u64,
    /// Out: loop device number.
    lo_number: u32,
    /// Obsolete encryption type (0).
    lo_encrypt_type: u32,
    /// Obsolete key size (0).
    lo_encrypt_key_size: u32,
    /// `LO_FLAGS_*` bits.
    lo_flags: u32,
    /// Backing file name for humans (`losetup -l`), NUL-terminated, truncated.
    lo_file_name: [u8; 64],
    /// Obsolete cipher name.
    lo_crypt_name: [u8; 64],
    /// Obsolete key.
    lo_encrypt_key: [u8; 32],
    /// Obsolete.
    lo_init: [u64; 2],
}
const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(offset_of!(LoopInfo64, lo_flags) == 52);
const _: () = assert!(offset_of!(LoopInfo64, lo_file_name) == 56);
const _: () = assert!(offset_of!(LoopInfo64, lo_init) == 216);

/// `struct loop_config` for `LOOP_CONFIGURE`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct LoopConfig {
    /// The backing file's descriptor.
    fd: u32,
    /// Logical block size (0: the default, 512).
    block_size: u32,
    /// Status to set, as with `LOOP_SET_STATUS64`.
    info: LoopInfo64,
    reserved: [u64; 8],
}
const _: () = assert!(size_of::<LoopConfig>() == 304);
const _: () = assert!(offset_of!(LoopConfig, info) == 8);
const _: () = assert!(offset_of!(LoopConfig, reserved) == 240);

fn info64(file: &str) -> LoopInfo64 {
    let mut info = LoopInfo64::new_zeroed();
    info.lo_flags = LO_FLAGS_READ_ONLY;
    let n = file.len().min(63);
    info.lo_file_name[..n].copy_from_slice(&file.as_bytes()[..n]);
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
    let mut cfg = LoopConfig::new_zeroed();
    cfg.fd = backing.as_raw_fd() as u32;
    cfg.info = info64(file);
    // SAFETY: cfg is a struct loop_config (layout pinned above); the kernel only reads it.
    let r = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE as _,
            std::ptr::from_ref(&cfg),
        )
    };
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
        // SAFETY: info is a struct loop_info64 (layout pinned above); the kernel only reads it.
        if unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                LOOP_SET_STATUS64 as _,
                std::ptr::from_ref(&info),
            )
        } != 0
        {
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
