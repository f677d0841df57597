//! ext4 on-disk structures and constants.
//!
//! Sources: kernel `Documentation/filesystems/ext4/` (superblock.rst, group_descr.rst,
//! inodes.rst, ifork.rst, directory.rst, attributes.rst, journal.rst) and e2fsprogs
//! `lib/ext2fs/ext2_fs.h`, `lib/ext2fs/ext3_extents.h`, `lib/ext2fs/kernel-jbd.h`.
//! Every structure is little-endian except the jbd2 journal superblock, which is big-endian.
//! Field offsets are pinned with `offset_of!` assertions where a mistake would be silent.

use std::mem::{offset_of, size_of};

use zerocopy::big_endian as be;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Filesystem block size kiln writes (superblock.rst: `s_log_block_size` = 2).
pub const BLOCK_SIZE: u64 = 4096;
/// `BLOCK_SIZE` as usize, for buffers.
pub const BS: usize = BLOCK_SIZE as usize;
/// Blocks per group: one block bitmap block covers 8 * 4096 blocks.
pub const BLOCKS_PER_GROUP: u64 = 8 * BLOCK_SIZE;
/// On-disk inode record size (mke2fs default `inode_size = 256`).
pub const INODE_SIZE: u64 = 256;
/// Inodes in one inode-table block.
pub const INODES_PER_BLOCK: u32 = (BLOCK_SIZE / INODE_SIZE) as u32;
/// Bytes of the inode beyond the 128-byte original layout that we use (`i_extra_isize`).
pub const EXTRA_ISIZE: u16 = 32;
/// Largest inodes-per-group value: the inode bitmap is one block.
pub const MAX_INODES_PER_GROUP: u32 = (8 * BLOCK_SIZE) as u32;
/// Group descriptor size with the 64bit feature.
pub const DESC_SIZE: u64 = 64;
/// Group descriptors per block; with meta_bg this is also the number of groups per meta group.
pub const DESCS_PER_BLOCK: u64 = BLOCK_SIZE / DESC_SIZE;
/// Byte offset of the primary superblock.
pub const SUPERBLOCK_OFFSET: u64 = 1024;

/// Superblock magic (`s_magic`).
pub const EXT4_MAGIC: u16 = 0xEF53;
/// Extent header magic (`eh_magic`).
pub const EXTENT_MAGIC: u16 = 0xF30A;
/// Extended attribute header magic, in a block and at the start of the in-inode area.
pub const XATTR_MAGIC: u32 = 0xEA02_0000;
/// jbd2 superblock and block header magic.
pub const JBD2_MAGIC: u32 = 0xC03B_3998;
/// jbd2 block type of a version 2 journal superblock.
pub const JBD2_SUPERBLOCK_V2: u32 = 4;

/// Root directory inode.
pub const ROOT_INO: u32 = 2;
/// Bad-blocks inode.
pub const BAD_INO: u32 = 1;
/// Journal inode.
pub const JOURNAL_INO: u32 = 8;
/// First non-reserved inode (`s_first_ino`); mke2fs gives it to lost+found.
pub const FIRST_INO: u32 = 11;

// s_feature_compat
/// Filesystem has a journal.
pub const COMPAT_HAS_JOURNAL: u32 = 0x0004;
/// Extended attributes.
pub const COMPAT_EXT_ATTR: u32 = 0x0008;
/// Hashed (htree) directories.
pub const COMPAT_DIR_INDEX: u32 = 0x0020;
// s_feature_incompat
/// Directory entries record the file type.
pub const INCOMPAT_FILETYPE: u32 = 0x0002;
/// Meta block groups: descriptor blocks live in groups 0, 1 and 63 of each 64-group run.
pub const INCOMPAT_META_BG: u32 = 0x0010;
/// Inodes map blocks with extent trees.
pub const INCOMPAT_EXTENTS: u32 = 0x0040;
/// 64-bit block numbers and 64-byte group descriptors.
pub const INCOMPAT_64BIT: u32 = 0x0080;
/// Flexible block groups: bitmaps and inode tables may live anywhere.
pub const INCOMPAT_FLEX_BG: u32 = 0x0200;
// s_feature_ro_compat
/// Superblock backups only in groups 0, 1 and powers of 3, 5, 7.
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
/// Files larger than 2 GiB.
pub const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
/// `i_blocks` may exceed 2^32 sectors.
pub const RO_COMPAT_HUGE_FILE: u32 = 0x0008;
/// Directories may have more than 65000 subdirectories (link count 1).
pub const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
/// Inodes carry `i_extra_isize` bytes of extra fields.
pub const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;
/// crc32c checksums on all metadata.
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x0400;

