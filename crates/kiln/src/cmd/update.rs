//! `kiln update`.

use std::path::PathBuf;
use std::process::ExitCode;

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
    #[arg(long, value_name = "DIR_OR_REPORT")]
    pub with: PathBuf,
}

pub fn run(a: UpdateArgs) -> Outcome {
    let r = kiln_build::update::update(&kiln_build::update::UpdateOptions {
        image: a.image.clone(),
        with: a.with,
    })?;
    println!(
        "{}: installed {} {} into partitions {} and {} (was {}){}",
        a.image.display(),
        r.name,
        r.version,
        r.data_partition,
        r.hash_partition,
        r.replaced,
        match &r.kept {
            Some(k) => format!("; version {k} kept as the fallback"),
            None => String::new(),
        }
    );
    println!("  ESP: added {}", r.installed_uki);
    for u in &r.removed_ukis {
        println!("  ESP: removed {u}");
    }
    Ok(ExitCode::SUCCESS)
}
