//! The initrd kiln builds: kiln-init as `/init`, the kernel modules the boot needs, the part
//! of the kernel's module database that concerns them, and kiln-init's configuration, as a
//! deterministic cpio "newc" archive compressed with zstd or gzip (both supported by Debian's
//! kernels: CONFIG_RD_ZSTD, CONFIG_RD_GZIP).
//!
//! The kernel and its modules come from the root tree (any [`Contents`] source): the kernel at
//! `/boot/vmlinuz-VERSION` or `/usr/lib/modules/VERSION/vmlinuz`, the modules under
//! `/usr/lib/modules/VERSION` (or `/lib/modules/VERSION`). Which modules: the closure that
//! modprobe would load for the boot's needs ([`kiln_init::modules`], the same resolver kiln-init
//! runs at boot) — `modules.dep`, `modules.softdep` (pre and post, through aliases such as
//! `crypto-crc32c`), `modules.weakdep`, built-in modules and aliases — plus the crypto
//! algorithms the kernel asks for by alias at run time ([`RUNTIME_REQUESTS`]). Every module is
//! reported with why it is there. The initrd carries `modules.dep`, `modules.alias`,
//! `modules.softdep`, `modules.builtin` and the built-in aliases for what it holds, so kiln-init,
//! answering the kernel's `request_module` as `/sbin/modprobe`, finds `crypto-crc32c` among them.
//!
//! A missing kernel, a missing required module or an unreadable `modules.dep` is an error here,
//! at build time, never a broken image.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::cpio::{self, Entry, EntryKind};
use kiln_formats::fstree::{Contents, NodeId, NodeKind, Tree};
use kiln_init::config::Config;
use kiln_init::modules::{Closure, Follow, Lookup, ModuleDb, Reason};

/// Where kiln-init's configuration lives in the initrd.
pub use kiln_init::config::CONFIG_PATH;

/// Modules every kiln initrd needs (unless built into the kernel), with why: the virtio disk
/// the images boot from in VMs, and dm-verity.
pub const REQUIRED_MODULES: &[(&str, &str)] = &[
    ("virtio_pci", "virtio devices"),
    ("virtio_blk", "virtio disks"),
    ("dm_mod", "dm-verity root"),
    ("dm_verity", "dm-verity root"),
];

/// Modules included when the kernel has them, with why: the storage paths a boot disk or live
/// medium can come through on a generic kernel, the live boot's filesystems, loop and overlay.
/// Kernels built for clouds lack some (Debian's cloud kernel has no AHCI or USB); they are
/// reported as skipped.
pub const OPTIONAL_MODULES: &[(&str, &str)] = &[
    ("virtio_scsi", "virtio-scsi disks and CDs"),
    ("sd_mod", "SCSI, SATA and USB disks"),
    ("sr_mod", "CD and DVD drives"),
    ("nvme", "NVMe disks"),
    ("ahci", "SATA (AHCI) disks and CDs"),
    ("ata_piix", "IDE and legacy SATA"),
    ("xhci_pci", "USB 3 controllers"),
    ("ehci_pci", "USB 2 controllers"),
    ("uhci_hcd", "USB 1.1 companion controllers"),
    ("ohci_pci", "USB 1.1 companion controllers"),
    ("usb_storage", "USB sticks"),
    ("uas", "USB attached SCSI disks"),
    ("loop", "live images"),
    ("overlay", "overlays"),
    ("isofs", "live CDs"),
    ("vfat", "FAT media"),
    ("nls_cp437", "FAT media"),
    ("nls_iso8859_1", "FAT media"),
    ("nls_ascii", "FAT media"),
    ("erofs", "EROFS roots"),
    ("squashfs", "squashfs roots"),
    ("ext4", "ext4 roots and /var"),
];

/// What the kernel asks for by alias at run time, through `request_module`, when a module in
/// the initrd is used: (module, alias, why). `modules.softdep` names some of these (ext4's and
/// libcrc32c's crc32c) but not all, and not on every kernel; an alias that the kernel has built
/// in (Debian's sha256) needs nothing.
pub const RUNTIME_REQUESTS: &[(&str, &str, &str)] = &[
    ("dm_verity", "crypto-sha256", "dm-verity's hash"),
    ("libcrc32c", "crypto-crc32c", "libcrc32c's checksum"),
    ("ext4", "crypto-crc32c", "ext4 metadata checksums"),
    ("jbd2", "crypto-crc32c", "journal checksums"),
    ("erofs", "crypto-crc32c", "EROFS superblock checksums"),
    (
        "crc64_rocksoft",
        "crypto-crc64-rocksoft",
        "NVMe and SCSI protection information",
    ),
];

