//! One step's batch, as flat arrays the model runner turns into tensors without copying.
//!
//! Legend: N scheduled requests, T tokens to compute, S requests that sample, MB block-table
//! columns (the most blocks any scheduled request holds).

/// What the model computes in one step. Built fresh every step (its vectors are handed to numpy
/// without copying, so they cannot be reused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// `[N]` scheduled requests in batch order: decodes, then running prefills, then new ones.
    pub request_ids: Vec<u64>,
    /// `[T]` token ids to compute.
    pub input_ids: Vec<i32>,
    /// `[T]` position of each token in its sequence.
    pub positions: Vec<i32>,
    /// `[T]` KV slot of each token: `block_id * block_size + position % block_size`.
    pub slot_mapping: Vec<i64>,
    /// `[N + 1]` prefix sums of tokens per request; request n owns `[qsl[n], qsl[n+1])`.
    pub query_start_loc: Vec<i32>,
    /// `[N]` tokens in each request's KV after this step (context + new).
    pub seq_lens: Vec<i32>,
    /// `[N * MB]` row-major block tables, each row padded with 0.
    pub block_tables: Vec<i32>,
    /// MB: columns of `block_tables`.
    pub max_blocks_per_request: usize,
    /// `[S]` requests that sample a token this step, in batch order.
    pub sample_request_ids: Vec<u64>,
    /// `[S]` index into T of each sampling request's last token.
    pub logits_indices: Vec<i32>,
    /// Tokens of requests still computing prompt (or recomputing after preemption).
    pub num_prefill_tokens: usize,
    /// Tokens of plain decodes (one token each).
    pub num_decode_tokens: usize,
}

impl SchedulerOutput {
    /// An output with room for `num_requests` requests and `num_tokens` tokens.
    pub fn with_capacity(num_requests: usize, num_tokens: usize) -> Self {
        let mut out = SchedulerOutput {
            request_ids: Vec::with_capacity(num_requests),
            input_ids: Vec::with_capacity(num_tokens),
            positions: Vec::with_capacity(num_tokens),
            slot_mapping: Vec::with_capacity(num_tokens),
            query_start_loc: Vec::with_capacity(num_requests + 1),
            seq_lens: Vec::with_capacity(num_requests),
            sample_request_ids: Vec::with_capacity(num_requests),
            logits_indices: Vec::with_capacity(num_requests),
            ..Default::default()
        };
        out.query_start_loc.push(0);
        out
    }

    /// N: scheduled requests.
    pub fn num_requests(&self) -> usize {
        self.request_ids.len()
    }

    /// T: tokens to compute.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// True when nothing is computed this step (T == 0).
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Block table row of request `n` (padding included).
    pub fn block_table_row(&self, n: usize) -> &[i32] {
        let mb = self.max_blocks_per_request;
        &self.block_tables[n * mb..(n + 1) * mb]
    }

    /// Appends one request's tokens. `tokens[start..start+n]` are computed, at KV slots given by
    /// `blocks`; `samples` marks the chunk that reaches the last known token.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push_request(
        &mut self,
        request_id: u64,
        tokens: &[u32],
        blocks: &[u32],
        block_size: usize,
        start: usize,
        n: usize,
        is_decode: bool,
        samples: bool,
    ) {
        self.request_ids.push(request_id);
        for pos in start..start + n {
            self.input_ids.push(tokens[pos] as i32);
            self.positions.push(pos as i32);
            let block = blocks[pos / block_size] as i64;
            self.slot_mapping
                .push(block * block_size as i64 + (pos % block_size) as i64);
        }
        let end = self.input_ids.len() as i32;
        self.query_start_loc.push(end);
        self.seq_lens.push((start + n) as i32);
        if is_decode {
            self.num_decode_tokens += n;
        } else {
            self.num_prefill_tokens += n;
        }
        if samples {
            self.sample_request_ids.push(request_id);
            self.logits_indices.push(end - 1);
        }
        self.max_blocks_per_request = self.max_blocks_per_request.max(blocks.len());
    }

    /// Allocates the zero-padded block table; fill rows with [`SchedulerOutput::set_block_row`].
    pub(crate) fn alloc_block_tables(&mut self) {
        self.block_tables = vec![0; self.num_requests() * self.max_blocks_per_request];
    }

    /// Writes request `n`'s blocks into its row.
    pub(crate) fn set_block_row(&mut self, n: usize, blocks: &[u32]) {
        let start = n * self.max_blocks_per_request;
        for (dst, &b) in self.block_tables[start..start + blocks.len()]
            .iter_mut()
            .zip(blocks)
        {
            *dst = b as i32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_two_requests() {
        let mut out = SchedulerOutput::with_capacity(2, 4);
        // Decode of token at position 5 in blocks [3, 1] with block size 4 -> slot 1*4+1.
        out.push_request(10, &[0, 0, 0, 0, 0, 42], &[3, 1], 4, 5, 1, true, true);
        // Prefill chunk of 3 tokens, not reaching the end: no sampling.
        out.push_request(11, &[7, 8, 9, 10], &[2], 4, 0, 3, false, false);
        out.alloc_block_tables();
        out.set_block_row(0, &[3, 1]);
        out.set_block_row(1, &[2]);
        assert_eq!(out.input_ids, vec![42, 7, 8, 9]);
        assert_eq!(out.positions, vec![5, 0, 1, 2]);
        assert_eq!(out.slot_mapping, vec![5, 8, 9, 10]);
        assert_eq!(out.query_start_loc, vec![0, 1, 4]);
        assert_eq!(out.seq_lens, vec![6, 3]);
        assert_eq!(out.block_tables, vec![3, 1, 2, 0]);
        assert_eq!(out.block_table_row(1), &[2, 0]);
        assert_eq!(out.sample_request_ids, vec![10]);
        assert_eq!(out.logits_indices, vec![0]);
        assert_eq!((out.num_decode_tokens, out.num_prefill_tokens), (1, 3));
        assert!(!out.is_empty());
    }
}