/// `s_flags`: directory hashes treat name bytes as signed chars (what x86 mke2fs sets).
pub const FLAGS_SIGNED_HASH: u32 = 0x0001;
/// `s_default_mount_opts`: user_xattr.
pub const DEFM_XATTR_USER: u32 = 0x0004;
/// `s_default_mount_opts`: acl.
pub const DEFM_ACL: u32 = 0x0008;
/// `s_checksum_type` for crc32c.
pub const CHECKSUM_TYPE_CRC32C: u8 = 1;
/// `s_def_hash_version`/`dx_root_info.hash_version`: half MD4.
pub const DX_HASH_HALF_MD4: u8 = 1;
/// `s_jnl_backup_type`: `s_jnl_blocks` holds a copy of the journal inode's `i_block`.
pub const JNL_BACKUP_BLOCKS: u8 = 1;
/// `s_state`: cleanly unmounted.
pub const STATE_VALID: u16 = 1;
/// `s_errors`: continue on errors.
pub const ERRORS_CONTINUE: u16 = 1;
/// `s_rev_level`: dynamic inode sizes.
pub const DYNAMIC_REV: u32 = 1;

// bg_flags
/// The group's inode table and bitmap are not initialised (no inode in use).
pub const BG_INODE_UNINIT: u16 = 0x0001;
/// The group's inode table is zeroed.
pub const BG_INODE_ZEROED: u16 = 0x0004;

// i_flags
/// Directory is hash-indexed.
pub const INODE_INDEX_FL: u32 = 0x0000_1000;
/// Inode uses an extent tree.
pub const INODE_EXTENTS_FL: u32 = 0x0008_0000;

// Directory entry file types (`file_type` with the filetype feature).
/// Regular file.
pub const FT_REG_FILE: u8 = 1;
/// Directory.
pub const FT_DIR: u8 = 2;
/// Character device.
pub const FT_CHRDEV: u8 = 3;
/// Block device.
pub const FT_BLKDEV: u8 = 4;
/// FIFO.
pub const FT_FIFO: u8 = 5;
/// Socket.
pub const FT_SOCK: u8 = 6;
/// Symbolic link.
pub const FT_SYMLINK: u8 = 7;
/// File type of the checksum tail's fake entry (`det_reserved_ft`).
pub const FT_DIR_CSUM: u8 = 0xDE;

/// Longest initialized extent, in blocks.
pub const EXT_INIT_MAX_LEN: u32 = 1 << 15;
/// Longest unwritten extent, in blocks (`ee_len` above 32768 marks unwritten).
pub const EXT_UNWRITTEN_MAX_LEN: u32 = EXT_INIT_MAX_LEN - 1;
/// Extent entries that fit in `i_block` after the header.
pub const EXTENTS_IN_INODE: usize = 4;
/// Extent entries in one tree block: (4096 - header) / 12, leaving room for the tail.
pub const EXTENTS_PER_BLOCK: usize = (BS - 12) / 12;

/// Longest fast symlink target: it must fit in `i_block` with room to spare (the kernel
/// stores targets shorter than 60 bytes inline).
pub const FAST_SYMLINK_MAX: usize = 59;
/// Most hard links an inode may have (`EXT4_LINK_MAX`).
pub const LINK_MAX: u32 = 65000;

// Extended attribute name indexes (`e_name_index`, attributes.rst).
/// `user.`
pub const XATTR_INDEX_USER: u8 = 1;
/// `system.posix_acl_access`
pub const XATTR_INDEX_POSIX_ACL_ACCESS: u8 = 2;
/// `system.posix_acl_default`
pub const XATTR_INDEX_POSIX_ACL_DEFAULT: u8 = 3;
/// `trusted.`
pub const XATTR_INDEX_TRUSTED: u8 = 4;
/// `security.`
pub const XATTR_INDEX_SECURITY: u8 = 6;
/// `system.`
pub const XATTR_INDEX_SYSTEM: u8 = 7;
/// `system.richacl`
pub const XATTR_INDEX_RICHACL: u8 = 8;

