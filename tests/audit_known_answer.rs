//! Known-answer tests for the Merkle module against the published RFC 6962 / RFC 9162 vectors in `tests/data/rfc6962_vectors.json`, plus a comparison with the `merkle_light` crate.

use std::collections::BTreeMap;

use agentgate::audit::merkle::{
    empty_root, leaf_hash, node_hash, root_from_inclusion_proof, verify_consistency,
    verify_inclusion, Hash, LeafIndex, MemNodeStore, NodeId, NodeStore, Tree, TreeSize,
};
use serde::Deserialize;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/rfc6962_vectors.json"
);

#[derive(Deserialize)]
struct Vectors {
    hasher_vectors: HasherVectors,
    reference_tree: ReferenceTree,
    inclusion_proofs_published: Published<InclusionVector>,
    consistency_proofs_published: Published<ConsistencyVector>,
    verifier_probes_published: Probes,
    #[serde(rename = "derived_exhaustive_NOT_PUBLISHED")]
    derived: Derived,
}

#[derive(Deserialize)]
struct HasherVectors {
    vectors: Vec<HasherVector>,
}

#[derive(Deserialize)]
struct HasherVector {
    desc: String,
    op: String,
    input_hex: Option<String>,
    left_hex: Option<String>,
    right_hex: Option<String>,
    want: String,
}

#[derive(Deserialize)]
struct ReferenceTree {
    leaf_inputs_hex: Vec<String>,
    leaf_hashes: Vec<String>,
    node_hashes_by_level: NodeHashes,
    roots_by_tree_size: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct NodeHashes {
    levels: Vec<Vec<String>>,
}

#[derive(Deserialize)]
struct Published<T> {
    vectors: Vec<T>,
}

#[derive(Deserialize)]
struct InclusionVector {
    leaf_index: u64,
    tree_size: u64,
    root: String,
    leaf_hash: String,
    proof: Vec<String>,
}

#[derive(Deserialize)]
struct ConsistencyVector {
    size1: u64,
    size2: u64,
    root1: String,
    root2: String,
    proof: Vec<String>,
}

#[derive(Deserialize)]
struct Probes {
    inclusion: Vec<InclusionProbe>,
    consistency: Vec<ConsistencyProbe>,
}

#[derive(Deserialize)]
struct InclusionProbe {
    source_path: String,
    leaf_index: u64,
    tree_size: u64,
    root: String,
    leaf_hash: String,
    proof: Vec<String>,
    want_err: bool,
}

#[derive(Deserialize)]
struct ConsistencyProbe {
    source_path: String,
    size1: u64,
    size2: u64,
    root1: String,
    root2: String,
    proof: Vec<String>,
    want_err: bool,
}

#[derive(Deserialize)]
struct Derived {
    inclusion: Vec<DerivedInclusion>,
    consistency: Vec<DerivedConsistency>,
}

#[derive(Deserialize)]
struct DerivedInclusion {
    leaf_index: u64,
    tree_size: u64,
    proof: Vec<String>,
}

#[derive(Deserialize)]
struct DerivedConsistency {
    size1: u64,
    size2: u64,
    proof: Vec<String>,
}

fn vectors() -> Vectors {
    let text = std::fs::read_to_string(VECTORS).expect("read the vectors file");
    serde_json::from_str(&text).expect("parse the vectors file")
}

fn bytes(s: &str) -> Vec<u8> {
    hex::decode(s).expect("vector is valid hex")
}

fn hash(s: &str) -> Hash {
    bytes(s).try_into().expect("vector hash is 32 bytes")
}

fn hashes(list: &[String]) -> Vec<Hash> {
    list.iter().map(|s| hash(s)).collect()
}

fn size(n: u64) -> TreeSize {
    TreeSize::new(n).expect("test sizes are small")
}

fn leaf(i: u64) -> LeafIndex {
    LeafIndex::new(i).expect("test indices are small")
}

/// The eight-leaf reference tree that the published proofs are about.
fn reference_tree(v: &Vectors) -> Tree<MemNodeStore> {
    let mut tree = Tree::new(MemNodeStore::new());
    for input in &v.reference_tree.leaf_inputs_hex {
        tree.append(&bytes(input)).expect("in-memory append");
    }
    tree
}

fn reference_root(v: &Vectors, n: u64) -> Hash {
    hash(&v.reference_tree.roots_by_tree_size[&n.to_string()])
}

/// Records a failure when `got` differs from `want`, and counts the case, so that one run reports
/// every bad case and a test can assert how many cases it really checked.
#[derive(Default)]
struct Checker {
    checked: usize,
    failures: Vec<String>,
}

impl Checker {
    fn check<T: PartialEq + std::fmt::Debug>(&mut self, case: &str, got: T, want: T) {
        self.checked += 1;
        if got != want {
            self.failures
                .push(format!("{case}: got {got:?}, want {want:?}"));
        }
    }

