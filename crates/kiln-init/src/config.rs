//! What kiln-init is asked to do: the configuration file the initrd builder writes
//! (`/etc/kiln-init.conf` in the initrd) and the kernel command line, merged into one [`Plan`].
//!
//! The file is line based, one directive per line, `#` starts a comment:
//!
//! ```text
//! # kiln-init configuration, format 1
//! module dm_verity
//! module crypto-sha256
//! timeout 30
//! rootfstype erofs
//! var auto
//! overlay /etc
//! tmpfs /tmp 64M
//! live label=KILN_LIVE image=/live/root.img
//! init /sbin/init
//! reboot-delay 5
//! ```
//!
//! `module` lines are loaded in the order given, each by name or alias (or as a path in the
//! initrd) with its dependencies and soft dependencies, as modprobe would load it, from the
//! module database in `/lib/modules/VERSION` (see `modules.rs`).
//! Every other directive can be overridden on the kernel command line:
//!
//! | command line | meaning |
//! |---|---|
//! | `roothash=HEX` | dm-verity root hash (64 hex digits for sha256); the data and hash partitions are the ones whose GPT partition UUIDs are its first and last 16 bytes |
//! | `kiln.label=NAME` | with `roothash=`: when no partitions carry the root hash halves as UUIDs, take the root (root/usr x86-64) and verity partitions whose GPT names are `NAME` on one disk — how systemd-sysupdate marks a slot it filled (it cannot set UUIDs). dm-verity still checks the root hash, so a wrong pair cannot mount |
//! | `root=PARTUUID=U` / `root=/dev/X` | unprotected root by partition UUID or device name (without `roothash=`; default: the first root partition of kiln-init's architecture by DPS type) |
//! | `rootfstype=T` | filesystem of the root (default: detected by magic: ext4, erofs, squashfs, iso9660) |
//! | `init=PATH` | program to run in the new root (default `/sbin/init`) |
//! | `kiln.timeout=S` | seconds to wait for the boot disk (default 30) |
//! | `kiln.var=auto\|required\|off` | mount the DPS /var partition of the boot disk read-write |
//! | `kiln.overlay=/a,/b` | tmpfs overlays over these directories of the read-only root |
//! | `kiln.tmpfs=/a,/b` | plain tmpfs mounts |
//! | `kiln.live=LABEL` | live mode: boot medium with this volume label (or `UUID=…`), kept mounted read-only at `/run/kiln/medium` in the live system |
//! | `kiln.live.image=PATH` | root image on the live medium (default `/live/root.img`) |
//! | `kiln.reboot_delay=S` | seconds to show a failure before rebooting (default 5) |
//! | `kiln.debug` | print every step |

use std::fmt::Write as _;

use uuid::Uuid;

/// Default seconds to wait for the boot disk: TCG guests probe disks slowly.
pub const DEFAULT_TIMEOUT: u32 = 30;
/// Default seconds between a failure message and the reboot.
pub const DEFAULT_REBOOT_DELAY: u32 = 5;
/// Where the initrd builder puts the configuration file.
pub const CONFIG_PATH: &str = "/etc/kiln-init.conf";
/// Default path of the root image inside a live medium.
pub const DEFAULT_LIVE_IMAGE: &str = "/live/root.img";
/// Where live mode mounts the medium (read-only). It stays mounted: `/run` moves into the new
/// root, so the live system finds the medium's other files (kiln's ISO slots, e.g. a kiosk's
/// page) below this path.
pub const LIVE_MEDIUM_MOUNT: &str = "/run/kiln/medium";

/// Whether to mount the /var partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VarMode {
    /// Mount it when the boot disk has one.
    #[default]
    Auto,
    /// Fail the boot without one.
    Required,
    /// Never mount it.
    Off,
}

impl VarMode {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VarMode::Auto),
            "required" => Ok(VarMode::Required),
            "off" | "0" | "no" => Ok(VarMode::Off),
            _ => Err(format!("var: {s:?} is not auto, required or off")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            VarMode::Auto => "auto",
            VarMode::Required => "required",
            VarMode::Off => "off",
        }
    }
}

/// How the root is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootSpec {
    /// dm-verity: data and hash partitions by the root hash halves.
    Verity {
        /// The root hash bytes (32 for sha256).
        roothash: Vec<u8>,
        /// GPT partition name of the data and hash partitions, used when no partitions carry
        /// the root hash halves as UUIDs (`kiln.label=`).
        label: Option<String>,
    },
    /// A partition by its GPT partition UUID.
    PartUuid(Uuid),
    /// A device node, e.g. `/dev/vda2`.
    Device(String),
    /// The first root partition of kiln-init's architecture by DPS type (not labelled `_empty`).
    DpsType,
    /// Live mode: a root image file on the boot medium.
    Live {
        /// Volume label, or `UUID=…`, of the medium.
        medium: String,
        /// Path of the image inside the medium.
        image: String,
        /// dm-verity root hash of the image; its hash tree is the file `IMAGE.verity`.
        roothash: Option<Vec<u8>>,
    },
}

