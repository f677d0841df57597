//! Every `--json` output validates against its schema in `docs/json` (draft 2020-12), on real
//! images: the example disk (`examples/hello`), an injection into it, its digests and signature,
//! and each `kiln mkfs` format. The values are checked against what the files hold (digests
//! recomputed, sizes stat'ed), and renaming any field of any output makes validation fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::schema::{assert_valid_output, errors};
use kiln_testkit::{run, run_ok};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The schemas the tests below validate, which must be every file in docs/json.
const SCHEMAS: &[&str] = &[
    "build",
    "inspect",
    "inject",
    "verify",
    "mkfs-ext4",
    "mkfs-erofs",
    "mkfs-vfat",
    "mkfs-iso9660",
    // Validated (with every top-level key renamed once) by tests/delta.rs for `--from`, and
    // by tests/appliance.rs for `--with`.
    "update",
];

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn digest_of(p: &Path) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
    )
}

/// Renames each key of each object in `doc`, one at a time, and requires schema `name` to
/// reject every such copy: a renamed field anywhere in an output fails its test. Keys of
/// `maps` (objects whose keys are data, such as `module_reasons`) are not field names.
fn assert_renames_caught(name: &str, doc: &Value, maps: &[&str]) {
    fn paths(v: &Value, at: &mut Vec<String>, maps: &[&str], out: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(m) => {
                let is_map = at.last().is_some_and(|k| maps.contains(&k.as_str()));
                for (k, child) in m {
                    at.push(k.clone());
                    if !is_map {
                        out.push(at.clone());
                    }
                    paths(child, at, maps, out);
                    at.pop();
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    at.push(i.to_string());
                    paths(child, at, maps, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    fn rename(v: &mut Value, path: &[String]) {
        let (last, parents) = path.split_last().unwrap();
        let mut cur = v;
        for p in parents {
            cur = match cur {
                Value::Object(m) => m.get_mut(p).unwrap(),
                Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
                _ => unreachable!(),
            };
        }
        let m = cur.as_object_mut().unwrap();
        let x = m.remove(last).unwrap();
        m.insert(format!("{last}_renamed"), x);
    }
    let mut all = Vec::new();
    paths(doc, &mut Vec::new(), maps, &mut all);
    assert!(!all.is_empty());
    for p in &all {
        let mut copy = doc.clone();
        rename(&mut copy, p);
        assert!(
            !errors(name, &copy).is_empty(),
            "{name}: renaming {} is not caught by docs/json/{name}.schema.json",
            p.join(".")
        );
    }
}

/// Runs kiln with `args`, requires success, and returns stdout validated against `schema`.
fn json_of<S: AsRef<std::ffi::OsStr>>(schema: &str, args: &[S]) -> Value {
    let out = run_ok(kiln().args(args));
    assert_valid_output(schema, &out.stdout)
}

macro_rules! os {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

/// `kiln build`, `inspect`, `inject` and `verify` on the example disk image.
#[test]
fn image_commands_follow_their_schemas() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let spec = examples().join("hello");

    // build: stdout is the report, the same document as OUTDIR/NAME.json.
    let report = json_of(
        "build",
        os![
            "build",
            spec.as_os_str(),
            "-o",
            out.as_os_str(),
            "--json",
            "-q"
        ],
    );
    let file: Value =
        serde_json::from_slice(&std::fs::read(out.join("hello.json")).unwrap()).unwrap();
    assert_eq!(report, file, "--json and hello.json differ");
    let disk = out.join(report["disk"]["file"].as_str().unwrap());
    assert_eq!(report["disk"]["digest"], digest_of(&disk));
    assert_eq!(
        report["disk"]["size"],
        std::fs::metadata(&disk).unwrap().len()
    );
    for a in report["artifacts"].as_array().unwrap() {
        let f = out.join(a["file"].as_str().unwrap());
        assert_eq!(a["digest"], digest_of(&f), "{}", a["file"]);
    }
    let parts = report["partitions"].as_array().unwrap();
    let var = parts.iter().find(|p| p["type"] == "var").unwrap();
    assert_eq!(var["attributes"], serde_json::json!(["grow-fs"]));
    let roles: BTreeSet<&str> = parts.iter().map(|p| p["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        BTreeSet::from(["data", "verity", "empty-twin", "empty-verity-twin"])
    );
    let page_default = std::fs::read(spec.join("loading.html")).unwrap();
    let slot = &report["slots"][0];
    assert_eq!(slot["default"]["size"], page_default.len());
    assert_eq!(
        slot["default"]["digest"],
        format!("sha256:{}", hex::encode(Sha256::digest(&page_default)))
    );
    assert_renames_caught("build", &report, &["module_reasons"]);

    // inspect: the same partitions, attributes by name, what the kernel's blkid would see.
    let ins = json_of("inspect", os!["inspect", "--json", disk.as_os_str()]);
    let iparts = ins["partitions"].as_array().unwrap();
    assert_eq!(iparts.len(), parts.len());
    for (i, r) in iparts.iter().zip(parts) {
        assert_eq!(i["uuid"], r["uuid"]);
        assert_eq!(i["size"], r["size"]);
        assert_eq!(i["attributes"], r["attributes"]);
    }
    let verity = iparts
        .iter()
        .filter_map(|p| p["content"].as_object())
        .find(|c| c["kind"] == "verity")
        .expect("a verity superblock");
    assert!(verity["data_blocks"].as_u64().unwrap() > 0);
    assert_eq!(verity["salt"], report["verity"][0]["salt"]);
    assert_eq!(ins["slots"], report["slots"]);
    assert_renames_caught("inspect", &ins, &[]);

    // inject into a new file: payload size and digest, the result's size.
    let payload = t.path().join("mine.html");
    std::fs::write(&payload, "<h1>Hello, Ada</h1>\n").unwrap();
    let mine = t.path().join("mine.img");
    let slot_arg = format!("page={}", payload.display());
    let inj = json_of(
        "inject",
        os![
            "inject",
            disk.as_os_str(),
            "--slot",
            &slot_arg,
            "-o",
            mine.as_os_str(),
            "--json"
        ],
    );
    assert_eq!(inj["slots"][0]["digest"], digest_of(&payload));
    assert_eq!(inj["slots"][0]["size"], 20);
    assert_eq!(inj["size"], std::fs::metadata(&mine).unwrap().len());
    assert_renames_caught("inject", &inj, &[]);
    // To stdout: the summary goes to stderr, the image to stdout, and both are whole.
    let piped = run_ok(
        kiln()
            .arg("inject")
            .arg(&disk)
            .args(["--slot", &slot_arg, "-o", "-", "--json"]),
    );
    assert_eq!(piped.stdout, std::fs::read(&mine).unwrap());
    let doc = assert_valid_output("inject", &piped.stderr);
    assert_eq!(doc["output"], "-");

    // verify: the injected image against the digest inject printed, and --print.
    let chunked = inj["chunked_digest"].as_str().unwrap();
    let v = json_of(
        "verify",
        os!["verify", mine.as_os_str(), "--digest", chunked, "--json"],
    );
    assert_eq!(v["ok"], true);
    let p = json_of(
        "verify",
        os!["verify", disk.as_os_str(), "--print", "--json"],
    );
    assert_eq!(p["digest"], digest_of(&disk));
    assert_eq!(p["chunked_digest"], report["chunked_digest"]);
    assert_renames_caught("verify", &p, &[]);
    // A mismatch is still one valid document, and the exit status says it.
    let bad = run(kiln().arg("verify").arg(&mine).args([
        "--digest",
        report["chunked_digest"].as_str().unwrap(),
        "--json",
    ]));
    assert!(!bad.status.success());
    assert_eq!(assert_valid_output("verify", &bad.stdout)["ok"], false);

    // verify --pub, alone and with --digest: one document either way.
    let (sk, pk) = (t.path().join("k.key"), t.path().join("k.pub"));
    kiln_ship::sign::generate_unencrypted(&sk, &pk).unwrap();
    run_ok(kiln().arg("sign").arg("--key").arg(&sk).arg(&disk));
    let s = json_of(
        "verify",
        os![
            "verify",
            disk.as_os_str(),
            "--pub",
            pk.as_os_str(),
            "--json"
        ],
    );
    assert_eq!(s["signature"]["ok"], true);
    assert!(s.get("chunked_digest").is_none());
    assert_renames_caught("verify", &s, &[]);
    let both = json_of(
        "verify",
        os![
            "verify",
            disk.as_os_str(),
            "--pub",
            pk.as_os_str(),
            "--digest",
            report["chunked_digest"].as_str().unwrap(),
            "--json"
        ],
    );
    assert_eq!(both["ok"], true);
    assert_eq!(both["signature"]["ok"], true);
}

/// `kiln mkfs FORMAT --json` for each format, and `kiln inspect --json` of a bare filesystem.
#[test]
fn mkfs_outputs_follow_their_schemas() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n".repeat(1000)).unwrap();
    std::fs::write(
        src.join("sub/b.bin"),
        kiln_testkit::pseudo_random(7, 300_000),
    )
    .unwrap();
    for (format, extra) in [
        ("ext4", &[][..]),
        ("erofs", &["--compress", "lz4hc"][..]),
        ("vfat", &[][..]),
        ("iso9660", &[][..]),
    ] {
        let img = t.path().join(format!("fs.{format}"));
        let schema = format!("mkfs-{format}");
        let mut args: Vec<std::ffi::OsString> = vec![
            "mkfs".into(),
            format.into(),
            src.clone().into(),
            "-o".into(),
            img.clone().into(),
            "--json".into(),
            "-q".into(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let doc = json_of(&schema, &args);
        assert_eq!(doc["format"], format);
        assert_eq!(doc["digest"], digest_of(&img), "{format}");
        assert_eq!(
            doc["size"],
            std::fs::metadata(&img).unwrap().len(),
            "{format}"
        );
        assert_renames_caught(&schema, &doc, &[]);
        if format == "erofs" {
            assert_eq!(doc["compression"], "lz4hc");
        }
        if format == "vfat" {
            let ins = json_of("inspect", os!["inspect", "--json", img.as_os_str()]);
            assert_eq!(ins["filesystem"]["kind"], "vfat");
            assert_eq!(ins["filesystem"]["fat_bits"], doc["fat_bits"]);
        }
    }
}

/// docs/json holds exactly the schemas the tests above validate, each a valid draft 2020-12
/// schema whose `schema` constant is `kiln.NAME/MAJOR`.
#[test]
fn every_schema_is_tested() {
    let dir = kiln_testkit::schema::schema_dir();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let tested: BTreeSet<String> = SCHEMAS.iter().map(|n| format!("{n}.schema.json")).collect();
    assert_eq!(on_disk, tested);
    let re = regex::Regex::new(r"^kiln\.[a-z0-9-]+/[1-9][0-9]*$").unwrap();
    for n in SCHEMAS {
        let s = kiln_testkit::schema::load(n);
        let c = s["properties"]["schema"]["const"].as_str().unwrap();
        assert!(re.is_match(c), "{n}: schema {c:?}");
        assert_eq!(s["additionalProperties"], false, "{n}");
    }
}
