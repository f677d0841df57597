//! `oci://` container images as build sources: the registry side of `kiln_tree::oci`.
//!
//! kiln-tree flattens layers but cannot speak HTTP (it sits below this crate), so this module
//! registers an opener with [`kiln_tree::oci::set_registry_opener`]. Manifests come through
//! [`Client::get_manifest`] (Bearer or Basic auth answered as for `kiln pull`); a layer blob is
//! one GET whose body is handed, chunk by chunk, to the synchronous tree reader through a
//! bounded channel, so it is read from the registry once and never written to disk. kiln-tree
//! verifies every digest.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use futures::StreamExt;
use kiln_tree::oci::ImageStore;
use kiln_tree::Error;

use crate::oci::{Client, Options, Reference};

/// Makes `oci://` usable as a source for `kiln mkfs` and `kiln build`.
pub fn register() {
    kiln_tree::oci::set_registry_opener(open);
}

fn err(what: &str, e: anyhow::Error) -> Error {
    Error::Source {
        path: what.to_string(),
        msg: format!("{e:#}"),
    }
}

fn open(s: &str) -> Result<Box<dyn ImageStore>, Error> {
    let reference = Reference::parse(s).map_err(|e| err(s, e))?;
    let client = Client::new(&reference, Options::default()).map_err(|e| err(s, e))?;
    // One worker thread: it drives the HTTP body while the caller's thread builds the tree.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            path: "async runtime".into(),
            source: e,
        })?;
    Ok(Box::new(Registry {
        reference,
        client: Arc::new(client),
        rt,
    }))
}

struct Registry {
    reference: Reference,
    client: Arc<Client>,
    rt: tokio::runtime::Runtime,
}

impl Registry {
    fn get_manifest(&self, r: &str) -> Result<Vec<u8>, Error> {
        let what = self.name();
        let got = self
            .rt
            .block_on(self.client.get_manifest(r))
            .map_err(|e| err(&what, e))?;
        match got {
            Some((body, _, _)) => Ok(body),
            None => Err(Error::Source {
                path: what,
                msg: format!("no manifest {r}"),
            }),
        }
    }
}

impl ImageStore for Registry {
    fn name(&self) -> String {
        self.reference.to_string()
    }

    fn top(&mut self) -> Result<(Vec<u8>, Option<String>), Error> {
        let body = self.get_manifest(self.reference.reference())?;
        Ok((body, self.reference.digest.clone()))
    }

    fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, Error> {
        self.get_manifest(digest)
    }

    fn blob(&mut self, digest: &str) -> Result<Box<dyn Read + Send>, Error> {
        let what = format!("{}: blob {digest}", self.name());
        let resp = self
            .rt
            .block_on(self.client.get_blob(digest))
            .map_err(|e| err(&what, e))?;
        // Eight chunks in flight at most: memory stays bounded whatever the blob's size.
        let (tx, rx) = sync_channel::<io::Result<bytes::Bytes>>(8);
        self.rt.spawn(async move {
            let mut stream = resp.bytes_stream();
            while let Some(c) = stream.next().await {
                let c = c.map_err(|e| io::Error::other(format!("{what}: {e}")));
                let stop = c.is_err();
                if tx.send(c).is_err() || stop {
                    break;
                }
            }
        });
        Ok(Box::new(ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        }))
    }
}

/// The body chunks of one blob, as a `Read`.
struct ChannelReader {
    rx: Receiver<io::Result<bytes::Bytes>>,
    cur: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(c) => self.cur = c?,
                // The sender is gone: the body ended.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}
