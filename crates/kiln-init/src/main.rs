//! kiln-init: PID 1 of the initrds kiln builds. In order: mount /proc /sys /dev /run, read the
//! configuration and the kernel command line, load modules, wait for the boot disk, find the
//! root (dm-verity data and hash partitions by the root hash halves, or a partition by UUID or
//! DPS type, or a live medium's image file), mount it read-only, mount /var, apply tmpfs
//! overlays, move the API filesystems and switch root. Any failure is printed as
//! `kiln-init: …` on the console, followed by a reboot after a short delay so that boot
//! counting can take effect.
//!
//! Run as `modprobe` (the kernel's usermode helper, `/sbin/modprobe` in the initrd is a link to
//! kiln-init) it loads the module or alias the kernel asked for and exits; see `kmod.rs`.

#[cfg(target_os = "linux")]
mod disk;
#[cfg(target_os = "linux")]
mod dm;
#[cfg(target_os = "linux")]
mod kmod;
#[cfg(target_os = "linux")]
mod kmsg;
#[cfg(target_os = "linux")]
mod loopdev;
#[cfg(target_os = "linux")]
mod sys;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("kiln-init: runs only as PID 1 of a Linux initrd");
    std::process::exit(1);
}

#[cfg(target_os = "linux")]
fn main() {
    linux::main()
}

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use kiln_init::config::{self, Config, Plan, RootSpec, VarMode};
    use kiln_init::probe;
    use uuid::Uuid;

    use crate::disk;
    use crate::kmod::{self, Loader};
    use crate::{dm, loopdev, sys};

    static REBOOT_DELAY: AtomicU32 = AtomicU32::new(config::DEFAULT_REBOOT_DELAY);
    static DEBUG: AtomicBool = AtomicBool::new(false);

    /// Where the new root is assembled.
    const NEWROOT: &str = "/newroot";

    macro_rules! say {
        ($($a:tt)*) => {
            eprintln!("kiln-init: [{:7.3}] {}", sys::uptime(), format!($($a)*))
        };
    }
    macro_rules! debug {
        ($($a:tt)*) => {
            if DEBUG.load(Ordering::Relaxed) { say!($($a)*) }
        };
    }

    pub fn main() {
        let args: Vec<String> = std::env::args().collect();
        let argv0 = args.first().map(String::as_str).unwrap_or("");
        if argv0.rsplit('/').next() == Some("modprobe") {
            std::process::exit(kmod::modprobe_main(&args[1..]));
        }
        let is_pid1 = std::process::id() == 1;
        if !is_pid1 {
            eprintln!(
                "kiln-init: must run as PID 1 of an initrd (this is pid {})",
                std::process::id()
            );
            std::process::exit(2);
        }
        let err = match run() {
            Ok(never) => match never {},
            Err(e) => e,
        };
        let delay = REBOOT_DELAY.load(Ordering::Relaxed);
        eprintln!("kiln-init: {err}");
        eprintln!("kiln-init: boot failed; rebooting in {delay} s");
        std::thread::sleep(Duration::from_secs(u64::from(delay)));
        sys::reboot()
    }

    fn run() -> Result<std::convert::Infallible, String> {
        // The initrd's own /dev/console first, so errors mounting /dev are seen too.
        sys::ensure_console();
        mount_api_filesystems()?;
        sys::ensure_console();
        let cmdline = std::fs::read_to_string("/proc/cmdline")
            .map_err(|e| format!("read /proc/cmdline: {e}"))?;
        let cfg = match std::fs::read_to_string(config::CONFIG_PATH) {
            Ok(t) => Config::parse(&t)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(format!("read {}: {e}", config::CONFIG_PATH)),
        };
        let plan = Plan::new(&cfg, &cmdline).map_err(|e| format!("kernel command line: {e}"))?;
        REBOOT_DELAY.store(plan.reboot_delay, Ordering::Relaxed);
        DEBUG.store(plan.debug, Ordering::Relaxed);
        say!(
            "starting ({} modules, root: {})",
            plan.modules.len(),
            describe_root(&plan.root)
        );

        // The kernel asks for crypto algorithms and filesystems by alias while modules load
        // (libcrc32c wants crc32c): kiln-init answers as its modprobe until the switch.
        let init_path = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "/init".into());
        let old_helper = match kmod::install_modprobe_helper(&init_path) {
            Ok(old) => old,
            Err(e) => {
                say!("warning: {e}; the kernel cannot ask for modules");
                None
            }
        };
        let mut loader = load_modules(&plan.modules)?;
        sys::mkdir_p(NEWROOT)?;
        let disk = match &plan.root {
            RootSpec::Live {
                medium,
                image,
                roothash,
            } => {
                mount_live(&plan, &mut loader, medium, image, roothash.as_deref())?;
                None
            }
            _ => Some(mount_disk_root(&plan, &mut loader)?),
        };
        if let Some(disk) = &disk {
            mount_var(&plan, &mut loader, disk)?;
        }
        for t in &plan.tmpfs {
            let target = format!("{NEWROOT}{}", t.path);
            let opts = t.size.as_ref().map(|s| format!("mode=0755,size={s}"));
            sys::mount(
                "tmpfs",
                &target,
                Some("tmpfs"),
                0,
                Some(opts.as_deref().unwrap_or("mode=0755")),
            )?;
            debug!("tmpfs on {}", t.path);
        }
        for (i, dir) in plan.overlays.iter().enumerate() {
            overlay(&loader, i, dir)?;
        }
        kmod::restore_modprobe_helper(old_helper.as_deref());
        switch_root(&plan)
    }

    fn describe_root(r: &RootSpec) -> String {
        match r {
            RootSpec::Verity { roothash, label } => format!(
                "dm-verity, data {} hash {}{}",
                half(roothash, false),
                half(roothash, true),
                match label {
                    Some(l) => format!(" (or the pair named {l:?})"),
                    None => String::new(),
                }
            ),
            RootSpec::PartUuid(u) => format!("PARTUUID={u}"),
            RootSpec::Device(d) => d.clone(),
            RootSpec::DpsType => format!("first {} partition (no verity)", disk::ROOT_NAME),
            RootSpec::Live {
                medium,
                image,
                roothash,
            } => format!(
                "live {image} on {medium}{}",
                if roothash.is_some() {
                    " with dm-verity"
                } else {
                    ""
                }
            ),
        }
    }

    /// The first or last 16 bytes of the root hash: the data and hash partition UUIDs.
    fn half(roothash: &[u8], last: bool) -> Uuid {
        let mut u = [0u8; 16];
        let n = roothash.len();
        if last {
            u.copy_from_slice(&roothash[n - 16..]);
        } else {
            u.copy_from_slice(&roothash[..16]);
        }
        Uuid::from_bytes(u)
    }

    fn mount_api_filesystems() -> Result<(), String> {
        let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        for (src, dir, fs, flags, opts) in [
            ("proc", "/proc", "proc", nosuid, None),
            ("sysfs", "/sys", "sysfs", nosuid, None),
            (
                "devtmpfs",
                "/dev",
                "devtmpfs",
                libc::MS_NOSUID,
                Some("mode=0755"),
            ),
            (
                "tmpfs",
                "/run",
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                Some("mode=0755"),
            ),
        ] {
            sys::mkdir_p(dir)?;
            if let Err(e) = sys::mount(src, dir, Some(fs), flags, opts) {
                // A kernel with CONFIG_DEVTMPFS_MOUNT mounts /dev itself.
                if !(dir == "/dev" && std::path::Path::new("/dev/null").exists()) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Loads the configured modules (each with what it needs, as modprobe would). A module
    /// that fails is a warning — a driver for absent hardware may refuse to load — and is
    /// named again by any later failure it explains.
    fn load_modules(mods: &[String]) -> Result<Loader, String> {
        let t = Instant::now();
        let mut loader = match Loader::open() {
            Ok(l) => l,
            Err(e) if mods.is_empty() => {
                debug!("no modules: {e}");
                return Loader::open_empty();
            }
            Err(e) => return Err(e),
        };
        let mut loaded = 0;
        for m in mods {
            match loader.load(m, "kiln-init.conf") {
                Ok(l) => loaded += l.len(),
                Err(e) => say!("warning: {e}"),
            }
        }
        for l in loader.log.drain(..) {
            debug!("{l}");
        }
        say!(
            "loaded {loaded} modules for {} requested in {} ms",
            mods.len(),
            t.elapsed().as_millis()
        );
        Ok(loader)
    }

    /// Polls `find` until it yields or `timeout` runs out; then `why()` explains the failure.
    fn wait_for<T>(
        timeout: u32,
        what: &str,
        mut find: impl FnMut() -> Result<Option<T>, String>,
        why: impl Fn() -> String,
    ) -> Result<T, String> {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(u64::from(timeout));
        let mut announced = false;
        loop {
            if let Some(t) = find()? {
                debug!("found {what} after {} ms", start.elapsed().as_millis());
                return Ok(t);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{what} not found within {timeout} s; block devices:{}",
                    why()
                ));
            }
            if !announced && start.elapsed() > Duration::from_secs(2) {
                say!("waiting up to {timeout} s for {what}");
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The block devices there are, and the modules that failed to load (a missing disk is
    /// most often a storage driver that did not load).
    fn explain(loader: &Loader) -> String {
        let devs = disk::list();
        let parts = disk::gpt_partitions(&devs);
        let mut s = disk::describe(&devs, &parts);
        let failed = loader.failures();
        if !failed.is_empty() {
            s.push_str("\nmodules that failed to load:");
            for f in failed {
                s.push_str("\n  ");
                s.push_str(&f);
            }
        }
        s
    }

    /// Finds, sets up and mounts the root from a disk; returns the disk's name.
    fn mount_disk_root(plan: &Plan, loader: &mut Loader) -> Result<String, String> {
        let (disk, fs_dev): (String, String) = match &plan.root {
            RootSpec::Verity { roothash, label } => {
                let (data_u, hash_u) = (half(roothash, false), half(roothash, true));
                let (data, hash, by_label) = wait_for(
                    plan.timeout,
                    "the dm-verity data and hash partitions",
                    || {
                        let parts = disk::gpt_partitions(&disk::list());
                        let d = parts.iter().find(|p| p.entry.part_guid == data_u);
                        let h = parts.iter().find(|p| p.entry.part_guid == hash_u);
                        if let (Some(d), Some(h)) = (d, h) {
                            return Ok(Some((d.clone(), h.clone(), false)));
                        }
                        // A slot filled by systemd-sysupdate keeps its old partition UUIDs but
                        // carries the version in its name; verity still checks the contents.
                        Ok(label.as_deref().and_then(|l| {
                            disk::verity_pair_by_name(&parts, l).map(|(d, h)| (d, h, true))
                        }))
                    },
                    || explain(loader),
                )?;
                say!(
                    "root data {} hash {}{}",
                    data.dev.path(),
                    hash.dev.path(),
                    if by_label {
                        format!(" (found by name {:?})", data.entry.name)
                    } else {
                        String::new()
                    }
                );
                let head = disk::read_head(&hash.dev, 4096)?;
                let sb = probe::parse_verity_superblock(&head)
                    .map_err(|e| format!("{}: {e}", hash.dev.path()))?;
                if (data.dev.sectors * 512) < sb.data_blocks * u64::from(sb.data_block_size) {
                    return Err(format!(
                        "{}: {} bytes, smaller than the {} blocks of {} bytes its verity superblock covers",
                        data.dev.path(),
                        data.dev.sectors * 512,
                        sb.data_blocks,
                        sb.data_block_size
                    ));
                }
                let (sectors, params) =
                    probe::verity_table(&sb, &data.dev.devno(), &hash.dev.devno(), roothash);
                debug!("verity table: 0 {sectors} verity {params}");
                let (major, minor) = dm::create_readonly("root", sectors, "verity", &params)?;
                sys::mkdir_p("/dev/mapper")?;
                sys::mknod_block("/dev/mapper/root", major, minor)?;
                say!(
                    "dm-verity active: /dev/mapper/root ({major}:{minor}), {} data blocks",
                    sb.data_blocks
                );
                (data.disk, "/dev/mapper/root".to_string())
            }
            RootSpec::PartUuid(u) => {
                let f = wait_for(
                    plan.timeout,
                    &format!("partition {u}"),
                    || {
                        Ok(disk::gpt_partitions(&disk::list())
                            .into_iter()
                            .find(|p| p.entry.part_guid == *u))
                    },
                    || explain(loader),
                )?;
                (f.disk, f.dev.path())
            }
            RootSpec::DpsType => {
                let f = wait_for(
                    plan.timeout,
                    &format!("a {} partition", disk::ROOT_NAME),
                    || {
                        Ok(disk::gpt_partitions(&disk::list())
                            .into_iter()
                            .find(|p| p.entry.type_guid == disk::ROOT && p.entry.name != "_empty"))
                    },
                    || explain(loader),
                )?;
                (f.disk, f.dev.path())
            }
            RootSpec::Device(d) => {
                let name = d.trim_start_matches("/dev/").to_string();
                let dev = wait_for(
                    plan.timeout,
                    d,
                    || Ok(disk::list().into_iter().find(|b| b.name == name)),
                    || explain(loader),
                )?;
                let disk = dev.parent.map(|p| p.0).unwrap_or(dev.name);
                (disk, d.clone())
            }
            RootSpec::Live { .. } => unreachable!("handled by mount_live"),
        };
        mount_detected(loader, &fs_dev, NEWROOT, plan.rootfstype.as_deref(), true)?;
        say!("root mounted read-only from {fs_dev}");
        Ok(disk)
    }

    /// Mounts `source` on `target`, the filesystem type given or recognised by its magic.
    fn mount_detected(
        loader: &mut Loader,
        source: &str,
        target: &str,
        hint: Option<&str>,
        ro: bool,
    ) -> Result<(), String> {
        let f = std::fs::File::open(source).map_err(|e| format!("open {source}: {e}"))?;
        let mut head = vec![0u8; probe::PROBE_LEN];
        let n = {
            use std::os::unix::fs::FileExt;
            let mut got = 0;
            while got < head.len() {
                match f.read_at(&mut head[got..], got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) => return Err(format!("read {source}: {e} (verity or I/O error on the filesystem's first blocks?)")),
                }
            }
            got
        };
        head.truncate(n);
        let fs = probe::detect_fs(&head);
        let name = match (hint, fs) {
            (Some(h), _) => h.to_string(),
            (None, Some(t)) => t.mount_name().to_string(),
            (None, None) => {
                return Err(format!(
                    "{source}: no ext4, EROFS, squashfs, ISO 9660 or FAT filesystem recognised"
                ))
            }
        };
        let flags = if ro { libc::MS_RDONLY } else { 0 };
        loader.mark_log();
        sys::mount(source, target, Some(&name), flags, None)
            .map_err(|e| explain_mount(loader, &name, e))
    }

    /// Adds the real cause to a failed mount: the filesystem the kernel does not have and why
    /// its module is not loaded, and what the kernel logged meanwhile (`EXT4-fs: Cannot load
    /// crc32c driver`).
    fn explain_mount(loader: &mut Loader, fstype: &str, mut e: String) -> String {
        let known = std::fs::read_to_string("/proc/filesystems")
            .map(|t| {
                t.lines()
                    .any(|l| l.split_whitespace().last() == Some(fstype))
            })
            .unwrap_or(true);
        if !known {
            e.push_str(&format!(
                "; the kernel has no {fstype} filesystem: {}",
                loader.why_not(fstype)
            ));
        }
        let log = loader.log_since_mark();
        if !log.is_empty() {
            e.push_str(&format!("; kernel log: {}", log.join(" | ")));
        }
        e
    }

    fn mount_var(plan: &Plan, loader: &mut Loader, disk: &str) -> Result<(), String> {
        if plan.var == VarMode::Off {
            return Ok(());
        }
        let parts = disk::gpt_partitions(&disk::list());
        let var = parts
            .iter()
            .find(|p| p.disk == disk && p.entry.type_guid == disk::VAR);
        let Some(var) = var else {
            if plan.var == VarMode::Required {
                return Err(format!(
                    "no /var partition (DPS type {}) on {disk}",
                    disk::VAR
                ));
            }
            debug!("no /var partition on {disk}");
            return Ok(());
        };
        let target = format!("{NEWROOT}/var");
        if !std::path::Path::new(&target).is_dir() {
            return Err(format!(
                "the root has no /var directory to mount {} on",
                var.dev.path()
            ));
        }
        mount_detected(loader, &var.dev.path(), &target, None, false)?;
        say!("/var mounted read-write from {}", var.dev.path());
        Ok(())
    }

    /// A tmpfs-backed overlay over directory `dir` of the new root.
    fn overlay(loader: &Loader, i: usize, dir: &str) -> Result<(), String> {
        let base = "/run/kiln/overlay";
        if i == 0 {
            sys::mkdir_p(base)?;
            sys::mount("tmpfs", base, Some("tmpfs"), 0, Some("mode=0755"))?;
        }
        let upper = format!("{base}/{i}/upper");
        let work = format!("{base}/{i}/work");
        sys::mkdir_p(&upper)?;
        sys::mkdir_p(&work)?;
        let target = format!("{NEWROOT}{dir}");
        if !std::path::Path::new(&target).is_dir() {
            return Err(format!("overlay {dir}: the root has no such directory"));
        }
        let opts = format!("lowerdir={target},upperdir={upper},workdir={work}");
        sys::mount("overlay", &target, Some("overlay"), 0, Some(&opts))
            .map_err(|e| overlay_error(loader, e))?;
        say!("tmpfs overlay on {dir}");
        Ok(())
    }

    fn overlay_error(loader: &Loader, e: String) -> String {
        let known = std::fs::read_to_string("/proc/filesystems")
            .map(|t| t.lines().any(|l| l.ends_with("\toverlay")))
            .unwrap_or(true);
        if known {
            e
        } else {
            format!(
                "{e}; the kernel has no overlay filesystem: {}",
                loader.why_not("overlay")
            )
        }
    }

    /// Live mode: the medium by label, the image on it through a loop device (and dm-verity
    /// when `roothash=` is given: hash tree in `IMAGE.verity`), a tmpfs overlay on top.
    fn mount_live(
        plan: &Plan,
        loader: &mut Loader,
        medium: &str,
        image: &str,
        roothash: Option<&[u8]>,
    ) -> Result<(), String> {
        let dev = wait_for(
            plan.timeout,
            &format!("the live medium {medium:?}"),
            || {
                for d in disk::list() {
                    if d.name.starts_with("loop")
                        || d.name.starts_with("dm-")
                        || d.name.starts_with("ram")
                    {
                        continue;
                    }
                    if let Ok(head) = disk::read_head(&d, probe::PROBE_LEN) {
                        if probe::medium_matches(&head, medium) {
                            return Ok(Some(d));
                        }
                    }
                }
                Ok(None)
            },
            || explain(loader),
        )?;
        let mnt = config::LIVE_MEDIUM_MOUNT;
        sys::mkdir_p(mnt)?;
        mount_detected(loader, &dev.path(), mnt, None, true)?;
        say!("live medium {medium:?} mounted from {}", dev.path());
        let img = format!("{mnt}{image}");
        let (loop_path, loop_dev) = loopdev::attach_readonly(&img).map_err(|e| {
            if std::path::Path::new("/dev/loop-control").exists() {
                e
            } else {
                format!("{e}; {}", loader.why_not("loop"))
            }
        })?;
        let mut source = loop_path.clone();
        if let Some(roothash) = roothash {
            let hash_file = format!("{img}.verity");
            let (hash_path, hash_dev) = loopdev::attach_readonly(&hash_file)?;
            let head = {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(&hash_path)
                    .map_err(|e| format!("open {hash_path}: {e}"))?;
                let mut b = vec![0u8; 512];
                f.read_exact_at(&mut b, 0)
                    .map_err(|e| format!("read {hash_path} ({hash_file}): {e}"))?;
                b
            };
            let sb =
                probe::parse_verity_superblock(&head).map_err(|e| format!("{hash_file}: {e}"))?;
            let (sectors, params) = probe::verity_table(
                &sb,
                &format!("{}:{}", loop_dev.0, loop_dev.1),
                &format!("{}:{}", hash_dev.0, hash_dev.1),
                roothash,
            );
            let (ma, mi) = dm::create_readonly("root", sectors, "verity", &params)?;
            sys::mkdir_p("/dev/mapper")?;
            sys::mknod_block("/dev/mapper/root", ma, mi)?;
            say!("dm-verity active over {image}");
            source = "/dev/mapper/root".into();
        }
        let lower = "/run/kiln/lower";
        sys::mkdir_p(lower)?;
        mount_detected(loader, &source, lower, plan.rootfstype.as_deref(), true)?;
        let rw = "/run/kiln/live-rw";
        sys::mkdir_p(rw)?;
        sys::mount("tmpfs", rw, Some("tmpfs"), 0, Some("mode=0755"))?;
        sys::mkdir_p(&format!("{rw}/upper"))?;
        sys::mkdir_p(&format!("{rw}/work"))?;
        let opts = format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work");
        sys::mount("overlay", NEWROOT, Some("overlay"), 0, Some(&opts))
            .map_err(|e| overlay_error(loader, e))?;
        say!("live root: {image} with a RAM overlay");
        Ok(())
    }

    fn switch_root(plan: &Plan) -> Result<std::convert::Infallible, String> {
        let init_path = format!("{NEWROOT}{}", plan.init);
        if std::fs::symlink_metadata(&init_path).is_err() {
            return Err(format!("the root has no {} to run (init=)", plan.init));
        }
        for dir in ["/dev", "/proc", "/sys", "/run"] {
            let target = format!("{NEWROOT}{dir}");
            if std::path::Path::new(&target).is_dir() {
                sys::move_mount(dir, &target)?;
            } else {
                say!("warning: the root has no {dir} directory; unmounting it");
                let _ = sys::umount_lazy(dir);
            }
        }
        std::env::set_current_dir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
        sys::wipe_initramfs();
        sys::move_mount(".", "/")?;
        sys::chroot(".")?;
        std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
        say!("switching root to {}", plan.init);
        // Arguments the kernel passed to init (words it did not recognise) go to the next init.
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        Err(sys::exec(&plan.init, &args))
    }
}
