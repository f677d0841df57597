//! Resumable SHA-256 (FIPS 180-4): the hash state after a prefix of an image, a *midstate*, is
//! kept so that the plain sha256 of "base + patches" costs only the bytes from the first patch
//! to the end. The bytes before the first patch are the base's, so their state is the same for
//! every payload.
//!
//! sha2 0.10 keeps its hasher state private (0.11 can serialize it, but needs a newer
//! `digest` than the rest of the workspace uses). Its `compress` feature exposes the raw
//! compression function, which is the same SHA-NI/AVX2 code `Sha256` runs; this module adds
//! the buffering and the final padding of FIPS 180-4 §5.1.1 (a 1 bit, zeroes up to 56 mod 64,
//! then the message length in bits as a big-endian u64). The tests check it against
//! `Sha256::digest` for every split point around block boundaries.

use sha2::digest::generic_array::GenericArray;

/// SHA-256 block size in bytes; a midstate exists only at multiples of it.
pub const BLOCK: u64 = 64;

/// Initial hash value H(0), FIPS 180-4 §5.3.3.
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// Blocks handed to the compression function per call.
const BATCH: usize = 256;

/// The SHA-256 state after the first `offset` bytes of a message (`offset` a multiple of 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Midstate {
    /// Bytes hashed so far.
    pub offset: u64,
    /// The eight working words H0..H7.
    pub state: [u32; 8],
}

/// Encoded size of a [`Midstate`]: u64le offset, then H0..H7 as big-endian u32.
pub const MIDSTATE_BYTES: usize = 40;

impl Midstate {
    /// The encoding used in chunk-table sidecars.
    pub fn to_bytes(&self) -> [u8; MIDSTATE_BYTES] {
        let mut out = [0u8; MIDSTATE_BYTES];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        for (i, w) in self.state.iter().enumerate() {
            out[8 + 4 * i..12 + 4 * i].copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// Decodes [`Midstate::to_bytes`]; the offset must be a multiple of [`BLOCK`].
    pub fn from_bytes(b: &[u8; MIDSTATE_BYTES]) -> Result<Self, String> {
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[..8]);
        let offset = u64::from_le_bytes(off);
        if offset % BLOCK != 0 {
            return Err(format!(
                "midstate offset {offset} is not a multiple of {BLOCK}"
            ));
        }
        let mut state = [0u32; 8];
        for (i, w) in state.iter_mut().enumerate() {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[8 + 4 * i..12 + 4 * i]);
            *w = u32::from_be_bytes(x);
        }
        Ok(Self { offset, state })
    }
}

/// A SHA-256 hasher that can start from, and hand out, a [`Midstate`].
#[derive(Clone, Debug)]
pub struct Sha256Resumable {
    state: [u32; 8],
    /// Bytes consumed, including the buffered ones.
    len: u64,
    buf: [u8; 64],
    buffered: usize,
    scratch: Vec<GenericArray<u8, sha2::digest::typenum::U64>>,
}

impl Default for Sha256Resumable {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256Resumable {
    /// A hasher at offset 0.
    pub fn new() -> Self {
        Self::resume(&Midstate {
            offset: 0,
            state: IV,
        })
    }

    /// A hasher that has already consumed the `m.offset` bytes `m` summarises.
    pub fn resume(m: &Midstate) -> Self {
        Self {
            state: m.state,
            len: m.offset,
            buf: [0; 64],
            buffered: 0,
            scratch: Vec::new(),
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.len
    }

    /// The state here, when the position is a multiple of [`BLOCK`].
    pub fn midstate(&self) -> Option<Midstate> {
        (self.buffered == 0).then_some(Midstate {
            offset: self.len,
            state: self.state,
        })
    }

    fn compress(&mut self, blocks: &[u8]) {
        debug_assert_eq!(blocks.len() % 64, 0);
        for batch in blocks.chunks(64 * BATCH) {
            self.scratch.clear();
            self.scratch
                .extend(batch.chunks_exact(64).map(GenericArray::clone_from_slice));
            sha2::compress256(&mut self.state, &self.scratch);
        }
    }

    /// Consumes `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buffered > 0 {
            let take = (64 - self.buffered).min(data.len());
            self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < 64 {
                return;
            }
            let block = self.buf;
            self.compress(&block);
            self.buffered = 0;
        }
        let full = data.len() / 64 * 64;
        self.compress(&data[..full]);
        let rest = &data[full..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    /// The digest of everything consumed (FIPS 180-4 §5.1.1 padding).
    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut tail = [0u8; 128];
        tail[..self.buffered].copy_from_slice(&self.buf[..self.buffered]);
        tail[self.buffered] = 0x80;
        let total = if self.buffered < 56 { 64 } else { 128 };
        tail[total - 8..total].copy_from_slice(&bits.to_be_bytes());
        self.compress(&tail[..total]);
        let mut out = [0u8; 32];
        for (i, w) in self.state.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn data(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn equals_sha2_for_every_length_and_split() {
        let d = data(300);
        for n in 0..d.len() {
            let want: [u8; 32] = Sha256::digest(&d[..n]).into();
            let mut h = Sha256Resumable::new();
            h.update(&d[..n]);
            assert_eq!(h.finalize(), want, "length {n}");
            for split in [1, 55, 56, 63, 64, 65, 128] {
                if split > n {
                    continue;
                }
                let mut h = Sha256Resumable::new();
                h.update(&d[..split]);
                h.update(&d[split..n]);
                assert_eq!(h.finalize(), want, "length {n} split {split}");
            }
        }
    }

    #[test]
    fn resumes_from_a_midstate_and_round_trips_its_encoding() {
        let d = data(1 << 20);
        let want: [u8; 32] = Sha256::digest(&d).into();
        for at in [0usize, 64, 4096, 65536 + 64, (1 << 20) - 64, 1 << 20] {
            let mut h = Sha256Resumable::new();
            h.update(&d[..at]);
            let m = h.midstate().expect("block boundary");
            assert_eq!(m.offset, at as u64);
            let m = Midstate::from_bytes(&m.to_bytes()).unwrap();
            let mut r = Sha256Resumable::resume(&m);
            r.update(&d[at..]);
            assert_eq!(r.finalize(), want, "resumed at {at}");
        }
        let mut h = Sha256Resumable::new();
        h.update(&d[..100]);
        assert!(h.midstate().is_none(), "no midstate inside a block");
        let mut bad = Midstate {
            offset: 64,
            state: IV,
        }
        .to_bytes();
        bad[0] = 65;
        assert!(Midstate::from_bytes(&bad).is_err());
    }
}