    fn finish(self, want_checked: usize) {
        assert!(
            self.failures.is_empty(),
            "{} of {} cases failed:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
        assert_eq!(self.checked, want_checked, "number of cases checked");
    }
}

#[test]
fn hasher_vectors() {
    let v = vectors();
    let mut c = Checker::default();
    for hv in &v.hasher_vectors.vectors {
        let got = match hv.op.as_str() {
            "empty_root" => empty_root(),
            "leaf_hash" => leaf_hash(&bytes(hv.input_hex.as_deref().unwrap())),
            "node_hash" => node_hash(
                &bytes(hv.left_hex.as_deref().unwrap()),
                &bytes(hv.right_hex.as_deref().unwrap()),
            ),
            other => panic!("unknown hasher op {other}"),
        };
        c.check(&hv.desc, hex::encode(got), hv.want.clone());
    }
    c.finish(4);
}

#[test]
fn reference_tree_stores_every_published_node() {
    let v = vectors();
    let tree = reference_tree(&v);
    let mut c = Checker::default();
    for (i, want) in v.reference_tree.leaf_hashes.iter().enumerate() {
        let i = i as u64;
        let got = tree.leaf_hash_at(leaf(i)).map(hex::encode).ok();
        c.check(&format!("leaf hash {i}"), got, Some(want.clone()));
    }
    for (level, nodes) in v
        .reference_tree
        .node_hashes_by_level
        .levels
        .iter()
        .enumerate()
    {
        for (index, want) in nodes.iter().enumerate() {
            let id = NodeId::new(level as u8, index as u64).unwrap();
            let got = tree.store().get(id).unwrap().map(hex::encode);
            c.check(&id.to_string(), got, Some(want.clone()));
        }
    }
    // 8 leaf hashes, then 8 + 4 + 2 + 1 stored nodes.
    c.finish(8 + 15);
}

#[test]
fn roots_for_sizes_0_to_8() {
    let v = vectors();
    let full = reference_tree(&v);
    let mut growing = Tree::new(MemNodeStore::new());
    let mut c = Checker::default();
    for n in 0..=8u64 {
        let want = reference_root(&v, n);
        c.check(
            &format!("root_at({n})"),
            full.root_at(size(n)).ok(),
            Some(want),
        );
        c.check(&format!("root() at size {n}"), growing.root(), want);
        if let Some(input) = v.reference_tree.leaf_inputs_hex.get(n as usize) {
            growing.append(&bytes(input)).unwrap();
        }
    }
    c.finish(18);
}

#[test]
fn published_inclusion_proofs_are_generated_and_verified() {
    let v = vectors();
    let tree = reference_tree(&v);
    let mut c = Checker::default();
    for pv in &v.inclusion_proofs_published.vectors {
        let case = format!("inclusion {} in {}", pv.leaf_index, pv.tree_size);
        let want = hashes(&pv.proof);
        let got = tree.inclusion_proof(leaf(pv.leaf_index), size(pv.tree_size));
        c.check(&format!("{case}: generated"), got.ok(), Some(want.clone()));
        let verified = verify_inclusion(
            &bytes(&pv.leaf_hash),
            pv.leaf_index,
            pv.tree_size,
            &want,
            &bytes(&pv.root),
        );
        c.check(&format!("{case}: verified"), verified, Ok(()));
        c.check(
            &format!("{case}: root is the reference root"),
            hash(&pv.root),
            reference_root(&v, pv.tree_size),
        );
    }
    c.finish(3 * 7);
}

#[test]
fn published_consistency_proofs_are_generated_and_verified() {
    let v = vectors();
    let tree = reference_tree(&v);
    let mut c = Checker::default();
    for pv in &v.consistency_proofs_published.vectors {
        let case = format!("consistency {} -> {}", pv.size1, pv.size2);
        let want = hashes(&pv.proof);
        let got = tree.consistency_proof(size(pv.size1), size(pv.size2));
        c.check(&format!("{case}: generated"), got.ok(), Some(want.clone()));
        let verified = verify_consistency(
            pv.size1,
            pv.size2,
            &want,
            &bytes(&pv.root1),
            &bytes(&pv.root2),
        );
        c.check(&format!("{case}: verified"), verified, Ok(()));
    }
    c.finish(2 * 5);
}

#[test]
fn published_inclusion_probes_get_the_published_verdict() {
    let v = vectors();
    let mut c = Checker::default();
    let mut accepted = 0;
    for p in &v.verifier_probes_published.inclusion {
        let proof: Vec<Vec<u8>> = p.proof.iter().map(|s| bytes(s)).collect();
        let leaf = bytes(&p.leaf_hash);
        let result = verify_inclusion(&leaf, p.leaf_index, p.tree_size, &proof, &bytes(&p.root));
        accepted += usize::from(result.is_ok());
        c.check(
            &format!("{} ({:?})", p.source_path, result),
            result.is_err(),
            p.want_err,
        );
        // The root-returning form must agree with the boolean form whenever it returns a root.
        if let Ok(root) = root_from_inclusion_proof(&leaf, p.leaf_index, p.tree_size, &proof) {
            c.check(
                &format!("{}: root_from_inclusion_proof", p.source_path),
                root.as_slice() == bytes(&p.root).as_slice(),
                !p.want_err,
            );
        }
    }
    assert_eq!(accepted, 6, "probes accepted");
    // 98 verdicts, plus the probes whose proof had the right shape for a root to be computed.
    assert!(c.checked > 98, "only {} checks", c.checked);
    let checked = c.checked;
    c.finish(checked);
    assert_eq!(v.verifier_probes_published.inclusion.len(), 98);
}

#[test]
fn published_consistency_probes_get_the_published_verdict() {
    let v = vectors();
    let mut c = Checker::default();
    let mut accepted = 0;
    for p in &v.verifier_probes_published.consistency {
        let proof: Vec<Vec<u8>> = p.proof.iter().map(|s| bytes(s)).collect();
        let result =
            verify_consistency(p.size1, p.size2, &proof, &bytes(&p.root1), &bytes(&p.root2));
        accepted += usize::from(result.is_ok());
        c.check(
            &format!("{} ({:?})", p.source_path, result),
            result.is_err(),
            p.want_err,
        );
    }
    assert_eq!(accepted, 6, "probes accepted");
    c.finish(98);
}

#[test]
fn derived_exhaustive_proofs_match_and_verify() {
    let v = vectors();
    let tree = reference_tree(&v);
    let leaf_hashes = hashes(&v.reference_tree.leaf_hashes);
    let mut c = Checker::default();
    for d in &v.derived.inclusion {
        let case = format!("inclusion {} in {}", d.leaf_index, d.tree_size);
        let want = hashes(&d.proof);
        let got = tree.inclusion_proof(leaf(d.leaf_index), size(d.tree_size));
        c.check(&format!("{case}: generated"), got.ok(), Some(want.clone()));
        let verified = verify_inclusion(
            &leaf_hashes[d.leaf_index as usize],
            d.leaf_index,
            d.tree_size,
            &want,
            &reference_root(&v, d.tree_size),
        );
        c.check(&format!("{case}: verified"), verified, Ok(()));
    }
    for d in &v.derived.consistency {
        let case = format!("consistency {} -> {}", d.size1, d.size2);
        let want = hashes(&d.proof);
        let got = tree.consistency_proof(size(d.size1), size(d.size2));
        c.check(&format!("{case}: generated"), got.ok(), Some(want.clone()));
        let verified = verify_consistency(
            d.size1,
            d.size2,
            &want,
            &reference_root(&v, d.size1),
            &reference_root(&v, d.size2),
        );
        c.check(&format!("{case}: verified"), verified, Ok(()));
    }
    // Every (leaf, size) pair for sizes 1..=8 is 36 proofs; every size1 < size2 pair is 28.
    c.finish(2 * 36 + 2 * 28);
}

/// merkle_light (the crate the product owner listed) builds its trees differently from RFC 9162:
/// it duplicates the last node of every odd-width level instead of splitting at the largest power
/// of two. Its default `Algorithm::leaf` and `Algorithm::node` already write the 0x00 and 0x01
/// prefixes, so plugging SHA-256 in as the hasher makes its hashes RFC 9162 hashes; the trees then
/// agree exactly when every level has even width, which is when the size is a power of two.
mod merkle_light_compat {
    use std::hash::Hasher;

