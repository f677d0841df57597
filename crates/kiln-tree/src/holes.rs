//! Holes from zeroes: every 4 KiB block of regular-file data whose bytes are all zero becomes
//! a hole, whatever the source. `docker export` and most tars are never sparse, so without
//! this a file of zeroes costs its full size in the image; with it, a directory (SEEK_HOLE), a
//! sparse tar and a dense tar of the same tree give the same data runs and so the same image.
//!
//! Where the data streams through anyway, the blocks are tested there: the build's spool
//! ([`crate::spool::Spool::zero_holes`]) and the ext4 stream writer (`ext4::Options::zero_holes`).
//! An indexed tree (a directory, an uncompressed tar) is planned before any byte is copied, and
//! planning must know the holes, so [`find`] reads its files once beforehand, in parallel,
//! only the blocks their existing data runs touch. Slot files are left alone: a slot's
//! reservation is real, allocated data that injection overwrites.

use kiln_formats::fstree::{
    find_holes, find_mostly_holes, Contents, DataRef, FileData, NodeKind, Tree,
};
use rayon::prelude::*;

use crate::Error;

/// Finds the all-zero blocks of every regular file of `tree` that is not a slot and whose data
/// `contents` reads, and makes them holes. Returns the bytes read.
pub fn find(tree: &mut Tree, contents: &dyn Contents) -> Result<u64, Error> {
    find_where(tree, contents, &|_| true)
}

/// [`find`] for a writer that gives a file holes only when at most half of it is data (a
/// compressed EROFS image): a file is read only until more than half of it is known to be
/// data, and then left as it was (see [`find_mostly_holes`]). The image is the same as after
/// [`find`]; the reading is about halved.
pub fn find_mostly(tree: &mut Tree, contents: &dyn Contents) -> Result<u64, Error> {
    scan(tree, contents, &|_| true, find_mostly_holes)
}

/// [`find`] for the files `pick` selects (a build's `[source] add` files, laid over a tree
/// whose holes are already known).
pub fn find_where(
    tree: &mut Tree,
    contents: &dyn Contents,
    pick: &(dyn Fn(&FileData) -> bool + Sync),
) -> Result<u64, Error> {
    scan(tree, contents, pick, find_holes)
}

/// Runs `finder` over the files `pick` selects, in parallel.
fn scan(
    tree: &mut Tree,
    contents: &dyn Contents,
    pick: &(dyn Fn(&FileData) -> bool + Sync),
    finder: fn(&FileData, &dyn Contents, &mut [u8]) -> std::io::Result<FileData>,
) -> Result<u64, Error> {
    let files: Vec<(usize, &FileData)> = tree
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.slot.is_none())
        .filter_map(|(i, n)| match &n.kind {
            NodeKind::File(f)
                if !matches!(f.data, DataRef::Empty | DataRef::Placed(_)) && pick(f) =>
            {
                Some((i, f))
            }
            _ => None,
        })
        .collect();
    let found: Vec<(usize, FileData, u64)> = files
        .par_iter()
        .map_init(
            || vec![0u8; 1 << 20],
            |buf, &(i, f)| match finder(f, contents, buf) {
                Ok(nf) => Ok((i, nf, f.stored_len())),
                Err(e) => Err((i, e)),
            },
        )
        .collect::<Result<_, _>>()
        .map_err(|(i, e)| Error::Source {
            path: path_of(tree, i),
            msg: format!("reading it to find all-zero blocks: {e}"),
        })?;
    let mut total = 0;
    for (i, nf, read) in found {
        total += read;
        tree.nodes[i].kind = NodeKind::File(nf);
    }
    Ok(total)
}

/// The path of node `i` (for an error message).
fn path_of(tree: &Tree, i: usize) -> String {
    let mut found = None;
    tree.walk_paths(|p, id| {
        if id as usize == i && found.is_none() {
            found = Some(String::from_utf8_lossy(p).into_owned());
        }
    });
    found.unwrap_or_else(|| format!("node {i}"))
}
