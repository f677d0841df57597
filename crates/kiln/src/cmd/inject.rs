//! `kiln inject`: put payloads into an image's slots — in place, into a new file, or streamed
//! to stdout. All three write the same bytes (they walk one patch plan).

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use kiln_inject::slots::{self, SlotTable, TableSource};
use kiln_inject::{
    output, plan_injection, ChunkTable, ComposedImage, FileSource, PatchPlan, Payload, ReadAt,
};
use serde::Serialize;

use super::Outcome;

#[derive(Args)]
#[command(group = clap::ArgGroup::new("dest").required(true).args(["output", "in_place"]))]
pub struct InjectArgs {
    /// The base image (never modified unless --in-place).
    pub image: PathBuf,
    /// A payload: NAME=FILE puts FILE's bytes into slot NAME. Repeat for several slots.
    #[arg(long = "slot", value_name = "NAME=FILE", required = true)]
    pub slots: Vec<String>,
    /// Write the result to this file (atomically), or to stdout with `-`.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Patch IMAGE itself, writing only the patched ranges.
    #[arg(long)]
    pub in_place: bool,
    /// Use this slot table sidecar instead of the table inside the image.
    #[arg(long, value_name = "FILE")]
    pub table: Option<PathBuf>,
    /// Print a JSON summary (to stderr when the image goes to stdout).
    #[arg(long)]
    pub json: bool,
}

/// Parses `NAME=FILE`.
pub(crate) fn parse_slot_arg(s: &str) -> anyhow::Result<(&str, &Path)> {
    match s.split_once('=') {
        Some((n, f)) if !n.is_empty() && !f.is_empty() => Ok((n, Path::new(f))),
        _ => bail!("--slot {s:?}: expected NAME=FILE"),
    }
}

/// Loads the payloads named by `--slot` arguments, checking slot names and sizes against the
/// table before reading any file.
pub(crate) fn load_payloads(table: &SlotTable, args: &[String]) -> anyhow::Result<Vec<Payload>> {
    let mut out = Vec::new();
    for a in args {
        let (name, file) = parse_slot_arg(a)?;
        let Some(slot) = table.get(name) else {
            bail!("unknown slot {name:?} (this image has: {})", table.names());
        };
        let len = std::fs::metadata(file)
            .with_context(|| format!("payload for slot {name:?}: {}", file.display()))?
            .len();
        if len > slot.capacity {
            bail!(
                "payload {} for slot {name:?} is {len} bytes, more than the slot's capacity of {} bytes",
                file.display(),
                slot.capacity
            );
        }
        let data = read_at_most(file, slot.capacity)
            .with_context(|| format!("payload for slot {name:?}: {}", file.display()))?;
        if data.len() as u64 > slot.capacity {
            bail!(
                "payload {} for slot {name:?} is more than the slot's capacity of {} bytes",
                file.display(),
                slot.capacity
            );
        }
        out.push(Payload::new(name, data));
    }
    Ok(out)
}

/// Reads at most `capacity + 1` bytes of `file`: enough to tell that a payload is too big
/// without reading all of it. The size from `stat` is not enough: `/dev/zero`, a FIFO or a
/// file that grows while it is read all report less than they yield.
fn read_at_most(file: &Path, capacity: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    File::open(file)?
        .take(capacity.saturating_add(1))
        .read_to_end(&mut data)?;
    Ok(data)
}

/// Opens an image and finds its slot table.
pub(crate) fn open_with_table(
    image: &Path,
    table: Option<&Path>,
) -> anyhow::Result<(FileSource, SlotTable, TableSource)> {
    let src = FileSource::open(image).with_context(|| format!("opening {}", image.display()))?;
    let (t, from) = slots::find_table(image, src.file(), table)?;
    Ok((src, t, from))
}

/// `kiln inject --json` (schema `kiln.inject/1`, docs/json/inject.schema.json).
#[derive(Serialize)]
struct Summary<'a> {
    schema: &'static str,
    image: String,
    output: String,
    table: String,
    /// Bytes of the result (the base's size).
    size: u64,
    slots: Vec<SlotSummary<'a>>,
    regions: Vec<RegionSummary>,
    /// Bytes the patches cover.
    patched_size: u64,
    /// How a new file was made: `reflink`, `copy-file-range` or `read-write`.
    #[serde(skip_serializing_if = "Option::is_none")]
    copy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunked_digest: Option<String>,
}

#[derive(Serialize)]
struct SlotSummary<'a> {
    name: &'a str,
    /// Bytes of the payload.
    size: u64,
    capacity: u64,
    /// `sha256:HEX` of the payload.
    digest: String,
}

