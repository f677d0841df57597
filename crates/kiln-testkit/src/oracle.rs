//! The kernel as the oracle: mount an image read-only with Linux and compare everything it
//! shows with the source tree.
//!
//! Userspace checkers have passed images that the kernel could not read (`fsck.erofs
//! --extract` ends a compressed file's last extent at `i_size` where the kernel does not), so
//! every writer's output is read back through a real kernel:
//! - on the host, with a read-only loop mount, when running as root and the host kernel has
//!   the filesystem (ext4 and EROFS here), which also gives xattrs;
//! - otherwise in a QEMU guest running the machine's Debian kernel with a busybox initrd that
//!   mounts each image and prints what it sees (vfat and iso9660, which the host kernel may
//!   lack). The guest has no xattr tool, so xattrs are compared on the host path only.
//!
//! [`scan`] makes a [`Manifest`] of a directory (the source, or a mount point); [`expected`]
//! turns a source manifest into what a filesystem can represent; [`diff`] lists every
//! difference. Test-only code: it panics on environment failures.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::{is_root, require_tool, run, run_ok};

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl Kind {
    fn from_mode(mode: u32) -> Kind {
        match mode & 0o170000 {
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDev,
            0o060000 => Kind::BlockDev,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            _ => Kind::File,
        }
    }
}

/// One entry as `stat`, `readlink`, `getxattr` and a full read show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 07777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files: bytes read. Others: 0 (directory sizes are layout, not content).
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, u32),
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// Device numbers.
    pub rdev: Option<(u32, u32)>,
    /// Every xattr (None: not read, as in the guest).
    pub xattrs: Option<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// SHA-256 of a regular file's bytes.
    pub sha256: Option<String>,
    /// Inode number (to group hardlinks).
    pub ino: u64,
}

/// Entries by path relative to the root ("" is the root itself, children are "a/b").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: BTreeMap<Vec<u8>, Entry>,
    /// Whether mtimes carry nanoseconds (a guest's busybox `stat` shows seconds only).
    pub nanoseconds: bool,
}

impl Manifest {
    /// Hardlink groups: for each regular file, the first path (in path order) sharing its inode.
    pub fn link_leaders(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut first: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (p, e) in &self.entries {
            if e.kind != Kind::File {
                continue;
            }
            let leader = first.entry(e.ino).or_insert_with(|| p.clone()).clone();
            out.insert(p.clone(), leader);
        }
        out
    }

    /// Number of regular files.
    pub fn files(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.kind == Kind::File)
            .count()
    }
}

/// The filesystems kiln writes, and what each can represent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    Ext4,
    Erofs,
    Vfat,
    Iso9660,
}

impl Fs {
    /// The `mount -t` name.
    pub fn mount_type(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Erofs => "erofs",
            Fs::Vfat => "vfat",
            Fs::Iso9660 => "iso9660",
        }
    }

    fn mount_options(self) -> &'static str {
        match self {
            // No journal replay: the image stays as written.
            Fs::Ext4 => "ro,noload",
            Fs::Erofs => "ro",
            // Times as stored (kiln writes UTC); names through UTF-8.
            Fs::Vfat => "ro,tz=UTC,utf8",
            Fs::Iso9660 => "ro",
        }
    }

    /// Kernel modules the guest loads for it (and their modules.dep closure).
    fn modules(self) -> &'static [&'static str] {
        match self {
            Fs::Ext4 => &["ext4"],
            Fs::Erofs => &["erofs"],
            Fs::Vfat => &["vfat", "nls_cp437", "nls_ascii", "nls_utf8"],
            Fs::Iso9660 => &["isofs"],
        }
    }
}