    use merkle_light::hash::Algorithm;
    use merkle_light::merkle::MerkleTree;
    use sha2::{Digest, Sha256};

    use super::*;

    /// SHA-256 as a merkle_light hasher. Items are `Vec<u8>` so leaves can be of any length: the
    /// tree's `leaf()` writes 0x00 and then the item, which is exactly RFC 9162's leaf hash input.
    #[derive(Default, Clone)]
    struct Rfc9162Sha256(Sha256);

    impl Hasher for Rfc9162Sha256 {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }

        // merkle_light never calls finish; std's Hasher trait requires it.
        fn finish(&self) -> u64 {
            let digest = self.0.clone().finalize();
            u64::from_be_bytes(digest[..8].try_into().unwrap())
        }
    }

    impl Algorithm<Vec<u8>> for Rfc9162Sha256 {
        fn hash(&mut self) -> Vec<u8> {
            self.0.finalize_reset().to_vec()
        }
    }

    type LightTree = MerkleTree<Vec<u8>, Rfc9162Sha256>;

    fn light_root(leaves: &[Vec<u8>]) -> Vec<u8> {
        LightTree::new(leaves.iter().cloned()).root()
    }

    fn our_tree(leaves: &[Vec<u8>]) -> Tree<MemNodeStore> {
        let mut tree = Tree::new(MemNodeStore::new());
        for l in leaves {
            tree.append(l).unwrap();
        }
        tree
    }

