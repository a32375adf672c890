//! The Merkle node index of one tenant's log: one file per tree level, node (L, i) at byte offset
//! 32·i of level L's file. It is derived from the durable event log, so it is never synced: after
//! a crash it is checked on open, cut back or caught up from the log, and rebuilt if damaged.
//!
//! Fixed offsets make a read one `pread` per node, with no index of its own; the measured
//! alternative (a sled batch per event) cost 30 to 50 µs an append. Appended nodes are held in a
//! small buffer per level and written as one `pwrite` per level every [`FLUSH_AT`] nodes, at each
//! signed checkpoint and at close, so an append costs no system call of its own (two `pwrite`s an
//! append were a measurable part of the tenant's serial section). Reads see the buffer. A crash
//! loses at most the buffered nodes, which the next open catches up from the log; higher levels are
//! written before level 0, whose length is what the open trusts.
//!
//! Levels from [`MEMORY_FROM_LEVEL`] up are also kept in memory (read at open, written through),
//! so that a proof reads at most that many nodes from the files: a proof at 10^6 events reads one
//! node on each of 20 levels, and at about a microsecond a `pread` the reads were its whole cost.
//! Those levels hold one node per 2^8 leaves and fewer, so they cost about a quarter of a byte a
//! leaf (250 KB at 10^6 events).

use std::fs::{self, File, OpenOptions};
use std::io;
#[cfg(unix)]
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::merkle::{Hash, NodeId, NodeStore};

/// Buffered nodes are written out once this many are held.
pub const FLUSH_AT: usize = 1024;

/// The lowest level kept in memory as well as in its file.
pub const MEMORY_FROM_LEVEL: u8 = 8;

/// The node files of one log.
pub struct NodeFiles {
    dir: PathBuf,
    /// Open files by level, opened on first use.
    files: Vec<Option<File>>,
    /// Per level, a run of consecutive nodes not yet written: the index of the first, and them.
    pending: Vec<(u64, Vec<Hash>)>,
    /// How many nodes `pending` holds.
    held: usize,
    /// Every node of each level from [`MEMORY_FROM_LEVEL`] up: `upper[k]` is level
    /// `MEMORY_FROM_LEVEL + k`, the same nodes as its file and buffer together.
    upper: Vec<Vec<Hash>>,
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
            pending: Vec::new(),
            held: 0,
            upper: Vec::new(),
        };
        // Open every existing level now, so that reads (proofs) never open a file.
        for level in 0..64u8 {
            if !nodes.path(level).exists() {
                break;
            }
            let f = nodes.file(level)?;
            if level >= MEMORY_FROM_LEVEL {
                let whole = f.metadata()?.len() / 32 * 32;
                let mut bytes = vec![0u8; usize::try_from(whole).map_err(io::Error::other)?];
                f.read_exact_at(&mut bytes, 0)?;
                let hashes = bytes
                    .chunks_exact(32)
                    .map(|c| <Hash>::try_from(c).expect("32 bytes"))
                    .collect();
                nodes.upper.push(hashes);
            }
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

    /// How many leaves the index holds (whole 32-byte records of level 0, and buffered ones).
    ///
    /// # Errors
    /// When the file cannot be read.
    pub fn leaves(&mut self) -> io::Result<u64> {
        let stored = self.file(0)?.metadata()?.len() / 32;
        let buffered = self
            .pending
            .first()
            .filter(|(_, run)| !run.is_empty())
            .map_or(0, |(start, run)| start + run.len() as u64);
        Ok(stored.max(buffered))
    }

    /// Writes every buffered node to its file: higher levels first, level 0 last, so that a crash
    /// in between never leaves leaves whose completed subtrees are missing.
    ///
    /// # Errors
    /// When a file cannot be written; the nodes stay buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        for level in (0..self.pending.len()).rev() {
            self.flush_level(level)?;
        }
        Ok(())
    }

    fn flush_level(&mut self, level: usize) -> io::Result<()> {
        let Some((start, run)) = self.pending.get(level) else {
            return Ok(());
        };
        if run.is_empty() {
            return Ok(());
        }
        let (start, n) = (*start, run.len());
        let bytes: Vec<u8> = run.iter().flatten().copied().collect();
        let level_id = u8::try_from(level).expect("at most 64 levels");
        self.file(level_id)?.write_all_at(&bytes, start * 32)?;
        self.pending[level].1.clear();
        self.held -= n;
        Ok(())
    }

    /// Cuts every level back to the nodes a tree of `leaves` leaves has wholly inside it (level L
    /// keeps `leaves >> L`), dropping anything buffered.
    ///
    /// # Errors
    /// When a file cannot be truncated.
    pub fn truncate_to(&mut self, leaves: u64) -> io::Result<()> {
        self.pending.clear();
        self.held = 0;
        for (k, level) in self.upper.iter_mut().enumerate() {
            let keep = leaves >> (usize::from(MEMORY_FROM_LEVEL) + k);
            level.truncate(usize::try_from(keep).unwrap_or(usize::MAX));
        }
        for level in 0..64u8 {
            if !self.path(level).exists() {
                break;
            }
            let keep = (leaves >> level) * 32;
            let f = self.file(level)?;
            if f.metadata()?.len() > keep {
                f.set_len(keep)?;
            }
        }
        Ok(())
    }

    /// Empties every level, for a rebuild from the log.
    ///
    /// # Errors
    /// When a file cannot be truncated.
    pub fn clear(&mut self) -> io::Result<()> {
        self.pending.clear();
        self.held = 0;
        self.upper.clear();
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
        if let Some(k) = id.level().checked_sub(MEMORY_FROM_LEVEL) {
            let level = self.upper.get(usize::from(k));
            let index = usize::try_from(id.index()).ok();
            return Ok(level.zip(index).and_then(|(l, i)| l.get(i)).copied());
        }
        let l = usize::from(id.level());
        if let Some((start, run)) = self.pending.get(l) {
            if let Some(k) = id.index().checked_sub(*start) {
                if let Some(hash) = usize::try_from(k).ok().and_then(|k| run.get(k)) {
                    return Ok(Some(*hash));
                }
            }
        }
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
        if let Some(k) = id.level().checked_sub(MEMORY_FROM_LEVEL) {
            let k = usize::from(k);
            if self.upper.len() <= k {
                self.upper.resize_with(k + 1, Vec::new);
            }
            let level = &mut self.upper[k];
            let i = usize::try_from(id.index()).map_err(io::Error::other)?;
            // As in the file: a node past the end leaves zeros before it (the tree never does).
            if level.len() <= i {
                level.resize(i + 1, [0; 32]);
            }
            level[i] = hash;
        }
        let l = usize::from(id.level());
        if self.pending.len() <= l {
            self.pending.resize_with(l + 1, || (0, Vec::new()));
        }
        let (start, run) = &self.pending[l];
        let follows = run.is_empty() || id.index() == start + run.len() as u64;
        if !follows {
            // Not the next node of the run (a rewrite after a cut-back): write the run out first,
            // so that the buffer stays one run per level.
            self.flush_level(l)?;
        }
        let (start, run) = &mut self.pending[l];
        if run.is_empty() {
            *start = id.index();
        }
        run.push(hash);
        self.held += 1;
        if self.held >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }
}

