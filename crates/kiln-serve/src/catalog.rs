//! The catalog: each configured base image opened once, with its slot table and chunk table.
//! A base is a local file or an object in an S3-compatible store read with ranged GETs; either
//! way it is only ever read.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use kiln_inject::chunks::{ChunkTable, ChunkedDigest, CHUNK_SIZE};
use kiln_inject::sha256::{self, Sha256Resumable};
use kiln_inject::slots::{self, SlotTable};
use kiln_inject::source::AsyncFileSource;
use kiln_inject::{AsyncRangeSource, FileSource, ReadAt};
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore};
use sha2::{Digest, Sha256};

use crate::config::ImageConfig;

/// A base image readable both ways: streamed (downloads) and positionally (planning, patched
/// chunks). The positional reader may block; call it from the blocking pool.
#[derive(Clone)]
pub struct Base {
    /// Streamed reads.
    pub stream: Arc<dyn AsyncRangeSource>,
    /// Positional reads (blocking).
    pub sync: Arc<dyn ReadAt + Send + Sync>,
    /// The open file, when the base is a local one: downloads send it with sendfile(2).
    pub file: Option<Arc<FileSource>>,
}

/// One catalog entry.
pub struct Image {
    /// Configuration.
    pub config: ImageConfig,
    /// The base.
    pub base: Base,
    /// Its slot table.
    pub table: SlotTable,
    /// Its chunk table.
    pub chunks: ChunkTable,
    /// Its chunked digest.
    pub digest: ChunkedDigest,
    /// The version shown and used in download names.
    pub version: Option<String>,
}

impl Image {
    /// Size of the base (and of every download) in bytes.
    pub fn len(&self) -> u64 {
        self.table.image_len
    }

    /// True for an empty base.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot pieces go into.
    pub fn slot(&self) -> Option<&kiln_inject::Slot> {
        self.table.get(&self.config.slot)
    }

    /// The download file name for `piece`: the configured template, by default
    /// `NAME-VERSION-PIECE.EXT`. `label` (see [`piece_label`]) stands for the piece when given;
    /// an upload id without one is shortened to its first 8 hex digits.
    pub fn filename(&self, piece: &str, label: Option<&str>) -> String {
        let short;
        let piece = match label {
            Some(l) => l,
            None if crate::store::is_upload_id(piece) => {
                short = piece[..10].to_string();
                &short
            }
            None => piece,
        };
        let version = self.version.as_deref().unwrap_or("");
        let template = match (&self.config.filename, &self.version) {
            (Some(t), _) => t.as_str(),
            (None, Some(_)) => "{name}-{version}-{piece}.{ext}",
            (None, None) => "{name}-{piece}.{ext}",
        };
        template
            .replace("{name}", &self.config.name)
            .replace("{version}", version)
            .replace("{piece}", piece)
            .replace("{ext}", &self.config.extension)
    }

    /// The title shown for the image.
    pub fn title(&self) -> &str {
        self.config.title.as_deref().unwrap_or(&self.config.name)
    }
}

/// A download-name label from user text (an uploaded file's name): letters, digits, `.`,
/// `_` and `-` kept, spaces become `-`, the rest dropped, at most 40 characters, starting with
/// a letter or digit. `None` when nothing is left.
pub fn piece_label(text: &str) -> Option<String> {
    let stem = text
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(text)
        .trim_end_matches(".html")
        .trim_end_matches(".htm")
        .trim_end_matches(".txt");
    let kept: String = stem
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(40)
        .collect();
    let kept = kept.trim_end_matches(['.', '-', '_']).replace("..", ".");
    (!kept.is_empty()).then_some(kept)
}

/// Bytes per ranged GET when streaming from an object store.
const OBJECT_PIECE: u64 = 64 << 20;
/// A GET body that yields nothing for this long fails.
const OBJECT_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Fails `s` if it yields nothing for `d`.
fn idle_timeout(
    s: BoxStream<'static, io::Result<Bytes>>,
    d: std::time::Duration,
    what: String,
) -> BoxStream<'static, io::Result<Bytes>> {
    futures::stream::unfold(Some(s), move |st| {
        let what = what.clone();
        async move {
            let mut s = st?;
            match tokio::time::timeout(d, s.next()).await {
                Ok(Some(item)) => Some((item, Some(s))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{what}: no data for {d:?}"),
                    )),
                    None,
                )),
            }
        }
    })
    .boxed()
}

/// An object in an object store, read with ranged GETs.
pub struct ObjectBase {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    len: u64,
    url: String,
    rt: tokio::runtime::Handle,
    /// Bytes per ranged GET (OBJECT_PIECE; smaller in tests).
    piece: u64,
}

impl AsyncRangeSource for ObjectBase {
    fn len(&self) -> u64 {
        self.len
    }