/// SHA-256 of a file, streamed; a read error (EUCLEAN from a filesystem the kernel finds
/// corrupt, say) becomes the value, so that the diff lists every unreadable file.
fn sha256_file(p: &Path) -> String {
    let mut f = match fs::File::open(p) {
        Ok(f) => f,
        Err(e) => return format!("open error: {e}"),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) => return format!("read error: {e}"),
        }
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Every xattr of `p` (not following a symlink).
fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = cstr(p);
    let mut out = BTreeMap::new();
    // SAFETY: a NULL buffer of size 0 asks for the needed size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    let mut names = vec![0u8; n as usize];
    // SAFETY: the buffer holds `names.len()` bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    names.truncate(n as usize);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = std::ffi::CString::new(name).unwrap();
        // SAFETY: size query with a NULL buffer.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(len >= 0, "lgetxattr {}", p.display());
        let mut v = vec![0u8; len as usize];
        // SAFETY: the buffer holds `v.len()` bytes.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(len >= 0, "lgetxattr {}", p.display());
        v.truncate(len as usize);
        out.insert(name.to_vec(), v);
    }
    out
}

/// A manifest of the tree at `root`: every entry's metadata, xattrs, link target, device
/// numbers, and every regular file read in full.
pub fn scan(root: &Path) -> Manifest {
    let mut m = Manifest {
        nanoseconds: true,
        ..Manifest::default()
    };
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((path, rel)) = stack.pop() {
        let md =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let kind = Kind::from_mode(md.mode());
        let dev = md.rdev();
        let entry = Entry {
            kind,
            perm: md.permissions().mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: if kind == Kind::File { md.size() } else { 0 },
            mtime: (md.mtime(), md.mtime_nsec() as u32),
            target: (kind == Kind::Symlink).then(|| {
                fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            }),
            rdev: matches!(kind, Kind::CharDev | Kind::BlockDev)
                .then(|| (libc::major(dev), libc::minor(dev))),
            xattrs: Some(xattrs(&path)),
            sha256: (kind == Kind::File).then(|| sha256_file(&path)),
            ino: md.ino(),
        };
        if kind == Kind::Dir {
            for e in fs::read_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
                let e = e.unwrap();
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(e.file_name().as_bytes());
                stack.push((e.path(), r));
            }
        }
        m.entries.insert(rel, entry);
    }
    m
}

/// What `fs` keeps of a source manifest, as the kernel shows it.
pub fn expected(src: &Manifest, fs: Fs) -> Manifest {
    let mut out = Manifest {
        nanoseconds: src.nanoseconds,
        ..Manifest::default()
    };
    for (p, e) in &src.entries {
        let mut e = e.clone();
        let mut p = p.clone();
        match fs {
            Fs::Ext4 | Fs::Erofs => {}
            Fs::Vfat => {
                // Names, data and mtimes only; 2-second steps in 1980..=2107. The kernel shows
                // every entry as owned by the mounting user with fixed modes.
                if p.is_empty() {
                    continue;
                }
                e.perm = 0;
                e.uid = 0;
                e.gid = 0;
                e.xattrs = None;
                e.mtime = (fat_time(e.mtime.0), 0);
            }
            Fs::Iso9660 => {
                // Rock Ridge keeps modes, owners, links, devices and seconds; Linux's isofs
                // keeps times in 32 bits, and stops collecting NM pieces once a name would
                // reach 254 bytes (a 255-byte name shows as its first 250-byte piece).
                e.xattrs = None;
                e.mtime = (i64::from(e.mtime.0 as i32), 0);
                p = p
                    .split(|&b| b == b'/')
                    .map(|c| if c.len() > 253 { &c[..250] } else { c })
                    .collect::<Vec<_>>()
                    .join(&b'/');
            }
        }
        out.entries.insert(p, e);
    }
    out
}

/// A FAT timestamp as read back: clamped to 1980-01-01..2107-12-31 23:59:58, 2-second steps.
fn fat_time(sec: i64) -> i64 {
    const MIN: i64 = 315_532_800;
    const MAX: i64 = 4_354_819_198;
    let s = sec.clamp(MIN, MAX);
    s - s.rem_euclid(2)
}