/// A tmpfs mount the root gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tmpfs {
    /// Absolute path inside the new root.
    pub path: String,
    /// Optional `size=` (e.g. `64M`).
    pub size: Option<String>,
}

/// The configuration file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Kernel modules to load, in order: names, aliases, or absolute paths inside the initrd.
    pub modules: Vec<String>,
    /// Seconds to wait for the boot disk.
    pub timeout: Option<u32>,
    /// Root filesystem type hint.
    pub rootfstype: Option<String>,
    /// /var handling.
    pub var: Option<VarMode>,
    /// Directories that get a tmpfs overlay.
    pub overlays: Vec<String>,
    /// Plain tmpfs mounts.
    pub tmpfs: Vec<Tmpfs>,
    /// Live mode: medium label and image path.
    pub live: Option<(String, String)>,
    /// Program to run in the new root.
    pub init: Option<String>,
    /// Seconds between a failure message and the reboot.
    pub reboot_delay: Option<u32>,
}

fn check_abs(what: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(format!(
            "{what}: {p:?} is not an absolute path without `..`"
        ));
    }
    Ok(())
}

fn parse_u32(what: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("{what}: {v:?} is not a whole number of seconds"))
}

/// Parses `label=… image=…` of a `live` directive.
fn parse_live(words: &[&str]) -> Result<(String, String), String> {
    let mut label = None;
    let mut image = DEFAULT_LIVE_IMAGE.to_string();
    for w in words {
        match w.split_once('=') {
            Some(("label", v)) if !v.is_empty() => label = Some(v.to_string()),
            Some(("uuid", v)) if !v.is_empty() => label = Some(format!("UUID={v}")),
            Some(("image", v)) => {
                check_abs("live image", v)?;
                image = v.to_string();
            }
            _ => {
                return Err(format!(
                    "live: unknown word {w:?} (expected label=, uuid=, image=)"
                ))
            }
        }
    }
    let label = label.ok_or("live: needs label=LABEL or uuid=UUID")?;
    Ok((label, image))
}

impl Config {
    /// Parses the file's text. Errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut c = Config::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = |e: String| format!("{CONFIG_PATH} line {}: {e}", i + 1);
            let one = || -> Result<&str, String> {
                match words.as_slice() {
                    [_, v] => Ok(v),
                    _ => Err(at(format!("{} takes exactly one value", words[0]))),
                }
            };
            match words[0] {
                "version" => {
                    if one()? != "1" {
                        return Err(at(format!(
                            "format version {} is not supported (1 is)",
                            one()?
                        )));
                    }
                }
                "module" => {
                    let p = one()?;
                    if p.contains('/') {
                        check_abs("module", p).map_err(at)?;
                    }
                    c.modules.push(p.to_string());
                }
                "timeout" => c.timeout = Some(parse_u32("timeout", one()?).map_err(at)?),
                "reboot-delay" => {
                    c.reboot_delay = Some(parse_u32("reboot-delay", one()?).map_err(at)?)
                }
                "rootfstype" => c.rootfstype = Some(one()?.to_string()),
                "var" => c.var = Some(VarMode::parse(one()?).map_err(at)?),
                "overlay" => {
                    let p = one()?;
                    check_abs("overlay", p).map_err(at)?;
                    c.overlays.push(p.to_string());
                }
                "tmpfs" => {
                    let (p, size) = match words.as_slice() {
                        [_, p] => (*p, None),
                        [_, p, s] => (*p, Some(s.to_string())),
                        _ => return Err(at("tmpfs takes a path and an optional size".into())),
                    };
                    check_abs("tmpfs", p).map_err(at)?;
                    c.tmpfs.push(Tmpfs {
                        path: p.to_string(),
                        size,
                    });
                }
                "live" => c.live = Some(parse_live(&words[1..]).map_err(at)?),
                "init" => {
                    let p = one()?;
                    check_abs("init", p).map_err(at)?;
                    c.init = Some(p.to_string());
                }
                other => return Err(at(format!("unknown directive {other:?}"))),
            }
        }
        Ok(c)
    }

    /// The file's text; [`Config::parse`] of it gives back `self`.
    pub fn render(&self) -> String {
        let mut s = String::from("# kiln-init configuration (written by kiln)\nversion 1\n");
        for m in &self.modules {
            let _ = writeln!(s, "module {m}");
        }
        if let Some(t) = self.timeout {
            let _ = writeln!(s, "timeout {t}");
        }
        if let Some(t) = &self.rootfstype {
            let _ = writeln!(s, "rootfstype {t}");
        }
        if let Some(v) = self.var {
            let _ = writeln!(s, "var {}", v.name());
        }
        for o in &self.overlays {
            let _ = writeln!(s, "overlay {o}");
        }
        for t in &self.tmpfs {
            match &t.size {
                Some(z) => {
                    let _ = writeln!(s, "tmpfs {} {z}", t.path);
                }
                None => {
                    let _ = writeln!(s, "tmpfs {}", t.path);
                }
            }
        }
        if let Some((label, image)) = &self.live {
            match label.strip_prefix("UUID=") {
                Some(u) => {
                    let _ = writeln!(s, "live uuid={u} image={image}");
                }
                None => {
                    let _ = writeln!(s, "live label={label} image={image}");
                }
            }
        }
        if let Some(i) = &self.init {
            let _ = writeln!(s, "init {i}");
        }
        if let Some(d) = self.reboot_delay {
            let _ = writeln!(s, "reboot-delay {d}");
        }
        s
    }
}