impl Drop for NodeFiles {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            // The open after this catches the index up from the log.
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not write the buffered audit tree nodes");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::{Tree, TreeSize};

    fn node(level: u8, index: u64) -> NodeId {
        NodeId::new(level, index).unwrap()
    }

    #[test]
    fn buffered_nodes_are_read_back_and_reach_the_files_at_flush_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = NodeFiles::open(dir.path()).unwrap();
        nodes.put(node(0, 0), [1; 32]).unwrap();
        nodes.put(node(0, 1), [2; 32]).unwrap();
        nodes.put(node(1, 0), [3; 32]).unwrap();
        assert_eq!(nodes.get(node(0, 1)).unwrap(), Some([2; 32]));
        assert_eq!(nodes.get(node(1, 0)).unwrap(), Some([3; 32]));
        assert_eq!(nodes.get(node(0, 2)).unwrap(), None);
        assert_eq!(nodes.leaves().unwrap(), 2, "buffered leaves count");
        assert_eq!(fs::metadata(dir.path().join("level-00")).unwrap().len(), 0);
        nodes.flush().unwrap();
        assert_eq!(fs::metadata(dir.path().join("level-00")).unwrap().len(), 64);
        nodes.put(node(0, 2), [4; 32]).unwrap();
        drop(nodes);
        let mut again = NodeFiles::open(dir.path()).unwrap();
        assert_eq!(again.leaves().unwrap(), 3);
        assert_eq!(again.get(node(0, 2)).unwrap(), Some([4; 32]));
        assert_eq!(again.get(node(1, 0)).unwrap(), Some([3; 32]));
    }

    #[test]
    fn a_rewrite_out_of_order_writes_the_run_first_and_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = NodeFiles::open(dir.path()).unwrap();
        for i in 0..4 {
            nodes.put(node(0, i), [i as u8; 32]).unwrap();
        }
        // As after a cut-back: index 1 is written again.
        nodes.put(node(0, 1), [9; 32]).unwrap();
        assert_eq!(nodes.get(node(0, 1)).unwrap(), Some([9; 32]));
        assert_eq!(nodes.get(node(0, 3)).unwrap(), Some([3; 32]));
        drop(nodes);
        let again = NodeFiles::open(dir.path()).unwrap();
        assert_eq!(again.get(node(0, 1)).unwrap(), Some([9; 32]));
        assert_eq!(again.get(node(0, 3)).unwrap(), Some([3; 32]));
    }

    #[test]
    fn a_tree_over_buffered_files_reopens_with_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(NodeFiles::open(dir.path()).unwrap());
        // Past FLUSH_AT nodes, so that some were written by the buffer and some held.
        for i in 0..1500u32 {
            tree.append(&i.to_be_bytes()).unwrap();
        }
        let size = TreeSize::new(1500).unwrap();
        let root = tree.root_at(size).unwrap();
        drop(tree);
        let mut files = NodeFiles::open(dir.path()).unwrap();
        assert_eq!(files.leaves().unwrap(), 1500);
        let reopened = Tree::open(files, size).unwrap();
        assert_eq!(reopened.root_at(size).unwrap(), root);
    }

    #[test]
    fn nodes_past_the_durable_leaves_are_cut_so_a_later_crash_cannot_bring_them_back() {
        let dir = tempfile::tempdir().unwrap();
        // A tree of 120 leaves written out, of which only 100 became durable.
        let mut tree = Tree::new(NodeFiles::open(dir.path()).unwrap());
        for i in 0..120u32 {
            tree.append(&i.to_be_bytes()).unwrap();
        }
        drop(tree);
        let mut files = NodeFiles::open(dir.path()).unwrap();
        files.truncate_to(100).unwrap();
        assert_eq!(files.leaves().unwrap(), 100);
        let mut tree = Tree::open(files, TreeSize::new(100).unwrap()).unwrap();
        // Different events 100..110 follow; their nodes stay buffered, then the process dies.
        for i in 1000..1010u32 {
            tree.append(&i.to_be_bytes()).unwrap();
        }
        std::mem::forget(tree);
        // The next open sees 100 leaves and nothing of the first run's 100..120 to mistake for
        // the second run's.
        let mut files = NodeFiles::open(dir.path()).unwrap();
        assert_eq!(files.leaves().unwrap(), 100);
        files.truncate_to(100).unwrap();
        let mut tree = Tree::open(files, TreeSize::new(100).unwrap()).unwrap();
        for i in 1000..1010u32 {
            tree.append(&i.to_be_bytes()).unwrap();
        }
        let mut fresh = Tree::new(crate::audit::merkle::MemNodeStore::default());
        for i in (0..100u32).chain(1000..1010) {
            fresh.append(&i.to_be_bytes()).unwrap();
        }
        let size = TreeSize::new(110).unwrap();
        assert_eq!(tree.root_at(size).unwrap(), fresh.root_at(size).unwrap());
    }

    /// The levels kept in memory agree with the files: proofs over the node files equal those of
    /// an in-memory tree, before and after a reopen and after a cut-back past a memory level's
    /// end, and the memory levels hold what their files hold once flushed.
    #[test]
    fn memory_levels_agree_with_the_files_through_reopens_and_cut_backs() {
        use crate::audit::merkle::{LeafIndex, MemNodeStore};
        let dir = tempfile::tempdir().unwrap();
        let n = 5000u32;
        let mut tree = Tree::new(NodeFiles::open(dir.path()).unwrap());
        let mut mem = Tree::new(MemNodeStore::default());
        for i in 0..n {
            tree.append(&i.to_be_bytes()).unwrap();
            mem.append(&i.to_be_bytes()).unwrap();
        }
        let check = |tree: &Tree<NodeFiles>, mem: &Tree<MemNodeStore>, size: u64| {
            let ts = TreeSize::new(size).unwrap();
            assert_eq!(tree.root_at(ts).unwrap(), mem.root_at(ts).unwrap());
            for leaf in (0..size).step_by(97).chain([size - 1]) {
                let leaf = LeafIndex::new(leaf).unwrap();
                assert_eq!(
                    tree.inclusion_proof(leaf, ts).unwrap(),
                    mem.inclusion_proof(leaf, ts).unwrap()
                );
            }
            for old in (1..size).step_by(331) {
                let old = TreeSize::new(old).unwrap();
                assert_eq!(
                    tree.consistency_proof(old, ts).unwrap(),
                    mem.consistency_proof(old, ts).unwrap()
                );
            }
        };
        check(&tree, &mem, u64::from(n));
        let mut files = tree.into_store();
        files.flush().unwrap();
        assert!(
            files.upper.len() >= 4,
            "levels 8 to 11 exist at 5000 leaves"
        );
        for (k, level) in files.upper.iter().enumerate() {
            let on_disk = fs::read(files.path(MEMORY_FROM_LEVEL + k as u8)).unwrap();
            assert_eq!(
                on_disk,
                level.concat(),
                "level {}",
                usize::from(MEMORY_FROM_LEVEL) + k
            );
        }
        drop(files);

        let files = NodeFiles::open(dir.path()).unwrap();
        let tree = Tree::open(files, TreeSize::new(u64::from(n)).unwrap()).unwrap();
        check(&tree, &mem, u64::from(n));

        // Cut back to 3000 leaves (level 8 keeps 11 nodes of 19), then grow differently.
        let mut files = tree.into_store();
        files.truncate_to(3000).unwrap();
        assert_eq!(files.upper[0].len(), 3000 >> 8);
        let mut tree = Tree::open(files, TreeSize::new(3000).unwrap()).unwrap();
        let mut mem = Tree::new(MemNodeStore::default());
        for i in (0..3000u32).chain(9000..11000) {
            if i >= 9000 {
                tree.append(&i.to_be_bytes()).unwrap();
            }
            mem.append(&i.to_be_bytes()).unwrap();
        }
        check(&tree, &mem, 5000);
    }
}