/// How the cpio archive is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// zstd at this level (1..=19; the default is 9).
    Zstd(i32),
    /// gzip at this level (0..=9).
    Gzip(u32),
    /// Uncompressed.
    None,
}

impl Default for Compression {
    /// zstd level 9: on a 5.4 MB Debian initrd it takes 0.55 s for 1.52 MB, where level 19
    /// takes 11.7 s for 1.35 MB.
    fn default() -> Self {
        Compression::Zstd(9)
    }
}

/// What goes into the initrd.
#[derive(Clone, Debug, Default)]
pub struct InitrdOptions {
    /// Path of the kernel in the tree; `None` finds it.
    pub kernel: Option<String>,
    /// Filesystem of the root (`ext4`, `erofs`, …): its module becomes required.
    pub root_fs: Option<String>,
    /// Further modules by name; each must exist (or be built in).
    pub extra_modules: Vec<String>,
    /// Leave out [`OPTIONAL_MODULES`].
    pub no_optional_modules: bool,
    /// kiln-init's configuration; its `modules` are filled in here.
    pub config: Config,
    /// The kiln-init executable (see `kiln_init_embed::kiln_init`).
    pub kiln_init: Vec<u8>,
    /// Modification time of every member (`SOURCE_DATE_EPOCH`).
    pub mtime: u32,
    /// Compression of the archive.
    pub compression: Compression,
    /// How module files go into the archive.
    pub module_files: ModuleFiles,
}

/// How module files are stored in the initrd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModuleFiles {
    /// Decompressed (`.ko`): the archive's own compression covers them, and nothing needs
    /// decompressing twice at boot.
    #[default]
    Decompressed,
    /// As the kernel package ships them (`.ko.xz`, `.ko.zst`, `.ko.gz`): kiln-init has the
    /// kernel decompress them (`CONFIG_MODULE_DECOMPRESS`) or does it itself.
    AsShipped,
}

/// The kernel found in a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// `uname -r`.
    pub version: String,
    /// Path of the image in the tree.
    pub image: String,
    /// Path of its modules directory in the tree (may not exist for a kernel without modules).
    pub modules_dir: String,
}

/// A built initrd and what went into it.
#[derive(Clone, Debug)]
pub struct Initrd {
    /// The compressed archive.
    pub bytes: Vec<u8>,
    /// The kernel the modules belong to.
    pub kernel: KernelInfo,
    /// Modules included, in load order (names as kmod normalises them).
    pub modules: Vec<String>,
    /// Why each module is included: what asked for it (same order as `modules`).
    pub reasons: Vec<String>,
    /// Requested modules (and aliases) that are built into the kernel.
    pub builtin: Vec<String>,
    /// Optional modules the kernel does not have.
    pub skipped: Vec<String>,
    /// Soft dependencies and run-time aliases nothing in the kernel provides, with who wanted
    /// them (a kernel package with a module missing; the boot may still work).
    pub unresolved: Vec<String>,
}

/// `module_name` normalises a module name (`dm-verity`, `dm_verity.ko.xz` and
/// `kernel/…/dm-verity.ko` all become `dm_verity`); `DB_FILES` are the module database files
/// of a modules directory.
pub use kiln_init::modules::{module_name, DB_FILES};

/// Resolves `path` in `tree`, following symlinks, as the booted system would see it.
pub fn resolve_follow(tree: &Tree, path: &str) -> Option<NodeId> {
    tree.resolve_follow(path.as_bytes())
}

/// Reads a whole regular file of the tree (following symlinks); it must exist.
pub fn read_tree_file(tree: &Tree, contents: &dyn Contents, path: &str) -> Result<Vec<u8>> {
    kiln_formats::fstree::read_file(tree, contents, path, u64::MAX)?
        .ok_or_else(|| anyhow!("{path}: not in the tree"))
}

fn dir_names(tree: &Tree, path: &str) -> Vec<String> {
    match resolve_follow(tree, path) {
        Some(id) => tree
            .entries(id)
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect(),
        None => Vec::new(),
    }
}

fn is_file(tree: &Tree, path: &str) -> bool {
    resolve_follow(tree, path).is_some_and(|id| matches!(tree.node(id).kind, NodeKind::File(_)))
}

