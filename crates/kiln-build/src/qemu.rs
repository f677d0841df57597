//! Booting images in QEMU to prove they work: `qemu-system-x86_64 -machine q35` or
//! `qemu-system-aarch64 -machine virt` under TCG (KVM guests hang on these machines), UEFI
//! firmware from OVMF or AAVMF (code read-only, a private copy of the variables), the serial
//! console streamed to stdout while it is scanned for a marker.
//! `-no-reboot` makes one call one boot: a guest that reboots ends the run, so A/B tests drive
//! several boots and look at the disk in between.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_formats::arch::Arch;
use regex::Regex;

/// How the image is attached to the guest: every storage path a generic kernel boots from.
/// The comments name the guest modules each needs (all in kiln's initrd when the kernel has
/// them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Attach {
    /// A virtio block device (virtio_pci, virtio_blk).
    #[default]
    Disk,
    /// A disk on virtio-scsi (virtio_scsi, sd_mod).
    Scsi,
    /// An NVMe disk (nvme).
    Nvme,
    /// A SATA disk on q35's AHCI controller (ahci, sd_mod).
    Ahci,
    /// A USB stick on an xHCI controller (xhci_pci, usb_storage, sd_mod).
    Usb,
    /// A USB stick on an EHCI (USB 2) controller (ehci_pci, usb_storage, sd_mod).
    UsbEhci,
    /// A USB Attached SCSI disk on xHCI (xhci_pci, uas, sd_mod). OVMF has no UAS driver, so
    /// this needs a direct kernel boot.
    Uas,
    /// A CD on virtio-scsi (virtio_scsi, sr_mod, cdrom).
    Cdrom,
    /// A CD on q35's AHCI controller, as on real PCs (ahci, sr_mod, cdrom).
    CdromAhci,
}

impl Attach {
    /// Every kind, in the order `--as` lists them.
    pub const ALL: &[Attach] = &[
        Attach::Disk,
        Attach::Scsi,
        Attach::Nvme,
        Attach::Ahci,
        Attach::Usb,
        Attach::UsbEhci,
        Attach::Uas,
        Attach::Cdrom,
        Attach::CdromAhci,
    ];

    /// The name `--as` takes.
    pub fn name(self) -> &'static str {
        match self {
            Attach::Disk => "disk",
            Attach::Scsi => "scsi",
            Attach::Nvme => "nvme",
            Attach::Ahci => "ahci",
            Attach::Usb => "usb",
            Attach::UsbEhci => "usb-ehci",
            Attach::Uas => "uas",
            Attach::Cdrom => "cdrom",
            Attach::CdromAhci => "cdrom-ahci",
        }
    }
}

impl std::fmt::Display for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Attach {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Attach::ALL
            .iter()
            .copied()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Attach::ALL.iter().map(|a| a.name()).collect();
                format!("{s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// Firmware to boot with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// UEFI firmware: a directory holding OVMF_CODE*.fd and OVMF_VARS*.fd (AAVMF_CODE.fd and
    /// AAVMF_VARS.fd for arm64), or the code file itself (the variables file is found beside
    /// it). `None`: /usr/share/OVMF, or /usr/share/AAVMF for arm64 (Debian's ovmf and
    /// qemu-efi-aarch64).
    Ovmf(Option<PathBuf>),
    /// QEMU's default BIOS (for direct kernel boot, which needs no UEFI).
    Bios,
}

/// The machine QEMU emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Machine {
    /// A PC (`-machine q35`) for x86-64, QEMU's `-machine virt` (a Cortex-A57, PL011 serial
    /// console `ttyAMA0`) for arm64: firmware or a direct kernel, PCI storage of any [`Attach`]
    /// kind.
    #[default]
    Q35,
    /// QEMU's Firecracker-like `-machine microvm`: no PCI, no firmware disk, a direct kernel
    /// only, the image as a virtio-mmio block device (`/dev/vda`) and the console on the ISA
    /// serial port (ttyS0). The devices are announced through ACPI (QEMU's default for this
    /// machine), which a kernel's virtio_mmio driver reads without
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
    Microvm,
}

