//! System Use entries: SUSP 1.12 (SP, CE, ER, ST) and Rock Ridge RRIP 1.10 (PX, PN, SL, NM,
//! TF; RE/CL/PL are read, never written). Builders return each entry as bytes; `pack` decides
//! which go into the directory record and which into continuation areas; `parse` reads them
//! back, following CE chains.
//!
//! Limits that shape the code: an entry's length is one byte (so NM and SL are split into
//! several entries, SUSP §4.1), a directory record is at most 255 bytes, and Linux reads each
//! continuation area with a single block read, so an area must not cross a 2048-byte sector
//! (fs/isofs/rock.c rejects it otherwise; it also stops after 32 CE hops).

use zerocopy::{FromBytes, IntoBytes};

use super::layout::*;
use super::time::{short_date, short_date_to_unix};

/// Longest SUSP entry.
pub const MAX_ENTRY: usize = 255;
/// Size of a CE entry.
pub const CE_LEN: usize = std::mem::size_of::<CeEntry>();
/// Longest continuation area kiln writes: one sector, never crossing its end.
pub const MAX_AREA: usize = SECTOR as usize;
/// CE hops the reader follows before declaring a loop (Linux's limit).
pub const MAX_CE_HOPS: usize = 32;

fn header(sig: &[u8; 2], len: usize) -> SuspHeader {
    SuspHeader {
        sig: *sig,
        len: len as u8,
        version: 1,
    }
}

/// SP entry for the root directory's "." record.
pub fn sp() -> Vec<u8> {
    SpEntry {
        header: header(b"SP", 7),
        check: [0xBE, 0xEF],
        len_skp: 0,
    }
    .as_bytes()
    .to_vec()
}

/// ER entry announcing RRIP 1.10.
pub fn er() -> Vec<u8> {
    let len = 8 + RRIP_ID.len() + RRIP_DES.len() + RRIP_SRC.len();
    let mut v = header(b"ER", len).as_bytes().to_vec();
    v.extend_from_slice(&[
        RRIP_ID.len() as u8,
        RRIP_DES.len() as u8,
        RRIP_SRC.len() as u8,
        1,
    ]);
    v.extend_from_slice(RRIP_ID);
    v.extend_from_slice(RRIP_DES);
    v.extend_from_slice(RRIP_SRC);
    v
}

/// CE entry pointing at `len` bytes at `offset` in sector `block`.
pub fn ce(block: u32, offset: u32, len: u32) -> Vec<u8> {
    CeEntry {
        header: header(b"CE", CE_LEN),
        block: BothU32::new(block),
        offset: BothU32::new(offset),
        len: BothU32::new(len),
    }
    .as_bytes()
    .to_vec()
}

/// PX entry (RRIP 1.10 form, 36 bytes).
pub fn px(mode: u32, nlink: u32, uid: u32, gid: u32) -> Vec<u8> {
    PxEntry {
        header: header(b"PX", 36),
        mode: BothU32::new(mode),
        nlink: BothU32::new(nlink),
        uid: BothU32::new(uid),
        gid: BothU32::new(gid),
    }
    .as_bytes()
    .to_vec()
}

/// The (high, low) words for a device number. RRIP leaves their meaning to the system; in
/// practice there are two conventions. Linux reads (major, minor), except that high = 0 with
/// low > 0xFF is taken as the old 16-bit `major << 8 | minor` (fs/isofs/rock.c). libisofs and
/// genisoimage write high = 0, low = the low 32 bits of glibc's dev_t, which agrees with that
/// old form while major < 4096 and minor < 256. So small numbers use the form every reader
/// agrees on, and larger ones the form Linux, the system kiln images boot, reads correctly.
pub fn encode_device(major: u32, minor: u32) -> (u32, u32) {
    if major < 4096 && minor < 256 {
        (0, (major << 8) | minor)
    } else {
        (major, minor)
    }
}

/// Inverse of [`encode_device`], following Linux's reading.
pub fn decode_device(high: u32, low: u32) -> (u32, u32) {
    if high == 0 && (low & !0xFF) != 0 {
        (low >> 8, low & 0xFF)
    } else {
        (high, low)
    }
}

