//! What every kind of build output shares: the artifact entries of the report and the files
//! behind them, written under temporary names and committed together ([`Outputs`]); the stage
//! observer ([`Stages`]); the slot table and chunk table sidecars of a disk or ISO image;
//! copies and digests of byte ranges of an image; filesystem labels. The disk
//! (`crate::image`), the ISO (`crate::iso`) and the VM disks (`crate::vmdisk`) use them; this
//! module uses none of them.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use kiln_formats::repart::Uuid;
use kiln_inject::slots as islots;
use kiln_tree::output::AtomicFile;
use kiln_tree::progress::Progress;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// One output file.
#[derive(Clone, Debug, Serialize)]
pub struct Artifact {
    /// File name in the output directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, hex (`digest`, `"sha256:HEX"`, in JSON).
    #[serde(rename = "digest", serialize_with = "crate::json::sha256")]
    pub sha256: String,
}

/// Tells the build's observer about each stage.
pub(crate) struct Stages<'p> {
    pub(crate) progress: &'p dyn Progress,
}

impl Stages<'_> {
    pub(crate) fn done(&self, what: impl std::fmt::Display) {
        let what = what.to_string();
        tracing::debug!(stage = %what, "done");
        self.progress.done(&what);
    }

    /// A long stage of about `total` bytes starts; its bytes go to [`Stages::progress`].
    pub(crate) fn begin(&self, what: impl std::fmt::Display, total: u64) {
        self.progress.begin(&what.to_string(), Some(total));
    }

    pub(crate) fn progress(&self) -> &dyn Progress {
        self.progress
    }
}

/// Files that go out with the image, committed by [`finish`], and what the report lists.
#[derive(Default)]
pub(crate) struct Outputs {
    pub(crate) artifacts: Vec<Artifact>,
    pub(crate) pending: Vec<AtomicFile>,
}

impl Outputs {
    pub(crate) fn add(&mut self, (file, artifact): (AtomicFile, Artifact)) {
        self.artifacts.push(artifact);
        self.pending.push(file);
    }

    /// Forgets every output whose file name starts with `prefix`.
    pub(crate) fn drop_prefixed(&mut self, prefix: &str) {
        self.artifacts.retain(|a| !a.file.starts_with(prefix));
        self.pending.retain(|f| {
            f.dest()
                .file_name()
                .is_none_or(|n| !n.to_string_lossy().starts_with(prefix))
        });
    }
}

/// `bytes` written to a temporary file for `dest`, and its artifact entry.
pub(crate) fn write_artifact(dest: &Path, bytes: &[u8]) -> Result<(AtomicFile, Artifact)> {
    let f = AtomicFile::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    f.file()
        .write_all(bytes)
        .with_context(|| format!("writing {}", dest.display()))?;
    let a = artifact_of_bytes(&f, bytes);
    Ok((f, a))
}

pub(crate) fn artifact_of_bytes(f: &AtomicFile, bytes: &[u8]) -> Artifact {
    let file = f
        .dest()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Artifact {
        file,
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    }
}

/// The slot table of `slots` written into the image `file` (its system area) and beside
/// `path` as a sidecar, when there are slots; the table (empty otherwise: the chunk table's
/// resume points come from it).
pub(crate) fn write_slot_table(
    slots: &[islots::Slot],
    image_len: u64,
    file: &File,
    path: &Path,
    outs: &mut Outputs,
) -> Result<islots::SlotTable> {
    let table = islots::SlotTable {
        image_len,
        slots: slots.to_vec(),
    };
    if !slots.is_empty() {
        table.validate()?;
        table.write_into(file, &path.display().to_string())?;
        let json = table.to_sidecar_json()?;
        outs.add(write_artifact(
            &islots::sidecar_path(path),
            json.as_bytes(),
        )?);
    }
    Ok(table)
}

/// The chunk table of the finished image in `out` (with the plain sha256 and the SHA-256
/// midstates at each slot's first patchable byte, for `kiln serve`), written as its sidecar
/// beside `path`; the image's sha256 and the table's digest.
pub(crate) fn chunk_table(
    out: &AtomicFile,
    path: &Path,
    size: u64,
    slot_table: &islots::SlotTable,
    outs: &mut Outputs,
    stages: &Stages<'_>,
) -> Result<([u8; 32], String)> {
    let src = kiln_inject::FileSource::from_file(out.file().try_clone()?, out.tmp_path())?;
    // Two passes read the image: the chunks in parallel and the plain sha256 in sequence.
    stages.begin("digests", 2 * size);
    let src = Counted {
        inner: src,
        progress: stages.progress(),
    };
    let chunks = kiln_inject::ChunkTable::compute_resumable(&src, &slot_table.resume_points())?;
    let sha = chunks
        .sha256
        .ok_or_else(|| anyhow!("internal: no plain sha256 from the chunk table"))?;
    outs.add(write_artifact(
        &kiln_inject::chunks::sidecar_path(path),
        &chunks.to_bytes(),
    )?);
    Ok((sha, chunks.digest().to_string()))
}

