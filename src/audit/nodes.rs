//! The Merkle node index of one tenant's log: one file per tree level, node (L, i) at byte offset
//! 32·i of level L's file. It is derived from the durable event log, so it is never synced: after
//! a crash it is checked on open, cut back or caught up from the log, and rebuilt if damaged.
//!
//! Fixed offsets make a read one `pread` and an append one `pwrite` per node, with no index of its
//! own; the measured alternative (a sled batch per event) cost 30 to 50 µs an append.

use std::fs::{self, File, OpenOptions};
use std::io;
#[cfg(unix)]
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::merkle::{Hash, NodeId, NodeStore};

/// The node files of one log.
pub struct NodeFiles {
    dir: PathBuf,
    /// Open files by level, opened on first use.
    files: Vec<Option<File>>,
}

impl std::fmt::Debug for NodeFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeFiles")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl NodeFiles {
    /// Opens (creating) the node files in `dir`.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut nodes = NodeFiles {
            dir: dir.to_owned(),
            files: Vec::new(),
        };
        // Open every existing level now, so that reads (proofs) never open a file.
        for level in 0..64u8 {
            if !nodes.path(level).exists() {
                break;
            }
            nodes.file(level)?;
        }
        Ok(nodes)
    }

    fn path(&self, level: u8) -> PathBuf {
        self.dir.join(format!("level-{level:02}"))
    }

    fn file(&mut self, level: u8) -> io::Result<&File> {
        let l = usize::from(level);
        if self.files.len() <= l {
            self.files.resize_with(l + 1, || None);
        }
        if self.files[l].is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.path(level))?;
            self.files[l] = Some(f);
        }
        Ok(self.files[l].as_ref().expect("opened just above"))
    }

    /// How many leaves the index holds (whole 32-byte records of level 0).
    ///
    /// # Errors
    /// When the file cannot be read.
    pub fn leaves(&mut self) -> io::Result<u64> {
        Ok(self.file(0)?.metadata()?.len() / 32)
    }

    /// Empties every level, for a rebuild from the log.
    ///
    /// # Errors
    /// When a file cannot be truncated.
    pub fn clear(&mut self) -> io::Result<()> {
        for level in 0..64u8 {
            if self.path(level).exists() {
                self.file(level)?.set_len(0)?;
            }
        }
        Ok(())
    }
}

impl NodeStore for NodeFiles {
    type Error = io::Error;

    fn get(&self, id: NodeId) -> Result<Option<Hash>, io::Error> {
        let l = usize::from(id.level());
        let file = match self.files.get(l).and_then(Option::as_ref) {
            Some(f) => f,
            None => {
                let path = self.path(id.level());
                if !path.exists() {
                    return Ok(None);
                }
                // A read through a shared reference cannot cache the handle; levels are opened
                // for writing by the first append anyway, so this path is rare.
                return read_at(&File::open(path)?, id.index());
            }
        };
        read_at(file, id.index())
    }

    fn put(&mut self, id: NodeId, hash: Hash) -> Result<(), io::Error> {
        let f = self.file(id.level())?;
        f.write_all_at(&hash, id.index() * 32)
    }
}

fn read_at(f: &File, index: u64) -> io::Result<Option<Hash>> {
    let mut buf = [0u8; 32];
    match f.read_exact_at(&mut buf, index * 32) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}
