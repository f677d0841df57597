//! Target architectures: the names an image's architecture goes by in each format kiln writes
//! (DPS partition types, EFI binaries, ELF and PE machine numbers, the Linux boot image), and
//! recognising the architecture of an ELF file or a kernel image.

use std::fmt;

/// An architecture kiln builds images for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86-64 (amd64).
    X86_64,
    /// 64-bit ARM (aarch64).
    Arm64,
}

/// ELF `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// ELF `e_machine` of aarch64.
pub const EM_AARCH64: u16 = 183;
/// Offset of the `ARM\x64` magic in an arm64 Linux `Image` header.
pub const ARM64_IMAGE_MAGIC_OFFSET: usize = 0x38;
/// The arm64 Linux `Image` header magic.
pub const ARM64_IMAGE_MAGIC: [u8; 4] = *b"ARM\x64";

impl Arch {
    /// Every architecture.
    pub const ALL: &[Arch] = &[Arch::X86_64, Arch::Arm64];

    /// The name as the Discoverable Partitions Specification spells it (`x86-64`, `arm64`):
    /// the suffix of `root-ARCH`, and the value of `[image] arch`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86-64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Parses a name: the DPS one, or the Rust/kernel (`x86_64`, `aarch64`) or Debian/OCI
    /// (`amd64`) spelling.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "x86-64" | "x86_64" | "amd64" => Some(Arch::X86_64),
            "arm64" | "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// The machine kiln runs on, if it is one kiln builds for.
    pub fn host() -> Option<Arch> {
        Self::from_rust(std::env::consts::ARCH)
    }

    /// From Rust's `target_arch` name.
    pub fn from_rust(s: &str) -> Option<Arch> {
        match s {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// Rust's `target_arch` name (`x86_64`, `aarch64`), which is also `uname -m`.
    pub fn rust_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// The suffix of systemd's EFI binaries (`linuxx64.efi.stub`, `systemd-bootaa64.efi`).
    pub fn efi_suffix(self) -> &'static str {
        match self {
            Arch::X86_64 => "x64",
            Arch::Arm64 => "aa64",
        }
    }

    /// The removable-media boot path firmware loads without a boot entry (UEFI 2.10 §3.5.1.1),
    /// without the leading slash.
    pub fn efi_removable_path(self) -> &'static str {
        match self {
            Arch::X86_64 => "EFI/BOOT/BOOTX64.EFI",
            Arch::Arm64 => "EFI/BOOT/BOOTAA64.EFI",
        }
    }

    /// The ELF `e_machine` of its executables.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => EM_X86_64,
            Arch::Arm64 => EM_AARCH64,
        }
    }

    /// The PE/COFF machine of its EFI images.
    pub fn pe_machine(self) -> u16 {
        match self {
            Arch::X86_64 => crate::pe::MACHINE_AMD64,
            Arch::Arm64 => crate::pe::MACHINE_ARM64,
        }
    }

    /// From an ELF `e_machine`.
    pub fn from_elf_machine(m: u16) -> Option<Arch> {
        Self::ALL.iter().copied().find(|a| a.elf_machine() == m)
    }

    /// From a PE/COFF machine.
    pub fn from_pe_machine(m: u16) -> Option<Arch> {
        Self::ALL.iter().copied().find(|a| a.pe_machine() == m)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an ELF header says about its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElfMachine {
    /// `e_machine`.
    pub machine: u16,
    /// 64-bit (ELFCLASS64).
    pub class64: bool,
}

impl ElfMachine {
    /// The architecture, when it is one kiln knows and the class is 64-bit.
    pub fn arch(self) -> Option<Arch> {
        if self.class64 {
            Arch::from_elf_machine(self.machine)
        } else {
            None
        }
    }

    /// A name for messages: `x86-64`, `arm64`, or `ELF machine N (32-bit)`.
    pub fn describe(self) -> String {
        match self.arch() {
            Some(a) => a.name().to_string(),
            None => match (self.machine, self.class64) {
                (3, false) => "i386 (32-bit x86)".into(),
                (40, false) => "32-bit ARM".into(),
                (m, c) => format!("ELF machine {m} ({})", if c { "64-bit" } else { "32-bit" }),
            },
        }
    }
}

/// The machine of an ELF file from its first 20 bytes, or `None` when `head` is not an ELF
/// header (too short, wrong magic, or a big-endian file, which kiln never builds for).
pub fn elf_machine(head: &[u8]) -> Option<ElfMachine> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return None;
    }
    let class64 = match head[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    if head[5] != 1 {
        return None;
    }
    Some(ElfMachine {
        machine: u16::from_le_bytes([head[18], head[19]]),
        class64,
    })
}

/// The architecture of a Linux kernel image: an x86 bzImage (`HdrS` boot header) or an arm64
/// `Image` (`ARM\x64` magic), with or without its EFI stub. `None` for anything else,
/// including a compressed image.
pub fn kernel_image_arch(image: &[u8]) -> Option<Arch> {
    if image.get(ARM64_IMAGE_MAGIC_OFFSET..ARM64_IMAGE_MAGIC_OFFSET + 4)
        == Some(&ARM64_IMAGE_MAGIC[..])
    {
        return Some(Arch::Arm64);
    }
    if image.get(crate::pe::BZIMAGE_HDRS_OFFSET..crate::pe::BZIMAGE_HDRS_OFFSET + 4)
        == Some(&b"HdrS"[..])
    {
        return Some(Arch::X86_64);
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_parse() {
        for a in Arch::ALL {
            assert_eq!(Arch::parse(a.name()), Some(*a));
            assert_eq!(Arch::parse(a.rust_name()), Some(*a));
            assert_eq!(Arch::from_rust(a.rust_name()), Some(*a));
            assert_eq!(Arch::from_elf_machine(a.elf_machine()), Some(*a));
            assert_eq!(Arch::from_pe_machine(a.pe_machine()), Some(*a));
        }
        assert_eq!(Arch::parse("amd64"), Some(Arch::X86_64));
        assert_eq!(Arch::parse("i386"), None);
        assert_eq!(Arch::parse("riscv64"), None);
    }

    #[test]
    fn elf_headers_are_recognised() {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18..20].copy_from_slice(&EM_AARCH64.to_le_bytes());
        assert_eq!(elf_machine(&h).unwrap().arch(), Some(Arch::Arm64));
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        assert_eq!(elf_machine(&h).unwrap().arch(), Some(Arch::X86_64));
        h[4] = 1;
        h[18..20].copy_from_slice(&3u16.to_le_bytes());
        let m = elf_machine(&h).unwrap();
        assert_eq!(m.arch(), None);
        assert_eq!(m.describe(), "i386 (32-bit x86)");
        assert_eq!(elf_machine(&h[..19]), None);
        assert_eq!(elf_machine(b"#!/bin/sh\nexec true\n"), None);
    }

    #[test]
    fn kernel_images_are_recognised() {
        let mut arm = vec![0u8; 0x400];
        arm[0x38..0x3c].copy_from_slice(b"ARM\x64");
        assert_eq!(kernel_image_arch(&arm), Some(Arch::Arm64));
        let mut x86 = vec![0u8; 0x400];
        x86[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_image_arch(&x86), Some(Arch::X86_64));
        assert_eq!(kernel_image_arch(&[0x1f, 0x8b, 8, 0]), None);
    }
}
