//! Property tests: random trees through the FAT writer and random layouts through the GPT
//! writer read back identically; a share of the cases also go through fsck.fat / mcopy and
//! sgdisk, so the reference tools see shapes nobody wrote by hand.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use proptest::prelude::*;

use kiln_formats::fat::{self, FatOptions, FatReader, FatWriter};
use kiln_formats::fstree::{
    DataRef, FileData, HostContents, Meta, Node, NodeKind, Timestamp, Tree,
};
use kiln_formats::gpt::{Gpt, Partition};
use kiln_formats::repart::Uuid;
use kiln_formats::sink::MemSink;
use kiln_testkit::{pseudo_random, require_tool, run};

/// A name FAT can hold: a mix of ASCII, spaces, dots and non-ASCII, not ending in dot/space.
fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_~ .é名-]{0,40}[A-Za-z0-9é名]".prop_map(|s| s)
}

#[derive(Debug, Clone)]
struct Spec {
    files: Vec<(Vec<String>, usize, i64)>,
}

fn spec() -> impl Strategy<Value = Spec> {
    let file = (
        prop::collection::vec(name(), 1..5),
        0usize..20_000,
        0i64..5_000_000_000,
    );
    prop::collection::vec(file, 0..40).prop_map(|files| Spec { files })
}

/// Builds the tree, skipping entries whose path collides (case-insensitively, or file vs
/// directory) with an earlier one; returns the tree and the expected path → bytes.
fn build_tree(s: &Spec) -> (Tree, BTreeMap<String, Option<Vec<u8>>>) {
    let mut t = Tree::new(Meta::default());
    let mut want: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut folded: BTreeMap<String, bool> = BTreeMap::new(); // upper path -> is_dir
    'files: for (i, (comps, size, sec)) in s.files.iter().enumerate() {
        let mut path = String::new();
        for (k, c) in comps.iter().enumerate() {
            path.push('/');
            path.push_str(c);
            let is_dir = k + 1 < comps.len();
            let up = path.to_uppercase();
            match folded.get(&up) {
                Some(&d) if d && is_dir => {
                    if !want.contains_key(&path) {
                        continue 'files; // same dir in another case
                    }
                }
                Some(_) => continue 'files,
                None => {
                    folded.insert(up, is_dir);
                }
            }
        }
        let data = pseudo_random(i as u64 + 1, *size);
        let node = Node {
            kind: NodeKind::File(FileData::dense(
                data.len() as u64,
                DataRef::Inline(Arc::from(data.clone())),
            )),
            meta: Meta {
                mtime: Timestamp { sec: *sec, nsec: 0 },
                ..Meta::default()
            },
            slot: None,
        };
        t.insert(path.as_bytes(), node, &Meta::default()).unwrap();
        let mut p = String::new();
        for c in &comps[..comps.len() - 1] {
            p.push('/');
            p.push_str(c);
            want.insert(p.clone(), None);
        }
        want.insert(path, Some(data));
    }
    (t, want)
}

fn read_back(img: &[u8]) -> BTreeMap<String, Option<Vec<u8>>> {
    let rd = |off: u64, buf: &mut [u8]| {
        let o = off as usize;
        buf.copy_from_slice(&img[o..o + buf.len()]);
        Ok(())
    };
    let r = FatReader::open(rd).unwrap();
    r.walk()
        .unwrap()
        .into_iter()
        .map(|(p, e)| {
            let v = (!e.is_dir()).then(|| r.read_entry(&e).unwrap());
            (p, v)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn fat_random_trees_round_trip(s in spec(), check_tools in 0u8..6) {
        let (tree, want) = build_tree(&s);
        let (size, fat_type) = fat::auto_size(&tree, None, None, 4096).unwrap();
        let w = FatWriter::new(&tree, FatOptions {
            size,
            fat_type,
            volume_id: [9, 9, 9, 9],
            label: None,
        }).unwrap();
        let sink = MemSink::new(size as usize);
        w.write(&HostContents, &sink).unwrap();
        let img = sink.into_inner();
        prop_assert_eq!(read_back(&img), want);
        if check_tools == 0 {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("fat.img");
            std::fs::write(&p, &img).unwrap();
            let out = run(Command::new(require_tool("fsck.fat")).arg("-n").arg(&p));
            prop_assert!(out.status.success(), "fsck.fat -n: {}", String::from_utf8_lossy(&out.stdout));
        }
    }

    #[test]
    fn gpt_random_layouts_round_trip(
        sizes in prop::collection::vec((1u64..5000, 0u64..300, any::<u64>(), "[a-z0-9 é-]{0,36}"), 0..20),
        extra in 0u64..10_000,
        check_tools in 0u8..4,
    ) {
        let total: u64 = sizes.iter().map(|(n, gap, _, _)| n + gap).sum();
        let disk = (34 + total + 33 + extra) * 512;
        let mut g = Gpt::new(disk, Uuid::from_bytes([7; 16])).unwrap();
        let mut lba = 34;
        for (i, (n, gap, attrs, name)) in sizes.iter().enumerate() {
            lba += gap;
            let name: String = name.chars().take(36).collect();
            g.partitions.push(Partition {
                type_guid: Uuid::from_bytes([i as u8 + 1; 16]),
                part_guid: Uuid::from_bytes([i as u8 + 100; 16]),
                first_lba: lba,
                last_lba: lba + n - 1,
                attributes: *attrs,
                name,
            });
            lba += n;
        }
        let sink = MemSink::new(disk as usize);
        g.write(&sink).unwrap();
        let bytes = sink.into_inner();
        let back = Gpt::from_bytes(&bytes).unwrap();
        prop_assert_eq!(&back.partitions, &g.partitions);
        if check_tools == 0 {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("disk.img");
            std::fs::write(&p, &bytes).unwrap();
            let out = run(Command::new(require_tool("sgdisk")).arg("-v").arg(&p));
            let text = String::from_utf8_lossy(&out.stdout);
            prop_assert!(text.contains("No problems found"), "sgdisk -v: {}", text);
        }
    }
}
