//! The two-shot all-to-all of expert parallelism (EP), as plans: which rows a rank sends where
//! (shot 1, dispatch), how a receiver groups what it got by local expert, and how results find
//! their way back (shot 2, combine). No data moves here; the transports in
//! `python/expertmesh/parallel/` copy rows along these plans.
//!
//! Legend: T tokens on this rank, k experts per token, E experts, R ranks, El = E / R experts
//! per rank (rank r owns experts `[r*El, (r+1)*El)`), S rows this rank sends, S' rows it
//! receives. A "row" is one (token, destination rank) pair: a token goes once to a rank even
//! when several of its top-k experts live there, carrying all k slots' local expert ids
//! (-1 for slots whose expert lives elsewhere). A "pair" on the receiver is one valid
//! (row, slot) entry, flat id `row * k + slot`.
//!
//! Combine needs no plan of its own: the receiver returns one row per received row, in receive
//! order (the weighted sum over its local experts), so the source gets them back in its send
//! order and adds row i into token `send_token_ids[i]`.

use crate::error::{check_at_least, CoreError, CoreResult};

/// Shot 1 on the sending side: rows grouped by destination rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchPlan {
    /// `[S]` token of each send row; rows are grouped by destination rank (rank 0 first) and
    /// keep token order within a rank. Also the combine map: returned row i adds into this token.
    pub send_token_ids: Vec<i64>,
    /// `[S*k]` for each send row, each slot's expert as a local id on the destination
    /// (`expert - dest * El`), or -1 where that slot's expert lives on another rank.
    pub send_local_experts: Vec<i64>,
    /// `[R]` rows sent to each rank (distinct tokens that have at least one expert there).
    pub send_counts: Vec<i64>,
    /// `[R+1]` exclusive prefix sums of `send_counts`: rank r's rows are `[off[r], off[r+1])`.
    pub send_offsets: Vec<i64>,
}

/// Shot 1 on the receiving side, once counts and rows from every source have arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivePlan {
    /// `[R+1]` exclusive prefix sums of the received counts: source s's rows land at
    /// `[off[s], off[s+1])` of the contiguous receive buffer.
    pub recv_offsets: Vec<i64>,
    /// `[Q]` valid pair ids (`row * k + slot`, local expert != -1) sorted by local expert;
    /// stable, so pairs of one expert keep receive order.
    pub sorted_pair_ids: Vec<i64>,
    /// `[El]` pairs per local expert (the load this rank's experts see).
    pub tokens_per_expert: Vec<i64>,
    /// `[El+1]` exclusive prefix sums: local expert e's pairs are
    /// `sorted_pair_ids[off[e]..off[e+1]]`.
    pub expert_offsets: Vec<i64>,
}

/// Checks `num_experts` and `num_ranks` and returns experts per rank.
pub fn experts_per_rank(num_experts: usize, num_ranks: usize) -> CoreResult<usize> {
    check_at_least("num_experts", num_experts as i128, 1)?;
    check_at_least("num_ranks", num_ranks as i128, 1)?;
    if !num_experts.is_multiple_of(num_ranks) {
        return Err(CoreError::UnevenExperts {
            num_experts,
            num_ranks,
        });
    }
    Ok(num_experts / num_ranks)
}

/// `[n+1]` exclusive prefix sums of `counts`.
pub(crate) fn prefix_sums(counts: &[i64]) -> Vec<i64> {
    let mut out = Vec::with_capacity(counts.len() + 1);
    out.push(0i64);
    for &c in counts {
        out.push(out.last().unwrap() + c);
    }
    out
}

/// Plans shot 1 for `topk_ids` (`[T, k]` row-major).
/// Errors on an id outside `[0, num_experts)`, uneven experts, or a length that is not `T*k`.
pub fn plan_dispatch<I: Copy + Into<i64>>(
    topk_ids: &[I],
    num_tokens: usize,
    top_k: usize,
    num_experts: usize,
    num_ranks: usize,
) -> CoreResult<DispatchPlan> {
    let per_rank = experts_per_rank(num_experts, num_ranks)?;
    if topk_ids.len() != num_tokens * top_k {
        return Err(CoreError::LengthMismatch {
            field: "topk_ids",
            expected: num_tokens * top_k,
            got: topk_ids.len(),
        });
    }
    // Pass 1: validate and count distinct tokens per rank (`last` = last token counted).
    let mut send_counts = vec![0i64; num_ranks];
    let mut last = vec![usize::MAX; num_ranks];
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
        let (token, rank) = (p / top_k, e as usize / per_rank);
        if last[rank] != token {
            last[rank] = token;
            send_counts[rank] += 1;
        }
    }
    let send_offsets = prefix_sums(&send_counts);
    let rows = *send_offsets.last().unwrap() as usize;

    // Pass 2: place each (token, rank) row; a token's slots for one rank share its row.
    let mut cursor: Vec<i64> = send_offsets[..num_ranks].to_vec();
    let mut send_token_ids = vec![0i64; rows];
    let mut send_local_experts = vec![-1i64; rows * top_k];
    let mut row_of = vec![usize::MAX; num_ranks]; // this token's row at each rank, if any
    for token in 0..num_tokens {
        let ids = &topk_ids[token * top_k..(token + 1) * top_k];
        for (slot, &id) in ids.iter().enumerate() {
            let e = id.into() as usize;
            let rank = e / per_rank;
            if row_of[rank] == usize::MAX {
                let row = cursor[rank] as usize;
                cursor[rank] += 1;
                send_token_ids[row] = token as i64;
                row_of[rank] = row;
            }
            send_local_experts[row_of[rank] * top_k + slot] = (e - rank * per_rank) as i64;
        }
        for &id in ids {
            row_of[id.into() as usize / per_rank] = usize::MAX;
        }
    }
    Ok(DispatchPlan {
        send_token_ids,
        send_local_experts,
        send_counts,
        send_offsets,
    })
}

