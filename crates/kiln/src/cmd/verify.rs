//! `kiln verify`: check an image (or an image as it would be after injection) against a
//! chunked or plain sha256 digest; print digests; write the base's chunk table.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use kiln_inject::chunks::{self, ChunkTable, ChunkedDigest};
use kiln_inject::{plan_injection, ComposedImage, PatchPlan, ReadAt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::inject::{load_payloads, open_with_table};
use super::Outcome;

/// Verification modes are flags on one struct so that more (e.g. a signature check) can be
/// added beside `--digest` without reshaping the command.
#[derive(Args)]
pub struct VerifyArgs {
    /// The image to check.
    pub image: PathBuf,
    /// Expected digest: `chunked-sha256:<hex>` (4 MiB chunk table) or `sha256:<hex>` (plain).
    #[arg(long, value_name = "D")]
    pub digest: Option<String>,
    /// Check IMAGE as it would be with NAME=FILE injected, without writing anything. With a
    /// chunk table sidecar (IMAGE.chunks) only the patched chunks are read.
    #[arg(long = "slot", value_name = "NAME=FILE")]
    pub slots: Vec<String>,
    /// Slot table sidecar to use instead of the table inside the image.
    #[arg(long, value_name = "FILE")]
    pub table: Option<PathBuf>,
    /// Print the image's digests instead of checking one.
    #[arg(long)]
    pub print: bool,
    /// Also write IMAGE.chunks, the chunk table that makes composed digests cheap.
    #[arg(long)]
    pub write_chunks: bool,
    /// Check IMAGE's minisign signature (IMAGE.minisig, or --sig) with this public key.
    #[arg(long = "pub", value_name = "KEY")]
    pub pubkey: Option<PathBuf>,
    /// The signature file for --pub (default IMAGE.minisig).
    #[arg(long, value_name = "FILE", requires = "pubkey")]
    pub sig: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `kiln verify --json` (schema `kiln.verify/1`, docs/json/verify.schema.json): one document
/// for everything the run checked.
#[derive(Serialize)]
struct Report {
    schema: &'static str,
    image: String,
    /// Bytes of the image (as composed with `--slot`), when digests were computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunked_digest: Option<String>,
    /// `sha256:HEX` of the whole image.
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    /// The `--digest` check's result.
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    /// The `--pub` check (present only when the signature verified).
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<SignatureReport>,
}

#[derive(Serialize)]
struct SignatureReport {
    ok: bool,
    trusted_comment: String,
}

const SCHEMA: &str = "kiln.verify/1";

enum Expected {
    Chunked(ChunkedDigest),
    Plain([u8; 32]),
}

fn parse_expected(s: &str) -> anyhow::Result<Expected> {
    if let Some(h) = s.strip_prefix("sha256:") {
        let mut d = [0u8; 32];
        hex::decode_to_slice(h, &mut d)
            .map_err(|e| anyhow::anyhow!("--digest {s:?}: expected sha256:<64 hex digits>: {e}"))?;
        return Ok(Expected::Plain(d));
    }
    s.parse::<ChunkedDigest>()
        .map(Expected::Chunked)
        .map_err(|e| anyhow::anyhow!("--digest {e}; or sha256:<64 hex digits>"))
}

fn plain_sha256(r: &mut dyn Read) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

pub fn run(args: VerifyArgs) -> Outcome {
    let mut signature = None;
    if let Some(key) = &args.pubkey {
        let v = kiln_ship::sign::verify_file(&args.image, key, args.sig.as_deref())?;
        if !args.json {
            println!(
                "{}: signature ok ({})",
                args.image.display(),
                v.trusted_comment
            );
        }
        signature = Some(SignatureReport {
            ok: true,
            trusted_comment: v.trusted_comment,
        });
        if args.digest.is_none() && !args.print && !args.write_chunks {
            if args.json {
                let report = Report {
                    schema: SCHEMA,
                    image: args.image.display().to_string(),
                    size: None,
                    chunked_digest: None,
                    digest: None,
                    ok: None,
                    signature,
                };
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            return Ok(std::process::ExitCode::SUCCESS);
        }
    }
    if args.digest.is_none() && !args.print && !args.write_chunks {
        bail!("nothing to do: give --digest D, --pub KEY, --print or --write-chunks");
    }
    let expected = args.digest.as_deref().map(parse_expected).transpose()?;
    let want_plain = args.print || matches!(expected, Some(Expected::Plain(_)));

    let (src, plan) = if args.slots.is_empty() {
        let src = kiln_inject::FileSource::open(&args.image)
            .with_context(|| format!("opening {}", args.image.display()))?;
        let len = src.len();
        (src, Arc::new(PatchPlan::new(len, vec![])?))
    } else {
        let (src, table, _) = open_with_table(&args.image, args.table.as_deref())?;
        let payloads = load_payloads(&table, &args.slots)?;
        let plan = Arc::new(plan_injection(&table, &src, &payloads)?);
        (src, plan)
    };
    let len = src.len();
    let place = args.image.display().to_string();

    // The base's chunk table: from the sidecar when it exists, else by reading everything.
    // A table written for an image with slots carries the SHA-256 midstates `kiln serve` and
    // the plain digest below resume from.
    let points = if args.write_chunks {
        slot_resume_points(&args.image, &src, args.table.as_deref())?
    } else {
        Vec::new()
    };
    let sidecar = ChunkTable::load_sidecar(&args.image, len)?;
    let base_table = match sidecar {
        Some(t)
            if !(want_plain && t.sha256.is_none() && args.slots.is_empty())
                && t.has_midstates_at(&points) =>
        {
            t
        }
        _ if !points.is_empty() => ChunkTable::compute_resumable(&src, &points)
            .with_context(|| format!("reading {place}"))?,
        _ => ChunkTable::compute(&src, want_plain && args.slots.is_empty())
            .with_context(|| format!("reading {place}"))?,
    };
    if args.write_chunks {
        let side = chunks::sidecar_path(&args.image);
        let f = kiln_tree::output::AtomicFile::create(&side)
            .with_context(|| side.display().to_string())?;
        std::io::Write::write_all(&mut f.file(), &base_table.to_bytes())
            .with_context(|| side.display().to_string())?;
        f.commit().with_context(|| side.display().to_string())?;
    }
    let composed = ComposedImage::new(&src, plan.clone())?;
    // With a midstate before the first patch, the plain digest reads only the tail.
    let resumed = if want_plain && !plan.regions().is_empty() {
        base_table
            .composed_sha256(&composed, &plan)?
            .map(|(s, _)| s)
    } else {
        None
    };
    let table = if plan.regions().is_empty() {
        base_table
    } else {
        base_table.compose(&composed, &plan)?
    };
    let sha = match (&table.sha256, want_plain) {
        (Some(s), _) => Some(*s),
        (None, true) if resumed.is_some() => resumed,
        (None, true) => {
            let mut c = ComposedImage::new(&src, plan.clone())?;
            Some(plain_sha256(&mut c).with_context(|| format!("reading {place}"))?)
        }
        (None, false) => None,
    };
    let ok = expected.as_ref().map(|e| match e {
        Expected::Chunked(d) => table.digest() == *d,
        Expected::Plain(d) => sha.as_ref() == Some(d),
    });
    let chunked_digest = table.digest().to_string();
    let digest = sha.map(|s| format!("sha256:{}", hex::encode(s)));
    if args.json {
        let report = Report {
            schema: SCHEMA,
            image: place.clone(),
            size: Some(len),
            chunked_digest: Some(chunked_digest.clone()),
            digest: digest.clone(),
            ok,
            signature,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.print || ok.is_none() {
        println!("{chunked_digest}");
        if let Some(s) = &digest {
            println!("{s}");
        }
    }
    match ok {
        Some(false) => {
            if !args.json {
                eprintln!(
                    "kiln: {place}: digest mismatch: expected {}, image has {}",
                    args.digest.unwrap_or_default(),
                    match expected {
                        Some(Expected::Plain(_)) => digest.unwrap_or_default(),
                        _ => chunked_digest,
                    }
                );
            }
            Ok(std::process::ExitCode::FAILURE)
        }
        Some(true) => {
            if !args.json {
                println!("{place}: OK");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        None => Ok(std::process::ExitCode::SUCCESS),
    }
}

/// Each slot's first patchable byte, where `--write-chunks` keeps a SHA-256 midstate; none for
/// an image without a slot table (in the image, beside it, or named by `--table`).
fn slot_resume_points(
    image: &std::path::Path,
    src: &kiln_inject::FileSource,
    table: Option<&std::path::Path>,
) -> anyhow::Result<Vec<u64>> {
    use kiln_inject::slots;
    let mut magic = [0u8; 8];
    let has_magic = src.len() >= slots::TABLE_OFFSET + 8 && {
        src.read_exact_at(slots::TABLE_OFFSET, &mut magic)
            .with_context(|| format!("reading {}", image.display()))?;
        magic == slots::MAGIC
    };
    if table.is_none() && !has_magic && !slots::sidecar_path(image).exists() {
        return Ok(Vec::new());
    }
    let (t, _) = slots::find_table(image, src.file(), table)?;
    Ok(t.resume_points())
}
