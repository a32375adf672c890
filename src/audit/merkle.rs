//! The RFC 9162 (section 2.1) Merkle tree behind each tenant's audit log: hashing, index newtypes, the node store seam, the append-only [`Tree`] that serves proofs from stored node hashes, and the proof verifiers.
//!
//! Every leaf hash and every hash of a *perfect* subtree (a node at level `L`, index `i`, covering
//! leaves `[i * 2^L, (i + 1) * 2^L)`) is written to a [`NodeStore`] once, when the append that
//! completes it happens. Roots of any historical size, inclusion proofs and consistency proofs are
//! then assembled from `O(log n)` stored hashes; leaves are never re-hashed and the tree is never
//! rebuilt. The only hashes computed on demand are those of the incomplete subtrees on the right
//! edge of a tree size, which RFC 9162 calls for and which no append can store ahead of time.
//!
//! The verifiers ([`verify_inclusion`], [`verify_consistency`], [`root_from_inclusion_proof`]) take
//! raw byte slices and follow transparency-dev/merkle `proof/verify.go` decision for decision, so
//! that a client using either implementation accepts and rejects the same proofs.

use std::error::Error as StdError;
use std::fmt;

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, a node hash or a tree root.
pub type Hash = [u8; 32];

/// The length in bytes of every [`Hash`](type@Hash).
pub const HASH_LEN: usize = 32;

/// The largest number of leaves a [`Tree`] holds.
///
/// Capping sizes at 2^63 keeps every leaf range `[i * 2^L, (i + 1) * 2^L)` representable in a
/// `u64` and every level below 64, so no index arithmetic in this module can overflow.
pub const MAX_TREE_SIZE: u64 = 1 << 63;

/// The domain-separation prefix of a leaf hash, so that no leaf can pose as an interior node.
const LEAF_PREFIX: u8 = 0x00;

/// The domain-separation prefix of an interior node hash.
const NODE_PREFIX: u8 = 0x01;

/// Returns the RFC 9162 leaf hash `SHA-256(0x00 || data)`.
#[must_use]
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(data);
    h.finalize().into()
}

/// Returns the RFC 9162 interior node hash `SHA-256(0x01 || left || right)`.
///
/// The children are byte slices rather than [`Hash`](type@Hash)(type@Hash)es because the verifiers must hash proof
/// entries of any length exactly as `verify.go` does; inside a [`Tree`] they are always 32 bytes.
#[must_use]
pub fn node_hash(left: &[u8], right: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Returns the root of the empty tree, `SHA-256("")`.
#[must_use]
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The position of a leaf in a log, counted from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeafIndex(u64);

// INVARIANT: a LeafIndex is below MAX_TREE_SIZE, so it can address a leaf of some valid tree and
// `NodeId::leaf` never builds an out-of-range node.
impl LeafIndex {
    /// Returns the index, or `None` when it is not below [`MAX_TREE_SIZE`].
    #[must_use]
    pub const fn new(index: u64) -> Option<Self> {
        if index < MAX_TREE_SIZE {
            Some(Self(index))
        } else {
            None
        }
    }

    /// Returns the index as a plain number, for wire formats and the verifiers.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<LeafIndex> for u64 {
    fn from(index: LeafIndex) -> u64 {
        index.0
    }
}

impl fmt::Display for LeafIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A number of leaves: the size of a tree now or at some earlier point of its history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TreeSize(u64);

// INVARIANT: a TreeSize is at most MAX_TREE_SIZE, so `size - 1` is a valid LeafIndex whenever the
// size is not zero.
impl TreeSize {
    /// The size of the empty tree.
    pub const ZERO: TreeSize = TreeSize(0);

    /// Returns the size, or `None` when it exceeds [`MAX_TREE_SIZE`].
    #[must_use]
    pub const fn new(size: u64) -> Option<Self> {
        if size <= MAX_TREE_SIZE {
            Some(Self(size))
        } else {
            None
        }
    }

    /// Returns the size as a plain number, for wire formats and the verifiers.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<TreeSize> for u64 {
    fn from(size: TreeSize) -> u64 {
        size.0
    }
}

impl fmt::Display for TreeSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The address of a perfect subtree: level `L` and index `i` name the subtree over leaves
/// `[i * 2^L, (i + 1) * 2^L)`, so level 0 holds the leaf hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId {
    /// The height above the leaves; it is also log2 of the number of leaves covered.
    level: u8,
    /// The position among the nodes of the same level, counted from the left.
    index: u64,
}

// INVARIANT: level < 64 and (index + 1) << level <= MAX_TREE_SIZE, so the node covers leaves of a
// tree this module can build and computing its leaf range cannot overflow.
impl NodeId {
    /// Returns the node at `level` and `index`, or `None` when its leaf range would end beyond
    /// [`MAX_TREE_SIZE`].
    #[must_use]
    pub const fn new(level: u8, index: u64) -> Option<Self> {
        if level < 64 && index < (MAX_TREE_SIZE >> level) {
            Some(Self { level, index })
        } else {
            None
        }
    }

    /// Returns the level-0 node that holds the hash of `leaf`.
    #[must_use]
    pub const fn leaf(leaf: LeafIndex) -> Self {
        // The LeafIndex invariant is exactly the NodeId invariant at level 0.
        Self {
            level: 0,
            index: leaf.0,
        }
    }

