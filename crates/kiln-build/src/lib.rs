//! kiln-build: a `kiln.toml` spec and a source tree become a reproducible disk image.

pub mod boot;
pub mod budget;
pub mod image;
pub mod initrd;
pub mod inspect;
pub mod layout;
pub mod prepare;
pub mod qemu;
pub mod spec;
pub mod sysupdate;
pub mod update;
