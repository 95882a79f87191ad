//! The one error type of the core. Every message names the limit that was broken and the value
//! that was received, so a caller can fix its input without reading this crate.

use thiserror::Error;

/// Everything the core rejects. `py/` maps every variant to the Python `CoreError`
/// (a `ValueError` subclass), except the two peer failures, which are `CollectiveError`s.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// A numeric argument is outside its allowed range.
    #[error("{field} must be {limit}, got {value}")]
    OutOfRange {
        /// Name of the argument, as the Python API spells it (with an index for list entries).
        field: String,
        /// The allowed range, in words (e.g. ">= 1").
        limit: String,
        /// The value received.
        value: i128,
    },
    /// Something a call needs is not present in this process.
    #[error("{what} is not available")]
    Unavailable {
        /// What was looked for.
        what: String,
    },
    /// `add_request` was given an id that is already live.
    #[error("request_id {request_id} is already in use by an unfinished request")]
    DuplicateRequest {
        /// The id received.
        request_id: u64,
    },
    /// An operation named a request the scheduler does not know.
    #[error(
        "unknown request_id {request_id} (never added, or finished before the last schedule())"
    )]
    UnknownRequest {
        /// The id received.
        request_id: u64,
    },
    /// `prompt_len + max_tokens` exceeds the model's context length.
    #[error(
        "prompt_len + max_tokens must be <= max_model_len ({max_model_len}), \
         got {prompt_len} + {max_tokens} = {}", prompt_len + max_tokens
    )]
    ExceedsModelLen {
        /// Prompt tokens received.
        prompt_len: usize,
        /// `max_tokens` received.
        max_tokens: usize,
        /// The configured limit.
        max_model_len: usize,
    },
    /// A request would need more KV blocks than the whole pool holds, so it could never finish.
    #[error(
        "request needs up to {needed_blocks} KV blocks ({num_tokens} tokens at block_size \
         {block_size}) but num_blocks is {num_blocks}"
    )]
    NeverFits {
        /// Blocks the request needs at its longest.
        needed_blocks: usize,
        /// Tokens whose KV the request keeps at its longest.
        num_tokens: usize,
        /// Tokens per block.
        block_size: usize,
        /// Blocks in the pool.
        num_blocks: usize,
    },
    /// Under context parallelism: one CP rank would need more of a request's KV blocks than it
    /// holds.
    #[error(
        "request needs up to {needed_blocks} KV blocks on one of {cp_size} context-parallel ranks \
         ({num_tokens} tokens at block_size {block_size}) but each rank holds {blocks_per_rank}"
    )]
    NeverFitsOnRank {
        /// Blocks the busiest rank needs for the request at its longest.
        needed_blocks: usize,
        /// Tokens whose KV the request keeps at its longest.
        num_tokens: usize,
        /// Tokens per block.
        block_size: usize,
        /// CP ranks the pool is split over.
        cp_size: usize,
        /// Blocks each rank holds.
        blocks_per_rank: usize,
    },
    /// `update()` received a different number of tokens than the last step sampled.
    #[error("sampled_token_ids must have one entry per sample_request_id ({expected}), got {got}")]
    SampleCountMismatch {
        /// `len(sample_request_ids)` of the last `SchedulerOutput`.
        expected: usize,
        /// Entries received.
        got: usize,
    },
    /// `schedule()` was called again before `update()` consumed the previous step.
    #[error(
        "update() must follow each non-empty schedule(): {pending} request(s) of the previous \
         step are still waiting for update() (or finish_request())"
    )]
    UpdatePending {
        /// Live requests of the previous step.
        pending: usize,
    },
    /// `finish_request` got a reason it does not accept.
    #[error("reason must be one of \"stop\", \"abort\", \"error\", got {reason:?}")]
    InvalidFinishReason {
        /// The reason received.
        reason: String,
    },
    /// `route()` got an expert id outside `[0, num_experts)`.
    #[error("topk_ids[{token}, {slot}] must be in [0, num_experts={num_experts}), got {expert}")]
    ExpertOutOfRange {
        /// Token (row) of the bad entry.
        token: usize,
        /// Top-k slot (column) of the bad entry.
        slot: usize,
        /// The expert id received.
        expert: i64,
        /// The configured number of experts.
        num_experts: usize,
    },
    /// `route()` got experts that do not split evenly over ranks.
    #[error("num_experts must be a multiple of num_ranks ({num_ranks}), got {num_experts}")]
    UnevenExperts {
        /// Experts received.
        num_experts: usize,
        /// Ranks received.
        num_ranks: usize,
    },
    /// A flat buffer does not have the length its shape promises.
    #[error("{field} must have {expected} elements, got {got}")]
    LengthMismatch {
        /// Name of the buffer.
        field: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements received.
        got: usize,
    },
    /// `PhaseRing::acquire` found the next call's buffer phase still held by an earlier call.
    #[error(
        "buffer phase {phase} is still in flight (call {held_by}) and cannot be reused by call \
         {wanted_by}; release its handle first"
    )]
    PhaseInFlight {
        /// The phase asked for.
        phase: usize,
        /// Sequence number of the call holding it.
        held_by: u64,
        /// Sequence number of the call that wanted it.
        wanted_by: u64,
    },
    /// `PhaseRing::release` got a handle this ring did not issue (or one already released).
    #[error("phase handle (phase {phase}, call {seq}) was not issued by this ring or was already released")]
    ForeignPhaseHandle {
        /// Phase of the handle.
        phase: usize,
        /// Sequence number of the handle.
        seq: u64,
    },
    /// A peer rank's process ended while this rank waited for its rows (shm_rows.rs).
    #[error("rank {rank}: rank(s) {peers:?} died during shared-memory all-to-all call {seq}")]
    PeerDied {
        /// The waiting rank.
        rank: usize,
        /// The ranks whose processes are gone.
        peers: Vec<usize>,
        /// The call's sequence number.
        seq: u64,
    },
    /// Peer ranks sent nothing for longer than the timeout (shm_rows.rs).
    #[error(
        "rank {rank}: no data from rank(s) {peers:?} for {seconds} s in shared-memory all-to-all \
         call {seq}; ranks are out of lockstep or a peer hangs"
    )]
    PeerTimeout {
        /// The waiting rank.
        rank: usize,
        /// The ranks not heard from.
        peers: Vec<usize>,
        /// The timeout.
        seconds: u64,
        /// The call's sequence number.
        seq: u64,
    },
    /// A previous call panicked half-way, so the object's state can no longer be trusted.
    #[error(
        "the scheduler is unusable: an earlier call panicked (internal bug); create a new one"
    )]
    Poisoned,
    /// A KV transfer id that already holds pinned blocks.
    #[error("transfer_id {transfer_id} already holds pinned blocks (unpin it first)")]
    DuplicateTransfer {
        /// The id received.
        transfer_id: u64,
    },
}

