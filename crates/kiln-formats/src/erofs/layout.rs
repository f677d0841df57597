//! EROFS on-disk structures (erofs-utils `include/erofs_fs.h`, Linux `fs/erofs/erofs_fs.h`).
//!
//! Everything is little-endian. The super block sits at byte 1024 of block 0; inodes live in the
//! metadata area starting at `meta_blkaddr` and are addressed by nid = byte offset / 32; a
//! directory's data is a series of blocks, each an array of [`Dirent`]s followed by the names
//! they point at, sorted by name across the whole directory (the kernel binary-searches first
//! over blocks, then within one).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Super block magic (`EROFS_SUPER_MAGIC_V1`).
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Byte offset of the super block in block 0.
pub const SUPER_OFFSET: u64 = 1024;
/// log2 of the block size kiln writes (4 KiB, the only size the Debian 6.1 kernel mounts on x86).
pub const BLKSZ_BITS: u8 = 12;
/// Block size in bytes.
pub const BLOCK: u64 = 1 << BLKSZ_BITS;
/// Inode slots are 32 bytes: nid = (offset of the inode - meta_blkaddr * BLOCK) / 32.
pub const ISLOT: u64 = 32;
/// Longest name a dirent can carry.
pub const NAME_LEN: usize = 255;
/// A block address meaning "no block": a hole in a chunk map (`EROFS_NULL_ADDR`).
pub const NULL_ADDR: u32 = u32::MAX;

/// `feature_compat`: the super block carries a crc32c checksum.
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x0000_0001;
/// `feature_incompat`: compressed data is aligned to the end of its physical cluster, zero
/// padded in front (lets the kernel decompress in place).
pub const FEATURE_INCOMPAT_LZ4_0PADDING: u32 = 0x0000_0001;
/// `feature_incompat`: per-algorithm configs follow the super block, and physical clusters may
/// span several blocks (kernel >= 5.13). Same bit as `COMPR_CFGS`.
pub const FEATURE_INCOMPAT_BIG_PCLUSTER: u32 = 0x0000_0002;
/// `feature_incompat`: chunk-based file layout (kernel >= 5.15); kiln uses it for sparse files.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;

/// `i_format` bit 0: 0 = compact 32-byte inode, 1 = extended 64-byte inode.
pub const I_VERSION_EXTENDED: u16 = 1;
/// `i_format` bits 1..=3 hold the data layout.
pub const I_DATALAYOUT_SHIFT: u16 = 1;

/// Data layouts (`i_format >> 1 & 7`).
pub mod datalayout {
    /// Data in contiguous blocks from `raw_blkaddr`, no tail packing.
    pub const FLAT_PLAIN: u8 = 0;
    /// Compressed, one 8-byte index per logical cluster ("full"/legacy indexes).
    pub const COMPRESSED_FULL: u8 = 1;
    /// Like `FLAT_PLAIN`, but the last partial block is stored right after the inode.
    pub const FLAT_INLINE: u8 = 2;
    /// Compressed with compacted indexes, 2 or 4 bytes per logical cluster (see
    /// [`crate::erofs::compact`]).
    pub const COMPRESSED_COMPACT: u8 = 3;
    /// A map of chunks; a hole is [`super::NULL_ADDR`].
    pub const CHUNK_BASED: u8 = 4;

    /// Either compressed layout.
    pub const fn is_compressed(layout: u8) -> bool {
        matches!(layout, COMPRESSED_FULL | COMPRESSED_COMPACT)
    }
}

/// `erofs_inode_chunk_info.format`: chunk size is `BLOCK << (format & 0x1f)`.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x001F;
/// `erofs_inode_chunk_info.format`: 8-byte chunk indexes instead of 4-byte block addresses.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x0020;

/// Xattr name prefix indexes (`EROFS_XATTR_INDEX_*`) and the prefixes they stand for.
pub const XATTR_PREFIXES: [(u8, &[u8]); 6] = [
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (1, b"user."),
    (4, b"trusted."),
    (5, b"lustre."),
    (6, b"security."),
];

/// Dirent file types (`EROFS_FT_*`).
pub mod ft {
    pub const UNKNOWN: u8 = 0;
    pub const REG_FILE: u8 = 1;
    pub const DIR: u8 = 2;
    pub const CHRDEV: u8 = 3;
    pub const BLKDEV: u8 = 4;
    pub const FIFO: u8 = 5;
    pub const SOCK: u8 = 6;
    pub const SYMLINK: u8 = 7;
}

