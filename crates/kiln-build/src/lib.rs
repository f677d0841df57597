//! kiln-build: a `kiln.toml` spec and a source tree become a reproducible disk image and/or a
//! hybrid live ISO.

#![forbid(unsafe_code)]

mod artifacts;
pub mod boot;
pub mod budget;
pub mod delta;
pub mod image;
pub mod initrd;
pub mod inspect;
pub mod iso;
pub mod json;
pub mod layout;
pub mod prepare;
pub mod qemu;
pub mod spec;
pub mod sysupdate;
pub mod update;
pub mod vmdisk;
