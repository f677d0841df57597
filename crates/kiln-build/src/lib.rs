//! kiln-build: a `kiln.toml` spec and a source tree become a reproducible disk image.

pub mod initrd;
pub mod qemu;
