//! The static kiln-init executable, embedded at build time (see build.rs), with a run-time
//! override: the environment variable `KILN_INIT` names a file to use instead. Hosts that
//! cannot build it (not Linux) have nothing embedded and need the override.

use std::borrow::Cow;
use std::path::PathBuf;

/// Environment variable naming a kiln-init executable to use instead of the embedded one.
pub const OVERRIDE_ENV: &str = "KILN_INIT";

/// The embedded executable, if this build has one.
#[cfg(kiln_init_embedded)]
pub const EMBEDDED: Option<&[u8]> = Some(include_bytes!(env!("KILN_INIT_STATIC")));
/// The embedded executable, if this build has one.
#[cfg(not(kiln_init_embedded))]
pub const EMBEDDED: Option<&[u8]> = None;

/// Why no kiln-init could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `KILN_INIT` names a file that cannot be read.
    #[error("{OVERRIDE_ENV}={path}: {source}")]
    Override {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Nothing embedded and no override.
    #[error("this kiln was built without an embedded kiln-init (non-Linux host or KILN_INIT_EMBED=0); set {OVERRIDE_ENV}=/path/to/static/kiln-init")]
    NotEmbedded,
}

/// The kiln-init bytes: `$KILN_INIT` if set, else the embedded build.
pub fn kiln_init() -> Result<Cow<'static, [u8]>, Error> {
    if let Some(p) = std::env::var_os(OVERRIDE_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        return std::fs::read(&path)
            .map(Cow::Owned)
            .map_err(|source| Error::Override { path, source });
    }
    EMBEDDED.map(Cow::Borrowed).ok_or(Error::NotEmbedded)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    /// The embedded kiln-init is a static ELF executable: no PT_INTERP program header, so the
    /// kernel can run it from an initrd that has no dynamic loader.
    #[test]
    #[cfg(kiln_init_embedded)]
    fn embedded_init_is_static_elf() {
        let b = super::EMBEDDED.expect("embedded");
        assert_eq!(&b[0..4], b"\x7fELF");
        assert_eq!(b[4], 2, "64-bit");
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
        assert_eq!(&*super::kiln_init().unwrap(), b"#!/bin/sh\n");
        std::env::set_var(super::OVERRIDE_ENV, dir.join("missing"));
        let e = super::kiln_init().unwrap_err().to_string();
        assert!(e.starts_with("KILN_INIT=") && e.contains("missing"), "{e}");
        std::env::remove_var(super::OVERRIDE_ENV);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
