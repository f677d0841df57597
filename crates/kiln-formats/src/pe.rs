//! PE/COFF images and Unified Kernel Image assembly (Microsoft "PE Format" specification; UAPI
//! group "Unified Kernel Image" specification; SPECS.md "Unified Kernel Image").
//!
//! The reader understands what a UKI needs: the DOS header (`MZ`, `e_lfanew` at 0x3c), the
//! `PE\0\0` signature, the COFF file header, a PE32+ optional header and the section table.
//! [`assemble_uki`] appends sections to systemd's EFI stub the way ukify does: each new section's
//! raw data at the next FileAlignment boundary of the file, its virtual address at the next
//! SectionAlignment boundary after the previous section, its header after the last one inside
//! SizeOfHeaders; then SizeOfImage is recomputed and CheckSum cleared.

use std::fmt::Write as _;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::arch::Arch;

/// `MZ`, the DOS header magic.
pub const DOS_MAGIC: u16 = 0x5a4d;
/// `PE\0\0`, the signature at `e_lfanew`.
pub const PE_SIGNATURE: [u8; 4] = *b"PE\0\0";
/// Optional header magic of a PE32+ (64-bit) image.
pub const PE32PLUS_MAGIC: u16 = 0x20b;
/// COFF machine type of x86-64 images.
pub const MACHINE_AMD64: u16 = 0x8664;
/// COFF machine type of arm64 (AArch64) images.
pub const MACHINE_ARM64: u16 = 0xaa64;
/// Section flags: contains code, readable (used for `.linux` by ukify).
pub const SCN_CODE_READ: u32 = 0x4000_0020;
/// Section flags: initialised data, readable (every other UKI section).
pub const SCN_DATA_READ: u32 = 0x4000_0040;
/// Index of the certificate table (Authenticode signature) in the data directories.
pub const DIR_SECURITY: usize = 4;
/// Offset of the "HdrS" magic of an x86 Linux boot protocol header (bzImage).
pub const BZIMAGE_HDRS_OFFSET: usize = 0x202;

/// The DOS header; only its magic and the PE header offset matter here.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DosHeader {
    /// `MZ` ([`DOS_MAGIC`]).
    pub e_magic: U16,
    /// The rest of the MS-DOS header, unused by UEFI.
    pub dos_fields: [u8; 58],
    /// File offset of the `PE\0\0` signature.
    pub e_lfanew: U32,
}
const _: () = assert!(size_of::<DosHeader>() == 64);

/// The COFF file header that follows the PE signature.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CoffHeader {
    /// Target machine ([`MACHINE_AMD64`]).
    pub machine: U16,
    /// Entries in the section table.
    pub number_of_sections: U16,
    /// Link time, seconds since 1970 (0 in reproducible builds).
    pub time_date_stamp: U32,
    /// File offset of the COFF symbol table, 0 if none.
    pub pointer_to_symbol_table: U32,
    /// Entries in the COFF symbol table.
    pub number_of_symbols: U32,
    /// Size of the optional header in bytes (240 for PE32+ with 16 data directories).
    pub size_of_optional_header: U16,
    /// Image flags (executable, large-address-aware, …).
    pub characteristics: U16,
}
const _: () = assert!(size_of::<CoffHeader>() == 20);

/// One data directory: an RVA and a size (for the certificate table: a file offset and size).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DataDirectory {
    /// Relative virtual address (file offset for the certificate table).
    pub virtual_address: U32,
    /// Size in bytes.
    pub size: U32,
}
const _: () = assert!(size_of::<DataDirectory>() == 8);

/// The PE32+ optional header, without its data directories.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct OptionalHeader64 {
    /// [`PE32PLUS_MAGIC`].
    pub magic: U16,
    /// Linker major version.
    pub major_linker_version: u8,
    /// Linker minor version.
    pub minor_linker_version: u8,
    /// Sum of code section sizes, bytes.
    pub size_of_code: U32,
    /// Sum of initialised data section sizes, bytes.
    pub size_of_initialized_data: U32,
    /// Sum of uninitialised data section sizes, bytes.
    pub size_of_uninitialized_data: U32,
    /// RVA of the entry point.
    pub address_of_entry_point: U32,
    /// RVA of the start of code.
    pub base_of_code: U32,
    /// Preferred load address.
    pub image_base: U64,
    /// Alignment of sections in memory, bytes.
    pub section_alignment: U32,
    /// Alignment of section raw data in the file, bytes.
    pub file_alignment: U32,
    /// Required OS major version.
    pub major_operating_system_version: U16,
    /// Required OS minor version.
    pub minor_operating_system_version: U16,
    /// Image major version.
    pub major_image_version: U16,
    /// Image minor version.
    pub minor_image_version: U16,
    /// Subsystem major version.
    pub major_subsystem_version: U16,
    /// Subsystem minor version.
    pub minor_subsystem_version: U16,
    /// Reserved, 0.
    pub win32_version_value: U32,
    /// Size of the image in memory, bytes, a multiple of SectionAlignment.
    pub size_of_image: U32,
    /// Size of all headers (DOS stub, PE header, section table) rounded to FileAlignment.
    pub size_of_headers: U32,
    /// Image checksum (0: not checked by UEFI).
    pub check_sum: U32,
    /// Subsystem (10 = EFI application).
    pub subsystem: U16,
    /// DLL characteristics flags.
    pub dll_characteristics: U16,
    /// Stack reserve, bytes.
    pub size_of_stack_reserve: U64,
    /// Stack commit, bytes.
    pub size_of_stack_commit: U64,
    /// Heap reserve, bytes.
    pub size_of_heap_reserve: U64,
    /// Heap commit, bytes.
    pub size_of_heap_commit: U64,
    /// Reserved, 0.
    pub loader_flags: U32,
    /// Number of data directories that follow.
    pub number_of_rva_and_sizes: U32,
}
const _: () = assert!(size_of::<OptionalHeader64>() == 112);
const _: () = assert!(std::mem::offset_of!(OptionalHeader64, size_of_image) == 56);

