//! The kiln command line. Parses arguments and calls the libraries; no logic of its own.

use clap::{CommandFactory, Parser, Subcommand};

mod cmd;
mod progress;

/// Bake bootable OS images from a root filesystem, rootless and reproducible, and personalise
/// them in milliseconds.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
#[command(after_help = "Examples:
  kiln build examples/hello -o out/hello
  kiln inspect out/hello/hello_1.0.img
  kiln boot out/appliance/appliance_1.img --expect 'login:'
  kiln completions bash > ~/.local/share/bash-completion/completions/kiln
  kiln man ~/.local/share/man/man1")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a filesystem image (ext4, EROFS, FAT, ISO 9660) from a directory or a tar stream.
    #[command(subcommand)]
    #[command(after_help = "Examples:
  kiln mkfs ext4 --minimize rootfs.tar -o rootfs.ext4
  kiln mkfs erofs --compress lz4hc rootfs/ -o root.erofs
  kiln mkfs vfat esp/ -o esp.img")]
    Mkfs(cmd::mkfs::MkfsCommand),
    /// Build disk images from a kiln.toml spec.
    #[command(after_help = "Examples:
  kiln build examples/hello -o out/hello
  kiln build kiosk/ -o out --source rootfs.tar.zst --image-version 2026.12.1
  kiln build kiosk/ -o out --seed $SEED --key release.key --json > report.json")]
    Build(cmd::build::BuildArgs),
    /// Write a raw disk image as a VM disk: qcow2, VHD or VMDK (streamOptimized).
    #[command(after_help = "Examples:
  kiln convert out/appliance/appliance_1.img --to qcow2
  kiln convert disk.img --to qcow2 --compression zstd -o disk.qcow2
  kiln convert disk.img --to vhd --dynamic
  kiln convert disk.img --to vmdk -o disk.vmdk")]
    Convert(cmd::convert::ConvertArgs),
    /// Show the layout of an image: partitions, filesystems, verity, slots, ISO descriptors.
    #[command(after_help = "Examples:
  kiln inspect out/hello/hello_1.0.img
  kiln inspect --json out/hello/hello_1.0.img | jq '.partitions[].label'")]
    Inspect(cmd::inspect::InspectArgs),
    /// Put payloads into an image's slots.
    #[command(after_help = "Examples:
  kiln inject out/hello/hello_1.0.img --slot piece=page.html -o personal.img
  kiln inject base.img --slot piece=page.html -o - | dd of=/dev/sdX bs=4M")]
    Inject(cmd::inject::InjectArgs),
    /// Check an image against a chunked digest, or a file against a minisign signature.
    #[command(after_help = "Examples:
  kiln verify out/hello/hello_1.0.img --print
  kiln verify out/hello/hello_1.0.img --digest sha256:HEX
  kiln verify out/hello/hello_1.0.img --pub release.pub")]
    Verify(cmd::verify::VerifyArgs),
    /// Boot an image in QEMU (OVMF, or a microVM) and wait for a marker on the serial console.
    #[command(after_help = "Examples:
  kiln boot out/appliance/appliance_1.img --expect 'appliance: healthy'
  kiln boot out/debian/debian_1.iso --as usb --expect KILN-REPORT-END --timeout 300
  kiln boot --microvm --kernel out/vm/vm_1.vmlinuz --initrd out/vm/vm_1.initrd out/vm/vm_1.rootfs.ext4 --expect 'agent: ready'")]
    Boot(cmd::boot::BootArgs),
    /// Install a newer build into the inactive A/B slot of an image or block device.
    #[command(after_help = "Examples:
  kiln update out/v1/appliance_1.img --with out/v2")]
    Update(cmd::update::UpdateArgs),
    /// Serve personalised images over HTTP.
    #[command(after_help = "Examples:
  kiln serve --config examples/serve.toml
  kiln serve --config serve.toml --listen 127.0.0.1:8080 --log-format json 2>> serve.log")]
    Serve(cmd::serve::ServeArgs),
    /// Push files to an OCI registry as an ORAS-compatible artifact.
    #[command(after_help = "Examples:
  kiln push out/hello oci://registry.example.com/os/hello:1.0 --key release.key")]
    Push(cmd::ship::PushArgs),
    /// Pull an OCI artifact's files.
    #[command(after_help = "Examples:
  kiln pull oci://registry.example.com/os/hello:1.0 -o images/")]
    Pull(cmd::ship::PullArgs),
    /// Upload files to an object store with sha256 sidecars.
    #[command(after_help = "Examples:
  kiln upload out/hello/hello_1.0.img s3://releases/hello/1.0")]
    Upload(cmd::ship::UploadArgs),
    /// Download a file from an object store, verified against its sidecar.
    #[command(after_help = "Examples:
  kiln download s3://releases/hello/1.0/hello_1.0.img -o hello.img")]
    Download(cmd::ship::DownloadArgs),
    /// Emit or merge release manifests.
    #[command(subcommand)]
    #[command(after_help = "Examples:
  kiln manifest emit out/hello --release 1.0 --merge-from manifest.json -o manifest.json")]
    Manifest(cmd::ship::ManifestCommand),
    /// Bring a local cache up to date with a manifest.
    #[command(after_help = "Examples:
  kiln sync s3://releases/manifest.json --cache ~/.cache/hello")]
    Sync(cmd::ship::SyncArgs),
    /// Sign files with a minisign key.
    #[command(after_help = "Examples:
  kiln sign --key release.key out/hello/hello_1.0.img")]
    Sign(cmd::ship::SignArgs),
    /// Print an SPDX SBOM of a tree's packages.
    #[command(after_help = "Examples:
  kiln sbom rootfs.tar -o rootfs.spdx.json")]
    Sbom(cmd::ship::SbomArgs),
    /// Scan a tree against a content policy.
    #[command(after_help = "Examples:
  kiln lint rootfs/ --policy kiln.toml")]
    Lint(cmd::ship::LintArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    #[command(after_help = "Examples:
  source <(kiln completions bash)
  kiln completions bash > ~/.local/share/bash-completion/completions/kiln
  kiln completions zsh > ~/.zfunc/_kiln
  kiln completions fish > ~/.config/fish/completions/kiln.fish")]
    Completions(cmd::docs::CompletionsArgs),
    /// Write man pages (kiln.1, kiln-build.1, ...) into a directory.
    #[command(after_help = "Examples:
  kiln man ~/.local/share/man/man1 && man kiln-build
  sudo kiln man /usr/local/share/man/man1")]
    Man(cmd::docs::ManArgs),
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
    // `oci://` sources go through kiln-ship's registry client.
    kiln_ship::image_source::register();
    if !matches!(cli.command, Command::Serve(_)) {
        clean_up_on_signals();
        // What the libraries log (stages, retries, fallbacks), on stderr: KILN_LOG sets the
        // filter (`debug`, `kiln_build=debug`, ...); warnings only by default. `kiln serve`
        // sets up its own request log.
        let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .without_time()
            .with_ansi(false)
            .init();
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
        Command::Completions(a) => cmd::docs::completions(a, Cli::command()),
        Command::Man(a) => cmd::docs::man(a, Cli::command()),
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

    /// Every command and subcommand's `--help` ends with examples, and the parser is
    /// consistent (clap's own debug assertions: no clashing flags, such as a subcommand's
    /// `--version` against `-V/--version`).
    #[test]
    fn every_help_has_examples() {
        use clap::CommandFactory;
        let mut root = super::Cli::command();
        root.build();
        root.clone().debug_assert();
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if c.get_name() == "help" {
                return;
            }
            let has = c
                .get_after_help()
                .is_some_and(|h| h.to_string().contains("Examples:"));
            if !has {
                missing.push(path.to_string());
            }
            for sub in c.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&root, "kiln", &mut missing);
        assert!(
            missing.is_empty(),
            "no Examples block in --help of: {missing:?}"
        );
    }

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