    /// Builds a node the tree's own arithmetic has already proven valid.
    fn at(level: u32, index: u64) -> Self {
        debug_assert!(level < 64 && Self::new(level as u8, index).is_some());
        Self {
            level: level as u8,
            index,
        }
    }

    /// Returns the height above the leaves.
    #[must_use]
    pub const fn level(self) -> u8 {
        self.level
    }

    /// Returns the position among the nodes of the same level.
    #[must_use]
    pub const fn index(self) -> u64 {
        self.index
    }

    /// Returns the half-open range of leaf indices `(begin, end)` that this node covers.
    #[must_use]
    pub const fn leaf_range(self) -> (u64, u64) {
        (self.index << self.level, (self.index + 1) << self.level)
    }

    /// Returns the left and right children, or `None` for a leaf.
    #[must_use]
    pub const fn children(self) -> Option<(NodeId, NodeId)> {
        if self.level == 0 {
            return None;
        }
        let level = self.level - 1;
        let left = NodeId {
            level,
            index: self.index * 2,
        };
        let right = NodeId {
            level,
            index: self.index * 2 + 1,
        };
        Some((left, right))
    }

    /// Returns a 9-byte key (level, then the big-endian index) for ordered key-value stores.
    ///
    /// Big-endian keeps the nodes of one level contiguous and in index order, so a store can scan a
    /// level or a range of it.
    #[must_use]
    pub fn to_key(self) -> [u8; 9] {
        let mut key = [0u8; 9];
        key[0] = self.level;
        key[1..].copy_from_slice(&self.index.to_be_bytes());
        key
    }

    /// Parses a key written by [`NodeId::to_key`], or returns `None` for anything else.
    #[must_use]
    pub fn from_key(key: &[u8]) -> Option<Self> {
        let (&level, index) = key.split_first()?;
        let index = u64::from_be_bytes(index.try_into().ok()?);
        Self::new(level, index)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node (level {}, index {})", self.level, self.index)
    }
}

/// Where a [`Tree`] keeps its leaf and perfect-subtree hashes.
///
/// The product keeps them in sled; [`MemNodeStore`] keeps them in memory. A store only maps
/// [`NodeId`]s to hashes: the tree size is the caller's to persist (typically beside the signed
/// checkpoint) and to hand back to [`Tree::open`].
pub trait NodeStore {
    /// What goes wrong in the backing storage.
    type Error: StdError + Send + Sync + 'static;

    /// Returns the hash stored for `id`, or `None` when nothing is stored there.
    ///
    /// # Errors
    /// Whatever the backing storage reports.
    fn get(&self, id: NodeId) -> Result<Option<Hash>, Self::Error>;

    /// Stores `hash` for `id`, replacing any earlier value.
    ///
    /// # Errors
    /// Whatever the backing storage reports.
    fn put(&mut self, id: NodeId, hash: Hash) -> Result<(), Self::Error>;

    /// Stores every node written by one append.
    ///
    /// The default writes them one by one. A database-backed store should override it with one
    /// atomic batch, so that a crash never leaves a leaf stored without the nodes it completed.
    ///
    /// # Errors
    /// Whatever the backing storage reports; nodes may then have been written partially unless the
    /// implementation is atomic.
    fn put_batch(&mut self, nodes: &[(NodeId, Hash)]) -> Result<(), Self::Error> {
        for &(id, hash) in nodes {
            self.put(id, hash)?;
        }
        Ok(())
    }
}

/// An in-memory [`NodeStore`]: one vector of hashes per level, indexed by node index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemNodeStore {
    /// `levels[L][i]` is the hash of node (L, i). A slot is `None` only when a caller stored a node
    /// beyond the end of its level or removed one; a tree never leaves gaps.
    levels: Vec<Vec<Option<Hash>>>,
}

impl MemNodeStore {
    /// Returns an empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes the hash stored for `id` and returns it, for tests that simulate a damaged store.
    pub fn remove(&mut self, id: NodeId) -> Option<Hash> {
        self.levels
            .get_mut(usize::from(id.level))?
            .get_mut(usize::try_from(id.index).ok()?)?
            .take()
    }
}

impl NodeStore for MemNodeStore {
    type Error = std::convert::Infallible;

    fn get(&self, id: NodeId) -> Result<Option<Hash>, Self::Error> {
        let slot = self
            .levels
            .get(usize::from(id.level))
            .and_then(|level| level.get(usize::try_from(id.index).ok()?));
        Ok(slot.copied().flatten())
    }

    /// # Panics
    /// When `id.index()` does not fit in memory on this platform (it must be below `usize::MAX`).
    fn put(&mut self, id: NodeId, hash: Hash) -> Result<(), Self::Error> {
        let level = usize::from(id.level);
        if self.levels.len() <= level {
            self.levels.resize_with(level + 1, Vec::new);
        }
        let nodes = &mut self.levels[level];
        let index = usize::try_from(id.index).expect("node index exceeds the address space");
        if index >= nodes.len() {
            nodes.resize(index + 1, None);
        }
        nodes[index] = Some(hash);
        Ok(())
    }
}