/// Name prefixes stored as an index, longest first within a namespace so that the ACL names
/// win over the generic `system.` prefix. Index 0 keeps the full name.
pub const XATTR_PREFIXES: &[(u8, &[u8])] = &[
    (XATTR_INDEX_POSIX_ACL_ACCESS, b"system.posix_acl_access"),
    (XATTR_INDEX_POSIX_ACL_DEFAULT, b"system.posix_acl_default"),
    (XATTR_INDEX_RICHACL, b"system.richacl"),
    (XATTR_INDEX_USER, b"user."),
    (XATTR_INDEX_TRUSTED, b"trusted."),
    (XATTR_INDEX_SECURITY, b"security."),
    (XATTR_INDEX_SYSTEM, b"system."),
];

/// The superblock (superblock.rst), 1024 bytes at byte 1024 of the filesystem and at the
/// start of each backup group.
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Superblock {
    /// Total inode count.
    pub inodes_count: U32,
    /// Total block count, low 32 bits.
    pub blocks_count_lo: U32,
    /// Blocks reserved for the superuser, low 32 bits.
    pub r_blocks_count_lo: U32,
    /// Free block count, low 32 bits.
    pub free_blocks_count_lo: U32,
    /// Free inode count.
    pub free_inodes_count: U32,
    /// First data block: 0 for block sizes above 1024.
    pub first_data_block: U32,
    /// Block size is 2 ^ (10 + this).
    pub log_block_size: U32,
    /// Cluster size is 2 ^ (10 + this) (equal to the block size without bigalloc).
    pub log_cluster_size: U32,
    /// Blocks per group.
    pub blocks_per_group: U32,
    /// Clusters per group.
    pub clusters_per_group: U32,
    /// Inodes per group.
    pub inodes_per_group: U32,
    /// Last mount time, seconds since the epoch.
    pub mtime: U32,
    /// Last write time, seconds since the epoch.
    pub wtime: U32,
    /// Mounts since the last check.
    pub mnt_count: U16,
    /// Mounts allowed before a check (0xFFFF = -1: never).
    pub max_mnt_count: U16,
    /// Magic, [`EXT4_MAGIC`].
    pub magic: U16,
    /// State flags ([`STATE_VALID`]).
    pub state: U16,
    /// Behaviour on errors ([`ERRORS_CONTINUE`]).
    pub errors: U16,
    /// Minor revision.
    pub minor_rev_level: U16,
    /// Last check time, seconds since the epoch.
    pub lastcheck: U32,
    /// Seconds between forced checks (0: never).
    pub checkinterval: U32,
    /// Creator OS (0 = Linux).
    pub creator_os: U32,
    /// Revision level ([`DYNAMIC_REV`]).
    pub rev_level: U32,
    /// Default uid for reserved blocks.
    pub def_resuid: U16,
    /// Default gid for reserved blocks.
    pub def_resgid: U16,
    /// First non-reserved inode.
    pub first_ino: U32,
    /// Inode record size in bytes.
    pub inode_size: U16,
    /// Group number holding this superblock copy.
    pub block_group_nr: U16,
    /// Compatible features.
    pub feature_compat: U32,
    /// Incompatible features.
    pub feature_incompat: U32,
    /// Read-only compatible features.
    pub feature_ro_compat: U32,
    /// Filesystem UUID (RFC byte order).
    pub uuid: [u8; 16],
    /// Volume label, NUL padded.
    pub volume_name: [u8; 16],
    /// Directory where last mounted, NUL padded.
    pub last_mounted: [u8; 64],
    /// Compression algorithms (unused).
    pub algorithm_usage_bitmap: U32,
    /// Blocks to preallocate for files (unused).
    pub prealloc_blocks: u8,
    /// Blocks to preallocate for directories (unused).
    pub prealloc_dir_blocks: u8,
    /// Descriptor blocks reserved for online growth (resize_inode only).
    pub reserved_gdt_blocks: U16,
    /// UUID of the journal superblock (external journals).
    pub journal_uuid: [u8; 16],
    /// Journal inode number.
    pub journal_inum: U32,
    /// External journal device number.
    pub journal_dev: U32,
    /// Head of the orphan inode list.
    pub last_orphan: U32,
    /// Directory hash seed: four little-endian words fed to the hash as its initial state.
    pub hash_seed: [u8; 16],
    /// Default directory hash algorithm.
    pub def_hash_version: u8,
    /// What `jnl_blocks` holds ([`JNL_BACKUP_BLOCKS`]).
    pub jnl_backup_type: u8,
    /// Group descriptor size in bytes.
    pub desc_size: U16,
    /// Default mount options.
    pub default_mount_opts: U32,
    /// First group using the meta_bg descriptor layout.
    pub first_meta_bg: U32,
    /// Creation time, seconds since the epoch.
    pub mkfs_time: U32,
    /// Backup of the journal inode's `i_block[0..15]`, then `i_size_high`, `i_size`.
    pub jnl_blocks: [U32; 17],
    /// Total block count, high 32 bits.
    pub blocks_count_hi: U32,
    /// Reserved block count, high 32 bits.
    pub r_blocks_count_hi: U32,
    /// Free block count, high 32 bits.
    pub free_blocks_count_hi: U32,
    /// Smallest `i_extra_isize` every inode has.
    pub min_extra_isize: U16,
    /// `i_extra_isize` new inodes should have.
    pub want_extra_isize: U16,
    /// Miscellaneous flags ([`FLAGS_SIGNED_HASH`]).
    pub flags: U32,
    /// RAID stride in blocks.
    pub raid_stride: U16,
    /// Multi-mount protection update interval, seconds.
    pub mmp_interval: U16,
    /// Multi-mount protection block.
    pub mmp_block: U64,
    /// RAID stripe width in blocks.
    pub raid_stripe_width: U32,
    /// Groups per flex group is 2 ^ this.
    pub log_groups_per_flex: u8,
    /// Metadata checksum algorithm ([`CHECKSUM_TYPE_CRC32C`]).
    pub checksum_type: u8,
    /// Encryption level (unused).
    pub encryption_level: u8,
    /// Padding.
    pub reserved_pad: u8,
    /// KiB written over the filesystem's lifetime.
    pub kbytes_written: U64,
    /// Snapshot fields (unused).
    pub snapshot_inum: U32,
    /// Snapshot id (unused).
    pub snapshot_id: U32,
    /// Snapshot reserved blocks (unused).
    pub snapshot_r_blocks_count: U64,
    /// Snapshot list head (unused).
    pub snapshot_list: U32,
    /// Errors seen.
    pub error_count: U32,
    /// First error: time.
    pub first_error_time: U32,
    /// First error: inode.
    pub first_error_ino: U32,
    /// First error: block.
    pub first_error_block: U64,
    /// First error: function name.
    pub first_error_func: [u8; 32],
    /// First error: line.
    pub first_error_line: U32,
    /// Last error: time.
    pub last_error_time: U32,
    /// Last error: inode.
    pub last_error_ino: U32,
    /// Last error: line.
    pub last_error_line: U32,
    /// Last error: block.
    pub last_error_block: U64,
    /// Last error: function name.
    pub last_error_func: [u8; 32],
    /// Mount options string.
    pub mount_opts: [u8; 64],
    /// User quota inode.
    pub usr_quota_inum: U32,
    /// Group quota inode.
    pub grp_quota_inum: U32,
    /// Overhead blocks (0: the kernel computes it).
    pub overhead_clusters: U32,
    /// Groups holding backups with sparse_super2.
    pub backup_bgs: [U32; 2],
    /// Encryption algorithms.
    pub encrypt_algos: [u8; 4],
    /// Encryption salt.
    pub encrypt_pw_salt: [u8; 16],
    /// lost+found inode (unused by mke2fs).
    pub lpf_ino: U32,
    /// Project quota inode.
    pub prj_quota_inum: U32,
    /// Checksum seed when metadata_csum_seed is set.
    pub checksum_seed: U32,
    /// High byte of `wtime`.
    pub wtime_hi: u8,
    /// High byte of `mtime`.
    pub mtime_hi: u8,
    /// High byte of `mkfs_time`.
    pub mkfs_time_hi: u8,
    /// High byte of `lastcheck`.
    pub lastcheck_hi: u8,
    /// High byte of `first_error_time`.
    pub first_error_time_hi: u8,
    /// High byte of `last_error_time`.
    pub last_error_time_hi: u8,
    /// First error code.
    pub first_error_errcode: u8,
    /// Last error code.
    pub last_error_errcode: u8,
    /// Filename charset encoding.
    pub encoding: U16,
    /// Filename charset encoding flags.
    pub encoding_flags: U16,
    /// Orphan file inode.
    pub orphan_file_inum: U32,
    /// Padding to the end of the block.
    pub reserved: [U32; 94],
    /// crc32c of the superblock up to this field.
    pub checksum: U32,
}
const _: () = assert!(size_of::<Superblock>() == 1024);
const _: () = assert!(offset_of!(Superblock, uuid) == 0x68);
const _: () = assert!(offset_of!(Superblock, hash_seed) == 0xEC);
const _: () = assert!(offset_of!(Superblock, first_meta_bg) == 0x104);
const _: () = assert!(offset_of!(Superblock, blocks_count_hi) == 0x150);
const _: () = assert!(offset_of!(Superblock, log_groups_per_flex) == 0x174);
const _: () = assert!(offset_of!(Superblock, overhead_clusters) == 0x248);
const _: () = assert!(offset_of!(Superblock, checksum_seed) == 0x270);
const _: () = assert!(offset_of!(Superblock, checksum) == 0x3FC);

