//! Loading kernel modules as modprobe(8) does, from the module database the initrd builder
//! put in `/lib/modules/VERSION` (see `kiln_init::modules`): a module's dependencies first,
//! its soft dependencies (which may be aliases such as `crypto-crc32c`) around it, built-in
//! modules and aliases accepted as already there. Compressed modules are handed to the kernel
//! to decompress when it can (`/sys/module/compression`, `finit_module` with
//! `MODULE_INIT_COMPRESSED_FILE`), and decompressed here otherwise (`init_module`).
//!
//! The same loader answers the kernel's `request_module` calls: the kernel runs
//! `/sbin/modprobe -q -- NAME` (the path in `/proc/sys/kernel/modprobe`), which in kiln's
//! initrd is kiln-init itself ([`modprobe_main`]); it resolves NAME through `modules.alias`
//! and writes what it did to the kernel log, where PID 1 finds it when a load fails.
//!
//! A failure names its cause: the unknown symbols the kernel logged, the alias nothing in the
//! initrd provides, the dependency that failed before.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use kiln_init::modules::{self, Follow, Lookup, ModuleCompression, ModuleDb, Reason};

use crate::kmsg::{self, Kmsg};

/// Where an initrd keeps the modules of each kernel version.
pub const MODULES_ROOT: &str = "/lib/modules";
/// The usermode helper path kiln-init installs and answers as (the kernel's default,
/// `CONFIG_MODPROBE_PATH`).
pub const MODPROBE_PATH: &str = "/sbin/modprobe";
/// Where the kernel reads the helper's path from.
const MODPROBE_SYSCTL: &str = "/proc/sys/kernel/modprobe";
/// `MODULE_INIT_COMPRESSED_FILE` (include/uapi/linux/module.h, Linux 5.17): the kernel
/// decompresses the file itself.
const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;
/// Kernel log lines quoted in one error message, at most.
const MAX_LOG_LINES: usize = 6;

/// The kernel release (`uname -r`).
// `c_char` is i8 on x86-64 and u8 on aarch64: the cast is needed on one of them.
#[allow(clippy::unnecessary_cast)]
pub fn kernel_release() -> Result<String, String> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(format!("uname: {}", std::io::Error::last_os_error()));
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A modules directory and what has happened to its modules so far.
pub struct Loader {
    /// `/lib/modules/RELEASE`.
    pub dir: String,
    db: ModuleDb,
    /// What `/sys/module/compression` says the kernel can decompress (`xz`, `zstd`, `gzip`).
    kernel_decompresses: Option<String>,
    /// Module → why it did not load.
    failed: BTreeMap<String, String>,
    /// Soft dependencies and aliases nothing in the initrd provides: name → who wanted it.
    unresolved: BTreeMap<String, String>,
    kmsg: Option<Kmsg>,
    /// Receives one line per step (module loaded, skipped, failed).
    pub log: Vec<String>,
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

impl Loader {
    /// The loader for the running kernel. An initrd without modules for it is an error that
    /// names both versions.
    pub fn open() -> Result<Self, String> {
        let release = kernel_release()?;
        let dir = format!("{MODULES_ROOT}/{release}");
        let db = if Path::new(&format!("{dir}/modules.dep")).is_file() {
            ModuleDb::load_dir(&dir)?
        } else {
            let have: Vec<String> = std::fs::read_dir(MODULES_ROOT)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if let Some(other) = have.iter().find(|v| **v != release) {
                return Err(format!(
                    "this initrd holds the modules of kernel {other}, but the running kernel is {release} (rebuild the image with the kernel it boots)"
                ));
            }
            ModuleDb::default()
        };
        let kernel_decompresses = std::fs::read_to_string("/sys/module/compression")
            .ok()
            .map(|s| s.trim().to_string());
        Ok(Loader {
            dir,
            db,
            kernel_decompresses,
            failed: BTreeMap::new(),
            unresolved: BTreeMap::new(),
            kmsg: Kmsg::open(),
            log: Vec::new(),
        })
    }

