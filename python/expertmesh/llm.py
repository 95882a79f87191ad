"""`LLM`: the offline API. Runs the engine in this process, like vllm.LLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from expertmesh.config import EngineConfig
from expertmesh.engine.factory import Engine, make_engine
from expertmesh.errors import InvalidRequestError
from expertmesh.outputs import RequestOutput, RequestOutputKind
from expertmesh.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate completions for a batch of prompts with continuous batching.

    >>> llm = LLM()                      # the built-in tiny MoE
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text

    Keyword arguments are EngineConfig fields (dtype, max_model_len, block_size,
    kv_cache_blocks, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, seed, ...).

    tensor_parallel_size=N splits every layer over N rank processes; context_parallel_size=C
    splits sequences longer than cp_min_tokens over C ranks (ring attention); data_parallel_size=D with
    enable_expert_parallel=True runs D replicas with the experts split over all N x D ranks
    (expert_parallel_size=R is short for D=R with expert parallelism). This process is rank 0
    and starts the others; under torchrun every process is a rank, and on ranks > 0 the
    constructor serves rank 0 until it closes, then exits the process. Call close() (or use
    `with LLM(...) as llm:`) to stop them.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine: Engine = make_engine(EngineConfig(model=model, **engine_args))

    def close(self) -> None:
        """Stop the other rank processes (nothing to do with one rank)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.

        A prompt is text or a list of token ids. If any prompt is invalid, nothing is queued
        and InvalidRequestError names the prompt's index and what is wrong.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise InvalidRequestError(
                f"got {len(params)} sampling params for {len(prompts)} prompts; pass one, or one per prompt",
                param="sampling_params",
                value=len(params),
            )
        priorities = [0] * len(prompts) if priority is None else list(priority)
        ids = []
        try:
            for i, (prompt, p, prio) in enumerate(zip(prompts, params, priorities)):
                try:
                    # Only finished outputs are wanted: no per-step copies of growing sequences.
                    ids.append(self.engine.add_request(prompt, p, priority=prio,
                                                       output_kind=RequestOutputKind.FINAL_ONLY))
                except InvalidRequestError as exc:
                    raise InvalidRequestError(f"prompt {i}: {exc}", param=exc.param, value=exc.value) from exc
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        try:
            done = self.engine.run_to_completion(ids, on_finish=lambda _: bar.update(1))
        finally:
            bar.close()
        return [done[i] for i in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stats(self) -> dict[str, object]:
        """Scheduler and KV-cache counters (prefix-cache queries and hits, preemptions, free
        blocks, num_blocks) of rank 0's engine, its "weight_bytes" (quantized values and scales
        included) and "quantization" (None, "int8" or "fp8"); on a parallel layout also "layout"
        (TP, CP, DP and EP sizes), "allreduce" (rank 0's calls and bytes per algorithm) and
        "context_parallel" (requests and request-steps by variant, CP rank 0's ring bytes;
        summed over data-parallel replicas)."""
        keep = ("layout", "allreduce", "context_parallel", "quantization")
        return {k: v for k, v in self.engine.stats().items() if isinstance(v, int) or k in keep}

    def expert_load(self) -> dict[str, list]:
        """Routed tokens since load: per expert ([layers][E], all ranks' requests summed) and per
        rank owning those experts ([layers][R]; one column without expert parallelism)."""
        snapshot = self.engine.stats()
        experts = snapshot["expert_tokens"]
        ranks = snapshot.get("rank_tokens") or [[sum(layer)] for layer in experts]  # type: ignore[union-attr]
        return {"expert_tokens": experts, "rank_tokens": ranks}  # type: ignore[dict-item]
