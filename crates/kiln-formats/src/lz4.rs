//! LZ4 block format: an encoder with a fast mode (one hash table, greedy parsing) and a
//! high-compression mode (hash chains with lazy matching, lz4hc-class ratio), both able to run
//! in "fill the destination" mode, plus a bounds-checked decoder.
//!
//! Spec: the LZ4 Block Format description (lz4/doc/lz4_Block_format.md). A block is a series of
//! sequences `token | [literal length bytes] | literals | offset (LE u16) | [match length
//! bytes]`; the last sequence has literals only. The end-of-block rules the reference decoders
//! rely on: the last 5 bytes are literals (`LASTLITERALS`) and the last match starts at least 12
//! bytes before the end (`MFLIMIT`). Offsets are 1..=65535, the minimum match is 4 bytes.
//!
//! Fill-the-destination mode compresses as much of the input as fits in `cap` output bytes
//! (what EROFS fixed-size physical clusters need): every sequence is only committed when the
//! output still has room for it *and* for the shortest final literal run that keeps the
//! end-of-block rules true; the final literal run then takes as many bytes as still fit.

/// Minimum match length.
const MINMATCH: usize = 4;
/// The last match must start at least this many bytes before the end of the block.
const MFLIMIT: usize = 12;
/// The last this-many bytes of a block are always literals.
const LASTLITERALS: usize = 5;
/// Largest match offset.
const MAX_DISTANCE: usize = 65535;
/// Blocks shorter than this hold literals only (no room for a match under the end rules).
const MIN_INPUT_FOR_MATCH: usize = MFLIMIT + 1;

/// Encoder effort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Greedy parsing over a single-entry hash table: hundreds of MB/s per core.
    Fast,
    /// Hash chains with lazy matching. `1..=12`; the level sets the chain search depth
    /// (9 is lz4hc's default, 12 searches deepest).
    High(u8),
}

impl Level {
    /// A match at least this long ends the search (and skips lazy evaluation).
    fn nice(self) -> usize {
        match self {
            Level::Fast => 0,
            Level::High(l) if l >= 10 => 1024,
            Level::High(_) => 64,
        }
    }

    fn attempts(self) -> usize {
        match self {
            Level::Fast => 0,
            // lz4hc's depths: 2^(level-1) chain entries for levels 3..=9 (level 9 = 256),
            // deeper searches above.
            Level::High(l) => match l.clamp(1, 12) {
                l @ 1..=9 => 1usize << (l.max(3) - 1),
                10 => 1024,
                11 => 2048,
                _ => 4096,
            },
        }
    }
}

/// Errors from the decoder. Offsets are byte positions in the compressed input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lz4Error {
    /// The input ended inside a sequence.
    #[error("lz4: input truncated at offset {0}")]
    Truncated(usize),
    /// A match offset is 0 or points before the start of the output.
    #[error("lz4: bad match offset {offset} at input offset {at} (output so far {produced})")]
    BadOffset {
        offset: usize,
        at: usize,
        produced: usize,
    },
    /// The block decodes to more bytes than allowed.
    #[error("lz4: output exceeds {limit} bytes at input offset {at}")]
    OutputOverflow { limit: usize, at: usize },
    /// The block decodes to a different size than expected.
    #[error("lz4: decoded {got} bytes, expected {expected}")]
    SizeMismatch { got: usize, expected: usize },
}

/// Number of extra length bytes for a length field whose nibble saturates at 15.
#[inline]
fn ext_len(n: usize) -> usize {
    if n >= 15 {
        (n - 15) / 255 + 1
    } else {
        0
    }
}

/// Encoded size of a sequence with `lit` literals and a match of `mlen` bytes.
#[inline]
fn seq_cost(lit: usize, mlen: usize) -> usize {
    1 + ext_len(lit) + lit + 2 + ext_len(mlen - MINMATCH)
}

// One bounds check per read; the conversions cannot fail on a slice of exactly that length.
#[inline]
fn read_u32(s: &[u8], i: usize) -> u32 {
    s[i..i + 4].try_into().map_or(0, u32::from_le_bytes)
}