    /// A loader with no modules (a kernel with everything built in, or an initrd without
    /// modules); it still explains what is missing.
    pub fn open_empty() -> Result<Self, String> {
        Ok(Loader {
            dir: String::new(),
            db: ModuleDb::default(),
            kernel_decompresses: None,
            failed: BTreeMap::new(),
            unresolved: BTreeMap::new(),
            kmsg: Kmsg::open(),
            log: Vec::new(),
        })
    }

    /// Loads `request` (a module name, a path in the initrd, or an alias) with everything it
    /// needs. Returns the modules newly loaded. An error names the cause; modules that failed
    /// are remembered for [`Loader::why_not`].
    pub fn load(&mut self, request: &str, why: &str) -> Result<Vec<String>, String> {
        let name = if request.contains('/') {
            modules::module_name(request)
        } else {
            request.to_string()
        };
        let reason = Reason::Requested(why.to_string());
        let lookup = self.db.lookup(&name);
        let closure = match &lookup {
            Lookup::Builtin(m) | Lookup::BuiltinAlias(m) => {
                self.log
                    .push(format!("{name}: built into the kernel ({m})"));
                return Ok(Vec::new());
            }
            Lookup::Unknown => {
                // An initrd without a database lists plain paths: load the file as it is.
                if request.starts_with('/') && Path::new(request).is_file() {
                    return match self.load_file(&name, request) {
                        Ok(true) => Ok(vec![name]),
                        Ok(false) => Ok(Vec::new()),
                        Err(e) => Err(self.fail(&name, e)),
                    };
                }
                return Err(format!(
                    "{name}: no module of this initrd has that name or alias, and it is not built into the kernel"
                ));
            }
            Lookup::Module(_) | Lookup::Alias(_) => self.db.closure(
                &[(name.clone(), reason)],
                Follow {
                    softdeps: true,
                    weakdeps: false,
                },
            )?,
        };
        for (u, w) in &closure.unresolved {
            self.unresolved
                .entry(u.clone())
                .or_insert_with(|| w.to_string());
        }
        let mut loaded = Vec::new();
        for (m, w) in &closure.order {
            if self.failed.contains_key(m) {
                continue;
            }
            if let Some((d, e)) = self.failed_dependency(m) {
                let e = format!("not loaded: it needs {d}, which failed ({e})");
                self.failed.insert(m.clone(), e);
                continue;
            }
            if is_loaded(m) {
                continue;
            }
            let Some(path) = self
                .db
                .modules
                .get(m)
                .map(|x| format!("{}/{}", self.dir, x.path))
            else {
                continue;
            };
            let t = Instant::now();
            match self.load_file(m, &path) {
                Ok(true) => {
                    self.log.push(format!(
                        "loaded {m} in {} ms{} ({w})",
                        t.elapsed().as_millis(),
                        self.how(&path)
                    ));
                    loaded.push(m.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    let e = self.fail(m, e);
                    self.log.push(format!("{m}: {e} ({w})"));
                }
            }
        }
        match lookup {
            Lookup::Alias(providers) => {
                if providers.iter().any(|p| !self.failed.contains_key(p)) {
                    Ok(loaded)
                } else if let Some(b) = self.db.builtin_alias(&name) {
                    // A faster implementation could not load (sha256_ssse3 without SSSE3);
                    // the kernel's built-in one serves.
                    self.log.push(format!("{name}: served by the built-in {b}"));
                    Ok(loaded)
                } else {
                    let why: Vec<String> = providers
                        .iter()
                        .map(|p| format!("{p}: {}", self.failed[p]))
                        .collect();
                    Err(format!(
                        "{name}: every module that provides it failed: {}",
                        why.join("; ")
                    ))
                }
            }
            Lookup::Module(m) => match self.failed.get(&m) {
                Some(e) => Err(format!("load module {m}: {e}")),
                None => Ok(loaded),
            },
            _ => Ok(loaded),
        }
    }

    fn failed_dependency(&self, m: &str) -> Option<(String, String)> {
        let deps = &self.db.modules.get(m)?.deps;
        deps.iter()
            .find_map(|d| self.failed.get(d).map(|e| (d.clone(), e.clone())))
    }

    /// Records a failure, adding what kiln-init knows about the module's soft dependencies.
    fn fail(&mut self, name: &str, mut e: String) -> String {
        if let Some(s) = self.db.softdeps.get(name) {
            let missing: Vec<&String> = s
                .pre
                .iter()
                .filter(|p| self.unresolved.contains_key(*p))
                .collect();
            if !missing.is_empty() {
                e.push_str(&format!(
                    "; modules.softdep wants {} loaded before it, and nothing in this initrd provides {}",
                    join(&missing),
                    if missing.len() == 1 { "it" } else { "them" }
                ));
            }
        }
        self.failed.insert(name.to_string(), e.clone());
        e
    }

    /// Why the kernel lacks `what` (a module, or a filesystem type through its `fs-` alias),
    /// as far as this loader knows.
    pub fn why_not(&self, what: &str) -> String {
        let name = modules::module_name(what);
        if let Some(e) = self.failed.get(&name) {
            return format!("module {name} failed to load: {e}");
        }
        match self.db.lookup(&name) {
            Lookup::Module(m) => {
                if is_loaded(&m) {
                    format!("module {m} is loaded")
                } else {
                    format!("module {m} is in this initrd but was not loaded")
                }
            }
            Lookup::Builtin(_) | Lookup::BuiltinAlias(_) => {
                format!("{name} is built into the kernel")
            }
            Lookup::Alias(p) => format!("it is provided by {}", p.join(", ")),
            Lookup::Unknown => match self.db.lookup(&format!("fs-{what}")) {
                Lookup::Alias(p) => match p.iter().find_map(|m| self.failed.get(m).map(|e| (m, e)))
                {
                    Some((m, e)) => format!("module {m} failed to load: {e}"),
                    None => format!("it is provided by {}", p.join(", ")),
                },
                _ => format!("{name} is neither a module in this initrd nor built into the kernel"),
            },
        }
    }

    /// Modules that failed, one per line, for "not found" messages.
    pub fn failures(&self) -> Vec<String> {
        self.failed
            .iter()
            .map(|(m, e)| format!("{m}: {e}"))
            .collect()
    }

    /// Discards kernel log records written so far (before an operation whose log matters).
    pub fn mark_log(&mut self) {
        if let Some(k) = &mut self.kmsg {
            k.take();
        }
    }

    /// Kernel log records written since the last mark, for an error message.
    pub fn log_since_mark(&mut self) -> Vec<String> {
        self.kmsg.as_mut().map(Kmsg::take).unwrap_or_default()
    }

    /// Whether the kernel decompresses this file itself.
    fn kernel_decompresses(&self, path: &str) -> bool {
        let comp = ModuleCompression::of(path);
        comp == ModuleCompression::None
            || self.kernel_decompresses.as_deref() == Some(comp.kernel_name())
    }

    /// How a file is handed to the kernel, for the log: nothing for a plain `.ko`.
    fn how(&self, path: &str) -> String {
        let comp = ModuleCompression::of(path);
        match (comp, self.kernel_decompresses(path)) {
            (ModuleCompression::None, _) => String::new(),
            (c, true) => format!(", {} decompressed by the kernel", c.kernel_name()),
            (c, false) => format!(", {} decompressed by kiln-init", c.kernel_name()),
        }
    }

    /// Loads one file. `Ok(false)` when the module was already loaded.
    fn load_file(&mut self, name: &str, path: &str) -> Result<bool, String> {
        let comp = ModuleCompression::of(path);
        let kernel_does = self.kernel_decompresses(path);
        self.mark_log();
        let r = if kernel_does {
            finit(path, comp != ModuleCompression::None)
        } else {
            let data = std::fs::read(path).map_err(|e| format!("read {path}: {e}"))?;
            let data = modules::decompress(path, data)?;
            init(&data)
        };
        match r {
            Ok(()) => Ok(true),
            Err(libc::EEXIST) => Ok(false),
            Err(errno) => {
                let log = self.log_since_mark();
                Err(explain(name, errno, &log))
            }
        }
    }
}

/// True when the kernel lists the module as loaded (or loading).
fn is_loaded(name: &str) -> bool {
    Path::new(&format!("/sys/module/{name}/initstate")).exists()
}

fn finit(path: &str, compressed: bool) -> Result<(), i32> {
    let f = std::fs::File::open(path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: a valid fd and an empty, NUL-terminated parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), flags) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(())
}

fn init(image: &[u8]) -> Result<(), i32> {
    // SAFETY: the buffer is valid for its length; the parameter string is NUL-terminated.
    let r = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len() as libc::c_ulong,
            c"".as_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(())
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cause of a failed load, from its errno and the kernel log written meanwhile.
pub fn explain(name: &str, errno: i32, log: &[String]) -> String {
    // "erofs: Unknown symbol crc32c (err -2)" — how the kernel reports unresolved symbols,
    // which finit_module returns as ENOENT, indistinguishable from a failing init by errno.
    let symbols: BTreeSet<&str> = log
        .iter()
        .filter_map(|l| l.split_once(": Unknown symbol "))
        .filter(|(m, _)| modules::module_name(m) == name)
        .filter_map(|(_, rest)| rest.split_whitespace().next())
        .collect();
    if !symbols.is_empty() {
        let list: Vec<&str> = symbols.into_iter().collect();
        return format!(
            "unknown symbol{} {} (the module that exports {} is missing or failed to load)",
            if list.len() > 1 { "s" } else { "" },
            list.join(", "),
            if list.len() > 1 { "them" } else { "it" }
        );
    }
    let what = match errno {
        libc::ENOENT => "its initialisation failed with ENOENT (No such file or directory): something it asked the kernel for is missing".to_string(),
        libc::ENODEV => "No such device (the hardware or CPU feature it drives is absent)".to_string(),
        libc::ENOEXEC | libc::EINVAL => format!(
            "{} (not a module for this kernel, or damaged)",
            errno_text(errno)
        ),
        libc::EKEYREJECTED | libc::EKEYEXPIRED => {
            "its signature was rejected (module signing enforced)".to_string()
        }
        libc::EPERM => "module loading is not permitted (lockdown or modules_disabled)".to_string(),
        e => errno_text(e),
    };
    let lines: Vec<&String> = log
        .iter()
        .filter(|l| !l.trim().is_empty())
        .take(MAX_LOG_LINES)
        .collect();
    if lines.is_empty() {
        what
    } else {
        format!("{what}; kernel log: {}", join(&lines))
    }
}

/// Points the kernel's usermode modprobe at kiln-init for the time of the initrd. Returns the
/// previous path, to restore before switching root (the new root's modprobe lives at the
/// kernel's default path, where the initrd's symlink was).
pub fn install_modprobe_helper(init_path: &str) -> Result<Option<String>, String> {
    if std::fs::symlink_metadata(MODPROBE_PATH).is_err() {
        crate::sys::mkdir_p("/sbin")?;
        std::os::unix::fs::symlink(init_path, MODPROBE_PATH)
            .map_err(|e| format!("create {MODPROBE_PATH} -> {init_path}: {e}"))?;
    }
    let old = match std::fs::read_to_string(MODPROBE_SYSCTL) {
        Ok(s) => s.trim().to_string(),
        // A kernel without CONFIG_MODULES has no such file and no module requests.
        Err(_) => return Ok(None),
    };
    if old == MODPROBE_PATH {
        return Ok(None);
    }
    std::fs::write(MODPROBE_SYSCTL, MODPROBE_PATH)
        .map_err(|e| format!("write {MODPROBE_SYSCTL}: {e}"))?;
    Ok(Some(old))
}

/// Undoes [`install_modprobe_helper`].
pub fn restore_modprobe_helper(old: Option<&str>) {
    if let Some(old) = old {
        let _ = std::fs::write(MODPROBE_SYSCTL, old);
    }
}

/// kiln-init run as `/sbin/modprobe` by the kernel (`modprobe -q -- NAME`) or by hand
/// (`modprobe [-q] [-v] [-a] [-b] [--] NAME… `). Returns the exit status. It has no console:
/// what it does goes to the kernel log, prefixed `kiln-init modprobe:`.
pub fn modprobe_main(args: &[String]) -> i32 {
    let mut names = Vec::new();
    let mut all = false;
    let mut verbose = false;
    let mut options_done = false;
    for a in args {
        if options_done || !a.starts_with('-') {
            names.push(a.clone());
            continue;
        }
        match a.as_str() {
            "--" => options_done = true,
            "-a" | "--all" => all = true,
            "-v" | "--verbose" => verbose = true,
            // Quiet, use blacklist, syslog: kiln-init logs to the kernel log in any case.
            "-q" | "--quiet" | "-b" | "--use-blacklist" | "-s" | "--syslog" => {}
            other => {
                kmsg::write(
                    3,
                    &format!("kiln-init modprobe: option {other} is not supported"),
                );
                return 1;
            }
        }
    }
    // Without -a the first name is the module and the rest are its parameters.
    if !all {
        names.truncate(1);
    }
    if names.is_empty() {
        kmsg::write(3, "kiln-init modprobe: no module name given");
        return 1;
    }
    let mut loader = match Loader::open() {
        Ok(l) => l,
        Err(e) => {
            kmsg::write(3, &format!("kiln-init modprobe: {e}"));
            return 1;
        }
    };
    let mut status = 0;
    for n in &names {
        let before = loader.log.len();
        // The kernel log is written only after loading, which keeps these lines out of the log
        // a concurrent load in PID 1 reads for its own failure until they explain something.
        match loader.load(n, "the kernel asked for it") {
            // What was loaded is news (info); what was there already or built in is not
            // (debug, off the console unless asked for).
            Ok(loaded) => {
                let level = if verbose || !loaded.is_empty() { 6 } else { 7 };
                for l in &loader.log[before..] {
                    kmsg::write(level, &format!("kiln-init modprobe: {n}: {l}"));
                }
            }
            Err(e) => {
                status = 1;
                for l in &loader.log[before..] {
                    kmsg::write(6, &format!("kiln-init modprobe: {n}: {l}"));
                }
                kmsg::write(4, &format!("kiln-init modprobe: {e}"));
            }
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanations_name_the_cause() {
        let log = vec![
            "erofs: Unknown symbol crc32c (err -2)".to_string(),
            "erofs: Unknown symbol crc32c (err -2)".to_string(),
            "other: Unknown symbol foo (err -2)".to_string(),
        ];
        assert_eq!(
            explain("erofs", libc::ENOENT, &log),
            "unknown symbol crc32c (the module that exports it is missing or failed to load)"
        );
        let log = vec![
            "kiln-init modprobe: crypto-crc32c: no module of this initrd has that name or alias, and it is not built into the kernel".to_string(),
        ];
        let e = explain("libcrc32c", libc::ENOENT, &log);
        assert!(
            e.starts_with("its initialisation failed with ENOENT"),
            "{e}"
        );
        assert!(
            e.contains("kernel log: kiln-init modprobe: crypto-crc32c: no module"),
            "{e}"
        );
        assert!(explain("crc32c_intel", libc::ENODEV, &[]).starts_with("No such device"));
    }
}
