//! Fixtures shared by kiln's tests: the generated corpus that every filesystem writer must
//! round-trip, and helpers to find and run the reference tools.
//!
//! Test-only code: it panics on failure, which is what a test wants.
#![allow(clippy::unwrap_used)]

pub mod oracle;
pub mod schema;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// How much of the corpus to generate.
#[derive(Clone, Copy, Debug)]
pub struct CorpusOptions {
    /// Include the 100k-entry directory.
    pub huge_dir: bool,
    /// Include the 5 GiB sparse file.
    pub huge_sparse: bool,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        Self {
            huge_dir: true,
            huge_sparse: true,
        }
    }
}

/// True when running as root (device nodes, `security.*`/`trusted.*` xattrs, chown, loop mounts).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Sets a path's access and modification times (not following a symlink).
pub fn set_times(path: &Path, sec: i64, nsec: i64) {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

fn chown(path: &Path, uid: u32, gid: u32) {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    let r = unsafe { libc::lchown(p.as_ptr(), uid, gid) };
    assert_eq!(r, 0, "lchown {}", path.display());
}

fn mknod(path: &Path, mode: u32, major: u32, minor: u32) {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(p.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Deterministic pseudo-random bytes (xorshift), so fixtures are identical on every run.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes the generated corpus into `root` (which must exist and be empty). It covers every
/// entry kind, empty files and directories, 255-byte and non-UTF-8 names, a 100k-entry
/// directory, a 4000-byte path, hardlinks across directories, sparse files including a 5 GiB
/// one, small and large xattrs (`security.selinux`, `security.capability`, `user.*`,
/// `trusted.overlay.*`), setuid/setgid/sticky bits, varied owners and nanosecond mtimes.
/// Root-only parts (devices, `security.*`/`trusted.*` xattrs, ownership) are created only when
/// running as root.
pub fn generate_corpus(root: &Path, opts: CorpusOptions) {
    let root_user = is_root();
    let d = |p: &str| {
        let path = root.join(p);
        fs::create_dir_all(&path).unwrap();
        path
    };
    let f = |p: &str, data: &[u8]| {
        let path = root.join(p);
        fs::write(&path, data).unwrap();
        path
    };

    // Regular files of many sizes: empty, tiny (inline candidates), block edges, multi-block.
    d("files");
    for (i, size) in [
        0usize,
        1,
        59,
        60,
        61,
        100,
        4095,
        4096,
        4097,
        8192,
        65536,
        1 << 20,
        3 << 20 | 17,
    ]
    .into_iter()
    .enumerate()
    {
        f(
            &format!("files/size-{size}"),
            &pseudo_random(i as u64 + 1, size),
        );
    }
    f("files/zeros-64k", &vec![0u8; 65536]);
    d("empty-dir");
    d("deep/a/b/c/d/e/f/g");

    // Names: 255 bytes, non-UTF-8, odd characters.
    let long = "n".repeat(255);
    f(&format!("files/{long}"), b"long name\n");
    let nonutf8 = root
        .join("files")
        .join(OsStr::from_bytes(b"caf\xe9-\xff\xfe"));
    fs::write(&nonutf8, b"latin-1 name\n").unwrap();
    f("files/space and\ttab", b"x");
    f("files/.hidden", b"dot");

    // A path of about 4000 bytes: 16 directories of 245 bytes plus a file.
    let mut p = PathBuf::from("longpath");
    for i in 0..16 {
        p.push(format!("{i:02}{}", "p".repeat(243)));
    }
    fs::create_dir_all(root.join(&p)).unwrap();
    p.push("leaf");
    f(p.to_str().unwrap(), b"deep leaf\n");
    assert!(p.as_os_str().len() >= 3900);

    // Symlinks: fast (< 60 bytes), slow (long target), dangling, to a directory.
    d("links");
    symlink("../files/size-1", root.join("links/fast")).unwrap();
    symlink(format!("../files/{long}"), root.join("links/slow")).unwrap();
    symlink("/nonexistent/target", root.join("links/dangling")).unwrap();
    symlink("../deep", root.join("links/todir")).unwrap();

    // Hardlinks across directories, including a 3-way link.
    d("hard/x");
    d("hard/y");
    let h = f("hard/x/orig", &pseudo_random(99, 5000));
    fs::hard_link(&h, root.join("hard/y/link1")).unwrap();
    fs::hard_link(&h, root.join("hard/link2")).unwrap();

    // Special files.
    d("special");
    let fifo = std::ffi::CString::new(root.join("special/fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    if root_user {
        mknod(&root.join("special/null"), libc::S_IFCHR | 0o666, 1, 3);
        mknod(&root.join("special/sda"), libc::S_IFBLK | 0o660, 8, 0);
        mknod(
            &root.join("special/bigdev"),
            libc::S_IFCHR | 0o600,
            4000,
            300000,
        );
    }

    // Sparse files: holes at the start, middle and end; one 5 GiB file (a few KiB of data).
    d("sparse");
    let s = fs::File::create(root.join("sparse/holes")).unwrap();
    s.set_len(10 << 20).unwrap();
    s.write_all_at(&pseudo_random(7, 8192), 1 << 20).unwrap();
    s.write_all_at(&pseudo_random(8, 100), (10 << 20) - 100)
        .unwrap();
    drop(s);
    let s = fs::File::create(root.join("sparse/all-hole")).unwrap();
    s.set_len(1 << 20).unwrap();
    drop(s);
    if opts.huge_sparse {
        let s = fs::File::create(root.join("sparse/five-gib")).unwrap();
        s.set_len(5 << 30).unwrap();
        s.write_all_at(b"start", 0).unwrap();
        s.write_all_at(&pseudo_random(9, 4096), (4 << 30) + 12345)
            .unwrap();
        s.write_all_at(b"end", (5 << 30) - 3).unwrap();
    }

    // Xattrs: small user ones everywhere, a large one, security and trusted when root.
    d("xattr");
    let xf = f("xattr/file", b"has xattrs\n");
    set_xattr(&xf, "user.small", b"v");
    set_xattr(&xf, "user.empty", b"");
    set_xattr(&xf, "user.binary", &[0, 1, 2, 255, 0]);
    let big = f("xattr/big", b"large xattr\n");
    set_xattr(&big, "user.large", &pseudo_random(11, 3000));
    let xd = d("xattr/dir");
    set_xattr(&xd, "user.dirattr", b"on a directory");
    for i in 0..20 {
        let x = f(&format!("xattr/shared-{i:02}"), b"same label\n");
        set_xattr(&x, "user.label", b"shared-value-repeated-many-times");
    }
    if root_user {
        set_xattr(&xf, "security.selinux", b"system_u:object_r:bin_t:s0\0");
        // VFS_CAP_REVISION_2 with cap_net_bind_service permitted.
        let mut cap = vec![0u8; 20];
        cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
        set_xattr(&xf, "security.capability", &cap);
        set_xattr(&xd, "trusted.overlay.opaque", b"y");
    }

    // Modes and owners.
    d("modes");
    for (name, mode) in [
        ("setuid", 0o4755),
        ("setgid", 0o2755),
        ("sticky-dir", 0o1777),
        ("none", 0o000),
        ("rw", 0o600),
    ] {
        let path = if name.ends_with("dir") {
            d(&format!("modes/{name}"))
        } else {
            f(&format!("modes/{name}"), name.as_bytes())
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        if root_user {
            chown(&path, 1000 + mode % 7, 100 + mode % 5);
        }
    }
    if root_user {
        let big_id = f("modes/big-ids", b"ids over 2^16 and 2^21\n");
        chown(&big_id, 3_000_000, 70_000);
    }

    // A directory with 100k entries (htree territory).
    if opts.huge_dir {
        let big = d("bigdir");
        for i in 0..100_000u32 {
            let name = format!("entry-{i:06}-{}", "x".repeat((i % 40) as usize));
            if i % 1000 == 0 {
                fs::create_dir(big.join(&name)).unwrap();
            } else {
                fs::write(
                    big.join(&name),
                    if i % 3 == 0 { &b""[..] } else { &b"e"[..] },
                )
                .unwrap();
            }
        }
    }

    // Timestamps: nanoseconds, pre-epoch, post-2038, set last (children first) so parent
    // directory times are not disturbed by later writes.
    let mut all: Vec<PathBuf> = Vec::new();
    collect(root, &mut all);
    all.sort_by(|a, b| b.as_os_str().len().cmp(&a.as_os_str().len()).then(a.cmp(b)));
    for (i, path) in all.iter().enumerate() {
        let sec = match i % 5 {
            0 => 1_700_000_000 + i as i64,
            1 => -86_400 * 365,
            2 => 4_102_444_800 + i as i64, // 2100
            3 => 0,
            _ => 1_234_567_890,
        };
        set_times(path, sec, (i as i64 * 7919) % 1_000_000_000);
    }
    set_times(root, 1_600_000_000, 123_456_789);
}

/// Content shapes for [`boundary_corpus`]: what a compressor does with each differs, so each
/// shape produces different extent kinds and tails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Incompressible bytes.
    Random,
    /// Word salad: compresses about 3:1.
    Text,
    /// All zero (a run-length compressor's best case; a hole candidate).
    Zeros,
    /// A compressible head and an incompressible last 3/8.
    TextThenRandom,
    /// An incompressible head and a compressible last 3/8.
    RandomThenText,
    /// 4 KiB blocks alternating between text and random bytes.
    Alternating,
}

/// Every [`Shape`].
pub const SHAPES: [Shape; 6] = [
    Shape::Random,
    Shape::Text,
    Shape::Zeros,
    Shape::TextThenRandom,
    Shape::RandomThenText,
    Shape::Alternating,
];

/// Deterministic word salad (compresses about 3:1 with LZ4).
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "kiln ",
        "erofs ",
        "ext4 ",
        "block ",
        "cluster\n",
        "the ",
        "a ",
        "page ",
        "tail ",
        "verity ",
        "image ",
        "0123 ",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(WORDS[(x % 12) as usize].as_bytes());
        if x.is_multiple_of(7) {
            v.extend_from_slice(&x.to_le_bytes()[..3]);
        }
    }
    v.truncate(len);
    v
}

/// `len` bytes of `shape`, deterministic in `seed`.
pub fn shaped_bytes(shape: Shape, seed: u64, len: usize) -> Vec<u8> {
    let split = len - len * 3 / 8;
    match shape {
        Shape::Random => pseudo_random(seed, len),
        Shape::Text => text_bytes(seed, len),
        Shape::Zeros => vec![0; len],
        Shape::TextThenRandom => {
            let mut v = text_bytes(seed, split);
            v.extend(pseudo_random(seed + 1, len - split));
            v
        }
        Shape::RandomThenText => {
            let mut v = pseudo_random(seed, split);
            v.extend(text_bytes(seed + 1, len - split));
            v
        }
        Shape::Alternating => {
            let mut v = Vec::with_capacity(len);
            let mut i = 0u64;
            while v.len() < len {
                let n = (len - v.len()).min(4096);
                if i.is_multiple_of(2) {
                    v.extend(text_bytes(seed + i, n));
                } else {
                    v.extend(pseudo_random(seed + i, n));
                }
                i += 1;
            }
            v
        }
    }
}

/// File sizes at and around every boundary a filesystem writer decides on: ext4 inline data
/// (60 bytes), EROFS inline tails (4064 = block - 32), 4 KiB blocks and logical clusters, 2 KiB
/// ISO sectors, physical clusters (16 and 64 KiB), 1 MiB compression units, the 16 MiB
/// whole-file compression limit (with `big`), and a few odd sizes between them.
pub fn boundary_sizes(big: bool) -> Vec<u64> {
    let mut edges: Vec<u64> = vec![60, 2048, 4064, 4096, 8192, 12288, 65536, 1 << 20, 2 << 20];
    if big {
        edges.push(16 << 20);
    }
    let mut sizes = std::collections::BTreeSet::from([0u64, 1, 100, 3000, 5000, 70_000, 777_777]);
    for e in edges {
        for d in [-4097i64, -4096, -4095, -1, 0, 1, 4095, 4096, 4097] {
            if let Some(s) = e.checked_add_signed(d) {
                sizes.insert(s);
            }
        }
    }
    sizes.into_iter().collect()
}

/// Writes one file per (size, shape) from [`boundary_sizes`] and [`SHAPES`] under `root/dir`,
/// named `SIZE-SHAPE`. Files of 2 MiB and more get only the mixed shapes, to keep the corpus
/// small (about 110 MB with `big`, 60 MB without).
pub fn boundary_corpus(root: &Path, dir: &str, big: bool) {
    let d = root.join(dir);
    fs::create_dir_all(&d).unwrap();
    for (i, size) in boundary_sizes(big).into_iter().enumerate() {
        for (j, shape) in SHAPES.into_iter().enumerate() {
            let mixed = matches!(shape, Shape::TextThenRandom | Shape::Alternating);
            if size >= 2 << 20 && !mixed {
                continue;
            }
            let seed = (i * 16 + j) as u64 + 1;
            let name = format!("{size}-{shape:?}").to_lowercase();
            let data = shaped_bytes(shape, seed, size as usize);
            // Some files twice, under another directory: writers that share identical data
            // must still give each copy its own metadata.
            if i % 3 == 0 && size > 8192 {
                fs::create_dir_all(d.join("twins")).unwrap();
                fs::write(d.join("twins").join(&name), &data).unwrap();
            }
            fs::write(d.join(name), data).unwrap();
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            collect(&p, out);
        }
        out.push(p);
    }
}

/// Finds a tool on PATH (also /usr/sbin and /sbin, which non-root PATHs often lack).
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin"]
                .into_iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds a required reference tool or panics with an actionable message (CI installs them all).
pub fn require_tool(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| {
        panic!("reference tool `{name}` not found; .ci/run installs it (apt-get)")
    })
}

/// Runs a command, returning its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The newest kernel version in /boot that has its modules installed (boot tests build
/// initrds and UKIs from it); panics with what to install otherwise.
pub fn host_kernel_version() -> String {
    let mut v: Vec<String> = fs::read_dir("/boot")
        .expect("/boot")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .filter(|v| Path::new(&format!("/usr/lib/modules/{v}/modules.dep")).is_file())
        .collect();
    v.sort();
    v.pop()
        .expect("a kernel in /boot with modules (install linux-image-cloud-amd64; CI does)")
}

/// A real distribution tree made by `scripts/debian-tree NAME` (a tar in the cache directory
/// the script fills). `None` when it has not been built; with `KILN_REQUIRE_DEBIAN_TREES=1`
/// (set by `scripts/test`, so in CI) a missing tree is a test failure instead of a skip.
pub fn debian_tree(name: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kiln")))
        .unwrap_or_else(|| PathBuf::from(".cache/kiln"));
    let p = cache.join("debian").join(format!("{name}.tar"));
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("KILN_REQUIRE_DEBIAN_TREES").is_some_and(|v| v == "1") {
        panic!(
            "{} is missing: run scripts/debian-tree {name} (scripts/test does)",
            p.display()
        );
    }
    eprintln!(
        "skipped: {} is missing (scripts/debian-tree {name} makes it)",
        p.display()
    );
    None
}

/// `BASE/PREFIX-PID`, one test process's directory for outputs its tests share (images built
/// once per process and kept in statics, which are never dropped). What earlier processes left
/// under `BASE/PREFIX-*` is removed first, so a run leaves at most one such directory behind.
pub fn process_dir(base: &Path, prefix: &str) -> PathBuf {
    static CLEANED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut cleaned = CLEANED.lock().unwrap_or_else(|p| p.into_inner());
    let dir = base.join(format!("{prefix}-{}", std::process::id()));
    if !cleaned.iter().any(|p| p == prefix) {
        let earlier = format!("{prefix}-");
        for e in fs::read_dir(base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name
                .strip_prefix(&earlier)
                .is_some_and(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
                && e.path() != dir
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        cleaned.push(prefix.to_string());
    }
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes a test's directory when the test passes; a failing test's is kept to look at. The
/// distribution tests write gigabytes each, and CI machines have limited disk.
pub struct RemoveOnPass(pub PathBuf);

impl Drop for RemoveOnPass {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A temp dir for trees of many small files: on a RAM filesystem when the machine has one with
/// room to spare (creating and deleting 100k-entry directories several times on a disk
/// filesystem costs minutes in inode-allocation scans), else in the default temp dir.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let roomy = free_bytes(shm).is_some_and(|free| free >= 8 << 30);
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if roomy {
        if let Ok(d) = b.tempdir_in(shm) {
            return d;
        }
    }
    b.tempdir().unwrap()
}

/// Free bytes of the filesystem holding `p`, or None when it cannot be asked.
fn free_bytes(p: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (r == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// A loopback TCP port that was free a moment ago (for a test server to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_deterministic_and_complete() {
        let a = std::env::temp_dir().join(format!("kiln-corpus-test-{}", std::process::id()));
        fs::create_dir_all(&a).unwrap();
        generate_corpus(
            &a,
            CorpusOptions {
                huge_dir: false,
                huge_sparse: false,
            },
        );
        assert!(a
            .join("links/slow")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::read(a.join("files/size-4097")).unwrap(),
            pseudo_random(9, 4097)
        );
        fs::remove_dir_all(&a).unwrap();
    }
}