/// What can go wrong while appending to a [`Tree`], reading it or checking its store.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The node store failed; the tree's in-memory state is unchanged.
    #[error("the node store failed")]
    Store(#[source] Box<dyn StdError + Send + Sync + 'static>),
    /// A size was requested that the tree has not reached.
    #[error("tree size {requested} is beyond the current size {current}")]
    SizeOutOfRange {
        /// The size that was asked for.
        requested: u64,
        /// The tree's size when it was asked.
        current: u64,
    },
    /// A leaf was requested that is not below the given tree size.
    #[error("leaf {leaf} is not in a tree of size {size}")]
    LeafOutOfRange {
        /// The leaf that was asked for.
        leaf: u64,
        /// The tree size it was asked for.
        size: u64,
    },
    /// A consistency proof was requested from a larger size to a smaller one.
    #[error("cannot prove consistency from size {size1} to the smaller size {size2}")]
    SizeDecreased {
        /// The earlier size.
        size1: u64,
        /// The later size, which is smaller.
        size2: u64,
    },
    /// A consistency proof was requested from the empty tree, which RFC 9162 leaves undefined and
    /// every verifier rejects.
    #[error("a consistency proof from the empty tree is meaningless")]
    EmptyOldTree,
    /// The tree already holds [`MAX_TREE_SIZE`] leaves.
    #[error("the tree is full")]
    Full,
    /// A node that a tree of this size must have is absent from the store.
    #[error("{0} is missing from the store")]
    MissingNode(NodeId),
    /// A stored node does not match its stored children (or the tree's cached copy of it).
    #[error("{0} does not match its children: the store is corrupt")]
    NodeMismatch(NodeId),
}

/// Wraps a store error; the type is erased so [`TreeError`] stays one type for every store.
fn store_error<E: StdError + Send + Sync + 'static>(err: E) -> TreeError {
    TreeError::Store(Box::new(err))
}

/// An append-only RFC 9162 Merkle tree whose node hashes live in a [`NodeStore`].
pub struct Tree<S: NodeStore> {
    /// The leaf and perfect-subtree hashes: the only source for roots and proofs.
    store: S,
    /// The number of leaves appended so far.
    // INVARIANT: size <= MAX_TREE_SIZE.
    size: u64,
    /// Copies of the stored hashes of the perfect subtrees that tile `[0, size)`, largest
    /// (leftmost) first, one per set bit of `size`. They let an append find the left siblings it
    /// completes and `root()` fold the root without touching the store.
    // INVARIANT: frontier.len() == size.count_ones(), and frontier[k] equals the stored hash of
    // the k-th perfect subtree of `size` from the left.
    frontier: Vec<Hash>,
}

impl<S: NodeStore> fmt::Debug for Tree<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tree")
            .field("size", &self.size)
            .field("root", &hex::encode(self.root()))
            .finish_non_exhaustive()
    }
}

impl<S: NodeStore> Tree<S> {
    /// Starts an empty tree over `store`.
    ///
    /// The store should be empty: appends overwrite whatever it holds. Use [`Tree::open`] for a
    /// store that already holds a tree.
    #[must_use]
    pub fn new(store: S) -> Self {
        Self {
            store,
            size: 0,
            frontier: Vec::new(),
        }
    }

    /// Reopens the tree of `size` leaves that `store` holds, and runs [`Tree::self_check`] before
    /// handing it out, so a damaged right edge is caught before anything is appended to it.
    ///
    /// The structural checks cannot tell whether the newest leaf of an odd-sized tree was altered,
    /// because nothing else in the store depends on it; compare [`Tree::root`] with the last signed
    /// checkpoint for that.
    ///
    /// # Errors
    /// [`TreeError::Store`] when the store fails, [`TreeError::MissingNode`] or
    /// [`TreeError::NodeMismatch`] when the right edge of the tree is absent or inconsistent.
    pub fn open(store: S, size: TreeSize) -> Result<Self, TreeError> {
        let mut tree = Self {
            store,
            size: size.get(),
            frontier: Vec::with_capacity(size.get().count_ones() as usize),
        };
        for id in perfect_tiling(0, size.get()) {
            let hash = tree.node(id)?;
            tree.frontier.push(hash);
        }
        tree.self_check()?;
        Ok(tree)
    }

    /// Returns the number of leaves.
    #[must_use]
    pub fn size(&self) -> TreeSize {
        TreeSize(self.size)
    }

    /// Returns the store, for callers that need to read it directly.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, for callers that manage it (flush a write-back buffer, say).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Gives the store back, for instance to reopen it with [`Tree::open`].
    pub fn into_store(self) -> S {
        self.store
    }

    /// Appends a leaf holding `data` and returns its index.
    ///
    /// # Errors
    /// As [`Tree::append_hash`].
    pub fn append(&mut self, data: &[u8]) -> Result<LeafIndex, TreeError> {
        self.append_hash(leaf_hash(data))
    }

    /// Appends a leaf whose RFC 9162 leaf hash is `leaf_hash` and returns its index.
    ///
    /// It stores the leaf hash and every perfect subtree the leaf completes in one
    /// [`NodeStore::put_batch`] call: `1 + trailing_ones(index)` nodes, which is two on average.
    ///
    /// # Errors
    /// [`TreeError::Full`] at [`MAX_TREE_SIZE`] leaves, [`TreeError::Store`] when the store fails.
    /// On error the tree is unchanged.
    pub fn append_hash(&mut self, leaf_hash: Hash) -> Result<LeafIndex, TreeError> {
        let index = self.size;
        if index >= MAX_TREE_SIZE {
            return Err(TreeError::Full);
        }
        // Each trailing one bit of the old size is a perfect subtree on the frontier that the new
        // leaf completes into a subtree one level higher.
        let merges = index.trailing_ones() as usize;
        let mut batch = [(NodeId { level: 0, index: 0 }, [0u8; 32]); 64];
        let mut hash = leaf_hash;
        batch[0] = (NodeId::at(0, index), hash);
        for k in 0..merges {
            let left = &self.frontier[self.frontier.len() - 1 - k];
            hash = node_hash(left, &hash);
            let level = k as u32 + 1;
            batch[k + 1] = (NodeId::at(level, index >> level), hash);
        }
        self.store
            .put_batch(&batch[..=merges])
            .map_err(store_error)?;
        // The store has every node, so the cached frontier may now move on.
        self.frontier.truncate(self.frontier.len() - merges);
        self.frontier.push(hash);
        self.size = index + 1;
        Ok(LeafIndex(index))
    }

