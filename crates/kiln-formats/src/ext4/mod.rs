//! ext4 (kernel Documentation/filesystems/ext4/, e2fsprogs lib/ext2fs/ext2_fs.h).