/// Plans the receiver's side of shot 1: `recv_counts` `[R]` rows from each source (the
/// exchanged `send_counts`), `recv_local_experts` `[S'*k]` the received rows' local expert ids
/// (-1 = slot not for this rank). Errors if a count is negative, the ids do not have
/// `sum(recv_counts) * k` entries, an id is outside `[-1, El)`, or a row has no valid slot.
pub fn plan_receive(
    recv_counts: &[i64],
    recv_local_experts: &[i64],
    top_k: usize,
    experts_per_rank: usize,
) -> CoreResult<ReceivePlan> {
    check_at_least("top_k", top_k as i128, 1)?;
    check_at_least("experts_per_rank", experts_per_rank as i128, 1)?;
    for (s, &c) in recv_counts.iter().enumerate() {
        check_at_least(&format!("recv_counts[{s}]"), c.into(), 0)?;
    }
    let recv_offsets = prefix_sums(recv_counts);
    let rows = *recv_offsets.last().unwrap() as usize;
    if recv_local_experts.len() != rows * top_k {
        return Err(CoreError::LengthMismatch {
            field: "recv_local_experts",
            expected: rows * top_k,
            got: recv_local_experts.len(),
        });
    }
    let mut tokens_per_expert = vec![0i64; experts_per_rank];
    for (row, ids) in recv_local_experts.chunks(top_k).enumerate() {
        let mut any = false;
        for (slot, &e) in ids.iter().enumerate() {
            if e < -1 || e >= experts_per_rank as i64 {
                return Err(CoreError::out_of_range(
                    format!("recv_local_experts[{row}, {slot}]"),
                    format!("in [-1, experts_per_rank={experts_per_rank})"),
                    e,
                ));
            }
            if e >= 0 {
                tokens_per_expert[e as usize] += 1;
                any = true;
            }
        }
        if !any {
            // A row is only ever sent for a token with an expert here: corrupt input.
            return Err(CoreError::out_of_range(
                format!("valid slots of received row {row}"),
                ">= 1",
                0,
            ));
        }
    }
    let expert_offsets = prefix_sums(&tokens_per_expert);
    let mut cursor = expert_offsets[..experts_per_rank].to_vec();
    let mut sorted_pair_ids = vec![0i64; *expert_offsets.last().unwrap() as usize];
    for (p, &e) in recv_local_experts.iter().enumerate() {
        if e >= 0 {
            sorted_pair_ids[cursor[e as usize] as usize] = p as i64;
            cursor[e as usize] += 1;
        }
    }
    Ok(ReceivePlan {
        recv_offsets,
        sorted_pair_ids,
        tokens_per_expert,
        expert_offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_example() {
        // T=3, k=2, E=4, R=2: rank 0 owns {0,1}, rank 1 owns {2,3}.
        let ids: [i32; 6] = [1, 0, 3, 1, 0, 2];
        let d = plan_dispatch(&ids, 3, 2, 4, 2).unwrap();
        // token 0 -> rank 0 once (experts 1 and 0); token 1 -> both; token 2 -> both.
        assert_eq!(d.send_counts, vec![3, 2]);
        assert_eq!(d.send_offsets, vec![0, 3, 5]);
        assert_eq!(d.send_token_ids, vec![0, 1, 2, 1, 2]);
        assert_eq!(d.send_local_experts, vec![1, 0, -1, 1, 0, -1, 1, -1, -1, 0]);
        // Rank 1 receives its own 2 rows and, say, 1 row from rank 0.
        let recv = plan_receive(&[1, 2], &[0, -1, 1, -1, -1, 0], 2, 2).unwrap();
        assert_eq!(recv.recv_offsets, vec![0, 1, 3]);
        assert_eq!(recv.tokens_per_expert, vec![2, 1]);
        assert_eq!(recv.expert_offsets, vec![0, 2, 3]);
        assert_eq!(recv.sorted_pair_ids, vec![0, 5, 2]);
    }

    #[test]
    fn errors_name_limits() {
        let e = plan_dispatch(&[0i32, 8], 1, 2, 8, 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "topk_ids[0, 1] must be in [0, num_experts=8), got 8"
        );
        let e = plan_dispatch(&[0i32], 1, 1, 6, 4).unwrap_err();
        assert!(e.to_string().contains("multiple of num_ranks (4), got 6"));
        let e = plan_receive(&[1], &[2, -1], 2, 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "recv_local_experts[0, 0] must be in [-1, experts_per_rank=2), got 2"
        );
        let e = plan_receive(&[-1], &[], 2, 2).unwrap_err();
        assert_eq!(e.to_string(), "recv_counts[0] must be >= 0, got -1");
        let e = plan_receive(&[2], &[0, 1], 2, 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "recv_local_experts must have 4 elements, got 2"
        );
        assert!(plan_receive(&[1], &[-1, -1], 2, 2).is_err());
    }

    #[test]
    fn empty_and_idle_ranks() {
        let d = plan_dispatch::<i32>(&[], 0, 2, 4, 2).unwrap();
        assert_eq!(d.send_counts, vec![0, 0]);
        assert!(d.send_token_ids.is_empty());
        // Every token on rank 0's experts: rank 1 gets nothing.
        let d = plan_dispatch(&[0i32, 1, 1, 0], 2, 2, 4, 2).unwrap();
        assert_eq!(d.send_counts, vec![2, 0]);
        let r = plan_receive(&[0, 0], &[], 2, 2).unwrap();
        assert_eq!(r.expert_offsets, vec![0, 0, 0]);
    }

    proptest! {
        /// Dispatch then receive (R sources, each with its own routing) gives every rank
        /// exactly the (token, slot) pairs whose experts it owns, grouped by local expert.
        #[test]
        fn every_pair_reaches_its_expert_once(
            (k, per_rank, r, routing) in (1usize..4, 1usize..4, 1usize..5).prop_flat_map(|(k, per_rank, r)| {
                let e = (per_rank * r) as i32;
                let one = (0usize..12).prop_flat_map(move |t| proptest::collection::vec(0..e, t * k));
                (Just(k), Just(per_rank), Just(r), proptest::collection::vec(one, r))
            })
        ) {
            let e = per_rank * r;
            let plans: Vec<_> = routing.iter()
                .map(|ids| plan_dispatch(ids, ids.len() / k, k, e, r).unwrap()).collect();
            for (src, (ids, d)) in routing.iter().zip(&plans).enumerate() {
                let t = ids.len() / k;
                prop_assert!(d.send_counts.iter().all(|&c| c as usize <= t));
                prop_assert!(d.send_token_ids.len() <= t * k.min(r), "source {}", src);
                for dest in 0..r {
                    let (lo, hi) = (d.send_offsets[dest] as usize, d.send_offsets[dest + 1] as usize);
                    prop_assert!(d.send_token_ids[lo..hi].windows(2).all(|w| w[0] < w[1]), "once, in order");
                }
            }
            for dest in 0..r {
                // Gather what every source sends to `dest`, in source order.
                let mut counts = vec![];
                let mut local = vec![];
                let mut origin = vec![]; // (source, token) per received row
                for (src, d) in plans.iter().enumerate() {
                    let (lo, hi) = (d.send_offsets[dest] as usize, d.send_offsets[dest + 1] as usize);
                    counts.push((hi - lo) as i64);
                    local.extend_from_slice(&d.send_local_experts[lo * k..hi * k]);
                    origin.extend(d.send_token_ids[lo..hi].iter().map(|&tok| (src, tok as usize)));
                }
                let rp = plan_receive(&counts, &local, k, per_rank).unwrap();
                let mut got: Vec<(usize, usize, usize)> = rp.sorted_pair_ids.iter().map(|&p| {
                    let (row, slot) = (p as usize / k, p as usize % k);
                    (origin[row].0, origin[row].1, slot)
                }).collect();
                for ex in 0..per_rank {
                    let (lo, hi) = (rp.expert_offsets[ex] as usize, rp.expert_offsets[ex + 1] as usize);
                    for &p in &rp.sorted_pair_ids[lo..hi] {
                        prop_assert_eq!(local[p as usize], ex as i64);
                    }
                }
                got.sort_unstable();
                let mut want = vec![];
                for (src, ids) in routing.iter().enumerate() {
                    for (p, &x) in ids.iter().enumerate() {
                        if x as usize / per_rank == dest {
                            want.push((src, p / k, p % k));
                        }
                    }
                }
                prop_assert_eq!(got, want);
            }
        }
    }
}
