//! Device-mapper through its ioctls on /dev/mapper/control (linux/dm-ioctl.h): create a device,
//! load a one-target table, resume it — what `dmsetup create` and `veritysetup open` do, with
//! no userspace library.

use std::os::fd::AsRawFd;

/// Size of `struct dm_ioctl`.
const DM_IOCTL_SIZE: usize = 312;
/// Size of `struct dm_target_spec` (before its parameter string).
const DM_TARGET_SPEC_SIZE: usize = 40;
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
        payload.resize(padded, 0);
        payload[0..8].copy_from_slice(&0u64.to_ne_bytes()); // sector_start
        payload[8..16].copy_from_slice(&sectors.to_ne_bytes()); // length
        payload[20..24].copy_from_slice(&(padded as u32).to_ne_bytes()); // next
        payload[24..24 + ttype.len()].copy_from_slice(ttype.as_bytes());
        payload[40..40 + params.len()].copy_from_slice(params.as_bytes());
        count = 1;
    }
    // Leave room for the kernel to write status back.
    let total = DM_IOCTL_SIZE + payload.len().max(4096);
    let mut b = vec![0u8; total];
    for (i, v) in DM_VERSION.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b[12..16].copy_from_slice(&(total as u32).to_ne_bytes()); // data_size
    b[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes()); // data_start
    b[20..24].copy_from_slice(&count.to_ne_bytes()); // target_count
    b[28..32].copy_from_slice(&flags.to_ne_bytes()); // flags
    b[48..48 + name.len()].copy_from_slice(name.as_bytes()); // name[128]
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
    let dev = u64::from_ne_bytes(b[40..48].try_into().map_err(|_| "short dm reply")?);
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