/// Every difference between `want` (from [`expected`]) and `got` (what the kernel showed),
/// one line each. Hardlinks are compared as groups where the filesystem keeps them.
pub fn diff(want: &Manifest, got: &Manifest, fs: Fs) -> Vec<String> {
    let mut out = Vec::new();
    let show = |p: &[u8]| {
        if p.is_empty() {
            "/".to_string()
        } else {
            format!("/{}", String::from_utf8_lossy(p))
        }
    };
    for (p, w) in &want.entries {
        let Some(g) = got.entries.get(p) else {
            out.push(format!("{}: missing", show(p)));
            continue;
        };
        let mut field = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{}: {name} {a} expected, {b} read", show(p)));
            }
        };
        field("kind", format!("{:?}", w.kind), format!("{:?}", g.kind));
        if fs != Fs::Vfat {
            field("mode", format!("{:o}", w.perm), format!("{:o}", g.perm));
            field(
                "owner",
                format!("{}:{}", w.uid, w.gid),
                format!("{}:{}", g.uid, g.gid),
            );
            field(
                "target",
                format!("{:?}", w.target.as_deref().map(String::from_utf8_lossy)),
                format!("{:?}", g.target.as_deref().map(String::from_utf8_lossy)),
            );
            field("rdev", format!("{:?}", w.rdev), format!("{:?}", g.rdev));
        }
        let precise = want.nanoseconds && got.nanoseconds && matches!(fs, Fs::Ext4 | Fs::Erofs);
        let mtime = |m: (i64, u32)| {
            if precise {
                format!("{}.{:09}", m.0, m.1)
            } else {
                m.0.to_string()
            }
        };
        // The root of an ext4 image gets lost+found written into it, which touches nothing
        // else; directory mtimes are compared everywhere else.
        field("mtime", mtime(w.mtime), mtime(g.mtime));
        field("size", w.size.to_string(), g.size.to_string());
        field(
            "sha256",
            format!("{:?}", w.sha256),
            format!("{:?}", g.sha256),
        );
        if let (Some(wx), Some(gx)) = (&w.xattrs, &g.xattrs) {
            if wx != gx {
                let names = |x: &BTreeMap<Vec<u8>, Vec<u8>>| {
                    x.iter()
                        .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), hex(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                out.push(format!(
                    "{}: xattrs [{}] expected, [{}] read",
                    show(p),
                    names(wx),
                    names(gx)
                ));
            }
        }
    }
    for p in got.entries.keys() {
        // ext4 images carry lost+found; FAT's root directory has no entry of its own.
        let exempt = (fs == Fs::Ext4 && p == b"lost+found") || (fs == Fs::Vfat && p.is_empty());
        if !want.entries.contains_key(p) && !exempt {
            out.push(format!("{}: not in the source", show(p)));
        }
    }
    if matches!(fs, Fs::Ext4 | Fs::Erofs) {
        let (wl, gl) = (want.link_leaders(), got.link_leaders());
        for (p, leader) in &wl {
            if gl.get(p).is_some_and(|g| g != leader) {
                out.push(format!(
                    "{}: hardlinked with {} expected, with {} read",
                    show(p),
                    show(leader),
                    show(&gl[p])
                ));
            }
        }
    }
    out
}

/// Panics with the first differences unless `got` matches `src` as `fs` represents it.
pub fn assert_same(what: &str, src: &Manifest, got: &Manifest, fs: Fs) {
    let d = diff(&expected(src, fs), got, fs);
    assert!(
        d.is_empty(),
        "{what}: the kernel reads {} entries differently from the source ({} files):\n{}",
        d.len(),
        src.files(),
        d.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// True when the host kernel can mount `fs` here (root, and the filesystem registered).
pub fn host_can_mount(fs: Fs) -> bool {
    if !is_root() {
        return false;
    }
    let known = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    known
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fs.mount_type()))
}

/// Reads `img` (a whole-filesystem image) through the kernel: a host loop mount when
/// [`host_can_mount`], else a QEMU guest.
pub fn kernel_read(img: &Path, fs: Fs) -> Manifest {
    if host_can_mount(fs) {
        host_read(img, fs)
    } else {
        guest_read(&[(img, fs)]).pop().unwrap()
    }
}

/// Compares `img` as the host kernel reads it with `src`. Without root or the filesystem in
/// the host kernel the check is skipped with a message, except in CI
/// (`KILN_REQUIRE_DEBIAN_TREES=1`, set by scripts/test), where it fails.
pub fn check_on_host(what: &str, src: &Manifest, img: &Path, fs: Fs) {
    if !host_can_mount(fs) {
        assert!(
            std::env::var_os("KILN_REQUIRE_DEBIAN_TREES").is_none_or(|v| v != "1"),
            "{what}: the kernel oracle needs root and a host kernel with {fs:?} (CI has both)"
        );
        eprintln!("skipped: {what}: a kernel mount needs root and {fs:?} in the host kernel");
        return;
    }
    assert_same(what, src, &host_read(img, fs), fs);
}

