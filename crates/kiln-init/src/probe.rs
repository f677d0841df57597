//! Recognising what is on a block device from its first bytes: filesystem magics (ext4, EROFS,
//! squashfs, ISO 9660, FAT), volume labels, and the dm-verity superblock (kernel
//! Documentation/admin-guide/device-mapper/verity.rst; SPECS.md "dm-verity"), plus the verity
//! table kiln-init loads.

use uuid::Uuid;

/// Bytes to read from the start of a device to recognise any of the formats below (the ISO 9660
/// primary volume descriptor lies at 32 KiB).
pub const PROBE_LEN: usize = 34 * 1024;

/// A filesystem kiln-init can mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    /// ext2/3/4 (superblock magic 0xEF53 at 1024 + 56).
    Ext4,
    /// EROFS (magic 0xE0F5E1E2 at 1024).
    Erofs,
    /// squashfs (`hsqs` at 0).
    Squashfs,
    /// ISO 9660 (`CD001` at 32769).
    Iso9660,
    /// FAT12/16/32 (boot signature and a `FAT` type string).
    Vfat,
}

impl FsType {
    /// The name `mount(2)` knows it by.
    pub fn mount_name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
            FsType::Squashfs => "squashfs",
            FsType::Iso9660 => "iso9660",
            FsType::Vfat => "vfat",
        }
    }
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Recognises a filesystem from the first [`PROBE_LEN`] bytes of a device.
pub fn detect_fs(head: &[u8]) -> Option<FsType> {
    if le32(head, 1024) == Some(0xE0F5_E1E2) {
        return Some(FsType::Erofs);
    }
    if le16(head, 1024 + 56) == Some(0xEF53) {
        return Some(FsType::Ext4);
    }
    if head.get(0..4) == Some(b"hsqs") {
        return Some(FsType::Squashfs);
    }
    if head.get(32769..32774) == Some(b"CD001") {
        return Some(FsType::Iso9660);
    }
    if le16(head, 510) == Some(0xAA55)
        && (head.get(54..57) == Some(b"FAT") || head.get(82..85) == Some(b"FAT"))
    {
        return Some(FsType::Vfat);
    }
    None
}

fn trimmed(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    s.trim_end_matches(['\0', ' ']).to_string()
}

/// The volume label and UUID (as blkid prints them) of a recognised filesystem, when it has
/// them: ISO 9660 volume identifier and creation-date UUID, ext4 label and UUID, FAT label and
/// serial number.
pub fn volume_ids(head: &[u8]) -> (Option<String>, Option<String>) {
    match detect_fs(head) {
        Some(FsType::Iso9660) => {
            let pvd = 32768;
            let label = head.get(pvd + 40..pvd + 72).map(trimmed);
            // blkid's UUID for ISO 9660: the volume modification date (16 digits
            // "YYYYMMDDHHMMSScc" at 830 of the descriptor), or the creation date at 813 when
            // the modification date is unset (all zero digits or blank).
            let date = |off: usize| {
                let d = std::str::from_utf8(head.get(pvd + off..pvd + off + 16)?).ok()?;
                if !d.bytes().all(|c| c.is_ascii_digit()) || d.bytes().all(|c| c == b'0') {
                    return None;
                }
                Some(format!(
                    "{}-{}-{}-{}-{}-{}-{}",
                    &d[0..4],
                    &d[4..6],
                    &d[6..8],
                    &d[8..10],
                    &d[10..12],
                    &d[12..14],
                    &d[14..16]
                ))
            };
            let uuid = date(830).or_else(|| date(813));
            (label.filter(|l| !l.is_empty()), uuid)
        }
        Some(FsType::Ext4) => {
            let sb = 1024;
            let label = head.get(sb + 120..sb + 136).map(trimmed);
            let uuid = head
                .get(sb + 104..sb + 120)
                .and_then(|u| <[u8; 16]>::try_from(u).ok())
                .map(|u| Uuid::from_bytes(u).to_string());
            (label.filter(|l| !l.is_empty()), uuid)
        }
        Some(FsType::Vfat) => {
            // FAT32 keeps the label at 71 and the serial at 67; FAT12/16 at 43 and 39.
            let (lab, ser) = if head.get(82..85) == Some(b"FAT") {
                (71, 67)
            } else {
                (43, 39)
            };
            let label = head.get(lab..lab + 11).map(trimmed);
            let uuid = le32(head, ser).map(|s| format!("{:04X}-{:04X}", s >> 16, s & 0xffff));
            (label.filter(|l| !l.is_empty() && l != "NO NAME"), uuid)
        }
        _ => (None, None),
    }
}