    /// Returns the stored leaf hash of `leaf`.
    ///
    /// # Errors
    /// [`TreeError::LeafOutOfRange`] when the tree has no such leaf, [`TreeError::MissingNode`] or
    /// [`TreeError::Store`] when the store cannot provide it.
    pub fn leaf_hash_at(&self, leaf: LeafIndex) -> Result<Hash, TreeError> {
        if leaf.get() >= self.size {
            return Err(TreeError::LeafOutOfRange {
                leaf: leaf.get(),
                size: self.size,
            });
        }
        self.node(NodeId::leaf(leaf))
    }

    /// Returns the root of the tree at its current size, from the cached frontier alone.
    #[must_use]
    pub fn root(&self) -> Hash {
        let mut subtrees = self.frontier.iter().rev();
        let Some(&last) = subtrees.next() else {
            return empty_root();
        };
        subtrees.fold(last, |acc, left| node_hash(left, &acc))
    }

    /// Returns the root the tree had when it held `size` leaves, from at most `log2(size) + 1`
    /// stored perfect-subtree hashes.
    ///
    /// # Errors
    /// [`TreeError::SizeOutOfRange`] when `size` exceeds the current size, [`TreeError::Store`] or
    /// [`TreeError::MissingNode`] when the store cannot provide a node.
    pub fn root_at(&self, size: TreeSize) -> Result<Hash, TreeError> {
        self.check_size(size)?;
        match size.get() {
            0 => Ok(empty_root()),
            n if n == self.size => Ok(self.root()),
            n => self.range_hash(0, n),
        }
    }

    /// Returns the RFC 9162 inclusion proof `PATH(leaf, D[0:size])`: sibling hashes from the leaf
    /// level upwards.
    ///
    /// # Errors
    /// [`TreeError::SizeOutOfRange`] when `size` exceeds the current size,
    /// [`TreeError::LeafOutOfRange`] when `leaf` is not below `size`, [`TreeError::Store`] or
    /// [`TreeError::MissingNode`] when the store cannot provide a node.
    pub fn inclusion_proof(&self, leaf: LeafIndex, size: TreeSize) -> Result<Vec<Hash>, TreeError> {
        self.check_size(size)?;
        if leaf.get() >= size.get() {
            return Err(TreeError::LeafOutOfRange {
                leaf: leaf.get(),
                size: size.get(),
            });
        }
        let mut proof = Vec::with_capacity(64);
        self.path(0, leaf.get(), size.get(), &mut proof)?;
        Ok(proof)
    }

    /// Returns the RFC 9162 consistency proof `PROOF(size1, D[0:size2])`.
    ///
    /// It is empty when the sizes are equal, and it omits the old root when `size1` is a power of
    /// two, because the verifier already holds that root.
    ///
    /// # Errors
    /// [`TreeError::SizeOutOfRange`] when `size2` exceeds the current size,
    /// [`TreeError::SizeDecreased`] when `size1 > size2`, [`TreeError::EmptyOldTree`] when `size1`
    /// is 0, [`TreeError::Store`] or [`TreeError::MissingNode`] when the store cannot provide a node.
    pub fn consistency_proof(
        &self,
        size1: TreeSize,
        size2: TreeSize,
    ) -> Result<Vec<Hash>, TreeError> {
        self.check_size(size2)?;
        let (size1, size2) = (size1.get(), size2.get());
        if size1 > size2 {
            return Err(TreeError::SizeDecreased { size1, size2 });
        }
        if size1 == 0 {
            return Err(TreeError::EmptyOldTree);
        }
        let mut proof = Vec::with_capacity(64);
        if size1 == size2 {
            return Ok(proof);
        }
        // The old tree's rightmost perfect subtree is the one node both trees share on the path
        // to leaf size1 - 1; the proof is that node plus its inclusion path in the new tree.
        let level = size1.trailing_zeros();
        let index = (size1 - 1) >> level;
        if index != 0 {
            proof.push(self.node(NodeId::at(level, index))?);
        }
        self.path(level, index, size2, &mut proof)?;
        Ok(proof)
    }

    /// Checks the right edge of the tree against the store: every perfect subtree of the current
    /// size is stored and equal to the cached copy, and every node on its right spine equals the
    /// hash of its two stored children. That is `O(log^2 n)` reads and hashes.
    ///
    /// # Errors
    /// [`TreeError::MissingNode`] or [`TreeError::NodeMismatch`] naming the first bad node,
    /// [`TreeError::Store`] when the store fails.
    pub fn self_check(&self) -> Result<(), TreeError> {
        for (id, cached) in perfect_tiling(0, self.size).zip(&self.frontier) {
            let mut node = id;
            let mut hash = self.node(id)?;
            if hash != *cached {
                return Err(TreeError::NodeMismatch(id));
            }
            while let Some((left, right)) = node.children() {
                let right_hash = self.node(right)?;
                if hash != node_hash(&self.node(left)?, &right_hash) {
                    return Err(TreeError::NodeMismatch(node));
                }
                node = right;
                hash = right_hash;
            }
        }
        Ok(())
    }

