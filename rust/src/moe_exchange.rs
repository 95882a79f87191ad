//! Expert parallelism's dispatch and combine over shared memory, each one call (the fast path
//! of python/expertmesh/parallel/all_to_all.py for ShmTransport).
//!
//! The generic path runs plan, per-destination writes, wait, receive plan and the weighted sum
//! as some 40 torch ops per layer (~300 us per 1-token dispatch + combine at R=2 on the CPU VM);
//! here they are two calls around the expert GEMMs, which stay in torch:
//!
//! ```text
//! dispatch: plan_dispatch -> rows [hidden | k local expert ids (i64) | k weights (f32)] into
//!           every destination's slot -> wait -> plan_receive over the received ids -> pairs
//!           grouped by local expert (their slot rows, pair ids and weights)
//! experts:  x_sorted = the pairs' hidden rows copied out of the slots (gather_pairs; a
//!           strided torch index_select over the slots was 5x slower), then (torch)
//!           y = expert_fn(x_sorted, expert_offsets)
//! combine:  each received row's sum over its slots, in slot order, of weight * y (f32) goes
//!           straight into its source's slot -> wait -> out[token] += returned rows, sources in
//!           rank order (shm_rows::add_rows_f32)
//! ```
//!
//! The same arithmetic as the generic path: one rank's result up to fp32 rounding.

use crate::a2a::{experts_per_rank, plan_dispatch, plan_receive};
use crate::error::{CoreError, CoreResult};
use crate::shm_rows::{RowSource, ShmRows};

/// What a dispatch received, and what its combine needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MoeDispatch {
    /// Tokens dispatched (T): the rows of combine's output.
    pub num_tokens: usize,
    /// Top-k.
    pub top_k: usize,
    /// `[R]` rows sent to each rank.
    pub send_counts: Vec<usize>,
    /// `[S]` token of each sent row (the combine map).
    pub send_token_ids: Vec<i64>,
    /// `[R]` rows received from each rank.
    pub recv_counts: Vec<usize>,
    /// `[Q]` slot row (of the phase's `[R*C]` rows) holding each pair's hidden state, grouped by local expert.
    pub pair_rows: Vec<i64>,
    /// `[Q]` received row * k + slot of each pair, in the same order.
    pub pair_ids: Vec<i64>,
    /// `[Q]` routing weight of each pair.
    pub pair_weights: Vec<f32>,
    /// `[El+1]` exclusive prefix sums of pairs per local expert.
    pub expert_offsets: Vec<i64>,
}

fn read_i64(addr: usize) -> i64 {
    // SAFETY: callers read inside a slot row of the mapped segment.
    unsafe { (addr as *const i64).read_unaligned() }
}

fn read_f32(addr: usize) -> f32 {
    // SAFETY: as read_i64.
    unsafe { (addr as *const f32).read_unaligned() }
}

impl ShmRows {
    /// Shot 1: `x` holds T hidden rows, `ids` / `weights` the `[T, k]` routing (row-major).
    #[allow(clippy::too_many_arguments)] // the routing arrays and their shape travel together from Python
    pub fn dispatch_moe(
        &self,
        phase: usize,
        seq: u64,
        x: RowSource<'_>,
        ids: &[i64],
        weights: &[f32],
        top_k: usize,
        num_experts: usize,
    ) -> CoreResult<MoeDispatch> {
        let (world, num_tokens) = (self.layout().world, x.rows);
        if ids.len() != num_tokens * top_k || weights.len() != ids.len() {
            let got = if ids.len() != num_tokens * top_k {
                ids.len()
            } else {
                weights.len()
            };
            return Err(CoreError::LengthMismatch {
                field: "topk ids and weights",
                expected: num_tokens * top_k,
                got,
            });
        }
        let per_rank = experts_per_rank(num_experts, world)?;
        let plan = plan_dispatch(ids, num_tokens, top_k, num_experts, world)?;
        let send_counts: Vec<usize> = plan.send_counts.iter().map(|&c| c as usize).collect();
        let hidden = RowSource {
            gather: Some(&plan.send_token_ids),
            ..x
        };
        let local = RowSource {
            base: plan.send_local_experts.as_ptr() as usize,
            stride: 8 * top_k,
            width: 8 * top_k,
            rows: plan.send_token_ids.len(),
            gather: None,
        };
        let weight_rows = RowSource {
            base: weights.as_ptr() as usize,
            stride: 4 * top_k,
            width: 4 * top_k,
            rows: num_tokens,
            gather: Some(&plan.send_token_ids),
        };
        self.send(
            phase,
            seq,
            &[hidden, local, weight_rows],
            &send_counts,
            false,
        )?;
        let recv_counts = self.wait(phase, seq)?;

        // The received rows' local ids and weights, read where they landed.
        let rows = self.received_rows(&recv_counts);
        let mut recv_local = Vec::with_capacity(rows.len() * top_k);
        let mut recv_weights = Vec::with_capacity(rows.len() * top_k);
        for &row in &rows {
            let at = self.slot_row_addr(phase, row) + x.width;
            recv_local.extend((0..top_k).map(|s| read_i64(at + 8 * s)));
            recv_weights.extend((0..top_k).map(|s| read_f32(at + 8 * top_k + 4 * s)));
        }
        let counts: Vec<i64> = recv_counts.iter().map(|&c| c as i64).collect();
        let rp = plan_receive(&counts, &recv_local, top_k, per_rank)?;
        let pair_rows = rp
            .sorted_pair_ids
            .iter()
            .map(|&p| rows[p as usize / top_k] as i64)
            .collect();
        let pair_weights = rp
            .sorted_pair_ids
            .iter()
            .map(|&p| recv_weights[p as usize])
            .collect();
        Ok(MoeDispatch {
            num_tokens,
            top_k,
            send_counts,
            send_token_ids: plan.send_token_ids,
            recv_counts,
            pair_rows,
            pair_ids: rp.sorted_pair_ids,
            pair_weights,
            expert_offsets: rp.expert_offsets,
        })
    }

