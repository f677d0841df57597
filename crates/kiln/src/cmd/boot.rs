//! `kiln boot`: boot an image in QEMU (q35 with OVMF for x86-64, virt with AAVMF for arm64;
//! TCG) and wait for a marker on the serial console. Exit status 0 when the marker appears; 1 on a timeout, a kernel panic, a failed
//! kiln-init, or QEMU exiting first.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_build::qemu::{self, Attach, BootOptions, DirectKernel, Firmware, Machine};
use kiln_formats::arch::Arch;

use super::Outcome;

#[derive(Args)]
pub struct BootArgs {
    /// The disk or ISO image to boot.
    pub image: Option<PathBuf>,
    /// Regular expression to wait for on the serial console. Without it, success means the
    /// guest powered off (a reboot is a failure).
    #[arg(long, value_name = "REGEX")]
    pub expect: Option<String>,
    /// Seconds to wait before giving up.
    #[arg(long, value_name = "S", default_value_t = 120)]
    pub timeout: u64,
    /// The guest's architecture, x86-64 or arm64 [default: the one the image's EFI system
    /// partition (or --kernel) boots, else this machine's].
    #[arg(long, value_name = "ARCH", value_parser = parse_arch)]
    pub arch: Option<Arch>,
    /// UEFI firmware directory or code file (default /usr/share/OVMF, /usr/share/AAVMF for
    /// arm64).
    #[arg(long, value_name = "DIR_OR_CODE_FILE")]
    pub ovmf: Option<PathBuf>,
    /// How to attach the image: disk (virtio-blk), scsi (virtio-scsi), nvme, ahci (SATA), usb
    /// (xHCI stick), usb-ehci, uas (direct kernel boot only), cdrom (virtio-scsi) or
    /// cdrom-ahci.
    #[arg(long = "as", value_name = "KIND", default_value = "disk")]
    pub attach: Attach,
    /// Guest memory in MiB.
    #[arg(long, value_name = "M", default_value_t = 1024)]
    pub memory: u32,
    /// Virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Let the guest write to the image (boot counting renames persist); default: snapshot.
    #[arg(long)]
    pub keep: bool,
    /// Boot this kernel directly (with --initrd and --append) instead of through firmware.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initrd for --kernel (a kernel with its disk and filesystem drivers built in needs
    /// none; a distribution kernel's come from an initrd, e.g. the NAME_VERSION.initrd that
    /// `kiln build` writes beside a rootfs).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel [default: console=ttyS0 panic=-1 (console=ttyAMA0 on
    /// arm64); with --microvm: console=ttyS0 root=/dev/vda ro panic=-1]
    #[arg(long)]
    pub append: Option<String>,
    /// Boot IMAGE, a bare filesystem (`output = ["rootfs"]`), as a microVM: `-machine
    /// microvm`, no firmware, --kernel booted directly, IMAGE as the virtio-mmio disk /dev/vda.
    #[arg(long, requires = "kernel")]
    pub microvm: bool,
    /// Additional failure patterns (regular expressions) besides a kernel panic and a failed
    /// kiln-init.
    #[arg(long, value_name = "REGEX")]
    pub fail: Vec<String>,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    Arch::parse(s).ok_or_else(|| format!("{s:?}: expected x86-64 or arm64"))
}

/// The architecture to boot as: the one asked for, else the only one the image's ESP boots
/// (or the direct kernel's), else this machine's.
fn guest_arch(a: &BootArgs) -> Arch {
    if let Some(arch) = a.arch {
        return arch;
    }
    if let Some(k) = &a.kernel {
        let mut head = vec![0u8; 1024];
        if let Ok(f) = std::fs::File::open(k) {
            use std::os::unix::fs::FileExt;
            if f.read_exact_at(&mut head, 0).is_ok() {
                if let Some(arch) = kiln_formats::arch::kernel_image_arch(&head) {
                    return arch;
                }
            }
        }
    }
    if let Some(found) = a.image.as_deref().and_then(qemu::esp_arches) {
        if let [arch] = found[..] {
            return arch;
        }
    }
    Arch::host().unwrap_or(Arch::X86_64)
}

pub fn run(a: BootArgs) -> Outcome {
    let arch = guest_arch(&a);
    let console = match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Arm64 => "ttyAMA0",
    };
    let append = a.append.unwrap_or_else(|| {
        if a.microvm {
            format!("console={console} root=/dev/vda ro panic=-1")
        } else {
            format!("console={console} panic=-1")
        }
    });
    let direct = a.kernel.map(|kernel| DirectKernel {
        kernel,
        initrd: a.initrd,
        append,
    });
    let mut opts = BootOptions {
        image: a.image,
        attach: a.attach,
        firmware: if direct.is_some() && a.ovmf.is_none() {
            Firmware::Bios
        } else {
            Firmware::Ovmf(a.ovmf)
        },
        direct,
        machine: if a.microvm {
            Machine::Microvm
        } else {
            Machine::Q35
        },
        expect: a.expect,
        timeout: Duration::from_secs(a.timeout),
        memory_mib: a.memory,
        cpus: a.cpus,
        keep: a.keep,
        echo: true,
        arch,
        ..BootOptions::default()
    };
    opts.fail.extend(a.fail);
    let out = qemu::boot(&opts).context("kiln boot")?;
    eprintln!("kiln boot: {}", out.summary());
    Ok(if out.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