    fn stream(&self, range: Range<u64>) -> BoxStream<'static, io::Result<Bytes>> {
        let store = self.store.clone();
        let path = self.path.clone();
        let url = self.url.clone();
        let piece = self.piece;
        // One GET per OBJECT_PIECE bytes, issued only when the previous one is consumed, each
        // body guarded by an idle timeout: a stalled store fails the download instead of
        // holding it open, and a slow client never keeps one request open for long.
        let pieces = (range.start..range.end)
            .step_by(piece as usize)
            .map(move |a| a..(a + piece).min(range.end));
        futures::stream::iter(pieces)
            .flat_map(move |r| {
                let (store, path, url) = (store.clone(), path.clone(), url.clone());
                let what = format!("{url} bytes {r:?}");
                let get = futures::stream::once(async move {
                    let opts = GetOptions {
                        range: Some(GetRange::Bounded(r.clone())),
                        ..Default::default()
                    };
                    store
                        .get_opts(&path, opts)
                        .await
                        .map(|g| g.into_stream().map_err(io::Error::other))
                        .map_err(|e| io::Error::other(format!("{url} bytes {r:?}: {e}")))
                })
                .try_flatten()
                .boxed();
                idle_timeout(get, OBJECT_IDLE, what)
            })
            .boxed()
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

impl ReadAt for ObjectBase {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let end = (offset + buf.len() as u64).min(self.len);
        if offset >= end {
            return Ok(0);
        }
        let bytes = self
            .rt
            .block_on(self.store.get_range(&self.path, offset..end))
            .map_err(|e| io::Error::other(format!("{} bytes {offset}..{end}: {e}", self.url)))?;
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok(n)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

async fn get_optional(store: &dyn ObjectStore, path: &ObjPath) -> anyhow::Result<Option<Bytes>> {
    match store.get(path).await {
        Ok(r) => Ok(Some(r.bytes().await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Streams an object once to hash its chunks, its plain sha256 and the SHA-256 midstates at
/// `points` (when it has no usable `.chunks` sidecar).
async fn compute_chunks_streaming(
    base: &dyn AsyncRangeSource,
    points: &[u64],
) -> anyhow::Result<ChunkTable> {
    let len = base.len();
    let mut points: Vec<u64> = points
        .iter()
        .map(|p| p / sha256::BLOCK * sha256::BLOCK)
        .filter(|&p| p <= len)
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut points = points.into_iter().peekable();
    let mut midstates = Vec::new();
    let mut digests = Vec::new();
    let mut h = Sha256::new();
    let mut whole = Sha256Resumable::new();
    let mut in_chunk = 0u64;
    let mut s = base.stream(0..len);
    loop {
        while points.peek() == Some(&whole.position()) {
            midstates.extend(whole.midstate());
            points.next();
        }
        let Some(b) = s.next().await else { break };
        let mut b = b?;
        while !b.is_empty() {
            let mut take = ((CHUNK_SIZE - in_chunk) as usize).min(b.len());
            if let Some(&p) = points.peek() {
                take = take.min((p - whole.position()) as usize);
            }
            whole.update(&b[..take]);
            h.update(&b[..take]);
            in_chunk += take as u64;
            b = b.slice(take..);
            if in_chunk == CHUNK_SIZE {
                digests.push(h.finalize_reset().into());
                in_chunk = 0;
            }
            while points.peek() == Some(&whole.position()) {
                midstates.extend(whole.midstate());
                points.next();
            }
        }
    }
    if in_chunk > 0 {
        digests.push(h.finalize().into());
    }
    Ok(ChunkTable {
        chunk_size: CHUNK_SIZE,
        image_len: len,
        digests,
        sha256: Some(whole.finalize()),
        midstates,
    })
}

/// Opens a configured image.
pub async fn open(config: &ImageConfig) -> anyhow::Result<Image> {
    let (base, table, chunks) = if config.base.contains("://") {
        open_object(config).await?
    } else {
        open_local(config).await?
    };
    let Some(slot) = table.get(&config.slot) else {
        bail!(
            "image {:?}: the base has no slot {:?} (it has: {})",
            config.name,
            config.slot,
            table.names()
        );
    };
    tracing::info!(image = %config.name, base = %config.base, len = table.image_len,
        slot = %slot.name, capacity = slot.capacity, digest = %chunks.digest(), "image ready");
    let digest = chunks.digest();
    Ok(Image {
        config: config.clone(),
        base,
        table,
        chunks,
        digest,
        version: config.version(),
    })
}

async fn open_local(config: &ImageConfig) -> anyhow::Result<(Base, SlotTable, ChunkTable)> {
    let path = Path::new(&config.base).to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let src = FileSource::open(&path)?;
        let (table, _) = slots::find_table(&path, src.file(), None)?;
        let points = table.resume_points();
        let place = kiln_inject::chunks::sidecar_path(&path)
            .display()
            .to_string();
        let mut chunks = match ChunkTable::load_sidecar(&path, src.len())? {
            Some(c) => c,
            None => {
                tracing::warn!(base = %path.display(), "no chunk table sidecar; hashing the base");
                ChunkTable::compute_resumable(&src, &points)?
            }
        };
        if !chunks.has_midstates_at(&points) {
            tracing::warn!(base = %place,
                "the chunk table has no SHA-256 midstates for the slots (made by an older kiln?); \
                 hashing the base once; `kiln verify --write-chunks` stores them");
            chunks.add_midstates(&src, &points, &place)?;
        }
        chunks.verify_midstates(&src, &place)?;
        let stream = AsyncFileSource::new(src);
        let file = stream.sync().clone();
        Ok((
            Base {
                stream: Arc::new(stream),
                sync: file.clone(),
                file: Some(file),
            },
            table,
            chunks,
        ))
    })
    .await?
}

async fn open_object(config: &ImageConfig) -> anyhow::Result<(Base, SlotTable, ChunkTable)> {
    let url = &config.base;
    let (store, key) =
        crate::store::s3(url, &config.store).with_context(|| format!("image {:?}", config.name))?;
    let path = ObjPath::from(key.as_str());
    let meta = store.head(&path).await.with_context(|| url.to_string())?;
    let len = meta.size;
    let ob = Arc::new(ObjectBase {
        store: store.clone(),
        path: path.clone(),
        len,
        url: url.clone(),
        rt: tokio::runtime::Handle::current(),
        piece: OBJECT_PIECE,
    });
    // The table: in the object at 24576, else the sidecar object.
    let area_end = (slots::TABLE_OFFSET + slots::TABLE_MAX as u64).min(len);
    let area = if len > slots::TABLE_OFFSET {
        store
            .get_range(&path, slots::TABLE_OFFSET..area_end)
            .await?
    } else {
        Bytes::new()
    };
    let table = if area.starts_with(&slots::MAGIC) {
        let t = SlotTable::decode(&area, url)?;
        t.check_image_len(len, url)?;
        t
    } else {
        let side = ObjPath::from(format!("{key}.slots.json"));
        let Some(text) = get_optional(store.as_ref(), &side).await? else {
            bail!(
                "{url}: no slot table at offset {} and no {key}.slots.json",
                slots::TABLE_OFFSET
            );
        };
        let t = SlotTable::from_sidecar_json(&text, &format!("{url}.slots.json"))?;
        t.check_image_len(len, url)?;
        t
    };
    let points = table.resume_points();
    let sidecar =
        match get_optional(store.as_ref(), &ObjPath::from(format!("{key}.chunks"))).await? {
            Some(b) => {
                let t = ChunkTable::from_bytes(&b, &format!("{url}.chunks"))?;
                if t.image_len != len {
                    bail!(
                        "{url}.chunks describes {} bytes, the object is {len}",
                        t.image_len
                    );
                }
                Some(t)
            }
            None => None,
        };
    let chunks = match sidecar {
        Some(t) if t.has_midstates_at(&points) => {
            let (ob, place) = (ob.clone(), format!("{url}.chunks"));
            // The check reads the tail with blocking ranged GETs.
            tokio::task::spawn_blocking(move || t.verify_midstates(ob.as_ref(), &place).map(|_| t))
                .await??
        }
        other => {
            tracing::warn!(base = %url, found = other.is_some(),
                "no .chunks sidecar object with SHA-256 midstates; streaming the base once to hash it");
            compute_chunks_streaming(ob.as_ref(), &points).await?
        }
    };
    Ok((
        Base {
            stream: ob.clone(),
            sync: ob,
            file: None,
        },
        table,
        chunks,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::PutPayload;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn object_ranges_span_get_pieces_exactly() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let path = ObjPath::from("b/base.img");
        store
            .put(&path, PutPayload::from(data.clone()))
            .await
            .unwrap();
        let ob = Arc::new(ObjectBase {
            store,
            path,
            len: data.len() as u64,
            url: "memory://b/base.img".into(),
            rt: tokio::runtime::Handle::current(),
            piece: 1000,
        });
        for r in [
            0..10_000u64,
            999..1001,
            1000..2000,
            5..9_995,
            7..7,
            9_999..10_000,
        ] {
            let mut got = Vec::new();
            let mut s = ob.stream(r.clone());
            while let Some(b) = s.next().await {
                got.extend_from_slice(&b.unwrap());
            }
            assert_eq!(got, &data[r.start as usize..r.end as usize], "{r:?}");
        }
        // The blocking reader (used for planning and patched chunks) agrees.
        let ob2 = ob.clone();
        let got = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 2500];
            ob2.read_exact_at(1500, &mut buf).map(|_| buf)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got, &data[1500..4000]);
        // Streaming chunk hashing equals the positional computation.
        let points = [0, 999, 1000, 4096, 9_999, 10_000];
        let streamed = compute_chunks_streaming(ob.as_ref(), &points)
            .await
            .unwrap();
        let ob3 = ob.clone();
        let direct = tokio::task::spawn_blocking(move || {
            ChunkTable::compute_resumable(ob3.as_ref(), &points)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(streamed, direct);
        let at: Vec<u64> = streamed.midstates.iter().map(|m| m.offset).collect();
        assert_eq!(at, [0, 960, 4096, 9984]);
    }
}