/// A 64-byte block group descriptor (group_descr.rst).
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GroupDesc {
    /// Block bitmap location, low 32 bits.
    pub block_bitmap_lo: U32,
    /// Inode bitmap location, low 32 bits.
    pub inode_bitmap_lo: U32,
    /// First inode table block, low 32 bits.
    pub inode_table_lo: U32,
    /// Free blocks in the group, low 16 bits.
    pub free_blocks_count_lo: U16,
    /// Free inodes in the group, low 16 bits.
    pub free_inodes_count_lo: U16,
    /// Directories in the group, low 16 bits.
    pub used_dirs_count_lo: U16,
    /// `BG_*` flags.
    pub flags: U16,
    /// Snapshot exclusion bitmap, low 32 bits (unused).
    pub exclude_bitmap_lo: U32,
    /// Block bitmap crc32c, low 16 bits.
    pub block_bitmap_csum_lo: U16,
    /// Inode bitmap crc32c, low 16 bits.
    pub inode_bitmap_csum_lo: U16,
    /// Unused inodes at the end of the inode table, low 16 bits.
    pub itable_unused_lo: U16,
    /// Low 16 bits of the descriptor's crc32c.
    pub checksum: U16,
    /// Block bitmap location, high 32 bits.
    pub block_bitmap_hi: U32,
    /// Inode bitmap location, high 32 bits.
    pub inode_bitmap_hi: U32,
    /// First inode table block, high 32 bits.
    pub inode_table_hi: U32,
    /// Free blocks, high 16 bits.
    pub free_blocks_count_hi: U16,
    /// Free inodes, high 16 bits.
    pub free_inodes_count_hi: U16,
    /// Directories, high 16 bits.
    pub used_dirs_count_hi: U16,
    /// Unused inodes, high 16 bits.
    pub itable_unused_hi: U16,
    /// Snapshot exclusion bitmap, high 32 bits.
    pub exclude_bitmap_hi: U32,
    /// Block bitmap crc32c, high 16 bits.
    pub block_bitmap_csum_hi: U16,
    /// Inode bitmap crc32c, high 16 bits.
    pub inode_bitmap_csum_hi: U16,
    /// Padding.
    pub reserved: U32,
}
const _: () = assert!(size_of::<GroupDesc>() == DESC_SIZE as usize);
const _: () = assert!(offset_of!(GroupDesc, checksum) == 0x1E);
const _: () = assert!(offset_of!(GroupDesc, block_bitmap_csum_hi) == 0x38);

