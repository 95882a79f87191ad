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
from expertmesh.engine.request_state import EngineRequest, RequestState, SequenceState
from expertmesh.engine.sampler import Sampler
from expertmesh.errors import InvalidRequestError
from expertmesh.fields import TokenIdsField
from expertmesh.layers.moe import FusedMoE
from expertmesh.outputs import Logprob, RequestOutput, RequestOutputKind
from expertmesh.parallel.layout import CP_VARIANTS
from expertmesh.limits import RequestLimits, check_priority
from expertmesh.sampling_params import FIELDS as SAMPLING_FIELDS
from expertmesh.sampling_params import SamplingParams
from expertmesh.tokenizer import CheckpointTokenizer

logger = logging.getLogger(__name__)
PROMPT_IDS = TokenIdsField("prompt", "prompt token ids", min_items=1)
STOP_TOKEN_IDS = SAMPLING_FIELDS["stop_token_ids"]


class LLMEngine:
    """Owns the scheduler, the model runner, the sampler and the per-request state."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.config = config
        self.runner = runner if runner is not None else ModelRunner(config)
        self.tokenizer = CheckpointTokenizer.from_dir(config.model_path)
        self.max_model_len = self.runner.max_model_len
        self.limits = RequestLimits(self.runner.vocab_size, self.max_model_len)
        cp_size = config.context_parallel_size
        self.scheduler = Scheduler(
            num_blocks=self.runner.num_kv_blocks * cp_size,  # each CP rank's cache holds its own run of ids
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            context_parallel_size=cp_size,
            cp_first_blocks=config.cp_first_blocks,
        )
        self.sampler = Sampler()
        self._expert_parallel = self.runner.expert_parallel  # every step joins the MoE all-to-alls
        self._collective = self.runner.parallel  # peers wait on every step: a failed one is fatal
        self._requests: dict[str, RequestState] = {}
        self._seqs: dict[int, tuple[RequestState, SequenceState]] = {}
        self._core_ids = itertools.count()
        self._request_counter = itertools.count()
        self._cp_requests = dict.fromkeys(CP_VARIANTS[1:], 0)  # requests served context-parallel, by variant

    # ---- requests in -------------------------------------------------------------------

    def check_request(self, prompt: str | list[int], params: SamplingParams, priority: int = 0) -> EngineRequest:
        """The validated request; InvalidRequestError naming the field otherwise. The checks
        are the core's and the model's limits (limits.py), so the core never refuses it."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt", value=prompt)
            ids = self.tokenizer.encode(prompt)
        else:
            ids = prompt
        prompt_ids = PROMPT_IDS.check(ids, self.limits)  # text too: a tokenizer may know more ids than the model
        max_tokens = self.limits.check_context(len(prompt_ids), params.max_tokens)
        STOP_TOKEN_IDS.check(params.stop_token_ids, self.limits)
        return EngineRequest(prompt if isinstance(prompt, str) else None, prompt_ids, params, max_tokens,
                             check_priority(priority))

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError for anything invalid.
        A lower priority value is served first (then arrival order), as in vLLM. output_kind:
        what step() hands back for it (outputs.RequestOutputKind)."""
        return self.add(self.check_request(prompt, params, priority), request_id, output_kind)

    def add(self, req: EngineRequest, request_id: str | None = None,
            output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> str:
        """Queue a validated request as its n sequences, all or none."""
        if request_id is None:
            request_id = str(next(self._request_counter))
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id", value=request_id)
        params = req.params
        eos, *more_eos = self.tokenizer.eos_token_ids or [None]
        stop_ids = list(params.stop_token_ids or []) + ([] if params.ignore_eos else more_eos)
        state = RequestState(request_id, req.prompt, req.prompt_ids, [], RequestOutputKind(output_kind))
        try:
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
                    detokenizer=IncrementalDetokenizer(self.tokenizer.tokenizer, req.prompt_ids, params),
                    generator=generator,
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                )
                self.scheduler.add_request(core_id, req.prompt_ids, max_tokens=req.max_tokens,
                                           stop_token_ids=stop_ids, eos_token_id=eos, ignore_eos=params.ignore_eos,
                                           priority=req.priority)
                state.seqs.append(seq)
                self._seqs[core_id] = (state, seq)
        except BaseException:
            for seq in state.seqs:  # no half-added request: its first sequences leave too
                self.scheduler.abort(seq.core_id)
                self._seqs.pop(seq.core_id, None)
            raise
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

    def close(self) -> None:
        """Stop the ranks this engine's model runs on (nothing to do with one rank)."""
        self.runner.close()

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """A snapshot for metrics: scheduler and KV-cache counters (cumulative ones included),
        tokens routed to each expert of each MoE layer ([layers][E], cumulative) and, on a
        parallel layout, its sizes, this rank's allreduce calls and bytes per algorithm and its
        context-parallel requests and ring bytes."""
        sched = self.scheduler
        snapshot: dict[str, object] = dict(sched.stats())
        snapshot.update(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_blocks=sched.num_blocks,
            num_free_blocks=sched.num_free_blocks,
            weight_bytes=self.runner.weight_bytes,  # this rank's
            quantization=self.runner.model.quant_config.method if self.runner.model.quant_config else None,
        )
        moe_layers = [m for m in self.runner.model.modules() if isinstance(m, FusedMoE)]
        snapshot["expert_tokens"] = [m.tokens_routed.tolist() for m in moe_layers]
        if self.runner.profile.enabled:
            snapshot["step_breakdown"] = self.runner.profile.snapshot()
        rank = self.runner.rank
        if rank is not None:
            layout = rank.layout.config
            snapshot["layout"] = {"tensor_parallel": layout.tensor_parallel_size,
                                  "context_parallel": layout.context_parallel_size,
                                  "data_parallel": layout.data_parallel_size,
                                  "expert_parallel": layout.expert_parallel_size}
            if rank.cp is not None:  # CP requests and request-steps by variant, this rank's ring bytes
                snapshot["context_parallel"] = {**rank.cp.stats(), "requests": dict(self._cp_requests)}
            if rank.binding is not None:
                snapshot["cpu_cores"] = rank.binding.cores
            if rank.tp is not None:  # this rank's allreduce calls and bytes, per algorithm
                stats = rank.tp.allreduce.stats
                snapshot["allreduce"] = {"transport": rank.tp.allreduce.name, "calls": dict(stats.calls),
                                         "bytes": dict(stats.bytes)}
        return snapshot

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that advanced.

        Failures stay with the requests they belong to: a failed forward pass ends the step's
        requests with reason "error" (their blocks are freed), a failed draw or detokenization
        ends only its own request, and the engine goes on serving the others."""
        with self.runner.profile.step():
            return self._step()

    def _step(self) -> list[RequestOutput]:
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
            if self.runner.rank is not None:
                self.runner.rank.check_procs()  # a dead rank fails the step at once, not at a timeout
            logits = self.runner.execute(batch)  # [S, V]
            self._count_cp_requests(batch)
        except Exception:
            if self._collective:
                raise  # peers are mid-collective with this rank: the group cannot go on
            logger.exception("step failed; finishing its %d requests with an error", len(batch.request_ids))
            return self._fail({self._seqs[i][0].request_id: self._seqs[i][0] for i in batch.request_ids.tolist()})
        rows = self._sample(logits, seqs)
        failed: dict[str, RequestState] = {}
        for core_id, row in zip(core_ids, rows):
            if row is None:
                state = self._seqs[core_id][0]
                failed[state.request_id] = state
        outputs = self._fail(failed)  # before update(), which then skips their rows
        token_ids = [0 if row is None else row[0] for row in rows]
        finished = dict(self.scheduler.update(np.asarray(token_ids, dtype=np.int64)))

        touched: dict[str, RequestState] = {}
        for core_id, seq, row in zip(core_ids, seqs, rows):
            if row is None or core_id not in self._seqs:  # failed above, or with its request below
                continue
            state = self._seqs[core_id][0]
            try:
                self._advance(core_id, seq, row, finished)
            except Exception:
                logger.exception("request %s failed after its draw; finishing it with an error", state.request_id)
                outputs += self._fail({state.request_id: state})
                touched.pop(state.request_id, None)
                continue
            touched[state.request_id] = state
        for state in touched.values():
            out = state.to_output()
            if out is not None:
                outputs.append(out)
            if state.finished:
                del self._requests[state.request_id]
        return outputs

    def _count_cp_requests(self, batch) -> None:
        """Requests served context-parallel, by variant: a sequence counts once per variant its
        steps used (a long prefill passes KV, its decodes pass queries)."""
        cp = self.runner.rank.cp if self.runner.rank is not None else None
        if cp is None:
            return
        for variant, reqs in cp.step.requests.items():
            for core_id in batch.request_ids[reqs].tolist():
                seq = self._seqs[core_id][1]
                if variant not in seq.cp_variants:
                    seq.cp_variants.add(variant)
                    self._cp_requests[variant] += 1

    def _sample(self, logits, seqs: list[SequenceState]) -> list[tuple[int, tuple | None] | None]:
        """(token, logprobs row or None) per sampling row, None where the draw failed. A batch
        that fails is drawn again row by row, so one request's bad draw fails only itself."""
        params, gens = [s.params for s in seqs], [s.generator for s in seqs]
        try:
            return _rows(self.sampler(logits, params, gens), range(len(seqs)))
        except Exception:
            logger.exception("sampling %d rows failed; drawing them one by one", len(seqs))
        rows: list[tuple[int, tuple | None] | None] = []
        for i in range(len(seqs)):
            try:
                rows += _rows(self.sampler(logits[i: i + 1], params[i: i + 1], gens[i: i + 1]), [0])
            except Exception:
                logger.exception("sampling failed for sequence %d", seqs[i].core_id)
                rows.append(None)
        return rows

    def _advance(self, core_id: int, seq: SequenceState, row: tuple[int, tuple | None],
                 finished: dict[int, str]) -> None:
        """Append one drawn token to a sequence: logprobs, text, stop strings, finish."""
        token, logprobs = row
        seq.token_ids.append(token)
        if seq.logprobs is not None and logprobs is not None:
            self._record_logprobs(seq, token, logprobs)
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

    def _fail(self, states: dict[str, RequestState]) -> list[RequestOutput]:
        """End whole requests with reason "error", freeing every block their sequences hold."""
        for state in states.values():
            for seq in state.seqs:
                if self._seqs.pop(seq.core_id, None) is not None:
                    self.scheduler.finish_request(seq.core_id, "error")
                if not seq.finished:
                    seq.finish_reason = "error"
            self._requests.pop(state.request_id, None)
        return [out for state in states.values() if (out := state.to_output()) is not None]

    def _record_logprobs(self, seq: SequenceState, token: int, logprobs: tuple) -> None:
        sampled_lp, top_ids, top_lps, rank = logprobs
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


def _rows(out, rows) -> list[tuple[int, tuple | None]]:
    """(token, logprobs row or None) of the given rows of a SamplerOutput."""
    tokens = out.token_ids.tolist()
    lp = out.logprobs
    return [(tokens[r], lp.row(r) if lp is not None and lp.has_row(r) else None) for r in rows]
