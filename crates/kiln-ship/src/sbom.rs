//! SBOM: an SPDX 2.3 JSON document (spec: <https://spdx.github.io/spdx-spec/v2.3/>) listing the
//! packages installed in a tree, read from
//! - the dpkg database, `/var/lib/dpkg/status` (deb822 paragraphs; a package is listed when
//!   its `Status` state is anything but `not-installed` or `config-files`, i.e. its files are
//!   on disk), and
//! - the rpm database, `rpmdb.sqlite` (`/usr/lib/sysimage/rpm/` or `/var/lib/rpm/`): table
//!   `Packages(hnum, blob)`, each blob an rpm header without its 8-byte magic (big-endian
//!   index count and data length, 16-byte index entries `tag, type, offset, count`, then the
//!   data store; rpm's `lib/header.c` and the LSB rpm file format chapter). `gpg-pubkey`
//!   pseudo-packages are left out.
//!
//! Each package carries a purl (`pkg:deb/<id>/<name>@<version>?arch=…&distro=<id>-<version_id>`
//! or `pkg:rpm/…` with `epoch=`), the distro comes from `os-release`, and the image's sha256,
//! when given, is the checksum of the top package the document describes.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use kiln_formats::fstree::{Contents, Tree};
use serde_json::{json, Value};

/// The largest database file read (dpkg status files are a few MiB).
const MAX_DB: u64 = 512 << 20;

/// Which package manager a package came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// dpkg.
    Deb,
    /// rpm.
    Rpm,
}

/// One installed package.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    /// deb or rpm.
    pub kind: Kind,
    /// Package name.
    pub name: String,
    /// Full version (`[epoch:]upstream-revision` for deb, `version-release` for rpm).
    pub version: String,
    /// rpm epoch, when set.
    pub epoch: Option<u32>,
    /// Architecture (`amd64`, `all`, `x86_64`, `noarch`).
    pub arch: String,
    /// Source package name, when it differs.
    pub source: Option<String>,
    /// License string as the package states it (rpm only; not necessarily an SPDX expression).
    pub license: Option<String>,
    /// Homepage or URL.
    pub homepage: Option<String>,
    /// Maintainer or vendor.
    pub supplier: Option<String>,
}

/// The distribution, from `os-release`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID` (`debian`, `fedora`).
    pub id: String,
    /// `VERSION_ID` (`12`), may be empty.
    pub version_id: String,
    /// `PRETTY_NAME`.
    pub pretty_name: String,
}

/// Reads a whole file (resolving symlinks inside the tree) when it exists; `Ok(None)` when not.
pub fn read_tree_file(
    tree: &Tree,
    contents: &dyn Contents,
    path: &str,
    max: u64,
) -> anyhow::Result<Option<Vec<u8>>> {
    Ok(kiln_formats::fstree::read_file(tree, contents, path, max)?)
}

/// Parses os-release text (`KEY=value`, values optionally quoted).
pub fn parse_os_release(text: &str) -> OsRelease {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            m.insert(
                k.trim().to_string(),
                v.replace("\\\"", "\"").replace("\\\\", "\\"),
            );
        }
    }
    OsRelease {
        id: m.get("ID").cloned().unwrap_or_else(|| "linux".into()),
        version_id: m.get("VERSION_ID").cloned().unwrap_or_default(),
        pretty_name: m.get("PRETTY_NAME").cloned().unwrap_or_default(),
    }
}

/// The tree's os-release (`/etc/os-release`, else `/usr/lib/os-release`).
pub fn os_release(tree: &Tree, contents: &dyn Contents) -> anyhow::Result<Option<OsRelease>> {
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Some(b) = read_tree_file(tree, contents, p, 1 << 20)? {
            return Ok(Some(parse_os_release(&String::from_utf8_lossy(&b))));
        }
    }
    Ok(None)
}

/// Parses a dpkg status file into installed packages (see the module docs for which count).
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut fields: BTreeMap<&str, String> = BTreeMap::new();
        let mut last: Option<&str> = None;
        for line in para.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some(k) = last {
                    if let Some(v) = fields.get_mut(k) {
                        v.push('\n');
                        v.push_str(line.trim());
                    }
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim();
                fields.insert(k, v.trim().to_string());
                last = Some(k);
            }
        }
        let Some(name) = fields.get("Package").filter(|n| !n.is_empty()) else {
            continue;
        };
        let state = fields
            .get("Status")
            .and_then(|s| s.split_whitespace().nth(2))
            .unwrap_or("not-installed");
        if state == "not-installed" || state == "config-files" {
            continue;
        }
        let source = fields
            .get("Source")
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            .filter(|s| !s.is_empty() && s != name);
        out.push(Package {
            kind: Kind::Deb,
            name: name.clone(),
            version: fields.get("Version").cloned().unwrap_or_default(),
            epoch: None,
            arch: fields.get("Architecture").cloned().unwrap_or_default(),
            source,
            license: None,
            homepage: fields.get("Homepage").cloned(),
            supplier: fields.get("Maintainer").cloned(),
        });
    }
    out
}

