//! `kiln completions` and `kiln man`: shell completions and man pages generated from the same
//! clap definitions that parse the command line, so they always match it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

use super::Outcome;

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// The directory to write the pages into (created if missing), usually a `man1` directory
    /// on MANPATH such as ~/.local/share/man/man1.
    pub dir: PathBuf,
}

pub fn completions(a: CompletionsArgs, mut cmd: clap::Command) -> Outcome {
    // Into memory first: clap_complete panics when its writer fails (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "kiln", &mut script);
    match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the completion script")?
        }
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

pub fn man(a: ManArgs, mut cmd: clap::Command) -> Outcome {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, None, &a.dir, &mut written)?;
    for p in &written {
        println!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// One page per command: `kiln.1`, `kiln-build.1`, `kiln-mkfs-ext4.1`, … (git's naming, which
/// `man kiln-build` finds).
fn write_pages(
    cmd: &clap::Command,
    parent: Option<&str>,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let name = match parent {
        Some(p) => format!("{p}-{}", cmd.get_name()),
        None => cmd.get_name().to_string(),
    };
    let page = cmd
        .clone()
        .display_name(name.clone())
        .bin_name(name.replace('-', " "));
    let mut bytes = Vec::new();
    clap_mangen::Man::new(page)
        .title(name.clone())
        .render(&mut bytes)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    let out = kiln_tree::output::AtomicFile::create(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut out.file(), &bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    out.commit()
        .with_context(|| format!("committing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(sub, Some(&name), dir, written)?;
    }
    Ok(())
}