/// The 4 bytes at `i`, `None` past the end (or for an `i` that wrapped below zero).
#[inline(always)]
fn load4(s: &[u8], i: usize) -> Option<u32> {
    s.get(i..i.wrapping_add(4))
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

/// The 8 bytes at `i` (0 past the end, which callers never ask for).
#[inline(always)]
fn load8(s: &[u8], i: usize) -> u64 {
    s.get(i..i.wrapping_add(8))
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Length of the common prefix of `s[a..]` and `s[b..]` (a < b), not reading past `limit`.
#[inline(always)]
fn common(s: &[u8], a: usize, b: usize, limit: usize) -> usize {
    let max = limit - b;
    // Two equal-length views: the loop below then needs no bounds checks.
    let (x, y) = (&s[a..a + max], &s[b..b + max]);
    let mut n = 0;
    for (cx, cy) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
        let (Ok(cx), Ok(cy)) = (<[u8; 8]>::try_from(cx), <[u8; 8]>::try_from(cy)) else {
            break;
        };
        let d = u64::from_le_bytes(cx) ^ u64::from_le_bytes(cy);
        if d != 0 {
            return n + (d.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n + x[n..]
        .iter()
        .zip(&y[n..])
        .take_while(|(p, q)| p == q)
        .count()
}

/// Bytes a literal copy may write past its end: short runs are copied 16 bytes at a time and
/// the excess is overwritten by what follows.
const WILD: usize = 16;

/// The sequence writer: writes into a scratch buffer with [`WILD`] bytes of slack past `cap`
/// (indexing instead of growing a `Vec`: the fast mode emits a sequence every few bytes), and
/// tracks the output budget for fill-the-destination mode.
struct Emitter<'a> {
    buf: &'a mut [u8],
    o: usize,
    cap: usize,
}

impl Emitter<'_> {
    #[inline]
    fn len(&mut self, mut n: usize) {
        while n >= 255 {
            self.buf[self.o] = 255;
            self.o += 1;
            n -= 255;
        }
        self.buf[self.o] = n as u8;
        self.o += 1;
    }

    #[inline(always)]
    fn literals(&mut self, src: &[u8], from: usize, to: usize) {
        let n = to - from;
        let o = self.o;
        // Runs of up to 64 bytes are copied in 16-byte pieces, the last one overrunning (a
        // library call costs more than the copy); the overrun is overwritten by what follows.
        let padded = n.next_multiple_of(WILD);
        match (
            self.buf.get_mut(o..o + padded),
            src.get(from..from + padded),
        ) {
            (Some(d), Some(s)) if n <= 4 * WILD => {
                for (d, s) in d.chunks_exact_mut(WILD).zip(s.chunks_exact(WILD)) {
                    d.copy_from_slice(s);
                }
            }
            _ => self.buf[o..o + n].copy_from_slice(&src[from..to]),
        }
        self.o += n;
    }

    /// Emits literals `src[anchor..mstart]` and a match, if it fits with room for the final
    /// literal run it forces. Returns false (and writes nothing) otherwise.
    #[inline(always)]
    fn sequence(
        &mut self,
        src: &[u8],
        anchor: usize,
        mstart: usize,
        off: usize,
        mlen: usize,
    ) -> bool {
        let lit = mstart - anchor;
        let cost = seq_cost(lit, mlen);
        // Shortest final run allowed after this match: the block must end >= 5 bytes after the
        // match and >= 13 bytes after its start.
        let min_final = LASTLITERALS.max(MIN_INPUT_FOR_MATCH.saturating_sub(mlen));
        if self.o + cost + 1 + min_final > self.cap {
            return false;
        }
        let ml = mlen - MINMATCH;
        self.buf[self.o] = ((lit.min(15) as u8) << 4) | ml.min(15) as u8;
        self.o += 1;
        if lit >= 15 {
            self.len(lit - 15);
        }
        self.literals(src, anchor, mstart);
        self.buf[self.o..self.o + 2].copy_from_slice(&(off as u16).to_le_bytes());
        self.o += 2;
        if ml >= 15 {
            self.len(ml - 15);
        }
        true
    }

    /// Emits the final literal run from `anchor`, as long as fits; returns the input consumed.
    fn finish(&mut self, src: &[u8], anchor: usize) -> usize {
        let avail = self.cap - self.o;
        let mut lit = src.len() - anchor;
        if 1 + ext_len(lit) + lit > avail {
            lit = avail.saturating_sub(1);
            while lit > 0 && 1 + ext_len(lit) + lit > avail {
                lit -= 1;
            }
        }
        if lit == 0 && anchor == 0 {
            // An empty block is a single empty token; in fill mode nothing fit.
            if src.is_empty() && avail >= 1 {
                self.buf[self.o] = 0;
                self.o += 1;
            }
            return 0;
        }
        self.buf[self.o] = (lit.min(15) as u8) << 4;
        self.o += 1;
        if lit >= 15 {
            self.len(lit - 15);
        }
        self.buf[self.o..self.o + lit].copy_from_slice(&src[anchor..anchor + lit]);
        self.o += lit;
        anchor + lit
    }
}

/// Both parsers step `1 + misses >> SKIP_SHIFT` positions after `misses` failed searches.
const SKIP_SHIFT: u32 = 6;

/// Hash table size (log2) of both modes: 16K entries of 4 bytes stay within a core's L1/L2
/// (the table is read once per input position, so its misses dominate the high mode).
const HASH_LOG: u32 = 15;
const HASH_SIZE: usize = 1 << HASH_LOG;
/// Chain table: one 16-bit back distance per position modulo 64 KiB, which is exactly the
/// match window (a distance of `u16::MAX` ends the chain).
const CHAIN_SIZE: usize = 1 << 16;
/// Absolute positions start here, so a zeroed or older entry is always more than a window away.
const FIRST_BASE: u32 = 1 << 17;
/// Matches start within the first this-many bytes of a block (positions are 32-bit); the
/// rest of a larger block is stored as literals. EROFS units are far smaller.
const MAX_SEARCH: usize = 1 << 30;

/// The fast mode's table: the first 4K entries of the shared one (16 KiB, L1-resident).
const FAST_HASH_LOG: u32 = 12;
const FAST_HASH_SIZE: usize = 1 << FAST_HASH_LOG;

/// Hash of the low 5 bytes of `v` (the fast mode's; little-endian reads).
#[inline]
fn hash5(v: u64) -> usize {
    ((v << 24).wrapping_mul(889_523_592_379) >> (64 - FAST_HASH_LOG)) as usize
}

#[inline]
fn hash4(v: u32) -> usize {
    (v.wrapping_mul(2_654_435_761) >> (32 - HASH_LOG)) as usize
}

/// A reusable compressor. Its tables are kept between calls (positions are stored with a
/// moving base, so nothing is cleared between blocks), which matters when a caller compresses
/// many small EROFS clusters.
pub struct Compressor {
    level: Level,
    /// Latest absolute position (`base + offset`) of each hash.
    head: Box<[u32; HASH_SIZE]>,
    /// Distance to the previous position with the same hash (high mode only).
    chain: Box<[u16; CHAIN_SIZE]>,
    /// Absolute position of the current block's first byte.
    base: u32,
    /// One past the absolute positions the current block may store.
    end: u32,
    /// The emitter's output buffer, kept between calls.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level)
            .finish()
    }
}

impl Compressor {
    /// A compressor for `level`.
    pub fn new(level: Level) -> Self {
        Self {
            level,
            head: Box::new([0; HASH_SIZE]),
            chain: Box::new([u16::MAX; CHAIN_SIZE]),
            base: FIRST_BASE,
            end: FIRST_BASE,
            scratch: Vec::new(),
        }
    }

    /// Starts a new block of `len` bytes: moves the base more than a window past every
    /// position the previous blocks stored, so their entries read as out of reach.
    fn reset(&mut self, len: usize) {
        let len = len.min(MAX_SEARCH) as u64;
        let mut next = u64::from(self.end) + MAX_DISTANCE as u64 + 2;
        if next + len >= u64::from(u32::MAX) {
            self.head.fill(0);
            next = u64::from(FIRST_BASE) + MAX_DISTANCE as u64 + 2;
        }
        self.base = next as u32;
        self.end = (next + len) as u32;
    }

    /// Compresses all of `src` as one block, appending to `out`.
    pub fn compress(&mut self, src: &[u8], out: &mut Vec<u8>) {
        self.compress_into(src, usize::MAX, out);
    }

    /// Compresses as much of `src` as fits in `cap` bytes, appending to `out`. Returns the
    /// number of input bytes the block encodes (it decodes to exactly `src[..n]`).
    pub fn compress_dest(&mut self, src: &[u8], cap: usize, out: &mut Vec<u8>) -> usize {
        self.compress_into(src, cap, out)
    }

    fn compress_into(&mut self, src: &[u8], cap: usize, out: &mut Vec<u8>) -> usize {
        // Never more than the worst case for the whole input.
        let cap = cap.min(compress_bound(src.len()));
        let mut scratch = std::mem::take(&mut self.scratch);
        if scratch.len() < cap + WILD {
            scratch.resize(cap + WILD, 0);
        }
        let mut em = Emitter {
            buf: &mut scratch,
            o: 0,
            cap,
        };
        let consumed = if src.len() < MIN_INPUT_FOR_MATCH {
            em.finish(src, 0)
        } else {
            self.reset(src.len());
            let anchor = match self.level {
                Level::Fast => self.fast(src, &mut em),
                Level::High(_) => self.high(src, &mut em),
            };
            em.finish(src, anchor)
        };
        let written = em.o;
        out.extend_from_slice(&scratch[..written]);
        self.scratch = scratch;
        consumed
    }

    /// Greedy parse; returns the anchor of the final literal run.
    ///
    /// Shaped like the reference encoder's fast loop, because the loop is bound by memory
    /// latency (the table entry, then the candidate's bytes), not by arithmetic: the next
    /// position's bytes are loaded while the current candidate is checked, the table is 16 KiB
    /// (it stays in L1), and the hash covers 5 bytes, so 4-byte coincidences that would make
    /// poor matches are not probed at all. The 8 bytes loaded for a position's hash are also
    /// what its candidate is compared with, so a probe reads the input once. Kept out of line:
    /// inlined next to the high mode, its loop variables spilled to the stack.
    #[inline(never)]
    fn fast(&mut self, src: &[u8], em: &mut Emitter<'_>) -> usize {
        let base = self.base;
        let match_limit = (src.len() - MFLIMIT).min(MAX_SEARCH); // matches start before this
        let end = src.len() - LASTLITERALS; // and end at or before this
                                            // A fixed-size view: hash5's range is the array's, so indexing needs no bounds check.
        let head: &mut [u32; FAST_HASH_SIZE] = match (&mut self.head[..FAST_HASH_SIZE]).try_into() {
            Ok(h) => h,
            Err(_) => return 0,
        };
        let mut anchor = 0usize;
        let mut ip = 0usize;
        'block: loop {
            // Find a match at or after `ip`: step 1 for the first 64 misses, then wider.
            let mut next = ip;
            let mut vnext = load8(src, next);
            let mut searches = 1usize << SKIP_SHIFT;
            let (mut cur, mut cand) = loop {
                let cur = next;
                let vcur = vnext;
                next += searches >> SKIP_SHIFT;
                searches += 1;
                if next > match_limit {
                    break 'block;
                }
                let hcur = hash5(vcur);
                let stored = head[hcur];
                vnext = load8(src, next);
                let abs = base + cur as u32;
                head[hcur] = abs;
                let dist = abs.wrapping_sub(stored) as usize;
                // Older blocks and empty entries are more than a window behind (a distance
                // of 0 wraps to the top and fails the same test).
                let cand = cur.wrapping_sub(dist);
                if dist.wrapping_sub(1) < MAX_DISTANCE && load4(src, cand) == Some(vcur as u32) {
                    break (cur, cand);
                }
            };
            loop {
                // Extend backwards over pending literals, then forwards.
                while cur > anchor && cand > 0 && src.get(cur - 1) == src.get(cand - 1) {
                    cur -= 1;
                    cand -= 1;
                }
                let mlen = MINMATCH + common(src, cand + MINMATCH, cur + MINMATCH, end);
                if !em.sequence(src, anchor, cur, cur - cand, mlen) {
                    return anchor;
                }
                anchor = cur + mlen;
                ip = anchor;
                if ip >= match_limit {
                    break 'block;
                }
                // Seed the table inside the match, then try the position right after it
                // before going back to stepping.
                let p = ip - 2;
                head[hash5(load8(src, p))] = base + p as u32;
                let v = load8(src, ip);
                let hh = hash5(v);
                let stored = head[hh];
                let abs = base + ip as u32;
                head[hh] = abs;
                let dist = abs.wrapping_sub(stored) as usize;
                let c = ip.wrapping_sub(dist);
                if dist.wrapping_sub(1) < MAX_DISTANCE && load4(src, c) == Some(v as u32) {
                    cur = ip;
                    cand = c;
                    continue;
                }
                ip += 1;
                continue 'block;
            }
        }
        anchor
    }

    /// Inserts every position in `from..to` into the hash chains.
    #[inline]
    fn insert(&mut self, src: &[u8], from: usize, to: usize) {
        let base = self.base;
        for p in from..to {
            let h = hash4(read_u32(src, p));
            let abs = base + p as u32;
            // Empty and older-block entries are more than a window back and saturate to the
            // end-of-chain distance.
            let delta = abs.wrapping_sub(self.head[h]).min(u32::from(u16::MAX)) as u16;
            self.chain[p & (CHAIN_SIZE - 1)] = delta;
            self.head[h] = abs;
        }
    }

    /// The longest match found from position `ip` (which must already be inserted) that may
    /// also extend backwards, down to `low`, and is longer than `min_len`; it ends at or
    /// before `end`. Searches at most `attempts` chain entries.
    #[inline]
    fn wider(
        &self,
        src: &[u8],
        ip: usize,
        low: usize,
        end: usize,
        min_len: usize,
        mut attempts: usize,
    ) -> Option<Match> {
        let nice = self.level.nice();
        let mut best: Option<Match> = None;
        let mut best_len = min_len;
        let seq = read_u32(src, ip);
        let lowest = ip.saturating_sub(MAX_DISTANCE);
        let mut cand = ip;
        while attempts > 0 {
            attempts -= 1;
            let d = self.chain[cand & (CHAIN_SIZE - 1)] as usize;
            if d == u16::MAX as usize || d == 0 || cand < lowest + d {
                break;
            }
            cand -= d;
            // Cheap reject: the byte that would make this match longer than the best so far
            // (counting forwards from ip; a backward extension only adds to it).
            let ahead = best_len.saturating_sub(ip - low).max(MINMATCH - 1);
            if ip + ahead < end && src[cand + ahead] != src[ip + ahead] {
                continue;
            }
            if read_u32(src, cand) != seq {
                continue;
            }
            let fwd = MINMATCH + common(src, cand + MINMATCH, ip + MINMATCH, end);
            let mut back = 0;
            while ip - back > low && cand - back > 0 && src[ip - back - 1] == src[cand - back - 1] {
                back += 1;
            }
            let len = fwd + back;
            if len > best_len {
                best_len = len;
                best = Some(Match {
                    start: ip - back,
                    len,
                    off: ip - cand,
                });
                if ip + fwd >= end || len >= nice {
                    break;
                }
            }
        }
        best
    }

    /// Inserts positions up to and including `p` (when `p` is searchable).
    #[inline]
    fn insert_to(&mut self, src: &[u8], inserted: &mut usize, p: usize) {
        if p + 1 > *inserted {
            self.insert(src, *inserted, p + 1);
            *inserted = p + 1;
        }
    }

    /// Hash-chain parse that weighs up to three overlapping matches before committing the
    /// first: after a match, the position two bytes before its end is searched for a longer
    /// one that may start earlier; when one is found, the first is shortened to make room
    /// (or dropped when fewer than 3 bytes of it would be left) and a third is looked for the
    /// same way, so that where each match ends is chosen with the next one in view. Returns
    /// the anchor of the final literal run.
    fn high(&mut self, src: &[u8], em: &mut Emitter<'_>) -> usize {
        let match_limit = (src.len() - MFLIMIT).min(MAX_SEARCH);
        let end = src.len() - LASTLITERALS;
        let attempts = self.level.attempts();
        let mut anchor = 0usize;
        let mut ip = 0usize;
        let mut inserted = 0usize;
        let mut misses = 0usize;
        'parse: while ip < match_limit {
            // Positions skipped over in a run of misses stay out of the chains: that is what
            // makes the skip cheap.
            inserted = inserted.max(ip);
            self.insert_to(src, &mut inserted, ip);
            let Some(first) = self.wider(src, ip, anchor, end, MINMATCH - 1, attempts) else {
                // Incompressible stretches: after 64 misses in a row, step over more and more
                // positions (+0.04 % output on /usr, a third less time).
                misses += 1;
                ip += 1 + (misses >> SKIP_SHIFT);
                continue;
            };
            misses = 0;
            let mut m1 = first;
            // The first match as found, in case a later choice skips too much of it.
            let mut m0 = first;
            'search2: loop {
                let probe = m1.end() - 2;
                let m2 = if probe < match_limit && m1.end() <= match_limit {
                    self.insert_to(src, &mut inserted, probe);
                    self.wider(src, probe, m1.start, end, m1.len, attempts)
                } else {
                    None
                };
                let Some(mut m2) = m2 else {
                    match emit(em, src, anchor, m1, match_limit) {
                        Emit::Full => return anchor,
                        Emit::Done(a) => anchor = a,
                    }
                    ip = anchor.max(m1.start + 1);
                    continue 'parse;
                };
                if m0.start < m1.start && m2.start < m0.end() {
                    // The first match was moved past bytes the second one does not cover.
                    m1 = m0;
                }
                if m2.start - m1.start < 3 {
                    // Too little of the first match would be left: the second replaces it.
                    m1 = m2;
                    continue 'search2;
                }
                loop {
                    // Let the second match start where a short first one would end.
                    if m2.start - m1.start < OPTIMAL_ML {
                        let mut len = m1.len.min(OPTIMAL_ML);
                        if m1.start + len > m2.end() - MINMATCH {
                            len = m2.start - m1.start + m2.len - MINMATCH;
                        }
                        let shift = (m1.start + len).saturating_sub(m2.start);
                        if shift > 0 {
                            m2.start += shift;
                            m2.len -= shift;
                        }
                    }
                    let probe = m2.end() - 3;
                    let m3 = if probe < match_limit && m2.end() <= match_limit {
                        self.insert_to(src, &mut inserted, probe);
                        self.wider(src, probe, m2.start, end, m2.len, attempts)
                    } else {
                        None
                    };
                    let Some(m3) = m3 else {
                        // Two matches: the first ends where the second starts.
                        m1.len = m1.len.min(m2.start - m1.start);
                        for m in [m1, m2] {
                            match emit(em, src, anchor, m, match_limit) {
                                Emit::Full => return anchor,
                                Emit::Done(a) => anchor = a,
                            }
                        }
                        ip = anchor.max(m2.start + 1);
                        continue 'parse;
                    };
                    if m3.start < m1.end() + 3 {
                        if m3.start >= m1.end() {
                            // The second is squeezed out: write the first, the third becomes
                            // the first, the second its fallback.
                            if m2.start < m1.end() {
                                let cut = m1.end() - m2.start;
                                m2.start += cut;
                                m2.len = m2.len.saturating_sub(cut);
                                if m2.len < MINMATCH {
                                    m2 = m3;
                                }
                            }
                            match emit(em, src, anchor, m1, match_limit) {
                                Emit::Full => return anchor,
                                Emit::Done(a) => anchor = a,
                            }
                            m1 = m3;
                            m0 = m2;
                            continue 'search2;
                        }
                        m2 = m3;
                        continue;
                    }
                    // Three ascending matches: fix where the first ends and write it.
                    if m2.start < m1.end() {
                        if m2.start - m1.start < OPTIMAL_ML {
                            let mut len = m1.len.min(OPTIMAL_ML);
                            if m1.start + len > m2.end() - MINMATCH {
                                len = m2.start - m1.start + m2.len - MINMATCH;
                            }
                            let shift = (m1.start + len).saturating_sub(m2.start);
                            if shift > 0 {
                                m2.start += shift;
                                m2.len -= shift;
                            }
                            m1.len = len;
                        } else {
                            m1.len = m2.start - m1.start;
                        }
                    }
                    match emit(em, src, anchor, m1, match_limit) {
                        Emit::Full => return anchor,
                        Emit::Done(a) => anchor = a,
                    }
                    m1 = m2;
                    m2 = m3;
                }
            }
        }
        anchor
    }
}