/// A kernel booted directly (`-kernel -initrd -append`), without a boot loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectKernel {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initrd (a kernel with its storage and filesystem drivers built in needs none).
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: String,
}

/// Patterns that end a boot as failed by default: a kernel panic, and kiln-init giving up.
pub const DEFAULT_FAIL_PATTERNS: &[&str] =
    &[r"Kernel panic - not syncing", r"kiln-init: boot failed"];

/// What Linux prints as it powers the machine off.
pub const POWER_DOWN: &str = "reboot: Power down";

/// One boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// The disk or ISO image (none for a direct kernel boot without disks).
    pub image: Option<PathBuf>,
    /// How to attach `image`.
    pub attach: Attach,
    /// Firmware.
    pub firmware: Firmware,
    /// Direct kernel boot instead of booting from the image.
    pub direct: Option<DirectKernel>,
    /// The machine type.
    pub machine: Machine,
    /// Regular expression that ends the boot successfully when a console line matches. Without
    /// one the boot succeeds when the guest powers off (not when it reboots).
    pub expect: Option<String>,
    /// Regular expressions that end the boot as failed.
    pub fail: Vec<String>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs (multi-threaded TCG runs them on as many host threads).
    pub cpus: u32,
    /// Write guest changes to the image (no `snapshot=on`).
    pub keep: bool,
    /// Copy the console to this process's stdout as it arrives.
    pub echo: bool,
    /// The QEMU executable (default: `$KILN_QEMU` or `qemu-system-x86_64` from PATH for
    /// x86-64, `$KILN_QEMU_ARM64` or `qemu-system-aarch64` for arm64).
    pub qemu: Option<PathBuf>,
    /// The guest's architecture.
    pub arch: Arch,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            image: None,
            attach: Attach::Disk,
            firmware: Firmware::Ovmf(None),
            direct: None,
            machine: Machine::Q35,
            expect: None,
            fail: DEFAULT_FAIL_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            timeout: Duration::from_secs(120),
            memory_mib: 1024,
            cpus: 1,
            keep: false,
            echo: true,
            qemu: None,
            arch: Arch::host().unwrap_or(Arch::X86_64),
        }
    }
}

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The expected pattern appeared (or, without one, the guest powered off).
    Matched,
    /// A failure pattern appeared: the matching line.
    Failed(String),
    /// The timeout ran out.
    Timeout,
    /// QEMU exited (guest reboot or power-off, or a QEMU error) before a match.
    Exited(Option<i32>),
}

/// The result of [`boot`].
#[derive(Clone, Debug)]
pub struct BootOutcome {
    /// How it ended.
    pub ending: Ending,
    /// From QEMU's start to the end.
    pub elapsed: Duration,
    /// The whole console output.
    pub console: String,
    /// QEMU's own diagnostics (stderr).
    pub qemu_stderr: String,
}

impl BootOutcome {
    /// True when the marker was seen.
    pub fn success(&self) -> bool {
        self.ending == Ending::Matched
    }

    /// A one-line description.
    pub fn summary(&self) -> String {
        let t = self.elapsed.as_secs_f64();
        match &self.ending {
            Ending::Matched => format!("matched after {t:.1} s"),
            Ending::Failed(line) => format!("failed after {t:.1} s: {line}"),
            Ending::Timeout => format!("no match within {t:.0} s"),
            Ending::Exited(code) => format!(
                "QEMU exited after {t:.1} s (status {}) before a match{}",
                code.map_or("signal".into(), |c| c.to_string()),
                if self.qemu_stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.qemu_stderr.trim())
                }
            ),
        }
    }
}

