"""Greedy generation through the whole engine equals transformers' generate across model
shapes (GQA ratios, head sizes, expert counts, top-k) and every supported architecture."""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM, SamplingParams
from model_factory import add_default_tokenizer, load_hf_model, make_checkpoint

SHAPES = {
    "mixtral-mha-top1": ("mixtral", dict(num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=1)),
    "mixtral-gqa4-d32-top4": (
        "mixtral",
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=16, num_experts_per_tok=4),
    ),
    "mixtral-mqa-d8": ("mixtral", dict(num_attention_heads=8, num_key_value_heads=1, num_local_experts=2)),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {}),
}
MAX_NEW = 8


@pytest.mark.parametrize("case", list(SHAPES))
def test_greedy_generate_matches_transformers(tmp_path, case):
    arch, overrides = SHAPES[case]
    path = add_default_tokenizer(make_checkpoint(tmp_path, arch, vocab_size=652, **overrides))
    gen = torch.Generator().manual_seed(1)
    batch = [torch.randint(1, 652, (n,), generator=gen).tolist() for n in (3, 17, 9, 33)]
    # A small block size and token budget make the batch cross blocks and chunk its prefills.
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=24, kv_cache_blocks=64, max_model_len=128, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]

    hf = load_hf_model(path)
    theirs = []
    for prompt in batch:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                              min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
        theirs.append(out[0, len(prompt):].tolist())
    assert ours == theirs
    assert llm.engine.scheduler.num_free_blocks == llm.engine.scheduler.num_blocks
