//! The boot stage of a build: kernel and modules from the tree, kiln's initrd (or the spec's),
//! the UKI on systemd's stub, and the ESP's contents — systemd-boot as the fallback loader and
//! the UKI under `EFI/Linux/` with boot counting (Boot Loader Specification, type #2 entries).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_formats::arch::{self, Arch};
use kiln_formats::fstree::{
    self, Contents, DataRef, FileData, Meta, Node, NodeKind, Timestamp, Tree,
};
use kiln_formats::pe;
use serde::Serialize;

use crate::initrd::{self, InitrdOptions, KernelInfo};
use crate::spec::Boot;

/// Where systemd ships its EFI binaries, in a tree and on the host (Debian: systemd-boot-efi).
const EFI_DIR: &str = "/usr/lib/systemd/boot/efi";

/// Everything the UKI needs except the command line, which carries the root hash.
pub struct BootParts {
    /// The kernel found in the tree.
    pub kernel: KernelInfo,
    /// Its bytes.
    pub linux: Vec<u8>,
    /// The initrd.
    pub initrd: Vec<u8>,
    /// systemd's UKI stub.
    pub stub: Vec<u8>,
    /// Where the stub came from, for the report.
    pub stub_from: String,
    /// systemd-boot.
    pub systemd_boot: Vec<u8>,
    /// os-release of the image (with IMAGE_ID/IMAGE_VERSION).
    pub osrel: String,
    /// Modules in the initrd, in load order.
    pub modules: Vec<String>,
    /// Why each of `modules` is there (same order).
    pub reasons: Vec<String>,
    /// Requested modules the kernel has built in.
    pub builtin: Vec<String>,
    /// Optional modules this kernel does not have.
    pub skipped: Vec<String>,
    /// Soft dependencies and run-time aliases that nothing in the kernel provides.
    pub unresolved: Vec<String>,
}

/// Reads a binary from the tree at `tree_path`, else from the host at the same path.
fn tree_or_host(
    tree: &Tree,
    contents: &dyn Contents,
    tree_path: &str,
    what: &str,
) -> Result<(Vec<u8>, String)> {
    if let Some(b) = fstree::read_file(tree, contents, tree_path, 256 << 20)? {
        return Ok((b, format!("tree:{tree_path}")));
    }
    match std::fs::read(tree_path) {
        Ok(b) => Ok((b, format!("host:{tree_path}"))),
        Err(e) => bail!(
            "no {what}: {tree_path} is neither in the source tree nor on this machine ({e}); \
             install systemd-boot-efi (Debian) or set it in [boot]"
        ),
    }
}

/// kiln-init for `arch` (embedded, or the `KILN_INIT_<ARCH>`/`KILN_INIT` override), checked
/// to be an executable of that machine.
pub fn kiln_init(arch: Arch) -> Result<Vec<u8>> {
    let b = kiln_init_embed::kiln_init(arch.rust_name())
        .with_context(|| format!("the kiln-init binary for {arch}"))?;
    match arch::elf_machine(&b) {
        Some(m) if m.arch() == Some(arch) => Ok(b.into_owned()),
        Some(m) => bail!(
            "the kiln-init binary for {arch} is an executable for {} (check KILN_INIT_{} / KILN_INIT)",
            m.describe(),
            arch.rust_name().to_ascii_uppercase()
        ),
        None => bail!(
            "the kiln-init binary for {arch} is not an ELF executable (check KILN_INIT_{} / KILN_INIT)",
            arch.rust_name().to_ascii_uppercase()
        ),
    }
}

