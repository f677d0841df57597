//! VM disk outputs: a raw disk image streamed into qcow2, VHD or VMDK (the formats live in
//! `kiln_formats::vmdisk`). Used at the end of `kiln build` for `[image] output = [..,
//! "qcow2", "vhd", "vmdk"]` and by `kiln convert` for an existing image.
//!
//! The raw file's `SEEK_DATA`/`SEEK_HOLE` map tells the writers which ranges can hold data;
//! they test the rest of it for zeroes as they go. Identifiers inside the containers (the VHD
//! unique id, the VMDK content id) derive from the raw disk's first and last MiB and its size,
//! which hold the GPT headers and so the disk GUID: the same image gives the same bytes.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_formats::vmdisk::{self, qcow2, vhd, vmdk, Compression, Raw};
use kiln_tree::output::AtomicFile;
use sha2::{Digest, Sha256};

use crate::artifacts::Artifact;

/// A VM disk container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFormat {
    /// qcow2 v3.
    Qcow2,
    /// VHD (fixed unless [`VmOptions::vhd_dynamic`]).
    Vhd,
    /// VMDK streamOptimized.
    Vmdk,
}

impl VmFormat {
    /// Every format, in the order outputs are written.
    pub const ALL: &[VmFormat] = &[VmFormat::Qcow2, VmFormat::Vhd, VmFormat::Vmdk];

    /// The name in `[image] output` and `--to`.
    pub fn name(self) -> &'static str {
        match self {
            VmFormat::Qcow2 => "qcow2",
            VmFormat::Vhd => "vhd",
            VmFormat::Vmdk => "vmdk",
        }
    }

    /// The output file extension.
    pub fn extension(self) -> &'static str {
        self.name()
    }

    /// The `format=` QEMU's `-drive` takes for it.
    pub fn qemu_format(self) -> &'static str {
        match self {
            VmFormat::Qcow2 => "qcow2",
            VmFormat::Vhd => "vpc",
            VmFormat::Vmdk => "vmdk",
        }
    }

    /// By name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|f| f.name() == s)
    }

    /// The container `path` is, by its magic; `None` for raw disks and ISOs.
    pub fn detect(path: &Path) -> Result<Option<Self>> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata()?.len();
        Ok(vmdisk::detect(&f, len).and_then(Self::parse))
    }
}

impl std::str::FromStr for VmFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("unknown format {s:?}: expected qcow2, vhd or vmdk"))
    }
}

/// Parses `zstd` or `zlib`.
pub fn parse_compression(s: &str) -> std::result::Result<Compression, String> {
    match s {
        "zstd" => Ok(Compression::Zstd),
        "zlib" => Ok(Compression::Zlib),
        _ => Err(format!("unknown compression {s:?}: expected zstd or zlib")),
    }
}

/// How to write a container.
#[derive(Clone, Copy, Debug)]
pub struct VmOptions {
    /// The container.
    pub format: VmFormat,
    /// qcow2 only: compress clusters.
    pub compression: Option<Compression>,
    /// VHD only: a dynamic disk instead of a fixed one.
    pub vhd_dynamic: bool,
}

/// 16 bytes identifying the raw disk `f` of `size` bytes: sha256 over its size, first MiB and
/// last MiB (the GPT headers with the disk GUID).
fn identity(f: &File, size: u64) -> Result<[u8; 16]> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    h.update(b"kiln-vmdisk-id");
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    for off in [0, size.saturating_sub(1 << 20)] {
        let n = (size - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .with_context(|| format!("reading {n} bytes at {off}"))?;
        h.update(&buf[..n]);
    }
    let d = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    Ok(id)
}