impl GroupDesc {
    /// Block bitmap block number.
    pub fn block_bitmap(&self) -> u64 {
        join(self.block_bitmap_lo.get(), self.block_bitmap_hi.get())
    }
    /// Inode bitmap block number.
    pub fn inode_bitmap(&self) -> u64 {
        join(self.inode_bitmap_lo.get(), self.inode_bitmap_hi.get())
    }
    /// First inode table block.
    pub fn inode_table(&self) -> u64 {
        join(self.inode_table_lo.get(), self.inode_table_hi.get())
    }
    /// Free blocks in the group.
    pub fn free_blocks(&self) -> u32 {
        u32::from(self.free_blocks_count_lo.get())
            | u32::from(self.free_blocks_count_hi.get()) << 16
    }
    /// Free inodes in the group.
    pub fn free_inodes(&self) -> u32 {
        u32::from(self.free_inodes_count_lo.get())
            | u32::from(self.free_inodes_count_hi.get()) << 16
    }
    /// Directories in the group.
    pub fn used_dirs(&self) -> u32 {
        u32::from(self.used_dirs_count_lo.get()) | u32::from(self.used_dirs_count_hi.get()) << 16
    }
    /// Unused inodes at the end of the group's table.
    pub fn itable_unused(&self) -> u32 {
        u32::from(self.itable_unused_lo.get()) | u32::from(self.itable_unused_hi.get()) << 16
    }
}

