//! systemd-repart's deterministic identifiers (SPECS.md, "systemd-repart deterministic IDs";
//! systemd src/repart/repart.c). Everything kiln derives from a seed goes through here, so a
//! disk kiln builds gets the same disk GUID, partition UUIDs and labels as systemd-repart given
//! the same seed and partition list.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Every UUID kiln handles: the bytes in RFC 4122 order (as printed, most significant byte
/// first). GPT's mixed-endian form exists only where gpt.rs reads and writes entries and headers
/// (`Uuid::to_bytes_le`, `Uuid::from_bytes_le`).
pub use uuid::Uuid;

/// HMAC-SHA256 keyed with `key` over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Marks 16 bytes as a random (version 4, RFC 4122 variant) UUID.
pub fn set_v4_bits(mut b: [u8; 16]) -> Uuid {
    b[6] = (b[6] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    Uuid::from_bytes(b)
}

/// The first 16 bytes of an HMAC-SHA256 with the v4 bits.
fn v4_from_hmac(h: &[u8; 32]) -> Uuid {
    let mut out = [0u8; 16];
    out.copy_from_slice(&h[..16]);
    set_v4_bits(out)
}

/// `derive_uuid(key, token)`: the first 16 bytes of HMAC-SHA256(key, token) with the v4 bits.
/// The key is the RFC-order bytes of `key`.
pub fn derive_uuid(key: &Uuid, token: &str) -> Uuid {
    v4_from_hmac(&hmac_sha256(key.as_bytes(), &[token.as_bytes()]))
}

/// The disk GUID for a seed.
pub fn disk_uuid(seed: &Uuid) -> Uuid {
    derive_uuid(seed, "disk-uuid")
}

/// The UUID of the `k`-th (0-based) partition of type `type_uuid`: HMAC-SHA256 keyed with the
/// seed over the type's RFC-order bytes (and `k` as 8 little-endian bytes when not 0).
pub fn partition_uuid(seed: &Uuid, type_uuid: &Uuid, k: u64) -> Uuid {
    let h = if k == 0 {
        hmac_sha256(seed.as_bytes(), &[type_uuid.as_bytes()])
    } else {
        hmac_sha256(seed.as_bytes(), &[type_uuid.as_bytes(), &k.to_le_bytes()])
    };
    v4_from_hmac(&h)
}

/// The filesystem UUID of a partition with UUID `partition`.
pub fn filesystem_uuid(partition: &Uuid) -> Uuid {
    derive_uuid(partition, "file-system-uuid")
}

/// The 32-byte dm-verity salt for a seed.
pub fn verity_salt(seed: &Uuid) -> [u8; 32] {
    hmac_sha256(seed.as_bytes(), &[b"verity-salt"])
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

/// A UUID as specs and the command line write seeds and UUIDs: 32 hex digits or the hyphenated
/// 8-4-4-4-12 form, either case. The braced and `urn:uuid:` forms the `uuid` crate also reads
/// are refused, so what a spec or `--seed` accepts stays what the documentation says.
pub fn uuid_from_spec(s: &str) -> Option<Uuid> {
    if s.len() != 32 && s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt;

    #[test]
    fn spec_text_forms() {
        let u = uuid_from_spec("4f68bce3-e8cd-4db1-96e7-fbcaf984b709").unwrap();
        assert_eq!(u.to_string(), "4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
        assert_eq!(&u.as_bytes()[..4], &[0x4f, 0x68, 0xbc, 0xe3]);
        assert_eq!(
            uuid_from_spec("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
            Some(u)
        );
        assert_eq!(uuid_from_spec("4f68bce3e8cd4db196e7fbcaf984b709"), Some(u));
        assert!(uuid_from_spec("0123").is_none());
        assert!(uuid_from_spec("0123456789abcdef0123456789abcdeg").is_none());
        // Forms the crate reads but specs and --seed do not take.
        assert!(uuid_from_spec("{4f68bce3-e8cd-4db1-96e7-fbcaf984b709}").is_none());
        assert!(uuid_from_spec("urn:uuid:4f68bce3-e8cd-4db1-96e7-fbcaf984b709").is_none());
    }

    #[test]
    fn derived_ids_are_v4_and_depend_on_k() {
        let seed = uuid_from_spec("0123456789abcdef0123456789abcdef").unwrap();
        let root = uuid_from_spec("4f68bce3-e8cd-4db1-96e7-fbcaf984b709").unwrap();
        let a = partition_uuid(&seed, &root, 0);
        let b = partition_uuid(&seed, &root, 1);
        assert_ne!(a, b);
        for u in [a, b, disk_uuid(&seed), filesystem_uuid(&a)] {
            assert_eq!(u.as_bytes()[6] >> 4, 4);
            assert_eq!(u.as_bytes()[8] & 0xC0, 0x80);
        }
        assert_eq!(label("root-x86-64", 1), "root-x86-64-2");
    }

    /// The identifiers of examples/appliance (seed 6b696c6e2d6170706c69616e63652d31) as kiln
    /// wrote them before UUIDs became `uuid::Uuid`, and as `sgdisk -p` and `kiln inspect` show
    /// them: the derivations hash the RFC-order bytes.
    #[test]
    fn derivations_are_pinned() {
        let seed = uuid_from_spec("6b696c6e2d6170706c69616e63652d31").unwrap();
        let (root, root_verity) = (gpt::TYPE_ROOT_X86_64, gpt::TYPE_ROOT_X86_64_VERITY);
        let (esp, var) = (gpt::TYPE_ESP, gpt::TYPE_VAR);
        let text = |u: Uuid| u.to_string();
        assert_eq!(
            text(disk_uuid(&seed)),
            "16aeecf2-cc69-403a-add4-a1a21cb3628e"
        );
        assert_eq!(
            text(partition_uuid(&seed, &esp, 0)),
            "4fd7202c-efd9-48f1-b8c7-cf57b632dea1"
        );
        assert_eq!(
            text(partition_uuid(&seed, &root, 1)),
            "129103fe-36ed-4b8c-bdc2-2af72f555820"
        );
        assert_eq!(
            text(partition_uuid(&seed, &root_verity, 1)),
            "777a2fef-098f-4772-af29-ac8d077aacc9"
        );
        let var_part = partition_uuid(&seed, &var, 0);
        assert_eq!(text(var_part), "050844b3-9b23-432d-b47d-14072c9adefe");
        assert_eq!(
            text(filesystem_uuid(&var_part)),
            "57b28f22-9085-4d1b-ba0b-94db631fc922"
        );
        assert_eq!(
            text(verity_uuid(&seed)),
            "9d4dc700-904f-40e4-bfb3-7b51c2cc4e95"
        );
        assert_eq!(
            hex(&verity_salt(&seed)),
            "fbbe0e856f60e905433761e3a50c5accb7a8af966f71e51f02e9b3e3b9815170"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
