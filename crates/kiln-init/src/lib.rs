//! kiln-init as a library: the parts that are pure logic and that the initrd builder shares —
//! the configuration format and kernel command line ([`config`]), the kernel's module database
//! and the order modules load in ([`modules`]), and recognising filesystems,
//! volume labels and dm-verity superblocks ([`probe`]). The PID 1 program itself is `main.rs`.

pub mod config;
pub mod modules;
pub mod probe;