/// The kernel image `path` of the tree as the UKI's `.linux` section takes it: a gzip-
/// compressed arm64 `Image` (as some distributions ship `vmlinuz`) is decompressed, since the
/// stub starts the kernel as a PE image. Errors when the image is for another architecture
/// than `arch`.
pub fn kernel_image(bytes: Vec<u8>, path: &str, arch: Arch) -> Result<Vec<u8>> {
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        use std::io::Read;
        let mut out = Vec::with_capacity(bytes.len() * 3);
        flate2::read::GzDecoder::new(&bytes[..])
            .take(1 << 30)
            .read_to_end(&mut out)
            .with_context(|| format!("[boot] kernel {path}: decompressing (gzip)"))?;
        out
    } else {
        bytes
    };
    match arch::kernel_image_arch(&bytes) {
        Some(a) if a == arch => Ok(bytes),
        Some(a) => bail!(
            "[boot] kernel {path} is an {a} kernel, but the image is {arch} ([image] arch)"
        ),
        None => bail!(
            "[boot] kernel {path} is neither an x86 bzImage nor an arm64 Image (compressed with something other than gzip?)"
        ),
    }
}

/// Gathers the kernel, initrd, stub and loader for `boot`. `root_fs` is the root filesystem's
/// kind (its module becomes required), `init_config` kiln-init's configuration.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    boot: &Boot,
    arch: Arch,
    tree: &Tree,
    contents: &dyn Contents,
    root_fs: Option<&str>,
    init_config: kiln_init::config::Config,
    osrel: String,
    mtime: u32,
) -> Result<BootParts> {
    let kernel = initrd::find_kernel(tree, boot.kernel.as_deref()).context("[boot] kernel")?;
    let linux = initrd::read_tree_file(tree, contents, &kernel.image)
        .with_context(|| format!("[boot] reading the kernel {}", kernel.image))?;
    let linux = kernel_image(linux, &kernel.image, arch)?;
    let built = match &boot.initrd {
        Some(path) => {
            let b =
                std::fs::read(path).with_context(|| format!("[boot] initrd {}", path.display()))?;
            initrd::Initrd {
                bytes: b,
                kernel: kernel.clone(),
                modules: Vec::new(),
                reasons: Vec::new(),
                builtin: Vec::new(),
                skipped: Vec::new(),
                unresolved: Vec::new(),
            }
        }
        None => {
            let kiln_init = kiln_init(arch).context("[boot]")?;
            initrd::build_initrd(
                tree,
                contents,
                &InitrdOptions {
                    kernel: Some(kernel.image.clone()),
                    root_fs: root_fs.map(str::to_string),
                    extra_modules: boot.modules.clone(),
                    no_optional_modules: false,
                    config: init_config,
                    kiln_init,
                    mtime,
                    compression: Default::default(),
                    module_files: Default::default(),
                },
            )
            .context("[boot] building the initrd")?
        }
    };
    let sfx = arch.efi_suffix();
    let (stub, stub_from) = match &boot.stub {
        Some(p) => (
            std::fs::read(p).with_context(|| {
                format!(
                    "[boot] stub {}: cannot read the UKI stub (systemd's linux{sfx}.efi.stub)",
                    p.display()
                )
            })?,
            p.display().to_string(),
        ),
        None => tree_or_host(
            tree,
            contents,
            &format!("{EFI_DIR}/linux{sfx}.efi.stub"),
            &format!("UKI stub (linux{sfx}.efi.stub)"),
        )?,
    };
    let (systemd_boot, _) = tree_or_host(
        tree,
        contents,
        &format!("{EFI_DIR}/systemd-boot{sfx}.efi"),
        &format!("systemd-boot (systemd-boot{sfx}.efi)"),
    )?;
    for (what, b) in [("UKI stub", &stub), ("systemd-boot", &systemd_boot)] {
        let m = pe::Pe::parse(b, what)
            .with_context(|| format!("[boot] {what}"))?
            .coff
            .machine
            .get();
        if m != arch.pe_machine() {
            bail!(
                "[boot] the {what} is an EFI binary for machine {m:#06x} ({}), but the image is {arch} ([image] arch)",
                Arch::from_pe_machine(m).map(Arch::name).unwrap_or("unknown")
            );
        }
    }
    Ok(BootParts {
        kernel,
        linux,
        initrd: built.bytes,
        stub,
        stub_from,
        systemd_boot,
        osrel,
        modules: built.modules,
        reasons: built.reasons,
        builtin: built.builtin,
        skipped: built.skipped,
        unresolved: built.unresolved,
    })
}

