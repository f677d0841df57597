//! `kiln mkfs ext4|erofs`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kiln_formats::ext4;
use kiln_formats::repart;
use kiln_formats::sink::FileSink;
use kiln_tree::output::AtomicFile;
use kiln_tree::progress::{advancing, Progress};
use kiln_tree::{Normalize, Opened, SourceArg, SourceContents};
use sha2::{Digest, Sha256};

use super::Outcome;

mod erofs;
mod fat;
mod iso;

#[derive(Subcommand)]
pub enum MkfsCommand {
    /// An ext4 image.
    #[command(after_help = "Examples:
  kiln mkfs ext4 --minimize rootfs.tar -o rootfs.ext4
  docker export CONTAINER | kiln mkfs ext4 - -o rootfs.ext4 --extra-space 64M
  kiln mkfs ext4 rootfs/ --size 2G --all-root -o rootfs.ext4
  kiln mkfs ext4 --keep-zeroes disk-images.tar -o data.ext4")]
    Ext4(Ext4Args),
    /// An EROFS image (read-only, optionally LZ4-compressed).
    #[command(after_help = "Examples:
  kiln mkfs erofs rootfs/ -o root.erofs
  kiln mkfs erofs --compress lz4hc rootfs.tar.zst -o root.erofs")]
    Erofs(erofs::ErofsArgs),
    /// A FAT12/16/32 image (names, sizes, data and mtimes; no owners or modes).
    #[command(after_help = "Examples:
  kiln mkfs vfat esp/ -o esp.img
  kiln mkfs vfat esp/ --size 128M --label ESP -o esp.img")]
    Vfat(fat::FatArgs),
    /// An ISO 9660 image with Rock Ridge and Joliet.
    #[command(after_help = "Examples:
  kiln mkfs iso9660 files/ --label DATA -o data.iso")]
    Iso9660(iso::IsoArgs),
}

/// Make an ext4 image from a directory or a tar stream.
#[derive(Args)]
pub struct Ext4Args {
    /// A directory, a tar file (plain, gzip, xz or zstd) or `-` for a tar stream on stdin.
    pub source: PathBuf,
    /// The image to write (created beside its final name, renamed when complete).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Filesystem size (bytes, or with a K/M/G/T suffix, powers of 1024).
    #[arg(long, value_parser = parse_size, conflicts_with = "minimize")]
    pub size: Option<u64>,
    /// Make the smallest image that holds the tree (the default without --size).
    #[arg(long)]
    pub minimize: bool,
    /// With --minimize: free space to leave (K/M/G/T suffixes).
    #[arg(long, value_parser = parse_size, default_value = "0", conflicts_with = "size")]
    pub extra_space: u64,
    /// With --minimize: free inodes to leave.
    #[arg(long, default_value_t = 0, conflicts_with = "size")]
    pub extra_inodes: u64,
    /// Volume label (at most 16 bytes).
    #[arg(long, default_value = "")]
    pub label: String,
    /// 32 hex digits (or a dashed UUID): the UUID is systemd-repart's file-system UUID for
    /// this seed, the hash seed derive_uuid(seed, "directory-hash-seed"). Default: all zero.
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<repart::Uuid>,
    /// Make every file owned by root.
    #[arg(long)]
    pub all_root: bool,
    /// Add a journal (read-only images do not need one).
    #[arg(long)]
    pub journal: bool,
    /// Write all-zero 4 KiB blocks of file data as data. By default they become holes
    /// (unallocated, reading as zeroes), whatever the source: a directory, a sparse or dense tar.
    #[arg(long)]
    pub keep_zeroes: bool,
    /// Where inodes and blocks go. `packed` (the default): in tree order, the smallest and
    /// most contiguous image. `stable` (needs --size and an indexed source): inode numbers and
    /// block positions hashed from each path, so a file that does not change keeps its place
    /// from one build to the next and a delta update fetches little more than what changed.
    #[arg(long, value_enum, requires = "size")]
    pub layout: Option<LayoutArg>,
    #[command(flatten)]
    pub print: Print,
}