/// A source that tells the observer how many bytes were read through it.
struct Counted<'p, R> {
    inner: R,
    progress: &'p dyn Progress,
}

impl<R: kiln_inject::ReadAt> kiln_inject::ReadAt for Counted<'_, R> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read_at(offset, buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }
}

/// Reads as much of `buf` as the file holds at `off` (short at EOF), returning the count.
pub(crate) fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

pub(crate) fn sha256_range(f: &File, off: u64, len: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        let got = read_full_at(f, &mut buf[..n], off + pos)?;
        buf[got..n].fill(0);
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finalize().into())
}

/// Copies `[off, off + len)` of `src` to a new atomic file at `dest` (kernel-side copy; holes
/// stay holes where the filesystem supports it).
pub(crate) fn copy_out(
    src: &File,
    off: u64,
    len: u64,
    dest: &Path,
) -> Result<(String, AtomicFile)> {
    let a = AtomicFile::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    copy_file_range(src, off, a.file(), len)
        .with_context(|| format!("writing {}", dest.display()))?;
    a.file().set_len(len)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((name, a))
}

/// `len` bytes from `src` at `off` to the start of `dst`, run by data run of the (sparse)
/// source: `copy_file_range` shares extents where the filesystem can, but ext4 copies a hole as
/// written zeroes, so only the source's data runs are copied and its holes stay holes (a 1 GiB
/// root partition holding 230 MiB of EROFS is 230 MiB on disk, not 1 GiB).
fn copy_file_range(src: &File, off: u64, dst: &File, len: u64) -> std::io::Result<()> {
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let Some(data) = kiln_os::next_data(src, pos)? else {
            break; // the rest of the source is a hole
        };
        if data >= end {
            break;
        }
        let hole = kiln_os::next_hole(src, data)?.unwrap_or(end).min(end);
        copy_run(src, data, dst, data - off, hole - data)?;
        pos = hole.max(data + 1);
    }
    Ok(())
}

/// One data run: `copy_file_range`, or read/write (skipping zero blocks) where the filesystem
/// pair cannot.
fn copy_run(src: &File, off: u64, dst: &File, to: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match kiln_os::copy_range(src, off, dst, to, len)? {
        // The end of the source: the rest is zeroes (the caller's set_len covers it).
        kiln_os::Copied::All | kiln_os::Copied::Short(_) => {}
        kiln_os::Copied::Unsupported => {
            tracing::debug!(
                len,
                "copy_file_range unsupported here; copying through memory"
            );
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                let got = read_full_at(src, &mut buf[..n], off + done)?;
                if got == 0 {
                    break;
                }
                if buf[..got].iter().any(|&b| b != 0) {
                    dst.write_all_at(&buf[..got], to + done)?;
                }
                done += got as u64;
            }
        }
    }
    Ok(())
}

pub(crate) fn truncate_label(l: &str, max: usize) -> String {
    let mut s = String::new();
    for ch in l.chars() {
        if s.len() + ch.len_utf8() > max {
            break;
        }
        s.push(ch);
    }
    s
}

/// FAT volume labels: at most 11 characters of upper-case ASCII without specials.
pub(crate) fn fat_label(l: &str) -> Option<String> {
    let s: String = l
        .chars()
        .map(|c| c.to_ascii_uppercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(11)
        .collect();
    (!s.is_empty()).then_some(s)
}

/// FAT volume serial from the filesystem UUID (its first four bytes, as repart's mkfs.vfat
/// call derives it).
pub(crate) fn fat_volume_id(fs_uuid: &Uuid) -> [u8; 4] {
    let b = fs_uuid.as_bytes();
    [b[0], b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// A partition copied out of a sparse image keeps the image's holes: its bytes are the
    /// window's, and only the data runs take blocks.
    #[test]
    fn copy_out_keeps_holes() {
        let d = tempfile::tempdir().unwrap();
        let img = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(d.path().join("img"))
            .unwrap();
        let mib = 1u64 << 20;
        img.set_len(64 * mib).unwrap();
        // The window is [8 MiB, 40 MiB): data at its start, in its middle, across its end.
        img.write_all_at(&[0xa5; 4096], 8 * mib).unwrap();
        img.write_all_at(&[0x5a; 8192], 20 * mib + 4096).unwrap();
        img.write_all_at(&[0x77; 8192], 40 * mib - 4096).unwrap();
        let dest = d.path().join("part.raw");
        let (name, a) = copy_out(&img, 8 * mib, 32 * mib, &dest).unwrap();
        a.commit().unwrap();
        assert_eq!(name, "part.raw");
        let got = std::fs::read(&dest).unwrap();
        let mut want = vec![0u8; 64 * mib as usize];
        img.read_exact_at(&mut want, 0).unwrap();
        assert_eq!(got.len() as u64, 32 * mib);
        assert!(got == want[8 * mib as usize..40 * mib as usize]);
        // 16 KiB of data (plus filesystem rounding), not 32 MiB.
        let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(allocated <= 1 << 20, "{allocated} bytes allocated");
    }
}
