//! `kiln mkfs vfat SOURCE -o OUT`: a directory or tar into a FAT12/16/32 image (what
//! `mkfs.fat -C` followed by `mcopy -s` makes, with mkfs.fat's geometry for the size), written
//! to a temp file beside OUT and renamed at the end. FAT keeps names, sizes, data and mtimes
//! (2-second steps, 1980..2107); owners, modes, links and xattrs have no place in it.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kiln_formats::fat::{self, FatOptions, FatType, FatWriter};
use kiln_formats::repart;
use kiln_tree::{Normalize, SourceArg};

use super::Print;
use super::{parse_seed, parse_size};
use crate::cmd::Outcome;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Bits {
    #[value(name = "12")]
    Fat12,
    #[value(name = "16")]
    Fat16,
    #[value(name = "32")]
    Fat32,
}

/// Make a FAT image from a directory or a tar stream.
#[derive(Args, Debug)]
pub struct FatArgs {
    /// A directory, a tar file (plain, gzip, xz or zstd), or `-` for a tar stream on stdin.
    pub source: PathBuf,
    /// The image to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Filesystem size (K/M/G/T suffixes, powers of 1024). Default: the smallest size, in
    /// 64 KiB steps, that holds the tree plus --extra-space.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Without --size: free space to leave.
    #[arg(long, value_parser = parse_size, default_value = "64K", conflicts_with = "size")]
    pub extra_space: u64,
    /// FAT type; by default chosen from the size as mkfs.fat chooses it.
    #[arg(long, value_enum)]
    pub fat_bits: Option<Bits>,
    /// Volume label (at most 11 ASCII characters).
    #[arg(long)]
    pub label: Option<String>,
    /// 32 hex digits (or a UUID): the volume serial is the first four bytes of systemd-repart's
    /// file-system UUID for this seed. Default: all zero.
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<repart::Uuid>,
    #[command(flatten)]
    pub print: Print,
}

pub fn run(a: FatArgs) -> Outcome {
    let progress = crate::progress::Renderer::new("kiln mkfs", a.print.quiet);
    let norm = Normalize::from_env(false).context("reading SOURCE_DATE_EPOCH")?;
    let fat_type = a.fat_bits.map(|b| match b {
        Bits::Fat12 => FatType::Fat12,
        Bits::Fat16 => FatType::Fat16,
        Bits::Fat32 => FatType::Fat32,
    });
    if let Some(l) = &a.label {
        if l.len() > 11 || !l.is_ascii() {
            bail!("--label {l:?}: at most 11 ASCII characters");
        }
    }
    let source = SourceArg::parse(&a.source);
    let (mut tree, contents) = kiln_tree::open_random_access(&source)
        .with_context(|| format!("reading {}", a.source.display()))?;
    norm.apply(&mut tree);
    let (size, fat_type) = match a.size {
        Some(s) => (s, fat_type),
        None => fat::auto_size(&tree, fat_type, a.label.clone(), a.extra_space)
            .with_context(|| format!("sizing a FAT image for {}", a.source.display()))?,
    };
    let fs_uuid = repart::filesystem_uuid(&a.seed.unwrap_or(repart::Uuid::nil()));
    let id = fs_uuid.as_bytes();
    let opts = FatOptions {
        size,
        fat_type,
        volume_id: [id[0], id[1], id[2], id[3]],
        label: a.label.clone(),
    };
    let writer = FatWriter::new(&tree, opts)
        .with_context(|| format!("laying out {}", a.source.display()))?;
    let report = super::write_fixed(&a.output, size, |sink| Ok(writer.write(&contents, sink)?))?;
    super::tree_summary(&progress, &a.output, size, &tree);
    if a.print.json {
        let g = &report.geometry;
        // docs/json/mkfs-vfat.schema.json
        let j = serde_json::json!({
            "schema": "kiln.mkfs-vfat/1",
            "format": "vfat",
            "output": a.output.display().to_string(),
            "size": size,
            "digest": super::digest_file(&a.output)?,
            "seconds": progress.elapsed().as_secs_f64(),
            "fat_bits": match g.fat_type { FatType::Fat12 => 12, FatType::Fat16 => 16, FatType::Fat32 => 32 },
            "cluster_size": g.cluster_size(),
            "clusters": g.cluster_count,
            "clusters_used": report.clusters_used,
        });
        println!("{j}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