/// Loop-mounts `img` read-only on the host, scans it, unmounts.
pub fn host_read(img: &Path, fs: Fs) -> Manifest {
    let mnt = tempfile::Builder::new()
        .prefix("kiln-oracle-")
        .tempdir()
        .unwrap();
    let mount = |quiet: bool| {
        let mut c = Command::new("mount");
        c.args(["-t", fs.mount_type(), "-o"])
            .arg(format!("{},loop", fs.mount_options()))
            .arg(img)
            .arg(mnt.path());
        if quiet {
            c.stderr(Stdio::piped());
        }
        run(&mut c)
    };
    let o = mount(true);
    if !o.status.success() {
        // Machines without udev may have only loop0..7, all busy: add nodes and retry.
        for n in 8..64 {
            let p = format!("/dev/loop{n}");
            if !Path::new(&p).exists() {
                let c = std::ffi::CString::new(p).unwrap();
                // SAFETY: a valid path; mknod fails harmlessly if it exists.
                unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, libc::makedev(7, n)) };
            }
        }
        let o = mount(false);
        assert!(
            o.status.success(),
            "mount -t {} {}: {}",
            fs.mount_type(),
            img.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(mnt.path());
    scan(mnt.path())
}

/// The Debian kernel the machine has (CI installs linux-image-cloud-amd64), and its modules.
pub fn guest_kernel() -> (PathBuf, PathBuf) {
    let v = crate::host_kernel_version();
    (
        PathBuf::from(format!("/boot/vmlinuz-{v}")),
        PathBuf::from(format!("/usr/lib/modules/{v}")),
    )
}

/// `names` and their modules.dep closure, in load order, as paths relative to `moddir`.
/// Names built into the kernel (modules.builtin) are skipped.
pub fn module_closure(moddir: &Path, names: &[&str]) -> Vec<String> {
    let dep = fs::read_to_string(moddir.join("modules.dep")).unwrap();
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in dep.lines() {
        if let Some((m, d)) = line.split_once(':') {
            deps.insert(
                m.to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            );
        }
    }
    fn visit(m: &str, deps: &BTreeMap<String, Vec<String>>, out: &mut Vec<String>) {
        if out.iter().any(|x| x == m) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, out);
        }
        out.push(m.to_string());
    }
    let base = |k: &str| {
        let f = k.rsplit('/').next().unwrap_or(k);
        f.split(".ko").next().unwrap_or(f).replace('-', "_")
    };
    let mut out = Vec::new();
    for n in names {
        let want = n.replace('-', "_");
        match deps.keys().find(|k| base(k) == want) {
            Some(path) => visit(&path.clone(), &deps, &mut out),
            None => assert!(
                builtin.lines().any(|l| base(l) == want),
                "module {n} is neither in modules.dep nor built in"
            ),
        }
    }
    out
}

