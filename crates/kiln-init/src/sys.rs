//! Thin wrappers over the system calls PID 1 needs (mount(2), mknod(2),
//! reboot(2), chroot(2)), each returning an error message that names what it was doing.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: &str) -> Result<CString, String> {
    CString::new(p).map_err(|_| format!("{p:?} contains a NUL byte"))
}

fn last_err(what: String) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// mount(2). `data` is the comma-separated option string.
pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let s = cstr(source)?;
    let t = cstr(target)?;
    let f = fstype.map(cstr).transpose()?;
    let d = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string or null, alive for the call.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ref().map_or(std::ptr::null(), |x| x.as_ptr()),
            flags,
            d.as_ref()
                .map_or(std::ptr::null(), |x| x.as_ptr().cast::<libc::c_void>()),
        )
    };
    if r != 0 {
        return Err(last_err(format!(
            "mount {source} on {target}{}",
            fstype.map(|t| format!(" as {t}")).unwrap_or_default()
        )));
    }
    Ok(())
}

/// Moves the mount at `from` to `to` (MS_MOVE).
pub fn move_mount(from: &str, to: &str) -> Result<(), String> {
    mount(from, to, None, libc::MS_MOVE, None)
}

/// umount2(2) with MNT_DETACH.
pub fn umount_lazy(target: &str) -> Result<(), String> {
    let t = cstr(target)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_err(format!("unmount {target}")));
    }
    Ok(())
}

/// Creates a directory (and parents); an existing directory is fine.
pub fn mkdir_p(path: &str) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("create directory {path}: {e}"))
}

/// Creates a block device node.
pub fn mknod_block(path: &str, major: u32, minor: u32) -> Result<(), String> {
    let p = cstr(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: valid path; mode and dev are plain integers.
    if unsafe { libc::mknod(p.as_ptr(), libc::S_IFBLK | 0o600, dev) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("create device node {path} ({major}:{minor}): {e}"));
        }
    }
    Ok(())
}

/// chroot(2) to `path`.
pub fn chroot(path: &str) -> Result<(), String> {
    let p = cstr(path)?;
    // SAFETY: valid path.
    if unsafe { libc::chroot(p.as_ptr()) } != 0 {
        return Err(last_err(format!("chroot {path}")));
    }
    Ok(())
}

/// Flushes filesystems and reboots the machine; never returns.
pub fn reboot() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Only reached without CAP_SYS_BOOT (not PID 1): nothing left to do but stop.
    std::process::exit(1)
}

/// Makes sure fds 0, 1 and 2 are open on the console (the kernel only opens them if the
/// initramfs has /dev/console).
pub fn ensure_console() {
    // SAFETY: fcntl on small integers and open of a constant path.
    unsafe {
        if libc::fcntl(2, libc::F_GETFD) != -1 {
            return;
        }
        let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return;
        }
        for target in 0..3 {
            if libc::fcntl(target, libc::F_GETFD) == -1 {
                libc::dup2(fd, target);
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

/// Replaces this process with `path` (argv[0] = path, then `args`), keeping the environment.
pub fn exec(path: &str, args: &[std::ffi::OsString]) -> String {
    let prog = match cstr(path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut argv: Vec<CString> = vec![prog.clone()];
    for a in args {
        match CString::new(a.as_bytes()) {
            Ok(c) => argv.push(c),
            Err(_) => return format!("argument {a:?} contains a NUL byte"),
        }
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: prog and every argv entry are valid C strings, the array is NULL-terminated.
    unsafe { libc::execv(prog.as_ptr(), ptrs.as_ptr()) };
    last_err(format!("execute {path}"))
}

/// Removes everything on the initramfs (the filesystem of `/`) except other mounts, to free
/// its memory before the switch; the same thing switch_root(8) does.
pub fn wipe_initramfs() {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata("/") else {
        return;
    };
    fn wipe(dir: &Path, dev: u64) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.dev() != dev {
                continue; // another mount (the new root, /proc, …)
            }
            if md.is_dir() {
                wipe(&p, dev);
                let _ = std::fs::remove_dir(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    wipe(Path::new("/"), root.dev());
}

/// Seconds since boot from /proc/uptime, for the progress messages.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