/// One section table entry.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, PartialEq, Eq)]
#[repr(C)]
pub struct SectionHeader {
    /// Name, NUL-padded to 8 bytes.
    pub name: [u8; 8],
    /// Size in memory, bytes (may exceed the raw size: zero-filled).
    pub virtual_size: U32,
    /// RVA of the section in memory.
    pub virtual_address: U32,
    /// Size of the raw data in the file, a multiple of FileAlignment.
    pub size_of_raw_data: U32,
    /// File offset of the raw data.
    pub pointer_to_raw_data: U32,
    /// File offset of relocations (0 in images).
    pub pointer_to_relocations: U32,
    /// File offset of line numbers (0, deprecated).
    pub pointer_to_linenumbers: U32,
    /// Number of relocations.
    pub number_of_relocations: U16,
    /// Number of line numbers.
    pub number_of_linenumbers: U16,
    /// Section flags ([`SCN_CODE_READ`], [`SCN_DATA_READ`], …).
    pub characteristics: U32,
}
const _: () = assert!(size_of::<SectionHeader>() == 40);

/// Errors reading a PE image or assembling a UKI. `what` names the input (stub, kernel).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeError {
    /// The bytes are not a PE image at all.
    #[error("{what}: not a PE image: {msg}")]
    NotPe { what: String, msg: String },
    /// A header field points outside the file or is inconsistent.
    #[error("{what}: malformed PE at offset {offset:#x}: {msg}")]
    Malformed {
        what: String,
        offset: usize,
        msg: String,
    },
    /// The image cannot be used for this purpose.
    #[error("{what}: {msg}")]
    Unsupported { what: String, msg: String },
    /// No room in the header area for more section headers.
    #[error("{what}: no room for {needed} more section headers: the table ends at {table_end:#x} and must fit before {limit:#x} (SizeOfHeaders/first section data); room for {room}")]
    NoRoom {
        what: String,
        needed: usize,
        room: usize,
        table_end: usize,
        limit: usize,
    },
    /// A value exceeds the 32-bit fields of PE.
    #[error("{what}: {msg} exceeds the 4 GiB limit of PE32+ images")]
    TooLarge { what: String, msg: String },
}

/// A section as read from the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Name without NUL padding (lossy UTF-8).
    pub name: String,
    /// The table entry.
    pub header: SectionHeader,
    /// File offset of the table entry.
    pub header_offset: usize,
}

/// A parsed PE32+ image (borrowing its bytes).
#[derive(Clone, Debug)]
pub struct Pe<'a> {
    /// The whole file.
    pub data: &'a [u8],
    /// File offset of `PE\0\0`.
    pub pe_offset: usize,
    /// The COFF header.
    pub coff: CoffHeader,
    /// The optional header (PE32+).
    pub opt: OptionalHeader64,
    /// The data directories.
    pub dirs: Vec<DataDirectory>,
    /// File offset of the section table.
    pub table_offset: usize,
    /// Sections in table order.
    pub sections: Vec<Section>,
}

fn read_at<T: FromBytes + KnownLayout + Immutable + Copy>(
    data: &[u8],
    off: usize,
    what: &str,
    field: &str,
) -> Result<T, PeError> {
    data.get(off..)
        .and_then(|b| T::read_from_prefix(b).ok())
        .map(|(t, _)| t)
        .ok_or_else(|| PeError::Malformed {
            what: what.into(),
            offset: off,
            msg: format!(
                "{field} ({} bytes) runs past the end of the {}-byte file",
                size_of::<T>(),
                data.len()
            ),
        })
}

fn round_up(v: u64, align: u64) -> u64 {
    if align <= 1 {
        v
    } else {
        v.div_ceil(align) * align
    }
}