/// Joins low and high 32-bit halves.
pub fn join(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | u64::from(hi) << 32
}

/// The 256-byte inode (inodes.rst): the 128-byte original layout plus `EXTRA_ISIZE` bytes of
/// extra fields; the rest (from byte 160) holds in-inode extended attributes.
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Inode {
    /// File type and permission bits (`st_mode`).
    pub mode: U16,
    /// Owner uid, low 16 bits.
    pub uid: U16,
    /// Size in bytes, low 32 bits.
    pub size_lo: U32,
    /// Access time, seconds (low 32 bits, signed).
    pub atime: U32,
    /// Change time, seconds.
    pub ctime: U32,
    /// Modification time, seconds.
    pub mtime: U32,
    /// Deletion time.
    pub dtime: U32,
    /// Group id, low 16 bits.
    pub gid: U16,
    /// Hard link count.
    pub links_count: U16,
    /// 512-byte sectors allocated (data, extent tree and xattr blocks), low 32 bits.
    pub blocks_lo: U32,
    /// `INODE_*_FL` flags.
    pub flags: U32,
    /// Inode version (osd1; unused).
    pub version: U32,
    /// Extent tree root, fast symlink target or device number (60 bytes).
    pub block: [u8; 60],
    /// Generation number (NFS); part of the checksum seed.
    pub generation: U32,
    /// Extended attribute block, low 32 bits.
    pub file_acl_lo: U32,
    /// Size in bytes, high 32 bits.
    pub size_high: U32,
    /// Obsolete fragment address.
    pub obso_faddr: U32,
    /// Sectors allocated, high 16 bits.
    pub blocks_high: U16,
    /// Extended attribute block, high 16 bits.
    pub file_acl_high: U16,
    /// Owner uid, high 16 bits.
    pub uid_high: U16,
    /// Group id, high 16 bits.
    pub gid_high: U16,
    /// Inode crc32c, low 16 bits.
    pub checksum_lo: U16,
    /// Reserved.
    pub reserved: U16,
    /// Bytes of extra fields in use beyond 128.
    pub extra_isize: U16,
    /// Inode crc32c, high 16 bits.
    pub checksum_hi: U16,
    /// Change time: 2 epoch bits and 30 bits of nanoseconds.
    pub ctime_extra: U32,
    /// Modification time extra bits.
    pub mtime_extra: U32,
    /// Access time extra bits.
    pub atime_extra: U32,
    /// Creation time, seconds.
    pub crtime: U32,
    /// Creation time extra bits.
    pub crtime_extra: U32,
    /// Inode version, high 32 bits.
    pub version_hi: U32,
    /// Project id.
    pub projid: U32,
    /// In-inode extended attribute area.
    pub xattr: [u8; 96],
}
const _: () = assert!(size_of::<Inode>() == INODE_SIZE as usize);
const _: () = assert!(offset_of!(Inode, block) == 0x28);
const _: () = assert!(offset_of!(Inode, checksum_lo) == 0x7C);
const _: () = assert!(offset_of!(Inode, extra_isize) == 0x80);
const _: () = assert!(offset_of!(Inode, xattr) == 128 + EXTRA_ISIZE as usize);

impl Inode {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        join(self.size_lo.get(), self.size_high.get())
    }
    /// Owner uid.
    pub fn uid(&self) -> u32 {
        u32::from(self.uid.get()) | u32::from(self.uid_high.get()) << 16
    }
    /// Group id.
    pub fn gid(&self) -> u32 {
        u32::from(self.gid.get()) | u32::from(self.gid_high.get()) << 16
    }
    /// Extended attribute block, 0 if none.
    pub fn file_acl(&self) -> u64 {
        u64::from(self.file_acl_lo.get()) | u64::from(self.file_acl_high.get()) << 32
    }
    /// 512-byte sectors allocated.
    pub fn sectors(&self) -> u64 {
        u64::from(self.blocks_lo.get()) | u64::from(self.blocks_high.get()) << 32
    }
}