    fn leaves(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("leaf {i}").into_bytes()).collect()
    }

    #[test]
    fn equals_rfc9162_for_power_of_two_sizes() {
        let mut c = Checker::default();
        for k in 1..=10 {
            let n = 1usize << k;
            let data = leaves(n);
            let ours = our_tree(&data);
            c.check(
                &format!("root of {n} leaves"),
                light_root(&data),
                ours.root().to_vec(),
            );
            // merkle_light's lemma is [leaf hash, siblings bottom-up..., root]; the siblings are
            // RFC 9162's audit path when the tree is perfect.
            let light = LightTree::new(data.iter().cloned());
            for i in [0, n / 3, n - 1] {
                let lemma = light.gen_proof(i).lemma().to_vec();
                let path = ours
                    .inclusion_proof(leaf(i as u64), size(n as u64))
                    .unwrap();
                let path: Vec<Vec<u8>> = path.iter().map(|h| h.to_vec()).collect();
                c.check(
                    &format!("proof of leaf {i} of {n}"),
                    lemma[1..lemma.len() - 1].to_vec(),
                    path,
                );
            }
        }
        c.finish(10 * 4);
    }

    #[test]
    fn equals_the_published_reference_roots_for_sizes_2_4_8() {
        let v = vectors();
        let data: Vec<Vec<u8>> = v
            .reference_tree
            .leaf_inputs_hex
            .iter()
            .map(|s| bytes(s))
            .collect();
        let mut c = Checker::default();
        for n in [2u64, 4, 8] {
            c.check(
                &format!("reference root {n}"),
                light_root(&data[..n as usize]),
                reference_root(&v, n).to_vec(),
            );
        }
        c.finish(3);
    }