/// Result alias used across the crate.
pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    /// Shorthand for [`CoreError::OutOfRange`].
    pub fn out_of_range(
        field: impl Into<String>,
        limit: impl Into<String>,
        value: impl Into<i128>,
    ) -> Self {
        CoreError::OutOfRange {
            field: field.into(),
            limit: limit.into(),
            value: value.into(),
        }
    }
}

/// Returns `Err(OutOfRange)` unless `min <= value <= max`; `field` is built only on error.
pub fn check_in_range(
    field: impl FnOnce() -> String,
    value: i128,
    min: i128,
    max: i128,
) -> CoreResult<()> {
    if value < min || value > max {
        return Err(CoreError::out_of_range(
            field(),
            format!("in [{min}, {max}]"),
            value,
        ));
    }
    Ok(())
}

/// Returns `Err(OutOfRange)` unless `value >= min`.
pub fn check_at_least(field: &str, value: i128, min: i128) -> CoreResult<()> {
    if value < min {
        return Err(CoreError::out_of_range(field, format!(">= {min}"), value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_limit_and_value() {
        let e = CoreError::out_of_range("max_tokens", ">= 1", 0);
        assert_eq!(e.to_string(), "max_tokens must be >= 1, got 0");
        let e = CoreError::ExceedsModelLen {
            prompt_len: 10,
            max_tokens: 7,
            max_model_len: 16,
        };
        assert!(e.to_string().contains("max_model_len (16)"));
        assert!(e.to_string().contains("10 + 7 = 17"));
        let e = CoreError::ExpertOutOfRange {
            token: 3,
            slot: 1,
            expert: 9,
            num_experts: 8,
        };
        assert_eq!(
            e.to_string(),
            "topk_ids[3, 1] must be in [0, num_experts=8), got 9"
        );
    }

    #[test]
    fn check_at_least_boundaries() {
        assert!(check_at_least("block_size", 1, 1).is_ok());
        let e = check_at_least("block_size", 0, 1).unwrap_err();
        assert_eq!(e.to_string(), "block_size must be >= 1, got 0");
    }
}
