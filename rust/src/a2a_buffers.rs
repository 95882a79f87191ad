//! Sizes and reuse rules of the registered all-to-all buffers (see [`crate::a2a`]).
//!
//! Capacity: in one all-to-all call a rank sends at most `max_tokens_per_rank` tokens. A token
//! goes once to a rank, so one source fills at most `max_tokens_per_rank` rows of a receiver's
//! slot for it, a sender sends at most `T * min(k, R)` rows, and a receiver gets at most
//! `R * T` rows holding at most `R * T * min(k, El)` (row, slot) pairs. A step with more tokens
//! is split into chunks that each fit, never dropped.
//!
//! Phases: buffers are double-buffered. Call n uses phase `n % num_phases`. A rank may write
//! call n+2 into a peer's phase only after call n+1 completed, which needs every peer to have
//! finished reading call n; so two phases suffice, provided a rank never starts a call on a
//! phase it has not finished with. [`PhaseRing`] enforces that locally by construction: a
//! phase is handed out as an owned [`PhaseHandle`] (not `Clone`), and the ring refuses to hand
//! the same phase out again until that handle has been given back.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::a2a::experts_per_rank;
use crate::error::{check_at_least, CoreError, CoreResult};

/// Worst-case sizes for one expert-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct A2aCapacity {
    /// Most tokens one rank puts into one all-to-all call; bigger steps are split.
    pub max_tokens_per_rank: usize,
    /// Experts per token (k).
    pub top_k: usize,
    /// Ranks in the group (R).
    pub num_ranks: usize,
    /// Experts each rank owns (El = E / R).
    pub experts_per_rank: usize,
}

impl A2aCapacity {
    /// Errors if a size is < 1, `num_experts % num_ranks != 0` or `top_k > num_experts`.
    pub fn new(
        max_tokens_per_rank: usize,
        top_k: usize,
        num_experts: usize,
        num_ranks: usize,
    ) -> CoreResult<Self> {
        check_at_least("max_tokens_per_rank", max_tokens_per_rank as i128, 1)?;
        check_at_least("top_k", top_k as i128, 1)?;
        let per_rank = experts_per_rank(num_experts, num_ranks)?;
        if top_k > num_experts {
            return Err(CoreError::out_of_range(
                "top_k",
                format!("<= num_experts ({num_experts})"),
                top_k as i128,
            ));
        }
        Ok(A2aCapacity {
            max_tokens_per_rank,
            top_k,
            num_ranks,
            experts_per_rank: per_rank,
        })
    }

    /// Rows one source may write into one receiver's slot per call.
    pub fn slot_rows(&self) -> usize {
        self.max_tokens_per_rank
    }

    /// Rows one rank sends per call at most: each token to at most min(k, R) ranks.
    pub fn max_send_rows(&self) -> usize {
        self.max_tokens_per_rank * self.top_k.min(self.num_ranks)
    }

    /// Rows one rank receives per call at most: every source's every token.
    pub fn max_recv_rows(&self) -> usize {
        self.max_tokens_per_rank * self.num_ranks
    }

    /// (row, slot) pairs one rank's experts see per call at most.
    pub fn max_recv_pairs(&self) -> usize {
        self.max_recv_rows() * self.top_k.min(self.experts_per_rank)
    }

    /// Bytes of one rank's receive buffer: `num_phases` x R slots x `slot_rows` rows.
    pub fn recv_buffer_bytes(&self, row_bytes: usize, num_phases: usize) -> usize {
        num_phases * self.num_ranks * self.slot_rows() * row_bytes
    }

    /// Calls needed when the busiest rank has `max_tokens_any_rank` tokens (0 for 0).
    pub fn num_chunks(&self, max_tokens_any_rank: usize) -> usize {
        max_tokens_any_rank.div_ceil(self.max_tokens_per_rank)
    }

    /// Errors unless every per-destination count fits a slot.
    pub fn check_send_counts(&self, send_counts: &[i64]) -> CoreResult<()> {
        for (rank, &c) in send_counts.iter().enumerate() {
            if c < 0 || c as usize > self.slot_rows() {
                return Err(CoreError::out_of_range(
                    format!("rows sent to rank {rank}"),
                    format!("in [0, max_tokens_per_rank={}]", self.slot_rows()),
                    c,
                ));
            }
        }
        Ok(())
    }
}

/// Source of ring ids, so a handle from one ring is refused by another.
static NEXT_RING_ID: AtomicU64 = AtomicU64::new(0);

/// Hands out buffer phases in call order; see the module comment.
#[derive(Debug)]
pub struct PhaseRing {
    /// Unique id stamped on this ring's handles.
    id: u64,
    /// Sequence number of the next call (0, 1, 2, ...).
    next_seq: u64,
    /// Per phase, the sequence number of the call holding it, if any.
    held: Vec<Option<u64>>,
}

