//! Hashes ext4 stores: the half-MD4 directory hash that orders htree leaves, and the
//! extended attribute entry and block hashes (kernel Documentation/filesystems/ext4/
//! directory.rst "Hash Tree Directories", attributes.rst; the algorithms are e2fsprogs
//! lib/ext2fs/dirhash.c and the kernel's fs/ext4/hash.c, xattr.c).

/// The initial state used when the superblock's hash seed is all zero (the MD4 constants).
const DEFAULT_SEED: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// The four seed words a superblock hash seed stands for.
pub fn seed_words(seed: &[u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, c) in seed.chunks_exact(4).enumerate() {
        w[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    if w == [0; 4] {
        DEFAULT_SEED
    } else {
        w
    }
}

/// Packs up to 32 name bytes into eight words the way the hash expects: big-endian-ish
/// accumulation of (optionally sign-extended) bytes, padded with a length-derived word.
fn pack(msg: &[u8], len: usize, signed: bool, out: &mut [u32; 8]) {
    let mut pad = (len as u32) | ((len as u32) << 8);
    pad |= pad << 16;
    let mut val = pad;
    let take = len.min(32);
    let mut n = 0usize;
    for (i, &b) in msg[..take].iter().enumerate() {
        let c = if signed {
            i32::from(b as i8) as u32
        } else {
            u32::from(b)
        };
        val = c.wrapping_add(val << 8);
        if i % 4 == 3 {
            out[n] = val;
            n += 1;
            val = pad;
        }
    }
    if n < 8 {
        out[n] = val;
        n += 1;
    }
    while n < 8 {
        out[n] = pad;
        n += 1;
    }
}

fn half_md4_transform(buf: &mut [u32; 4], inp: &[u32; 8]) {
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    round!(f, a, b, c, d, inp[0], 3);
    round!(f, d, a, b, c, inp[1], 7);
    round!(f, c, d, a, b, inp[2], 11);
    round!(f, b, c, d, a, inp[3], 19);
    round!(f, a, b, c, d, inp[4], 3);
    round!(f, d, a, b, c, inp[5], 7);
    round!(f, c, d, a, b, inp[6], 11);
    round!(f, b, c, d, a, inp[7], 19);

    round!(g, a, b, c, d, inp[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, inp[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, inp[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, inp[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// The half-MD4 hash of a directory entry name: `(major, minor)`. The major hash has bit 0
/// clear (the htree uses it as a collision marker) and is never the end-of-directory value.
pub fn half_md4(name: &[u8], seed: &[u32; 4], signed: bool) -> (u32, u32) {
    let mut buf = *seed;
    let mut inp = [0u32; 8];
    let mut rest = name;
    while !rest.is_empty() {
        pack(rest, rest.len(), signed, &mut inp);
        half_md4_transform(&mut buf, &inp);
        rest = rest.get(32..).unwrap_or_default();
    }
    let mut hash = buf[1] & !1;
    // 0x7fffffff << 1 marks the end of directory for 32-bit readdir cookies.
    if hash == 0x7FFF_FFFF << 1 {
        hash = (0x7FFF_FFFF - 1) << 1;
    }
    (hash, buf[2])
}

/// Hash of an extended attribute entry: its name (after the prefix) and its value words.
pub fn xattr_entry(name: &[u8], value: &[u8]) -> u32 {
    let mut h: u32 = 0;
    for &b in name {
        h = (h << 5) ^ (h >> 27) ^ u32::from(b);
    }
    for w in value.chunks(4) {
        let mut x = [0u8; 4];
        x[..w.len()].copy_from_slice(w);
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(x);
    }
    h
}

/// Hash of an extended attribute block: combines the entry hashes in order.
pub fn xattr_block(entry_hashes: impl IntoIterator<Item = u32>) -> u32 {
    let mut h: u32 = 0;
    for e in entry_hashes {
        if e == 0 {
            return 0;
        }
        h = (h << 16) ^ (h >> 16) ^ e;
    }
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_seed_falls_back_to_md4_constants() {
        assert_eq!(seed_words(&[0; 16]), DEFAULT_SEED);
        let mut s = [0u8; 16];
        s[0] = 1;
        assert_eq!(seed_words(&s), [1, 0, 0, 0]);
    }

    #[test]
    fn signedness_only_matters_for_high_bytes() {
        let seed = DEFAULT_SEED;
        assert_eq!(
            half_md4(b"abc", &seed, true),
            half_md4(b"abc", &seed, false)
        );
        assert_ne!(
            half_md4(b"caf\xe9", &seed, true),
            half_md4(b"caf\xe9", &seed, false)
        );
    }

    /// Compares with debugfs's `dx_hash`, the reference implementation, when installed.
    #[test]
    fn matches_debugfs_dx_hash() {
        let Some(debugfs) = ["/usr/sbin/debugfs", "/sbin/debugfs", "/usr/bin/debugfs"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|p| p.is_file())
        else {
            panic!("debugfs (e2fsprogs) is required for this test; .ci/run installs it");
        };
        let seed_str = "0a1b2c3d-4e5f-4061-8273-8495a6b7c8d9";
        let seed_bytes: Vec<u8> = (0..16)
            .map(|i| {
                let hex: String = seed_str.chars().filter(|c| *c != '-').collect();
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()
            })
            .collect();
        let seed = seed_words(&seed_bytes.try_into().unwrap());
        let long = "x".repeat(100);
        for name in [
            "a",
            "hello",
            "entry-000123-xxxxxxxxxx",
            long.as_str(),
            "12345678901234567890123456789012",
        ] {
            let out = std::process::Command::new(debugfs)
                .args([
                    "-R",
                    &format!("dx_hash -h half_md4 -s {seed_str} {name}"),
                    "/dev/null",
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            // "Hash of NAME is 0x1234abcd (minor 0x...)"
            let hex = text
                .split("is 0x")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or_else(|| panic!("unexpected debugfs output: {text:?}"));
            let want = u32::from_str_radix(hex, 16).unwrap();
            let (got, _) = half_md4(name.as_bytes(), &seed, true);
            assert_eq!(got, want, "{name}");
        }
    }
}
