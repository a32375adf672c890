//! Property tests for the Merkle module: proofs from random trees verify, tampered ones do not, proofs equal a recursive RFC 9162 oracle, and a reopened store passes or fails its self-checks as it should.

use agentgate::audit::merkle::{
    leaf_hash, node_hash, verify_consistency, verify_inclusion, Hash, LeafIndex, MemNodeStore,
    NodeId, NodeStore, Tree, TreeError, TreeSize, VerifyError,
};
use proptest::prelude::*;

/// Trees go up to this many leaves: big enough for ten levels and ragged right edges, small
/// enough that the whole file runs in seconds in a debug build.
const MAX_LEAVES: u64 = 3000;

fn size(n: u64) -> TreeSize {
    TreeSize::new(n).unwrap()
}

fn leaf(i: u64) -> LeafIndex {
    LeafIndex::new(i).unwrap()
}

fn leaf_data(i: u64) -> Vec<u8> {
    format!("audit event {i}").into_bytes()
}

fn build(n: u64) -> Tree<MemNodeStore> {
    let mut tree = Tree::new(MemNodeStore::new());
    for i in 0..n {
        assert_eq!(tree.append(&leaf_data(i)).unwrap(), leaf(i));
    }
    tree
}

/// Picks a value in `[low, high]` from a random seed.
fn pick(seed: u64, low: u64, high: u64) -> u64 {
    low + seed % (high - low + 1)
}

fn flip_bit(h: &mut [u8], bit: u64) {
    let i = (bit / 8) as usize % h.len();
    h[i] ^= 1 << (bit % 8);
}

/// RFC 9162 section 2.1, written recursively straight from the text, as an oracle.
mod rfc {
    use super::*;

    fn split(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    pub fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => agentgate::audit::merkle::empty_root(),
            1 => d[0],
            n => {
                let k = split(n);
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    pub fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
        let n = d.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = split(n);
        if m < k {
            let mut p = path(m, &d[..k]);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = path(m - k, &d[k..]);
            p.push(mth(&d[..k]));
            p
        }
    }

    pub fn proof(m: usize, d: &[Hash]) -> Vec<Hash> {
        subproof(m, d, true)
    }

    fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { Vec::new() } else { vec![mth(d)] };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(m, &d[..k], b);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = subproof(m - k, &d[k..], false);
            p.push(mth(&d[..k]));
            p
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn inclusion_proofs_verify_and_tampering_fails(
        n in 1..=MAX_LEAVES,
        picks in prop::collection::vec(any::<(u64, u64, u64)>(), 12),
    ) {
        let tree = build(n);
        for (size_seed, leaf_seed, bit) in picks {
            let s = pick(size_seed, 1, n);
            let m = pick(leaf_seed, 0, s - 1);
            let root = tree.root_at(size(s)).unwrap();
            let lh = tree.leaf_hash_at(leaf(m)).unwrap();
            prop_assert_eq!(lh, leaf_hash(&leaf_data(m)));
            let proof = tree.inclusion_proof(leaf(m), size(s)).unwrap();
            prop_assert_eq!(verify_inclusion(&lh, m, s, &proof, &root), Ok(()));

            // Every single-bit change to a proof entry breaks it.
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let k = (bit % proof.len() as u64) as usize;
                flip_bit(&mut bad[k], bit / 64);
                prop_assert!(verify_inclusion(&lh, m, s, &bad, &root).is_err());
            }
            // So does a wrong root, a wrong leaf, a shorter or longer proof.
            let mut bad_root = root;
            flip_bit(&mut bad_root, bit);
            prop_assert_eq!(
                verify_inclusion(&lh, m, s, &proof, &bad_root),
                Err(VerifyError::RootMismatch)
            );
            prop_assert!(verify_inclusion(&leaf_hash(b"forged"), m, s, &proof, &root).is_err());
            let mut longer = proof.clone();
            longer.push(root);
            let longer_result = verify_inclusion(&lh, m, s, &longer, &root);
            prop_assert!(
                matches!(longer_result, Err(VerifyError::WrongProofSize { .. })),
                "{:?}", longer_result
            );
            if !proof.is_empty() {
                prop_assert!(verify_inclusion(&lh, m, s, &proof[1..], &root).is_err());
            }
            // Another index of the same tree, or another size with that size's own root, fails.
            if s > 1 {
                let other = (m + 1 + bit % (s - 1)) % s;
                prop_assert!(verify_inclusion(&lh, other, s, &proof, &root).is_err());
            }
            let other_size = pick(bit, m + 1, n);
            if other_size != s {
                let other_root = tree.root_at(size(other_size)).unwrap();
                prop_assert!(verify_inclusion(&lh, m, other_size, &proof, &other_root).is_err());
            }
            prop_assert_eq!(
                verify_inclusion(&lh, s, s, &proof, &root),
                Err(VerifyError::IndexOutOfRange { index: s, size: s })
            );
        }
    }

