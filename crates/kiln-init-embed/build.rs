//! Builds kiln-init as a static executable with a nested `cargo build` and hands its path to
//! the library, which embeds it with `include_bytes!`.
//!
//! Why a nested build: kiln-init must be linked with `-C target-feature=+crt-static`, a flag
//! that cannot be set per package in Cargo.toml, and it must be built for the target only (proc
//! macros and build scripts cannot be static). The nested build uses its own target directory
//! (`<target>/kiln-init-static`, shared by all profiles), so it never waits on the lock of the
//! build that runs this script. It runs `--locked` against the workspace's Cargo.lock, so it
//! uses exactly the crates the outer build already fetched.
//!
//! `KILN_INIT_EMBED=0` skips it (the library then reports that no kiln-init is embedded and
//! callers need `KILN_INIT=path`). Hosts that are not x86-64/aarch64 Linux with glibc or musl
//! skip it too: kiln-init only runs on Linux.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kiln_init_embedded)");
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
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
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
        .arg(&target)
        .arg("--target-dir")
        .arg(&target_dir);
    // Cargo hands build scripts variables that would steer the nested build: drop them all,
    // then set exactly the flags kiln-init needs.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" || k == "RUSTFLAGS" || k == "RUSTDOCFLAGS" {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_TERM_COLOR", "never");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("kiln-init-embed: cannot run cargo for the nested kiln-init build: {e}")
    });
    if !out.status.success() {
        panic!(
            "kiln-init-embed: the nested static build of kiln-init failed ({}):\n{}\n\
             (set KILN_INIT_EMBED=0 to build without an embedded kiln-init)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = target_dir.join(&target).join("release").join("kiln-init");
    if !bin.is_file() {
        panic!(
            "kiln-init-embed: nested build succeeded but {} is missing",
            bin.display()
        );
    }
    // Copy into OUT_DIR so a later nested rebuild for another profile cannot change the bytes
    // this crate embedded.
    let dest = out_dir.join("kiln-init");
    std::fs::copy(&bin, &dest)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", bin.display(), dest.display()));
    println!("cargo::rustc-env=KILN_INIT_STATIC={}", dest.display());
    println!("cargo::rustc-cfg=kiln_init_embedded");
}
