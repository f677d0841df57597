//! sha256 digests of files and streams, in the `sha256:<hex>` form OCI uses and the bare hex
//! form sidecars and manifests use.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Size of the buffer files are hashed and copied through.
pub const BUF: usize = 1 << 20;

/// sha256 of everything `r` yields, as lowercase hex, and the byte count.
pub fn sha256_reader(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// sha256 (lowercase hex) and size of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let f = File::open(path).with_context(|| format!("{}: open", path.display()))?;
    sha256_reader(f).with_context(|| format!("{}: read", path.display()))
}

/// Checks that `s` is 64 lowercase hex digits (a bare sha256).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits an OCI digest `sha256:<hex>` into its hex part; other algorithms are refused.
pub fn oci_hex(digest: &str) -> anyhow::Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h) if is_sha256_hex(h) => Ok(h),
        _ => anyhow::bail!("digest {digest:?}: expected sha256:<64 lowercase hex digits>"),
    }
}

/// Compares a computed digest against the expected one.
pub fn check(what: &str, expected: &str, actual: &str) -> Result<(), crate::Error> {
    if expected == actual {
        Ok(())
    } else {
        Err(crate::Error::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(
            sha256_reader(&b"{}"[..]).unwrap(),
            (
                "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a".to_string(),
                2
            )
        );
        assert!(
            oci_hex("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")
                .is_ok()
        );
        for bad in [
            "sha512:00",
            "sha256:XYZ",
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        ] {
            assert!(oci_hex(bad).is_err(), "{bad}");
        }
    }
}
