//! Directory blocks: linear (one block) and hash-indexed (htree) directories with checksum
//! tails (kernel Documentation/filesystems/ext4/directory.rst).
//!
//! A directory whose entries fit in one block is linear. A larger one gets an htree: block 0
//! is the dx root, then (for more than 507 leaves) one level of dx nodes, then the leaves,
//! each holding entries in hash order and packed full. Leaves are split only between entries;
//! when equal hashes straddle a leaf boundary the next leaf's index hash gets bit 0 set, the
//! on-disk "hash continues" marker.

use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use super::csum::crc32c_raw;
use super::hash::half_md4;
use super::layout::{
    DirEntryHead, DirTail, DxEntry, DxNode, DxRoot, DxTail, BS, DX_HASH_HALF_MD4, FT_DIR,
    FT_DIR_CSUM,
};

/// Usable bytes of a leaf block (the last 12 hold the checksum tail).
const LEAF_SPACE: usize = BS - 12;
/// Index entries in the dx root with the checksum tail: (4096 - 32 - 8) / 8.
pub const ROOT_LIMIT: usize = (BS - 32 - 8) / 8;
/// Index entries in a dx node with the checksum tail: (4096 - 8 - 8) / 8.
pub const NODE_LIMIT: usize = (BS - 8 - 8) / 8;

/// One entry to store (not `.` or `..`).
#[derive(Clone, Copy, Debug)]
pub struct Ent<'a> {
    /// Name bytes (1..=255).
    pub name: &'a [u8],
    /// Inode number.
    pub ino: u32,
    /// `FT_*` file type.
    pub ft: u8,
}

/// Record length of an entry with a name of `n` bytes.
pub fn rec_len(n: usize) -> usize {
    (8 + n + 3) & !3
}

/// A directory too large for a two-level htree (which needs the largedir feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// Leaf blocks it would need.
    pub leaves: usize,
}

/// Hashing parameters of the filesystem.
#[derive(Clone, Copy, Debug)]
pub struct HashParams {
    /// Seed words from the superblock.
    pub seed: [u32; 4],
    /// Signed-char hashing (`FLAGS_SIGNED_HASH`).
    pub signed: bool,
}

struct Shape {
    /// Entry indexes in storage order.
    order: Vec<u32>,
    /// Hashes per entry (htree only).
    hashes: Vec<u32>,
    /// Leaf boundaries: start index into `order` of each leaf.
    leaves: Vec<usize>,
    /// Number of dx nodes (0: the root points at leaves).
    nodes: usize,
}

fn linear_fits(entries: &[Ent]) -> bool {
    let mut used = 12 + 12;
    for e in entries {
        used += rec_len(e.name.len());
        if used > LEAF_SPACE {
            return false;
        }
    }
    true
}

fn shape(entries: &[Ent], hp: HashParams) -> Result<Option<Shape>, TooLarge> {
    if linear_fits(entries) {
        return Ok(None);
    }
    let hashed: Vec<(u32, u32)> = entries
        .iter()
        .map(|e| half_md4(e.name, &hp.seed, hp.signed))
        .collect();
    let mut order: Vec<u32> = (0..entries.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        (hashed[a], entries[a].name).cmp(&(hashed[b], entries[b].name))
    });
    let mut leaves = vec![0usize];
    let mut used = 0;
    for (i, &e) in order.iter().enumerate() {
        let r = rec_len(entries[e as usize].name.len());
        if used + r > LEAF_SPACE {
            leaves.push(i);
            used = 0;
        }
        used += r;
    }
    let nodes = if leaves.len() <= ROOT_LIMIT {
        0
    } else {
        let n = leaves.len().div_ceil(NODE_LIMIT);
        if n > ROOT_LIMIT {
            return Err(TooLarge {
                leaves: leaves.len(),
            });
        }
        n
    };
    Ok(Some(Shape {
        order,
        hashes: hashed.into_iter().map(|h| h.0).collect(),
        leaves,
        nodes,
    }))
}

/// Number of blocks the directory needs, and whether it is indexed.
pub fn blocks(entries: &[Ent], hp: HashParams) -> Result<(u32, bool), TooLarge> {
    Ok(match shape(entries, hp)? {
        None => (1, false),
        Some(s) => ((1 + s.nodes + s.leaves.len()) as u32, true),
    })
}