/// Compares kernel versions the way people expect ("6.10" after "6.9"): digit runs numerically.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for ch in s.chars() {
            let d = ch.is_ascii_digit();
            match out.last_mut() {
                Some((kind, cur)) if *kind == d => cur.push(ch),
                _ => out.push((d, ch.to_string())),
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let o = if x.0 && y.0 {
            let (xs, ys) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
            xs.len().cmp(&ys.len()).then_with(|| xs.cmp(ys))
        } else {
            x.1.cmp(&y.1)
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

fn modules_dir_for(tree: &Tree, version: &str) -> String {
    for base in ["/usr/lib/modules", "/lib/modules"] {
        let p = format!("{base}/{version}");
        if resolve_follow(tree, &p).is_some() {
            return p;
        }
    }
    format!("/usr/lib/modules/{version}")
}

/// Finds the kernel: `explicit` if given, else `/boot/vmlinuz-*` or `/usr/lib/modules/*/vmlinuz`
/// (the newest version when there are several).
pub fn find_kernel(tree: &Tree, explicit: Option<&str>) -> Result<KernelInfo> {
    if let Some(p) = explicit {
        if !is_file(tree, p) {
            bail!("kernel {p}: no such regular file in the tree");
        }
        let name = p.rsplit('/').next().unwrap_or(p);
        let version = if let Some(v) = name.strip_prefix("vmlinuz-") {
            v.to_string()
        } else {
            // /usr/lib/modules/VERSION/vmlinuz
            let parts: Vec<&str> = p.trim_end_matches('/').split('/').collect();
            match parts.as_slice() {
                [.., "modules", v, "vmlinuz"] => v.to_string(),
                _ => bail!(
                    "kernel {p}: cannot tell its version from the name (expected vmlinuz-VERSION or …/modules/VERSION/vmlinuz)"
                ),
            }
        };
        return Ok(KernelInfo {
            modules_dir: modules_dir_for(tree, &version),
            version,
            image: p.to_string(),
        });
    }
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for base in ["/usr/lib/modules", "/lib/modules"] {
        for v in dir_names(tree, base) {
            let p = format!("{base}/{v}/vmlinuz");
            if is_file(tree, &p) {
                found.entry(v).or_insert(p);
            }
        }
    }
    for n in dir_names(tree, "/boot") {
        if let Some(v) = n.strip_prefix("vmlinuz-") {
            let p = format!("/boot/{n}");
            if is_file(tree, &p) {
                found.insert(v.to_string(), p);
            }
        }
    }
    let (version, image) = found
        .into_iter()
        .max_by(|a, b| version_cmp(&a.0, &b.0))
        .ok_or_else(|| {
            anyhow!(
                "no kernel in the tree: looked for /boot/vmlinuz-* and /usr/lib/modules/*/vmlinuz (install a kernel package in the tree, or name one with [boot] kernel)"
            )
        })?;
    Ok(KernelInfo {
        modules_dir: modules_dir_for(tree, &version),
        version,
        image,
    })
}

/// Loads the module database of `kernel` from the tree.
pub fn module_db(tree: &Tree, contents: &dyn Contents, kernel: &KernelInfo) -> Result<ModuleDb> {
    let dir = &kernel.modules_dir;
    let dep_path = format!("{dir}/modules.dep");
    if resolve_follow(tree, &dep_path).is_none() {
        bail!(
            "{dep_path}: missing (kernel {} has no module database; run depmod in the tree)",
            kernel.version
        );
    }
    let mut failure = None;
    let db = ModuleDb::from_files(|name| {
        let p = format!("{dir}/{name}");
        if resolve_follow(tree, &p).is_none() {
            return Ok(None);
        }
        match read_tree_file(tree, contents, &p) {
            Ok(b) => Ok(Some(b)),
            Err(e) => {
                let msg = format!("{e:#}");
                failure = Some(e);
                Err(msg)
            }
        }
    });
    match (db, failure) {
        (Ok(db), _) => Ok(db),
        (Err(_), Some(e)) => Err(e.context(format!("reading the module database in {dir}"))),
        (Err(e), None) => Err(anyhow!("{dir}/{e}")),
    }
}

/// The modules an initrd gets for a kernel, and why.
#[derive(Clone, Debug, Default)]
pub struct ModulePlan {
    /// The closure: modules in load order with reasons, built-ins, what nothing provides.
    pub closure: Closure,
    /// Optional modules the kernel does not have.
    pub skipped: Vec<String>,
    /// What kiln-init is asked to load at boot, in order (module names and aliases; each
    /// brings its dependencies along).
    pub load: Vec<String>,
}

/// Resolves what an initrd needs: `required` (name, why) must exist or be built in, `optional`
/// are taken when the kernel has them, and the aliases of [`RUNTIME_REQUESTS`] are added for
/// the modules that end up included.
pub fn plan_modules(
    db: &ModuleDb,
    required: &[(String, String)],
    optional: &[(String, String)],
) -> Result<ModulePlan> {
    let follow = Follow {
        softdeps: true,
        weakdeps: true,
    };
    let mut missing = Vec::new();
    let mut skipped = Vec::new();
    let mut requests: Vec<(String, Reason)> = Vec::new();
    for (name, why) in required {
        if db.lookup(name) == Lookup::Unknown {
            missing.push(module_name(name));
        }
        requests.push((name.clone(), Reason::Requested(why.clone())));
    }
    if !missing.is_empty() {
        bail!(
            "kernel module{} {} not found: neither in modules.dep nor in modules.builtin",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", ")
        );
    }
    for (name, why) in optional {
        if db.lookup(name) == Lookup::Unknown {
            skipped.push(module_name(name));
        } else {
            requests.push((name.clone(), Reason::Requested(why.clone())));
        }
    }
    let first = db.closure(&requests, follow).map_err(|e| anyhow!(e))?;
    for (module, alias, why) in RUNTIME_REQUESTS {
        if first.contains(module) && !requests.iter().any(|(n, _)| n == alias) {
            requests.push((
                alias.to_string(),
                Reason::Requested(format!("{why}, asked for by {module} at run time")),
            ));
        }
    }
    let closure = db.closure(&requests, follow).map_err(|e| anyhow!(e))?;
    let load = requests
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| matches!(db.lookup(n), Lookup::Module(_) | Lookup::Alias(_)))
        .collect();
    Ok(ModulePlan {
        closure,
        skipped,
        load,
    })
}

