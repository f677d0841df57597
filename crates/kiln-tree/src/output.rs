//! Atomic outputs: a temp file in the destination's directory, renamed over the final name only
//! when the writer commits. A failed or interrupted run never leaves a partial file under the
//! final name, and a dropped, uncommitted output removes its temp file.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temp files of outputs not yet committed or dropped, for [`remove_unfinished`].
static UNFINISHED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn unfinished() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    // A poisoned lock only means a thread panicked while holding it; the set is still valid.
    UNFINISHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the temp file of every output still being written, and returns how many there
/// were. A process that is told to stop (SIGINT, SIGTERM) calls this before it exits, since
/// exiting runs no destructors: without it an interrupted `kiln mkfs` left its multi-GiB
/// `.NAME.kiln-tmp-*` behind.
pub fn remove_unfinished() -> usize {
    let mut set = unfinished();
    let n = set.len();
    for p in std::mem::take(&mut *set) {
        let _ = fs::remove_file(&p);
    }
    n
}

/// A file being written that becomes `dest` on [`AtomicFile::commit`].
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates a fresh, empty temp file beside `dest` (readable and writable).
    pub fn create(dest: &Path) -> io::Result<Self> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file name", dest.display()),
            )
        })?;
        for n in 0u32.. {
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".kiln-tmp-{}-{n}", std::process::id()));
            let tmp = dir.join(tmp_name);
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    unfinished().insert(tmp.clone());
                    return Ok(Self {
                        file: Some(file),
                        tmp,
                        dest: dest.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", tmp.display()))),
            }
        }
        unreachable!("u32 range exhausted")
    }

    /// The open temp file.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("file present until commit")
    }

    /// The final destination.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The temp file's path.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes the data and renames the temp file to the destination.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("file present until commit");
        file.sync_data()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.tmp.display())))?;
        drop(file);
        fs::rename(&self.tmp, &self.dest).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} -> {}: {e}", self.tmp.display(), self.dest.display()),
            )
        })?;
        unfinished().remove(&self.tmp);
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
            unfinished().remove(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn commit_renames_and_drop_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out.img");
        {
            let a = AtomicFile::create(&dest).unwrap();
            a.file().write_all(b"partial").unwrap();
        }
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            0,
            "dropped output leaves nothing"
        );
        let a = AtomicFile::create(&dest).unwrap();
        a.file().write_all(b"done").unwrap();
        a.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"done");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