/// An owned claim on one phase's buffers for one call; give it back with
/// [`PhaseRing::release`]. Not `Clone`: at most one live claim per phase.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a phase handle must be released, or its phase stays in flight"]
pub struct PhaseHandle {
    /// The ring that issued it.
    ring: u64,
    /// Buffer phase (`seq % num_phases`).
    pub phase: usize,
    /// Call sequence number; peers' flags carry it.
    pub seq: u64,
}

impl PhaseRing {
    /// A ring of `num_phases` (>= 1; 2 is double buffering).
    pub fn new(num_phases: usize) -> CoreResult<Self> {
        check_at_least("num_phases", num_phases as i128, 1)?;
        Ok(PhaseRing {
            id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
            next_seq: 0,
            held: vec![None; num_phases],
        })
    }

    /// Phases in the ring.
    pub fn num_phases(&self) -> usize {
        self.held.len()
    }

    /// Sequence number the next `acquire` will hand out.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Claims the phase of the next call; errors if that phase is still held.
    pub fn acquire(&mut self) -> CoreResult<PhaseHandle> {
        let phase = (self.next_seq % self.held.len() as u64) as usize;
        if let Some(seq) = self.held[phase] {
            return Err(CoreError::PhaseInFlight {
                phase,
                held_by: seq,
                wanted_by: self.next_seq,
            });
        }
        self.held[phase] = Some(self.next_seq);
        let handle = PhaseHandle {
            ring: self.id,
            phase,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        Ok(handle)
    }

    /// Gives a phase back; errors (and drops the handle) if another ring issued it.
    pub fn release(&mut self, handle: PhaseHandle) -> CoreResult<()> {
        if handle.ring != self.id || self.held[handle.phase] != Some(handle.seq) {
            return Err(CoreError::ForeignPhaseHandle {
                phase: handle.phase,
                seq: handle.seq,
            });
        }
        self.held[handle.phase] = None;
        Ok(())
    }

    /// Phases currently held.
    pub fn num_in_flight(&self) -> usize {
        self.held.iter().filter(|h| h.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_bounds() {
        let c = A2aCapacity::new(16, 8, 64, 4).unwrap();
        assert_eq!(c.slot_rows(), 16);
        assert_eq!(c.max_send_rows(), 16 * 4); // top-8 over 4 ranks: at most 4 destinations
        assert_eq!(c.max_recv_rows(), 64);
        assert_eq!(c.max_recv_pairs(), 64 * 8);
        assert_eq!(c.recv_buffer_bytes(100, 2), 2 * 4 * 16 * 100);
        assert_eq!(c.num_chunks(0), 0);
        assert_eq!(c.num_chunks(16), 1);
        assert_eq!(c.num_chunks(17), 2);
        let c = A2aCapacity::new(16, 2, 64, 4).unwrap();
        assert_eq!(c.max_send_rows(), 32);
        assert_eq!(c.max_recv_pairs(), 64 * 2);
        assert!(c.check_send_counts(&[16, 0, 3, 1]).is_ok());
        let e = c.check_send_counts(&[0, 17, 0, 0]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rows sent to rank 1 must be in [0, max_tokens_per_rank=16], got 17"
        );
        let e = A2aCapacity::new(0, 2, 8, 2).unwrap_err();
        assert_eq!(e.to_string(), "max_tokens_per_rank must be >= 1, got 0");
        let e = A2aCapacity::new(4, 9, 8, 2).unwrap_err();
        assert_eq!(e.to_string(), "top_k must be <= num_experts (8), got 9");
        assert!(A2aCapacity::new(4, 2, 6, 4).is_err());
    }

    #[test]
    fn phases_alternate_and_refuse_reuse_in_flight() {
        let mut ring = PhaseRing::new(2).unwrap();
        let a = ring.acquire().unwrap();
        let b = ring.acquire().unwrap();
        assert_eq!((a.phase, a.seq, b.phase, b.seq), (0, 0, 1, 1));
        let e = ring.acquire().unwrap_err();
        assert_eq!(
            e.to_string(),
            "buffer phase 0 is still in flight (call 0) and cannot be reused by call 2; \
             release its handle first"
        );
        assert_eq!(ring.num_in_flight(), 2);
        ring.release(a).unwrap();
        let c = ring.acquire().unwrap();
        assert_eq!((c.phase, c.seq), (0, 2));
        ring.release(b).unwrap();
        ring.release(c).unwrap();
        assert_eq!(ring.num_in_flight(), 0);
        assert_eq!(ring.next_seq(), 3);
    }

    #[test]
    fn foreign_handles_are_refused() {
        let mut one = PhaseRing::new(2).unwrap();
        let mut other = PhaseRing::new(2).unwrap();
        let h = one.acquire().unwrap();
        let e = other.release(h).unwrap_err();
        assert!(e.to_string().contains("not issued by this ring"));
        assert_eq!(one.num_in_flight(), 1); // the real claim is still held
        assert!(PhaseRing::new(0).is_err());
    }
}