/// Whether a device with these first bytes is the medium `want` names: a volume label, or
/// `UUID=…` (compared case-insensitively).
pub fn medium_matches(head: &[u8], want: &str) -> bool {
    let (label, uuid) = volume_ids(head);
    match want.strip_prefix("UUID=") {
        Some(u) => uuid.is_some_and(|x| x.eq_ignore_ascii_case(u)),
        None => label.as_deref() == Some(want),
    }
}

/// A dm-verity superblock (format version 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VeritySuperblock {
    /// Hash type: 1 = salt before data (the normal format), 0 = Chrome OS.
    pub hash_type: u32,
    /// UUID of the hash device.
    pub uuid: Uuid,
    /// Hash algorithm name, e.g. `sha256`.
    pub algorithm: String,
    /// Data block size in bytes.
    pub data_block_size: u32,
    /// Hash block size in bytes.
    pub hash_block_size: u32,
    /// Number of data blocks the tree covers.
    pub data_blocks: u64,
    /// The salt.
    pub salt: Vec<u8>,
}

/// Parses the superblock at the start of a hash device.
pub fn parse_verity_superblock(b: &[u8]) -> Result<VeritySuperblock, String> {
    if b.get(0..8) != Some(b"verity\0\0") {
        return Err("no dm-verity superblock (\"verity\\0\\0\" magic) at offset 0".into());
    }
    let short = || "dm-verity superblock shorter than 512 bytes".to_string();
    let version = le32(b, 8).ok_or_else(short)?;
    if version != 1 {
        return Err(format!(
            "dm-verity superblock version {version}, expected 1"
        ));
    }
    let hash_type = le32(b, 12).ok_or_else(short)?;
    let uuid = b
        .get(16..32)
        .and_then(|u| Uuid::from_slice(u).ok())
        .ok_or_else(short)?;
    let algorithm = b.get(32..64).map(trimmed).ok_or_else(short)?;
    let data_block_size = le32(b, 64).ok_or_else(short)?;
    let hash_block_size = le32(b, 68).ok_or_else(short)?;
    let data_blocks = le64(b, 72).ok_or_else(short)?;
    let salt_size = le16(b, 80).ok_or_else(short)? as usize;
    if salt_size > 256 {
        return Err(format!("dm-verity salt size {salt_size} exceeds 256"));
    }
    let salt = b.get(88..88 + salt_size).ok_or_else(short)?.to_vec();
    for (name, v) in [("data", data_block_size), ("hash", hash_block_size)] {
        if !v.is_power_of_two() || !(512..=1 << 20).contains(&v) {
            return Err(format!(
                "dm-verity {name} block size {v} is not a power of two ≥ 512"
            ));
        }
    }
    if algorithm.is_empty()
        || !algorithm
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return Err(format!(
            "dm-verity algorithm {algorithm:?} is not a hash name"
        ));
    }
    Ok(VeritySuperblock {
        hash_type,
        uuid,
        algorithm,
        data_block_size,
        hash_block_size,
        data_blocks,
        salt,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The verity target's length in 512-byte sectors and its parameters
/// (`1 <data> <hash> <dbs> <hbs> <blocks> <hash_start> <alg> <roothash> <salt>`); the hash tree
/// starts at hash block 1 because block 0 holds the superblock.
pub fn verity_table(
    sb: &VeritySuperblock,
    data_dev: &str,
    hash_dev: &str,
    roothash: &[u8],
) -> (u64, String) {
    let sectors = sb.data_blocks * u64::from(sb.data_block_size / 512);
    let salt = if sb.salt.is_empty() {
        "-".to_string()
    } else {
        hex(&sb.salt)
    };
    let params = format!(
        "{} {data_dev} {hash_dev} {} {} {} 1 {} {} {salt}",
        sb.hash_type,
        sb.data_block_size,
        sb.hash_block_size,
        sb.data_blocks,
        sb.algorithm,
        hex(roothash)
    );
    (sectors, params)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn superblock() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..8].copy_from_slice(b"verity\0\0");
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..32].copy_from_slice(&[0x11; 16]);
        b[32..38].copy_from_slice(b"sha256");
        b[64..68].copy_from_slice(&4096u32.to_le_bytes());
        b[68..72].copy_from_slice(&4096u32.to_le_bytes());
        b[72..80].copy_from_slice(&300u64.to_le_bytes());
        b[80..82].copy_from_slice(&4u16.to_le_bytes());
        b[88..92].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        b
    }

    #[test]
    fn verity_superblock_and_table() {
        let sb = parse_verity_superblock(&superblock()).unwrap();
        assert_eq!(sb.data_blocks, 300);
        assert_eq!(sb.algorithm, "sha256");
        assert_eq!(sb.uuid.to_string(), "11111111-1111-1111-1111-111111111111");
        let (sectors, params) = verity_table(&sb, "254:1", "254:2", &[0xab; 32]);
        assert_eq!(sectors, 300 * 8);
        assert_eq!(
            params,
            format!(
                "1 254:1 254:2 4096 4096 300 1 sha256 {} deadbeef",
                "ab".repeat(32)
            )
        );
        let mut bad = superblock();
        bad[64..68].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse_verity_superblock(&bad)
            .unwrap_err()
            .contains("block size 1000"));
        assert!(parse_verity_superblock(&[0u8; 512])
            .unwrap_err()
            .contains("magic"));
        assert!(parse_verity_superblock(&superblock()[..40]).is_err());
    }

    #[test]
    fn filesystems_are_recognised() {
        let mut ext = vec![0u8; PROBE_LEN];
        ext[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        ext[1024 + 120..1024 + 124].copy_from_slice(b"root");
        ext[1024 + 104..1024 + 120].copy_from_slice(&[0xaa; 16]);
        assert_eq!(detect_fs(&ext), Some(FsType::Ext4));
        assert!(medium_matches(&ext, "root"));
        assert!(medium_matches(
            &ext,
            "UUID=AAAAAAAA-aaaa-aaaa-aaaa-aaaaaaaaaaaa"
        ));
        assert!(!medium_matches(&ext, "other"));
        let mut ero = vec![0u8; PROBE_LEN];
        ero[1024..1028].copy_from_slice(&0xE0F5E1E2u32.to_le_bytes());
        assert_eq!(detect_fs(&ero), Some(FsType::Erofs));
        let mut iso = vec![0u8; PROBE_LEN];
        iso[32769..32774].copy_from_slice(b"CD001");
        iso[32768 + 40..32768 + 72].copy_from_slice(format!("{:<32}", "KILN_LIVE").as_bytes());
        iso[32768 + 813..32768 + 829].copy_from_slice(b"2026112202150000");
        assert_eq!(detect_fs(&iso), Some(FsType::Iso9660));
        assert_eq!(
            volume_ids(&iso),
            (
                Some("KILN_LIVE".to_string()),
                Some("2026-11-22-02-15-00-00".to_string())
            )
        );
        assert!(medium_matches(&iso, "UUID=2026-11-22-02-15-00-00"));
        // A set modification date wins, as in blkid.
        iso[32768 + 830..32768 + 846].copy_from_slice(b"2031010100000000");
        assert!(medium_matches(&iso, "UUID=2031-01-01-00-00-00-00"));
        let mut fat = vec![0u8; PROBE_LEN];
        fat[510] = 0x55;
        fat[511] = 0xAA;
        fat[82..87].copy_from_slice(b"FAT32");
        fat[71..82].copy_from_slice(b"ESP        ");
        assert_eq!(detect_fs(&fat), Some(FsType::Vfat));
        assert!(medium_matches(&fat, "ESP"));
        assert_eq!(detect_fs(&vec![0u8; PROBE_LEN]), None);
        assert_eq!(detect_fs(&[]), None);
    }
}