/// The UEFI firmware code and variables files for `spec` and `arch`.
pub fn ovmf_files(spec: Option<&Path>, arch: Arch) -> Result<(PathBuf, PathBuf)> {
    let (dir, pairs, package): (&str, &[(&str, &str)], &str) = match arch {
        Arch::X86_64 => (
            "/usr/share/OVMF",
            &[
                ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
                ("OVMF_CODE.fd", "OVMF_VARS.fd"),
                ("OVMF_CODE.4m.fd", "OVMF_VARS.4m.fd"),
            ],
            "ovmf",
        ),
        Arch::Arm64 => (
            "/usr/share/AAVMF",
            &[("AAVMF_CODE.fd", "AAVMF_VARS.fd")],
            "qemu-efi-aarch64",
        ),
    };
    let spec = spec.unwrap_or(Path::new(dir));
    if spec.is_dir() {
        for (c, v) in pairs {
            let (c, v) = (spec.join(c), spec.join(v));
            if c.is_file() && v.is_file() {
                return Ok((c, v));
            }
        }
        bail!(
            "{}: no {} with a matching {} for {arch} (install the {package} package, or pass --ovmf)",
            spec.display(),
            pairs[0].0,
            pairs[0].1,
        );
    }
    if !spec.is_file() {
        bail!(
            "{}: no such OVMF directory or firmware file",
            spec.display()
        );
    }
    let name = spec
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let vars_name = name.replacen("CODE", "VARS", 1);
    let vars = spec.with_file_name(&vars_name);
    if vars_name == name || !vars.is_file() {
        bail!(
            "{}: cannot find the matching variables file (looked for {})",
            spec.display(),
            vars.display()
        );
    }
    Ok((spec.to_path_buf(), vars))
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|c| c.is_file())
    })
}

enum Event {
    Data(Vec<u8>),
    Eof,
}

/// Boots once and reports how it went. Errors are for things that prevent booting at all
/// (no QEMU, no firmware, a bad pattern); a boot that fails is an `Ok` with its [`Ending`].
pub fn boot(opts: &BootOptions) -> Result<BootOutcome> {
    let watch = Watch::new(opts)?;
    let qemu = qemu_binary(opts)?;
    check_options(opts)?;
    let scratch =
        tempfile::tempdir().context("creating a temporary directory for OVMF variables")?;
    let mut cmd = Command::new(&qemu);
    machine_args(&mut cmd, opts);
    if let Firmware::Ovmf(spec) = &opts.firmware {
        let (code, vars) = ovmf_files(spec.as_deref(), opts.arch)?;
        let private = scratch.path().join("OVMF_VARS.fd");
        std::fs::copy(&vars, &private)
            .with_context(|| format!("copying {} to {}", vars.display(), private.display()))?;
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            qemu_path(&code)?
        ));
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            qemu_path(&private)?
        ));
    }
    if let Some(d) = &opts.direct {
        direct_kernel_args(&mut cmd, d, opts.machine)?;
    }
    if let Some(img) = &opts.image {
        drive_args(&mut cmd, img, opts)?;
    } else if opts.direct.is_none() {
        bail!("nothing to boot: give an image or a direct kernel");
    }
    run(cmd, &qemu, opts, &watch)
}

/// The QEMU executable for the guest's architecture: `opts.qemu`, `$KILN_QEMU` (x86-64) or
/// `$KILN_QEMU_ARM64`, else `qemu-system-x86_64` or `qemu-system-aarch64` from PATH.
fn qemu_binary(opts: &BootOptions) -> Result<PathBuf> {
    let (var, exe, package) = match opts.arch {
        Arch::X86_64 => ("KILN_QEMU", "qemu-system-x86_64", "qemu-system-x86"),
        Arch::Arm64 => ("KILN_QEMU_ARM64", "qemu-system-aarch64", "qemu-system-arm"),
    };
    Ok(match &opts.qemu {
        Some(q) => q.clone(),
        None => match std::env::var_os(var) {
            Some(q) => PathBuf::from(q),
            None => find_in_path(exe).with_context(|| {
                format!("{exe} not found in PATH (install {package}, or set {var})")
            })?,
        },
    })
}

