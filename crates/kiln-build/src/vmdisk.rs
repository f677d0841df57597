//! VM disk outputs: a raw disk image written as qcow2, VHD or VMDK (the formats live in
//! `kiln_formats::vmdisk`). Used at the end of `kiln build` for `[image] output = [..,
//! "qcow2", "vhd", "vmdk"]` and by `kiln convert` for an existing image.
//!
//! The raw file's `SEEK_DATA`/`SEEK_HOLE` map tells the writers which ranges can hold data.
//! Uncompressed qcow2 and both VHDs are laid out first and then written positionally, their
//! data copied by the kernel (`copy_file_range`); their sha256 is computed from the layout and
//! the raw disk on a second thread while the file is written. Compressed qcow2 and VMDK are
//! streamed through a buffer, and their sha256 is read back from the output (its data runs
//! only; holes are hashed as zeroes). The digest costs a pass of SHA-256 over the whole
//! output, zeroes included, so `kiln convert` computes it only when asked; `kiln build` always
//! reports it.
//!
//! Identifiers inside the containers (the VHD unique id, the VMDK content id) derive from the
//! raw disk's first and last MiB and its size, which hold the GPT headers and so the disk
//! GUID: the same image gives the same bytes.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_formats::vmdisk::{self, qcow2, vhd, vmdk, Compression, Plan, Raw};
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

/// What [`write_container`] wrote.
struct Written {
    /// The temporary file, for the caller to commit.
    file: AtomicFile,
    /// Its name.
    name: String,
    /// Its length in bytes.
    size: u64,
    /// Its SHA-256, when asked for.
    sha256: Option<[u8; 32]>,
}

/// Writes the raw disk `src` (`size` bytes) as `opts.format` to a temporary file for `dest`,
/// with its sha256 when `digest`.
fn write_container(
    src: &File,
    size: u64,
    dest: &Path,
    opts: &VmOptions,
    digest: bool,
) -> Result<Written> {
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
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = identity(src, size)?;
    let what = || format!("writing {}", dest.display());
    let plan = match opts.format {
        VmFormat::Qcow2 if opts.compression.is_none() => {
            Some(qcow2::plan(&raw).with_context(what)?.0)
        }
        VmFormat::Vhd => Some(
            vhd::plan(
                &raw,
                vhd::Options {
                    dynamic: opts.vhd_dynamic,
                    unique_id: id,
                    timestamp: 0,
                },
            )
            .with_context(what)?,
        ),
        _ => None,
    };
    let (size, sha256) = match plan {
        Some(plan) => {
            let sha = write_plan(&plan, src, out.file(), digest).with_context(what)?;
            (plan.len(), sha)
        }
        None => {
            stream(&raw, out.file(), opts, id, &name).with_context(what)?;
            if digest {
                let (len, sha) = sha256_file(out.file())
                    .with_context(|| format!("reading back {}", dest.display()))?;
                (len, Some(sha))
            } else {
                let len = out
                    .file()
                    .metadata()
                    .with_context(|| format!("reading the length of {}", dest.display()))?
                    .len();
                (len, None)
            }
        }
    };
    Ok(Written {
        file: out,
        name,
        size,
        sha256,
    })
}

/// Writes `plan` into `out` and, when `digest`, hashes it at the same time on a second thread
/// (reading the raw disk from the page cache a second time costs less than the hash, and the
/// writer's copies run in the kernel meanwhile).
fn write_plan(plan: &Plan, src: &File, out: &File, digest: bool) -> Result<Option<[u8; 32]>> {
    std::thread::scope(|s| {
        let hasher = digest.then(|| s.spawn(|| plan.sha256(src)));
        let wrote = plan.write_file(src, out);
        let sha = match hasher {
            Some(h) => Some(
                h.join()
                    .map_err(|_| anyhow::anyhow!("the sha256 thread panicked"))?
                    .context("hashing the output")?,
            ),
            None => None,
        };
        wrote?;
        Ok(sha)
    })
}

/// Streams the container into `out` through a buffer: the route of the formats that cannot be
/// planned (compressed qcow2, VMDK).
fn stream(raw: &Raw<'_>, out: &File, opts: &VmOptions, id: [u8; 16], name: &str) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, out);
    match opts.format {
        VmFormat::Qcow2 => {
            qcow2::write(
                raw,
                &mut w,
                qcow2::Options {
                    compression: opts.compression,
                },
            )?;
        }
        VmFormat::Vhd => {
            vhd::write(
                raw,
                &mut w,
                vhd::Options {
                    dynamic: opts.vhd_dynamic,
                    unique_id: id,
                    timestamp: 0,
                },
            )?;
        }
        VmFormat::Vmdk => {
            let cid = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
            vmdk::write(
                raw,
                &mut w,
                &vmdk::Options {
                    file_name: name.to_string(),
                    cid,
                },
            )?;
        }
    }
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

/// Writes the raw disk `src` (`size` bytes) as `opts.format` to a temporary file for `dest`,
/// with its sha256; the caller commits it.
pub fn convert_file(
    src: &File,
    size: u64,
    dest: &Path,
    opts: &VmOptions,
) -> Result<(AtomicFile, Artifact)> {
    let w = write_container(src, size, dest, opts, true)?;
    let sha = w.sha256.context("no sha256 computed")?;
    Ok((
        w.file,
        Artifact {
            file: w.name,
            size: w.size,
            sha256: hex::encode(sha),
        },
    ))
}

/// The length and SHA-256 of `f`. Only its data runs are read (`SEEK_DATA`); its holes are
/// hashed as the zeroes they read as, without reading them.
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

/// What [`convert`] wrote.
#[derive(Clone, Debug)]
pub struct Converted {
    /// Length of the output in bytes.
    pub size: u64,
    /// Its sha256, hex, when asked for.
    pub sha256: Option<String>,
}

/// `kiln convert`: the raw image `input` to `output` as `opts.format`, committed under its
/// final name only when complete; its sha256 when `digest`.
pub fn convert(input: &Path, output: &Path, opts: &VmOptions, digest: bool) -> Result<Converted> {
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
    let w = write_container(&src, size, output, opts, digest)?;
    w.file
        .commit()
        .with_context(|| format!("renaming to {}", output.display()))?;
    Ok(Converted {
        size: w.size,
        sha256: w.sha256.map(hex::encode),
    })
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
