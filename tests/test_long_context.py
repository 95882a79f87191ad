"""Contexts of several thousand tokens, end to end on the CPU: greedy tokens and their logprobs
equal transformers' (eager attention, fp32) after a chunked 3,000-token prefill over ~190 KV
blocks, with a prefix-cache hit of 2,500 tokens, and with a sliding window shorter than the
context. The attention here is the Rust core's, reading the paged cache in place."""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM, SamplingParams
from model_factory import add_default_tokenizer, load_hf_model, make_checkpoint

NEW_TOKENS = 4


@pytest.fixture(scope="module", params=[None, 1000], ids=["full", "window-1000"])
def long_model(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("long"), "mixtral", max_position_embeddings=4096,
                           sliding_window=request.param, vocab_size=652, seed=5)
    return add_default_tokenizer(path), load_hf_model(path)


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, 652, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation and the log-softmax of each step's logits."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(step[0].double(), -1) for step in out.logits]


def _check(out, prompt, model) -> None:
    tokens, logprobs = _hf_greedy(model, prompt)
    seq = out.outputs[0]
    assert seq.token_ids == tokens
    for step, (entry, want) in enumerate(zip(seq.logprobs, logprobs)):
        for token, lp in entry.items():
            # fp32 through 2 layers over 3,000 keys: summation order differs, values do not.
            assert lp.logprob == pytest.approx(float(want[token]), abs=2e-4), (step, token)


def test_long_prompts_with_chunked_prefill_and_a_prefix_hit_equal_transformers(long_model):
    path, model = long_model
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    first = _prompt(3000, seed=1)
    shared = first[:2500] + _prompt(600, seed=2)  # 2,500 tokens of the first prompt, then its own
    with LLM(str(path), max_model_len=4096, max_num_batched_tokens=1024, kv_cache_blocks=600,
             show_progress=False) as llm:
        (out,) = llm.generate([first], params, use_tqdm=False)
        _check(out, first, model)
        hits_before = llm.stats()["prefix_cache_hits"]
        (out,) = llm.generate([shared], params, use_tqdm=False)
        assert llm.stats()["prefix_cache_hits"] - hits_before >= 2496  # 156 full blocks
        _check(out, shared, model)