impl<'a> Pe<'a> {
    /// Parses the headers of `data`; `what` names the input in errors ("stub", a path…).
    pub fn parse(data: &'a [u8], what: &str) -> Result<Self, PeError> {
        let not_pe = |msg: String| PeError::NotPe {
            what: what.into(),
            msg,
        };
        let malformed = |offset: usize, msg: String| PeError::Malformed {
            what: what.into(),
            offset,
            msg,
        };
        if data.len() < 64 {
            return Err(not_pe(format!("only {} bytes", data.len())));
        }
        let dos: DosHeader = read_at(data, 0, what, "DOS header")?;
        if dos.e_magic.get() != DOS_MAGIC {
            return Err(not_pe(format!(
                "starts with {:02x} {:02x}, expected \"MZ\"",
                data[0], data[1]
            )));
        }
        let pe_offset = dos.e_lfanew.get() as usize;
        let sig = data.get(pe_offset..pe_offset + 4);
        if sig != Some(&PE_SIGNATURE[..]) {
            let bz = data.get(BZIMAGE_HDRS_OFFSET..BZIMAGE_HDRS_OFFSET + 4) == Some(b"HdrS");
            return Err(not_pe(format!(
                "no \"PE\\0\\0\" signature at e_lfanew {pe_offset:#x}{}",
                if bz {
                    " (an x86 bzImage without the EFI stub)"
                } else {
                    ""
                }
            )));
        }
        let coff: CoffHeader = read_at(data, pe_offset + 4, what, "COFF header")?;
        let opt_off = pe_offset + 24;
        let opt: OptionalHeader64 = read_at(data, opt_off, what, "optional header")?;
        if opt.magic.get() != PE32PLUS_MAGIC {
            return Err(PeError::Unsupported {
                what: what.into(),
                msg: format!(
                    "optional header magic {:#x}, expected {PE32PLUS_MAGIC:#x} (PE32+)",
                    opt.magic.get()
                ),
            });
        }
        let opt_size = usize::from(coff.size_of_optional_header.get());
        let ndirs = opt.number_of_rva_and_sizes.get() as usize;
        if 112 + ndirs * 8 > opt_size {
            return Err(malformed(
                pe_offset + 20,
                format!("SizeOfOptionalHeader {opt_size} cannot hold {ndirs} data directories"),
            ));
        }
        let mut dirs = Vec::with_capacity(ndirs);
        for i in 0..ndirs {
            dirs.push(read_at::<DataDirectory>(
                data,
                opt_off + 112 + i * 8,
                what,
                "data directory",
            )?);
        }
        let table_offset = opt_off + opt_size;
        let n = usize::from(coff.number_of_sections.get());
        let mut sections = Vec::with_capacity(n);
        for i in 0..n {
            let off = table_offset + i * 40;
            let header: SectionHeader = read_at(data, off, what, "section header")?;
            let raw_end = u64::from(header.pointer_to_raw_data.get())
                + u64::from(header.size_of_raw_data.get());
            if header.size_of_raw_data.get() > 0 && raw_end > data.len() as u64 {
                return Err(malformed(
                    off,
                    format!(
                        "section {i} raw data ends at {raw_end:#x}, past the end of the {}-byte file",
                        data.len()
                    ),
                ));
            }
            let name_len = header.name.iter().position(|&b| b == 0).unwrap_or(8);
            sections.push(Section {
                name: String::from_utf8_lossy(&header.name[..name_len]).into_owned(),
                header,
                header_offset: off,
            });
        }
        Ok(Self {
            data,
            pe_offset,
            coff,
            opt,
            dirs,
            table_offset,
            sections,
        })
    }

    /// The first section named `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// A section's bytes: its raw data, cut to VirtualSize when that is smaller (the rest of the
    /// raw data is file-alignment padding).
    pub fn section_data(&self, s: &Section) -> &'a [u8] {
        let start = s.header.pointer_to_raw_data.get() as usize;
        let len = (s.header.size_of_raw_data.get()).min(s.header.virtual_size.get()) as usize;
        self.data.get(start..start + len).unwrap_or(&[])
    }

    /// A human dump: headers and the section table with VMAs, sizes and flags.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        let o = &self.opt;
        let _ = writeln!(
            s,
            "PE32+ machine={:#06x} sections={} symtab={:#x}/{} entry={:#x}",
            self.coff.machine.get(),
            self.coff.number_of_sections.get(),
            self.coff.pointer_to_symbol_table.get(),
            self.coff.number_of_symbols.get(),
            o.address_of_entry_point.get()
        );
        let _ = writeln!(
            s,
            "SectionAlignment={:#x} FileAlignment={:#x} SizeOfImage={:#x} SizeOfHeaders={:#x} CheckSum={:#x} subsystem={}",
            o.section_alignment.get(),
            o.file_alignment.get(),
            o.size_of_image.get(),
            o.size_of_headers.get(),
            o.check_sum.get(),
            o.subsystem.get()
        );
        let _ = writeln!(
            s,
            "{:>3} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "idx", "name", "vma", "vsize", "fileoff", "rawsize", "flags"
        );
        for (i, sec) in self.sections.iter().enumerate() {
            let h = &sec.header;
            let _ = writeln!(
                s,
                "{i:>3} {:<8} {:>#10x} {:>#10x} {:>#10x} {:>#10x} {:>#10x}",
                sec.name,
                h.virtual_address.get(),
                h.virtual_size.get(),
                h.pointer_to_raw_data.get(),
                h.size_of_raw_data.get(),
                h.characteristics.get()
            );
        }
        s
    }
}