/// Builds the initrd for the kernel in `tree`.
pub fn build_initrd(tree: &Tree, contents: &dyn Contents, opts: &InitrdOptions) -> Result<Initrd> {
    if opts.kiln_init.get(0..4) != Some(b"\x7fELF") {
        bail!("the kiln-init executable given is not an ELF file");
    }
    let kernel = find_kernel(tree, opts.kernel.as_deref())?;
    let db = module_db(tree, contents, &kernel)?;
    let own = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(m, w)| (m.to_string(), w.to_string()))
            .collect()
    };
    let mut required = own(REQUIRED_MODULES);
    if let Some(fs) = &opts.root_fs {
        required.push((fs.clone(), "root filesystem".into()));
    }
    for m in &opts.extra_modules {
        required.push((m.clone(), "[boot] modules".into()));
    }
    let optional = if opts.no_optional_modules {
        Vec::new()
    } else {
        own(OPTIONAL_MODULES)
    };
    let plan = plan_modules(&db, &required, &optional)
        .with_context(|| format!("kernel {} ({})", kernel.version, kernel.modules_dir))?;
    let order = plan.closure.names();

    let m = opts.mtime;
    let mut entries = vec![
        Entry::dir("/", 0o755, m),
        Entry::file("init", opts.kiln_init.clone(), 0o755, m),
        Entry::dir("dev", 0o755, m),
        Entry::new(
            "dev/console",
            EntryKind::CharDev { major: 5, minor: 1 },
            0o600,
            m,
        ),
        Entry::dir("proc", 0o755, m),
        Entry::dir("sys", 0o755, m),
        Entry::dir("run", 0o755, m),
        Entry::dir("newroot", 0o755, m),
        Entry::dir("etc", 0o755, m),
        // The kernel's usermode modprobe (CONFIG_MODPROBE_PATH) is kiln-init.
        Entry::dir("sbin", 0o755, m),
        Entry::new(
            "sbin/modprobe",
            EntryKind::Symlink(b"../init".to_vec()),
            0o777,
            m,
        ),
    ];
    let stored_path = |rel: &str| -> String {
        match opts.module_files {
            ModuleFiles::AsShipped => rel.to_string(),
            ModuleFiles::Decompressed => {
                let mut r = rel;
                for x in kiln_init::modules::COMPRESSED_SUFFIXES {
                    r = r.strip_suffix(x).unwrap_or(r);
                }
                r.to_string()
            }
        }
    };
    let base = format!("lib/modules/{}", kernel.version);
    let mut dirs = BTreeSet::from([base.clone()]);
    let mut cfg = opts.config.clone();
    cfg.modules.clear();
    for name in &order {
        let rel = &db.modules[name].path;
        let src = format!("{}/{rel}", kernel.modules_dir);
        let data = read_tree_file(tree, contents, &src)
            .with_context(|| format!("kernel module {name}"))?;
        let data = match opts.module_files {
            ModuleFiles::Decompressed => {
                kiln_init::modules::decompress(&src, data).map_err(|e| anyhow!(e))?
            }
            ModuleFiles::AsShipped => data,
        };
        let dest = format!("{base}/{}", stored_path(rel));
        let mut d = dest.as_str();
        while let Some((parent, _)) = d.rsplit_once('/') {
            dirs.insert(parent.to_string());
            d = parent;
        }
        entries.push(Entry::file(&dest, data, 0o644, m));
    }
    // kiln-init loads these by name, each with its dependencies and soft dependencies as
    // modprobe would, from the database subset below.
    cfg.modules = plan.load.clone();
    for (name, file) in db.render_subset(&order, |p| stored_path(p)) {
        entries.push(Entry::file(&format!("{base}/{name}"), file, 0o644, m));
    }
    for d in dirs {
        entries.push(Entry::dir(&d, 0o755, m));
    }
    entries.push(Entry::file(
        CONFIG_PATH.trim_start_matches('/'),
        cfg.render().into_bytes(),
        0o644,
        m,
    ));
    let archive = cpio::write_entries(&entries, Vec::new()).context("writing the initrd cpio")?;
    let bytes = compress(&archive, opts.compression)?;
    let c = &plan.closure;
    Ok(Initrd {
        bytes,
        kernel,
        modules: order,
        reasons: c.order.iter().map(|(_, r)| r.to_string()).collect(),
        builtin: {
            let mut b: Vec<String> = c.builtin.iter().map(|(n, _)| n.clone()).collect();
            b.sort();
            b.dedup();
            b
        },
        skipped: plan.skipped,
        unresolved: c
            .unresolved
            .iter()
            .map(|(n, r)| format!("{n} ({r})"))
            .collect(),
    })
}

