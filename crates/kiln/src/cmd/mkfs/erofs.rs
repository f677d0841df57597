//! `kiln mkfs erofs SOURCE -o OUT`: a directory, a tar file or `-` (a tar stream on stdin)
//! into an EROFS image, written to a temp file beside OUT and renamed at the end.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kiln_formats::erofs::{self, Compression, Options};
use kiln_formats::repart;
use kiln_formats::sink::FileSink;
use kiln_tree::output::AtomicFile;
use kiln_tree::progress::{positioning, Progress};
use kiln_tree::{Normalize, Opened, SourceArg};
use sha2::Digest;

use super::Print;
use crate::cmd::Outcome;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Algo {
    /// Store data uncompressed.
    None,
    /// LZ4, fast.
    Lz4,
    /// LZ4, high compression (level 5 unless --level).
    Lz4hc,
}

#[derive(Args, Debug)]
pub struct ErofsArgs {
    /// A directory, a tar file (plain, gzip, xz or zstd), or `-` for a tar stream on stdin.
    pub source: PathBuf,
    /// The image to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Data compression.
    #[arg(short = 'z', long = "compress", value_enum, default_value = "none")]
    pub compress: Algo,
    /// LZ4HC level, 1..=12.
    #[arg(long, default_value_t = kiln_formats::erofs::LZ4HC_DEFAULT_LEVEL, value_parser = clap::value_parser!(u8).range(1..=12))]
    pub level: u8,
    /// Physical cluster size in 4 KiB blocks (1..=256) for compressed data.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub pcluster_blocks: u32,
    /// 32 hex digits: the filesystem UUID is derived from it (as systemd-repart does).
    #[arg(long)]
    pub seed: Option<String>,
    /// Volume label (up to 16 bytes).
    #[arg(long)]
    pub label: Option<String>,
    /// Make every file owned by root.
    #[arg(long)]
    pub all_root: bool,
    /// Store every file's compressed data, even when an earlier file has the same bytes.
    #[arg(long)]
    pub no_dedupe: bool,
    /// Write all-zero 4 KiB blocks of file data as data. By default they become holes (null
    /// chunks of a chunk-based file; in a compressed image only in files that are at least
    /// half zeroes, the others compress their zeroes), whatever the source.
    #[arg(long)]
    pub keep_zeroes: bool,
    #[command(flatten)]
    pub print: Print,
}

