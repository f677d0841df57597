//! `kiln boot`: boot an image in QEMU (q35, TCG, OVMF) and wait for a marker on the serial
//! console. Exit status 0 when the marker appears; 1 on a timeout, a kernel panic, a failed
//! kiln-init, or QEMU exiting first.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_build::qemu::{self, Attach, BootOptions, DirectKernel, Firmware, Machine};

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
    /// OVMF directory or OVMF_CODE file (default /usr/share/OVMF).
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
    /// Kernel command line for --kernel [default: console=ttyS0 panic=-1; with --microvm:
    /// console=ttyS0 root=/dev/vda ro panic=-1]
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

pub fn run(a: BootArgs) -> Outcome {
    let append = a.append.unwrap_or_else(|| {
        if a.microvm {
            "console=ttyS0 root=/dev/vda ro panic=-1".into()
        } else {
            "console=ttyS0 panic=-1".into()
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
