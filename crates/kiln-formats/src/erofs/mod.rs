//! EROFS (kernel Documentation/filesystems/erofs.rst, erofs-utils include/erofs_fs.h).