pub fn run(a: ErofsArgs) -> Outcome {
    let start = Instant::now();
    let progress = crate::progress::Renderer::new("kiln mkfs", a.print.quiet);
    let seed = match &a.seed {
        Some(s) => repart::uuid_from_spec(s)
            .with_context(|| format!("--seed {s:?}: expected 32 hex digits or a UUID"))?,
        None => repart::Uuid::nil(),
    };
    let label = a.label.clone().unwrap_or_default().into_bytes();
    if label.len() > 16 {
        bail!(
            "--label {:?}: longer than 16 bytes",
            a.label.unwrap_or_default()
        );
    }
    let opts = Options {
        compression: match a.compress {
            Algo::None => Compression::None,
            Algo::Lz4 => Compression::Lz4,
            Algo::Lz4hc => Compression::Lz4hc { level: a.level },
        },
        pcluster_blocks: a.pcluster_blocks,
        uuid: repart::filesystem_uuid(&seed).into_bytes(),
        timestamp: None,
        volume_name: label,
        dedupe: !a.no_dedupe,
    };
    if opts.compression != Compression::None {
        one_worker_per_core_and_one_more();
    }
    let norm = Normalize::from_env(a.all_root)?;
    super::super::refuse_same_file(&a.source, &a.output, "source")?;
    let source = SourceArg::parse(&a.source);
    super::super::create_parent(&a.output)?;
    let out = AtomicFile::create(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let file = out.file();
    let mut opened =
        kiln_tree::open(&source).with_context(|| format!("reading {}", a.source.display()))?;
    if !a.keep_zeroes {
        // A file's chunk layout depends on where all its holes are, which a one-pass stream
        // shows only at the file's end: a stream is spooled (its non-zero blocks only, found
        // as they go by) and written like an indexed tree.
        if let Opened::Stream(stream) = opened {
            let mut spool =
                kiln_tree::spool::Spool::zero_holes().context("creating a temp spool")?;
            let mut tree = stream
                .read(&mut spool)
                .with_context(|| format!("reading {}", a.source.display()))?;
            let contents = spool
                .into_contents(&mut tree)
                .context("reading the temp spool")?;
            opened = Opened::Indexed(tree, kiln_tree::SourceContents::Spool(contents));
        } else if let Opened::Indexed(tree, contents) = &mut opened {
            // A compressed image stores a file with holes only when at most half of it is
            // data; short of that, its zeroes are compressed with the rest.
            if opts.compression == Compression::None {
                kiln_tree::holes::find(tree, contents)
            } else {
                kiln_tree::holes::find_mostly(tree, contents)
            }
            .with_context(|| format!("reading {}", a.source.display()))?;
        }
    }
    let summary = match opened {
        Opened::Indexed(mut tree, contents) => {
            norm.apply(&mut tree);
            let plan = erofs::plan(&tree, &opts).context("planning the EROFS image")?;
            let size = plan.size().bytes;
            file.set_len(size)
                .with_context(|| format!("sizing {}", out.tmp_path().display()))?;
            let sink = FileSink::new(file, 0, size);
            progress.begin("erofs", Some(super::file_bytes(&tree)));
            let s = plan
                .write(&contents, &sink, &positioning(&progress))
                .with_context(|| format!("writing {}", a.output.display()))?;
            (s, tree.nodes.len(), super::file_bytes(&tree))
        }
        Opened::Stream(stream) => {
            // The image size is unknown until the stream ends: write into a large window of
            // a sparse file and trim it afterwards.
            let sink = FileSink::new(file, 0, 1 << 44);
            let mut w = erofs::StreamWriter::new(&opts, &sink)?;
            let mut tree = stream
                .read(&mut w)
                .with_context(|| format!("reading {}", a.source.display()))?;
            norm.apply(&mut tree);
            let s = w
                .finish(&tree, &kiln_formats::fstree::HostContents)
                .with_context(|| format!("writing {}", a.output.display()))?;
            (s, tree.nodes.len(), super::file_bytes(&tree))
        }
    };
    let (summary, entries, input) = summary;
    file.set_len(summary.size)
        .with_context(|| format!("sizing {}", out.tmp_path().display()))?;
    let sha = if a.print.json {
        let mut h = sha2::Sha256::new();
        let mut f = std::fs::File::open(out.tmp_path())
            .with_context(|| format!("reading back {}", out.tmp_path().display()))?;
        std::io::copy(&mut f, &mut h).context("hashing the image")?;
        Some(format!("sha256:{}", hex::encode(h.finalize())))
    } else {
        None
    };
    out.commit()
        .with_context(|| format!("finishing {}", a.output.display()))?;
    super::summary(&progress, &a.output, summary.size, entries, input);
    if a.print.json {
        let slots: Vec<_> = summary
            .slots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "nid": s.nid, "inode_offset": s.inode_offset,
                    "data_offset": s.data_offset, "capacity": s.capacity,
                })
            })
            .collect();
        // docs/json/mkfs-erofs.schema.json
        let j = serde_json::json!({
            "schema": "kiln.mkfs-erofs/1",
            "format": "erofs",
            "output": a.output.display().to_string(),
            "compression": match a.compress {
                Algo::None => "none",
                Algo::Lz4 => "lz4",
                Algo::Lz4hc => "lz4hc",
            },
            "size": summary.size,
            "blocks": summary.size / 4096,
            "inodes": summary.inodes,
            "data_blocks": summary.data_blocks,
            "meta_blocks": summary.meta_blocks,
            "compressed_files": summary.compressed_files,
            "shared_files": summary.shared_files,
            "shared_size": summary.shared_bytes,
            "root_nid": summary.root_nid,
            "uuid": repart::Uuid::from_bytes(opts.uuid).to_string(),
            "digest": sha,
            "seconds": start.elapsed().as_secs_f64(),
            "slots": slots,
        });
        println!("{j}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Sizes the worker pool at one thread more than the cores (unless RAYON_NUM_THREADS says
/// otherwise). Placing a compressed batch writes its 8 MiB stages with direct I/O from one
/// worker, which then waits for the disk while the next batch compresses; with a pool of
/// exactly one worker per core, a core idled for every stage written. The image does not
/// depend on the pool's size (units are compressed independently and collected in order).
/// Measured on 2 cores with scripts/bench-erofs's /usr copy, `-z lz4 --pcluster-blocks 16`:
/// 9.2-9.7 s wall with 3 workers against 9.8-10.6 s with 2, alternating runs, same CPU time.
fn one_worker_per_core_and_one_more() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // An error means a pool already exists; it then keeps its size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(cores + 1)
        .build_global();
}