    #[test]
    fn differs_for_size_3_because_it_duplicates_the_last_node() {
        let v = vectors();
        let data: Vec<Vec<u8>> = v
            .reference_tree
            .leaf_inputs_hex
            .iter()
            .map(|s| bytes(s))
            .collect();
        let abc = data[..3].to_vec();
        let mut abcc = abc.clone();
        abcc.push(abc[2].clone());

        // RFC 9162: MTH([a, b, c]) = node(node(a, b), c), the published size-3 root.
        assert_eq!(
            our_tree(&abc).root(),
            reference_root(&v, 3),
            "our size-3 root is the published one"
        );
        assert_ne!(
            light_root(&abc),
            reference_root(&v, 3).to_vec(),
            "merkle_light's size-3 root is not RFC 9162's"
        );
        // merkle_light: root([a, b, c]) = node(node(a, b), node(c, c)) = root([a, b, c, c]).
        assert_eq!(light_root(&abc), light_root(&abcc));
        assert_eq!(light_root(&abc), our_tree(&abcc).root().to_vec());
        let lh: Vec<Hash> = abc.iter().map(|d| leaf_hash(d)).collect();
        let duplicated = node_hash(&node_hash(&lh[0], &lh[1]), &node_hash(&lh[2], &lh[2]));
        assert_eq!(light_root(&abc), duplicated.to_vec());
    }

    #[test]
    fn differs_for_every_size_that_is_not_a_power_of_two() {
        let mut c = Checker::default();
        for n in (3..=64usize).filter(|n| !n.is_power_of_two()) {
            let data = leaves(n);
            c.check(
                &format!("roots of {n} leaves differ"),
                light_root(&data) != our_tree(&data).root().to_vec(),
                true,
            );
        }
        c.finish(64 - 2 - 5);
    }

    #[test]
    fn cannot_build_trees_of_size_0_or_1() {
        // RFC 9162 defines both (the empty root and the lone leaf hash); merkle_light asserts
        // that a tree has more than one leaf, so it panics instead.
        for n in [0, 1] {
            let data = leaves(n);
            let built = std::panic::catch_unwind(|| light_root(&data));
            assert!(built.is_err(), "merkle_light built a tree of {n} leaves");
        }
        assert_eq!(our_tree(&leaves(0)).root(), empty_root());
        assert_eq!(our_tree(&leaves(1)).root(), leaf_hash(b"leaf 0"));
    }
}

/// The vectors are copied into the repository so a clone tests on its own; when the shared original
/// sits beside the repository (as in CI), the copy must be byte-identical to it.
#[test]
fn the_vector_copy_matches_the_shared_original() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/vectors/rfc6962_vectors.json");
    let copy = std::fs::read(root.join("tests/data/rfc6962_vectors.json")).unwrap();
    assert!(copy.len() > 100_000, "the copy holds the vectors");
    if let Ok(original) = std::fs::read(&shared) {
        assert!(
            original == copy,
            "tests/data/rfc6962_vectors.json differs from {}",
            shared.display()
        );
    }
}
