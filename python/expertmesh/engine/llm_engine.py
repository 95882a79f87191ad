"""The offline engine loop: validated requests in, RequestOutputs out, one step at a time.

Each step: the Rust scheduler picks the batch -> the model runner computes logits for the
requests that sample -> the sampler draws tokens -> the scheduler appends them (and finishes
requests on eos, stop ids or length) -> detokenizers find stop strings and finish those.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import torch

from expertmesh._core import Scheduler
from expertmesh.config import EngineConfig
from expertmesh.engine.detokenizer import IncrementalDetokenizer
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.request_state import RequestState, SequenceState
from expertmesh.engine.sampler import Sampler
from expertmesh.errors import InvalidRequestError
from expertmesh.layers.moe import FusedMoE
from expertmesh.outputs import Logprob, RequestOutput
from expertmesh.sampling_params import SamplingParams
from expertmesh.tokenizer import CheckpointTokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Owns the scheduler, the model runner, the sampler and the per-request state."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = CheckpointTokenizer.from_dir(config.model_path)
        self.max_model_len = self.runner.max_model_len
        self.scheduler = Scheduler(
            num_blocks=self.runner.num_kv_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.sampler = Sampler()
        self._expert_parallel = self.runner.expert_parallel
        self._requests: dict[str, RequestState] = {}
        self._seqs: dict[int, tuple[RequestState, SequenceState]] = {}
        self._core_ids = itertools.count()
        self._request_counter = itertools.count()

    # ---- requests in -------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or as ids, checked against vocabulary and context."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt", value=prompt)
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.runner.vocab_size
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {vocab}), got {bad[0]!r}", param="prompt", value=bad[0]
                )
        if not ids:
            raise InvalidRequestError("prompt must contain at least one token", param="prompt", value=prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {len(ids)} tokens, but max_model_len is {self.max_model_len} "
                "(the prompt must leave room for at least one generated token)",
                param="prompt",
                value=len(ids),
            )
        return ids

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids if the request is valid; InvalidRequestError otherwise."""
        prompt_ids = self.tokenize(prompt)
        room = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
                f"max_model_len {self.max_model_len} (at most {room} tokens can be generated)",
                param="max_tokens",
                value=params.max_tokens,
            )
        return prompt_ids

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError for anything invalid.
        A lower priority value is served first (then arrival order), as in vLLM."""
        prompt_ids = self.check_request(prompt, params)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if request_id is None:
            request_id = str(next(self._request_counter))
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id", value=request_id)
        eos, *more_eos = self.tokenizer.eos_token_ids or [None]
        stop_ids = list(params.stop_token_ids or []) + ([] if params.ignore_eos else more_eos)
        state = RequestState(request_id, prompt if isinstance(prompt, str) else None, prompt_ids, [])
        for index in range(params.n):
            core_id = next(self._core_ids)
            generator = None
            if params.seed is not None:
                # Sequence i of a seeded request draws from seed + i, so n > 1 does not repeat itself.
                generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
            seq = SequenceState(
                core_id=core_id,
                index=index,
                params=params,
                detokenizer=IncrementalDetokenizer(self.tokenizer.tokenizer, prompt_ids, params),
                generator=generator,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            self.scheduler.add_request(
                core_id,
                prompt_ids,
                max_tokens=max_tokens,
                stop_token_ids=stop_ids,
                eos_token_id=eos,
                ignore_eos=params.ignore_eos,
                priority=priority,
            )
            state.seqs.append(seq)
            self._seqs[core_id] = (state, seq)
        self._requests[request_id] = state
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Finish a request with reason 'abort' from any state; its KV blocks are freed."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return False
        for seq in state.seqs:
            self.scheduler.abort(seq.core_id)
            self._seqs.pop(seq.core_id, None)
            if not seq.finished:
                seq.finish_reason = "abort"
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """A snapshot for metrics: scheduler and KV-cache counters (cumulative ones included)
        and tokens routed to each expert of each MoE layer ([layers][E], cumulative)."""
        sched = self.scheduler
        snapshot: dict[str, object] = dict(sched.stats())
        snapshot.update(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_blocks=sched.num_blocks,
            num_free_blocks=sched.num_free_blocks,
        )
        moe_layers = [m for m in self.runner.model.modules() if isinstance(m, FusedMoE)]
        snapshot["expert_tokens"] = [m.tokens_routed.tolist() for m in moe_layers]
        return snapshot

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that advanced."""
        batch = self.scheduler.schedule()
        if batch.is_empty and self._expert_parallel:
            self.runner.idle_step()  # lockstep: peers' MoE layers wait for this rank's (empty) share
        if batch.is_empty:
            if self._requests and not self.scheduler.has_unfinished():
                raise RuntimeError("engine holds requests the scheduler no longer knows")  # a bug, never input
            return []
        core_ids = batch.sample_request_ids.tolist()
        seqs = [self._seqs[i][1] for i in core_ids]
        try:
            logits = self.runner.execute(batch)  # [S, V]
            sampled = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])
        except Exception:
            if self._expert_parallel:
                raise  # peers are mid-collective with this rank: the group cannot go on
            # A failed forward pass ends the step's requests with reason "error" (their blocks
            # are freed) instead of leaving them stuck; the engine keeps serving the others.
            logger.exception("step failed; finishing its %d requests with an error", len(batch.request_ids))
            return self._fail_requests(batch.request_ids.tolist())
        token_ids = sampled.token_ids.tolist()
        finished = dict(self.scheduler.update(np.asarray(token_ids, dtype=np.int64)))

        touched: dict[str, RequestState] = {}
        for row, (core_id, seq, token) in enumerate(zip(core_ids, seqs, token_ids)):
            state = self._seqs[core_id][0]
            touched[state.request_id] = state
            seq.token_ids.append(token)
            if seq.logprobs is not None and sampled.logprobs is not None:
                self._record_logprobs(seq, row, token, sampled.logprobs)
            # An eos or stop token ends the text without adding its own (as vLLM does).
            delta, stop_str = seq.detokenizer.add_tokens([token], stop_terminated=finished.get(core_id) == "stop")
            seq.pending_delta += delta
            if stop_str is not None:
                self.scheduler.finish_request(core_id, "stop")
                finished[core_id] = "stop"
                seq.stop_reason = stop_str
            elif finished.get(core_id) == "stop" and token in (seq.params.stop_token_ids or []):
                seq.stop_reason = token
            if core_id in finished:
                seq.finish_reason = finished[core_id]
                seq.pending_delta += seq.detokenizer.flush()
                self._seqs.pop(core_id)

        outputs = []
        for state in touched.values():
            outputs.append(state.to_output())
            if state.finished:
                del self._requests[state.request_id]
        return outputs

    def _fail_requests(self, core_ids: list[int]) -> list[RequestOutput]:
        failed: dict[str, RequestState] = {}
        for core_id in core_ids:
            state, seq = self._seqs.pop(core_id)
            self.scheduler.finish_request(core_id, "error")
            seq.finish_reason = "error"
            failed[state.request_id] = state
        outputs = [state.to_output() for state in failed.values()]
        for state in failed.values():
            if state.finished:
                del self._requests[state.request_id]
        return outputs

    def _record_logprobs(self, seq: SequenceState, row: int, token: int, logprobs: object) -> None:
        sampled_lp, top_ids, top_lps, rank = logprobs.row(row)  # type: ignore[attr-defined]
        entry = {token: Logprob(sampled_lp, rank, self.tokenizer.decode([token], False))}
        for r, (tid, lp) in enumerate(zip(top_ids, top_lps), start=1):
            entry.setdefault(tid, Logprob(lp, r, self.tokenizer.decode([tid], False)))
        assert seq.logprobs is not None and seq.cumulative_logprob is not None
        seq.logprobs.append(entry)
        seq.cumulative_logprob += sampled_lp if math.isfinite(sampled_lp) else 0.0

    def run_to_completion(self, request_ids: list[str], on_finish=None) -> dict[str, RequestOutput]:
        """Step until every named request has finished; returns their final outputs."""
        wanted = set(request_ids)
        done: dict[str, RequestOutput] = {}
        while wanted - done.keys():
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    if on_finish is not None:
                        on_finish(out)
        return done
