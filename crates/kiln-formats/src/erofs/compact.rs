//! Compacted logical cluster indexes (`EROFS_INODE_COMPRESSED_COMPACT`), the form mkfs.erofs
//! writes by default: 2 or 4 bytes per 4 KiB logical cluster instead of the full format's 8.
//!
//! Facts from the format (kernel fs/erofs/zmap.c, erofs-utils `include/erofs_fs.h`):
//! - The array starts at `ebase` = the inode + xattrs rounded up to 8, plus the 8-byte map
//!   header. It holds *packs*: a 4-byte pack covers 2 logical clusters in 8 bytes, a 2-byte
//!   pack covers 16 in 32 bytes. Each pack ends with a little-endian u32 block address; the
//!   rest is one bit field per logical cluster (16 bits in 4-byte packs, 14 in 2-byte ones,
//!   packed from bit 0): the low 12 bits are the value, the next 2 the [`lcluster`] type.
//! - Order: 4-byte packs until `ebase + 4 * k` is 32-byte aligned (`k` = 0, 2, 4 or 6 logical
//!   clusters), then, with `ADVISE_COMPACTED_2B`, 2-byte packs for the largest multiple of 16
//!   that is left, then 4-byte packs for the rest (an odd last one is padded with a zero entry).
//! - A HEAD/PLAIN value is its cluster offset; a NONHEAD value is `delta[0]` (the distance back
//!   to its head, or [`D0_CBLKCNT`] | block count in the first NONHEAD after a head), except in
//!   the last slot of a pack, which holds `delta[1]` (the distance forward to the next head,
//!   capped below [`D0_CBLKCNT`]) unless it carries a block count.
//! - Heads store no block address: the kernel counts, from the pack's address, the blocks of
//!   the physical clusters whose heads and block counts precede the head in the same pack (one
//!   block for a head that no block count follows). So the clusters headed in one pack must lie
//!   back to back in logical order; [`encode`] checks that by decoding what it wrote.
//! - With big physical clusters both `ADVISE_BIG_PCLUSTER_1` and `_2` are set, and then a
//!   PLAIN head followed by a NONHEAD needs the block count (1) too.

use super::layout::{lcluster, LclusterIndex, D0_CBLKCNT};

/// `h_advise` bit: the middle of the array uses 2-byte packs.
pub const ADVISE_COMPACTED_2B: u16 = 0x0001;
/// `h_advise` bit: big physical clusters for PLAIN and HEAD2 logical clusters too (required
/// together with `ADVISE_BIG_PCLUSTER_1` for compacted indexes).
pub const ADVISE_BIG_PCLUSTER_2: u16 = 0x0004;

/// Value bits of an entry (the logical cluster bits, 12).
const LOBITS: u32 = 12;

/// Where each logical cluster's pack lies: (byte offset from `ebase` of the pack, pack size in
/// bytes, entries per pack, index of the first logical cluster in the pack).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pack {
    off: u64,
    bytes: u64,
    vcnt: usize,
    first: usize,
}

/// The regions of an `n`-entry array starting at `ebase`: 4-byte packs, 2-byte packs, 4-byte
/// packs (entry counts).
fn regions(n: usize, ebase: u64) -> (usize, usize, usize) {
    let initial = (((32 - ebase % 32) / 4) & 7) as usize;
    if initial >= n {
        return (n, 0, 0);
    }
    let two = (n - initial) / 16 * 16;
    (initial, two, n - initial - two)
}

/// Bytes of the array for `n` logical clusters at `ebase`.
pub fn array_len(n: usize, ebase: u64) -> u64 {
    let (a, b, c) = regions(n, ebase);
    4 * a.next_multiple_of(2) as u64 + 2 * b as u64 + 4 * c.next_multiple_of(2) as u64
}

/// The packs of an `n`-entry array at `ebase`, in order.
fn packs(n: usize, ebase: u64) -> Vec<Pack> {
    let (a, b, c) = regions(n, ebase);
    let mut out = Vec::with_capacity(a.div_ceil(2) + b / 16 + c.div_ceil(2));
    let (mut off, mut first) = (0u64, 0usize);
    for (count, vcnt, bytes) in [(a, 2, 8), (b, 16, 32), (c, 2, 8)] {
        for _ in 0..count.div_ceil(vcnt) {
            out.push(Pack {
                off,
                bytes,
                vcnt,
                first,
            });
            off += bytes;
            first += vcnt;
        }
    }
    out
}

