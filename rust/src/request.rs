//! Request / sequence state: plain data owned by the scheduler. No scheduling logic lives here,
//! only the per-request bookkeeping and the stop check.

use crate::block_pool::{BlockHash, BlockId, CacheCursor};
use crate::error::{check_in_range, CoreResult};

/// A token id. Kept below `i32::MAX` (checked at the API edge) so it fits the int32 batch arrays.
pub type TokenId = u32;

/// Largest token id accepted (the batch's `input_ids` are int32).
pub const MAX_TOKEN_ID: i64 = i32::MAX as i64;

/// Checks that every entry of `ids` is a token id; errors name the entry as `name[i]`.
pub fn check_token_ids(name: &str, ids: &[i64]) -> CoreResult<()> {
    for (i, &t) in ids.iter().enumerate() {
        check_in_range(|| format!("{name}[{i}]"), t.into(), 0, MAX_TOKEN_ID.into())?;
    }
    Ok(())
}

/// Why a request ended. Every request ends with exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// Hit eos or one of its stop token ids (or finished by the caller with "stop").
    Stop,
    /// Generated `max_tokens` tokens.
    Length,
    /// Aborted by the caller.
    Abort,
    /// Ended by the caller because something failed.
    Error,
}

impl FinishReason {
    /// The name the Python API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    /// Queued; holds no KV blocks.
    Waiting,
    /// Admitted; holds the KV blocks for its computed tokens.
    Running,
}

/// When a request stops generating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopConditions {
    /// Most tokens to generate (>= 1).
    pub max_tokens: usize,
    /// Token ids that end the request (reason "stop").
    pub stop_token_ids: Vec<TokenId>,
    /// End-of-sequence token; ends the request unless `ignore_eos`.
    pub eos_token_id: Option<TokenId>,
    /// Keep generating past eos (benchmarks).
    pub ignore_eos: bool,
}

/// The scheduler's view of one request: its tokens, its KV blocks and how far it has computed.
#[derive(Debug, Clone)]
pub struct Request {
    /// Caller-chosen id, unique among live requests.
    pub id: u64,
    /// Lower value = more urgent (like vLLM).
    pub priority: i64,
    /// Arrival order, unique and increasing; breaks priority ties (older first).
    pub arrival: u64,
    /// Prompt tokens followed by the generated tokens.
    pub token_ids: Vec<TokenId>,
    /// How many of `token_ids` are prompt.
    pub num_prompt_tokens: usize,
    /// Tokens whose KV is in `blocks` (computed, or scheduled in the step in flight).
    pub num_computed_tokens: usize,
    /// KV blocks in order; block i holds positions `[i*B, (i+1)*B)`.
    pub blocks: Vec<BlockId>,
    /// Chained hashes of this request's full token blocks, computed once each and kept across
    /// preemption (they depend only on the tokens).
    pub block_hashes: Vec<BlockHash>,
    /// How many leading blocks were offered to the prefix cache (their KV is known computed).
    pub cache_cursor: CacheCursor,
    /// When to stop.
    pub stop: StopConditions,
    /// Waiting or running.
    pub status: RequestStatus,
    /// Times this request was preempted.
    pub num_preemptions: u32,
}

impl Request {
    /// A new waiting request.
    pub fn new(
        id: u64,
        prompt: Vec<TokenId>,
        stop: StopConditions,
        priority: i64,
        arrival: u64,
    ) -> Self {
        let num_prompt_tokens = prompt.len();
        Request {
            id,
            priority,
            arrival,
            token_ids: prompt,
            num_prompt_tokens,
            num_computed_tokens: 0,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            cache_cursor: CacheCursor::default(),
            stop,
            status: RequestStatus::Waiting,
            num_preemptions: 0,
        }
    }

    /// Prompt plus generated tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Generated tokens so far.
    pub fn output_token_ids(&self) -> &[TokenId] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    /// Tokens still to compute before the request can sample.
    pub fn num_pending_tokens(&self) -> usize {
        self.num_tokens() - self.num_computed_tokens
    }

    /// True when only the last sampled token is missing: a plain decode step.
    pub fn is_decode(&self) -> bool {
        self.num_pending_tokens() == 1 && self.num_tokens() > self.num_prompt_tokens
    }

    /// Ordering key: smaller is more urgent.
    pub fn urgency_key(&self) -> (i64, u64) {
        (self.priority, self.arrival)
    }

    /// Appends a sampled token and says whether the request is now finished.
    /// Stop tokens win over length, like vLLM: an eos that is also the last allowed token is "stop".
    pub fn append_and_check_stop(&mut self, token: TokenId) -> Option<FinishReason> {
        self.token_ids.push(token);
        let stop = &self.stop;
        if (!stop.ignore_eos && stop.eos_token_id == Some(token))
            || stop.stop_token_ids.contains(&token)
        {
            return Some(FinishReason::Stop);
        }
        if self.output_token_ids().len() >= stop.max_tokens {
            return Some(FinishReason::Length);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(max_tokens: usize, eos: Option<u32>, ignore_eos: bool, stops: Vec<u32>) -> Request {
        let stop = StopConditions {
            max_tokens,
            stop_token_ids: stops,
            eos_token_id: eos,
            ignore_eos,
        };
        Request::new(7, vec![1, 2, 3], stop, 0, 0)
    }

    #[test]
    fn length_stop_and_eos() {
        let mut r = req(2, Some(9), false, vec![5]);
        assert_eq!(r.append_and_check_stop(4), None);
        assert_eq!(r.append_and_check_stop(4), Some(FinishReason::Length));
        let mut r = req(5, Some(9), false, vec![5]);
        assert_eq!(r.append_and_check_stop(9), Some(FinishReason::Stop));
        let mut r = req(5, Some(9), false, vec![5]);
        assert_eq!(r.append_and_check_stop(5), Some(FinishReason::Stop));
        let mut r = req(1, Some(9), true, vec![]);
        assert_eq!(r.append_and_check_stop(9), Some(FinishReason::Length));
        assert_eq!(r.output_token_ids(), &[9]);
    }

    #[test]
    fn eos_at_last_token_is_stop() {
        let mut r = req(1, Some(9), false, vec![]);
        assert_eq!(r.append_and_check_stop(9), Some(FinishReason::Stop));
    }

    #[test]
    fn pending_and_decode() {
        let mut r = req(4, None, false, vec![]);
        assert_eq!(r.num_pending_tokens(), 3);
        assert!(!r.is_decode());
        r.num_computed_tokens = 3;
        r.append_and_check_stop(1);
        assert!(r.is_decode());
        assert_eq!(FinishReason::Length.as_str(), "length");
    }
}