/// Boots the machine's Debian kernel once in QEMU with every image attached as a virtio disk,
/// mounts each read-only and returns what the kernel shows for each (no xattrs; names must
/// not contain newlines).
pub fn guest_read(images: &[(&Path, Fs)]) -> Vec<Manifest> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-guest-")
        .tempdir()
        .unwrap();
    let (vmlinuz, moddir) = guest_kernel();
    let root = dir.path().join("initrd");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("lib")).unwrap();
    fs::copy(require_tool("busybox"), root.join("bin/busybox")).unwrap();
    let mut names = vec!["virtio_pci", "virtio_blk"];
    for (_, f) in images {
        names.extend_from_slice(f.modules());
    }
    let mut loads = String::new();
    for m in module_closure(&moddir, &names) {
        let name = m.rsplit('/').next().unwrap().to_string();
        fs::copy(moddir.join(&m), root.join("lib").join(&name)).unwrap();
        loads.push_str(&format!(
            "insmod /lib/{name} || echo INSMOD-FAILED {name}\n"
        ));
    }
    // Disk vda is the output; the images follow as vdb, vdc, ...
    let out_len: u64 = 256 << 20;
    let mut script = String::new();
    for (i, (_, f)) in images.iter().enumerate() {
        let dev = format!("vd{}", (b'b' + i as u8) as char);
        script.push_str(&format!(
            "echo 'B|{i}'\n\
             mkdir -p /mnt/{i}\n\
             if mount -t {t} -o {o} /dev/{dev} /mnt/{i}; then\n\
               cd /mnt/{i}\n\
               find . -exec stat -c 'E|%f|%u|%g|%s|%Y|%t:%T|%i|%n' {{}} +\n\
               find . -type f -exec sha256sum {{}} +\n\
               find . -type l | while IFS= read -r l; do echo \"L|$l|$(readlink \"$l\")\"; done\n\
               cd /\n\
               umount /mnt/{i}\n\
             else\n\
               echo 'MOUNT-FAILED|{i}'\n\
             fi\n",
            t = f.mount_type(),
            o = f.mount_options(),
        ));
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mkdir -p /proc /dev /mnt /tmp\n\
         mount -t proc proc /proc\n\
         mount -t devtmpfs dev /dev\n\
         {loads}\
         for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 1; done\n\
         ( {script} echo 'END' ) > /tmp/out 2>&1\n\
         dd if=/tmp/out of=/dev/vda bs=1M conv=fsync 2>/dev/null\n\
         echo KILN-GUEST-DONE\n\
         poweroff -f\n"
    );
    let init_path = root.join("init");
    fs::write(&init_path, init).unwrap();
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = dir.path().join("initrd.cpio");
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | '{}' -o -H newc > '{}'",
        root.display(),
        require_tool("cpio").display(),
        initrd.display()
    )));
    let out_disk = dir.path().join("out.raw");
    fs::File::create(&out_disk)
        .unwrap()
        .set_len(out_len)
        .unwrap();
    let mut qemu = Command::new(require_tool("qemu-system-x86_64"));
    qemu.args(["-m", "1024", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", out_disk.display()));
    for (img, _) in images {
        qemu.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            img.display()
        ));
    }
    let o = run(qemu.stdin(Stdio::null()));
    let console = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        console.contains("KILN-GUEST-DONE"),
        "the guest did not finish:\n{}",
        &console[console.len().saturating_sub(4000)..]
    );
    assert!(
        !console.contains("INSMOD-FAILED"),
        "a module failed to load:\n{console}"
    );
    let raw = fs::read(&out_disk).unwrap();
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    if std::env::var_os("KILN_ORACLE_DEBUG").is_some() {
        eprintln!(
            "{console}\n--- guest output ---\n{}",
            String::from_utf8_lossy(&raw[..end.min(20000)])
        );
    }
    parse_guest(&raw[..end], images.len())
}