/// Header of an extent tree node, in `i_block` or at the start of a tree block (ifork.rst).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ExtentHeader {
    /// [`EXTENT_MAGIC`].
    pub magic: U16,
    /// Valid entries following the header.
    pub entries: U16,
    /// Capacity of entries in this node.
    pub max: U16,
    /// Depth of the tree below this node (0: entries are extents).
    pub depth: U16,
    /// Generation (unused).
    pub generation: U32,
}
const _: () = assert!(size_of::<ExtentHeader>() == 12);

/// A leaf entry: a run of logical blocks mapped to physical blocks.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Extent {
    /// First logical block.
    pub block: U32,
    /// Length in blocks; above 32768 the extent is unwritten with length `len - 32768`.
    pub len: U16,
    /// First physical block, high 16 bits.
    pub start_hi: U16,
    /// First physical block, low 32 bits.
    pub start_lo: U32,
}
const _: () = assert!(size_of::<Extent>() == 12);

/// An index entry: points at the tree block covering logical blocks from `block` on.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ExtentIdx {
    /// First logical block covered.
    pub block: U32,
    /// Child tree block, low 32 bits.
    pub leaf_lo: U32,
    /// Child tree block, high 16 bits.
    pub leaf_hi: U16,
    /// Unused.
    pub unused: U16,
}
const _: () = assert!(size_of::<ExtentIdx>() == 12);

/// Tail of an extent tree block: crc32c of the block up to the tail.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ExtentTail {
    /// crc32c (inode seed) of the block before the tail.
    pub checksum: U32,
}
const _: () = assert!(size_of::<ExtentTail>() == 4);

/// Fixed part of a directory entry (`ext4_dir_entry_2`); the name follows.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DirEntryHead {
    /// Inode number (0: unused entry).
    pub inode: U32,
    /// Length of this record, a multiple of 4.
    pub rec_len: U16,
    /// Name length in bytes.
    pub name_len: u8,
    /// `FT_*` file type.
    pub file_type: u8,
}
const _: () = assert!(size_of::<DirEntryHead>() == 8);

/// The 12-byte fake entry at the end of a leaf block holding its checksum.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DirTail {
    /// Zero (looks like an unused entry).
    pub reserved_zero1: U32,
    /// 12.
    pub rec_len: U16,
    /// Zero name length.
    pub reserved_zero2: u8,
    /// [`FT_DIR_CSUM`].
    pub reserved_ft: u8,
    /// crc32c (inode seed) of the block before the tail.
    pub checksum: U32,
}
const _: () = assert!(size_of::<DirTail>() == 12);

/// Block 0 of an indexed directory up to its first index entry: `.`, `..` (spanning the
/// block) and the index root information (directory.rst, "Hash Tree Directories").
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DxRoot {
    /// `.`: this directory's inode.
    pub dot_inode: U32,
    /// 12.
    pub dot_rec_len: U16,
    /// 1.
    pub dot_name_len: u8,
    /// [`FT_DIR`].
    pub dot_file_type: u8,
    /// `.\0\0\0`.
    pub dot_name: [u8; 4],
    /// `..`: the parent's inode.
    pub dotdot_inode: U32,
    /// The rest of the block (4096 - 12).
    pub dotdot_rec_len: U16,
    /// 2.
    pub dotdot_name_len: u8,
    /// [`FT_DIR`].
    pub dotdot_file_type: u8,
    /// `..\0\0`.
    pub dotdot_name: [u8; 4],
    /// Zero.
    pub reserved_zero: U32,
    /// Hash algorithm ([`DX_HASH_HALF_MD4`]).
    pub hash_version: u8,
    /// 8: length of this info.
    pub info_length: u8,
    /// Index levels below the root (0 or 1).
    pub indirect_levels: u8,
    /// Unused flags.
    pub unused_flags: u8,
    /// Capacity of index entries in this block (count/limit header included).
    pub limit: U16,
    /// Index entries in use (count/limit header included).
    pub count: U16,
    /// Block of the leftmost child (hashes below the first entry's hash).
    pub block: U32,
}
const _: () = assert!(size_of::<DxRoot>() == 40);