/// A match: `len` bytes at `start` equal the bytes `off` back.
#[derive(Clone, Copy, Debug)]
struct Match {
    start: usize,
    len: usize,
    off: usize,
}

impl Match {
    fn end(&self) -> usize {
        self.start + self.len
    }
}

/// A match shorter than this is not worth making the next one start earlier for (one token
/// byte covers 15 + 4 bytes of match; beyond that, each byte of match costs nothing).
const OPTIMAL_ML: usize = 18;

/// What [`emit`] did.
enum Emit {
    /// The destination is full: stop, the final literal run starts at the current anchor.
    Full,
    /// The new anchor (unchanged when the match was not usable).
    Done(usize),
}

/// Writes `m` as a sequence after the literals from `anchor`. A match that the overlap
/// resolution left too short, that starts before the anchor or too close to the end of the
/// block is not written (its bytes stay literals).
fn emit(em: &mut Emitter<'_>, src: &[u8], anchor: usize, m: Match, match_limit: usize) -> Emit {
    if m.len < MINMATCH || m.start < anchor || m.start >= match_limit || m.off == 0 {
        return Emit::Done(anchor);
    }
    if em.sequence(src, anchor, m.start, m.off, m.len) {
        Emit::Done(m.end())
    } else {
        Emit::Full
    }
}