/// Everything kiln-init will do, after merging the file and the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Modules to load, in order.
    pub modules: Vec<String>,
    /// How to find the root.
    pub root: RootSpec,
    /// Root filesystem type hint.
    pub rootfstype: Option<String>,
    /// Seconds to wait for the boot disk.
    pub timeout: u32,
    /// /var handling.
    pub var: VarMode,
    /// tmpfs overlays.
    pub overlays: Vec<String>,
    /// Plain tmpfs mounts.
    pub tmpfs: Vec<Tmpfs>,
    /// Program to run in the new root.
    pub init: String,
    /// Seconds between a failure message and the reboot.
    pub reboot_delay: u32,
    /// Print every step.
    pub debug: bool,
}

/// Splits a kernel command line into words, honouring double quotes as the kernel does
/// (`key="a b"` is one word, quotes removed).
pub fn split_cmdline(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in s.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Decodes hex digits (either case).
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A UUID in the hyphenated 8-4-4-4-12 form the kernel prints (either case); the other forms
/// the `uuid` crate reads (32 bare hex digits, braced, `urn:uuid:`) are not what `PARTUUID=`
/// takes.
fn hyphenated_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

impl Plan {
    /// Merges the configuration file and the kernel command line (which wins).
    pub fn new(config: &Config, cmdline: &str) -> Result<Self, String> {
        let mut roothash = None;
        let mut root_arg = None;
        let mut label = None;
        let mut plan = Plan {
            modules: config.modules.clone(),
            root: RootSpec::DpsType,
            rootfstype: config.rootfstype.clone(),
            timeout: config.timeout.unwrap_or(DEFAULT_TIMEOUT),
            var: config.var.unwrap_or_default(),
            overlays: config.overlays.clone(),
            tmpfs: config.tmpfs.clone(),
            init: config.init.clone().unwrap_or_else(|| "/sbin/init".into()),
            reboot_delay: config.reboot_delay.unwrap_or(DEFAULT_REBOOT_DELAY),
            debug: false,
        };
        let mut live = config.live.clone();
        let list = |v: &str| -> Result<Vec<String>, String> {
            v.split(',')
                .filter(|p| !p.is_empty())
                .map(|p| check_abs("path", p).map(|_| p.to_string()))
                .collect()
        };
        for w in split_cmdline(cmdline) {
            let (k, v) = match w.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (w.as_str(), None),
            };
            let val = |name: &str| v.ok_or_else(|| format!("{name} needs a value ({name}=…)"));
            match k {
                "roothash" => {
                    let v = val(k)?;
                    let h = parse_hex(v).filter(|h| h.len() >= 32).ok_or_else(|| {
                        format!("roothash={v:?} is not a hex digest of 32 bytes or more")
                    })?;
                    roothash = Some(h);
                }
                "root" => root_arg = Some(val(k)?.to_string()),
                "rootfstype" => plan.rootfstype = Some(val(k)?.to_string()),
                "init" => {
                    let v = val(k)?;
                    check_abs("init", v)?;
                    plan.init = v.to_string();
                }
                "kiln.timeout" => plan.timeout = parse_u32(k, val(k)?)?,
                "kiln.reboot_delay" => plan.reboot_delay = parse_u32(k, val(k)?)?,
                "kiln.var" => plan.var = VarMode::parse(val(k)?)?,
                "kiln.overlay" => plan.overlays = list(val(k)?)?,
                "kiln.tmpfs" => {
                    plan.tmpfs = list(val(k)?)?
                        .into_iter()
                        .map(|path| Tmpfs { path, size: None })
                        .collect()
                }
                "kiln.live" => {
                    let image = live
                        .take()
                        .map(|(_, i)| i)
                        .unwrap_or_else(|| DEFAULT_LIVE_IMAGE.into());
                    live = Some((val(k)?.to_string(), image));
                }
                "kiln.live.image" => {
                    let v = val(k)?;
                    check_abs(k, v)?;
                    let label = live.take().map(|(l, _)| l).unwrap_or_default();
                    live = Some((label, v.to_string()));
                }
                "kiln.label" => {
                    let v = val(k)?;
                    if v.is_empty() || v == "_empty" || v.encode_utf16().count() > 36 {
                        return Err(format!(
                            "kiln.label={v:?}: expected a GPT partition name (1 to 36 characters)"
                        ));
                    }
                    label = Some(v.to_string());
                }
                "kiln.debug" => plan.debug = true,
                _ if k.starts_with("kiln.") => {
                    return Err(format!("unknown option {k:?} on the kernel command line"))
                }
                _ => {}
            }
        }
        if label.is_some() && (roothash.is_none() || live.is_some()) {
            return Err(
                "kiln.label= needs roothash= (it names a dm-verity slot on the disk)".into(),
            );
        }
        plan.root = match (roothash, root_arg, live) {
            (roothash, _, Some((medium, image))) => {
                if medium.is_empty() {
                    return Err("kiln.live.image= given without kiln.live=LABEL".into());
                }
                RootSpec::Live {
                    medium,
                    image,
                    roothash,
                }
            }
            (Some(roothash), _, None) => RootSpec::Verity { roothash, label },
            (None, Some(r), None) => {
                if let Some(u) = r.strip_prefix("PARTUUID=") {
                    RootSpec::PartUuid(
                        hyphenated_uuid(u)
                            .ok_or_else(|| format!("root=PARTUUID={u}: not a UUID"))?,
                    )
                } else if r.starts_with("/dev/") {
                    RootSpec::Device(r)
                } else {
                    return Err(format!("root={r:?}: expected PARTUUID=… or /dev/…"));
                }
            }
            (None, None, None) => RootSpec::DpsType,
        };
        Ok(plan)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef00112233445566778899aabbccddeeff";

    #[test]
    fn config_round_trips_and_reports_lines() {
        let c = Config {
            modules: vec![
                "/lib/modules/6.1/kernel/drivers/md/dm-mod.ko".into(),
                "dm_verity".into(),
                "crypto-sha256".into(),
            ],
            timeout: Some(12),
            rootfstype: Some("erofs".into()),
            var: Some(VarMode::Required),
            overlays: vec!["/etc".into()],
            tmpfs: vec![
                Tmpfs {
                    path: "/tmp".into(),
                    size: Some("64M".into()),
                },
                Tmpfs {
                    path: "/srv".into(),
                    size: None,
                },
            ],
            live: Some(("KILN_LIVE".into(), "/live/root.img".into())),
            init: Some("/usr/lib/systemd/systemd".into()),
            reboot_delay: Some(2),
        };
        let text = c.render();
        assert_eq!(Config::parse(&text).unwrap(), c);
        let cases = [
            ("version 2", "line 1: format version 2"),
            (
                "\n\nmodule relative/x.ko",
                "line 3: module: \"relative/x.ko\" is not an absolute path",
            ),
            (
                "timeout soon",
                "line 1: timeout: \"soon\" is not a whole number",
            ),
            ("var maybe", "line 1: var: \"maybe\""),
            ("frobnicate 1", "line 1: unknown directive \"frobnicate\""),
            ("overlay /a/../b", "not an absolute path without `..`"),
            ("live image=/x", "live: needs label="),
            ("timeout 1 2", "timeout takes exactly one value"),
        ];
        for (input, want) in cases {
            let e = Config::parse(input).unwrap_err();
            assert!(e.contains(want), "{input:?}: {e}");
        }
        assert_eq!(
            Config::parse("# only a comment\n\n").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn cmdline_words_and_quotes() {
        assert_eq!(
            split_cmdline(" console=ttyS0  a=\"b c\" \"d\"  quiet\n"),
            ["console=ttyS0", "a=b c", "d", "quiet"]
        );
        assert!(split_cmdline("   ").is_empty());
    }

    #[test]
    fn plan_merges_file_and_cmdline() {
        let c = Config::parse("timeout 9\noverlay /etc\nvar off\n").unwrap();
        let p = Plan::new(&c, &format!("console=ttyS0 roothash={HASH} quiet")).unwrap();
        assert_eq!(p.timeout, 9);
        assert_eq!(p.var, VarMode::Off);
        assert_eq!(p.overlays, ["/etc"]);
        assert_eq!(p.init, "/sbin/init");
        match &p.root {
            RootSpec::Verity { roothash, label } => {
                assert_eq!(label, &None);
                assert_eq!(roothash.len(), 32);
                assert_eq!(roothash[0], 0x01);
                assert_eq!(roothash[31], 0xff);
            }
            other => panic!("{other:?}"),
        }
        let p = Plan::new(
            &c,
            "kiln.timeout=3 kiln.var=required kiln.overlay=/etc,/home init=/bin/sh kiln.debug",
        )
        .unwrap();
        assert_eq!(
            (p.timeout, p.var, p.init.as_str(), p.debug),
            (3, VarMode::Required, "/bin/sh", true)
        );
        assert_eq!(p.overlays, ["/etc", "/home"]);
        assert_eq!(p.root, RootSpec::DpsType);
        let p = Plan::new(&c, "root=PARTUUID=4f68bce3-e8cd-4db1-96e7-fbcaf984b709").unwrap();
        assert_eq!(
            p.root,
            RootSpec::PartUuid(Uuid::from_bytes([
                0x4f, 0x68, 0xbc, 0xe3, 0xe8, 0xcd, 0x4d, 0xb1, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84,
                0xb7, 0x09
            ]))
        );
        assert_eq!(
            Plan::new(&c, "root=/dev/vda3").unwrap().root,
            RootSpec::Device("/dev/vda3".into())
        );
        let p = Plan::new(&c, "kiln.live=KILN kiln.live.image=/boot/root.erofs").unwrap();
        assert_eq!(
            p.root,
            RootSpec::Live {
                medium: "KILN".into(),
                image: "/boot/root.erofs".into(),
                roothash: None,
            }
        );
        let p = Plan::new(
            &c,
            &format!("kiln.live=UUID=2026-11-22-00-00-00-00 roothash={HASH}"),
        )
        .unwrap();
        assert!(matches!(
            p.root,
            RootSpec::Live { ref medium, ref image, roothash: Some(ref h) }
                if medium == "UUID=2026-11-22-00-00-00-00" && image == DEFAULT_LIVE_IMAGE && h.len() == 32
        ));
        for (bad, want) in [
            ("roothash=xyz", "roothash=\"xyz\""),
            ("roothash=abcd", "32 bytes"),
            ("root=LABEL=x", "expected PARTUUID"),
            ("root=PARTUUID=nope", "not a UUID"),
            ("kiln.timeout=", "not a whole number"),
            ("kiln.bogus=1", "unknown option \"kiln.bogus\""),
            ("kiln.overlay=etc", "not an absolute path"),
            ("kiln.live.image=/x", "without kiln.live"),
            ("roothash", "roothash needs a value"),
            ("kiln.label=os_2", "kiln.label= needs roothash="),
        ] {
            let e = Plan::new(&c, bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn label_fallback_for_sysupdate_slots() {
        let p = Plan::new(
            &Config::default(),
            &format!("roothash={HASH} kiln.label=appliance_2"),
        )
        .unwrap();
        assert!(matches!(
            p.root,
            RootSpec::Verity { ref roothash, label: Some(ref l) } if l == "appliance_2" && roothash.len() == 32
        ));
        let long = "x".repeat(37);
        let e = Plan::new(
            &Config::default(),
            &format!("roothash={HASH} kiln.label={long}"),
        )
        .unwrap_err();
        assert!(e.contains("1 to 36 characters"), "{e}");
    }

    #[test]
    fn uuid_text_round_trip() {
        let u = hyphenated_uuid("4D21B016-B534-45C2-A9FB-5C16E091FD2D").unwrap();
        assert_eq!(u.to_string(), "4d21b016-b534-45c2-a9fb-5c16e091fd2d");
        assert!(hyphenated_uuid("4d21b016b53445c2a9fb5c16e091fd2d").is_none());
        assert!(hyphenated_uuid("{4d21b016-b534-45c2-a9fb-5c16e091fd2d}").is_none());
        assert!(hyphenated_uuid("4d21b016-b534-45c2-a9fb-5c16e091fd2g").is_none());
        let e = Plan::new(
            &Config::default(),
            "root=PARTUUID=4d21b016b53445c2a9fb5c16e091fd2d",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "root=PARTUUID=4d21b016b53445c2a9fb5c16e091fd2d: not a UUID"
        );
    }
}