    #[test]
    fn consistency_proofs_verify_and_tampering_fails(
        n in 1..=MAX_LEAVES,
        picks in prop::collection::vec(any::<(u64, u64, u64)>(), 12),
    ) {
        let tree = build(n);
        for (seed1, seed2, bit) in picks {
            let s2 = pick(seed2, 1, n);
            let s1 = pick(seed1, 1, s2);
            let root1 = tree.root_at(size(s1)).unwrap();
            let root2 = tree.root_at(size(s2)).unwrap();
            let proof = tree.consistency_proof(size(s1), size(s2)).unwrap();
            prop_assert_eq!(verify_consistency(s1, s2, &proof, &root1, &root2), Ok(()));
            prop_assert_eq!(proof.is_empty(), s1 == s2);

            if !proof.is_empty() {
                let mut bad = proof.clone();
                let k = (bit % proof.len() as u64) as usize;
                flip_bit(&mut bad[k], bit / 64);
                prop_assert!(verify_consistency(s1, s2, &bad, &root1, &root2).is_err());
                let mut longer = proof.clone();
                longer.push(root2);
                prop_assert!(verify_consistency(s1, s2, &longer, &root1, &root2).is_err());
                prop_assert!(verify_consistency(s1, s2, &proof[1..], &root1, &root2).is_err());
            }
            let mut bad_root1 = root1;
            flip_bit(&mut bad_root1, bit);
            prop_assert!(verify_consistency(s1, s2, &proof, &bad_root1, &root2).is_err());
            let mut bad_root2 = root2;
            flip_bit(&mut bad_root2, bit);
            prop_assert!(verify_consistency(s1, s2, &proof, &root1, &bad_root2).is_err());
            // Claiming another old size, with that size's own root, fails too.
            let other = pick(bit, 1, s2);
            if other != s1 {
                let other_root = tree.root_at(size(other)).unwrap();
                prop_assert!(verify_consistency(other, s2, &proof, &other_root, &root2).is_err());
            }
            prop_assert_eq!(
                verify_consistency(0, s2, &proof, &root1, &root2),
                Err(VerifyError::EmptyOldTree)
            );
        }
    }