/// Compresses `src` as one LZ4 block.
pub fn compress(src: &[u8], level: Level) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / 2 + 16);
    Compressor::new(level).compress(src, &mut out);
    out
}

/// Compresses as much of `src` as fits in `cap` bytes; returns (input consumed, block).
pub fn compress_dest(src: &[u8], cap: usize, level: Level) -> (usize, Vec<u8>) {
    let mut out = Vec::with_capacity(cap.min(src.len() + 16));
    let n = Compressor::new(level).compress_dest(src, cap, &mut out);
    (n, out)
}

/// Worst-case compressed size of `n` input bytes.
pub fn compress_bound(n: usize) -> usize {
    n + n / 255 + 16
}

/// Decodes one block into `out`, which must decode to at most `limit` bytes. Returns the
/// number of bytes produced.
pub fn decompress_into(src: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<usize, Lz4Error> {
    let start = out.len();
    let mut ip = 0usize;
    let byte = |i: usize| src.get(i).copied().ok_or(Lz4Error::Truncated(i));
    loop {
        let token = byte(ip)?;
        ip += 1;
        let mut lit = usize::from(token >> 4);
        if lit == 15 {
            loop {
                let b = byte(ip)?;
                ip += 1;
                lit += usize::from(b);
                if b != 255 {
                    break;
                }
            }
        }
        let lits = src
            .get(ip..ip.saturating_add(lit))
            .ok_or(Lz4Error::Truncated(src.len()))?;
        if out.len() - start + lit > limit {
            return Err(Lz4Error::OutputOverflow { limit, at: ip });
        }
        out.extend_from_slice(lits);
        ip += lit;
        if ip == src.len() {
            return Ok(out.len() - start);
        }
        let off = usize::from(u16::from_le_bytes([byte(ip)?, byte(ip + 1)?]));
        let at = ip;
        ip += 2;
        let mut mlen = usize::from(token & 15);
        if mlen == 15 {
            loop {
                let b = byte(ip)?;
                ip += 1;
                mlen += usize::from(b);
                if b != 255 {
                    break;
                }
            }
        }
        mlen += MINMATCH;
        let produced = out.len() - start;
        if off == 0 || off > produced {
            return Err(Lz4Error::BadOffset {
                offset: off,
                at,
                produced,
            });
        }
        if produced + mlen > limit {
            return Err(Lz4Error::OutputOverflow { limit, at });
        }
        let from = out.len() - off;
        if off >= mlen {
            out.extend_from_within(from..from + mlen);
        } else {
            for i in 0..mlen {
                let b = out[from + i];
                out.push(b);
            }
        }
    }
}

/// Decodes one block that must decode to exactly `size` bytes.
pub fn decompress(src: &[u8], size: usize) -> Result<Vec<u8>, Lz4Error> {
    let mut out = Vec::with_capacity(size);
    let got = decompress_into(src, &mut out, size)?;
    if got != size {
        return Err(Lz4Error::SizeMismatch {
            got,
            expected: size,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn text(n: usize) -> Vec<u8> {
        let words = [
            "erofs ",
            "block ",
            "the ",
            "compressed ",
            "cluster ",
            "lz4 ",
            "kiln\n",
            "a ",
        ];
        let mut x = 12345u32;
        let mut v = Vec::new();
        while v.len() < n {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            v.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
        }
        v.truncate(n);
        v
    }

    fn check_block_rules(block: &[u8], n: usize) {
        // Walk the sequences and check the end-of-block rules the reference decoder needs.
        let mut ip = 0;
        let mut op = 0;
        loop {
            let t = block[ip];
            ip += 1;
            let mut lit = (t >> 4) as usize;
            if lit == 15 {
                loop {
                    let b = block[ip];
                    ip += 1;
                    lit += b as usize;
                    if b != 255 {
                        break;
                    }
                }
            }
            ip += lit;
            op += lit;
            if ip == block.len() {
                break;
            }
            ip += 2;
            let mut ml = (t & 15) as usize;
            if ml == 15 {
                loop {
                    let b = block[ip];
                    ip += 1;
                    ml += b as usize;
                    if b != 255 {
                        break;
                    }
                }
            }
            assert!(
                op + MFLIMIT < n,
                "match at {op} starts too close to the end {n}"
            );
            op += ml + 4;
            assert!(
                op + LASTLITERALS <= n,
                "match ends at {op}, too close to {n}"
            );
        }
        assert_eq!(op, n);
    }

    #[test]
    fn round_trips_table() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![7],
            vec![0; 12],
            vec![0; 13],
            vec![0; 100_000],
            text(1 << 20),
            kiln_random(5, 70_000),
            [text(5000), kiln_random(9, 5000), text(5000)].concat(),
        ];
        for src in &cases {
            for level in [Level::Fast, Level::High(4), Level::High(9), Level::High(12)] {
                let c = compress(src, level);
                check_block_rules(&c, src.len());
                assert_eq!(&decompress(&c, src.len()).unwrap(), src);
                assert_eq!(&lz4_flex::block::decompress(&c, src.len()).unwrap(), src);
            }
        }
    }

    fn kiln_random(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A reused compressor must encode every block exactly as a fresh one does: EROFS units
    /// go to whichever worker thread is free, so any trace of an earlier block in the tables
    /// would make images depend on scheduling. Long blocks followed by shorter ones are the
    /// case where old positions land just inside the next block's window if the base does not
    /// advance far enough.
    #[test]
    fn reused_compressor_matches_a_fresh_one() {
        let blocks: Vec<Vec<u8>> = vec![
            vec![0; 1 << 20],
            text(20_000),
            text(100_000),
            text(20_000),
            text(300_000),
            text(200_000),
            [vec![b'a'; 600_000], text(400_000)].concat(),
            text(3000),
            kiln_random(3, 90_000),
            [text(70_000), vec![0; 200_000]].concat(),
            text(100),
        ];
        for level in [Level::Fast, Level::High(6), Level::High(12)] {
            let mut reused = Compressor::new(level);
            for cap in [usize::MAX, 65536, 4096] {
                for (i, b) in blocks.iter().enumerate() {
                    {
                        let mut a = Vec::new();
                        let na = reused.compress_dest(b, cap, &mut a);
                        let mut f = Vec::new();
                        let nf = Compressor::new(level).compress_dest(b, cap, &mut f);
                        assert_eq!((na, &a), (nf, &f), "{level:?} block {i} cap {cap}");
                        assert_eq!(decompress(&a, na).unwrap(), &b[..na]);
                    }
                }
            }
        }
    }

    #[test]
    fn high_mode_beats_fast_mode_on_text() {
        let src = text(1 << 20);
        let f = compress(&src, Level::Fast).len();
        let h = compress(&src, Level::High(9)).len();
        assert!(h < f, "hc {h} vs fast {f}");
    }

    #[test]
    fn fill_destination_uses_the_budget() {
        let src = text(1 << 20);
        for level in [Level::Fast, Level::High(9)] {
            for cap in [20, 100, 4096, 65536] {
                let (n, c) = compress_dest(&src, cap, level);
                assert!(c.len() <= cap, "{level:?} cap {cap}: {}", c.len());
                assert!(
                    c.len() + 16 >= cap,
                    "{level:?} cap {cap}: only {} used",
                    c.len()
                );
                assert!(n > cap, "text compresses: {n} from {cap}");
                check_block_rules(&c, n);
                assert_eq!(decompress(&c, n).unwrap(), &src[..n]);
            }
        }
        // Incompressible input: roughly cap bytes consumed.
        let r = kiln_random(3, 100_000);
        let (n, c) = compress_dest(&r, 4096, Level::High(9));
        assert!(c.len() <= 4096 && n > 4000 && n <= 4096);
        assert_eq!(decompress(&c, n).unwrap(), &r[..n]);
    }

    #[test]
    fn decoder_rejects_bad_input() {
        assert!(matches!(
            decompress(&[0x10], 1),
            Err(Lz4Error::Truncated(_))
        ));
        // Literal 'a' then a match with offset 2 (> 1 produced).
        assert!(matches!(
            decompress(&[0x10, b'a', 2, 0, 0x00], 10),
            Err(Lz4Error::BadOffset { .. })
        ));
        assert!(matches!(
            decompress(&[0x20, b'a', b'b'], 1),
            Err(Lz4Error::OutputOverflow { .. })
        ));
        assert!(matches!(
            decompress(&[0x10, b'a'], 2),
            Err(Lz4Error::SizeMismatch { .. })
        ));
    }

    proptest! {
        #[test]
        fn prop_round_trip(data in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..20_000),
                           rep in 0usize..4) {
            let src: Vec<u8> = data.iter().cycle().take(data.len() * (rep + 1)).copied().collect();
            for level in [Level::Fast, Level::High(9)] {
                let c = compress(&src, level);
                check_block_rules(&c, src.len());
                prop_assert_eq!(&decompress(&c, src.len()).unwrap(), &src);
                prop_assert_eq!(&lz4_flex::block::decompress(&c, src.len()).unwrap(), &src);
            }
        }

        #[test]
        fn prop_fill_destination(data in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'x'), any::<u8>()], 0..30_000),
                                 cap in 1usize..9000) {
            for level in [Level::Fast, Level::High(6)] {
                let (n, c) = compress_dest(&data, cap, level);
                prop_assert!(c.len() <= cap);
                prop_assert!(n <= data.len());
                if n > 0 {
                    check_block_rules(&c, n);
                    prop_assert_eq!(&decompress(&c, n).unwrap()[..], &data[..n]);
                    prop_assert_eq!(&lz4_flex::block::decompress(&c, n).unwrap()[..], &data[..n]);
                }
            }
        }
    }
}
