//! The static kiln-init executables, embedded at build time (see build.rs): one per
//! architecture kiln builds images for (`x86_64`, `aarch64`, Rust's `target_arch` names), with
//! run-time overrides: `KILN_INIT_<ARCH>` (`KILN_INIT_AARCH64`) names a file to use for that
//! architecture, and `KILN_INIT` one for any. Hosts that cannot build them (not Linux) have
//! nothing embedded and need an override.

use std::borrow::Cow;
use std::path::PathBuf;

/// Environment variable naming a kiln-init executable to use instead of the embedded one, for
/// any architecture (`KILN_INIT_<ARCH>` wins over it).
pub const OVERRIDE_ENV: &str = "KILN_INIT";

/// The embedded x86-64 executable, if this build has one.
#[cfg(kiln_init_x86_64)]
const X86_64: Option<&[u8]> = Some(include_bytes!(env!("KILN_INIT_STATIC_X86_64")));
#[cfg(not(kiln_init_x86_64))]
const X86_64: Option<&[u8]> = None;
/// The embedded aarch64 executable, if this build has one.
#[cfg(kiln_init_aarch64)]
const AARCH64: Option<&[u8]> = Some(include_bytes!(env!("KILN_INIT_STATIC_AARCH64")));
#[cfg(not(kiln_init_aarch64))]
const AARCH64: Option<&[u8]> = None;

/// The embedded executable for `arch` (Rust's `target_arch` name), if this build has one.
pub fn embedded(arch: &str) -> Option<&'static [u8]> {
    match arch {
        "x86_64" => X86_64,
        "aarch64" => AARCH64,
        _ => None,
    }
}

/// Why no kiln-init could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An override names a file that cannot be read.
    #[error("{var}={path}: {source}")]
    Override {
        var: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Nothing embedded for this architecture and no override.
    #[error("this kiln was built without an embedded kiln-init for {arch} (see the build's warnings: non-Linux host, KILN_INIT_EMBED, or no {arch} toolchain); set {var}=/path/to/static/kiln-init")]
    NotEmbedded { arch: String, var: String },
}

/// The kiln-init bytes for `arch`: `$KILN_INIT_<ARCH>` or `$KILN_INIT` if set, else the
/// embedded build. The caller checks that an override is an executable for `arch`.
pub fn kiln_init(arch: &str) -> Result<Cow<'static, [u8]>, Error> {
    let own = format!("{OVERRIDE_ENV}_{}", arch.to_ascii_uppercase());
    for var in [own.as_str(), OVERRIDE_ENV] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(p);
            return std::fs::read(&path)
                .map(Cow::Owned)
                .map_err(|source| Error::Override {
                    var: var.to_string(),
                    path,
                    source,
                });
        }
    }
    embedded(arch).map(Cow::Borrowed).ok_or(Error::NotEmbedded {
        arch: arch.to_string(),
        var: own,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// The embedded kiln-init is a static ELF executable: no PT_INTERP program header, so the
    /// kernel can run it from an initrd that has no dynamic loader.
    #[test]
    fn embedded_inits_are_static_elf_of_their_machine() {
        let native = super::embedded(std::env::consts::ARCH);
        assert!(native.is_some(), "no kiln-init for the host is embedded");
        for (arch, machine) in [("x86_64", 62u16), ("aarch64", 183)] {
            if let Some(b) = super::embedded(arch) {
                check_static_elf(b, machine);
            }
        }
    }

    fn check_static_elf(b: &[u8], machine: u16) {
        assert_eq!(&b[0..4], b"\x7fELF");
        assert_eq!(b[4], 2, "64-bit");
        assert_eq!(u16::from_le_bytes([b[18], b[19]]), machine, "e_machine");
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
        let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
        assert!(phnum > 0);
        for i in 0..phnum {
            let p_type = u32::from_le_bytes(b[phoff + i * phentsize..][..4].try_into().unwrap());
            assert_ne!(
                p_type, 3,
                "PT_INTERP present: kiln-init is dynamically linked"
            );
        }
        assert!(
            b.len() < 8 << 20,
            "kiln-init is {} bytes; expected a stripped binary",
            b.len()
        );
    }

    #[test]
    fn override_wins_and_bad_override_is_an_error() {
        // One test touches the variable, so no other test races with it.
        let dir = std::env::temp_dir().join(format!("kiln-init-embed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("init");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::env::set_var(super::OVERRIDE_ENV, &f);
        assert_eq!(&*super::kiln_init("x86_64").unwrap(), b"#!/bin/sh\n");
        std::env::set_var("KILN_INIT_AARCH64", dir.join("missing-aarch64"));
        let e = super::kiln_init("aarch64").unwrap_err().to_string();
        assert!(
            e.starts_with("KILN_INIT_AARCH64=") && e.contains("missing-aarch64"),
            "{e}"
        );
        std::env::remove_var("KILN_INIT_AARCH64");
        std::env::set_var(super::OVERRIDE_ENV, dir.join("missing"));
        let e = super::kiln_init("aarch64").unwrap_err().to_string();
        assert!(e.starts_with("KILN_INIT=") && e.contains("missing"), "{e}");
        std::env::remove_var(super::OVERRIDE_ENV);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
