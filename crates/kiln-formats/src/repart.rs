//! systemd-repart's deterministic identifiers (SPECS.md, "systemd-repart deterministic IDs";
//! systemd src/repart/repart.c). Everything kiln derives from a seed goes through here, so a
//! disk kiln builds gets the same disk GUID, partition UUIDs and labels as systemd-repart given
//! the same seed and partition list.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A 16-byte identifier in RFC 4122 byte order (as printed, most significant byte first).
pub type Uuid = [u8; 16];

/// HMAC-SHA256 keyed with `key` over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Marks 16 bytes as a random (version 4, RFC 4122 variant) UUID.
pub fn set_v4_bits(mut b: Uuid) -> Uuid {
    b[6] = (b[6] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    b
}

/// `derive_uuid(key, token)`: the first 16 bytes of HMAC-SHA256(key, token) with the v4 bits.
pub fn derive_uuid(key: &Uuid, token: &str) -> Uuid {
    let h = hmac_sha256(key, &[token.as_bytes()]);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h[..16]);
    set_v4_bits(out)
}

/// The disk GUID for a seed.
pub fn disk_uuid(seed: &Uuid) -> Uuid {
    derive_uuid(seed, "disk-uuid")
}

/// The UUID of the `k`-th (0-based) partition of type `type_uuid` (RFC byte order).
pub fn partition_uuid(seed: &Uuid, type_uuid: &Uuid, k: u64) -> Uuid {
    let h = if k == 0 {
        hmac_sha256(seed, &[type_uuid])
    } else {
        hmac_sha256(seed, &[type_uuid, &k.to_le_bytes()])
    };
    let mut out = [0u8; 16];
    out.copy_from_slice(&h[..16]);
    set_v4_bits(out)
}

/// The filesystem UUID of a partition with UUID `partition`.
pub fn filesystem_uuid(partition: &Uuid) -> Uuid {
    derive_uuid(partition, "file-system-uuid")
}

/// The 32-byte dm-verity salt for a seed.
pub fn verity_salt(seed: &Uuid) -> [u8; 32] {
    hmac_sha256(seed, &[b"verity-salt"])
}

/// The dm-verity superblock UUID for a seed.
pub fn verity_uuid(seed: &Uuid) -> Uuid {
    derive_uuid(seed, "verity-uuid")
}

/// The label of the `k`-th (0-based) partition of a type named `name`: `name`, `name-2`, ...
pub fn label(name: &str, k: u64) -> String {
    if k == 0 {
        name.to_string()
    } else {
        format!("{name}-{}", k + 1)
    }
}

/// Parses a 32-hex-digit seed or a dashed UUID into bytes.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || s.len() != 32 && s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Formats 16 bytes as a lowercase dashed UUID.
pub fn format_uuid(u: &Uuid) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Converts an RFC-order UUID to the mixed-endian layout GPT and EFI store on disk (first three
/// fields little-endian).
pub fn to_guid_bytes(u: &Uuid) -> [u8; 16] {
    let mut g = *u;
    g[0..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    g
}

/// The inverse of [`to_guid_bytes`].
pub fn from_guid_bytes(g: &[u8; 16]) -> Uuid {
    to_guid_bytes(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_round_trip_and_guid_order() {
        let u = parse_uuid("4f68bce3-e8cd-4db1-96e7-fbcaf984b709").unwrap();
        assert_eq!(format_uuid(&u), "4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
        assert_eq!(&to_guid_bytes(&u)[..4], &[0xe3, 0xbc, 0x68, 0x4f]);
        assert_eq!(from_guid_bytes(&to_guid_bytes(&u)), u);
        assert!(parse_uuid("0123").is_none());
        assert!(parse_uuid("0123456789abcdef0123456789abcdeg").is_none());
    }

    #[test]
    fn derived_ids_are_v4_and_depend_on_k() {
        let seed = parse_uuid("0123456789abcdef0123456789abcdef").unwrap();
        let root = parse_uuid("4f68bce3-e8cd-4db1-96e7-fbcaf984b709").unwrap();
        let a = partition_uuid(&seed, &root, 0);
        let b = partition_uuid(&seed, &root, 1);
        assert_ne!(a, b);
        for u in [a, b, disk_uuid(&seed), filesystem_uuid(&a)] {
            assert_eq!(u[6] >> 4, 4);
            assert_eq!(u[8] & 0xC0, 0x80);
        }
        assert_eq!(label("root-x86-64", 1), "root-x86-64-2");
    }
}