fn put_entry(block: &mut [u8], at: usize, ino: u32, name: &[u8], ft: u8, rec: usize) {
    let h = DirEntryHead {
        inode: U32::new(ino),
        rec_len: U16::new(rec as u16),
        name_len: name.len() as u8,
        file_type: ft,
    };
    block[at..at + 8].copy_from_slice(h.as_bytes());
    block[at + 8..at + 8 + name.len()].copy_from_slice(name);
}

fn seal_leaf(block: &mut [u8], seed: u32) {
    let tail = DirTail {
        rec_len: U16::new(12),
        reserved_ft: FT_DIR_CSUM,
        checksum: U32::new(crc32c_raw(seed, &block[..LEAF_SPACE])),
        ..Default::default()
    };
    block[LEAF_SPACE..].copy_from_slice(tail.as_bytes());
}

/// Fills a leaf with `ents` (already in order), the last record stretching to the tail.
fn fill_leaf<'a>(
    block: &mut [u8],
    mut at: usize,
    ents: impl Iterator<Item = (u32, &'a [u8], u8)>,
    seed: u32,
) {
    let mut last: Option<(usize, u32, &'a [u8], u8)> = None;
    for (ino, name, ft) in ents {
        if let Some((p, i, n, f)) = last.take() {
            let r = rec_len(n.len());
            put_entry(block, p, i, n, f, r);
            at = p + r;
        }
        last = Some((at, ino, name, ft));
    }
    if let Some((p, i, n, f)) = last {
        put_entry(block, p, i, n, f, LEAF_SPACE - p);
    }
    seal_leaf(block, seed);
}

fn dx_csum(block: &[u8], count_offset: usize, count: usize, seed: u32) -> u32 {
    let c = crc32c_raw(seed, &block[..count_offset + count * 8]);
    // The tail's reserved word, then its checksum field as zero.
    let c = crc32c_raw(c, &[0; 4]);
    crc32c_raw(c, &[0; 4])
}

fn put_dx_entries(block: &mut [u8], at: usize, children: &[(u32, u32)]) {
    // The first child's hash slot is the count/limit header, written by the caller.
    for (k, &(hash, blk)) in children.iter().enumerate().skip(1) {
        let e = DxEntry {
            hash: U32::new(hash),
            block: U32::new(blk),
        };
        let p = at + k * 8;
        block[p..p + 8].copy_from_slice(e.as_bytes());
    }
}

/// Renders the directory's blocks (`blocks(..).0 * 4096` bytes). `seed` is the directory
/// inode's checksum seed.
pub fn render(
    dir_ino: u32,
    parent_ino: u32,
    entries: &[Ent],
    hp: HashParams,
    seed: u32,
) -> Result<Vec<u8>, TooLarge> {
    let Some(s) = shape(entries, hp)? else {
        let mut b = vec![0u8; BS];
        put_entry(&mut b, 0, dir_ino, b".", FT_DIR, 12);
        let rest = entries.iter().map(|e| (e.ino, e.name, e.ft));
        let dots = [(parent_ino, &b".."[..], FT_DIR)];
        fill_leaf(&mut b, 12, dots.into_iter().chain(rest), seed);
        return Ok(b);
    };
    let nleaves = s.leaves.len();
    let total = 1 + s.nodes + nleaves;
    let mut out = vec![0u8; total * BS];
    let first_leaf = 1 + s.nodes;
    // Leaf start hashes, with the continuation bit where a hash run straddles the boundary.
    let mut leaf_hash = Vec::with_capacity(nleaves);
    for (l, &start) in s.leaves.iter().enumerate() {
        let end = s.leaves.get(l + 1).copied().unwrap_or(s.order.len());
        let h = s.hashes[s.order[start] as usize];
        let cont = start > 0 && s.hashes[s.order[start - 1] as usize] == h;
        leaf_hash.push(if cont { h | 1 } else { h });
        let blk = &mut out[(first_leaf + l) * BS..(first_leaf + l + 1) * BS];
        let ents = s.order[start..end].iter().map(|&i| {
            let e = &entries[i as usize];
            (e.ino, e.name, e.ft)
        });
        fill_leaf(blk, 0, ents, seed);
    }
    // Children of the root: the leaves, or the nodes (each covering NODE_LIMIT leaves).
    let root_children: Vec<(u32, u32)> = if s.nodes == 0 {
        (0..nleaves)
            .map(|l| (leaf_hash[l], (first_leaf + l) as u32))
            .collect()
    } else {
        (0..s.nodes)
            .map(|n| (leaf_hash[n * NODE_LIMIT], (1 + n) as u32))
            .collect()
    };
    for n in 0..s.nodes {
        let lo = n * NODE_LIMIT;
        let hi = ((n + 1) * NODE_LIMIT).min(nleaves);
        let children: Vec<(u32, u32)> = (lo..hi)
            .map(|l| (leaf_hash[l], (first_leaf + l) as u32))
            .collect();
        let blk = &mut out[(1 + n) * BS..(2 + n) * BS];
        let head = DxNode {
            fake_rec_len: U16::new(BS as u16),
            limit: U16::new(NODE_LIMIT as u16),
            count: U16::new(children.len() as u16),
            block: U32::new(children[0].1),
            ..Default::default()
        };
        blk[..16].copy_from_slice(head.as_bytes());
        put_dx_entries(blk, 8, &children);
        let c = dx_csum(blk, 8, children.len(), seed);
        let tail = DxTail {
            reserved: U32::new(0),
            checksum: U32::new(c),
        };
        let t = 8 + NODE_LIMIT * 8;
        blk[t..t + 8].copy_from_slice(tail.as_bytes());
    }
    let root = &mut out[..BS];
    let head = DxRoot {
        dot_inode: U32::new(dir_ino),
        dot_rec_len: U16::new(12),
        dot_name_len: 1,
        dot_file_type: FT_DIR,
        dot_name: *b".\0\0\0",
        dotdot_inode: U32::new(parent_ino),
        dotdot_rec_len: U16::new((BS - 12) as u16),
        dotdot_name_len: 2,
        dotdot_file_type: FT_DIR,
        dotdot_name: *b"..\0\0",
        reserved_zero: U32::new(0),
        hash_version: DX_HASH_HALF_MD4,
        info_length: 8,
        indirect_levels: u8::from(s.nodes > 0),
        unused_flags: 0,
        limit: U16::new(ROOT_LIMIT as u16),
        count: U16::new(root_children.len() as u16),
        block: U32::new(root_children[0].1),
    };
    root[..40].copy_from_slice(head.as_bytes());
    put_dx_entries(root, 32, &root_children);
    let c = dx_csum(root, 32, root_children.len(), seed);
    let t = 32 + ROOT_LIMIT * 8;
    root[t..t + 8].copy_from_slice(
        DxTail {
            reserved: U32::new(0),
            checksum: U32::new(c),
        }
        .as_bytes(),
    );
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HP: HashParams = HashParams {
        seed: [1, 2, 3, 4],
        signed: true,
    };

    #[test]
    fn small_directories_are_linear() {
        let names: Vec<Vec<u8>> = (0..10).map(|i| format!("f{i}").into_bytes()).collect();
        let ents: Vec<Ent> = names
            .iter()
            .map(|n| Ent {
                name: n,
                ino: 20,
                ft: 1,
            })
            .collect();
        assert_eq!(blocks(&ents, HP).unwrap(), (1, false));
        let b = render(12, 2, &ents, HP, 0).unwrap();
        assert_eq!(b.len(), BS);
        assert_eq!(&b[8..9], b".");
        assert_eq!(b[BS - 5], FT_DIR_CSUM);
    }

    #[test]
    fn big_directories_get_one_or_two_index_levels() {
        let names: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("file-{i:05}").into_bytes())
            .collect();
        let ents: Vec<Ent> = names
            .iter()
            .map(|n| Ent {
                name: n,
                ino: 20,
                ft: 1,
            })
            .collect();
        let (n, idx) = blocks(&ents, HP).unwrap();
        assert!(idx && n > 2);
        assert_eq!(render(12, 2, &ents, HP, 0).unwrap().len(), n as usize * BS);
        let names: Vec<Vec<u8>> = (0..60_000)
            .map(|i| format!("entry-{i:06}-{}", "x".repeat(i % 40)).into_bytes())
            .collect();
        let ents: Vec<Ent> = names
            .iter()
            .map(|n| Ent {
                name: n,
                ino: 20,
                ft: 1,
            })
            .collect();
        let s = shape(&ents, HP).unwrap().unwrap();
        assert!(s.nodes > 0, "{} leaves", s.leaves.len());
    }
}
