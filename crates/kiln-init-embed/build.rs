//! Builds kiln-init as static executables with nested `cargo build`s and hands their paths to
//! the library, which embeds them with `include_bytes!`: one for the target kiln itself is built
//! for, and one for the other architecture kiln builds images for (x86-64 and aarch64), so one
//! kiln makes bootable images for both.
//!
//! Why a nested build: kiln-init must be linked with `-C target-feature=+crt-static`, a flag
//! that cannot be set per package in Cargo.toml, and it must be built for the target only (proc
//! macros and build scripts cannot be static). The nested builds use their own target directory
//! (`<target>/kiln-init-static`, shared by all profiles), so they never wait on the lock of the
//! build that runs this script. They run `--locked` against the workspace's Cargo.lock, so they
//! use exactly the crates the outer build already fetched.
//!
//! The foreign build targets `<arch>-unknown-linux-musl`, links with `rust-lld` (shipped with
//! rustc) and compiles the C parts of xz2 and zstd with `<arch>-linux-gnu-gcc` (Debian:
//! `gcc-aarch64-linux-gnu` or `gcc-x86-64-linux-gnu`) unless `CC_<target>` names a compiler. A
//! missing Rust target is added with `rustup target add` when rustup is there. When the
//! foreign build cannot be made, kiln is still built, with a warning: images for that
//! architecture then need `KILN_INIT_<ARCH>=path` at run time.
//!
//! `KILN_INIT_EMBED=0` skips both (the library then reports that no kiln-init is embedded and
//! callers need `KILN_INIT=path`); `KILN_INIT_EMBED=native` skips the foreign one. Hosts that
//! are not x86-64/aarch64 Linux with glibc or musl skip both: kiln-init only runs on Linux.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kiln_init_x86_64, kiln_init_aarch64)");
    println!("cargo::rerun-if-env-changed=KILN_INIT_EMBED");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest
        .parent()
        .and_then(Path::parent)
        .expect("crate lives in <workspace>/crates/")
        .to_path_buf();
    for p in [
        "crates/kiln-init",
        "crates/kiln-formats",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", workspace.join(p).display());
    }
    println!("cargo::rerun-if-changed=build.rs");

    let target = env::var("TARGET").expect("set by cargo");
    if env::var("KILN_INIT_EMBED").as_deref() == Ok("0") {
        println!("cargo::warning=KILN_INIT_EMBED=0: kiln-init not embedded; set KILN_INIT=path at run time");
        return;
    }
    let supported = target.contains("-linux-")
        && (target.starts_with("x86_64-") || target.starts_with("aarch64-"))
        && (target.ends_with("-gnu") || target.ends_with("-musl"));
    if !supported {
        println!("cargo::warning=target {target}: kiln-init is not embedded (Linux only); set KILN_INIT=path at run time");
        return;
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    // Share one nested target directory between profiles: <target-dir>/kiln-init-static.
    let target_dir = out_dir
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").is_file())
        .map(|p| p.join("kiln-init-static"))
        .unwrap_or_else(|| out_dir.join("kiln-init-static"));
    let nested = Nested {
        workspace: &workspace,
        target_dir: &target_dir,
        out_dir: &out_dir,
    };

    let native_arch = if target.starts_with("x86_64-") {
        "x86_64"
    } else {
        "aarch64"
    };
    if let Err(e) = nested.build(&target, native_arch, &[]) {
        panic!("{e}\n(set KILN_INIT_EMBED=0 to build without an embedded kiln-init)");
    }

    let foreign_arch = if native_arch == "x86_64" {
        "aarch64"
    } else {
        "x86_64"
    };
    println!("cargo::rerun-if-env-changed=CC_{foreign_arch}_unknown_linux_musl");
    if env::var("KILN_INIT_EMBED").as_deref() == Ok("native") {
        return;
    }
    if let Err(e) = nested.foreign(foreign_arch) {
        // A cargo warning is one line: the error lines of the nested build's output, joined.
        let e: Vec<&str> = e
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("Compiling"))
            .take(8)
            .collect();
        let e = e.join(" | ");
        println!(
            "cargo::warning=kiln-init for {foreign_arch} is not embedded: {e}; images for {foreign_arch} need KILN_INIT_{}=path at run time",
            foreign_arch.to_ascii_uppercase()
        );
    }
}

/// Where the nested builds go.
struct Nested<'a> {
    workspace: &'a Path,
    target_dir: &'a Path,
    out_dir: &'a Path,
}

