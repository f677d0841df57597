//! Extended attributes: in-inode and block encodings (kernel Documentation/filesystems/ext4/
//! attributes.rst) and the POSIX ACL conversion between the VFS xattr format and ext4's
//! compact on-disk format (kernel fs/ext4/acl.h).

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use super::hash;
use super::layout::{
    XattrEntry, XattrHeader, BS, XATTR_INDEX_POSIX_ACL_ACCESS, XATTR_INDEX_POSIX_ACL_DEFAULT,
    XATTR_MAGIC, XATTR_PREFIXES,
};

/// Bytes of the in-inode xattr area (256 - 128 - extra_isize).
pub const IBODY_SPACE: usize = 96;

/// One attribute in ext4's terms: prefix index, name suffix and on-disk value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskXattr {
    /// Prefix index (0: full name stored).
    pub index: u8,
    /// Name after the prefix.
    pub name: Box<[u8]>,
    /// Value as stored on disk (ACLs converted).
    pub value: Box<[u8]>,
}

/// Why an attribute cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrProblem {
    /// Name suffix longer than 255 bytes.
    NameTooLong,
    /// The attributes that do not fit in the inode do not fit in one block either.
    TooLarge(usize),
    /// A POSIX ACL value that is not in the VFS xattr format.
    BadAcl(&'static str),
}

impl std::fmt::Display for XattrProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XattrProblem::NameTooLong => write!(f, "name longer than 255 bytes after its prefix"),
            XattrProblem::TooLarge(n) => write!(
                f,
                "attributes need {n} bytes outside the inode, more than one {BS}-byte block holds"
            ),
            XattrProblem::BadAcl(why) => write!(f, "malformed POSIX ACL: {why}"),
        }
    }
}

/// Splits a full attribute name into its prefix index and suffix.
pub fn split_name(full: &[u8]) -> (u8, &[u8]) {
    for (idx, prefix) in XATTR_PREFIXES {
        if let Some(rest) = full.strip_prefix(*prefix) {
            // The ACL names are whole names; `system.posix_acl_accessX` is just `system.`.
            let whole = matches!(
                *idx,
                XATTR_INDEX_POSIX_ACL_ACCESS | XATTR_INDEX_POSIX_ACL_DEFAULT | 8
            );
            if whole && !rest.is_empty() {
                continue;
            }
            return (*idx, rest);
        }
    }
    (0, full)
}

/// The full name for a prefix index and suffix.
pub fn join_name(index: u8, suffix: &[u8]) -> Vec<u8> {
    let mut out = XATTR_PREFIXES
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, p)| p.to_vec())
        .unwrap_or_default();
    out.extend_from_slice(suffix);
    out
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// Converts a VFS POSIX ACL (version 2, 8-byte entries) to ext4's format (version 1, 4-byte
/// entries except for named users and groups).
pub fn acl_to_disk(v: &[u8]) -> Result<Vec<u8>, XattrProblem> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
        return Err(XattrProblem::BadAcl("length is not 4 + 8n"));
    }
    if v[..4] != 2u32.to_le_bytes() {
        return Err(XattrProblem::BadAcl("version is not 2"));
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        match tag {
            ACL_USER | ACL_GROUP => out.extend_from_slice(&e[4..8]),
            ACL_USER_OBJ | ACL_GROUP_OBJ | ACL_MASK | ACL_OTHER => {}
            _ => return Err(XattrProblem::BadAcl("unknown entry tag")),
        }
    }
    Ok(out)
}