impl BootParts {
    /// One line about the initrd for the build's progress output: kernel, module count, size,
    /// and what the kernel lacks (the report has every module with why it is there).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "kernel {}, {} modules, {} KiB",
            self.kernel.version,
            self.modules.len(),
            self.initrd.len() / 1024
        );
        if !self.skipped.is_empty() {
            s.push_str(&format!("; not in this kernel: {}", self.skipped.join(" ")));
        }
        if !self.unresolved.is_empty() {
            s.push_str(&format!(
                "; warning: nothing provides {}",
                self.unresolved.join(", ")
            ));
        }
        s
    }

    /// Assembles the UKI for `cmdline`.
    pub fn uki(&self, cmdline: &str) -> Result<Vec<u8>> {
        let uname = self.kernel.version.as_bytes();
        pe::assemble_uki(
            &self.stub,
            &pe::UkiParts {
                linux: &self.linux,
                initrd: &self.initrd,
                cmdline: cmdline.as_bytes(),
                osrel: self.osrel.as_bytes(),
                uname: Some(uname),
                sbat: None,
                splash: None,
                dtb: None,
            },
        )
        .context("assembling the UKI")
    }
}

/// With boot counting, systemd-bless-boot renames the UKI on the ESP once the boot is good; it
/// finds the ESP mounted at `/efi` or `/boot`, where systemd-gpt-auto-generator mounts it only
/// if the directory exists and is empty. A read-only root cannot grow one at boot, and
/// Debian's `/boot` holds the kernel, so the build adds an empty `/efi` when the tree has
/// neither an `/efi` nor an empty `/boot`. Returns whether it did.
pub fn add_esp_mount_point(spec: &crate::spec::Spec, tree: &mut Tree, mtime: i64) -> Result<bool> {
    let counting = spec.boot.as_ref().is_some_and(|b| b.tries > 0);
    let has_esp = spec.partitions.iter().any(|p| p.type_name == "esp");
    if !counting || !has_esp || tree.resolve(b"/efi").is_some() {
        return Ok(false);
    }
    if let Some(b) = tree.resolve_follow(b"/boot") {
        if tree.node(b).is_dir() && tree.entries(b).is_empty() {
            return Ok(false);
        }
    }
    let meta = Meta {
        perm: 0o755,
        mtime: Timestamp::from_secs(mtime),
        ..Meta::default()
    };
    tree.insert(
        b"/efi",
        Node {
            kind: NodeKind::Dir(Vec::new()),
            meta: meta.clone(),
            slot: None,
        },
        &meta,
    )
    .context("adding /efi to the root")?;
    Ok(true)
}

/// The UKI's file name in `EFI/Linux/`: `NAME_VERSION+TRIES.efi`, or without a counter when
/// boot counting is off.
pub fn uki_name(name_version: &str, tries: u32) -> String {
    if tries > 0 {
        format!("{name_version}+{tries}.efi")
    } else {
        format!("{name_version}.efi")
    }
}

/// A read-only regular file node holding `bytes`.
pub fn file(bytes: Arc<[u8]>, mtime: i64) -> Node {
    Node {
        kind: NodeKind::File(FileData::dense(bytes.len() as u64, DataRef::Inline(bytes))),
        meta: Meta {
            perm: 0o644,
            mtime: Timestamp::from_secs(mtime),
            ..Meta::default()
        },
        slot: None,
    }
}