/// An interior index block header: a fake empty entry spanning the block, then count/limit.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DxNode {
    /// Zero.
    pub fake_inode: U32,
    /// 4096.
    pub fake_rec_len: U16,
    /// Zero.
    pub fake_name_len: u8,
    /// Zero.
    pub fake_file_type: u8,
    /// Capacity of index entries in this block.
    pub limit: U16,
    /// Entries in use.
    pub count: U16,
    /// Leftmost child block.
    pub block: U32,
}
const _: () = assert!(size_of::<DxNode>() == 16);

/// An index entry: children with hashes at or above `hash` live in `block`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DxEntry {
    /// Lowest hash in the child; bit 0 set means the hash run continues from the previous one.
    pub hash: U32,
    /// Logical block of the child within the directory.
    pub block: U32,
}
const _: () = assert!(size_of::<DxEntry>() == 8);

/// Checksum tail after the last possible index entry of a dx root or node.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DxTail {
    /// Zero.
    pub reserved: U32,
    /// crc32c (inode seed) of the used entries and this tail's first word.
    pub checksum: U32,
}
const _: () = assert!(size_of::<DxTail>() == 8);

/// Header of an extended attribute block (attributes.rst).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrHeader {
    /// [`XATTR_MAGIC`].
    pub magic: U32,
    /// Inodes referring to this block.
    pub refcount: U32,
    /// Blocks used (always 1).
    pub blocks: U32,
    /// Hash over the entries' hashes.
    pub hash: U32,
    /// crc32c of the block (seeded with its block number).
    pub checksum: U32,
    /// Zero.
    pub reserved: [U32; 3],
}
const _: () = assert!(size_of::<XattrHeader>() == 32);

/// Fixed part of an extended attribute entry; the name (without its prefix) follows, padded
/// to 4 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct XattrEntry {
    /// Name length after the prefix.
    pub name_len: u8,
    /// Prefix index (`XATTR_INDEX_*`, 0 = none).
    pub name_index: u8,
    /// Value offset: from the block start, or from the first in-inode entry.
    pub value_offs: U16,
    /// Inode holding the value (ea_inode; always 0 here).
    pub value_inum: U32,
    /// Value length in bytes.
    pub value_size: U32,
    /// Hash of name and value.
    pub hash: U32,
}
const _: () = assert!(size_of::<XattrEntry>() == 16);

/// jbd2 journal superblock, version 2 (journal.rst). Big-endian.
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct JournalSuperblock {
    /// [`JBD2_MAGIC`].
    pub magic: be::U32,
    /// [`JBD2_SUPERBLOCK_V2`].
    pub blocktype: be::U32,
    /// Transaction id of this block (0).
    pub header_sequence: be::U32,
    /// Journal block size in bytes.
    pub blocksize: be::U32,
    /// Journal length in blocks.
    pub maxlen: be::U32,
    /// First block of log data.
    pub first: be::U32,
    /// First expected transaction id.
    pub sequence: be::U32,
    /// Block of the log start (0: the journal is clean).
    pub start: be::U32,
    /// Error value.
    pub errno: be::U32,
    /// Compatible journal features.
    pub feature_compat: be::U32,
    /// Incompatible journal features.
    pub feature_incompat: be::U32,
    /// Read-only compatible journal features.
    pub feature_ro_compat: be::U32,
    /// Journal UUID (the filesystem's for an internal journal).
    pub uuid: [u8; 16],
    /// Filesystems sharing the journal.
    pub nr_users: be::U32,
    /// Location of a dynamic superblock copy.
    pub dynsuper: be::U32,
    /// Limit of journal blocks per transaction.
    pub max_transaction: be::U32,
    /// Limit of data blocks per transaction.
    pub max_trans_data: be::U32,
    /// Checksum algorithm.
    pub checksum_type: u8,
    /// Padding.
    pub padding2: [u8; 3],
    /// Fast-commit blocks.
    pub num_fc_blks: be::U32,
    /// Log head block.
    pub head: be::U32,
    /// Padding.
    pub padding: [be::U32; 40],
    /// Checksum of this superblock (checksum v2/v3 only).
    pub checksum: be::U32,
    /// UUIDs of the filesystems sharing the journal.
    pub users: [u8; 768],
}
const _: () = assert!(size_of::<JournalSuperblock>() == 1024);
const _: () = assert!(offset_of!(JournalSuperblock, checksum) == 0xFC);