    /// Checks the whole tree against the store: every leaf is stored, and every stored perfect
    /// subtree equals the hash of its two stored children. That is `O(n)` reads and hashes.
    ///
    /// A single altered node is always found, except the newest leaf of an odd-sized tree (nothing
    /// depends on it yet); compare [`Tree::root`] with a signed checkpoint to cover it.
    ///
    /// # Errors
    /// [`TreeError::MissingNode`] or [`TreeError::NodeMismatch`] naming the first bad node,
    /// [`TreeError::Store`] when the store fails.
    pub fn self_check_full(&self) -> Result<(), TreeError> {
        self.self_check()?;
        for index in 0..self.size {
            self.node(NodeId::at(0, index))?;
        }
        let mut level = 1;
        while level < 64 && self.size >> level != 0 {
            for index in 0..self.size >> level {
                let id = NodeId::at(level, index);
                let left = self.node(NodeId::at(level - 1, 2 * index))?;
                let right = self.node(NodeId::at(level - 1, 2 * index + 1))?;
                if self.node(id)? != node_hash(&left, &right) {
                    return Err(TreeError::NodeMismatch(id));
                }
            }
            level += 1;
        }
        Ok(())
    }

    /// Rejects sizes the tree has not reached yet.
    fn check_size(&self, size: TreeSize) -> Result<(), TreeError> {
        if size.get() > self.size {
            return Err(TreeError::SizeOutOfRange {
                requested: size.get(),
                current: self.size,
            });
        }
        Ok(())
    }

    /// Reads a node that a tree of the current size must have stored.
    fn node(&self, id: NodeId) -> Result<Hash, TreeError> {
        self.store
            .get(id)
            .map_err(store_error)?
            .ok_or(TreeError::MissingNode(id))
    }

    /// Returns `MTH(D[begin:end])` for a range whose perfect tiling is aligned, which holds for
    /// `[0, n)` and for the right-edge ranges `path` asks for.
    fn range_hash(&self, begin: u64, end: u64) -> Result<Hash, TreeError> {
        // RFC 9162 splits off the largest perfect subtree on the left, so the root is the fold of
        // the tiling from the right: node_hash(first, node_hash(second, ... last)).
        let mut acc: Option<Hash> = None;
        let mut end = end;
        let mut remaining = end - begin;
        while remaining != 0 {
            let level = remaining.trailing_zeros();
            end -= 1 << level;
            let hash = self.node(NodeId::at(level, end >> level))?;
            acc = Some(match acc {
                None => hash,
                Some(right) => node_hash(&hash, &right),
            });
            remaining &= remaining - 1;
        }
        Ok(acc.unwrap_or_else(empty_root))
    }

    /// Returns the range proof for leaves `[from, to)` in the tree of `size` leaves: the hashes of
    /// the subtrees of the RFC 9162 recursion that lie wholly outside the range, in the order the
    /// recursion meets them (left to right). With the range's leaf hashes, they rebuild the root;
    /// see [`root_from_range`]. A full range (`from == 0`, `to == size`) needs no hashes.
    ///
    /// # Errors
    /// [`TreeError::SizeOutOfRange`] when `size` exceeds the tree, [`TreeError::LeafOutOfRange`]
    /// when the range is empty or ends beyond `size`, and store failures.
    pub fn range_proof(&self, from: u64, to: u64, size: TreeSize) -> Result<Vec<Hash>, TreeError> {
        self.check_size(size)?;
        let size = size.get();
        if from >= to || to > size {
            return Err(TreeError::LeafOutOfRange { leaf: to, size });
        }
        let mut out = Vec::new();
        self.range_proof_rec(0, size, from, to, &mut out)?;
        Ok(out)
    }

    fn range_proof_rec(
        &self,
        begin: u64,
        end: u64,
        from: u64,
        to: u64,
        out: &mut Vec<Hash>,
    ) -> Result<(), TreeError> {
        if end <= from || begin >= to {
            // Every subtree of the recursion is either perfect and aligned, or runs to the end of
            // the tree, which `range_hash` folds from the perfect subtrees that tile it.
            out.push(self.range_hash(begin, end)?);
            return Ok(());
        }
        if end - begin == 1 {
            return Ok(());
        }
        let k = split_point(end - begin);
        self.range_proof_rec(begin, begin + k, from, to, out)?;
        self.range_proof_rec(begin + k, end, from, to, out)
    }

    /// Appends to `out` the inclusion path of the perfect node (`level`, `index`) in the tree of
    /// `size` leaves, lowest level first, in the split that `verify.go` expects.
    fn path(
        &self,
        level: u32,
        index: u64,
        size: u64,
        out: &mut Vec<Hash>,
    ) -> Result<(), TreeError> {
        // Below the level where the paths to this node and to the last leaf meet, every sibling
        // is a perfect subtree, except the one right under the meeting point: it holds the last
        // leaf and may be incomplete, so it is folded from the perfect subtrees that tile it.
        let last = (size - 1) >> level;
        let inner = u64::BITS - (index ^ last).leading_zeros();
        for j in 0..inner.saturating_sub(1) {
            out.push(self.node(NodeId::at(level + j, (index >> j) ^ 1))?);
        }
        if inner > 0 {
            let l = level + inner - 1;
            let begin = ((index >> (inner - 1)) | 1) << l;
            out.push(self.range_hash(begin, size)?);
        }
        // Above the meeting point the path runs along the right edge, where only left siblings
        // exist.
        let mut node = index >> inner;
        let mut l = level + inner;
        while node != 0 {
            if node & 1 == 1 {
                out.push(self.node(NodeId::at(l, node - 1))?);
            }
            node >>= 1;
            l += 1;
        }
        Ok(())
    }
}