impl Nested<'_> {
    /// The static kiln-init for `arch` on musl: checks for the Rust target (adding it with
    /// rustup when it can) and a C compiler for it, then builds.
    fn foreign(&self, arch: &str) -> Result<(), String> {
        let triple = format!("{arch}-unknown-linux-musl");
        let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let sysroot = Command::new(&rustc)
            .args(["--print", "sysroot"])
            .output()
            .map_err(|e| format!("cannot run rustc: {e}"))?;
        let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
        let std_dir = sysroot.join("lib/rustlib").join(&triple);
        if !std_dir.is_dir() {
            let added = Command::new("rustup")
                .args(["target", "add", &triple])
                .output()
                .map_err(|e| {
                    format!("the Rust target {triple} is not installed and rustup cannot run ({e})")
                })?;
            if !added.status.success() || !std_dir.is_dir() {
                return Err(format!(
                    "the Rust target {triple} is not installed and `rustup target add {triple}` failed: {}",
                    String::from_utf8_lossy(&added.stderr).trim()
                ));
            }
        }
        let cc_var = format!("CC_{}", triple.replace('-', "_"));
        let cc = match env::var(&cc_var) {
            Ok(cc) => cc,
            Err(_) => {
                let gcc = format!("{}-linux-gnu-gcc", arch.replace('_', "-"));
                if !in_path(&gcc) {
                    return Err(format!(
                        "no C compiler for {arch} ({gcc} not in PATH; install gcc-{}-linux-gnu or set {cc_var})",
                        arch.replace('_', "-")
                    ));
                }
                gcc
            }
        };
        let linker = format!(
            "CARGO_TARGET_{}_LINKER",
            triple.replace('-', "_").to_ascii_uppercase()
        );
        self.build(
            &triple,
            arch,
            &[
                (cc_var.as_str(), cc.as_str()),
                (linker.as_str(), "rust-lld"),
            ],
        )
    }

    /// Builds kiln-init for `target` and tells rustc where it is:
    /// `KILN_INIT_STATIC_<ARCH>` and the cfg `kiln_init_<arch>`.
    fn build(&self, target: &str, arch: &str, envs: &[(&str, &str)]) -> Result<(), String> {
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(self.workspace)
            .args([
                "build",
                "--locked",
                "--release",
                "-p",
                "kiln-init",
                "--bin",
                "kiln-init",
            ])
            .arg("--target")
            .arg(target)
            .arg("--target-dir")
            .arg(self.target_dir);
        // Cargo hands build scripts variables that would steer the nested build: drop them
        // all, then set exactly the flags kiln-init needs.
        for (k, _) in env::vars_os() {
            let k = k.to_string_lossy();
            // (clippy sets RUSTC_WORKSPACE_WRAPPER and CLIPPY_ARGS: the nested build is a
            // plain build whatever the outer one is.)
            if k.starts_with("CARGO_") && k != "CARGO_HOME"
                || [
                    "RUSTFLAGS",
                    "RUSTDOCFLAGS",
                    "RUSTC_WORKSPACE_WRAPPER",
                    "CLIPPY_ARGS",
                ]
                .contains(&k.as_ref())
            {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
            .env("CARGO_TERM_COLOR", "never");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().map_err(|e| {
            format!("kiln-init-embed: cannot run cargo for the nested kiln-init build: {e}")
        })?;
        if !out.status.success() {
            return Err(format!(
                "kiln-init-embed: the nested static build of kiln-init for {target} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let bin = self
            .target_dir
            .join(target)
            .join("release")
            .join("kiln-init");
        if !bin.is_file() {
            return Err(format!(
                "kiln-init-embed: nested build succeeded but {} is missing",
                bin.display()
            ));
        }
        // Copy into OUT_DIR so a later nested rebuild for another profile cannot change the
        // bytes this crate embedded.
        let dest = self.out_dir.join(format!("kiln-init-{arch}"));
        std::fs::copy(&bin, &dest)
            .map_err(|e| format!("copy {} to {}: {e}", bin.display(), dest.display()))?;
        println!(
            "cargo::rustc-env=KILN_INIT_STATIC_{}={}",
            arch.to_ascii_uppercase(),
            dest.display()
        );
        println!("cargo::rustc-cfg=kiln_init_{arch}");
        Ok(())
    }
}

fn in_path(exe: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(exe).is_file()))
}