/// PN entry for a device.
pub fn pn(major: u32, minor: u32) -> Vec<u8> {
    let (high, low) = encode_device(major, minor);
    PnEntry {
        header: header(b"PN", 20),
        high: BothU32::new(high),
        low: BothU32::new(low),
    }
    .as_bytes()
    .to_vec()
}

/// TF entry recording `mtime` as modification, access and attribute-change time (short form:
/// Linux reads only the 7-byte form; nanoseconds are not representable).
pub fn tf(mtime: i64) -> Vec<u8> {
    let d = short_date(mtime);
    let mut v = header(b"TF", 5 + 3 * 7).as_bytes().to_vec();
    v.push(TF_MODIFY | TF_ACCESS | TF_ATTRIBUTES);
    for _ in 0..3 {
        v.extend_from_slice(d.as_bytes());
    }
    v
}

/// NM entries for `name`, split into pieces of at most 250 bytes flagged CONTINUE.
pub fn nm(name: &[u8]) -> Vec<Vec<u8>> {
    const ROOM: usize = MAX_ENTRY - 5;
    let chunks: Vec<&[u8]> = if name.is_empty() {
        vec![name]
    } else {
        name.chunks(ROOM).collect()
    };
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = header(b"NM", 5 + c.len()).as_bytes().to_vec();
            v.push(if i + 1 < n { RR_CONTINUE } else { 0 });
            v.extend_from_slice(c);
            v
        })
        .collect()
}

/// SL entries for a symlink target. A leading `/` is a ROOT component, `.` and `..` are
/// CURRENT and PARENT, every other component (including empty ones, so `a//b` survives) is
/// literal text; a component that does not fit is split with the component CONTINUE flag, and
/// an entry followed by another carries the entry CONTINUE flag.
pub fn sl(target: &[u8]) -> Vec<Vec<u8>> {
    // (component flags, text)
    let mut comps: Vec<(u8, &[u8])> = Vec::new();
    let rest = if let Some(r) = target.strip_prefix(b"/") {
        comps.push((SL_ROOT, &[]));
        r
    } else {
        target
    };
    if !rest.is_empty() || comps.is_empty() {
        for c in rest.split(|&b| b == b'/') {
            match c {
                b"." => comps.push((RR_CURRENT, &[])),
                b".." => comps.push((RR_PARENT, &[])),
                _ => comps.push((0, c)),
            }
        }
    }

    const BODY: usize = MAX_ENTRY - 5;
    let mut entries: Vec<Vec<u8>> = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    let flush = |body: &mut Vec<u8>, entries: &mut Vec<Vec<u8>>| {
        let mut v = header(b"SL", 5 + body.len()).as_bytes().to_vec();
        v.push(0);
        v.append(body);
        entries.push(v);
    };
    for (flags, text) in comps {
        let mut text = text;
        loop {
            let room = BODY - body.len();
            if 2 + text.len() <= room {
                body.push(flags);
                body.push(text.len() as u8);
                body.extend_from_slice(text);
                break;
            }
            // Only split a component longer than a fresh entry could hold; otherwise move the
            // whole component to the next entry.
            if 2 + text.len() > BODY && room > 2 {
                let take = room - 2;
                body.push(flags | RR_CONTINUE);
                body.push(take as u8);
                body.extend_from_slice(&text[..take]);
                text = &text[take..];
            }
            flush(&mut body, &mut entries);
        }
    }
    flush(&mut body, &mut entries);
    let n = entries.len();
    for e in entries.iter_mut().take(n - 1) {
        e[4] |= RR_CONTINUE;
    }
    entries
}

/// How a record's System Use entries are split: what goes in the record itself and which
/// continuation areas follow, in chain order. A CE entry (28 bytes, filled in once the areas
/// have addresses) ends the record's part and every area but the last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packed {
    /// Entries stored in the directory record, without the trailing CE.
    pub inline: Vec<u8>,
    /// Continuation areas, each without its trailing CE.
    pub areas: Vec<Vec<u8>>,
}