    #[test]
    fn roots_and_proofs_equal_the_recursive_rfc_oracle(
        n in 1..=600u64,
        picks in prop::collection::vec(any::<(u64, u64)>(), 6),
    ) {
        let tree = build(n);
        let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&leaf_data(i))).collect();
        prop_assert_eq!(tree.root(), rfc::mth(&leaves));
        for (a, b) in picks {
            let s2 = pick(a, 1, n);
            let s1 = pick(b, 1, s2);
            let d = &leaves[..s2 as usize];
            prop_assert_eq!(tree.root_at(size(s2)).unwrap(), rfc::mth(d));
            let m = pick(a ^ b, 0, s2 - 1);
            prop_assert_eq!(
                tree.inclusion_proof(leaf(m), size(s2)).unwrap(),
                rfc::path(m as usize, d)
            );
            prop_assert_eq!(
                tree.consistency_proof(size(s1), size(s2)).unwrap(),
                rfc::proof(s1 as usize, d)
            );
        }
    }

    #[test]
    fn reopened_tree_matches_and_a_corrupted_node_is_caught(
        n in 1..=MAX_LEAVES,
        sizes in prop::collection::vec(any::<u64>(), 4),
        victim in any::<(u64, u64, u64)>(),
    ) {
        let tree = build(n);
        let roots: Vec<(u64, Hash)> = sizes
            .iter()
            .map(|&seed| {
                let s = pick(seed, 0, n);
                (s, tree.root_at(size(s)).unwrap())
            })
            .collect();
        let root = tree.root();
        let store = tree.into_store();

        let reopened = Tree::open(store.clone(), size(n)).unwrap();
        prop_assert_eq!(reopened.root(), root);
        for &(s, r) in &roots {
            prop_assert_eq!(reopened.root_at(size(s)).unwrap(), r);
        }
        prop_assert!(reopened.self_check().is_ok());
        prop_assert!(reopened.self_check_full().is_ok());

        // Flip one bit of one stored node of the tree of size n.
        let (level_seed, index_seed, bit) = victim;
        let top = 63 - n.leading_zeros() as u64;
        let level = pick(level_seed, 0, top) as u8;
        let index = pick(index_seed, 0, (n >> level) - 1);
        let id = NodeId::new(level, index).unwrap();
        let mut corrupted = store.clone();
        let mut h = corrupted.get(id).unwrap().unwrap();
        flip_bit(&mut h, bit);
        corrupted.put(id, h).unwrap();

        let checked = Tree::open(corrupted, size(n)).and_then(|t| {
            t.self_check_full()?;
            Ok(t.root())
        });
        if level == 0 && index == n - 1 && n % 2 == 1 {
            // Nothing in the store depends on the newest leaf of an odd-sized tree, so only the
            // root (to be compared with a signed checkpoint) shows the damage.
            let reopened_root = checked.unwrap();
            prop_assert_ne!(reopened_root, root);
        } else {
            prop_assert!(
                matches!(checked, Err(TreeError::NodeMismatch(_))),
                "corrupting {} went unnoticed: {:?}", id, checked
            );
        }

        // A missing node is always caught.
        let mut holed = store;
        holed.remove(id).unwrap();
        let checked = Tree::open(holed, size(n)).and_then(|t| t.self_check_full());
        prop_assert!(matches!(checked, Err(TreeError::MissingNode(_))), "{:?}", checked);
    }

    #[test]
    fn node_ids_round_trip_through_store_keys(level in 0u8..64, index in any::<u64>()) {
        match NodeId::new(level, index) {
            Some(id) => {
                prop_assert_eq!(NodeId::from_key(&id.to_key()), Some(id));
                let (begin, end) = id.leaf_range();
                prop_assert_eq!(end - begin, 1u64 << level);
                prop_assert!(end <= agentgate::audit::merkle::MAX_TREE_SIZE);
            }
            None => prop_assert!(index >= agentgate::audit::merkle::MAX_TREE_SIZE >> level),
        }
    }
}

/// A store that fails every write while `failing` is set, to show a failed append changes nothing.
#[derive(Default)]
struct FlakyStore {
    inner: MemNodeStore,
    failing: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("disk on fire")]
struct Fire;

impl NodeStore for FlakyStore {
    type Error = Fire;

    fn get(&self, id: NodeId) -> Result<Option<Hash>, Fire> {
        Ok(self.inner.get(id).unwrap())
    }

    fn put(&mut self, id: NodeId, hash: Hash) -> Result<(), Fire> {
        if self.failing {
            return Err(Fire);
        }
        self.inner.put(id, hash).unwrap();
        Ok(())
    }
}