/// Writes the raw disk `src` (`size` bytes) as `opts.format` to a temporary file for `dest`;
/// the caller commits it.
pub fn convert_file(
    src: &File,
    size: u64,
    dest: &Path,
    opts: &VmOptions,
) -> Result<(AtomicFile, Artifact)> {
    if opts.compression.is_some() && opts.format != VmFormat::Qcow2 {
        bail!(
            "--compression applies to qcow2 only (VMDK streamOptimized grains are always deflated; VHD has no compression)"
        );
    }
    let runs = kiln_os::data_runs(src, size).context("mapping the raw disk's data (SEEK_DATA)")?;
    let raw = Raw {
        data: src,
        size,
        runs: Some(runs),
    };
    let out = AtomicFile::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = identity(src, size)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, out.file());
        let what = || format!("writing {}", dest.display());
        match opts.format {
            VmFormat::Qcow2 => {
                qcow2::write(
                    &raw,
                    &mut w,
                    qcow2::Options {
                        compression: opts.compression,
                    },
                )
                .with_context(what)?;
            }
            VmFormat::Vhd => {
                vhd::write(
                    &raw,
                    &mut w,
                    vhd::Options {
                        dynamic: opts.vhd_dynamic,
                        unique_id: id,
                        timestamp: 0,
                    },
                )
                .with_context(what)?;
            }
            VmFormat::Vmdk => {
                let cid = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
                vmdk::write(
                    &raw,
                    &mut w,
                    &vmdk::Options {
                        file_name: file_name.clone(),
                        cid,
                    },
                )
                .with_context(what)?;
            }
        }
        w.into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", dest.display()))?;
    }
    // The file may end in a hole (a fixed VHD's tail before its footer is written last, so
    // not here; qcow2 and VMDK end in metadata): its length is where the writer stopped.
    let (len, sha) =
        sha256_file(out.file()).with_context(|| format!("reading back {}", dest.display()))?;
    Ok((
        out,
        Artifact {
            file: file_name,
            size: len,
            sha256: hex::encode(sha),
        },
    ))
}

/// The length and SHA-256 of `f`. Only its data runs are read (`SEEK_DATA`); its holes are
/// hashed as the zeroes they read as, without reading them: a fixed VHD is mostly holes.
fn sha256_file(f: &File) -> std::io::Result<(u64, [u8; 32])> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let zeroes_to = |h: &mut Sha256, from: u64, to: u64| {
        let mut at = from;
        while at < to {
            let n = (to - at).min(zeros.len() as u64);
            h.update(&zeros[..n as usize]);
            at += n;
        }
    };
    for (off, run) in kiln_os::data_runs(f, len)? {
        zeroes_to(&mut h, pos, off);
        let end = off + run;
        let mut at = off;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        pos = end;
    }
    zeroes_to(&mut h, pos, len);
    Ok((len, h.finalize().into()))
}

/// `kiln convert`: the raw image `input` to `output` as `opts.format`, committed under its
/// final name only when complete.
pub fn convert(input: &Path, output: &Path, opts: &VmOptions) -> Result<Artifact> {
    let src = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let size = src
        .metadata()
        .with_context(|| format!("reading {}", input.display()))?
        .len();
    if let Some(f) = vmdisk::detect(&src, size) {
        bail!(
            "{} is already a {f} image; kiln convert reads raw disk images",
            input.display()
        );
    }
    let (file, a) = convert_file(&src, size, output, opts)?;
    file.commit()
        .with_context(|| format!("renaming to {}", output.display()))?;
    Ok(a)
}

/// The VM disk outputs of a build: one per format in `formats`, named `NAME.EXT` in `outdir`.
pub fn outputs(
    disk: &File,
    size: u64,
    outdir: &Path,
    name_version: &str,
    formats: &[VmFormat],
    compression: Option<Compression>,
    vhd_dynamic: bool,
) -> Result<Vec<(AtomicFile, Artifact)>> {
    formats
        .iter()
        .map(|&format| {
            let dest = outdir.join(format!("{name_version}.{}", format.extension()));
            convert_file(
                disk,
                size,
                &dest,
                &VmOptions {
                    format,
                    compression: (format == VmFormat::Qcow2).then_some(compression).flatten(),
                    vhd_dynamic,
                },
            )
        })
        .collect()
}