/// Compression algorithm numbers (`Z_EROFS_COMPRESSION_*`).
pub const COMPRESSION_LZ4: u8 = 0;
/// Map header `h_advise`: big physical clusters for HEAD1 logical clusters; the first NONHEAD
/// logical cluster after a head then stores the pcluster's block count.
pub const ADVISE_BIG_PCLUSTER_1: u16 = 0x0002;
/// Logical cluster types (bits 0..=1 of `di_advise`).
pub mod lcluster {
    /// Stored uncompressed: one block holding the extent's bytes from its start.
    pub const PLAIN: u16 = 0;
    /// First logical cluster of a compressed extent (algorithm "head 1").
    pub const HEAD1: u16 = 1;
    /// A logical cluster inside an extent started earlier.
    pub const NONHEAD: u16 = 2;
}
/// In the first NONHEAD index after a head, `delta[0]` with this bit holds the pcluster's
/// compressed block count instead of the distance to the head.
pub const D0_CBLKCNT: u16 = 1 << 11;
/// Largest physical cluster the kernel accepts (`Z_EROFS_PCLUSTER_MAX_SIZE`), in bytes.
pub const PCLUSTER_MAX_SIZE: u64 = 1 << 20;

/// The super block: 128 bytes at byte 1024.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SuperBlock {
    /// [`MAGIC`].
    pub magic: U32,
    /// crc32c (raw, seed !0, no final inversion) of bytes 1024..4096 of block 0 with this field
    /// zeroed; only checked when `feature_compat` has [`FEATURE_COMPAT_SB_CHKSUM`].
    pub checksum: U32,
    /// Compatible feature bits.
    pub feature_compat: U32,
    /// log2 of the block size.
    pub blkszbits: u8,
    /// Extra 16-byte slots of super block beyond 128 bytes.
    pub sb_extslots: u8,
    /// nid of the root directory (so the root must live in the first 2 MiB of metadata).
    pub root_nid: U16,
    /// Number of inodes.
    pub inos: U64,
    /// Seconds since the epoch; the mtime of every compact inode.
    pub build_time: U64,
    /// Nanoseconds part of `build_time`.
    pub build_time_nsec: U32,
    /// Total blocks in the filesystem (image size / block size).
    pub blocks: U32,
    /// Block where the metadata area (nid 0) starts.
    pub meta_blkaddr: U32,
    /// Block where the shared xattr area starts (xattr id = byte offset / 4 from here).
    pub xattr_blkaddr: U32,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
    /// Volume label, NUL padded.
    pub volume_name: [u8; 16],
    /// Incompatible feature bits.
    pub feature_incompat: U32,
    /// With `COMPR_CFGS`: bitmap of compression algorithms whose configs follow the super
    /// block; otherwise the LZ4 max match distance.
    pub available_compr_algs: U16,
    /// Number of extra devices (multi-device images; 0).
    pub extra_devices: U16,
    /// Device table slot offset (0).
    pub devt_slotoff: U16,
    /// Reserved.
    pub reserved: [u8; 6],
    /// Reserved.
    pub reserved2: [u8; 32],
}
const _: () = assert!(size_of::<SuperBlock>() == 128);
const _: () = assert!(std::mem::offset_of!(SuperBlock, root_nid) == 14);
const _: () = assert!(std::mem::offset_of!(SuperBlock, uuid) == 48);
const _: () = assert!(std::mem::offset_of!(SuperBlock, feature_incompat) == 80);

/// LZ4 config that follows the super block (after a le16 length of 14) with `COMPR_CFGS`.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Lz4Cfgs {
    /// Largest match distance used, bytes (sizes the kernel's decompression window).
    pub max_distance: U16,
    /// Largest physical cluster, in blocks.
    pub max_pclusterblks: U16,
    /// Reserved.
    pub reserved: [u8; 10],
}
const _: () = assert!(size_of::<Lz4Cfgs>() == 14);

/// The 32-byte compact inode. Its mtime is the super block's `build_time`.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct InodeCompact {
    /// Bit 0: version (0 here); bits 1..=3: data layout.
    pub i_format: U16,
    /// 0 for no xattrs, else 1 + (xattr ibody size - 12) / 4.
    pub i_xattr_icount: U16,
    /// `st_mode`.
    pub i_mode: U16,
    /// Link count.
    pub i_nlink: U16,
    /// Size in bytes.
    pub i_size: U32,
    /// Reserved.
    pub i_reserved: U32,
    /// Layout-dependent: first data block, compressed block count, rdev, or chunk format.
    pub i_u: U32,
    /// Inode number for 32-bit `stat`.
    pub i_ino: U32,
    /// Owner uid.
    pub i_uid: U16,
    /// Owner gid.
    pub i_gid: U16,
    /// Reserved.
    pub i_reserved2: U32,
}
const _: () = assert!(size_of::<InodeCompact>() == 32);

