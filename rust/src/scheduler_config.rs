//! What a scheduler is configured with, what a caller hands in per request, and the counters
//! it reports; plus the validation that turns a `NewRequest` into a `Request`.

use crate::error::{check_at_least, check_in_range, CoreError, CoreResult};
use crate::kv_placement::KvPlacement;
use crate::request::{check_token_ids, Request, StopConditions, TokenId, MAX_TOKEN_ID};

/// Sizes and limits of a scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// KV blocks in the pool, over all CP ranks (a multiple of `placement.cp_size`).
    pub num_blocks: usize,
    /// Which CP rank holds each block index of a sequence.
    pub placement: KvPlacement,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most requests running at once.
    pub max_num_seqs: usize,
    /// Token budget of one step.
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + generated) the model accepts.
    pub max_model_len: usize,
    /// Reuse KV of equal prompt prefixes.
    pub enable_prefix_caching: bool,
}

/// A request as the caller hands it in; validated by [`crate::Scheduler::add_request`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRequest {
    /// Caller-chosen id, unique among unfinished requests.
    pub request_id: u64,
    /// Prompt token ids, each in [0, 2^31 - 1].
    pub prompt_token_ids: Vec<i64>,
    /// Most tokens to generate.
    pub max_tokens: i64,
    /// Token ids that end generation.
    pub stop_token_ids: Vec<i64>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<i64>,
    /// Do not stop at eos.
    pub ignore_eos: bool,
    /// Lower = more urgent.
    pub priority: i64,
}

/// Counters reported by `stats()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Prompt tokens looked up in the prefix cache (one lookup per admission).
    pub prefix_cache_queries: u64,
    /// Of those, tokens whose KV came from the cache.
    pub prefix_cache_hits: u64,
    /// Requests preempted (each time counts).
    pub num_preemptions: u64,
    /// Blocks with no owner (cached or not).
    pub num_free_blocks: u64,
    /// Blocks findable by prefix hash.
    pub num_cached_blocks: u64,
}

impl NewRequest {
    /// Validates against `config` and builds the waiting request (duplicate ids are the
    /// scheduler's to check).
    pub fn into_request(self, c: &SchedulerConfig, arrival: u64) -> CoreResult<Request> {
        check_at_least(
            "len(prompt_token_ids)",
            self.prompt_token_ids.len() as i128,
            1,
        )?;
        check_at_least("max_tokens", self.max_tokens.into(), 1)?;
        check_token_ids("prompt_token_ids", &self.prompt_token_ids)?;
        check_token_ids("stop_token_ids", &self.stop_token_ids)?;
        if let Some(t) = self.eos_token_id {
            check_in_range(|| "eos_token_id".into(), t.into(), 0, MAX_TOKEN_ID.into())?;
        }
        let (prompt_len, max_tokens) = (self.prompt_token_ids.len(), self.max_tokens as usize);
        if prompt_len as u128 + max_tokens as u128 > c.max_model_len as u128 {
            return Err(CoreError::ExceedsModelLen {
                prompt_len,
                max_tokens,
                max_model_len: c.max_model_len,
            });
        }
        // The last sampled token is never computed, so KV holds at most prompt + max_tokens - 1.
        let num_tokens = prompt_len + max_tokens - 1;
        let needed_blocks = num_tokens.div_ceil(c.block_size);
        if needed_blocks > c.num_blocks {
            return Err(CoreError::NeverFits {
                needed_blocks,
                num_tokens,
                block_size: c.block_size,
                num_blocks: c.num_blocks,
            });
        }
        let (cp_size, per_rank) = (c.placement.cp_size, c.num_blocks / c.placement.cp_size);
        let busiest = c.placement.max_per_rank(needed_blocks);
        if busiest > per_rank {
            return Err(CoreError::NeverFitsOnRank {
                needed_blocks: busiest,
                num_tokens,
                block_size: c.block_size,
                cp_size,
                blocks_per_rank: per_rank,
            });
        }
        let stop = StopConditions {
            max_tokens,
            stop_token_ids: self.stop_token_ids.iter().map(|&t| t as TokenId).collect(),
            eos_token_id: self.eos_token_id.map(|t| t as TokenId),
            ignore_eos: self.ignore_eos,
        };
        // Room for every token it may generate, so update() never reallocates.
        let mut prompt = Vec::with_capacity(prompt_len + max_tokens);
        prompt.extend(self.prompt_token_ids.iter().map(|&t| t as TokenId));
        Ok(Request::new(
            self.request_id,
            prompt,
            stop,
            self.priority,
            arrival,
        ))
    }
}

