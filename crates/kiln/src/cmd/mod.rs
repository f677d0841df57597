//! One module per subcommand, each with its `*Args` and a `run`.

pub mod boot;
pub mod build;
pub mod convert;
pub mod docs;
pub mod inject;
pub mod inspect;
pub mod mkfs;
pub mod serve;
pub mod ship;
pub mod update;
pub mod verify;

/// What every subcommand returns.
pub type Outcome = anyhow::Result<std::process::ExitCode>;

/// Creates the missing directories above an output file. Every command that takes `-o` does
/// this, after its inputs have been checked (so a refused run creates nothing): `mkfs`,
/// `build` (whose `-o` is itself a directory), `inject`, `pull`, `download`.
pub fn create_parent(output: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the output directory {}", parent.display()))?;
    }
    Ok(())
}

/// Refuses an output that is the input (the same inode, also through a symlink or a hard
/// link): writing it would replace the input while it is being read.
pub fn refuse_same_file(
    input: &std::path::Path,
    output: &std::path::Path,
    what: &str,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(input), std::fs::metadata(output)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            anyhow::bail!(
                "-o {} is the {what} {} itself; write the image somewhere else",
                output.display(),
                input.display()
            );
        }
    }
    Ok(())
}