/// rpm header tags kiln reads (rpm's `rpmtag.h`).
mod tag {
    pub const NAME: u32 = 1000;
    pub const VERSION: u32 = 1001;
    pub const RELEASE: u32 = 1002;
    pub const EPOCH: u32 = 1003;
    pub const VENDOR: u32 = 1011;
    pub const LICENSE: u32 = 1014;
    pub const URL: u32 = 1020;
    pub const ARCH: u32 = 1022;
    pub const SOURCERPM: u32 = 1044;
}

/// rpm header data types (`rpmTagType`).
mod ty {
    pub const INT32: u32 = 4;
    pub const STRING: u32 = 6;
    pub const STRING_ARRAY: u32 = 8;
    pub const I18NSTRING: u32 = 9;
}

/// Parses one rpm header blob as stored in `rpmdb.sqlite` (no leading magic).
pub fn parse_rpm_header(blob: &[u8], what: &str) -> anyhow::Result<Package> {
    let be32 = |off: usize| -> anyhow::Result<u32> {
        blob.get(off..off + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .with_context(|| format!("{what}: header truncated at byte {off}"))
    };
    let il = be32(0)? as usize;
    let dl = be32(4)? as usize;
    let data_start = il
        .checked_mul(16)
        .and_then(|n| n.checked_add(8))
        .with_context(|| format!("{what}: index count {il} overflows"))?;
    if data_start
        .checked_add(dl)
        .is_none_or(|end| end > blob.len())
    {
        bail!(
            "{what}: header says {il} entries and {dl} data bytes, but the blob has {} bytes",
            blob.len()
        );
    }
    let data = &blob[data_start..data_start + dl];
    let mut strings: BTreeMap<u32, String> = BTreeMap::new();
    let mut epoch = None;
    for i in 0..il {
        let e = 8 + i * 16;
        let (tag, typ, off, count) = (be32(e)?, be32(e + 4)?, be32(e + 8)? as usize, be32(e + 12)?);
        if !matches!(
            tag,
            tag::NAME
                | tag::VERSION
                | tag::RELEASE
                | tag::EPOCH
                | tag::VENDOR
                | tag::LICENSE
                | tag::URL
                | tag::ARCH
                | tag::SOURCERPM
        ) {
            continue;
        }
        let at = || format!("{what}: tag {tag} at data offset {off}");
        match typ {
            ty::STRING | ty::STRING_ARRAY | ty::I18NSTRING => {
                let rest = data
                    .get(off..)
                    .with_context(|| format!("{}: beyond the data", at()))?;
                let end = rest
                    .iter()
                    .position(|&b| b == 0)
                    .with_context(|| format!("{}: unterminated string", at()))?;
                strings.insert(tag, String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            ty::INT32 if tag == tag::EPOCH && count >= 1 => {
                let b = data
                    .get(off..off + 4)
                    .with_context(|| format!("{}: beyond the data", at()))?;
                epoch = Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            }
            _ => {}
        }
    }
    let name = strings
        .remove(&tag::NAME)
        .with_context(|| format!("{what}: no NAME tag"))?;
    let version = strings.remove(&tag::VERSION).unwrap_or_default();
    let release = strings.remove(&tag::RELEASE).unwrap_or_default();
    let source = strings
        .remove(&tag::SOURCERPM)
        .and_then(|s| {
            // `name-version-release.src.rpm` → `name`.
            let s = s
                .strip_suffix(".src.rpm")
                .or_else(|| s.strip_suffix(".nosrc.rpm"))?
                .to_string();
            let mut parts = s.rsplitn(3, '-');
            let _release = parts.next()?;
            let _version = parts.next()?;
            parts.next().map(String::from)
        })
        .filter(|s| *s != name);
    Ok(Package {
        kind: Kind::Rpm,
        version: if release.is_empty() {
            version
        } else {
            format!("{version}-{release}")
        },
        name,
        epoch,
        arch: strings.remove(&tag::ARCH).unwrap_or_default(),
        source,
        license: strings.remove(&tag::LICENSE),
        homepage: strings.remove(&tag::URL),
        supplier: strings.remove(&tag::VENDOR),
    })
}

/// Reads the packages of an `rpmdb.sqlite` file on the host (a copy: sqlite may write to it
/// while replaying the write-ahead log).
pub fn read_rpmdb(path: &std::path::Path) -> anyhow::Result<Vec<Package>> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        // Read-write so sqlite can replay a write-ahead log; callers pass a private copy.
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("{}: open as sqlite", path.display()))?;
    let mut st = conn
        .prepare("SELECT hnum, blob FROM Packages ORDER BY hnum")
        .with_context(|| {
            format!(
                "{}: no Packages table (not an rpm sqlite database)",
                path.display()
            )
        })?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .with_context(|| format!("{}: query", path.display()))?;
    let mut out = Vec::new();
    for row in rows {
        let (hnum, blob) = row.with_context(|| format!("{}: row", path.display()))?;
        let p = parse_rpm_header(&blob, &format!("{} Packages row {hnum}", path.display()))?;
        if p.name != "gpg-pubkey" {
            out.push(p);
        }
    }
    Ok(out)
}

/// Every package installed in the tree (dpkg and rpm), sorted by kind, name, arch, version.
pub fn packages(tree: &Tree, contents: &dyn Contents) -> anyhow::Result<Vec<Package>> {
    let mut out = Vec::new();
    if let Some(b) = read_tree_file(tree, contents, "/var/lib/dpkg/status", MAX_DB)? {
        out.extend(parse_dpkg_status(&String::from_utf8_lossy(&b)));
    }
    for p in [
        "/usr/lib/sysimage/rpm/rpmdb.sqlite",
        "/var/lib/rpm/rpmdb.sqlite",
    ] {
        if let Some(b) = read_tree_file(tree, contents, p, MAX_DB)? {
            // sqlite needs a file, and the tree's bytes may live inside a tar: work on a copy.
            // rpm leaves recent changes in the write-ahead log, so it comes along.
            let dir = tempfile::tempdir().context("temp dir for the rpm database")?;
            let db = dir.path().join("rpmdb.sqlite");
            std::fs::write(&db, &b).with_context(|| format!("{}: write", db.display()))?;
            if let Some(w) = read_tree_file(tree, contents, &format!("{p}-wal"), MAX_DB)? {
                let wal = dir.path().join("rpmdb.sqlite-wal");
                std::fs::write(&wal, &w).with_context(|| format!("{}: write", wal.display()))?;
            }
            out.extend(read_rpmdb(&db).with_context(|| format!("tree file {p}"))?);
            break;
        }
    }
    out.sort();
    Ok(out)
}

/// Percent-encodes a purl component (everything but unreserved characters).
fn pct(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// The package URL (purl spec: <https://github.com/package-url/purl-spec>).
pub fn purl(p: &Package, os: &OsRelease) -> String {
    let ns = pct(&os.id.to_ascii_lowercase());
    let (ty, name) = match p.kind {
        Kind::Deb => ("deb", p.name.to_ascii_lowercase()),
        Kind::Rpm => ("rpm", p.name.clone()),
    };
    let mut q = vec![format!("arch={}", pct(&p.arch))];
    if let Some(e) = p.epoch {
        q.push(format!("epoch={e}"));
    }
    if !os.version_id.is_empty() {
        q.push(format!(
            "distro={}",
            pct(&format!("{}-{}", os.id, os.version_id))
        ));
    }
    if let Some(s) = &p.source {
        q.push(format!("upstream={}", pct(s)));
    }
    format!(
        "pkg:{ty}/{ns}/{}@{}?{}",
        pct(&name),
        pct(&p.version),
        q.join("&")
    )
}

fn spdx_id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Builds the SPDX 2.3 document for a tree. `image_sha256` (hex) becomes the checksum of the
/// top package; `created` comes from `SOURCE_DATE_EPOCH` (the epoch when unset).
pub fn spdx_for_tree(
    tree: &Tree,
    contents: &dyn Contents,
    image_name: &str,
    image_sha256: Option<&str>,
) -> anyhow::Result<Value> {
    let os = os_release(tree, contents)?.unwrap_or_default();
    let pkgs = packages(tree, contents)?;
    spdx_document(image_name, image_sha256, &os, &pkgs)
}

/// Builds the SPDX 2.3 document from already-read parts.
pub fn spdx_document(
    image_name: &str,
    image_sha256: Option<&str>,
    os: &OsRelease,
    pkgs: &[Package],
) -> anyhow::Result<Value> {
    if let Some(h) = image_sha256 {
        if !crate::digest::is_sha256_hex(h) {
            bail!("image sha256 {h:?}: expected 64 lowercase hex digits");
        }
    }
    let created = crate::time::rfc3339(crate::time::source_date_epoch()?);
    // The namespace must be unique per document: derive it from what the document says.
    let mut h = sha2::Sha256::new();
    use sha2::Digest;
    h.update(image_name.as_bytes());
    h.update(image_sha256.unwrap_or("").as_bytes());
    for p in pkgs {
        h.update(format!("{}\0{}\0{}\0", p.name, p.version, p.arch).as_bytes());
    }
    let ns = format!(
        "https://kiln.invalid/spdx/{}-{}",
        pct(image_name),
        &hex::encode(h.finalize())[..32]
    );

    let mut image = json!({
        "SPDXID": "SPDXRef-Image",
        "name": image_name,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "FILE",
    });
    if let Some(hx) = image_sha256 {
        image["checksums"] = json!([{ "algorithm": "SHA256", "checksumValue": hx }]);
    }
    let mut packages = vec![image];
    let mut rels = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    if !os.id.is_empty() {
        let mut osp = json!({
            "SPDXID": "SPDXRef-OperatingSystem",
            "name": os.id,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "primaryPackagePurpose": "OPERATING-SYSTEM",
        });
        if !os.version_id.is_empty() {
            osp["versionInfo"] = json!(os.version_id);
        }
        if !os.pretty_name.is_empty() {
            osp["description"] = json!(os.pretty_name);
        }
        packages.push(osp);
        rels.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": "SPDXRef-OperatingSystem",
        }));
    }
    let mut used = std::collections::BTreeSet::new();
    for p in pkgs {
        let kind = match p.kind {
            Kind::Deb => "deb",
            Kind::Rpm => "rpm",
        };
        let base = spdx_id(&format!("SPDXRef-Package-{kind}-{}-{}", p.name, p.arch));
        let mut id = base.clone();
        let mut n = 2;
        while !used.insert(id.clone()) {
            id = format!("{base}-{n}");
            n += 1;
        }
        let mut v = json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "primaryPackagePurpose": "LIBRARY",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(p, os),
            }],
        });
        if let Some(hp) = p.homepage.as_ref().filter(|h| h.starts_with("http")) {
            v["homepage"] = json!(hp);
        }
        if let Some(s) = &p.source {
            v["sourceInfo"] = json!(format!("built from source package {s}"));
        }
        if let Some(l) = &p.license {
            // Package-stated licenses are often not SPDX expressions; keep them as a comment.
            v["licenseComments"] = json!(format!("license as stated by the package: {l}"));
        }
        if let Some(s) = &p.supplier {
            v["comment"] = json!(format!("maintainer/vendor: {s}"));
        }
        packages.push(v);
        rels.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    Ok(json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": image_name,
        "documentNamespace": ns,
        "creationInfo": {
            "created": created,
            "creators": [concat!("Tool: kiln-", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "relationships": rels,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_states_and_continuations() {
        let s = "Package: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:2.0-1\nSource: asrc (1.0)\nDescription: x\n long\n\n\
                 Package: b\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                 Package: c\nStatus: install ok half-configured\nArchitecture: all\nVersion: 3\n";
        let p = parse_dpkg_status(s);
        assert_eq!(
            p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(p[0].source.as_deref(), Some("asrc"));
        let os = parse_os_release(
            "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        );
        assert_eq!(
            purl(&p[0], &os),
            "pkg:deb/debian/a@1%3A2.0-1?arch=amd64&distro=debian-12&upstream=asrc"
        );
    }

    fn rpm_blob(entries: &[(u32, u32, &[u8])]) -> Vec<u8> {
        let mut index = Vec::new();
        let mut data = Vec::new();
        for (tag, typ, bytes) in entries {
            if *typ == ty::INT32 {
                while data.len() % 4 != 0 {
                    data.push(0);
                }
            }
            for v in [*tag, *typ, data.len() as u32, 1] {
                index.extend_from_slice(&v.to_be_bytes());
            }
            data.extend_from_slice(bytes);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(&index);
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn rpm_headers() {
        let blob = rpm_blob(&[
            (tag::NAME, ty::STRING, b"bash\0"),
            (tag::VERSION, ty::STRING, b"5.2\0"),
            (tag::RELEASE, ty::STRING, b"1.fc40\0"),
            (tag::EPOCH, ty::INT32, &2u32.to_be_bytes()),
            (tag::ARCH, ty::STRING, b"x86_64\0"),
        ]);
        let p = parse_rpm_header(&blob, "t").unwrap();
        assert_eq!(
            (
                p.name.as_str(),
                p.version.as_str(),
                p.epoch,
                p.arch.as_str()
            ),
            ("bash", "5.2-1.fc40", Some(2), "x86_64")
        );
        for cut in [0, 7, 20, blob.len() - 1] {
            assert!(parse_rpm_header(&blob[..cut], "t").is_err(), "cut {cut}");
        }
    }
}
