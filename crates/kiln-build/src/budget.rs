//! What a tree weighs: the heaviest paths, directories aggregated, for budget overruns.

use kiln_formats::fstree::{NodeKind, Tree, ROOT};

use crate::spec::human_size;

/// Bytes a node occupies on a 4 KiB-block filesystem (data blocks only; holes are free).
fn weight(tree: &Tree, id: u32) -> u64 {
    match &tree.node(id).kind {
        NodeKind::File(f) => f.runs().iter().map(|r| r.len.div_ceil(4096) * 4096).sum(),
        NodeKind::Symlink(t) if t.len() >= 60 => 4096,
        NodeKind::Dir(e) => (e.len() as u64 * 32).div_ceil(4096).max(1) * 4096,
        _ => 0,
    }
}

/// The `n` heaviest paths below `root` (a directory node), each directory counting everything
/// under it, heaviest first (ties by path). Hardlinked files count once, at their first path.
pub fn heaviest(tree: &Tree, root: u32, n: usize) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = Vec::new();
    let mut counted = vec![false; tree.nodes.len()];
    fn rec(
        tree: &Tree,
        id: u32,
        path: &mut Vec<u8>,
        counted: &mut [bool],
        all: &mut Vec<(String, u64)>,
    ) -> u64 {
        if std::mem::replace(&mut counted[id as usize], true) {
            return 0;
        }
        let mut total = weight(tree, id);
        for e in tree.entries(id) {
            let len = path.len();
            path.push(b'/');
            path.extend_from_slice(&e.name);
            total += rec(tree, e.node, path, counted, all);
            path.truncate(len);
        }
        if !path.is_empty() {
            all.push((String::from_utf8_lossy(path).into_owned(), total));
        }
        total
    }
    rec(tree, root, &mut Vec::new(), &mut counted, &mut all);
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// Total weight of everything under `root`.
pub fn total(tree: &Tree, root: u32) -> u64 {
    let mut counted = vec![false; tree.nodes.len()];
    let mut stack = vec![root];
    let mut sum = 0;
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut counted[id as usize], true) {
            continue;
        }
        sum += weight(tree, id);
        stack.extend(tree.entries(id).iter().map(|e| e.node));
    }
    sum
}

/// A human table of the heaviest paths, one per line: `  123.4 MiB  /usr/lib`.
pub fn report(tree: &Tree, n: usize) -> String {
    heaviest(tree, ROOT, n)
        .into_iter()
        .map(|(p, w)| format!("  {:>10}  {p}\n", human_size(w)))
        .collect()
}

/// Like [`report`], for a filesystem that was written and took `written` bytes: each path's
/// weight is scaled by `written / total`, its share of what was written. For a compressed
/// filesystem this ranks and sizes paths by their compressed share instead of their raw bytes
/// (a per-partition average: kiln does not attribute compressed clusters to single files).
pub fn report_share(tree: &Tree, n: usize, written: u64) -> String {
    let all = total(tree, ROOT).max(1);
    let share = |w: u64| (u128::from(w) * u128::from(written) / u128::from(all)) as u64;
    let mut o = format!(
        "  (shares of the {} written; the tree holds {} uncompressed)\n",
        human_size(written),
        human_size(all)
    );
    for (p, w) in heaviest(tree, ROOT, n) {
        o += &format!("  {:>10}  {p}\n", human_size(share(w)));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::fstree::{DataRef, FileData, Meta, Node};

    #[test]
    fn directories_aggregate_and_sort_first() {
        let mut t = Tree::default();
        let m = Meta::default();
        let file = |size: u64| Node {
            kind: NodeKind::File(FileData::dense(
                size,
                DataRef::Inline(vec![0; size as usize].into()),
            )),
            meta: Meta::default(),
            slot: None,
        };
        t.insert(b"/usr/lib/big", file(100_000), &m).unwrap();
        t.insert(b"/usr/lib/small", file(10), &m).unwrap();
        t.insert(b"/etc/conf", file(5000), &m).unwrap();
        let h = heaviest(&t, ROOT, 3);
        assert_eq!(h[0].0, "/usr");
        assert_eq!(h[1].0, "/usr/lib");
        assert_eq!(h[2].0, "/usr/lib/big");
        assert!(h[0].1 > h[2].1);
        assert_eq!(h[2].1, 102400);
        assert!(report(&t, 20).contains("/etc/conf"));
        // Written at a quarter of its weight: every share is a quarter.
        let all = total(&t, ROOT);
        let r = report_share(&t, 3, all / 4);
        let usr = r.lines().find(|l| l.ends_with("/usr")).unwrap();
        assert!(usr.contains(&human_size(h[0].1 / 4)), "{r}");
    }
}