/// `--layout`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LayoutArg {
    /// Tree order, from the start of the filesystem.
    Packed,
    /// Placed by path: unchanged files stay put between builds.
    Stable,
}

/// What every `kiln mkfs` prints besides the image.
#[derive(Args, Debug)]
pub struct Print {
    /// Print a JSON summary (size, sha256, seconds and the format's own counts) on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress and no summary line on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Parses a size as the spec does (`123`, `4K`, `10M`, `1.5G`, `2GiB`: powers of 1024; `MB`
/// and the like are refused as ambiguous), so a size means the same on the command line and in
/// kiln.toml.
pub fn parse_size(s: &str) -> Result<u64, String> {
    kiln_build::spec::Size::parse(s).map(|v| v.0)
}

pub(crate) fn parse_seed(s: &str) -> Result<repart::Uuid, String> {
    repart::uuid_from_spec(s).ok_or_else(|| format!("{s:?} is not 32 hex digits or a UUID"))
}

pub fn run(cmd: MkfsCommand) -> Outcome {
    match cmd {
        MkfsCommand::Ext4(a) => ext4_cmd(a),
        MkfsCommand::Erofs(a) => erofs::run(a),
        MkfsCommand::Vfat(a) => fat::run(a),
        MkfsCommand::Iso9660(a) => iso::run(a),
    }
}

/// Bytes of file data in `tree` (what the writers' progress counts, and the input side of the
/// summary's ratio).
pub(crate) fn file_bytes(tree: &kiln_formats::fstree::Tree) -> u64 {
    tree.nodes
        .iter()
        .map(|n| match &n.kind {
            kiln_formats::fstree::NodeKind::File(f) => f.stored_len(),
            _ => 0,
        })
        .sum()
}

/// [`summary`] for an image of `tree`.
pub(crate) fn tree_summary(
    r: &crate::progress::Renderer,
    path: &Path,
    size: u64,
    tree: &kiln_formats::fstree::Tree,
) {
    summary(r, path, size, tree.nodes.len(), file_bytes(tree));
}

/// The line every `kiln mkfs` ends with: path, size, entries, ratio of the image to the file
/// data it holds, time.
pub(crate) fn summary(
    r: &crate::progress::Renderer,
    path: &std::path::Path,
    size: u64,
    entries: usize,
    input: u64,
) {
    let ratio = if input > 0 {
        format!("{:.2}", size as f64 / input as f64)
    } else {
        "-".to_string()
    };
    r.summary(&format!(
        "{}: {} ({size} bytes), {entries} entries, {} of file data, ratio {ratio}, {:.1} s",
        path.display(),
        indicatif::HumanBytes(size),
        indicatif::HumanBytes(input),
        r.elapsed().as_secs_f64()
    ));
}

fn ext4_cmd(a: Ext4Args) -> Outcome {
    let started = Instant::now();
    let progress = crate::progress::Renderer::new("kiln mkfs", a.print.quiet);
    let norm = Normalize::from_env(a.all_root).context("reading SOURCE_DATE_EPOCH")?;
    let size = match a.size {
        Some(bytes) => ext4::Size::Fixed(bytes),
        None => ext4::Size::Minimize {
            extra_bytes: a.extra_space,
            extra_inodes: a.extra_inodes,
        },
    };
    let mut opts = ext4::Options::from_seed(a.seed.as_ref(), size);
    if a.label.len() > 16 {
        bail!("--label {:?} is longer than 16 bytes", a.label);
    }
    opts.label = a.label.clone();
    opts.journal = a.journal;
    opts.timestamp = norm.source_date_epoch.unwrap_or(0);
    opts.zero_holes = !a.keep_zeroes;
    if let Some(LayoutArg::Stable) = a.layout {
        opts.layout = ext4::Layout::Stable;
    }

    super::refuse_same_file(&a.source, &a.output, "source")?;
    let source = SourceArg::parse(&a.source);
    let opened =
        kiln_tree::open(&source).with_context(|| format!("reading {}", a.source.display()))?;
    let report = match opened {
        Opened::Indexed(mut tree, contents) => {
            norm.apply(&mut tree);
            if !a.keep_zeroes {
                kiln_tree::holes::find(&mut tree, &contents)
                    .with_context(|| format!("reading {}", a.source.display()))?;
            }
            // Plan first: a tree that does not fit fails before any output exists.
            let plan = ext4::plan(&tree, &opts)
                .with_context(|| format!("laying out {}", a.source.display()))?;
            super::create_parent(&a.output)?;
            let len = a.size.unwrap_or(0).max(plan.size_bytes());
            progress.begin("ext4", Some(plan.data_bytes(&tree)));
            let report = write_fixed(&a.output, len, |sink| {
                Ok(plan.write_with_progress(&tree, &contents, sink, &advancing(&progress))?)
            })?;
            (report, tree.nodes.len(), file_bytes(&tree))
        }
        Opened::Stream(stream) => {
            super::create_parent(&a.output)?;
            let out = AtomicFile::create(&a.output)
                .with_context(|| format!("creating {}", a.output.display()))?;
            // A stream's size is unknown until its end: the window bounds what it may write
            // (the requested size, or ext4's practical maximum when minimizing).
            let window = a.size.unwrap_or(1 << 44);
            let sink = FileSink::new(out.file(), 0, window);
            progress.begin("ext4", None);
            let inc = advancing(&progress);
            let mut writer = ext4::StreamWriter::new(&opts, &sink)
                .context("starting the image")?
                .with_progress(&inc);
            let mut tree = stream
                .read(&mut writer)
                .with_context(|| format!("reading {}", a.source.display()))?;
            norm.apply(&mut tree);
            let report = writer
                .finish(&tree, &SourceContents::Host)
                .with_context(|| format!("writing {}", a.output.display()))?;
            let len = a.size.unwrap_or(0).max(report.size_bytes);
            out.file()
                .set_len(len)
                .with_context(|| format!("sizing {}", out.tmp_path().display()))?;
            out.commit()
                .with_context(|| format!("committing {}", a.output.display()))?;
            (report, tree.nodes.len(), file_bytes(&tree))
        }
    };
    let (report, entries, input) = report;
    let size = a.size.unwrap_or(0).max(report.size_bytes);
    summary(&progress, &a.output, size, entries, input);
    if a.print.json {
        // docs/json/mkfs-ext4.schema.json
        let summary = serde_json::json!({
            "schema": "kiln.mkfs-ext4/1",
            "format": "ext4",
            "output": a.output.display().to_string(),
            "size": size,
            "uuid": report.uuid.to_string(),
            "digest": digest_file(&a.output)?,
            "seconds": started.elapsed().as_secs_f64(),
            "inodes_used": report.used_inodes,
            "inodes_total": report.inodes,
            "blocks_used": report.used_blocks,
            "blocks_total": report.blocks,
            "slots": report.slots.iter().map(|s| serde_json::json!({
                "name": s.name,
                "inode": s.inode,
                "inode_offset": s.inode_offset,
                "data_offset": s.data_offset,
                "capacity": s.capacity,
            })).collect::<Vec<_>>(),
        });
        println!("{summary}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Writes an image of `size` bytes to `output` through a temp file beside it: sized first,
/// filled by `write`, renamed into place only when `write` succeeds.
pub(crate) fn write_fixed<R>(
    output: &Path,
    size: u64,
    write: impl FnOnce(&FileSink) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let out =
        AtomicFile::create(output).with_context(|| format!("creating {}", output.display()))?;
    out.file()
        .set_len(size)
        .with_context(|| format!("sizing {}", out.tmp_path().display()))?;
    let sink = FileSink::new(out.file(), 0, size);
    let r = write(&sink).with_context(|| format!("writing {}", output.display()))?;
    out.commit()
        .with_context(|| format!("finishing {}", output.display()))?;
    Ok(r)
}

/// `"sha256:HEX"` of a file (the `digest` of every `kiln mkfs --json`).
pub(crate) fn digest_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("16MB").is_err());
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