/// Converts ext4's on-disk ACL back to the VFS format (for readers).
pub fn acl_from_disk(v: &[u8]) -> Option<Vec<u8>> {
    if v.get(..4)? != 1u32.to_le_bytes() {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut p = 4;
    while p < v.len() {
        let tag = u16::from_le_bytes([*v.get(p)?, *v.get(p + 1)?]);
        out.extend_from_slice(v.get(p..p + 4)?);
        match tag {
            ACL_USER | ACL_GROUP => {
                out.extend_from_slice(v.get(p + 4..p + 8)?);
                p += 8;
            }
            _ => {
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                p += 4;
            }
        }
    }
    Some(out)
}

/// Converts a node's attributes into ext4 form, sorted as the kernel keeps them in a block:
/// by index, then name length, then name.
pub fn to_disk(xattrs: &[crate::fstree::Xattr]) -> Result<Vec<DiskXattr>, (Vec<u8>, XattrProblem)> {
    let mut out = Vec::with_capacity(xattrs.len());
    for x in xattrs {
        let (index, suffix) = split_name(&x.name);
        if suffix.len() > 255 {
            return Err((x.name.to_vec(), XattrProblem::NameTooLong));
        }
        let value: Box<[u8]> = match index {
            XATTR_INDEX_POSIX_ACL_ACCESS | XATTR_INDEX_POSIX_ACL_DEFAULT => acl_to_disk(&x.value)
                .map_err(|p| (x.name.to_vec(), p))?
                .into(),
            _ => x.value.clone(),
        };
        out.push(DiskXattr {
            index,
            name: suffix.into(),
            value,
        });
    }
    out.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(out)
}

fn entry_size(x: &DiskXattr) -> usize {
    (16 + x.name.len() + 3) & !3
}

fn value_size(x: &DiskXattr) -> usize {
    (x.value.len() + 3) & !3
}

/// Where each attribute goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Attributes stored in the inode.
    pub inline: Vec<DiskXattr>,
    /// Attributes stored in the attribute block.
    pub block: Vec<DiskXattr>,
}

/// Decides which attributes fit in the inode (first come, first served in sorted order) and
/// checks that the rest fit in one block.
pub fn split(attrs: Vec<DiskXattr>) -> Result<Split, XattrProblem> {
    let mut s = Split::default();
    // The area starts with the 4-byte magic and ends its entry list with a 4-byte zero.
    let mut used = 4 + 4;
    for x in attrs {
        let need = entry_size(&x) + value_size(&x);
        if used + need <= IBODY_SPACE {
            used += need;
            s.inline.push(x);
        } else {
            s.block.push(x);
        }
    }
    let block_need: usize = 32
        + 4
        + s.block
            .iter()
            .map(|x| entry_size(x) + value_size(x))
            .sum::<usize>();
    if !s.block.is_empty() && block_need > BS {
        return Err(XattrProblem::TooLarge(block_need));
    }
    Ok(s)
}

fn put_entries(area: &mut [u8], entries_at: usize, values_base: usize, attrs: &[DiskXattr]) {
    // Values are packed from the end of the area downwards, entries from `entries_at` up.
    let mut e = entries_at;
    let mut v_end = area.len();
    for x in attrs {
        let vs = value_size(x);
        let offs = if x.value.is_empty() {
            0
        } else {
            v_end -= vs;
            area[v_end..v_end + x.value.len()].copy_from_slice(&x.value);
            v_end - values_base
        };
        let head = XattrEntry {
            name_len: x.name.len() as u8,
            name_index: x.index,
            value_offs: U16::new(offs as u16),
            value_inum: U32::new(0),
            value_size: U32::new(x.value.len() as u32),
            hash: U32::new(hash::xattr_entry(&x.name, &x.value)),
        };
        area[e..e + 16].copy_from_slice(head.as_bytes());
        area[e + 16..e + 16 + x.name.len()].copy_from_slice(&x.name);
        e += entry_size(x);
    }
}