#[test]
fn a_failed_append_leaves_the_tree_unchanged() {
    let mut tree = Tree::new(FlakyStore::default());
    for i in 0..7 {
        tree.append(&leaf_data(i)).unwrap();
    }
    let root = tree.root();
    // Leaf 7 would complete three perfect subtrees at once.
    let (mut store, n) = (tree.into_store(), 7);
    store.failing = true;
    let mut tree = Tree::open(store, size(n)).unwrap();
    assert!(matches!(
        tree.append(&leaf_data(7)),
        Err(TreeError::Store(_))
    ));
    assert_eq!(tree.size(), size(7));
    assert_eq!(tree.root(), root);

    let mut store = tree.into_store();
    store.failing = false;
    let mut tree = Tree::open(store, size(7)).unwrap();
    assert_eq!(tree.append(&leaf_data(7)).unwrap(), leaf(7));
    assert_eq!(tree.root(), build(8).root());
    tree.self_check_full().unwrap();
}

#[test]
fn out_of_range_requests_are_errors() {
    let tree = build(5);
    assert!(matches!(
        tree.root_at(size(6)),
        Err(TreeError::SizeOutOfRange {
            requested: 6,
            current: 5
        })
    ));
    assert!(matches!(
        tree.inclusion_proof(leaf(5), size(5)),
        Err(TreeError::LeafOutOfRange { leaf: 5, size: 5 })
    ));
    assert!(matches!(
        tree.consistency_proof(size(4), size(3)),
        Err(TreeError::SizeDecreased { size1: 4, size2: 3 })
    ));
    assert!(matches!(
        tree.consistency_proof(size(0), size(3)),
        Err(TreeError::EmptyOldTree)
    ));
    assert_eq!(
        tree.consistency_proof(size(5), size(5)).unwrap(),
        Vec::<Hash>::new()
    );
    assert!(TreeSize::new(u64::MAX).is_none());
    assert!(LeafIndex::new(agentgate::audit::merkle::MAX_TREE_SIZE).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A range proof plus the range's leaves rebuilds the root, for every range shape; a changed
    /// leaf, a dropped or extra proof entry, or a shifted range does not.
    #[test]
    fn range_proofs_rebuild_the_root(size in 1u64..700, a in 0u64..700, b in 0u64..700) {
        use agentgate::audit::merkle::{root_from_range, Tree, MemNodeStore, TreeSize, leaf_hash};
        let mut tree = Tree::new(MemNodeStore::new());
        let leaves: Vec<_> = (0..size).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for l in &leaves { tree.append_hash(*l).unwrap(); }
        let (from, to) = { let (x, y) = (a % size, b % size); (x.min(y), x.max(y) + 1) };
        let ts = TreeSize::new(size).unwrap();
        let proof = tree.range_proof(from, to, ts).unwrap();
        let root = tree.root();
        let range = &leaves[from as usize..to as usize];
        prop_assert_eq!(root_from_range(from, range, size, &proof).unwrap(), root);
        if from == 0 && to == size { prop_assert!(proof.is_empty()); }
        let mut bad = range.to_vec();
        bad[0][0] ^= 1;
        prop_assert_ne!(root_from_range(from, &bad, size, &proof).unwrap(), root);
        if !proof.is_empty() {
            prop_assert!(root_from_range(from, range, size, &proof[1..]).is_err());
        }
        let mut longer = proof.clone();
        longer.push([0u8; 32]);
        prop_assert!(root_from_range(from, range, size, &longer).is_err());
        if to < size {
            let shifted = root_from_range(from + 1, range, size, &proof);
            prop_assert!(shifted.is_err() || shifted.unwrap() != root);
        }
        // Taken one leaf at a time (as a verifier streams them): the same root, a changed last
        // leaf changes it, and one leaf too few or too many is refused.
        use agentgate::audit::merkle::RangeHasher;
        let streamed = |leaves: &[agentgate::audit::merkle::Hash]| {
            let mut h = RangeHasher::new(from, to, size).unwrap();
            for l in leaves { h.push(*l); }
            h.finish(&proof)
        };
        prop_assert_eq!(streamed(range).unwrap(), root);
        let mut bad_last = range.to_vec();
        bad_last.last_mut().unwrap()[31] ^= 1;
        prop_assert_ne!(streamed(&bad_last).unwrap(), root);
        prop_assert!(streamed(&range[1..]).is_err());
        let mut extra = range.to_vec();
        extra.push(leaves[0]);
        prop_assert!(streamed(&extra).is_err());
    }
}
