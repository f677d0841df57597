//! Metadata checksums (kernel Documentation/filesystems/ext4/checksums.rst).
//!
//! ext4 uses the raw crc32c register: seeded, without the final inversion of the standard
//! CRC-32C. Every per-inode structure (extent blocks, directory blocks) is seeded with the
//! inode seed `crc(crc(fs_seed, ino), generation)`, where `fs_seed = crc(~0, uuid)`.

/// Continues a raw (uninverted) crc32c register over `data`.
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    // The crc32c crate inverts on entry and exit (standard CRC-32C); undo both.
    !crc32c::crc32c_append(!seed, data)
}

/// The filesystem checksum seed: crc32c of the UUID seeded with ~0.
pub fn fs_seed(uuid: &[u8; 16]) -> u32 {
    crc32c_raw(!0, uuid)
}

/// The seed for structures belonging to inode `ino` with generation `gen`.
pub fn inode_seed(fs_seed: u32, ino: u32, gen: u32) -> u32 {
    let c = crc32c_raw(fs_seed, &ino.to_le_bytes());
    crc32c_raw(c, &gen.to_le_bytes())
}

/// Checksum of a 1024-byte superblock (`s_checksum` covers the bytes before it).
pub fn superblock(sb: &[u8]) -> u32 {
    crc32c_raw(!0, &sb[..1020])
}

/// Checksum of a 64-byte group descriptor (16 bits stored), field at 0x1E treated as zero.
pub fn group_desc(fs_seed: u32, group: u32, desc: &[u8; 64]) -> u16 {
    let mut c = crc32c_raw(fs_seed, &group.to_le_bytes());
    c = crc32c_raw(c, &desc[..0x1E]);
    c = crc32c_raw(c, &[0, 0]);
    c = crc32c_raw(c, &desc[0x20..]);
    (c & 0xFFFF) as u16
}

/// Checksum of a bitmap: the first `bytes` bytes of the bitmap block.
pub fn bitmap(fs_seed: u32, bitmap: &[u8]) -> u32 {
    crc32c_raw(fs_seed, bitmap)
}

/// Checksum of a 256-byte inode, with both checksum fields treated as zero.
pub fn inode(fs_seed: u32, ino: u32, raw: &[u8; 256]) -> u32 {
    let gen = u32::from_le_bytes([raw[0x64], raw[0x65], raw[0x66], raw[0x67]]);
    let mut c = inode_seed(fs_seed, ino, gen);
    c = crc32c_raw(c, &raw[..0x7C]);
    c = crc32c_raw(c, &[0, 0]);
    c = crc32c_raw(c, &raw[0x7E..0x82]);
    let extra = u16::from_le_bytes([raw[0x80], raw[0x81]]);
    if extra >= 4 {
        c = crc32c_raw(c, &[0, 0]);
        c = crc32c_raw(c, &raw[0x84..]);
    } else {
        c = crc32c_raw(c, &raw[0x82..]);
    }
    c
}

/// Stores the checksum of a 256-byte inode into it (low half always, high half when the
/// extra fields cover it).
pub fn set_inode(fs_seed: u32, ino: u32, raw: &mut [u8; 256]) {
    let c = inode(fs_seed, ino, raw);
    raw[0x7C..0x7E].copy_from_slice(&((c & 0xFFFF) as u16).to_le_bytes());
    let extra = u16::from_le_bytes([raw[0x80], raw[0x81]]);
    if extra >= 4 {
        raw[0x82..0x84].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
    }
}

/// The checksum an inode claims.
pub fn stored_inode(raw: &[u8; 256]) -> u32 {
    let lo = u32::from(u16::from_le_bytes([raw[0x7C], raw[0x7D]]));
    let extra = u16::from_le_bytes([raw[0x80], raw[0x81]]);
    if extra >= 4 {
        lo | u32::from(u16::from_le_bytes([raw[0x82], raw[0x83]])) << 16
    } else {
        lo
    }
}

/// Checksum of an extended attribute block at `block` (the checksum field treated as zero).
pub fn xattr_block(fs_seed: u32, block: u64, data: &[u8]) -> u32 {
    let mut c = crc32c_raw(fs_seed, &block.to_le_bytes());
    c = crc32c_raw(c, &data[..16]);
    c = crc32c_raw(c, &[0; 4]);
    crc32c_raw(c, &data[20..])
}

/// Checksum of a jbd2 superblock (v2/v3 checksums), field at 0xFC treated as zero.
pub fn journal_superblock(jsb: &[u8]) -> u32 {
    let mut c = crc32c_raw(!0, &jsb[..0xFC]);
    c = crc32c_raw(c, &[0; 4]);
    crc32c_raw(c, &jsb[0x100..1024])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn raw_register_matches_standard_crc32c() {
        // Standard CRC-32C of "123456789" is 0xE3069283; the raw register is its inverse.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
        // Chaining equals one pass.
        let a = crc32c_raw(7, b"hello ");
        assert_eq!(crc32c_raw(a, b"world"), crc32c_raw(7, b"hello world"));
    }
}
