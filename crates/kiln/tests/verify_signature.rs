//! `kiln verify FILE --pub KEY`: kiln's own signatures verify, tampered files and wrong keys fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn verify_pub_accepts_good_and_rejects_tampered_or_wrong_key() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("k.key"), d.path().join("k.pub"));
    let (sk2, pk2) = (d.path().join("o.key"), d.path().join("o.pub"));
    kiln_ship::sign::generate_unencrypted(&sk, &pk).unwrap();
    kiln_ship::sign::generate_unencrypted(&sk2, &pk2).unwrap();
    let f = d.path().join("disk.img");
    std::fs::write(&f, vec![7u8; 100_000]).unwrap();
    let out = kiln()
        .args(["sign"])
        .arg(&f)
        .arg("--key")
        .arg(&sk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ok = kiln()
        .arg("verify")
        .arg(&f)
        .arg("--pub")
        .arg(&pk)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("signature ok"));

    let wrong = kiln()
        .arg("verify")
        .arg(&f)
        .arg("--pub")
        .arg(&pk2)
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "another key must not verify");

    let mut bytes = std::fs::read(&f).unwrap();
    bytes[500] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let bad = kiln()
        .arg("verify")
        .arg(&f)
        .arg("--pub")
        .arg(&pk)
        .output()
        .unwrap();
    assert!(!bad.status.success(), "a tampered file must not verify");
    assert!(!String::from_utf8_lossy(&bad.stderr).is_empty());
}