/// The payloads of a Unified Kernel Image.
#[derive(Clone, Debug, Default)]
pub struct UkiParts<'a> {
    /// The kernel: a PE image (x86 bzImage or arm64 `Image` with the EFI stub), of the
    /// stub's machine.
    pub linux: &'a [u8],
    /// The initrd (one compressed cpio, or several concatenated).
    pub initrd: &'a [u8],
    /// The kernel command line.
    pub cmdline: &'a [u8],
    /// os-release contents (boot menu title and version).
    pub osrel: &'a [u8],
    /// `uname -r` of the kernel.
    pub uname: Option<&'a [u8]>,
    /// SBAT CSV lines to add to the stub's own (the `sbat,1,…` header line is kept once).
    pub sbat: Option<&'a [u8]>,
    /// A boot splash (BMP).
    pub splash: Option<&'a [u8]>,
    /// A device tree blob.
    pub dtb: Option<&'a [u8]>,
}

/// The SBAT header line every `.sbat` section starts with (shim's SBAT.md).
pub const SBAT_HEADER: &[u8] =
    b"sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\n";

/// Appends UKI sections to `stub` (systemd's `linuxx64.efi.stub` or `linuxaa64.efi.stub`):
/// `.osrel .cmdline` (`.dtb`) `.uname` (`.splash`) `.initrd .linux`, and SBAT. The kernel must
/// be a Linux image (bzImage, arm64 `Image`) for the stub's machine. A trailing COFF symbol
/// table is stripped first. When the stub already has `.sbat` and extra SBAT lines are given, they are merged
/// into the stub's section in place if they fit (two `.sbat` sections are rejected by shim);
/// without a stub `.sbat` a new section is added.
pub fn assemble_uki(stub: &[u8], parts: &UkiParts<'_>) -> Result<Vec<u8>, PeError> {
    const STUB: &str = "UKI stub";
    const KERNEL: &str = "kernel";
    let pe = Pe::parse(stub, STUB)?;
    let arch = Arch::from_pe_machine(pe.coff.machine.get()).ok_or_else(|| PeError::Unsupported {
        what: STUB.into(),
        msg: format!(
            "machine {:#06x}, expected x86-64 ({MACHINE_AMD64:#06x}) or arm64 ({MACHINE_ARM64:#06x})",
            pe.coff.machine.get()
        ),
    })?;
    if pe.section(".linux").is_some() {
        return Err(PeError::Unsupported {
            what: STUB.into(),
            msg: "already has a .linux section (a UKI, not a stub)".into(),
        });
    }
    if let Some(sec) = pe.dirs.get(DIR_SECURITY) {
        if sec.size.get() != 0 {
            return Err(PeError::Unsupported {
                what: STUB.into(),
                msg: "is signed (certificate table present); sign the assembled UKI instead".into(),
            });
        }
    }
    let kernel = Pe::parse(parts.linux, KERNEL)?;
    if kernel.coff.machine.get() != pe.coff.machine.get() {
        return Err(PeError::Unsupported {
            what: KERNEL.into(),
            msg: format!(
                "machine {:#06x}, but the stub is {arch} ({:#06x})",
                kernel.coff.machine.get(),
                pe.coff.machine.get()
            ),
        });
    }
    if crate::arch::kernel_image_arch(parts.linux) != Some(arch) {
        return Err(PeError::Unsupported {
            what: KERNEL.into(),
            msg: match arch {
                Arch::X86_64 => {
                    "a PE image but not a Linux bzImage (no \"HdrS\" boot header at 0x202)".into()
                }
                Arch::Arm64 => {
                    "a PE image but not a Linux arm64 Image (no \"ARM\\x64\" magic at 0x38)".into()
                }
            },
        });
    }

    let file_align = u64::from(pe.opt.file_alignment.get());
    let sect_align = u64::from(pe.opt.section_alignment.get());
    if !file_align.is_power_of_two() || !sect_align.is_power_of_two() {
        return Err(PeError::Malformed {
            what: STUB.into(),
            offset: pe.pe_offset + 24 + 32,
            msg: format!("alignments {sect_align:#x}/{file_align:#x} are not powers of two"),
        });
    }

    let mut out = stub.to_vec();
    // Strip a trailing COFF symbol table (and the string table after it): new section data
    // must follow the sections, and a symbol table in between would be inside nothing.
    let symtab = pe.coff.pointer_to_symbol_table.get() as usize;
    if symtab != 0 {
        let data_end = pe
            .sections
            .iter()
            .map(|s| {
                (s.header.pointer_to_raw_data.get() + s.header.size_of_raw_data.get()) as usize
            })
            .max()
            .unwrap_or(0);
        if symtab < data_end {
            return Err(PeError::Unsupported {
                what: STUB.into(),
                msg: format!(
                    "COFF symbol table at {symtab:#x} lies before the end of section data {data_end:#x}"
                ),
            });
        }
        out.truncate(symtab);
        let coff_off = pe.pe_offset + 4;
        out[coff_off + 8..coff_off + 16].fill(0);
    }

    // Merge SBAT into the stub's .sbat when present.
    let mut new: Vec<(&str, Vec<u8>, u32, u32)> = Vec::new(); // name, data, vsize, flags
    let stub_sbat = pe.section(".sbat");
    let mut add_sbat: Option<Vec<u8>> = None;
    if let Some(extra) = parts.sbat {
        let extra_lines: Vec<u8> = extra
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| !l.starts_with(b"sbat,"))
            .flat_map(|l| {
                let mut v = l.to_vec();
                if v.last() != Some(&b'\n') {
                    v.push(b'\n');
                }
                v
            })
            .collect();
        match stub_sbat {
            Some(s) => {
                let mut merged = pe.section_data(s).to_vec();
                while merged.last() == Some(&0) {
                    merged.pop();
                }
                if !merged.is_empty() && merged.last() != Some(&b'\n') {
                    merged.push(b'\n');
                }
                merged.extend_from_slice(&extra_lines);
                let va = s.header.virtual_address.get();
                let next_va = pe
                    .sections
                    .iter()
                    .map(|x| x.header.virtual_address.get())
                    .filter(|&x| x > va)
                    .min()
                    .unwrap_or(u32::MAX);
                let room = (s.header.size_of_raw_data.get()).min(next_va - va) as usize;
                if merged.len() > room {
                    return Err(PeError::Unsupported {
                        what: STUB.into(),
                        msg: format!(
                            ".sbat section has room for {room} bytes, the merged SBAT needs {}",
                            merged.len()
                        ),
                    });
                }
                let p = s.header.pointer_to_raw_data.get() as usize;
                let raw = s.header.size_of_raw_data.get() as usize;
                out[p..p + raw].fill(0);
                out[p..p + merged.len()].copy_from_slice(&merged);
                let vs_off = s.header_offset + 8;
                out[vs_off..vs_off + 4].copy_from_slice(&(merged.len() as u32).to_le_bytes());
            }
            None => {
                let mut v = SBAT_HEADER.to_vec();
                v.extend_from_slice(&extra_lines);
                add_sbat = Some(v);
            }
        }
    }

    let data = |d: &[u8]| d.to_vec();
    new.push((".osrel", data(parts.osrel), 0, SCN_DATA_READ));
    new.push((".cmdline", data(parts.cmdline), 0, SCN_DATA_READ));
    if let Some(d) = parts.dtb {
        new.push((".dtb", data(d), 0, SCN_DATA_READ));
    }
    if let Some(u) = parts.uname {
        new.push((".uname", data(u), 0, SCN_DATA_READ));
    }
    if let Some(s) = parts.splash {
        new.push((".splash", data(s), 0, SCN_DATA_READ));
    }
    if let Some(s) = add_sbat {
        new.push((".sbat", s, 0, SCN_DATA_READ));
    }
    new.push((".initrd", data(parts.initrd), 0, SCN_DATA_READ));
    // The kernel is decompressed in place by its EFI stub: it needs SizeOfImage bytes of memory,
    // more than the file, so the section's VirtualSize is the kernel's SizeOfImage.
    let linux_vsize = (kernel.opt.size_of_image.get() as usize).max(parts.linux.len());
    new.push((
        ".linux",
        data(parts.linux),
        linux_vsize as u32,
        SCN_CODE_READ,
    ));

    // Room for the new section headers.
    let n_old = pe.sections.len();
    let table_end = pe.table_offset + (n_old + new.len()) * 40;
    let first_raw = pe
        .sections
        .iter()
        .filter(|s| s.header.size_of_raw_data.get() > 0)
        .map(|s| s.header.pointer_to_raw_data.get() as usize)
        .min()
        .unwrap_or(usize::MAX);
    let limit = (pe.opt.size_of_headers.get() as usize).min(first_raw);
    if table_end > limit {
        let old_end = pe.table_offset + n_old * 40;
        return Err(PeError::NoRoom {
            what: STUB.into(),
            needed: new.len(),
            room: limit.saturating_sub(old_end) / 40,
            table_end: old_end,
            limit,
        });
    }

    let mut last_end = pe
        .sections
        .iter()
        .map(|s| u64::from(s.header.virtual_address.get()) + u64::from(s.header.virtual_size.get()))
        .max()
        .unwrap_or(u64::from(pe.opt.size_of_headers.get()));
    let too_large = |msg: String| PeError::TooLarge {
        what: "UKI".into(),
        msg,
    };
    for (i, (name, bytes, vsize, flags)) in new.iter().enumerate() {
        let ptr = round_up(out.len() as u64, file_align);
        let raw = round_up(bytes.len() as u64, file_align);
        let va = round_up(last_end, sect_align);
        let vsize = if *vsize == 0 {
            bytes.len() as u64
        } else {
            u64::from(*vsize)
        };
        let fits = |v: u64| u32::try_from(v).map_err(|_| too_large(format!("{name} at {v:#x}")));
        let mut nm = [0u8; 8];
        nm[..name.len()].copy_from_slice(name.as_bytes());
        let h = SectionHeader {
            name: nm,
            virtual_size: fits(vsize)?.into(),
            virtual_address: fits(va)?.into(),
            size_of_raw_data: fits(raw)?.into(),
            pointer_to_raw_data: fits(ptr)?.into(),
            pointer_to_relocations: 0.into(),
            pointer_to_linenumbers: 0.into(),
            number_of_relocations: 0.into(),
            number_of_linenumbers: 0.into(),
            characteristics: (*flags).into(),
        };
        fits(va + vsize)?;
        out.resize(ptr as usize, 0);
        out.extend_from_slice(bytes);
        out.resize((ptr + raw) as usize, 0);
        let hoff = pe.table_offset + (n_old + i) * 40;
        out[hoff..hoff + 40].copy_from_slice(h.as_bytes());
        last_end = va + vsize;
    }
    let n_total =
        u16::try_from(n_old + new.len()).map_err(|_| too_large("section count".into()))?;
    let coff_off = pe.pe_offset + 4;
    out[coff_off + 2..coff_off + 4].copy_from_slice(&n_total.to_le_bytes());
    let opt_off = pe.pe_offset + 24;
    let size_of_image = u32::try_from(round_up(last_end, sect_align))
        .map_err(|_| too_large("SizeOfImage".into()))?;
    out[opt_off + 56..opt_off + 60].copy_from_slice(&size_of_image.to_le_bytes());
    out[opt_off + 64..opt_off + 68].fill(0);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A minimal PE32+ with `n` sections of 0x10 bytes each, alignment 0x200/0x200, headers
    /// 0x400 bytes.
    pub(crate) fn fake_pe(n: usize, with_hdrs: bool, size_of_image: u32) -> Vec<u8> {
        let mut v = vec![0u8; 0x400 + n * 0x200];
        v[0..2].copy_from_slice(b"MZ");
        v[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        if with_hdrs {
            v[0x202..0x206].copy_from_slice(b"HdrS");
        }
        v[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        v[coff..coff + 2].copy_from_slice(&MACHINE_AMD64.to_le_bytes());
        v[coff + 2..coff + 4].copy_from_slice(&(n as u16).to_le_bytes());
        v[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = 0x98;
        v[opt..opt + 2].copy_from_slice(&PE32PLUS_MAGIC.to_le_bytes());
        v[opt + 32..opt + 36].copy_from_slice(&0x200u32.to_le_bytes());
        v[opt + 36..opt + 40].copy_from_slice(&0x200u32.to_le_bytes());
        v[opt + 56..opt + 60].copy_from_slice(&size_of_image.to_le_bytes());
        v[opt + 60..opt + 64].copy_from_slice(&0x400u32.to_le_bytes());
        v[opt + 64..opt + 68].copy_from_slice(&0x1234u32.to_le_bytes());
        v[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        let table = opt + 240;
        for i in 0..n {
            let h = table + i * 40;
            v[h..h + 5].copy_from_slice(b".text");
            v[h + 8..h + 12].copy_from_slice(&0x10u32.to_le_bytes());
            v[h + 12..h + 16].copy_from_slice(&(0x1000u32 * (i as u32 + 1)).to_le_bytes());
            v[h + 16..h + 20].copy_from_slice(&0x200u32.to_le_bytes());
            v[h + 20..h + 24].copy_from_slice(&(0x400u32 + 0x200 * i as u32).to_le_bytes());
        }
        v
    }

    fn parts<'a>(kernel: &'a [u8]) -> UkiParts<'a> {
        UkiParts {
            linux: kernel,
            initrd: b"INITRD",
            cmdline: b"console=ttyS0",
            osrel: b"NAME=test\n",
            uname: Some(b"6.1.0-test"),
            ..UkiParts::default()
        }
    }

    #[test]
    fn sections_follow_the_spec_layout() {
        let stub = fake_pe(2, false, 0x3000);
        let kernel = fake_pe(1, true, 0x100000);
        let uki = assemble_uki(&stub, &parts(&kernel)).unwrap();
        let pe = Pe::parse(&uki, "uki").unwrap();
        let names: Vec<_> = pe.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [".text", ".text", ".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
        );
        let osrel = &pe.sections[2].header;
        // Previous section ends at 0x2010 → next 0x200 boundary.
        assert_eq!(osrel.virtual_address.get(), 0x2200);
        assert_eq!(osrel.virtual_size.get(), 10);
        assert_eq!(osrel.pointer_to_raw_data.get(), 0x800);
        assert_eq!(osrel.size_of_raw_data.get(), 0x200);
        assert_eq!(osrel.characteristics.get(), SCN_DATA_READ);
        let linux = pe.section(".linux").unwrap();
        assert_eq!(linux.header.virtual_size.get(), 0x100000);
        assert_eq!(linux.header.characteristics.get(), SCN_CODE_READ);
        assert!(
            pe.section_data(linux).starts_with(&kernel),
            "kernel bytes differ"
        );
        assert_eq!(
            pe.section_data(pe.section(".cmdline").unwrap()),
            b"console=ttyS0"
        );
        assert_eq!(
            pe.opt.size_of_image.get() as u64,
            round_up(
                u64::from(linux.header.virtual_address.get()) + 0x100000,
                0x200
            )
        );
        assert_eq!(pe.opt.check_sum.get(), 0);
        assert_eq!(uki.len() % 0x200, 0);
        // Deterministic.
        assert_eq!(assemble_uki(&stub, &parts(&kernel)).unwrap(), uki);
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let stub = fake_pe(1, false, 0x2000);
        let kernel = fake_pe(1, true, 0x2000);
        let e = assemble_uki(b"hello", &parts(&kernel)).unwrap_err();
        assert!(e.to_string().contains("not a PE image"), "{e}");
        let e = assemble_uki(
            &stub,
            &parts(b"not a kernel at all, definitely not one, no........................"),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("kernel: not a PE image"), "{e}");
        let mut bz = vec![0u8; 0x400];
        bz[0..2].copy_from_slice(b"MZ");
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let e = assemble_uki(&stub, &parts(&bz)).unwrap_err();
        assert!(
            e.to_string().contains("bzImage without the EFI stub"),
            "{e}"
        );
        let notbz = fake_pe(1, false, 0x2000);
        let e = assemble_uki(&stub, &parts(&notbz)).unwrap_err();
        assert!(e.to_string().contains("not a Linux bzImage"), "{e}");
        // 0x400 of headers: table at 0x188, 40 bytes each → room for 15 in total.
        let full = fake_pe(14, false, 0x10000);
        let e = assemble_uki(&full, &parts(&kernel)).unwrap_err();
        assert!(
            matches!(
                e,
                PeError::NoRoom {
                    room: 1,
                    needed: 5,
                    ..
                }
            ),
            "{e}"
        );
        // Truncated section table.
        let e = Pe::parse(&stub[..0x190], "cut").unwrap_err();
        assert!(e.to_string().contains("cut: malformed PE"), "{e}");
    }

    #[test]
    fn symbol_table_is_stripped() {
        let mut stub = fake_pe(1, false, 0x2000);
        let symtab = stub.len() as u32;
        stub.extend_from_slice(&[0xAA; 36]);
        stub[0x84 + 8..0x84 + 12].copy_from_slice(&symtab.to_le_bytes());
        stub[0x84 + 12..0x84 + 16].copy_from_slice(&2u32.to_le_bytes());
        let kernel = fake_pe(1, true, 0x2000);
        let uki = assemble_uki(&stub, &parts(&kernel)).unwrap();
        let pe = Pe::parse(&uki, "uki").unwrap();
        assert_eq!(pe.coff.pointer_to_symbol_table.get(), 0);
        assert_eq!(pe.coff.number_of_symbols.get(), 0);
        assert!(!uki.windows(8).any(|w| w == [0xAA; 8]));
        assert_eq!(
            pe.section(".osrel")
                .unwrap()
                .header
                .pointer_to_raw_data
                .get(),
            symtab
        );
    }

    #[test]
    fn sbat_is_added_or_merged() {
        let stub = fake_pe(1, false, 0x2000);
        let kernel = fake_pe(1, true, 0x2000);
        let mut p = parts(&kernel);
        p.sbat = Some(b"sbat,1,x\nkiln,1,kiln,kiln,1,https://example.invalid");
        let uki = assemble_uki(&stub, &p).unwrap();
        let pe = Pe::parse(&uki, "uki").unwrap();
        let s = pe.section_data(pe.section(".sbat").unwrap());
        assert_eq!(
            s,
            [SBAT_HEADER, b"kiln,1,kiln,kiln,1,https://example.invalid\n"].concat()
        );
        // A stub with its own .sbat gets the line merged in place, no second section.
        let mut stub2 = fake_pe(2, false, 0x3000);
        let h = 0x98 + 240 + 40;
        stub2[h..h + 8].copy_from_slice(b".sbat\0\0\0");
        stub2[0x600..0x600 + SBAT_HEADER.len()].copy_from_slice(SBAT_HEADER);
        stub2[h + 8..h + 12].copy_from_slice(&(SBAT_HEADER.len() as u32).to_le_bytes());
        let uki = assemble_uki(&stub2, &p).unwrap();
        let pe = Pe::parse(&uki, "uki").unwrap();
        assert_eq!(pe.sections.iter().filter(|s| s.name == ".sbat").count(), 1);
        assert!(pe
            .section_data(pe.section(".sbat").unwrap())
            .ends_with(b"kiln,1,kiln,kiln,1,https://example.invalid\n"));
    }

    /// The real Debian stub and kernel, checked with objdump: sections at the VMAs the spec
    /// gives, sizes as given, deterministic bytes.
    #[test]
    fn real_stub_and_kernel_match_objdump() {
        let stub_path = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
        let stub = std::fs::read(stub_path)
            .unwrap_or_else(|e| panic!("{stub_path}: {e} (install systemd-boot-efi; CI does)"));
        let kernel_path = std::fs::read_dir("/boot")
            .expect("/boot")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .max()
            .expect("a kernel in /boot (install linux-image-cloud-amd64; CI does)");
        let kernel = std::fs::read(&kernel_path).unwrap();
        let spe = Pe::parse(&stub, "stub").unwrap();
        let last = spe
            .sections
            .iter()
            .map(|s| s.header.virtual_address.get() + s.header.virtual_size.get())
            .max()
            .unwrap();
        let initrd = vec![7u8; 5000];
        let p = UkiParts {
            linux: &kernel,
            initrd: &initrd,
            cmdline: b"console=ttyS0 roothash=00",
            osrel: b"ID=kiln\n",
            uname: Some(b"6.1.0"),
            ..UkiParts::default()
        };
        let uki = assemble_uki(&stub, &p).unwrap();
        assert_eq!(uki, assemble_uki(&stub, &p).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.efi");
        std::fs::write(&f, &uki).unwrap();
        let out = std::process::Command::new("objdump")
            .arg("-h")
            .arg(&f)
            .output()
            .expect("objdump (binutils) in PATH");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        // Parse "idx name size vma lma fileoff align" lines.
        let mut rows = Vec::new();
        for l in text.lines() {
            let w: Vec<_> = l.split_whitespace().collect();
            if w.len() == 7 && w[0].parse::<u32>().is_ok() {
                let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
                rows.push((w[1].to_string(), hex(w[2]), hex(w[3]), hex(w[5])));
            }
        }
        let find = |n: &str| {
            rows.iter()
                .find(|r| r.0 == n)
                .unwrap_or_else(|| panic!("{n} missing: {text}"))
                .clone()
        };
        let osrel = find(".osrel");
        let align = u64::from(spe.opt.section_alignment.get());
        assert_eq!(osrel.2, round_up(u64::from(last), align), "{text}");
        assert_eq!(osrel.1, 8);
        assert_eq!(find(".cmdline").1, 25);
        assert_eq!(find(".uname").1, 5);
        assert_eq!(find(".initrd").1, 5000);
        let kpe = Pe::parse(&kernel, "kernel").unwrap();
        // objdump shows min(VirtualSize, SizeOfRawData); our reader shows the VirtualSize.
        let vsize = u64::from(kpe.opt.size_of_image.get()).max(kernel.len() as u64);
        let raw = round_up(kernel.len() as u64, u64::from(spe.opt.file_alignment.get()));
        assert_eq!(find(".linux").1, vsize.min(raw));
        let upe = Pe::parse(&uki, "uki").unwrap();
        assert_eq!(
            u64::from(upe.section(".linux").unwrap().header.virtual_size.get()),
            vsize
        );
        // Raw data is the kernel followed by file-alignment padding.
        let got = upe.section_data(upe.section(".linux").unwrap());
        assert!(
            got.len() as u64 == raw && got.starts_with(&kernel),
            "kernel bytes differ"
        );
        // Each section starts at the aligned end of the previous one.
        let order = [".osrel", ".cmdline", ".uname", ".initrd", ".linux"];
        for w in order.windows(2) {
            let (a, b) = (find(w[0]), find(w[1]));
            assert_eq!(b.2, round_up(a.2 + a.1, align), "{} after {}", w[1], w[0]);
        }
        assert!(rows.iter().any(|r| r.0 == ".sbat"));
    }
}