    /// Copy every pair's hidden row (`row_bytes` from the start of its slot row in phase
    /// `phase`) into `out` `[Q, row_bytes]`, in `d`'s pair order.
    pub fn gather_pairs(
        &self,
        phase: usize,
        d: &MoeDispatch,
        row_bytes: usize,
        out: &mut [u8],
    ) -> CoreResult<()> {
        let max = self.layout().max_row_bytes;
        if row_bytes > max {
            return Err(CoreError::out_of_range(
                "row bytes",
                format!("<= max_row_bytes={max}"),
                row_bytes as i128,
            ));
        }
        if out.len() != d.pair_rows.len() * row_bytes {
            return Err(CoreError::LengthMismatch {
                field: "out",
                expected: d.pair_rows.len() * row_bytes,
                got: out.len(),
            });
        }
        let rows = self.layout().world * self.layout().slot_rows;
        for (q, &row) in d.pair_rows.iter().enumerate() {
            if row < 0 || row as usize >= rows {
                return Err(CoreError::out_of_range(
                    format!("pair_rows[{q}]"),
                    format!("in [0, {rows})"),
                    row,
                ));
            }
            let src = self.slot_row_addr(phase, row as usize) as *const u8;
            // SAFETY: a slot row of the mapped segment holds max_row_bytes >= row_bytes bytes.
            let src = unsafe { std::slice::from_raw_parts(src, row_bytes) };
            out[q * row_bytes..(q + 1) * row_bytes].copy_from_slice(src);
        }
        Ok(())
    }