fn compress(data: &[u8], c: Compression) -> Result<Vec<u8>> {
    Ok(match c {
        Compression::Zstd(level) => {
            // Single-threaded with a fixed level: same bytes every time.
            let mut enc = zstd::stream::Encoder::new(Vec::new(), level)?;
            enc.include_checksum(true)?;
            enc.set_pledged_src_size(Some(data.len() as u64))?;
            enc.write_all(data)?;
            enc.finish()?
        }
        Compression::Gzip(level) => {
            // No file name and mtime 0 in the gzip header.
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::new(level));
            enc.write_all(data)?;
            enc.finish()?
        }
        Compression::None => data.to_vec(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kiln_formats::fstree::{DataRef, FileData, HostContents, Meta, Node};

    fn add_file(t: &mut Tree, path: &str, data: &[u8]) {
        let m = Meta::default();
        t.insert(
            path.as_bytes(),
            Node {
                kind: NodeKind::File(FileData::dense(
                    data.len() as u64,
                    DataRef::Inline(data.to_vec().into()),
                )),
                meta: m.clone(),
                slot: None,
            },
            &m,
        )
        .unwrap();
    }

    fn add_link(t: &mut Tree, path: &str, target: &str) {
        let m = Meta::default();
        t.insert(
            path.as_bytes(),
            Node {
                kind: NodeKind::Symlink(target.as_bytes().into()),
                meta: m.clone(),
                slot: None,
            },
            &m,
        )
        .unwrap();
    }

    #[test]
    fn names_and_versions() {
        assert_eq!(module_name("kernel/drivers/md/dm-verity.ko"), "dm_verity");
        assert_eq!(module_name("dm-mod.ko.zst"), "dm_mod");
        assert_eq!(module_name("virtio_pci"), "virtio_pci");
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("6.10.0-1-amd64", "6.9.0-1-amd64"), Greater);
        assert_eq!(version_cmp("6.1.0-56", "6.1.0-9"), Greater);
        assert_eq!(version_cmp("6.1.0", "6.1.0"), Equal);
    }

    fn db(dep: &str, builtin: &str, softdep: &str, alias: &str) -> ModuleDb {
        let files = BTreeMap::from([
            ("modules.dep", dep),
            ("modules.builtin", builtin),
            ("modules.softdep", softdep),
            ("modules.alias", alias),
        ]);
        ModuleDb::from_files(|n| Ok(files.get(n).map(|t| t.as_bytes().to_vec()))).unwrap()
    }

    fn pairs(v: &[&str], why: &str) -> Vec<(String, String)> {
        v.iter().map(|s| (s.to_string(), why.to_string())).collect()
    }

    #[test]
    fn plan_follows_softdeps_and_runtime_aliases_and_says_why() {
        let db = db(
            "\
kernel/a/virtio.ko:
kernel/a/virtio_ring.ko:
kernel/a/virtio_pci.ko: kernel/a/virtio_pci_modern_dev.ko kernel/a/virtio.ko kernel/a/virtio_ring.ko
kernel/a/virtio_pci_modern_dev.ko:
kernel/md/dm-verity.ko: kernel/md/dm-bufio.ko kernel/md/dm-mod.ko
kernel/md/dm-bufio.ko: kernel/md/dm-mod.ko
kernel/md/dm-mod.ko:
kernel/fs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/sha256-ssse3.ko:
",
            "kernel/fs/ext4/ext4.ko\n",
            "softdep libcrc32c pre: crc32c\n",
            "alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\nalias crypto-sha256 sha256_ssse3\n",
        );
        let plan = plan_modules(
            &db,
            &pairs(&["dm-verity", "virtio_pci", "ext4", "erofs"], "boot"),
            &pairs(&["usb_storage", "dm_mod"], "optional"),
        )
        .unwrap();
        let order = plan.closure.names();
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap_or(usize::MAX);
        assert!(pos("dm_mod") < pos("dm_bufio") && pos("dm_bufio") < pos("dm_verity"));
        for d in ["virtio", "virtio_ring", "virtio_pci_modern_dev"] {
            assert!(
                pos(d) < pos("virtio_pci"),
                "{d} before virtio_pci: {order:?}"
            );
        }
        // libcrc32c's crc32c comes from the softdep through an alias, before libcrc32c.
        assert!(pos("crc32c_generic") < pos("libcrc32c") && pos("libcrc32c") < pos("erofs"));
        // dm-verity's hash, which no softdep names, through RUNTIME_REQUESTS.
        assert!(pos("sha256_ssse3") < usize::MAX, "{order:?}");
        assert_eq!(order.iter().filter(|n| *n == "dm_mod").count(), 1);
        let why = |n: &str| plan.closure.order[pos(n)].1.to_string();
        assert_eq!(why("erofs"), "requested: boot");
        assert_eq!(why("libcrc32c"), "needed by erofs (modules.dep)");
        assert!(
            why("crc32c_generic").contains("before libcrc32c"),
            "{}",
            why("crc32c_generic")
        );
        assert!(
            why("sha256_ssse3").contains("dm-verity's hash"),
            "{}",
            why("sha256_ssse3")
        );
        assert_eq!(plan.closure.builtin.len(), 1);
        assert_eq!(plan.skipped, ["usb_storage"]);
        // kiln-init is told the top-level requests; dependencies come along at boot.
        assert_eq!(
            plan.load,
            [
                "dm-verity",
                "virtio_pci",
                "erofs",
                "dm_mod",
                "crypto-sha256",
                "crypto-crc32c"
            ]
        );
        let e = plan_modules(&db, &pairs(&["nosuch", "dm_mod", "alsonot"], "x"), &[]).unwrap_err();
        assert!(
            e.to_string().contains("modules nosuch, alsonot not found"),
            "{e}"
        );
        assert!(ModuleDb::from_files(|n| Ok(
            (n == "modules.dep").then(|| b"garbage line\n".to_vec())
        ))
        .is_err());
    }

    #[test]
    fn kernel_is_found_through_merged_usr_symlinks() {
        let mut t = Tree::default();
        add_link(&mut t, "/lib", "usr/lib");
        add_file(&mut t, "/usr/lib/modules/6.1.0-9-amd64/vmlinuz", b"old");
        add_file(&mut t, "/boot/vmlinuz-6.1.0-10-amd64", b"new");
        add_file(&mut t, "/usr/lib/modules/6.1.0-10-amd64/modules.dep", b"");
        let k = find_kernel(&t, None).unwrap();
        assert_eq!(k.version, "6.1.0-10-amd64");
        assert_eq!(k.image, "/boot/vmlinuz-6.1.0-10-amd64");
        assert_eq!(k.modules_dir, "/usr/lib/modules/6.1.0-10-amd64");
        assert!(resolve_follow(&t, "/lib/modules/6.1.0-9-amd64/vmlinuz").is_some());
        let k = find_kernel(&t, Some("/lib/modules/6.1.0-9-amd64/vmlinuz")).unwrap();
        assert_eq!(k.version, "6.1.0-9-amd64");
        let e = find_kernel(&t, Some("/boot/nope")).unwrap_err();
        assert!(e.to_string().contains("/boot/nope"), "{e}");
        let e = find_kernel(&Tree::default(), None).unwrap_err();
        assert!(e.to_string().starts_with("no kernel in the tree"), "{e}");
    }

    /// The machine's real Debian kernel module tree as a fixture: the default set resolves,
    /// dependencies load first, and the cloud kernel's missing USB/AHCI drivers are reported.
    #[test]
    fn real_debian_module_tree() {
        let base = std::path::Path::new("/usr/lib/modules");
        let ver = std::fs::read_dir(base)
            .expect("/usr/lib/modules (install linux-image-cloud-amd64; CI does)")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|v| base.join(v).join("modules.dep").is_file())
            .max_by(|a, b| version_cmp(a, b))
            .expect("a kernel with modules.dep");
        let dir = base.join(&ver);
        let db = ModuleDb::load_dir(&dir.display().to_string()).unwrap();
        let mut req: Vec<(String, String)> = REQUIRED_MODULES
            .iter()
            .map(|(m, w)| (m.to_string(), w.to_string()))
            .collect();
        req.push(("erofs".into(), "root".into()));
        let opt: Vec<(String, String)> = OPTIONAL_MODULES
            .iter()
            .map(|(m, w)| (m.to_string(), w.to_string()))
            .collect();
        let plan = plan_modules(&db, &req, &opt).unwrap();
        let order = plan.closure.names();
        let builtin: Vec<String> = plan.closure.builtin.iter().map(|b| b.0.clone()).collect();
        let skipped = plan.skipped.clone();
        let pos = |n: &str| order.iter().position(|x| x == n);
        for (dep, of) in [
            ("dm_mod", "dm_verity"),
            ("dm_bufio", "dm_verity"),
            ("virtio", "virtio_blk"),
            ("virtio_ring", "virtio_pci"),
        ] {
            assert!(
                pos(dep).unwrap() < pos(of).unwrap(),
                "{dep} before {of}: {order:?}"
            );
        }
        // Every dependency of every included module is included (or built in) and earlier.
        for (i, m) in order.iter().enumerate() {
            for d in &db.modules[m].deps {
                let j = pos(d);
                assert!(
                    j.is_some_and(|j| j < i) || db.builtin.contains(d),
                    "{m} needs {d}"
                );
            }
        }
        if db.builtin.contains("ext4") {
            assert!(builtin.contains(&"ext4".to_string()));
        }
        // What the kernel lacks is reported rather than silently ignored.
        for s in &skipped {
            assert!(!db.modules.contains_key(s) && !db.builtin.contains(s));
        }
        let e = plan_modules(&db, &[("no_such_module_x".into(), "x".into())], &[]).unwrap_err();
        assert!(e.to_string().contains("no_such_module_x"));
    }

    #[test]
    fn initrd_is_deterministic_and_lists_modules_in_config() {
        let mut t = Tree::default();
        add_file(&mut t, "/boot/vmlinuz-1.0", b"kernel");
        let m = "/usr/lib/modules/1.0";
        add_file(
            &mut t,
            &format!("{m}/modules.dep"),
            b"kernel/virtio_pci.ko.zst: kernel/virtio.ko\nkernel/virtio.ko:\nkernel/virtio_blk.ko.gz:\nkernel/dm-mod.ko.xz:\nkernel/dm-verity.ko: kernel/dm-mod.ko.xz\n",
        );
        let zst = zstd::stream::encode_all(&b"\x7fELF PCI"[..], 3).unwrap();
        add_file(&mut t, &format!("{m}/kernel/virtio_pci.ko.zst"), &zst);
        add_file(&mut t, &format!("{m}/kernel/virtio.ko"), b"VIRTIO");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"\x7fELF BLK").unwrap();
        add_file(
            &mut t,
            &format!("{m}/kernel/virtio_blk.ko.gz"),
            &gz.finish().unwrap(),
        );
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(b"\x7fELF DMMOD").unwrap();
        add_file(
            &mut t,
            &format!("{m}/kernel/dm-mod.ko.xz"),
            &xz.finish().unwrap(),
        );
        add_file(&mut t, &format!("{m}/kernel/dm-verity.ko"), b"VERITY");
        let opts = InitrdOptions {
            kiln_init: b"\x7fELF fake".to_vec(),
            mtime: 1_700_000_000,
            compression: Compression::Zstd(3),
            config: Config {
                overlays: vec!["/etc".into()],
                ..Config::default()
            },
            ..InitrdOptions::default()
        };
        let a = build_initrd(&t, &HostContents, &opts).unwrap();
        let b = build_initrd(&t, &HostContents, &opts).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(
            a.modules,
            ["virtio", "virtio_pci", "virtio_blk", "dm_mod", "dm_verity"]
        );
        assert!(a.skipped.contains(&"usb_storage".to_string()));
        let raw = zstd::stream::decode_all(&a.bytes[..]).unwrap();
        let members = cpio::read(&raw).unwrap();
        let get = |n: &str| {
            members
                .iter()
                .find(|m| m.name == n.as_bytes())
                .unwrap_or_else(|| panic!("{n} missing"))
                .data(&raw)
                .to_vec()
        };
        assert_eq!(get("init"), b"\x7fELF fake");
        assert_eq!(get("lib/modules/1.0/kernel/virtio_pci.ko"), b"\x7fELF PCI");
        assert_eq!(get("lib/modules/1.0/kernel/virtio_blk.ko"), b"\x7fELF BLK");
        assert_eq!(get("lib/modules/1.0/kernel/dm-mod.ko"), b"\x7fELF DMMOD");
        let cfg = Config::parse(std::str::from_utf8(&get("etc/kiln-init.conf")).unwrap()).unwrap();
        assert_eq!(cfg.overlays, ["/etc"]);
        assert_eq!(
            cfg.modules,
            ["virtio_pci", "virtio_blk", "dm_mod", "dm_verity"]
        );
        assert_eq!(
            a.reasons[1],
            "requested: virtio devices",
            "{:?}",
            a.modules.iter().zip(&a.reasons).collect::<Vec<_>>()
        );
        // The database subset kiln-init resolves with at boot, paths as stored.
        let dep = String::from_utf8(get("lib/modules/1.0/modules.dep")).unwrap();
        assert!(
            dep.contains("kernel/virtio_pci.ko: kernel/virtio.ko\n"),
            "{dep}"
        );
        assert!(dep.contains("kernel/dm-mod.ko: \n"), "{dep}");
        let link = members.iter().find(|m| m.name == b"sbin/modprobe").unwrap();
        assert_eq!(link.data(&raw), b"../init");
        // As shipped: compressed files and the database pointing at them.
        let mut o4 = opts.clone();
        o4.module_files = ModuleFiles::AsShipped;
        let c = build_initrd(&t, &HostContents, &o4).unwrap();
        let raw = zstd::stream::decode_all(&c.bytes[..]).unwrap();
        let members = cpio::read(&raw).unwrap();
        let names: Vec<String> = members
            .iter()
            .map(|m| String::from_utf8_lossy(&m.name).into_owned())
            .collect();
        assert!(
            names.contains(&"lib/modules/1.0/kernel/dm-mod.ko.xz".to_string()),
            "{names:?}"
        );
        let dep = members
            .iter()
            .find(|m| m.name == b"lib/modules/1.0/modules.dep")
            .unwrap();
        assert!(String::from_utf8_lossy(dep.data(&raw))
            .contains("kernel/virtio_pci.ko.zst: kernel/virtio.ko"));
        assert!(members.iter().all(|m| m.header.mtime == 1_700_000_000));
        // Missing pieces are build-time errors.
        let mut o2 = opts.clone();
        o2.extra_modules = vec!["squashfs".into()];
        let e = build_initrd(&t, &HostContents, &o2).unwrap_err();
        assert!(format!("{e:#}").contains("squashfs not found"), "{e:#}");
        let e = build_initrd(&Tree::default(), &HostContents, &opts).unwrap_err();
        assert!(format!("{e:#}").contains("no kernel in the tree"), "{e:#}");
        let mut o3 = opts.clone();
        o3.compression = Compression::Gzip(6);
        let g = build_initrd(&t, &HostContents, &o3).unwrap();
        assert_eq!(&g.bytes[..2], &[0x1f, 0x8b]);
    }
}