/// Yields the perfect subtrees that tile `[begin, end)`, largest first, for an aligned range.
fn perfect_tiling(begin: u64, end: u64) -> impl Iterator<Item = NodeId> {
    let mut start = begin;
    let mut remaining = end - begin;
    std::iter::from_fn(move || {
        if remaining == 0 {
            return None;
        }
        let level = u64::BITS - 1 - remaining.leading_zeros();
        let id = NodeId::at(level, start >> level);
        start += 1 << level;
        remaining &= !(1 << level);
        Some(id)
    })
}

/// Why a proof was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The leaf index is not below the tree size; every index is out of range in an empty tree.
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange {
        /// The claimed leaf index.
        index: u64,
        /// The claimed tree size.
        size: u64,
    },
    /// The leaf hash is not exactly [`HASH_LEN`] bytes long.
    #[error("leaf hash has {len} bytes, want {HASH_LEN}")]
    MalformedHash {
        /// The length that was given.
        len: usize,
    },
    /// More or fewer leaves were given than the range holds.
    #[error("{got} leaves given for a range of {want}")]
    WrongLeafCount {
        /// The number of leaves given.
        got: u64,
        /// The number the range holds.
        want: u64,
    },
    /// The proof does not have the number of hashes the sizes call for, so it was truncated,
    /// padded, or made for other sizes.
    #[error("proof has {got} hashes, want {want}")]
    WrongProofSize {
        /// The number of hashes given.
        got: usize,
        /// The number the sizes call for.
        want: usize,
    },
    /// The new size of a consistency proof is smaller than the old one: logs only grow.
    #[error("size2 {size2} is smaller than size1 {size1}")]
    SizeDecreased {
        /// The claimed old size.
        size1: u64,
        /// The claimed new size.
        size2: u64,
    },
    /// The old size of a consistency proof is 0, which proves nothing (even from 0 to 0).
    #[error("a consistency proof from the empty tree is meaningless")]
    EmptyOldTree,
    /// The consistency proof does not reproduce the old root.
    #[error("the proof does not reproduce the old root")]
    OldRootMismatch,
    /// The proof does not reproduce the (new) root; for equal sizes, the two roots differ.
    #[error("the proof does not reproduce the root")]
    RootMismatch,
}

/// Rebuilds the root of a tree of `size` leaves from the leaf hashes of `[from, from + leaves.len())`
/// and the range proof that [`Tree::range_proof`] produced for that range.
///
/// # Errors
/// [`VerifyError::IndexOutOfRange`] when the range is empty or ends beyond `size`;
/// [`VerifyError::WrongProofSize`] when the proof has more or fewer hashes than the range needs;
/// [`VerifyError::MalformedHash`] when a proof entry is not 32 bytes.
pub fn root_from_range<P: AsRef<[u8]>>(
    from: u64,
    leaves: &[Hash],
    size: u64,
    proof: &[P],
) -> Result<Hash, VerifyError> {
    let to = from
        .checked_add(leaves.len() as u64)
        .ok_or(VerifyError::IndexOutOfRange { index: from, size })?;
    let mut hasher = RangeHasher::new(from, to, size)?;
    for leaf in leaves {
        hasher.push(*leaf);
    }
    hasher.finish(proof)
}

/// [`root_from_range`] with the range's leaf hashes given one at a time, in order: it holds a few
/// hashes per level of the tree instead of every leaf's, so that a verifier's memory does not grow
/// with the bundle.
///
/// The range splits into maximal subtrees that lie wholly inside it (at most two a level). Each
/// one's hash is built as its leaves arrive, on a stack of perfect subtrees merged like a binary
/// counter; at its last leaf the stack folds from the right, which is RFC 9162's split at the
/// largest power of two. [`RangeHasher::finish`] then walks the tree as [`root_from_range`] always
/// did, taking those hashes, and the proof's for the subtrees outside the range, in order.
#[derive(Debug)]
pub struct RangeHasher {
    from: u64,
    to: u64,
    size: u64,
    /// Leaf counts of the subtrees wholly inside the range, left to right.
    segments: Vec<u64>,
    /// The hashes of the segments completed so far.
    done: Vec<Hash>,
    /// The segment being built: perfect subtrees with their leaf counts, larger first.
    stack: Vec<(u64, Hash)>,
    /// Leaves taken into the current segment.
    in_segment: u64,
    /// Leaves taken in all.
    taken: u64,
}

impl RangeHasher {
    /// A hasher for the leaves `from..to` of a tree of `size` leaves.
    ///
    /// # Errors
    /// [`VerifyError::IndexOutOfRange`] when the range is empty or ends beyond `size`.
    pub fn new(from: u64, to: u64, size: u64) -> Result<Self, VerifyError> {
        if from >= to || to > size {
            return Err(VerifyError::IndexOutOfRange { index: to, size });
        }
        let mut segments = Vec::new();
        plan_segments(0, size, from, to, &mut segments);
        Ok(RangeHasher {
            from,
            to,
            size,
            segments,
            done: Vec::new(),
            stack: Vec::new(),
            in_segment: 0,
            taken: 0,
        })
    }

