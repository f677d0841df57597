//! `kiln convert`: a raw disk image becomes a qcow2, VHD or VMDK container, written without
//! holding the image in memory and under its final name only when complete. Its sha256 is
//! printed on request only (`--sha256`): it costs a SHA-256 pass over the whole output.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use kiln_build::vmdisk::{self, VmFormat, VmOptions};
use kiln_formats::vmdisk::Compression;

use super::Outcome;

#[derive(Args)]
pub struct ConvertArgs {
    /// The raw disk image.
    pub image: PathBuf,
    /// The container: qcow2 (v3), vhd (fixed, 1 MiB-aligned size) or vmdk (streamOptimized).
    #[arg(long, value_name = "FORMAT")]
    pub to: VmFormat,
    /// Output file (default: IMAGE with its extension replaced by the format's).
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// qcow2: compress clusters with zstd or zlib (as QEMU reads them).
    #[arg(long, value_name = "zstd|zlib", value_parser = vmdisk::parse_compression)]
    pub compression: Option<Compression>,
    /// vhd: write a dynamic disk (default fixed).
    #[arg(long)]
    pub dynamic: bool,
    /// Also print the output's sha256 (computed while it is written; it costs a pass of
    /// SHA-256 over the whole output, holes included).
    #[arg(long)]
    pub sha256: bool,
}

pub fn run(a: ConvertArgs) -> Outcome {
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| a.image.with_extension(a.to.extension()));
    if a.dynamic && a.to != VmFormat::Vhd {
        anyhow::bail!("--dynamic applies to --to vhd only");
    }
    super::refuse_same_file(&a.image, &output, "input image")?;
    super::create_parent(&output)?;
    let done = vmdisk::convert(
        &a.image,
        &output,
        &VmOptions {
            format: a.to,
            compression: a.compression,
            vhd_dynamic: a.dynamic,
        },
        a.sha256,
    )
    .with_context(|| format!("kiln convert {}", a.image.display()))?;
    match done.sha256 {
        Some(sha) => eprintln!(
            "kiln convert: {} ({} bytes, sha256 {sha})",
            output.display(),
            done.size
        ),
        None => eprintln!("kiln convert: {} ({} bytes)", output.display(), done.size),
    }
    Ok(ExitCode::SUCCESS)
}