#[derive(Serialize)]
struct RegionSummary {
    offset: u64,
    size: u64,
}

fn copy_method_name(m: output::CopyMethod) -> &'static str {
    match m {
        output::CopyMethod::Reflink => "reflink",
        output::CopyMethod::CopyFileRange => "copy-file-range",
        output::CopyMethod::ReadWrite => "read-write",
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

pub fn run(args: InjectArgs) -> Outcome {
    let (src, table, from) = open_with_table(&args.image, args.table.as_deref())?;
    let payloads = load_payloads(&table, &args.slots)?;
    let plan = Arc::new(plan_injection(&table, &src, &payloads)?);
    // The chunked digest of the result costs O(patched chunks) when the base has a chunk table.
    let base_chunks = ChunkTable::load_sidecar(&args.image, src.len())?;
    let composed_chunks = |plan: &Arc<PatchPlan>| -> anyhow::Result<Option<ChunkTable>> {
        let Some(bc) = &base_chunks else {
            return Ok(None);
        };
        let c = ComposedImage::new(&src, plan.clone())?;
        Ok(Some(bc.compose(&c, plan)?))
    };
    let mut copy = None;
    let chunks;
    let to_stdout = args.output.as_deref() == Some(Path::new("-"));
    let out_name = if args.in_place {
        // Everything is validated above; the chunk table of the result is computed before the
        // base changes underneath it.
        chunks = composed_chunks(&plan)?;
        output::write_in_place(&args.image, &plan)?;
        if let Some(t) = &chunks {
            let side = kiln_inject::chunks::sidecar_path(&args.image);
            let f = kiln_tree::output::AtomicFile::create(&side)
                .with_context(|| format!("{}", side.display()))?;
            std::io::Write::write_all(&mut f.file(), &t.to_bytes())
                .with_context(|| format!("{}", side.display()))?;
            f.commit().with_context(|| format!("{}", side.display()))?;
        }
        "in-place".to_string()
    } else if to_stdout {
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            bail!("refusing to write a disk image to a terminal; redirect stdout or use -o FILE");
        }
        chunks = composed_chunks(&plan)?;
        let mut out = File::from(
            stdout
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating stdout")?,
        );
        output::write_stream(src.file(), &plan, &mut out).context("writing the image to stdout")?;
        "-".to_string()
    } else {
        let Some(dest) = args.output.as_deref() else {
            bail!("one of -o OUT, -o - or --in-place is required");
        };
        if same_file(dest, &args.image) {
            bail!(
                "{} is the base image; use --in-place to patch it, or another -o",
                dest.display()
            );
        }
        chunks = composed_chunks(&plan)?;
        super::create_parent(dest)?;
        let m = output::write_new_file(src.file(), &args.image, &plan, dest)?;
        copy = Some(copy_method_name(m));
        dest.display().to_string()
    };

    let summary = Summary {
        schema: "kiln.inject/1",
        image: args.image.display().to_string(),
        output: out_name.clone(),
        table: match &from {
            TableSource::InImage => "in-image".into(),
            TableSource::Sidecar(p) => p.display().to_string(),
        },
        size: plan.image_len(),
        slots: payloads
            .iter()
            .map(|p| {
                let info = slots::PayloadInfo::of(&p.data);
                SlotSummary {
                    name: &p.slot,
                    size: info.len,
                    capacity: table.get(&p.slot).map_or(0, |s| s.capacity),
                    digest: format!("sha256:{}", info.sha256),
                }
            })
            .collect(),
        regions: plan
            .regions()
            .iter()
            .map(|r| RegionSummary {
                offset: r.offset,
                size: r.len,
            })
            .collect(),
        patched_size: plan.patched_bytes(),
        copy,
        chunked_digest: chunks.map(|c| c.digest().to_string()),
    };
    if args.json {
        let j = serde_json::to_string_pretty(&summary)?;
        if to_stdout {
            eprintln!("{j}");
        } else {
            println!("{j}");
        }
    } else {
        let names: Vec<String> = summary
            .slots
            .iter()
            .map(|s| format!("{} ({} bytes)", s.name, s.size))
            .collect();
        if !to_stdout {
            println!(
                "injected {} into {}: {} patched bytes in {} regions{}",
                names.join(", "),
                out_name,
                summary.patched_size,
                summary.regions.len(),
                summary
                    .chunked_digest
                    .as_deref()
                    .map(|d| format!("; {d}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
