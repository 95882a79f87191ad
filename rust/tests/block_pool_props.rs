//! Property tests of the KV block pool: random sequences are cached, shared and freed, and the
//! pool's invariants hold after every operation; split over CP ranks, every block of a
//! sequence (allocated or hit) lies on the rank its index is placed on.

use _core::block_pool::{extend_block_hashes, BlockPool, KvPlacement};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Admit a sequence: reuse its cached prefix, allocate the rest, cache its full blocks.
    Admit(Vec<u32>),
    /// Free the i-th (mod len) live sequence, tail first.
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec(0u32..3, 1..14).prop_map(Op::Admit),
        2 => any::<usize>().prop_map(Op::Free),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn pool_invariants_hold(per_rank in 1usize..12, cp_size in 1usize..4, first_blocks in 0usize..3,
                            block_size in 1usize..4, ops in proptest::collection::vec(op(), 1..60)) {
        let num_blocks = per_rank * cp_size;
        let placement = KvPlacement { cp_size, first_blocks };
        let mut pool = BlockPool::with_placement(num_blocks, block_size, true, placement).unwrap();
        let mut live: Vec<(Vec<u32>, Vec<u32>)> = Vec::new(); // (tokens, block table)
        // What each block's KV was computed from: the whole token prefix through that block.
        let mut kv_source: Vec<Vec<u32>> = vec![Vec::new(); num_blocks];
        for op in ops {
            match op {
                Op::Admit(tokens) => {
                    let needed = tokens.len().div_ceil(block_size);
                    let num_full = tokens.len() / block_size;
                    let mut hashes = Vec::new();
                    extend_block_hashes(&mut hashes, &tokens, block_size, num_full);
                    let mut hits = Vec::new();
                    pool.find_cached_prefix(&hashes, &tokens, (tokens.len() - 1) / block_size, &mut hits);
                    if !pool.fits(hits.len(), needed, &hits) {
                        continue;
                    }
                    for &b in &hits {
                        let before = pool.ref_count(b);
                        pool.take(b);
                        prop_assert_eq!(pool.ref_count(b), before + 1);
                    }
                    for (i, &b) in hits.iter().enumerate() {
                        let prefix = &tokens[..(i + 1) * block_size];
                        prop_assert_eq!(&kv_source[b as usize][..], prefix, "hit block {} holds other tokens", b);
                    }
                    let mut table = hits.clone();
                    while table.len() < needed {
                        let b = pool.allocate(table.len()).unwrap();
                        prop_assert_eq!(pool.ref_count(b), 1, "a fresh block is owned by nobody else");
                        prop_assert!(live.iter().all(|(_, t)| !t.contains(&b)), "block {} owned twice", b);
                        let end = ((table.len() + 1) * block_size).min(tokens.len());
                        kv_source[b as usize] = tokens[..end].to_vec();
                        table.push(b);
                    }
                    let mut cursor = pool.cursor_after_hits(&hits);
                    pool.register_full_blocks(&mut cursor, &table, &hashes, &tokens, num_full);
                    // Every live sequence sharing a hit block has the same tokens in that block
                    // and in all blocks before it.
                    for (i, &b) in hits.iter().enumerate() {
                        for (other_tokens, other_table) in &live {
                            if other_table.get(i) == Some(&b) {
                                prop_assert_eq!(&other_tokens[..(i + 1) * block_size], &tokens[..(i + 1) * block_size]);
                            }
                        }
                    }
                    for (i, &b) in table.iter().enumerate() {
                        prop_assert_eq!(pool.rank_of_block(b), placement.rank_of(i), "block {} of a sequence", i);
                    }
                    live.push((tokens, table));
                }
                Op::Free(i) => {
                    if !live.is_empty() {
                        let (_, table) = live.remove(i % live.len());
                        pool.free_table(table);
                    }
                }
            }
            prop_assert!(pool.check_invariants().is_ok(), "{:?}", pool.check_invariants());
            let mut owners = vec![0u32; num_blocks];
            for (_, t) in &live {
                for &b in t { owners[b as usize] += 1; }
            }
            let allocated = (0..num_blocks as u32).filter(|&b| pool.ref_count(b) > 0).count();
            prop_assert_eq!(allocated + pool.num_free_blocks(), num_blocks);
            for (b, &n) in owners.iter().enumerate() {
                prop_assert_eq!(pool.ref_count(b as u32), n);
            }
        }
        for (_, t) in live.drain(..) {
            pool.free_table(t);
        }
        prop_assert_eq!(pool.num_free_blocks(), num_blocks);
    }
}