/// The ESP: the spec's own ESP contents (if any) plus systemd-boot, loader.conf and the UKI.
pub fn esp_tree(
    arch: Arch,
    base: Option<Tree>,
    sdboot: &[u8],
    uki_file: &str,
    uki: Arc<[u8]>,
    timeout: u32,
    mtime: i64,
) -> Result<Tree> {
    let mut t = base.unwrap_or_default();
    let dir_meta = Meta {
        perm: 0o755,
        mtime: Timestamp::from_secs(mtime),
        ..Meta::default()
    };
    let sd: Arc<[u8]> = sdboot.into();
    t.insert(
        format!("/{}", arch.efi_removable_path()).as_bytes(),
        file(sd.clone(), mtime),
        &dir_meta,
    )?;
    t.insert(
        format!("/EFI/systemd/systemd-boot{}.efi", arch.efi_suffix()).as_bytes(),
        file(sd, mtime),
        &dir_meta,
    )?;
    // `timeout 0` boots the default entry at once; systemd-boot picks the newest version
    // that still has tries left (entries with 0 tries left sort last).
    let conf = format!("timeout {timeout}\n");
    t.insert(
        b"/loader/loader.conf",
        file(conf.into_bytes().into(), mtime),
        &dir_meta,
    )?;
    t.insert(
        format!("/EFI/Linux/{uki_file}").as_bytes(),
        file(uki, mtime),
        &dir_meta,
    )?;
    Ok(t)
}

/// Keeps systemd's veritysetup generator from acting on `roothash=` in the booted system:
/// kiln-init has set up dm-verity already, and the generator would have systemd wait 90 s for
/// the root hash halves as partition UUIDs, which a live medium or a slot filled by
/// systemd-sysupdate does not have (systemd-veritysetup-generator(8): `systemd.verity=`).
pub(crate) const NO_SYSTEMD_VERITY: &str = "systemd.verity=no";

/// The boot stage's result.
#[derive(Clone, Debug, Serialize)]
pub struct BootReport {
    /// Kernel version.
    pub kernel: String,
    /// Kernel path in the tree.
    pub kernel_path: String,
    /// The UKI's command line.
    pub cmdline: String,
    /// File name under `EFI/Linux/` on the ESP.
    pub uki: String,
    /// Where the stub came from.
    pub stub: String,
    /// Initrd size in bytes.
    pub initrd_size: u64,
    /// Modules in the initrd, in load order.
    pub modules: Vec<String>,
    /// Module → why it is in the initrd (what asked for it).
    pub module_reasons: BTreeMap<String, String>,
    /// Requested modules built into the kernel.
    pub builtin: Vec<String>,
    /// Optional modules this kernel does not have.
    pub skipped: Vec<String>,
    /// Soft dependencies and run-time aliases nothing in the kernel provides, with who wanted
    /// them.
    pub unresolved: Vec<String>,
}

impl BootReport {
    /// The report of a boot stage whose UKI has command line `cmdline` and file name `uki`.
    pub fn new(bp: &BootParts, cmdline: String, uki: String) -> Self {
        BootReport {
            kernel: bp.kernel.version.clone(),
            kernel_path: bp.kernel.image.clone(),
            cmdline,
            uki,
            stub: bp.stub_from.clone(),
            initrd_size: bp.initrd.len() as u64,
            modules: bp.modules.clone(),
            module_reasons: bp
                .modules
                .iter()
                .cloned()
                .zip(bp.reasons.iter().cloned())
                .collect(),
            builtin: bp.builtin.clone(),
            skipped: bp.skipped.clone(),
            unresolved: bp.unresolved.clone(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn arm64_image() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..2].copy_from_slice(b"MZ");
        b[arch::ARM64_IMAGE_MAGIC_OFFSET..][..4].copy_from_slice(&arch::ARM64_IMAGE_MAGIC);
        b
    }

    #[test]
    fn kernel_images_are_decompressed_and_checked_against_the_arch() {
        let plain = arm64_image();
        assert_eq!(
            kernel_image(plain.clone(), "/boot/vmlinuz-6", Arch::Arm64).unwrap(),
            plain
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            kernel_image(gz, "/boot/vmlinuz-6", Arch::Arm64).unwrap(),
            plain
        );
        let e = kernel_image(plain, "/boot/vmlinuz-6", Arch::X86_64).unwrap_err();
        assert!(
            e.to_string()
                .contains("/boot/vmlinuz-6 is an arm64 kernel, but the image is x86-64"),
            "{e}"
        );
        let e = kernel_image(vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0], "/k", Arch::Arm64).unwrap_err();
        assert!(
            e.to_string()
                .contains("neither an x86 bzImage nor an arm64 Image"),
            "{e}"
        );
    }
}