/// Small configs and requests shared by the scheduler's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A scheduler config with room for 8 sequences of up to 256 tokens.
    pub(crate) fn config(num_blocks: usize, block_size: usize) -> SchedulerConfig {
        SchedulerConfig {
            num_blocks,
            placement: KvPlacement::default(),
            block_size,
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            max_model_len: 256,
            enable_prefix_caching: true,
        }
    }

    /// A request whose prompt is the tokens 0..prompt_len.
    pub(crate) fn new_request(id: u64, prompt_len: usize, max_tokens: i64) -> NewRequest {
        NewRequest {
            request_id: id,
            prompt_token_ids: (0..prompt_len as i64).collect(),
            max_tokens,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{config, new_request};
    use super::*;
    use crate::scheduler::Scheduler;

    #[test]
    fn add_request_validation() {
        let mut s = Scheduler::new(config(4, 4)).unwrap();
        s.add_request(new_request(1, 3, 2)).unwrap();
        let err = |r: NewRequest, s: &mut Scheduler| s.add_request(r).unwrap_err().to_string();
        assert!(err(new_request(1, 3, 2), &mut s).contains("request_id 1 is already in use"));
        assert_eq!(
            err(new_request(2, 0, 2), &mut s),
            "len(prompt_token_ids) must be >= 1, got 0"
        );
        assert_eq!(
            err(new_request(2, 3, 0), &mut s),
            "max_tokens must be >= 1, got 0"
        );
        assert!(err(new_request(2, 250, 10), &mut s)
            .contains("max_model_len (256), got 250 + 10 = 260"));
        // 4 blocks of 4 hold 16 tokens; 10 + 8 - 1 = 17 tokens need 5 blocks.
        assert!(err(new_request(2, 10, 8), &mut s).contains("needs up to 5 KV blocks"));
        let mut bad = new_request(2, 3, 1);
        bad.prompt_token_ids[1] = -5;
        assert_eq!(
            err(bad, &mut s),
            "prompt_token_ids[1] must be in [0, 2147483647], got -5"
        );
        let mut bad = new_request(2, 3, 1);
        bad.eos_token_id = Some(1 << 40);
        assert!(err(bad, &mut s).starts_with("eos_token_id must be in"));
        // 10 + 7 - 1 = 16 tokens fit exactly.
        s.add_request(new_request(3, 10, 7)).unwrap();
        assert_eq!(s.num_waiting(), 2);
    }

    #[test]
    fn a_cp_split_pool_holds_a_sequence_no_one_rank_could() {
        // 2 ranks x 4 blocks of 4 tokens; rank 0 holds blocks 0, 1 (first_blocks), 2 and 5.
        let mut c = config(8, 4);
        c.placement = KvPlacement {
            cp_size: 2,
            first_blocks: 2,
        };
        let mut s = Scheduler::new(c).unwrap();
        // 24 + 1 - 1 = 24 tokens: 6 blocks, 4 on rank 0 and 2 on rank 1.
        s.add_request(new_request(1, 24, 1)).unwrap();
        let out = s.schedule().unwrap();
        let owners: Vec<usize> = out.block_tables[..6]
            .iter()
            .map(|&b| b as usize / 4)
            .collect();
        assert_eq!(owners, [0, 0, 0, 1, 1, 0]);
        s.check_invariants().unwrap();
        // 7 blocks would put 5 on rank 0.
        let err = s
            .add_request(new_request(2, 28, 1))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "request needs up to 5 KV blocks on one of 2 context-parallel ranks (28 tokens at \
             block_size 4) but each rank holds 4"
        );
        let mut odd = config(7, 4);
        odd.placement.cp_size = 2;
        assert!(Scheduler::new(odd)
            .unwrap_err()
            .to_string()
            .contains("num_blocks must be a multiple of context_parallel_size 2"));
    }
}