    /// Shot 2: `y` `[Q, H]` f32 expert outputs in `d`'s pair order; adds every token's
    /// returned sums into `out` `[T, H]` (which the caller zeroed).
    pub fn combine_moe(
        &self,
        phase: usize,
        seq: u64,
        d: &MoeDispatch,
        y: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) -> CoreResult<()> {
        let (world, k) = (self.layout().world, d.top_k);
        if y.len() != d.pair_ids.len() * hidden {
            return Err(CoreError::LengthMismatch {
                field: "y",
                expected: d.pair_ids.len() * hidden,
                got: y.len(),
            });
        }
        if out.len() != d.num_tokens * hidden {
            return Err(CoreError::LengthMismatch {
                field: "out",
                expected: d.num_tokens * hidden,
                got: out.len(),
            });
        }
        let received: usize = d.recv_counts.iter().sum();
        let mut pair_of_slot = vec![usize::MAX; received * k]; // [S'*k] pair index, MAX = not here
        for (q, &p) in d.pair_ids.iter().enumerate() {
            pair_of_slot[p as usize] = q;
        }
        // One f32 row per received row, back to its source (packed); partial sums are built in
        // place in the destination slot.
        let row_bytes = 4 * hidden;
        if row_bytes > self.layout().max_row_bytes {
            return Err(CoreError::out_of_range(
                "row bytes",
                format!("<= max_row_bytes={}", self.layout().max_row_bytes),
                row_bytes as i128,
            ));
        }
        let mut acc = vec![0f32; hidden]; // [H] one row's sum
        let mut j = 0;
        for (src, &n) in d.recv_counts.iter().enumerate() {
            let slot = self.peer_slot_addr(src, phase, self.rank());
            for r in 0..n {
                // SAFETY: row r < n <= slot_rows of a slot of max_row_bytes >= row_bytes rows
                // (wait() returned n from the peer's checked send), packed rows fit the slot.
                let row = unsafe {
                    std::slice::from_raw_parts_mut((slot + r * row_bytes) as *mut u8, row_bytes)
                };
                acc.fill(0.0);
                for s in 0..k {
                    let q = pair_of_slot[j * k + s];
                    if q != usize::MAX {
                        let (w, yq) = (d.pair_weights[q], &y[q * hidden..(q + 1) * hidden]);
                        for (a, &v) in acc.iter_mut().zip(yq) {
                            *a += v * w;
                        }
                    }
                }
                for (c, v) in acc.iter().enumerate() {
                    row[4 * c..4 * c + 4].copy_from_slice(&v.to_ne_bytes());
                }
                j += 1;
            }
        }
        self.publish(phase, seq, &d.recv_counts);
        let back = self.wait(phase, seq)?;
        if back != d.send_counts {
            return Err(CoreError::LengthMismatch {
                field: "combine rows",
                expected: d.send_counts.iter().sum(),
                got: back.iter().sum(),
            });
        }
        debug_assert_eq!(back.len(), world);
        self.add_rows_f32(phase, &back, hidden, out, &d.send_token_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm_rows::{ranks_in_process, SegmentLayout};
    use std::time::Duration;

    #[test]
    fn dispatch_then_combine_gives_the_weighted_sum_on_every_rank() {
        // R=2, 4 experts (2 per rank), top-2, hidden 3 in f32; the "experts" return their input,
        // so every token must come back as x * (w0 + w1).
        let (world, hidden, k, experts, tokens) = (2usize, 3usize, 2usize, 4usize, 5usize);
        let (_segs, ranks) = ranks_in_process(world, tokens, 4 * hidden + 12 * k);
        std::thread::scope(|scope| {
            for rank in &ranks {
                scope.spawn(move || {
                    let r = rank.rank() as f32;
                    let x: Vec<f32> = (0..tokens * hidden).map(|i| i as f32 + 100.0 * r).collect();
                    let ids: Vec<i64> = (0..tokens)
                        .flat_map(|t| [(t % 4) as i64, ((t + 1 + rank.rank()) % 4) as i64])
                        .collect();
                    let w: Vec<f32> = (0..tokens)
                        .flat_map(|t| [0.25 + t as f32 * 0.1, 0.5])
                        .collect();
                    let src = RowSource {
                        base: x.as_ptr() as usize,
                        stride: 4 * hidden,
                        width: 4 * hidden,
                        rows: tokens,
                        gather: None,
                    };
                    let d = rank.dispatch_moe(0, 0, src, &ids, &w, k, experts).unwrap();
                    assert_eq!(d.expert_offsets.len(), 3);
                    // y = the pairs' hidden states, read from the slots as torch would.
                    let y: Vec<f32> = d
                        .pair_rows
                        .iter()
                        .flat_map(|&row| {
                            (0..hidden)
                                .map(move |c| read_f32(rank.slot_row_addr(0, row as usize) + 4 * c))
                        })
                        .collect();
                    let mut out = vec![0f32; tokens * hidden];
                    rank.combine_moe(1, 1, &d, &y, hidden, &mut out).unwrap();
                    for t in 0..tokens {
                        for c in 0..hidden {
                            let want =
                                x[t * hidden + c] * w[2 * t] + x[t * hidden + c] * w[2 * t + 1];
                            assert!(
                                (out[t * hidden + c] - want).abs() <= 1e-4 * want.abs().max(1.0),
                                "token {t}"
                            );
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn bad_lengths_are_refused() {
        let layout = SegmentLayout {
            world: 1,
            phases: 2,
            slot_rows: 2,
            max_row_bytes: 64,
        };
        let mut seg = vec![0u64; layout.bytes().div_ceil(8)];
        let one = unsafe {
            ShmRows::new(
                vec![seg.as_mut_ptr() as usize],
                layout,
                0,
                vec![1],
                Duration::from_secs(1),
            )
            .unwrap()
        };
        let x = [0f32; 8];
        let src = RowSource {
            base: x.as_ptr() as usize,
            stride: 16,
            width: 16,
            rows: 2,
            gather: None,
        };
        let e = one
            .dispatch_moe(0, 0, src, &[0, 1, 0], &[1.0; 3], 2, 2)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "topk ids and weights must have 4 elements, got 3"
        );
        let e = one
            .dispatch_moe(0, 0, src, &[0, 1, 0, 5], &[1.0; 4], 2, 2)
            .unwrap_err();
        assert!(e.to_string().contains("num_experts=2), got 5"), "{e}");
    }
}
