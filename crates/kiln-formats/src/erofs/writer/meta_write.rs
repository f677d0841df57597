//! Writing the metadata once it is laid out ([`MetaLayout`]): inode cores with their xattrs and
//! payloads (inline tails, chunk maps, compressed index arrays) into the meta area, directory
//! blocks (dirents, then names) and long symlink targets into the tail area, the shared xattr
//! area, and the super block with its checksum.

use rayon::prelude::*;
use zerocopy::IntoBytes;

use super::meta::{node_path, DirPrep, MetaPrep, NodePrep};
use super::meta_layout::{Laid, MetaLayout};
use super::store::{Store, Tail};
use super::{read_source, write_sink, Compression, Error, Options, SlotLocation, Summary};
use crate::erofs::compact;
use crate::erofs::layout::*;
use crate::fstree::{Contents, Node, NodeId, NodeKind, Tree, ROOT};
use crate::sink::Sink;

impl MetaPrep {
    /// Writes metadata, directories, the shared xattr area and the super block.
    pub(super) fn write(
        &self,
        tree: &Tree,
        stores: &[Option<Store>],
        data_end: u64,
        sink: &dyn Sink,
        contents: Option<&dyn Contents>,
        opts: &Options,
    ) -> Result<Summary, Error> {
        let m = self.layout(tree, stores, data_end)?;
        let size = m.total_blocks * BLOCK;
        if sink.len() < size {
            return Err(Error::NoRoom {
                need: size,
                have: sink.len(),
            });
        }
        let nid_of = {
            let mut v = vec![0u64; tree.nodes.len()];
            for (i, &id) in self.walk.iter().enumerate() {
                v[id as usize] = m.offsets[i] / ISLOT;
            }
            v
        };
        // Inline tails of files written from an indexed source: read in parallel, a batch of
        // inodes at a time so only one batch of tails is in memory besides the metadata area.
        let read_tail = |&id: &NodeId| inline_tail(tree, stores, contents, id);
        const TAIL_BATCH: usize = 4096;
        let mut w = MetaWriter {
            prep: self,
            tree,
            stores,
            sink,
            m: &m,
            nid_of: &nid_of,
            meta: vec![0u8; (m.meta_blocks * BLOCK) as usize],
        };
        let mut slots = Vec::new();
        let mut tails: Vec<Option<Vec<u8>>> = Vec::new();
        for (i, &id) in self.walk.iter().enumerate() {
            if i % TAIL_BATCH == 0 {
                let end = (i + TAIL_BATCH).min(self.walk.len());
                tails = self.walk[i..end]
                    .par_iter()
                    .map(read_tail)
                    .collect::<Result<_, _>>()?;
            }
            let tail = tails.get(i % TAIL_BATCH).and_then(|t| t.as_deref());
            slots.extend(w.inode(i, id, tail)?);
        }
        write_sink(sink, m.meta_blkaddr * BLOCK, &w.meta)?;
        if !self.shared.is_empty() {
            write_sink(sink, m.shared_blkaddr * BLOCK, &self.shared)?;
        }
        self.write_super(&m, nid_of[ROOT as usize], stores, sink, opts)?;
        Ok(Summary {
            size,
            inodes: self.walk.len() as u64,
            data_blocks: data_end - 1,
            meta_blocks: m.total_blocks - m.shared_blkaddr,
            compressed_files: 0,
            shared_files: 0,
            shared_bytes: 0,
            slots,
            root_nid: nid_of[ROOT as usize],
        })
    }

