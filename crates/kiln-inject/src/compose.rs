//! "Base + patches" as one image. [`ComposedImage`] reads like a file (`Read + Seek`, and
//! positional [`ReadAt`]); [`AsyncComposed`] streams any byte range. Both walk the plan's
//! [`Segment`]s, so every output path produces the same bytes; neither ever copies the base.

use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};

use crate::region::PatchPlan;
pub use crate::region::Segment;
use crate::source::{AsyncRangeSource, ReadAt};
use crate::{Error, Result};

/// A base image with a patch plan applied, readable at any offset.
#[derive(Debug)]
pub struct ComposedImage<B> {
    base: B,
    plan: Arc<PatchPlan>,
    pos: u64,
}

impl<B: ReadAt> ComposedImage<B> {
    /// Composes `base` with `plan`. The base must be exactly as long as the plan's image.
    pub fn new(base: B, plan: Arc<PatchPlan>) -> Result<Self> {
        if base.len() != plan.image_len() {
            return Err(Error::ImageSize {
                place: "base image".into(),
                expected: plan.image_len(),
                actual: base.len(),
            });
        }
        Ok(Self { base, plan, pos: 0 })
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<PatchPlan> {
        &self.plan
    }

    /// The base.
    pub fn base(&self) -> &B {
        &self.base
    }
}

impl<B: ReadAt> ReadAt for ComposedImage<B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let end = offset.saturating_add(buf.len() as u64);
        let mut done = 0usize;
        for seg in self.plan.segments(offset..end) {
            // Each segment is at most buf.len() - done bytes, so these casts are lossless.
            let n = seg.len() as usize;
            let dst = &mut buf[done..done + n];
            match seg {
                Segment::Base { offset, .. } => self.base.read_exact_at(offset, dst)?,
                Segment::Data(b) => dst.copy_from_slice(&b),
                Segment::Zero(_) => dst.fill(0),
            }
            done += n;
        }
        Ok(done)
    }

    fn len(&self) -> u64 {
        self.plan.image_len()
    }
}

impl<B: ReadAt> Read for ComposedImage<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = ReadAt::read_at(self, self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<B: ReadAt> Seek for ComposedImage<B> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.plan.image_len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}

/// Zero fill is streamed in pieces of this size from one shared static buffer.
const ZERO_PIECE: usize = 64 * 1024;
static ZEROES: [u8; ZERO_PIECE] = [0; ZERO_PIECE];

/// A base behind an [`AsyncRangeSource`] with a patch plan applied; streams byte ranges.
#[derive(Clone)]
pub struct AsyncComposed {
    base: Arc<dyn AsyncRangeSource>,
    plan: Arc<PatchPlan>,
}

impl std::fmt::Debug for AsyncComposed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncComposed")
            .field("base", &self.base.describe())
            .field("plan", &self.plan)
            .finish()
    }
}

impl AsyncComposed {
    /// Composes `base` with `plan`. The base must be exactly as long as the plan's image.
    pub fn new(base: Arc<dyn AsyncRangeSource>, plan: Arc<PatchPlan>) -> Result<Self> {
        if base.len() != plan.image_len() {
            return Err(Error::ImageSize {
                place: base.describe(),
                expected: plan.image_len(),
                actual: base.len(),
            });
        }
        Ok(Self { base, plan })
    }

    /// Size of the composed image.
    pub fn len(&self) -> u64 {
        self.plan.image_len()
    }

    /// True for an empty image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<PatchPlan> {
        &self.plan
    }

    /// Streams `range` (clamped to the image) of the composed image. Base bytes come from the
    /// base's own stream, patch bytes are shared slices, zero fill comes from a static buffer:
    /// memory use does not grow with the range.
    pub fn stream(&self, range: Range<u64>) -> BoxStream<'static, io::Result<Bytes>> {
        let segments: Vec<Segment> = self.plan.segments(range).collect();
        let base = self.base.clone();
        stream::iter(segments)
            .flat_map(move |seg| -> BoxStream<'static, io::Result<Bytes>> {
                match seg {
                    Segment::Base { offset, len } => exact_len(
                        base.stream(offset..offset + len),
                        offset,
                        len,
                        base.describe(),
                    ),
                    Segment::Data(b) => stream::once(futures::future::ready(Ok(b))).boxed(),
                    Segment::Zero(n) => {
                        let pieces = (0..n).step_by(ZERO_PIECE).map(move |o| {
                            let k = (n - o).min(ZERO_PIECE as u64) as usize;
                            Ok(Bytes::from_static(&ZEROES[..k]))
                        });
                        stream::iter(pieces).boxed()
                    }
                }
            })
            .boxed()
    }
}

