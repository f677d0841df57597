//! LZ4 block format (lz4 doc/lz4_Block_format.md).
