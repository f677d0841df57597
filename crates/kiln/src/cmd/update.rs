//! `kiln update`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;

use super::Outcome;

/// Install a newer build into the inactive A/B slot of a disk image or block device: its root
/// and verity images into the slot (named NAME_VERSION, UUIDs from the root hash) and its UKI
/// onto the ESP with boot counting, keeping the running version as the fallback.
#[derive(Args)]
pub struct UpdateArgs {
    /// The disk image or block device to update in place.
    pub image: PathBuf,
    /// The new build: a `kiln build` output directory or its NAME.json report.
    #[arg(long, value_name = "DIR_OR_REPORT", conflicts_with = "from")]
    pub with: Option<PathBuf>,
    /// The new build's signed update index (`NAME_VERSION.index` from `kiln build`), by URL:
    /// http(s)://, s3:// or a path. Only the blocks the disk does not already have are fetched.
    #[arg(long, value_name = "URL", requires = "pubkey")]
    pub from: Option<String>,
    /// minisign public key the index must be signed with (`--from`).
    #[arg(long = "pub", value_name = "KEY.pub")]
    pub pubkey: Option<PathBuf>,
    /// With `--from`: print what would be fetched, write nothing.
    #[arg(long, requires = "from")]
    pub dry_run: bool,
    /// With `--from`: ranges fetched at once.
    #[arg(long, default_value_t = 4, requires = "from")]
    pub parallel: usize,
    /// Print the result as JSON (schema `kiln.update/1`).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: UpdateArgs) -> Outcome {
    if let Some(from) = &a.from {
        return run_from(&a, from);
    }
    let Some(with) = a.with.clone() else {
        bail!("kiln update: give --with DIR (a local build) or --from URL (a published index)");
    };
    let r = kiln_build::update::update(&kiln_build::update::UpdateOptions {
        image: a.image.clone(),
        with,
    })?;
    if a.json {
        let mut doc = serde_json::to_value(&r)?;
        if let Some(o) = doc.as_object_mut() {
            o.insert("schema".into(), kiln_build::json::UPDATE_SCHEMA.into());
            o.insert("mode".into(), "with".into());
            o.insert("dry_run".into(), false.into());
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: installed {} {} into partitions {} and {} (was {}){}",
        a.image.display(),
        r.name,
        r.version,
        r.data_partition,
        r.hash_partition,
        r.replaced,
        kept_note(&r.kept)
    );
    print_gpt_restored(&r.gpt_restored, false);
    print_esp(&r.installed_uki, &r.removed_ukis);
    Ok(ExitCode::SUCCESS)
}

fn run_from(a: &UpdateArgs, from: &str) -> Outcome {
    let Some(pubkey) = a.pubkey.clone() else {
        bail!("kiln update --from needs --pub KEY.pub: the index must be signed");
    };
    let r = kiln_build::delta::update_from(&kiln_build::delta::FromOptions {
        image: a.image.clone(),
        from: from.to_string(),
        pubkey,
        dry_run: a.dry_run,
        fetch: kiln_ship::ranges::FetchOptions {
            parallel: a.parallel.max(1),
            ..Default::default()
        },
    })?;
    if a.json {
        let mut doc = serde_json::to_value(&r)?;
        if let Some(o) = doc.as_object_mut() {
            o.insert("schema".into(), kiln_build::json::UPDATE_SCHEMA.into());
            o.insert("mode".into(), "from".into());
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{}: {} {} {}: root {:.2} MiB of {:.2} MiB to fetch ({:.2} %; {} blocks in place, {} copied on the disk), UKI {:.2} of {:.2} MiB, index {:.2} MiB",
        a.image.display(),
        if r.dry_run { "would install" } else { "installed" },
        r.install.name,
        r.install.version,
        mib(r.root_missing_bytes),
        mib(r.root_bytes),
        r.root_missing_percent,
        r.blocks_in_place,
        r.blocks_local,
        mib(r.uki_missing_bytes),
        mib(r.uki_bytes),
        mib(r.index_bytes),
    );
    print_gpt_restored(&r.install.gpt_restored, r.dry_run);
    if !r.dry_run {
        println!(
            "  fetched {} bytes in {} requests ({} retried); partitions {} and {} (was {}){}",
            r.fetched_bytes,
            r.requests,
            r.retries,
            r.install.data_partition,
            r.install.hash_partition,
            r.install.replaced,
            kept_note(&r.install.kept)
        );
        print_esp(&r.install.installed_uki, &r.install.removed_ukis);
    }
    Ok(ExitCode::SUCCESS)
}

/// "; version V kept as the fallback", or nothing.
fn kept_note(kept: &Option<String>) -> String {
    kept.as_ref()
        .map(|k| format!("; version {k} kept as the fallback"))
        .unwrap_or_default()
}

/// The note for a primary GPT that an interrupted earlier run (or anything else) left damaged.
fn print_gpt_restored(why: &Option<String>, dry_run: bool) {
    if let Some(why) = why {
        println!(
            "  GPT: the primary copy is damaged ({why}); {} from the backup, which firmware boots from",
            if dry_run { "would be rewritten" } else { "rewritten" }
        );
    }
}

/// The ESP changes of an update, one line each.
fn print_esp(installed: &str, removed: &[String]) {
    println!("  ESP: added {installed}");
    for u in removed {
        println!("  ESP: removed {u}");
    }
}