    /// Takes the next leaf hash of the range; leaves past its end are counted, and make
    /// [`RangeHasher::finish`] fail.
    pub fn push(&mut self, leaf: Hash) {
        self.taken += 1;
        let Some(&want) = self.segments.get(self.done.len()) else {
            return;
        };
        let mut top = (1u64, leaf);
        while let Some(&(n, left)) = self.stack.last() {
            if n != top.0 {
                break;
            }
            self.stack.pop();
            top = (2 * n, node_hash(&left, &top.1));
        }
        self.stack.push(top);
        self.in_segment += 1;
        if self.in_segment == want {
            let mut parts = std::mem::take(&mut self.stack).into_iter().rev();
            let (_, mut hash) = parts.next().expect("a segment holds a leaf");
            for (_, left) in parts {
                hash = node_hash(&left, &hash);
            }
            self.done.push(hash);
            self.in_segment = 0;
        }
    }

    /// The root of the tree from the range's leaves and `proof`, the hashes of the subtrees outside
    /// the range in left-to-right order.
    ///
    /// # Errors
    /// [`VerifyError::WrongLeafCount`] when more or fewer leaves than the range holds were given;
    /// [`VerifyError::WrongProofSize`] when the proof has more or fewer hashes than the range needs;
    /// [`VerifyError::MalformedHash`] when a proof entry is not 32 bytes.
    pub fn finish<P: AsRef<[u8]>>(self, proof: &[P]) -> Result<Hash, VerifyError> {
        if self.taken != self.to - self.from {
            return Err(VerifyError::WrongLeafCount {
                got: self.taken,
                want: self.to - self.from,
            });
        }
        let mut next = 0usize;
        let mut segments = self.done.into_iter();
        let root = range_root_rec(
            0,
            self.size,
            self.from,
            self.to,
            &mut segments,
            proof,
            &mut next,
        )?;
        if next != proof.len() {
            return Err(VerifyError::WrongProofSize {
                got: proof.len(),
                want: next,
            });
        }
        Ok(root)
    }
}

/// Appends to `out` the leaf counts of the maximal subtrees of `[begin, end)` wholly inside
/// `[from, to)`, left to right.
fn plan_segments(begin: u64, end: u64, from: u64, to: u64, out: &mut Vec<u64>) {
    if end <= from || begin >= to {
        return;
    }
    if from <= begin && end <= to {
        out.push(end - begin);
        return;
    }
    let k = split_point(end - begin);
    plan_segments(begin, begin + k, from, to, out);
    plan_segments(begin + k, end, from, to, out);
}

fn range_root_rec<P: AsRef<[u8]>>(
    begin: u64,
    end: u64,
    from: u64,
    to: u64,
    segments: &mut impl Iterator<Item = Hash>,
    proof: &[P],
    next: &mut usize,
) -> Result<Hash, VerifyError> {
    if end <= from || begin >= to {
        let entry = proof.get(*next).ok_or(VerifyError::WrongProofSize {
            got: proof.len(),
            want: *next + 1,
        })?;
        *next += 1;
        return entry
            .as_ref()
            .try_into()
            .map_err(|_| VerifyError::MalformedHash {
                len: entry.as_ref().len(),
            });
    }
    if from <= begin && end <= to {
        // The segments were planned by the same walk, so there is one for every such subtree.
        return Ok(segments.next().expect("one hash per planned segment"));
    }
    let k = split_point(end - begin);
    let left = range_root_rec(begin, begin + k, from, to, segments, proof, next)?;
    let right = range_root_rec(begin + k, end, from, to, segments, proof, next)?;
    Ok(node_hash(&left, &right))
}

/// Returns the root that an inclusion proof implies for the leaf with hash `leaf_hash` at `index`
/// in a tree of `size` leaves.
///
/// Proof entries are hashed as given, whatever their length, as `verify.go` does; a malformed entry
/// just yields a root that matches nothing.
///
/// # Errors
/// [`VerifyError::IndexOutOfRange`] when `index >= size`, [`VerifyError::MalformedHash`] when
/// `leaf_hash` is not 32 bytes, [`VerifyError::WrongProofSize`] when the proof length does not fit
/// `(index, size)`.
///
/// # Panics
/// Never: every size and index up to `u64::MAX` is handled.
pub fn root_from_inclusion_proof<P: AsRef<[u8]>>(
    leaf_hash: &[u8],
    index: u64,
    size: u64,
    proof: &[P],
) -> Result<Hash, VerifyError> {
    if index >= size {
        return Err(VerifyError::IndexOutOfRange { index, size });
    }
    let leaf: Hash = leaf_hash
        .try_into()
        .map_err(|_| VerifyError::MalformedHash {
            len: leaf_hash.len(),
        })?;
    let (inner, border) = decompose_inclusion(index, size);
    if proof.len() != inner + border {
        return Err(VerifyError::WrongProofSize {
            got: proof.len(),
            want: inner + border,
        });
    }
    let (inner_proof, border_proof) = proof.split_at(inner);
    let mut acc = leaf;
    for (i, sibling) in inner_proof.iter().enumerate() {
        acc = if (index >> i) & 1 == 0 {
            node_hash(&acc, sibling.as_ref())
        } else {
            node_hash(sibling.as_ref(), &acc)
        };
    }
    for sibling in border_proof {
        acc = node_hash(sibling.as_ref(), &acc);
    }
    Ok(acc)
}