/// Parses the guest script's output into one manifest per image.
fn parse_guest(out: &[u8], n: usize) -> Vec<Manifest> {
    let mut ms = vec![Manifest::default(); n];
    let mut cur: Option<usize> = None;
    let rel = |p: &[u8]| -> Vec<u8> {
        let p = p.strip_prefix(b".").unwrap_or(p);
        p.strip_prefix(b"/").unwrap_or(p).to_vec()
    };
    let mut seen = vec![false; n];
    let mut ended = false;
    let mut hashes: Vec<(usize, Vec<u8>, String)> = Vec::new();
    let mut links: Vec<(usize, Vec<u8>, Vec<u8>)> = Vec::new();
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if let Some(i) = line.strip_prefix(b"B|") {
            let i: usize = String::from_utf8_lossy(i).parse().unwrap();
            seen[i] = true;
            cur = Some(i);
            continue;
        }
        if let Some(i) = line.strip_prefix(b"MOUNT-FAILED|") {
            panic!(
                "the guest kernel could not mount image {}",
                String::from_utf8_lossy(i)
            );
        }
        if line == b"END" {
            ended = true;
            break;
        }
        let Some(i) = cur else {
            panic!(
                "guest output before an image marker: {}",
                String::from_utf8_lossy(line)
            );
        };
        if let Some(rest) = line.strip_prefix(b"E|") {
            let f: Vec<&[u8]> = rest.splitn(8, |&b| b == b'|').collect();
            assert_eq!(f.len(), 8, "guest line {}", String::from_utf8_lossy(line));
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let mode = u32::from_str_radix(&s(f[0]), 16).unwrap();
            let kind = Kind::from_mode(mode);
            let (ma, mi) = s(f[5])
                .split_once(':')
                .map(|(a, b)| {
                    (
                        u32::from_str_radix(a, 16).unwrap(),
                        u32::from_str_radix(b, 16).unwrap(),
                    )
                })
                .unwrap();
            let e = Entry {
                kind,
                perm: mode & 0o7777,
                uid: s(f[1]).parse().unwrap(),
                gid: s(f[2]).parse().unwrap(),
                size: if kind == Kind::File {
                    s(f[3]).parse().unwrap()
                } else {
                    0
                },
                mtime: (s(f[4]).parse().unwrap(), 0),
                target: None,
                rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then_some((ma, mi)),
                xattrs: None,
                sha256: None,
                ino: s(f[6]).parse().unwrap(),
            };
            ms[i].entries.insert(rel(f[7]), e);
        } else if let Some(rest) = line.strip_prefix(b"L|") {
            let mut it = rest.splitn(2, |&b| b == b'|');
            let p = it.next().unwrap();
            links.push((i, rel(p), it.next().unwrap_or_default().to_vec()));
        } else if line.len() > 66 && line[64..66] == *b"  " {
            hashes.push((
                i,
                rel(&line[66..]),
                String::from_utf8_lossy(&line[..64]).into_owned(),
            ));
        } else {
            panic!("unexpected guest line: {}", String::from_utf8_lossy(line));
        }
    }
    assert!(
        ended && seen.iter().all(|&s| s),
        "the guest's output is incomplete:\n{}",
        String::from_utf8_lossy(&out[..out.len().min(4000)])
    );
    for (i, p, h) in hashes {
        let e = ms[i]
            .entries
            .get_mut(&p)
            .unwrap_or_else(|| panic!("hash for unknown {}", String::from_utf8_lossy(&p)));
        e.sha256 = Some(h);
    }
    for (i, p, t) in links {
        let e = ms[i]
            .entries
            .get_mut(&p)
            .unwrap_or_else(|| panic!("link for unknown {}", String::from_utf8_lossy(&p)));
        e.target = Some(t);
    }
    ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_times_clamp_and_round_down() {
        assert_eq!(fat_time(0), 315_532_800);
        assert_eq!(fat_time(1_700_000_001), 1_700_000_000);
        assert_eq!(fat_time(9_999_999_999), 4_354_819_198);
    }

    #[test]
    fn diff_names_every_field_that_differs() {
        let e = Entry {
            kind: Kind::File,
            perm: 0o4755,
            uid: 1,
            gid: 2,
            size: 3,
            mtime: (5, 6),
            target: None,
            rdev: None,
            xattrs: Some(BTreeMap::new()),
            sha256: Some("ab".into()),
            ino: 9,
        };
        // Both sides read with nanosecond mtimes, so a 1 ns difference is one.
        let mut a = Manifest {
            nanoseconds: true,
            ..Manifest::default()
        };
        a.entries.insert(b"f".to_vec(), e.clone());
        let mut b = a.clone();
        assert!(diff(&a, &b, Fs::Erofs).is_empty());
        let g = b.entries.get_mut(&b"f"[..]).unwrap();
        g.perm = 0o755;
        g.sha256 = Some("cd".into());
        g.mtime = (5, 7);
        let d = diff(&a, &b, Fs::Erofs);
        assert_eq!(d.len(), 3, "{d:?}");
        // FAT ignores modes but not data.
        assert_eq!(diff(&a, &b, Fs::Vfat).len(), 1);
        b.entries.insert(b"extra".to_vec(), e);
        assert!(diff(&a, &b, Fs::Erofs)
            .iter()
            .any(|l| l.contains("not in the source")));
    }
}
