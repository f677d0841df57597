//! What a newcomer meets first: progress on a terminal (captured through tmux) and in a pipe,
//! `kiln mkfs`'s summary line, man pages (rendered by man-db), shell completions (loaded by
//! bash), and `kiln boot` refusing an image firmware cannot boot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{require_tool, run, run_ok, text_bytes};
use regex::Regex;

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env_remove("NO_COLOR")
        .env_remove("KILN_PROGRESS_INTERVAL")
        .env_remove("KILN_LOG");
    c
}

/// A spec whose EROFS lz4hc root takes a few seconds to compress (long enough for a bar to be
/// drawn and several progress lines to be printed), with verity, and no `[boot]`.
const SPEC: &str = r#"
[image]
name = "progress"
version = "1"
seed = "0123456789abcdef0123456789abcdef"
source_date_epoch = 1700000000

[[partition]]
type = "root"
fs = "erofs"
compression = "lz4hc"
verity = true
"#;

/// A tree of `files` compressible 2 MiB files.
fn tree(dir: &Path, files: u64) -> PathBuf {
    let root = dir.join("tree");
    fs::create_dir_all(root.join("data")).unwrap();
    for i in 0..files {
        fs::write(root.join(format!("data/f{i:03}")), text_bytes(i, 2 << 20)).unwrap();
    }
    fs::write(dir.join("kiln.toml"), SPEC).unwrap();
    root
}

fn build_cmd(dir: &Path, src: &Path, out: &str) -> Command {
    let mut c = kiln();
    c.arg("build")
        .arg(dir)
        .arg("--source")
        .arg(src)
        .arg("-o")
        .arg(dir.join(out));
    c
}

