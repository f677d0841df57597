//! Device-mapper through its ioctls on /dev/mapper/control (linux/dm-ioctl.h): create a device,
//! load a one-target table, resume it — what `dmsetup create` and `veritysetup open` do, with
//! no userspace library.

use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// `struct dm_ioctl` (linux/dm-ioctl.h), in the kernel's native byte order: the header of
/// every device-mapper ioctl buffer.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct DmIoctl {
    /// Interface version (major, minor, patch) the caller speaks.
    version: [u32; 3],
    /// Total size of the buffer in bytes, header included.
    data_size: u32,
    /// Offset of the payload (target specs) from the start of the buffer.
    data_start: u32,
    /// Number of target specs in the payload.
    target_count: u32,
    /// Out: open count of the device.
    open_count: i32,
    /// `DM_*_FLAG` bits.
    flags: u32,
    /// Out: event number.
    event_nr: u32,
    padding: u32,
    /// Out: the device number, `huge_encode_dev` encoded.
    dev: u64,
    /// Device name, NUL-terminated.
    name: [u8; 128],
    /// Device UUID, NUL-terminated.
    uuid: [u8; 129],
    /// Start of the payload area inside the header (unused here).
    data: [u8; 7],
}
const _: () = assert!(size_of::<DmIoctl>() == 312);
const _: () = assert!(offset_of!(DmIoctl, data_size) == 12);
const _: () = assert!(offset_of!(DmIoctl, flags) == 28);
const _: () = assert!(offset_of!(DmIoctl, dev) == 40);
const _: () = assert!(offset_of!(DmIoctl, name) == 48);
const _: () = assert!(offset_of!(DmIoctl, uuid) == 176);

/// `struct dm_target_spec`: one target of a table, followed by its NUL-terminated parameter
/// string; `next` is the offset of the following spec from this one's start.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct DmTargetSpec {
    /// First sector (512 bytes) of the device this target maps.
    sector_start: u64,
    /// Sectors mapped.
    length: u64,
    /// Out: target status.
    status: i32,
    /// Offset of the next spec from the start of this one (8-byte aligned).
    next: u32,
    /// Target type (`verity`, `linear`), NUL-terminated.
    target_type: [u8; 16],
}
const _: () = assert!(size_of::<DmTargetSpec>() == 40);
const _: () = assert!(offset_of!(DmTargetSpec, next) == 20);
const _: () = assert!(offset_of!(DmTargetSpec, target_type) == 24);

/// Size of `struct dm_ioctl`.
const DM_IOCTL_SIZE: usize = size_of::<DmIoctl>();
/// Size of `struct dm_target_spec` (before its parameter string).
const DM_TARGET_SPEC_SIZE: usize = size_of::<DmTargetSpec>();
/// ioctl type byte of device-mapper.
const DM_IOCTL_TYPE: u64 = 0xfd;
/// Interface version kiln-init speaks (major 4 is the only one there has been).
const DM_VERSION: [u32; 3] = [4, 0, 0];
/// Table is read-only (dm-verity refuses writable tables).
const DM_READONLY_FLAG: u32 = 1 << 0;