/// The 64-byte extended inode: 32-bit ids, 64-bit size, its own mtime.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct InodeExtended {
    /// Bit 0: version (1 here); bits 1..=3: data layout.
    pub i_format: U16,
    /// As in [`InodeCompact`].
    pub i_xattr_icount: U16,
    /// `st_mode`.
    pub i_mode: U16,
    /// Reserved.
    pub i_reserved: U16,
    /// Size in bytes.
    pub i_size: U64,
    /// As in [`InodeCompact`].
    pub i_u: U32,
    /// Inode number for 32-bit `stat`.
    pub i_ino: U32,
    /// Owner uid.
    pub i_uid: U32,
    /// Owner gid.
    pub i_gid: U32,
    /// Modification time, seconds since the epoch (signed in practice).
    pub i_mtime: U64,
    /// Nanoseconds of `i_mtime`.
    pub i_mtime_nsec: U32,
    /// Link count.
    pub i_nlink: U32,
    /// Reserved.
    pub i_reserved2: [u8; 16],
}
const _: () = assert!(size_of::<InodeExtended>() == 64);

/// Header of the xattr area after an inode: then `h_shared_count` le32 shared xattr ids, then
/// inline [`XattrEntry`]s, each padded to 4 bytes.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrIbodyHeader {
    /// Reserved (a name filter in newer formats; 0 = no filter).
    pub h_reserved: U32,
    /// Number of shared xattr ids that follow the header.
    pub h_shared_count: u8,
    /// Reserved.
    pub h_reserved2: [u8; 7],
}
const _: () = assert!(size_of::<XattrIbodyHeader>() == 12);

/// One xattr (inline or shared): followed by the name suffix and the value, padded to 4.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrEntry {
    /// Length of the name after its prefix.
    pub e_name_len: u8,
    /// Prefix index ([`XATTR_PREFIXES`]).
    pub e_name_index: u8,
    /// Value length in bytes.
    pub e_value_size: U16,
}
const _: () = assert!(size_of::<XattrEntry>() == 4);

/// A directory entry: 12 bytes, names packed after the entry array of the block.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, packed)]
pub struct Dirent {
    /// nid of the inode named.
    pub nid: U64,
    /// Offset of the name in the block; the first entry's `nameoff / 12` is the entry count.
    pub nameoff: U16,
    /// [`ft`] file type.
    pub file_type: u8,
    /// Reserved.
    pub reserved: u8,
}
const _: () = assert!(size_of::<Dirent>() == 12);

/// Header before the indexes of a compressed inode (at the inode + xattrs, rounded up to 8).
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MapHeader {
    /// Reserved (fragment offset in newer formats).
    pub h_reserved1: U32,
    /// `ADVISE_*` bits.
    pub h_advise: U16,
    /// Bits 0..=3: algorithm of HEAD1 clusters; bits 4..=7: of HEAD2 clusters.
    pub h_algorithmtype: u8,
    /// Bits 0..=2: logical cluster bits - 12.
    pub h_clusterbits: u8,
}
const _: () = assert!(size_of::<MapHeader>() == 8);

/// A full (legacy) logical cluster index, one per 4 KiB of a compressed file's data.
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LclusterIndex {
    /// Bits 0..=1: [`lcluster`] type.
    pub di_advise: U16,
    /// HEAD/PLAIN: offset in this logical cluster where the extent starts.
    pub di_clusterofs: U16,
    /// HEAD/PLAIN: block address of the physical cluster. NONHEAD: `delta[0]` (low half:
    /// distance back to the head, or block count with [`D0_CBLKCNT`]) and `delta[1]` (high
    /// half: distance forward to the next head).
    pub di_u: U32,
}
const _: () = assert!(size_of::<LclusterIndex>() == 8);

/// Size of the map header in front of a compressed inode's indexes.
pub const MAP_HEADER: u64 = 8;

/// Offset of the first full index from the aligned end of inode + xattrs: the map header plus
/// 8 reserved bytes (`Z_EROFS_LEGACY_MAP_HEADER_SIZE`).
pub const FULL_INDEX_HEADER: u64 = 16;

/// Rounds `x` up to a multiple of `a` (a power of two).
pub const fn round_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// The `new_encode_dev` encoding the kernel reads from `i_u` of device inodes.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Inverse of [`encode_dev`].
pub fn decode_dev(v: u32) -> (u32, u32) {
    ((v & 0xfff00) >> 8, (v & 0xff) | ((v >> 12) & 0xfff00))
}

/// The super block checksum over bytes 1024..4096 of block 0 (checksum field zeroed).
pub fn sb_checksum(block0_from_1024: &[u8]) -> u32 {
    // The kernel calls crc32c(~0, ...) without the final inversion the crc32c crate applies.
    !crc32c::crc32c(block0_from_1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_encoding_round_trips() {
        for (ma, mi) in [(1, 3), (8, 0), (4000, 300_000), (0, 0), (4095, 0xfffff)] {
            assert_eq!(decode_dev(encode_dev(ma, mi)), (ma, mi));
        }
        assert_eq!(encode_dev(1, 3), 0x103);
    }
}