/// Refuses, before QEMU starts, what cannot boot: an image the firmware would not find a
/// loader on, and machine, firmware and disk combinations that do not exist.
fn check_options(opts: &BootOptions) -> Result<()> {
    if let (Firmware::Ovmf(_), None, Some(img)) = (&opts.firmware, &opts.direct, &opts.image) {
        if !matches!(opts.attach, Attach::Cdrom | Attach::CdromAhci) {
            firmware_can_boot(img, opts.arch)?;
        }
    }
    if opts.arch == Arch::Arm64 {
        if opts.machine == Machine::Microvm {
            bail!("QEMU's microvm machine is x86-64 only: boot arm64 kernels on the virt machine");
        }
        if opts.firmware == Firmware::Bios && opts.direct.is_none() {
            bail!("arm64 has no BIOS: boot with UEFI firmware (AAVMF) or a direct kernel");
        }
    }
    if opts.machine == Machine::Microvm {
        if opts.direct.is_none() {
            bail!("a microvm boots a kernel directly: give --kernel");
        }
        if opts.firmware != Firmware::Bios {
            bail!("a microvm has no UEFI firmware: boot its kernel directly");
        }
        if opts.attach != Attach::Disk {
            bail!("a microvm has one kind of disk, virtio-mmio (--as disk)");
        }
    }
    Ok(())
}