impl Packed {
    /// Bytes the record's System Use area takes (CE included).
    pub fn inline_len(&self) -> usize {
        self.inline.len() + if self.areas.is_empty() { 0 } else { CE_LEN }
    }

    /// Length of continuation area `i` including its CE when another follows.
    pub fn area_len(&self, i: usize) -> usize {
        self.areas[i].len() + if i + 1 < self.areas.len() { CE_LEN } else { 0 }
    }
}

/// Splits `entries` (each at most 255 bytes) between a record with `room` bytes of System
/// Use space (at least 28 + the first entry) and continuation areas of at most one sector.
pub fn pack(entries: Vec<Vec<u8>>, room: usize) -> Packed {
    let total: usize = entries.iter().map(Vec::len).sum();
    let mut out = Packed::default();
    if total <= room {
        out.inline = entries.concat();
        return out;
    }
    let mut it = entries.into_iter().peekable();
    while let Some(e) = it.peek() {
        if out.inline.len() + e.len() + CE_LEN > room {
            break;
        }
        out.inline.extend_from_slice(e);
        it.next();
    }
    let mut rest: Vec<Vec<u8>> = it.collect();
    while !rest.is_empty() {
        let remaining: usize = rest.iter().map(Vec::len).sum();
        if remaining <= MAX_AREA {
            out.areas.push(rest.concat());
            break;
        }
        let mut area = Vec::new();
        let mut taken = 0;
        for e in &rest {
            if area.len() + e.len() + CE_LEN > MAX_AREA {
                break;
            }
            area.extend_from_slice(e);
            taken += 1;
        }
        rest.drain(..taken);
        out.areas.push(area);
    }
    out
}

/// What the System Use entries of one directory record say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RrInfo {
    /// SP found (only meaningful on the root's "." record).
    pub sp: Option<u8>,
    /// ER extension identifiers found.
    pub extensions: Vec<Vec<u8>>,
    /// Alternate name (NM), pieces joined.
    pub name: Option<Vec<u8>>,
    /// NM said "current directory" or "parent directory".
    pub name_is_dot: bool,
    /// PX mode, nlink, uid, gid.
    pub px: Option<(u32, u32, u32, u32)>,
    /// PN device (major, minor).
    pub device: Option<(u32, u32)>,
    /// SL target, components joined.
    pub symlink: Option<Vec<u8>>,
    /// TF modification time (Unix seconds).
    pub mtime: Option<i64>,
    /// CL: this record stands for a directory relocated to this LBA.
    pub child_link: Option<u32>,
    /// RE: this record is a relocated directory and is listed where its CL is.
    pub relocated: bool,
}

/// A malformed System Use area: offset (absolute, in the image) and what is wrong.
#[derive(Debug)]
pub struct SuspError {
    /// Byte offset of the bad entry.
    pub offset: u64,
    /// What is wrong.
    pub msg: String,
}