/// Checks that the leaf with hash `leaf_hash` is at `index` in the tree of `size` leaves whose root
/// is `root`. The root is compared byte for byte, so a root of the wrong length never matches.
///
/// # Errors
/// As [`root_from_inclusion_proof`], plus [`VerifyError::RootMismatch`] when the implied root is
/// not `root`.
///
/// # Panics
/// Never: every size and index up to `u64::MAX` is handled.
pub fn verify_inclusion<P: AsRef<[u8]>>(
    leaf_hash: &[u8],
    index: u64,
    size: u64,
    proof: &[P],
    root: &[u8],
) -> Result<(), VerifyError> {
    let computed = root_from_inclusion_proof(leaf_hash, index, size, proof)?;
    if computed.as_slice() != root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `size2` leaves with root `root2` extends the tree of `size1` leaves
/// with root `root1`.
///
/// As in `verify.go`: equal sizes need an empty proof and byte-equal roots (of any length); a
/// `size1` of 0 is rejected even when `size2` is 0; when `size1` is a power of two the proof omits
/// `root1`, which then seeds the computation.
///
/// # Errors
/// [`VerifyError::SizeDecreased`] when `size2 < size1`, [`VerifyError::EmptyOldTree`] when `size1`
/// is 0, [`VerifyError::WrongProofSize`] when the proof length does not fit the sizes,
/// [`VerifyError::OldRootMismatch`] or [`VerifyError::RootMismatch`] when a root is not reproduced.
///
/// # Panics
/// Never: every size up to `u64::MAX` is handled.
pub fn verify_consistency<P: AsRef<[u8]>>(
    size1: u64,
    size2: u64,
    proof: &[P],
    root1: &[u8],
    root2: &[u8],
) -> Result<(), VerifyError> {
    if size2 < size1 {
        return Err(VerifyError::SizeDecreased { size1, size2 });
    }
    if size1 == 0 {
        return Err(VerifyError::EmptyOldTree);
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(VerifyError::WrongProofSize {
                got: proof.len(),
                want: 0,
            });
        }
        if root1 != root2 {
            return Err(VerifyError::RootMismatch);
        }
        return Ok(());
    }

    // Now 0 < size1 < size2. The proof is the old tree's rightmost perfect subtree (level
    // `shift`) followed by that subtree's inclusion path in the new tree.
    let (inner, border) = decompose_inclusion(size1 - 1, size2);
    let shift = size1.trailing_zeros() as usize;
    // The paths to leaves size1 - 1 and size2 - 1 part above level `shift`, so this cannot wrap.
    let inner = inner - shift;
    let seeded_by_root1 = size1.is_power_of_two();
    let start = usize::from(!seeded_by_root1);
    let want = start + inner + border;
    if proof.len() != want {
        return Err(VerifyError::WrongProofSize {
            got: proof.len(),
            want,
        });
    }
    let seed: &[u8] = if seeded_by_root1 {
        root1
    } else {
        proof[0].as_ref()
    };
    let (inner_proof, border_proof) = proof[start..].split_at(inner);
    let mask = (size1 - 1) >> shift;

    // The old root uses only the left siblings on the path; the new root uses all of them.
    let mut hash1 = Running::Borrowed(seed);
    let mut hash2 = Running::Borrowed(seed);
    for (i, sibling) in inner_proof.iter().enumerate() {
        let sibling = sibling.as_ref();
        if (mask >> i) & 1 == 1 {
            hash1 = Running::Owned(node_hash(sibling, hash1.as_bytes()));
            hash2 = Running::Owned(node_hash(sibling, hash2.as_bytes()));
        } else {
            hash2 = Running::Owned(node_hash(hash2.as_bytes(), sibling));
        }
    }
    for sibling in border_proof {
        let sibling = sibling.as_ref();
        hash1 = Running::Owned(node_hash(sibling, hash1.as_bytes()));
        hash2 = Running::Owned(node_hash(sibling, hash2.as_bytes()));
    }
    if hash1.as_bytes() != root1 {
        return Err(VerifyError::OldRootMismatch);
    }
    if hash2.as_bytes() != root2 {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}

/// A hash being chained through a proof: it starts as caller-supplied bytes, which `verify.go`
/// does not length-check, and becomes a digest after the first step.
enum Running<'a> {
    /// The seed, not hashed yet.
    Borrowed(&'a [u8]),
    /// A digest computed from the seed and proof entries.
    Owned(Hash),
}

impl Running<'_> {
    /// Returns the current bytes.
    fn as_bytes(&self) -> &[u8] {
        match self {
            Running::Borrowed(bytes) => bytes,
            Running::Owned(hash) => hash,
        }
    }
}

/// Splits the inclusion proof length for `index` in a tree of `size` leaves into the part below
/// the point where the paths to `index` and to `size - 1` meet (`inner`) and the left siblings
/// above it (`border`), as `verify.go`'s `decompInclProof` does.
fn decompose_inclusion(index: u64, size: u64) -> (usize, usize) {
    let inner = u64::BITS - (index ^ (size - 1)).leading_zeros();
    // Go's shift yields 0 for a count of 64; Rust's would overflow, hence checked_shr.
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner as usize, border as usize)
}

/// The RFC 9162 split point of `n > 1` leaves: the largest power of two strictly below `n`.
fn split_point(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (u64::BITS - 1 - (n - 1).leading_zeros())
}