/// On a terminal, `kiln build` draws a bar for its long stages: label, bytes done of the total,
/// rate and ETA. tmux gives kiln a real pty and lets the test read the screen while it runs.
#[test]
fn build_draws_a_progress_bar_on_a_tty() {
    let tmux = require_tool("tmux");
    let t = tempfile::tempdir().unwrap();
    let src = tree(t.path(), 48);
    let session = format!("kiln-progress-{}", std::process::id());
    let socket = t.path().join("tmux.sock");
    let tm = || {
        let mut c = Command::new(&tmux);
        c.arg("-S").arg(&socket);
        c
    };
    let line = format!(
        "{} build {} --source {} -o {}; echo KILN-EXIT-$?; sleep 60",
        env!("CARGO_BIN_EXE_kiln"),
        t.path().display(),
        src.display(),
        t.path().join("out").display()
    );
    run_ok(
        tm().args(["new-session", "-d", "-x", "160", "-y", "30", "-s", &session])
            .arg(format!("env -u NO_COLOR -u KILN_PROGRESS_INTERVAL {line}")),
    );
    // "root (erofs) ███   12.00 MiB/96.00 MiB 30.1 MiB/s ETA 3s" (indicatif's units).
    let bar = Regex::new(
        r"kiln build \S+ \(erofs\) .*\d+(\.\d+)? [KMG]?i?B/\d+(\.\d+)? MiB +\d+(\.\d+)? [KMG]?i?B/s ETA \d+",
    )
    .unwrap();
    let start = Instant::now();
    let mut seen = None;
    let mut screen = String::new();
    while start.elapsed() < Duration::from_secs(240) {
        screen = String::from_utf8_lossy(
            &run_ok(tm().args(["capture-pane", "-p", "-t", &session])).stdout,
        )
        .into_owned();
        if seen.is_none() {
            seen = screen.lines().find(|l| bar.is_match(l)).map(str::to_string);
        }
        if screen.contains("KILN-EXIT-") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = run(tm().args(["kill-server"]));
    assert!(
        screen.contains("KILN-EXIT-0"),
        "the build did not finish with status 0 within 240 s:\n{screen}"
    );
    let seen = seen.unwrap_or_else(|| panic!("no progress bar was drawn; last screen:\n{screen}"));
    eprintln!("captured: {seen}");
    // The bar is replaced by the stage's result line when the stage ends.
    assert!(
        screen.contains(" (erofs): "),
        "no stage result line after the bar:\n{screen}"
    );
}

/// Without a terminal there is no bar and no escape code, but a long stage prints a
/// percentage line every interval (here 0.2 s instead of the default 3 s), climbing.
#[test]
fn piped_build_prints_progress_lines() {
    let t = tempfile::tempdir().unwrap();
    let src = tree(t.path(), 48);
    let out = run_ok(build_cmd(t.path(), &src, "out").env("KILN_PROGRESS_INTERVAL", "0.2"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('\x1b'), "escape codes in a pipe:\n{err}");
    let line =
        Regex::new(r"(?m)^kiln build \[ *\d+\.\ds\] \S+ \(erofs\): +(\d+)% \(.* of .*, .*/s\)$")
            .unwrap();
    let pcts: Vec<u32> = line
        .captures_iter(&err)
        .map(|c| c[1].parse().unwrap())
        .collect();
    assert!(pcts.len() >= 2, "fewer than two progress lines:\n{err}");
    assert!(
        pcts.windows(2).all(|w| w[0] <= w[1]) && pcts.iter().all(|&p| p <= 100),
        "percentages do not climb: {pcts:?}\n{err}"
    );
    for stage in ["plan: ", " (erofs): ", "verity of ", "digests: "] {
        assert!(err.contains(stage), "no {stage:?} line:\n{err}");
    }
    // -q: nothing at all on stderr.
    let quiet = run_ok(build_cmd(t.path(), &src, "out-q").arg("-q"));
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
}

/// KILN_LOG shows what the libraries log through `tracing` (here kiln-build's stages, inside
/// the build's span), also under -q, which silences only the progress display.
#[test]
fn kiln_log_shows_library_events() {
    let t = tempfile::tempdir().unwrap();
    let src = tree(t.path(), 2);
    let out = run_ok(
        build_cmd(t.path(), &src, "out")
            .arg("-q")
            .env("KILN_LOG", "kiln_build=debug"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for stage in ["plan: 2 partitions", "verity of root-"] {
        let want = format!(
            "DEBUG build{{image=progress version=1}}: kiln_build::artifacts: done stage={stage}"
        );
        assert!(err.contains(&want), "no {want:?} in:\n{err}");
    }
    assert!(
        !err.contains("kiln build ["),
        "progress lines under -q:\n{err}"
    );
}

/// `kiln mkfs` ends with one line: path, size, entries, ratio, time; the numbers are the
/// image's and the tree's.
#[test]
fn mkfs_ends_with_a_summary_line() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d/e")).unwrap();
    fs::write(src.join("a"), text_bytes(1, 300_000)).unwrap();
    fs::write(src.join("d/b"), text_bytes(2, 100_000)).unwrap();
    fs::write(src.join("d/e/c"), b"c").unwrap();
    // root, a, d, d/b, d/e, d/e/c
    let entries = 6;
    let input = 300_000 + 100_000 + 1;
    let line = Regex::new(
        r"(?m)^kiln mkfs: (.+): .+ \((\d+) bytes\), (\d+) entries, .+ of file data, ratio (\d+\.\d\d), \d+\.\d s$",
    )
    .unwrap();
    for (fs_kind, extra) in [("ext4", &[][..]), ("erofs", &["-z", "lz4hc"][..])] {
        let img = t.path().join(format!("x.{fs_kind}"));
        let out = run_ok(
            kiln()
                .args(["mkfs", fs_kind])
                .args(extra)
                .arg(&src)
                .arg("-o")
                .arg(&img),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        let c = line
            .captures(last)
            .unwrap_or_else(|| panic!("{fs_kind}: no summary line:\n{err}"));
        let size = fs::metadata(&img).unwrap().len();
        assert_eq!(&c[1], img.display().to_string(), "{last}");
        assert_eq!(c[2].parse::<u64>().unwrap(), size, "{last}");
        assert_eq!(c[3].parse::<u64>().unwrap(), entries, "{last}");
        let ratio: f64 = c[4].parse().unwrap();
        assert!(
            (ratio - size as f64 / input as f64).abs() < 0.006,
            "{fs_kind}: ratio {ratio} for {size} / {input}"
        );
        let quiet = run_ok(
            kiln()
                .args(["mkfs", fs_kind, "-q"])
                .arg(&src)
                .arg("-o")
                .arg(&img),
        );
        assert!(quiet.stderr.is_empty(), "{fs_kind} -q printed something");
    }
}

/// `kiln man DIR` writes a page per command, and man-db renders `kiln-build` from it, with the
/// renamed flag and the examples.
#[test]
fn man_pages_render() {
    let man = require_tool("man");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("man1");
    let out = run_ok(kiln().arg("man").arg(&dir));
    let listed = String::from_utf8_lossy(&out.stdout);
    for page in [
        "kiln.1",
        "kiln-build.1",
        "kiln-mkfs-ext4.1",
        "kiln-completions.1",
    ] {
        assert!(dir.join(page).is_file(), "{page} missing; wrote:\n{listed}");
    }
    let page = run_ok(
        Command::new(&man)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .arg("-l")
            .arg(dir.join("kiln-build.1")),
    );
    let text = String::from_utf8_lossy(&page.stdout);
    for want in [
        "kiln-build",
        "--image-version",
        "--key",
        "Examples:",
        "kiln build examples/hello",
    ] {
        assert!(
            text.contains(want),
            "{want:?} not in the rendered page:\n{text}"
        );
    }
    // MANPATH lookup by name, as a user runs it after installing the pages.
    let by_name = run_ok(
        Command::new(&man)
            .env("MANPAGER", "cat")
            .env("MANPATH", t.path())
            .arg("kiln-build"),
    );
    assert!(String::from_utf8_lossy(&by_name.stdout).contains("--image-version"));
}

/// bash loads the completion script and registers it for `kiln`; it completes subcommands and
/// flags. zsh and fish scripts are generated too.
#[test]
fn completions_load_in_bash() {
    let bash = require_tool("bash");
    let exe = env!("CARGO_BIN_EXE_kiln");
    let out = run_ok(Command::new(&bash).arg("-c").arg(format!(
        "source <('{exe}' completions bash) && complete -p kiln && \
         COMP_WORDS=(kiln bu) COMP_CWORD=1 COMP_LINE='kiln bu' COMP_POINT=7 && \
         $(complete -p kiln | sed -E 's/.*-F ([^ ]+).*/\\1/') kiln bu kiln && \
         echo \"words: ${{COMPREPLY[*]}}\" && \
         COMP_WORDS=(kiln build --image) COMP_CWORD=2 COMP_LINE='kiln build --image' COMP_POINT=18 && \
         $(complete -p kiln | sed -E 's/.*-F ([^ ]+).*/\\1/') kiln --image build && \
         echo \"flags: ${{COMPREPLY[*]}}\""
    )));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("-F _kiln kiln"), "{text}");
    assert!(text.contains("words: build"), "{text}");
    assert!(text.contains("flags: --image-version"), "{text}");
    for shell in ["zsh", "fish"] {
        let out = run_ok(kiln().args(["completions", shell]));
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("image-version"), "{shell}: {s}");
    }
}

/// `kiln boot` of a disk with no ESP fails at once, saying so, instead of waiting in the
/// firmware's boot manager until the timeout.
#[test]
fn boot_without_an_esp_fails_at_once() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("tree");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), b"x\n").unwrap();
    fs::write(t.path().join("kiln.toml"), SPEC.replace("lz4hc", "lz4")).unwrap();
    run_ok(build_cmd(t.path(), &src, "out").arg("-q"));
    let start = Instant::now();
    let out = run(kiln()
        .arg("boot")
        .arg(t.path().join("out/progress_1.img"))
        .args(["--expect", "never", "--timeout", "120"])
        .stdin(Stdio::null()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no EFI system partition"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}