/// The machine, accelerator, serial console, memory and CPUs.
fn machine_args(cmd: &mut Command, opts: &BootOptions) {
    cmd.args([
        "-machine",
        match (opts.arch, opts.machine) {
            (Arch::Arm64, _) => "virt",
            (_, Machine::Q35) => "q35",
            (_, Machine::Microvm) => "microvm",
        },
    ]);
    if opts.arch == Arch::Arm64 {
        cmd.args(["-cpu", "cortex-a57"]);
    }
    cmd.args(["-accel", "tcg", "-nodefaults", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-m")
        .arg(opts.memory_mib.to_string())
        .arg("-smp")
        .arg(opts.cpus.max(1).to_string());
}

/// `-kernel -initrd -append` for a direct kernel boot.
fn direct_kernel_args(cmd: &mut Command, d: &DirectKernel, machine: Machine) -> Result<()> {
    for p in std::iter::once(&d.kernel).chain(d.initrd.as_ref()) {
        if !p.is_file() {
            bail!("{}: no such file", p.display());
        }
    }
    cmd.arg("-kernel").arg(&d.kernel);
    if let Some(initrd) = &d.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    let mut append = d.append.clone();
    // microvm has neither HPET nor an ACPI PM timer, so under TCG Linux cannot calibrate the
    // TSC and hangs after "Marking TSC unstable"; a stated TSC frequency lets it go on (TCG's
    // TSC runs at no real frequency anyway).
    if machine == Machine::Microvm && !append.contains("tsc_early_khz=") {
        append.push_str(" tsc_early_khz=2000000");
    }
    cmd.arg("-append").arg(&append);
    Ok(())
}

/// The image `img` attached as `opts.attach`.
fn drive_args(cmd: &mut Command, img: &Path, opts: &BootOptions) -> Result<()> {
    if !img.is_file() {
        bail!("{}: no such image file", img.display());
    }
    let file = qemu_path(img)?;
    let snap = if opts.keep { "" } else { ",snapshot=on" };
    // qcow2, VHD and VMDK images by their magic; anything else is raw.
    let fmt = crate::vmdisk::VmFormat::detect(img)?
        .map(|f| f.qemu_format())
        .unwrap_or("raw");
    let none_drive = format!("file={file},format={fmt},if=none,id=d0{snap}");
    // q35 has an AHCI controller on board (`ide.0`); virt has none, so one is added.
    let ide = match opts.arch {
        Arch::X86_64 => "ide.0",
        Arch::Arm64 => {
            if matches!(opts.attach, Attach::Ahci | Attach::CdromAhci) {
                cmd.args(["-device", "ich9-ahci,id=ahci"]);
            }
            "ahci.0"
        }
    };
    match opts.attach {
        Attach::Disk if opts.machine == Machine::Microvm => {
            cmd.args(["-drive", &none_drive])
                .args(["-device", "virtio-blk-device,drive=d0"]);
        }
        Attach::Disk => {
            cmd.arg("-drive")
                .arg(format!("file={file},format={fmt},if=virtio{snap}"));
        }
        Attach::Scsi => {
            cmd.args(["-device", "virtio-scsi-pci,id=scsi"])
                .args(["-drive", &none_drive])
                .args(["-device", "scsi-hd,bus=scsi.0,drive=d0,bootindex=0"]);
        }
        Attach::Nvme => {
            cmd.args(["-drive", &none_drive])
                .args(["-device", "nvme,serial=kiln0001,drive=d0,bootindex=0"]);
        }
        Attach::Ahci => {
            cmd.args(["-drive", &none_drive])
                .args(["-device", &format!("ide-hd,bus={ide},drive=d0,bootindex=0")]);
        }
        Attach::Usb => {
            cmd.args(["-device", "qemu-xhci,id=xhci"])
                .args(["-drive", &none_drive])
                .args([
                    "-device",
                    "usb-storage,bus=xhci.0,drive=d0,removable=on,bootindex=0",
                ]);
        }
        Attach::UsbEhci => {
            cmd.args(["-device", "usb-ehci,id=ehci"])
                .args(["-drive", &none_drive])
                .args([
                    "-device",
                    "usb-storage,bus=ehci.0,drive=d0,removable=on,bootindex=0",
                ]);
        }
        Attach::Uas => {
            cmd.args(["-device", "qemu-xhci,id=xhci"])
                .args(["-device", "usb-uas,id=uas,bus=xhci.0"])
                .args(["-drive", &none_drive])
                .args(["-device", "scsi-hd,bus=uas.0,scsi-id=0,lun=0,drive=d0"]);
        }
        Attach::Cdrom => {
            cmd.args(["-device", "virtio-scsi-pci,id=scsi"])
                .arg("-drive")
                .arg(format!(
                    "file={file},format=raw,if=none,id=cd,media=cdrom,readonly=on"
                ))
                .args(["-device", "scsi-cd,bus=scsi.0,drive=cd"]);
        }
        Attach::CdromAhci => {
            cmd.arg("-drive")
                .arg(format!(
                    "file={file},format=raw,if=none,id=cd,media=cdrom,readonly=on"
                ))
                .args(["-device", &format!("ide-cd,bus={ide},drive=cd")]);
        }
    }
    Ok(())
}

/// What ends a boot: the expected pattern, or a failure pattern.
struct Watch {
    expect: Option<Regex>,
    fails: Vec<Regex>,
}

impl Watch {
    fn new(opts: &BootOptions) -> Result<Self> {
        let expect = opts
            .expect
            .as_deref()
            .map(Regex::new)
            .transpose()
            .context("--expect is not a valid regular expression")?;
        let fails = opts
            .fail
            .iter()
            .map(|f| Regex::new(f).with_context(|| format!("failure pattern {f:?}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { expect, fails })
    }

    /// How a complete console line ends the boot, if it does.
    fn line(&self, line: &str) -> Option<Ending> {
        if self.fails.iter().any(|f| f.is_match(line)) {
            return Some(Ending::Failed(line.trim().to_string()));
        }
        if self.expect.as_ref().is_some_and(|e| e.is_match(line)) {
            return Some(Ending::Matched);
        }
        None
    }

    /// Checks the lines completed since `line_start` (moving it past them), then the
    /// partial line after them against the expected pattern (a prompt has no newline).
    fn scan(&self, console: &[u8], line_start: &mut usize) -> Option<Ending> {
        while let Some(nl) = console[*line_start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&console[*line_start..*line_start + nl]);
            *line_start += nl + 1;
            if let Some(e) = self.line(&line.replace('\r', "")) {
                return Some(e);
            }
        }
        let partial = String::from_utf8_lossy(&console[*line_start..]);
        self.expect
            .as_ref()
            .is_some_and(|e| e.is_match(&partial))
            .then_some(Ending::Matched)
    }
}

/// Starts QEMU and watches its console until the boot ends.
fn run(mut cmd: Command, qemu: &Path, opts: &BootOptions, watch: &Watch) -> Result<BootOutcome> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let mut stdout = child.stdout.take().context("QEMU stdout")?;
    let mut stderr = child.stderr.take().context("QEMU stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Event::Eof);
                    return;
                }
                Ok(n) => {
                    if tx.send(Event::Data(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let deadline = start + opts.timeout;
    let mut console: Vec<u8> = Vec::new();
    let mut line_start = 0usize;
    let mut out = std::io::stdout();
    let ending = loop {
        let now = Instant::now();
        if now >= deadline {
            break Ending::Timeout;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(Event::Data(d)) => {
                if opts.echo {
                    let _ = out.write_all(&d);
                    let _ = out.flush();
                }
                console.extend_from_slice(&d);
                // A partial line is checked again once complete.
                if let Some(e) = watch.scan(&console, &mut line_start) {
                    break e;
                }
            }
            Ok(Event::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                let code = status.and_then(|s| s.code());
                // With -no-reboot a guest reset also ends QEMU with status 0; only a power-off
                // (the kernel's last words are "reboot: Power down") counts as success.
                if watch.expect.is_none()
                    && code == Some(0)
                    && String::from_utf8_lossy(&console).contains(POWER_DOWN)
                {
                    break Ending::Matched;
                }
                break Ending::Exited(code);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break Ending::Timeout,
        }
    };
    let elapsed = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let qemu_stderr = err_thread.join().unwrap_or_default();
    if opts.echo && !console.ends_with(b"\n") {
        let _ = writeln!(out);
    }
    Ok(BootOutcome {
        ending,
        elapsed,
        console: String::from_utf8_lossy(&console).into_owned(),
        qemu_stderr,
    })
}

/// QEMU's -drive syntax uses commas as separators: refuse paths that contain one.
fn qemu_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{}: path is not UTF-8", p.display()))?;
    if s.contains(',') {
        bail!("{s}: QEMU cannot take a path containing a comma");
    }
    Ok(s.to_string())
}

/// The architectures whose removable-media boot loader (`EFI/BOOT/BOOTX64.EFI`,
/// `BOOTAA64.EFI`) the EFI system partition of the disk `image` holds; `None` when the image
/// has no GPT or no ESP with a readable FAT.
pub fn esp_arches(image: &Path) -> Option<Vec<Arch>> {
    let f = std::fs::File::open(image).ok()?;
    let Ok(Esp::Fat(_, fat)) = esp_fat(&f) else {
        return None;
    };
    Some(
        Arch::ALL
            .iter()
            .copied()
            .filter(|a| {
                matches!(fat.lookup(&format!("/{}", a.efi_removable_path())), Ok(Some(e)) if !e.is_dir())
            })
            .collect(),
    )
}

/// Reads `buf.len()` bytes at an offset of a partition.
type PartRead = Box<dyn Fn(u64, &mut [u8]) -> std::io::Result<()>>;
type EspFat = kiln_formats::fat::FatReader<PartRead>;

/// What a disk's GPT says about its EFI system partition.
enum Esp {
    /// No (readable) GPT: an MBR disk or a hybrid ISO, left to the firmware.
    NoGpt,
    /// A GPT without an ESP.
    Missing,
    /// The first ESP's FAT, with its partition index.
    Fat(usize, EspFat),
}

/// The EFI system partition of the disk in `f`; an error when its FAT cannot be read.
fn esp_fat(f: &std::fs::File) -> Result<Esp> {
    use kiln_formats::fat::FatReader;
    use kiln_formats::gpt::{Gpt, TYPE_ESP};
    use std::os::unix::fs::FileExt;
    let Ok(table) = Gpt::read(f) else {
        return Ok(Esp::NoGpt);
    };
    let Some((i, esp)) = table
        .partitions
        .iter()
        .enumerate()
        .find(|(_, p)| p.type_guid == TYPE_ESP)
    else {
        return Ok(Esp::Missing);
    };
    let base = esp.offset();
    let f = f.try_clone()?;
    let read: PartRead = Box::new(move |off: u64, buf: &mut [u8]| f.read_exact_at(buf, base + off));
    let fat = FatReader::open(read).with_context(|| {
        format!(
            "the EFI system partition (partition {}) holds no readable FAT filesystem",
            i + 1
        )
    })?;
    Ok(Esp::Fat(i, fat))
}

/// Fails at once, saying why, when `arch`'s firmware could not boot the disk `image`: it has a
/// GPT but no EFI system partition, or its ESP has no `EFI/BOOT/BOOTX64.EFI` (`BOOTAA64.EFI`
/// for arm64: the removable-media path the firmware boots when no boot entry is stored).
/// Without this, QEMU would sit in the firmware's boot manager until the timeout. Images
/// without a GPT (an MBR disk, a hybrid ISO) are left to the firmware.
pub fn firmware_can_boot(image: &Path, arch: Arch) -> Result<()> {
    let f = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let (i, fat) = match esp_fat(&f).with_context(|| image.display().to_string())? {
        Esp::Fat(i, fat) => (i, fat),
        Esp::NoGpt => return Ok(()),
        Esp::Missing => bail!(
            "{}: no EFI system partition, so the firmware has nothing to boot (build it with \
             [boot] in its spec, or boot a kernel directly with --kernel and --initrd)",
            image.display()
        ),
    };
    let path = arch.efi_removable_path();
    match fat.lookup(&format!("/{path}")) {
        Ok(Some(e)) if !e.is_dir() => Ok(()),
        _ => {
            let other: Vec<&str> = Arch::ALL
                .iter()
                .filter(|a| **a != arch)
                .filter(|a| matches!(fat.lookup(&format!("/{}", a.efi_removable_path())), Ok(Some(e)) if !e.is_dir()))
                .map(|a| a.name())
                .collect();
            if other.is_empty() {
                bail!(
                    "{}: the EFI system partition (partition {}) has no {path}, so the \
                     firmware has no boot entry (build it with [boot] in its spec)",
                    image.display(),
                    i + 1
                )
            }
            bail!(
                "{}: the EFI system partition (partition {}) has no {path} but boots {}: boot it with --arch {}",
                image.display(),
                i + 1,
                other.join(", "),
                other[0]
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ovmf_lookup() {
        let d = tempfile::tempdir().unwrap();
        assert!(ovmf_files(Some(d.path()), Arch::X86_64).is_err());
        std::fs::write(d.path().join("OVMF_CODE.fd"), b"c").unwrap();
        std::fs::write(d.path().join("OVMF_VARS.fd"), b"v").unwrap();
        let (c, v) = ovmf_files(Some(d.path()), Arch::X86_64).unwrap();
        assert!(c.ends_with("OVMF_CODE.fd") && v.ends_with("OVMF_VARS.fd"));
        let (c2, v2) = ovmf_files(Some(&c), Arch::X86_64).unwrap();
        assert_eq!((c2, v2), (c, v));
        let e = ovmf_files(Some(&d.path().join("nope")), Arch::X86_64).unwrap_err();
        assert!(e.to_string().contains("nope"));
        assert_eq!("cdrom".parse::<Attach>(), Ok(Attach::Cdrom));
        for a in Attach::ALL {
            assert_eq!(a.name().parse::<Attach>(), Ok(*a));
        }
        let e = "floppy".parse::<Attach>().unwrap_err();
        assert!(e.contains("usb-ehci") && e.contains("nvme"), "{e}");
    }

    #[test]
    fn bad_inputs_fail_before_starting_qemu() {
        let o = BootOptions {
            expect: Some("(".into()),
            image: Some("/nonexistent".into()),
            ..BootOptions::default()
        };
        assert!(boot(&o).unwrap_err().to_string().contains("--expect"));
        let o = BootOptions {
            image: Some("/nonexistent/x.img".into()),
            firmware: Firmware::Bios,
            ..BootOptions::default()
        };
        assert!(boot(&o).unwrap_err().to_string().contains("no such image"));
    }
}
