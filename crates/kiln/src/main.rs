//! The kiln command line. Parses arguments and calls the libraries; no logic of its own.

use clap::{Parser, Subcommand};

mod cmd;

/// Bake bootable OS images from a root filesystem, rootless and reproducible, and personalise
/// them in milliseconds.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a filesystem image (ext4, EROFS, FAT, ISO 9660) from a directory or a tar stream.
    #[command(subcommand)]
    Mkfs(cmd::mkfs::MkfsCommand),
    /// Build disk images from a kiln.toml spec.
    Build(cmd::build::BuildArgs),
    /// Write a raw disk image as a VM disk: qcow2, VHD or VMDK (streamOptimized).
    Convert(cmd::convert::ConvertArgs),
    /// Show the layout of an image: partitions, filesystems, verity, slots, ISO descriptors.
    Inspect(cmd::inspect::InspectArgs),
    /// Put payloads into an image's slots.
    Inject(cmd::inject::InjectArgs),
    /// Check an image against a chunked digest, or a file against a minisign signature.
    Verify(cmd::verify::VerifyArgs),
    /// Boot an image in QEMU with OVMF and wait for a marker on the serial console.
    Boot(cmd::boot::BootArgs),
    /// Install a newer build into the inactive A/B slot of an image or block device.
    Update(cmd::update::UpdateArgs),
    /// Serve personalised images over HTTP.
    Serve(cmd::serve::ServeArgs),
    /// Push files to an OCI registry as an ORAS-compatible artifact.
    Push(cmd::ship::PushArgs),
    /// Pull an OCI artifact's files.
    Pull(cmd::ship::PullArgs),
    /// Upload files to an object store with sha256 sidecars.
    Upload(cmd::ship::UploadArgs),
    /// Download a file from an object store, verified against its sidecar.
    Download(cmd::ship::DownloadArgs),
    /// Emit or merge release manifests.
    #[command(subcommand)]
    Manifest(cmd::ship::ManifestCommand),
    /// Bring a local cache up to date with a manifest.
    Sync(cmd::ship::SyncArgs),
    /// Sign files with a minisign key.
    Sign(cmd::ship::SignArgs),
    /// Print an SPDX SBOM of a tree's packages.
    Sbom(cmd::ship::SbomArgs),
    /// Scan a tree against a content policy.
    Lint(cmd::ship::LintArgs),
}

/// On SIGINT or SIGTERM, removes the temp files of unfinished outputs, then dies of the signal
/// as it would have without a handler. `kiln serve` handles both itself (graceful shutdown).
fn clean_up_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            kiln_tree::output::remove_unfinished();
            let _ = signal_hook::low_level::emulate_default_handler(sig);
            std::process::exit(128 + sig);
        }
    });
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        clean_up_on_signals();
    }
    let result = match cli.command {
        Command::Mkfs(c) => cmd::mkfs::run(c),
        Command::Build(a) => cmd::build::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Inject(a) => cmd::inject::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Boot(a) => cmd::boot::run(a),
        Command::Update(a) => cmd::update::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Push(a) => cmd::ship::push(a),
        Command::Pull(a) => cmd::ship::pull(a),
        Command::Upload(a) => cmd::ship::upload(a),
        Command::Download(a) => cmd::ship::download(a),
        Command::Manifest(c) => cmd::ship::manifest(c),
        Command::Sync(a) => cmd::ship::sync(a),
        Command::Sign(a) => cmd::ship::sign(a),
        Command::Sbom(a) => cmd::ship::sbom(a),
        Command::Lint(a) => cmd::ship::lint(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {}", render(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined with ": ", like `{:#}`, leaving out a cause whose text the
/// message already holds. Many library errors put their source's text in their own message
/// and also expose it as `source()`; printed as a chain, "No such file or directory (os error
/// 2)" appeared twice.
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Both {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(Both {
            path: "x.tar".into(),
            source: io,
        })
        .context("reading x.tar");
        let r = render(&e);
        assert_eq!(r.matches("os error 2").count(), 1, "{r}");
        assert!(r.starts_with("reading x.tar: x.tar: "), "{r}");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render(&plain), "outer: inner");
    }
}