fn encodebits(p: &Pack) -> u32 {
    ((p.bytes as u32 - 4) * 8) / p.vcnt as u32
}

fn put_bits(out: &mut [u8], bit: u32, v: u32) {
    for k in 0..24u32 {
        if v >> k & 1 != 0 {
            let b = (bit + k) as usize;
            out[b / 8] |= 1 << (b % 8);
        }
    }
}

fn get_bits(pack: &[u8], bit: u32, width: u32) -> u32 {
    let mut v = 0u32;
    for k in 0..width {
        let b = (bit + k) as usize;
        if pack.get(b / 8).is_some_and(|x| x >> (b % 8) & 1 != 0) {
            v |= 1 << k;
        }
    }
    v
}

fn kind(x: &LclusterIndex) -> u16 {
    x.di_advise.get() & 3
}

fn d0(x: &LclusterIndex) -> u16 {
    x.di_u.get() as u16
}

fn d1(x: &LclusterIndex) -> u16 {
    (x.di_u.get() >> 16) as u16
}

/// Blocks of the physical cluster headed at `j`: the block count in the NONHEAD after it, else
/// one.
fn head_blocks(full: &[LclusterIndex], j: usize) -> u32 {
    match full.get(j + 1) {
        Some(y) if kind(y) == lcluster::NONHEAD && d0(y) & D0_CBLKCNT != 0 => {
            u32::from(d0(y) & !D0_CBLKCNT)
        }
        _ => 1,
    }
}

/// Encodes full indexes (as the writer builds them: a block count after every head that a
/// NONHEAD follows) into the compacted array for `ebase`. `None` when the result would not map
/// the same way, which happens when two heads of one pack have clusters that are not back to
/// back: the caller then keeps the full form. `size` is the file size (a head at or past it only marks
/// the end of file; its address is never used).
pub fn encode(full: &[LclusterIndex], size: u64, ebase: u64) -> Option<Vec<u8>> {
    let n = full.len();
    let mut out = vec![0u8; array_len(n, ebase) as usize];
    // Where the physical cluster of the next head starts, with back-to-back placement.
    let mut next_blk = 0u32;
    for p in packs(n, ebase) {
        let eb = encodebits(&p);
        let bytes = &mut out[p.off as usize..(p.off + p.bytes) as usize];
        // The pack's address: its first head's block minus the blocks the kernel counts in
        // front of that head in this pack, which can only be a block count in slot 0 (of the
        // cluster the previous pack's last slot heads). Without a head, the running address.
        let mut base = next_blk;
        let mut seen_head = false;
        for i in 0..p.vcnt {
            let j = p.first + i;
            let Some(x) = full.get(j) else { break };
            let v = if kind(x) == lcluster::NONHEAD {
                if d0(x) & D0_CBLKCNT != 0 {
                    d0(x)
                } else if i + 1 == p.vcnt {
                    d1(x).min(D0_CBLKCNT - 1)
                } else {
                    d0(x).min(D0_CBLKCNT - 1)
                }
            } else {
                let la = j as u64 * 4096 + u64::from(x.di_clusterofs.get());
                if la < size {
                    let blk = x.di_u.get();
                    if !seen_head {
                        let slot0 = &full[p.first];
                        let before = if i > 0 && d0(slot0) & D0_CBLKCNT != 0 {
                            u32::from(d0(slot0) & !D0_CBLKCNT)
                        } else {
                            0
                        };
                        base = blk.wrapping_sub(before);
                    }
                    next_blk = blk.wrapping_add(head_blocks(full, j));
                }
                seen_head = true;
                x.di_clusterofs.get()
            };
            put_bits(
                bytes,
                eb * i as u32,
                (u32::from(kind(x)) << LOBITS) | u32::from(v),
            );
        }
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&base.to_le_bytes());
    }
    // Keep it only if it decodes to the same mapping: same heads (type, offset, address),
    // same block counts, and every NONHEAD looking back to the same head.
    let back = decode(&out, n, ebase).ok()?;
    let (a_owner, b_owner) = (owners(full), owners(&back));
    let same = full.iter().zip(&back).enumerate().all(|(j, (a, b))| {
        kind(a) == kind(b)
            && a_owner[j] == b_owner[j]
            && if kind(a) == lcluster::NONHEAD {
                (d0(a) & D0_CBLKCNT != 0) == (d0(b) & D0_CBLKCNT != 0)
                    && (d0(a) & D0_CBLKCNT == 0 || d0(a) == d0(b))
            } else {
                let la = j as u64 * 4096 + u64::from(a.di_clusterofs.get());
                a.di_clusterofs.get() == b.di_clusterofs.get()
                    && (la >= size || a.di_u.get() == b.di_u.get())
            }
    });
    same.then_some(out)
}