/// The 96-byte in-inode area for `attrs` (all zero if there are none).
pub fn ibody(attrs: &[DiskXattr]) -> [u8; IBODY_SPACE] {
    let mut area = [0u8; IBODY_SPACE];
    if attrs.is_empty() {
        return area;
    }
    area[..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
    // In-inode value offsets count from the first entry, just after the magic.
    put_entries(&mut area, 4, 4, attrs);
    area
}

/// An attribute block for `attrs` with refcount `refs`; the checksum is left zero (it depends
/// on the block number, see [`super::csum::xattr_block`]).
pub fn block(attrs: &[DiskXattr], refs: u32) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    put_entries(&mut b, 32, 0, attrs);
    let h = XattrHeader {
        magic: U32::new(XATTR_MAGIC),
        refcount: U32::new(refs),
        blocks: U32::new(1),
        hash: U32::new(hash::xattr_block(
            attrs.iter().map(|x| hash::xattr_entry(&x.name, &x.value)),
        )),
        ..Default::default()
    };
    b[..32].copy_from_slice(h.as_bytes());
    b
}

/// Parses an entry list (in-inode area or block). `entries_at` is where the first entry
/// starts and `values_base` what value offsets count from. Returns `None` on malformed data.
pub fn parse(area: &[u8], entries_at: usize, values_base: usize) -> Option<Vec<DiskXattr>> {
    let mut out = Vec::new();
    let mut e = entries_at;
    loop {
        let word = area.get(e..e + 4)?;
        if word == [0, 0, 0, 0] {
            break;
        }
        let head = XattrEntry::read_from_bytes(area.get(e..e + 16)?).ok()?;
        let nl = usize::from(head.name_len);
        let name = area.get(e + 16..e + 16 + nl)?;
        let vs = head.value_size.get() as usize;
        let vo = values_base + usize::from(head.value_offs.get());
        let value = if vs == 0 {
            &[][..]
        } else {
            area.get(vo..vo + vs)?
        };
        out.push(DiskXattr {
            index: head.name_index,
            name: name.into(),
            value: value.into(),
        });
        e += (16 + nl + 3) & !3;
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fstree::Xattr;

    fn x(name: &str, value: &[u8]) -> Xattr {
        Xattr {
            name: name.as_bytes().into(),
            value: value.into(),
        }
    }

    #[test]
    fn names_split_into_prefix_indexes() {
        assert_eq!(split_name(b"user.foo"), (1, &b"foo"[..]));
        assert_eq!(split_name(b"security.selinux"), (6, &b"selinux"[..]));
        assert_eq!(split_name(b"system.posix_acl_access"), (2, &b""[..]));
        assert_eq!(
            split_name(b"system.posix_acl_accessX"),
            (7, &b"posix_acl_accessX"[..])
        );
        assert_eq!(split_name(b"weird"), (0, &b"weird"[..]));
        assert_eq!(join_name(6, b"capability"), b"security.capability");
    }

    #[test]
    fn acl_round_trip() {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 7u16, u32::MAX),
            (2, 5, 1000),
            (4, 5, u32::MAX),
            (16, 7, u32::MAX),
            (32, 4, u32::MAX),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let d = acl_to_disk(&v).unwrap();
        assert_eq!(d.len(), 4 + 4 * 4 + 8);
        assert_eq!(acl_from_disk(&d).unwrap(), v);
        assert!(acl_to_disk(&v[..7]).is_err());
    }

    #[test]
    fn inline_and_block_round_trip() {
        let attrs = to_disk(&[
            x("user.small", b"v"),
            x("user.empty", b""),
            x("security.selinux", b"system_u:object_r:bin_t:s0\0"),
            x("user.large", &[7u8; 3000]),
        ])
        .unwrap();
        let s = split(attrs.clone()).unwrap();
        assert!(s.block.iter().any(|a| &*a.name == b"large"));
        let ib = ibody(&s.inline);
        assert_eq!(parse(&ib, 4, 4).unwrap(), s.inline);
        let b = block(&s.block, 1);
        assert_eq!(parse(&b, 32, 0).unwrap(), s.block);
        let too_big = to_disk(&[x("user.a", &[0u8; 4000]), x("user.b", &[0u8; 200])]).unwrap();
        assert!(matches!(split(too_big), Err(XattrProblem::TooLarge(_))));
    }
}
