//! Token routing for MoE layers: turns each token's top-k expert choices into the expert-sorted
//! order the grouped expert GEMMs want, the inverse map the combine step needs, and the number
//! of tokens each expert-parallel rank receives.
//!
//! Legend: T tokens, k experts per token, E experts, R ranks. A "pair" is one (token, slot)
//! entry of `topk_ids`, with flat id `p = token * k + slot`.

use crate::a2a::{experts_per_rank, prefix_sums};
use crate::error::{CoreError, CoreResult};

/// Where every (token, slot) pair goes. All arrays are int64 so they index torch tensors as-is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingPlan {
    /// `[T*k]` pair ids sorted by expert; pairs of one expert keep token order (stable).
    pub sorted_pair_ids: Vec<i64>,
    /// `[T*k]` inverse permutation: `sorted_pair_ids[pair_positions[p]] == p`.
    pub pair_positions: Vec<i64>,
    /// `[E]` pairs routed to each expert.
    pub tokens_per_expert: Vec<i64>,
    /// `[E+1]` exclusive prefix sums of `tokens_per_expert`: expert e's pairs are
    /// `sorted_pair_ids[expert_offsets[e]..expert_offsets[e+1]]`.
    pub expert_offsets: Vec<i64>,
    /// `[R]` distinct tokens each rank receives: a token counts once per rank even when several
    /// of its experts live there. Rank r owns experts `[r*E/R, (r+1)*E/R)`.
    pub rank_send_counts: Vec<i64>,
}

/// Builds the routing plan for `topk_ids` (`[T, k]` row-major, `T*k` entries).
/// Errors if an id is outside `[0, num_experts)`, if `num_experts % num_ranks != 0`, or if the
/// buffer length is not `num_tokens * top_k`.
pub fn route<I: Copy + Into<i64>>(
    topk_ids: &[I],
    num_tokens: usize,
    top_k: usize,
    num_experts: usize,
    num_ranks: usize,
) -> CoreResult<RoutingPlan> {
    let experts_per_rank = experts_per_rank(num_experts, num_ranks)?;
    let num_pairs = num_tokens * top_k;
    if topk_ids.len() != num_pairs {
        return Err(CoreError::LengthMismatch {
            field: "topk_ids",
            expected: num_pairs,
            got: topk_ids.len(),
        });
    }

    // Count pairs per expert, validating ids on the way.
    let mut tokens_per_expert = vec![0i64; num_experts];
    for (p, &id) in topk_ids.iter().enumerate() {
        let e: i64 = id.into();
        if e < 0 || e >= num_experts as i64 {
            return Err(CoreError::ExpertOutOfRange {
                token: p / top_k,
                slot: p % top_k,
                expert: e,
                num_experts,
            });
        }
        tokens_per_expert[e as usize] += 1;
    }
    let expert_offsets = prefix_sums(&tokens_per_expert);

    // Stable counting sort: scanning pairs in order keeps token order within an expert.
    let mut cursor = expert_offsets[..num_experts].to_vec();
    let mut sorted_pair_ids = vec![0i64; num_pairs];
    let mut pair_positions = vec![0i64; num_pairs];
    for (p, &id) in topk_ids.iter().enumerate() {
        let e = id.into() as usize;
        let pos = cursor[e];
        cursor[e] += 1;
        sorted_pair_ids[pos as usize] = p as i64;
        pair_positions[p] = pos;
    }

    // Per-rank distinct tokens: `last_token[r]` remembers the last token counted for rank r.
    let mut rank_send_counts = vec![0i64; num_ranks];
    let mut last_token = vec![usize::MAX; num_ranks];
    for (p, &id) in topk_ids.iter().enumerate() {
        let (token, rank) = (p / top_k, id.into() as usize / experts_per_rank);
        if last_token[rank] != token {
            last_token[rank] = token;
            rank_send_counts[rank] += 1;
        }
    }

    Ok(RoutingPlan {
        sorted_pair_ids,
        pair_positions,
        tokens_per_expert,
        expert_offsets,
        rank_send_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_example() {
        // T=3, k=2, E=4, R=2: rank 0 owns experts {0,1}, rank 1 owns {2,3}.
        let ids: [i32; 6] = [1, 0, 3, 1, 0, 2];
        let plan = route(&ids, 3, 2, 4, 2).unwrap();
        assert_eq!(plan.tokens_per_expert, vec![2, 2, 1, 1]);
        assert_eq!(plan.expert_offsets, vec![0, 2, 4, 5, 6]);
        assert_eq!(plan.sorted_pair_ids, vec![1, 4, 0, 3, 5, 2]);
        assert_eq!(plan.pair_positions, vec![2, 0, 5, 3, 1, 4]);
        // token 0 -> rank 0 once (experts 1 and 0); token 1 -> ranks 1 and 0; token 2 -> 0 and 1.
        assert_eq!(plan.rank_send_counts, vec![3, 2]);
    }

    #[test]
    fn errors_name_limits() {
        let e = route(&[0i32, 8], 1, 2, 8, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "topk_ids[0, 1] must be in [0, num_experts=8), got 8"
        );
        let e = route(&[-1i64], 1, 1, 8, 1).unwrap_err();
        assert!(e.to_string().ends_with("got -1"));
        let e = route(&[0i32], 1, 1, 6, 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "num_experts must be a multiple of num_ranks (4), got 6"
        );
        let e = route(&[0i32; 3], 2, 2, 4, 1).unwrap_err();
        assert_eq!(e.to_string(), "topk_ids must have 4 elements, got 3");
        assert!(route(&[0i32], 1, 1, 0, 1).is_err());
    }

    #[test]
    fn empty_batch() {
        let plan = route::<i32>(&[], 0, 2, 4, 2).unwrap();
        assert_eq!(plan.expert_offsets, vec![0; 5]);
        assert_eq!(plan.rank_send_counts, vec![0, 0]);
    }

    proptest! {
        #[test]
        fn sorted_order_is_a_grouped_permutation(
            (t, k, e, r, ids) in (0usize..40, 1usize..5, 1usize..5, 1usize..4)
                .prop_flat_map(|(t, k, per_rank, r)| {
                    let e = per_rank * r;
                    (Just(t), Just(k), Just(e), Just(r), proptest::collection::vec(0..e as i32, t * k))
                })
        ) {
            let plan = route(&ids, t, k, e, r).unwrap();
            let mut seen = vec![false; t * k];
            for (pos, &p) in plan.sorted_pair_ids.iter().enumerate() {
                prop_assert!(!seen[p as usize]);
                seen[p as usize] = true;
                prop_assert_eq!(plan.pair_positions[p as usize], pos as i64);
            }
            prop_assert!(seen.iter().all(|&s| s));
            for ex in 0..e {
                let (lo, hi) = (plan.expert_offsets[ex] as usize, plan.expert_offsets[ex + 1] as usize);
                prop_assert_eq!((hi - lo) as i64, plan.tokens_per_expert[ex]);
                let group = &plan.sorted_pair_ids[lo..hi];
                prop_assert!(group.iter().all(|&p| ids[p as usize] == ex as i32));
                prop_assert!(group.windows(2).all(|w| w[0] < w[1]), "stable");
            }
            for rank in 0..r {
                let owns = |x: i32| (x as usize) / (e / r) == rank;
                let want = (0..t).filter(|&tok| ids[tok * k..(tok + 1) * k].iter().any(|&x| owns(x))).count();
                prop_assert_eq!(plan.rank_send_counts[rank], want as i64);
            }
        }
    }
}
