//! kiln-formats: pure on-disk formats. Each module turns a layout into bytes and bytes back into
//! a layout; none of them decides policy (where files come from, where outputs go, what to
//! name them). Errors are `thiserror` enums whose messages name the offset or path at fault.

#![forbid(unsafe_code)]

pub mod fstree;
pub mod io;
pub mod sink;

pub mod arch;
pub mod calendar;
pub mod cpio;
pub mod erofs;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod iso9660;
pub mod lz4;
pub mod pe;
pub mod repart;
pub mod verity;
pub mod vmdisk;

pub use fstree::{Contents, DataRef, FileData, Meta, Node, NodeId, NodeKind, Tree};
pub use sink::{FileSink, MemSink, Sink};