    /// Writes the super block (and the LZ4 config after it), checksummed over bytes 1024..4096.
    fn write_super(
        &self,
        m: &MetaLayout,
        root_nid: u64,
        stores: &[Option<Store>],
        sink: &dyn Sink,
        opts: &Options,
    ) -> Result<(), Error> {
        let any_chunked = stores
            .iter()
            .flatten()
            .any(|s| matches!(s, Store::Chunked { .. }));
        let compressing = opts.compression != Compression::None;
        let mut incompat = 0;
        if compressing {
            incompat |= FEATURE_INCOMPAT_LZ4_0PADDING | FEATURE_INCOMPAT_BIG_PCLUSTER;
        }
        if any_chunked {
            incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
        }
        let mut volume_name = [0u8; 16];
        volume_name[..opts.volume_name.len().min(16)]
            .copy_from_slice(&opts.volume_name[..opts.volume_name.len().min(16)]);
        let sb = SuperBlock {
            magic: MAGIC.into(),
            checksum: 0.into(),
            feature_compat: FEATURE_COMPAT_SB_CHKSUM.into(),
            blkszbits: BLKSZ_BITS,
            sb_extslots: 0,
            root_nid: (root_nid as u16).into(),
            inos: (self.walk.len() as u64).into(),
            build_time: (self.build_time.sec as u64).into(),
            build_time_nsec: self.build_time.nsec.into(),
            blocks: (m.total_blocks as u32).into(),
            meta_blkaddr: (m.meta_blkaddr as u32).into(),
            xattr_blkaddr: (if self.shared.is_empty() {
                0
            } else {
                m.shared_blkaddr as u32
            })
            .into(),
            uuid: opts.uuid,
            volume_name,
            feature_incompat: incompat.into(),
            available_compr_algs: (if compressing {
                1u16 << COMPRESSION_LZ4
            } else {
                0
            })
            .into(),
            ..Default::default()
        };
        let mut block0 = vec![0u8; (BLOCK - SUPER_OFFSET) as usize];
        block0[..128].copy_from_slice(sb.as_bytes());
        if compressing {
            block0[128..130].copy_from_slice(&14u16.to_le_bytes());
            block0[130..144].copy_from_slice(
                Lz4Cfgs {
                    max_distance: 65535.into(),
                    max_pclusterblks: (opts.pcluster_blocks as u16).into(),
                    ..Default::default()
                }
                .as_bytes(),
            );
        }
        let crc = sb_checksum(&block0);
        block0[4..8].copy_from_slice(&crc.to_le_bytes());
        write_sink(sink, SUPER_OFFSET, &block0)
    }
}

/// The inline tail of a file written from an indexed source, read from `contents`; `None` for
/// every other node (no inline tail, or its bytes are already in its store).
fn inline_tail(
    tree: &Tree,
    stores: &[Option<Store>],
    contents: Option<&dyn Contents>,
    id: NodeId,
) -> Result<Option<Vec<u8>>, Error> {
    let (
        Some(Store::Flat {
            size,
            tail: Tail::Inline(None),
            ..
        }),
        NodeKind::File(f),
    ) = (
        stores.get(id as usize).and_then(Option::as_ref),
        &tree.node(id).kind,
    )
    else {
        return Ok(None);
    };
    let Some(c) = contents else {
        return Err(Error::corrupt(0, "internal: no source for inline tails"));
    };
    let t = size % BLOCK;
    let mut b = vec![0u8; t as usize];
    read_source(c, f, size - t, &mut b).map_err(|e| Error::Unsupported {
        path: node_path(tree, id),
        reason: e.to_string(),
    })?;
    Ok(Some(b))
}

/// The meta area being filled, and what filling it reads.
struct MetaWriter<'a> {
    prep: &'a MetaPrep,
    tree: &'a Tree,
    /// Indexed by node id.
    stores: &'a [Option<Store>],
    sink: &'a dyn Sink,
    m: &'a MetaLayout,
    nid_of: &'a [u64],
    /// The meta area's bytes, written to the image at `m.meta_blkaddr` when complete.
    meta: Vec<u8>,
}