/// Passes `inner` through, failing if it yields more or fewer than `len` bytes: a base that
/// changed size or an object store that answered the wrong range must not go out as a valid
/// image.
fn exact_len(
    inner: BoxStream<'static, io::Result<Bytes>>,
    offset: u64,
    len: u64,
    what: String,
) -> BoxStream<'static, io::Result<Bytes>> {
    struct St {
        inner: Option<BoxStream<'static, io::Result<Bytes>>>,
        seen: u64,
    }
    stream::unfold(
        St {
            inner: Some(inner),
            seen: 0,
        },
        move |mut st| {
            let what = what.clone();
            async move {
                let inner = st.inner.as_mut()?;
                match inner.next().await {
                    Some(Ok(b)) => {
                        st.seen += b.len() as u64;
                        if st.seen > len {
                            st.inner = None;
                            let e = io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "{what}: range at offset {offset} returned more than {len} bytes"
                                ),
                            );
                            return Some((Err(e), st));
                        }
                        Some((Ok(b), st))
                    }
                    Some(Err(e)) => {
                        st.inner = None;
                        Some((Err(e), st))
                    }
                    None if st.seen < len => {
                        st.inner = None;
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "{what}: range at offset {offset} ended after {} of {len} bytes",
                                st.seen
                            ),
                        );
                        Some((Err(e), st))
                    }
                    None => None,
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;
    use crate::source::MemorySource;

    fn sample() -> (Vec<u8>, Arc<PatchPlan>, Vec<u8>) {
        let base: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 | 1).collect();
        let plan = PatchPlan::new(
            base.len() as u64,
            vec![
                Region {
                    offset: 100,
                    len: 150_000,
                    data: Bytes::from(vec![7u8; 1000]),
                },
                Region::bytes(199_990, &b"0123456789"[..]),
            ],
        )
        .unwrap();
        let mut want = base.clone();
        want[100..1100].fill(7);
        want[1100..150_100].fill(0);
        want[199_990..].copy_from_slice(b"0123456789");
        (base, Arc::new(plan), want)
    }

    #[test]
    fn read_seek_and_read_at_agree_with_naive() {
        let (base, plan, want) = sample();
        let mut c = ComposedImage::new(base, plan).unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        assert_eq!(all, want);
        c.seek(SeekFrom::End(-15)).unwrap();
        let mut tail = Vec::new();
        c.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, want[want.len() - 15..]);
        let mut buf = vec![0u8; 3000];
        let n = c.read_at(99, &mut buf).unwrap();
        assert_eq!(&buf[..n], &want[99..3099]);
        assert!(c.seek(SeekFrom::Current(-1_000_000)).is_err());
    }

    #[test]
    fn base_of_wrong_size_is_refused() {
        let (base, plan, _) = sample();
        let e = ComposedImage::new(&base[..1000], plan).unwrap_err();
        assert!(e.to_string().contains("1000 bytes"), "{e}");
    }

    #[tokio::test]
    async fn async_stream_matches_for_ranges() {
        let (base, plan, want) = sample();
        let c = AsyncComposed::new(Arc::new(MemorySource(Bytes::from(base))), plan).unwrap();
        for r in [0..200_000u64, 0..1, 50..150_200, 199_995..300_000, 7..7] {
            let mut got = Vec::new();
            let mut s = c.stream(r.clone());
            while let Some(b) = s.next().await {
                got.extend_from_slice(&b.unwrap());
            }
            let end = r.end.min(200_000) as usize;
            assert_eq!(got, want[r.start as usize..end], "{r:?}");
        }
    }

    /// A source that answers with fewer bytes than asked.
    struct Short;
    impl AsyncRangeSource for Short {
        fn len(&self) -> u64 {
            100
        }
        fn stream(&self, _r: Range<u64>) -> BoxStream<'static, io::Result<Bytes>> {
            stream::once(futures::future::ready(Ok(Bytes::from_static(b"abc")))).boxed()
        }
        fn describe(&self) -> String {
            "short".into()
        }
    }

    #[tokio::test]
    async fn short_base_stream_is_an_error() {
        let plan = Arc::new(PatchPlan::new(100, vec![]).unwrap());
        let c = AsyncComposed::new(Arc::new(Short), plan).unwrap();
        let items: Vec<_> = c.stream(0..100).collect().await;
        let err = items.last().unwrap().as_ref().unwrap_err();
        assert!(err.to_string().contains("ended after 3 of 100"), "{err}");
    }
}
