//! `kiln inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::Outcome;

/// Show what an image holds: GPT partitions with their filesystems and verity superblocks,
/// ISO 9660 descriptors and El Torito entries, and kiln's slots. Works on any GPT disk.
#[derive(Args)]
pub struct InspectArgs {
    /// A disk image, ISO, filesystem image or block device.
    pub image: PathBuf,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Also print the full dump of every ext4 and EROFS filesystem (superblock, groups, every
    /// inode with its path) and of the ISO 9660 volume: what the golden tests snapshot.
    #[arg(long, conflicts_with = "json")]
    pub dump: bool,
}

pub fn run(a: InspectArgs) -> Outcome {
    let ins = kiln_build::inspect::inspect(&a.image)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
    } else {
        print!("{}", kiln_build::inspect::format(&ins));
        if a.dump {
            print!("\n{}", kiln_build::inspect::dumps(&a.image, &ins)?);
        }
    }
    // What was found is printed either way; a damaged or unknown image still fails.
    if let Some(e) = &ins.gpt_error {
        anyhow::bail!("{}: damaged GPT: {e}", a.image.display());
    }
    if !ins.recognised() {
        anyhow::bail!(
            "{}: unrecognised format (no GPT, ISO 9660, ext4, EROFS, FAT, verity, squashfs or swap signature, no slot table)",
            a.image.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