/// For each logical cluster, the head its lookback chain reaches (the kernel follows
/// `delta[0]`, a block count standing for 1); `usize::MAX` when it leads nowhere.
fn owners(idx: &[LclusterIndex]) -> Vec<usize> {
    let mut out = Vec::with_capacity(idx.len());
    for j in 0..idx.len() {
        let mut k = j;
        let owner = loop {
            let x = &idx[k];
            if kind(x) != lcluster::NONHEAD {
                break k;
            }
            let back = if d0(x) & D0_CBLKCNT != 0 {
                1
            } else {
                usize::from(d0(x))
            };
            match k.checked_sub(back).filter(|_| back > 0) {
                Some(b) if b < k => k = b,
                _ => break usize::MAX,
            }
        };
        out.push(owner);
    }
    out
}

/// Decodes a compacted array of `n` logical clusters at `ebase` into full-form indexes the
/// way the kernel reads them (`z_erofs_load_compact_lcluster`): heads get the block address
/// the kernel computes, NONHEADs their `delta[0]` (`delta[1]` is left 0). Errors give the
/// byte offset from `ebase` and what is wrong.
pub fn decode(
    bytes: &[u8],
    n: usize,
    ebase: u64,
) -> Result<Vec<LclusterIndex>, (u64, &'static str)> {
    let mut out = Vec::with_capacity(n.min(1 << 20));
    for p in packs(n, ebase) {
        let pack = bytes
            .get(p.off as usize..(p.off + p.bytes) as usize)
            .ok_or((p.off, "compacted index array truncated"))?;
        let eb = encodebits(&p);
        let entry = |i: usize| {
            let v = get_bits(pack, eb * i as u32, LOBITS + 2);
            ((v >> LOBITS) as u16 & 3, (v & ((1 << LOBITS) - 1)) as u16)
        };
        let base = u32::from_le_bytes([
            pack[pack.len() - 4],
            pack[pack.len() - 3],
            pack[pack.len() - 2],
            pack[pack.len() - 1],
        ]);
        for i in 0..p.vcnt {
            if p.first + i >= n {
                break;
            }
            let (t, lo) = entry(i);
            let mut x = LclusterIndex::default();
            x.di_advise.set(t);
            if t == lcluster::NONHEAD {
                let delta0 = if lo & D0_CBLKCNT != 0 || i + 1 != p.vcnt {
                    lo
                } else {
                    // The last slot holds delta[1]: delta[0] follows from the slot before.
                    match entry(i - 1) {
                        (pt, plo) if pt == lcluster::NONHEAD => {
                            if plo & D0_CBLKCNT != 0 {
                                2
                            } else {
                                plo + 1
                            }
                        }
                        _ => 1,
                    }
                };
                x.di_u.set(u32::from(delta0));
            } else if t == 3 {
                return Err((p.off, "reserved lcluster type in compacted indexes"));
            } else {
                x.di_clusterofs.set(lo);
                // Count the blocks of the clusters headed earlier in this pack.
                let mut nblk = 0u32;
                let mut k = i as isize;
                while k > 0 {
                    k -= 1;
                    let (kt, klo) = entry(k as usize);
                    if kt == lcluster::NONHEAD {
                        if klo & D0_CBLKCNT != 0 {
                            k -= 1;
                            nblk += u32::from(klo & !D0_CBLKCNT);
                            continue;
                        }
                        if klo <= 1 {
                            return Err((p.off, "NONHEAD without block count right after a head"));
                        }
                        k -= klo as isize - 2;
                        continue;
                    }
                    nblk += 1;
                }
                x.di_u.set(base.wrapping_add(nblk));
            }
            out.push(x);
        }
    }
    Ok(out)
}