impl MetaWriter<'_> {
    /// Copies `b` into the meta area at `at`.
    fn put(&mut self, at: usize, b: &[u8]) -> Result<(), Error> {
        self.meta
            .get_mut(at..at + b.len())
            .ok_or_else(|| Error::corrupt(at as u64, "internal: metadata past its area"))?
            .copy_from_slice(b);
        Ok(())
    }

    /// Writes the node at walk position `i`: its inode core, xattrs and payload. `tail` is its
    /// inline tail when that was read from the source. Returns the node's slot location when it
    /// is a slot file.
    fn inode(
        &mut self,
        i: usize,
        id: NodeId,
        tail: Option<&[u8]>,
    ) -> Result<Option<SlotLocation>, Error> {
        let (prep, m) = (self.prep, self.m);
        let node = self.tree.node(id);
        let p = prep.prep(id)?;
        let l = &m.laid[i];
        let off = m.offsets[i] as usize;
        let core = inode_core(node, p, l);
        self.put(off, &core)?;
        self.put(off + core.len(), &p.xattrs)?;
        let ibody = core.len() as u64 + p.xattrs.len() as u64;
        self.payload(i, id, off, ibody, tail)?;
        let store = self.stores.get(id as usize).and_then(Option::as_ref);
        let (Some(s), Some(Store::Flat { blkaddr, .. })) = (&node.slot, store) else {
            return Ok(None);
        };
        Ok(Some(SlotLocation {
            name: s.name.clone(),
            nid: m.offsets[i] / ISLOT,
            inode_offset: m.meta_blkaddr * BLOCK + m.offsets[i],
            data_offset: blkaddr * BLOCK,
            capacity: s.capacity,
            extended: p.extended,
        }))
    }

    /// Writes what follows the inode at `off` (whose core and xattrs take `ibody` bytes): an
    /// inline tail, a chunk map, a compressed file's map header and indexes, or a directory's
    /// or symlink's data (inline, or in its tail-area blocks).
    fn payload(
        &mut self,
        i: usize,
        id: NodeId,
        off: usize,
        ibody: u64,
        tail: Option<&[u8]>,
    ) -> Result<(), Error> {
        let (tree, m) = (self.tree, self.m);
        let node = tree.node(id);
        let l = &m.laid[i];
        let payload = off + l.shape.head as usize;
        let store = self.stores.get(id as usize).and_then(Option::as_ref);
        match (&node.kind, store) {
            (
                NodeKind::File(_),
                Some(Store::Flat {
                    tail: Tail::Inline(t),
                    size,
                    ..
                }),
            ) => {
                let bytes = t
                    .as_deref()
                    .or(tail)
                    .ok_or_else(|| Error::corrupt(0, "internal: inline tail missing"))?;
                if bytes.len() as u64 != size % BLOCK {
                    return Err(Error::Unsupported {
                        path: node_path(tree, id),
                        reason: "file tail shorter than its size".into(),
                    });
                }
                self.put(payload, bytes)?;
            }
            (NodeKind::File(_), Some(Store::Chunked { map, .. })) => {
                for (k, a) in map.iter().enumerate() {
                    self.put(payload + 4 * k, &a.to_le_bytes())?;
                }
            }
            (NodeKind::File(_), Some(Store::Compressed { indexes, .. })) => {
                let hdr = off + round_up(ibody, 8) as usize;
                let advise = match l.compact {
                    Some(_) => {
                        ADVISE_BIG_PCLUSTER_1
                            | compact::ADVISE_BIG_PCLUSTER_2
                            | compact::ADVISE_COMPACTED_2B
                    }
                    None => ADVISE_BIG_PCLUSTER_1,
                };
                self.put(
                    hdr,
                    MapHeader {
                        h_advise: advise.into(),
                        h_algorithmtype: COMPRESSION_LZ4,
                        h_clusterbits: 0,
                        ..Default::default()
                    }
                    .as_bytes(),
                )?;
                if let Some(c) = &l.compact {
                    self.put(payload, c)?;
                } else {
                    for (k, x) in indexes.iter().enumerate() {
                        self.put(payload + 8 * k, x.as_bytes())?;
                    }
                }
            }
            (NodeKind::Dir(_), _) => {
                let d = self
                    .prep
                    .dirs
                    .get(&id)
                    .ok_or_else(|| Error::corrupt(0, "internal: directory not prepared"))?;
                let bytes = dir_bytes(tree, d, self.nid_of);
                let full = (d.size / BLOCK * BLOCK) as usize;
                let (blocks_part, tail_part) = if l.shape.tail {
                    (&bytes[..full], &bytes[full..])
                } else {
                    (&bytes[..], &[][..])
                };
                if let Some(b) = m.tail_blocks[i] {
                    write_sink(self.sink, b * BLOCK, blocks_part)?;
                }
                self.put(payload, tail_part)?;
            }
            (NodeKind::Symlink(t), _) => {
                if l.shape.tail {
                    self.put(payload, t)?;
                } else if let Some(b) = m.tail_blocks[i] {
                    write_sink(self.sink, b * BLOCK, t)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A node's inode core, compact or extended, from its prepared facts and its layout.
fn inode_core(node: &Node, p: &NodePrep, l: &Laid) -> Vec<u8> {
    let format = (u16::from(l.layout) << I_DATALAYOUT_SHIFT)
        | if p.extended { I_VERSION_EXTENDED } else { 0 };
    let icount = if p.xattrs.is_empty() {
        0
    } else {
        ((p.xattrs.len() - 12) / 4 + 1) as u16
    };
    let mode = node.mode() as u16;
    let md = &node.meta;
    if p.extended {
        InodeExtended {
            i_format: format.into(),
            i_xattr_icount: icount.into(),
            i_mode: mode.into(),
            i_size: l.size.into(),
            i_u: l.i_u.into(),
            i_ino: p.ino.into(),
            i_uid: md.uid.into(),
            i_gid: md.gid.into(),
            i_mtime: (md.mtime.sec as u64).into(),
            i_mtime_nsec: md.mtime.nsec.into(),
            i_nlink: p.nlink.into(),
            ..Default::default()
        }
        .as_bytes()
        .to_vec()
    } else {
        InodeCompact {
            i_format: format.into(),
            i_xattr_icount: icount.into(),
            i_mode: mode.into(),
            i_nlink: (p.nlink as u16).into(),
            i_size: (l.size as u32).into(),
            i_u: l.i_u.into(),
            i_ino: p.ino.into(),
            i_uid: (md.uid as u16).into(),
            i_gid: (md.gid as u16).into(),
            ..Default::default()
        }
        .as_bytes()
        .to_vec()
    }
}

fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::Dir(_) => ft::DIR,
        NodeKind::File(_) => ft::REG_FILE,
        NodeKind::Symlink(_) => ft::SYMLINK,
        NodeKind::CharDev { .. } => ft::CHRDEV,
        NodeKind::BlockDev { .. } => ft::BLKDEV,
        NodeKind::Fifo => ft::FIFO,
        NodeKind::Socket => ft::SOCK,
    }
}

/// A directory's data: per block, the dirent array then the names.
fn dir_bytes(tree: &Tree, d: &DirPrep, nid_of: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(d.size as usize);
    for (b, &start) in d.block_starts.iter().enumerate() {
        let end = d
            .block_starts
            .get(b + 1)
            .copied()
            .unwrap_or(d.entries.len());
        let ents = &d.entries[start..end];
        let block_base = out.len();
        let mut nameoff = 12 * ents.len();
        for (name, node) in ents {
            out.extend_from_slice(
                Dirent {
                    nid: nid_of[*node as usize].into(),
                    nameoff: (nameoff as u16).into(),
                    file_type: file_type(&tree.node(*node).kind),
                    reserved: 0,
                }
                .as_bytes(),
            );
            nameoff += name.len();
        }
        for (name, _) in ents {
            out.extend_from_slice(name);
        }
        if end < d.entries.len() {
            out.resize(block_base + BLOCK as usize, 0);
        }
    }
    out
}
