//! The block pool's unit tests: reference counts, LRU reuse, prefix hits and their verification.

use super::*;

fn full_hashes(tokens: &[TokenId], bs: usize) -> Vec<BlockHash> {
    let mut h = Vec::new();
    extend_block_hashes(&mut h, tokens, bs, tokens.len() / bs);
    h
}

/// Allocates and registers a sequence's full blocks, returning its block table.
fn cache_sequence(pool: &mut BlockPool, tokens: &[TokenId]) -> Vec<BlockId> {
    let bs = pool.block_size();
    let hashes = full_hashes(tokens, bs);
    let blocks: Vec<_> = (0..hashes.len())
        .map(|_| pool.allocate(0).unwrap())
        .collect();
    let mut cursor = CacheCursor::default();
    pool.register_full_blocks(&mut cursor, &blocks, &hashes, tokens, hashes.len());
    blocks
}

#[test]
fn rejects_zero_sizes() {
    assert_eq!(
        BlockPool::new(0, 16, true).unwrap_err().to_string(),
        "num_blocks must be >= 1, got 0"
    );
    assert_eq!(
        BlockPool::new(4, 0, true).unwrap_err().to_string(),
        "block_size must be >= 1, got 0"
    );
}

#[test]
fn allocate_until_empty_then_free() {
    let mut pool = BlockPool::new(3, 2, false).unwrap();
    let got: Vec<_> = (0..3).map(|_| pool.allocate(0).unwrap()).collect();
    assert_eq!(got, vec![0, 1, 2]);
    assert_eq!(pool.allocate(0), None);
    pool.free_table(got);
    assert_eq!(pool.num_free_blocks(), 3);
    // Tail-first: block 2 was freed first, so it is reallocated first.
    assert_eq!(pool.allocate(0), Some(2));
    pool.check_invariants().unwrap();
}

#[test]
fn hit_after_free_and_eviction_on_reallocation() {
    let mut pool = BlockPool::new(4, 2, true).unwrap();
    let toks = [1, 2, 3, 4, 5];
    let table = cache_sequence(&mut pool, &toks);
    assert_eq!(pool.num_cached_blocks(), 2);
    pool.free_table(table.clone());
    let hashes = full_hashes(&toks, 2);
    let mut hits = Vec::new();
    pool.find_cached_prefix(&hashes, &toks, 2, &mut hits);
    assert_eq!(hits, table);
    // Allocating all 4 blocks evicts both cached hashes.
    for _ in 0..4 {
        pool.allocate(0).unwrap();
    }
    assert_eq!(pool.num_cached_blocks(), 0);
    hits.clear();
    pool.find_cached_prefix(&hashes, &toks, 2, &mut hits);
    assert!(hits.is_empty());
    pool.check_invariants().unwrap();
}

#[test]
fn shared_prefix_ref_counts() {
    let mut pool = BlockPool::new(4, 2, true).unwrap();
    let toks = [7, 7, 8, 8];
    let table = cache_sequence(&mut pool, &toks);
    let mut hits = Vec::new();
    pool.find_cached_prefix(&full_hashes(&toks, 2), &toks, 1, &mut hits);
    assert_eq!(hits, vec![table[0]]);
    pool.take(hits[0]);
    assert_eq!(pool.ref_count(table[0]), 2);
    pool.free_table(table);
    assert_eq!(pool.ref_count(hits[0]), 1);
    assert_eq!(pool.num_free_blocks(), 3);
    pool.check_invariants().unwrap();
}

#[test]
fn forged_hash_collision_is_not_a_hit() {
    let mut pool = BlockPool::new(4, 2, true).unwrap();
    let table = cache_sequence(&mut pool, &[1, 2]);
    pool.free_table(table);
    // Same hash as [1, 2], different tokens: must miss.
    let forged = full_hashes(&[1, 2], 2);
    let mut hits = Vec::new();
    pool.find_cached_prefix(&forged, &[9, 9], 1, &mut hits);
    assert!(hits.is_empty());
}

#[test]
fn child_of_a_different_parent_is_not_a_hit() {
    let mut pool = BlockPool::new(8, 2, true).unwrap();
    let a = [1, 1, 5, 5];
    let b = [2, 2];
    let ta = cache_sequence(&mut pool, &a);
    let tb = cache_sequence(&mut pool, &b);
    // Query [2, 2, 5, 5] with a forged second hash equal to a's: block 0 hits b's block,
    // block 1 finds a's block with equal tokens but a different parent -> must stop.
    let forged = vec![full_hashes(&b, 2)[0], full_hashes(&a, 2)[1]];
    let mut hits = Vec::new();
    pool.find_cached_prefix(&forged, &[2, 2, 5, 5], 2, &mut hits);
    assert_eq!(hits, vec![tb[0]]);
    let _ = ta;
}

#[test]
fn duplicate_registration_keeps_first_block() {
    let mut pool = BlockPool::new(8, 2, true).unwrap();
    let toks = [3, 4, 5, 6];
    let first = cache_sequence(&mut pool, &toks);
    let second = cache_sequence(&mut pool, &toks);
    assert_eq!(pool.num_cached_blocks(), 2);
    let mut hits = Vec::new();
    pool.find_cached_prefix(&full_hashes(&toks, 2), &toks, 2, &mut hits);
    assert_eq!(hits, first);
    pool.free_table(second);
    pool.free_table(first);
    pool.check_invariants().unwrap();
}

#[test]
fn counters_accumulate() {
    let mut pool = BlockPool::new(2, 4, true).unwrap();
    pool.record_lookup(10, 4);
    pool.record_lookup(5, 0);
    assert_eq!(pool.cache_counters(), (15, 4));
}