const DM_DEV_CREATE_CMD: u64 = 3;
const DM_DEV_SUSPEND_CMD: u64 = 6;
const DM_TABLE_LOAD_CMD: u64 = 9;

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
const fn dm_ioctl_nr(cmd: u64) -> u64 {
    (3 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (DM_IOCTL_TYPE << 8) | cmd
}

/// Builds the ioctl buffer: a `struct dm_ioctl` header, then (for table loads) one
/// `struct dm_target_spec` with its NUL-terminated parameters, padded to 8 bytes.
fn buffer(name: &str, flags: u32, target: Option<(u64, &str, &str)>) -> Result<Vec<u8>, String> {
    if name.is_empty() || name.len() >= 128 {
        return Err(format!("device-mapper name {name:?} must be 1..127 bytes"));
    }
    let mut payload = Vec::new();
    let mut count = 0u32;
    if let Some((sectors, ttype, params)) = target {
        if ttype.len() >= 16 {
            return Err(format!("target type {ttype:?} too long"));
        }
        let len = DM_TARGET_SPEC_SIZE + params.len() + 1;
        let padded = len.div_ceil(8) * 8;
        let mut spec = DmTargetSpec {
            sector_start: 0,
            length: sectors,
            status: 0,
            next: padded as u32,
            target_type: [0; 16],
        };
        spec.target_type[..ttype.len()].copy_from_slice(ttype.as_bytes());
        payload.extend_from_slice(spec.as_bytes());
        payload.extend_from_slice(params.as_bytes());
        payload.resize(padded, 0);
        count = 1;
    }
    // Leave room for the kernel to write status back.
    let total = DM_IOCTL_SIZE + payload.len().max(4096);
    let mut h = DmIoctl::new_zeroed();
    h.version = DM_VERSION;
    h.data_size = total as u32;
    h.data_start = DM_IOCTL_SIZE as u32;
    h.target_count = count;
    h.flags = flags;
    h.name[..name.len()].copy_from_slice(name.as_bytes());
    let mut b = vec![0u8; total];
    b[..DM_IOCTL_SIZE].copy_from_slice(h.as_bytes());
    b[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(&payload);
    Ok(b)
}

fn call(ctl: &std::fs::File, cmd: u64, buf: &mut [u8], what: &str) -> Result<(), String> {
    // SAFETY: buf is a properly sized, writable dm_ioctl buffer whose data_size matches.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), dm_ioctl_nr(cmd) as _, buf.as_mut_ptr()) };
    if r != 0 {
        return Err(format!(
            "device-mapper {what}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Creates device `name` with one read-only target of `sectors` 512-byte sectors of type
/// `ttype` with `params`, activates it, and returns its (major, minor).
pub fn create_readonly(
    name: &str,
    sectors: u64,
    ttype: &str,
    params: &str,
) -> Result<(u32, u32), String> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(|e| format!("open /dev/mapper/control (is dm-mod loaded?): {e}"))?;
    let mut b = buffer(name, 0, None)?;
    call(&ctl, DM_DEV_CREATE_CMD, &mut b, &format!("create {name}"))?;
    let dev = DmIoctl::read_from_prefix(&b)
        .map_err(|_| "short dm reply")?
        .0
        .dev;
    // The kernel encodes dev_t as huge_encode_dev: minor low 8 bits, major, minor high bits.
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    let mut b = buffer(name, DM_READONLY_FLAG, Some((sectors, ttype, params)))?;
    call(
        &ctl,
        DM_TABLE_LOAD_CMD,
        &mut b,
        &format!("load {ttype} table into {name} ({params})"),
    )?;
    // DM_DEV_SUSPEND without DM_SUSPEND_FLAG resumes: the loaded table goes live.
    let mut b = buffer(name, 0, None)?;
    call(&ctl, DM_DEV_SUSPEND_CMD, &mut b, &format!("resume {name}"))?;
    Ok((major, minor))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // Values from linux/dm-ioctl.h as printed by a C program: DM_DEV_CREATE = 0xc138fd03.
        assert_eq!(dm_ioctl_nr(DM_DEV_CREATE_CMD), 0xc138_fd03);
        assert_eq!(dm_ioctl_nr(DM_TABLE_LOAD_CMD), 0xc138_fd09);
        assert_eq!(dm_ioctl_nr(DM_DEV_SUSPEND_CMD), 0xc138_fd06);
    }

    #[test]
    fn table_buffer_layout() {
        let b = buffer("root", DM_READONLY_FLAG, Some((2400, "verity", "1 a b"))).unwrap();
        assert_eq!(&b[0..4], &4u32.to_ne_bytes());
        assert_eq!(u32::from_ne_bytes(b[16..20].try_into().unwrap()), 312);
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(b[28..32].try_into().unwrap()), 1);
        assert_eq!(&b[48..53], b"root\0");
        let spec = &b[312..];
        assert_eq!(u64::from_ne_bytes(spec[8..16].try_into().unwrap()), 2400);
        assert_eq!(u32::from_ne_bytes(spec[20..24].try_into().unwrap()), 48);
        assert_eq!(&spec[24..31], b"verity\0");
        assert_eq!(&spec[40..46], b"1 a b\0");
        assert!(buffer(&"x".repeat(128), 0, None).is_err());
    }
}