/// Parses the System Use area `area` found at absolute byte `offset`, then any continuation
/// areas through `read_area(block, offset, len)`. `skip` is SP's LEN_SKP.
pub fn parse(
    area: &[u8],
    offset: u64,
    skip: usize,
    read_area: &mut dyn FnMut(u32, u32, u32) -> Result<Vec<u8>, SuspError>,
) -> Result<RrInfo, SuspError> {
    let mut info = RrInfo::default();
    let mut name: Vec<u8> = Vec::new();
    let mut name_seen = false;
    let mut sl_comps: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut sl_seen = false;
    let mut sl_continued = false;

    let mut buf: Vec<u8> = area.get(skip..).unwrap_or(&[]).to_vec();
    let mut base = offset + skip as u64;
    let mut hops = 0;
    loop {
        let mut next: Option<(u32, u32, u32)> = None;
        let mut pos = 0usize;
        while pos + 4 <= buf.len() {
            let sig = [buf[pos], buf[pos + 1]];
            let len = usize::from(buf[pos + 2]);
            if sig == [0, 0] {
                break; // padding
            }
            let at = base + pos as u64;
            if len < 4 || pos + len > buf.len() {
                return Err(SuspError {
                    offset: at,
                    msg: format!(
                        "System Use entry {:?} has length {len}, {} bytes left",
                        String::from_utf8_lossy(&sig),
                        buf.len() - pos
                    ),
                });
            }
            let e = &buf[pos..pos + len];
            let short = |need: usize| SuspError {
                offset: at,
                msg: format!(
                    "{} entry of {len} bytes, expected at least {need}",
                    String::from_utf8_lossy(&sig)
                ),
            };
            match &sig {
                b"ST" => break,
                b"SP" => {
                    if len < 7 || e[4..6] != [0xBE, 0xEF] {
                        return Err(short(7));
                    }
                    info.sp = Some(e[6]);
                }
                b"CE" => {
                    let ce = CeEntry::read_from_prefix(e).map_err(|_| short(CE_LEN))?.0;
                    next = Some((ce.block.get(), ce.offset.get(), ce.len.get()));
                }
                b"ER" => {
                    if len < 8 {
                        return Err(short(8));
                    }
                    let id_len = usize::from(e[4]);
                    let id = e.get(8..8 + id_len).ok_or_else(|| short(8 + id_len))?;
                    info.extensions.push(id.to_vec());
                }
                b"PX" => {
                    if len < 36 {
                        return Err(short(36));
                    }
                    let n = |i: usize| -> u32 {
                        u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]])
                    };
                    info.px = Some((n(4), n(12), n(20), n(28)));
                }
                b"PN" => {
                    let p = PnEntry::read_from_prefix(e).map_err(|_| short(20))?.0;
                    info.device = Some(decode_device(p.high.get(), p.low.get()));
                }
                b"NM" => {
                    if len < 5 {
                        return Err(short(5));
                    }
                    name_seen = true;
                    let flags = e[4];
                    if flags & (RR_CURRENT | RR_PARENT) != 0 {
                        info.name_is_dot = true;
                    }
                    name.extend_from_slice(&e[5..]);
                }
                b"SL" => {
                    if len < 5 {
                        return Err(short(5));
                    }
                    if sl_seen && !sl_continued {
                        // A new, unrelated SL: RRIP says only one link per record.
                        sl_comps.clear();
                    }
                    sl_seen = true;
                    sl_continued = e[4] & RR_CONTINUE != 0;
                    let mut c = 5;
                    while c + 2 <= len {
                        let flags = e[c];
                        let clen = usize::from(e[c + 1]);
                        let text = e.get(c + 2..c + 2 + clen).ok_or_else(|| SuspError {
                            offset: at + c as u64,
                            msg: format!("SL component of {clen} bytes runs past its entry"),
                        })?;
                        // Continue the previous component if it was flagged CONTINUE.
                        match sl_comps.last_mut() {
                            Some((pf, pt)) if *pf & RR_CONTINUE != 0 => {
                                pt.extend_from_slice(text);
                                *pf = (*pf & !RR_CONTINUE) | (flags & RR_CONTINUE);
                            }
                            _ => sl_comps.push((flags, text.to_vec())),
                        }
                        c += 2 + clen;
                    }
                }
                b"TF" => {
                    if len < 5 {
                        return Err(short(5));
                    }
                    let flags = e[4];
                    let size = if flags & TF_LONG_FORM != 0 { 17 } else { 7 };
                    // Times are stored in flag-bit order; skip creation if present.
                    let mut p = 5;
                    if flags & TF_CREATION != 0 {
                        p += size;
                    }
                    if flags & TF_MODIFY != 0 {
                        let t = e.get(p..p + size).ok_or_else(|| short(p + size))?;
                        info.mtime = if size == 7 {
                            ShortDate::read_from_bytes(t)
                                .ok()
                                .and_then(|d| short_date_to_unix(&d))
                        } else {
                            LongDate::read_from_bytes(t)
                                .ok()
                                .and_then(|d| super::time::long_date_to_unix(&d))
                        };
                    }
                }
                b"CL" => {
                    if len < 12 {
                        return Err(short(12));
                    }
                    info.child_link = Some(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
                }
                b"RE" => info.relocated = true,
                _ => {} // PL, RR, AL, ZF, SF, ...: not needed
            }
            pos += len;
        }
        let Some((block, off, len)) = next else { break };
        hops += 1;
        if hops > MAX_CE_HOPS {
            return Err(SuspError {
                offset: base,
                msg: format!("more than {MAX_CE_HOPS} continuation areas (a CE loop?)"),
            });
        }
        buf = read_area(block, off, len)?;
        base = u64::from(block) * SECTOR + u64::from(off);
    }
    if name_seen && !info.name_is_dot {
        info.name = Some(name);
    }
    if sl_seen {
        let mut target = Vec::new();
        let mut after_root = false;
        for (i, (flags, text)) in sl_comps.iter().enumerate() {
            if i > 0 && !after_root {
                target.push(b'/');
            }
            after_root = false;
            if flags & SL_ROOT != 0 {
                target.push(b'/');
                after_root = true;
            } else if flags & RR_PARENT != 0 {
                target.extend_from_slice(b"..");
            } else if flags & RR_CURRENT != 0 {
                target.push(b'.');
            } else {
                target.extend_from_slice(text);
            }
        }
        info.symlink = Some(target);
    }
    Ok(info)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse_entries(entries: &[Vec<u8>]) -> RrInfo {
        parse(&entries.concat(), 0, 0, &mut |_, _, _| unreachable!()).unwrap()
    }

    #[test]
    fn symlink_targets_round_trip() {
        let long = vec![b'x'; 600];
        let mut deep = Vec::new();
        for i in 0..40 {
            deep.extend_from_slice(format!("component-{i:03}-{}/", "y".repeat(80)).as_bytes());
        }
        deep.pop();
        for t in [
            &b"../files/size-1"[..],
            b"/",
            b"//",
            b"/nonexistent/target",
            b"a//b",
            b"a/",
            b"./x/../y",
            b"...",
            &long,
            &deep,
        ] {
            let e = sl(t);
            assert!(e
                .iter()
                .all(|e| e.len() <= MAX_ENTRY && e[2] as usize == e.len()));
            assert_eq!(
                parse_entries(&e).symlink.as_deref(),
                Some(t),
                "{:?}",
                String::from_utf8_lossy(t)
            );
        }
    }

    #[test]
    fn names_split_and_join() {
        for n in [1usize, 250, 251, 255, 600] {
            let name = vec![b'n'; n];
            let e = nm(&name);
            assert_eq!(e.len(), n.div_ceil(250));
            assert_eq!(parse_entries(&e).name.unwrap(), name);
        }
    }

    #[test]
    fn attributes_round_trip() {
        let mut e = vec![px(0o104755, 2, 3_000_000, 70_000), tf(-86_400 * 365)];
        e.push(pn(4000, 300_000));
        let i = parse_entries(&e);
        assert_eq!(i.px, Some((0o104755, 2, 3_000_000, 70_000)));
        assert_eq!(i.mtime, Some(-86_400 * 365));
        assert_eq!(i.device, Some((4000, 300_000)));
        for (ma, mi) in [(8, 0), (1, 3), (0, 5), (4095, 255), (259, 65536)] {
            let (h, l) = encode_device(ma, mi);
            assert_eq!(decode_device(h, l), (ma, mi));
        }
    }

    #[test]
    fn packing_respects_record_and_sector_limits() {
        let mut entries = vec![px(0o120777, 1, 0, 0), tf(0)];
        entries.extend(nm(&[b'n'; 255]));
        entries.extend(sl(&vec![b'z'; 4000]));
        let total: usize = entries.iter().map(Vec::len).sum();
        let p = pack(entries, 150);
        assert!(p.inline_len() <= 150);
        let mut sum = p.inline.len();
        for i in 0..p.areas.len() {
            assert!(p.area_len(i) <= MAX_AREA);
            sum += p.areas[i].len();
        }
        assert_eq!(sum, total);
        assert!(p.areas.len() >= 2);
    }
}
