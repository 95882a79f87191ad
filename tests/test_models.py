"""expertmesh models against Hugging Face transformers on the same random checkpoints.

Every case runs prefill of several prompts in one flat batch over a paged KV cache with
shuffled blocks, then decode steps, then a chunked prefill mixed with a decode, and compares
the logits at every computed position with transformers' eager fp32 forward of the full
sequence. The loader's error cases follow.

Legend: T tokens, N requests, V vocab, B block size.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh.layers.attention import AttentionMetadata, allocate_kv_caches
from expertmesh.layers.moe import routing_plan
from expertmesh.models.loader import load_model
from model_factory import load_hf_model, make_checkpoint

BLOCK = 4
ATOL = RTOL = 1e-4

# id -> (arch, make_checkpoint kwargs). Together they cover GQA 1/2/4, head_dim != H/NH,
# sliding window, tied embeddings, sharded checkpoints, dense layers, qkv bias, q/k norms, clip_qkv.
CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-swa-tied-sharded": ("mixtral", dict(sliding_window=5, tie_word_embeddings=True, max_shard_size="40KB")),
    "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", dict(clip_qkv=3.0)),
}


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tmp_path_factory):
    arch, kwargs = CASES[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, **kwargs)
    ours, hf_config = load_model(path, dtype="float32", show_progress=False)
    return ours, load_hf_model(path), path


class PagedRunner:
    """Drives a model step by step like the engine: flat batches over a shuffled paged cache."""

    def __init__(self, model, max_tokens_per_req: int, num_reqs: int, seed: int = 0) -> None:
        self.model = model
        self.blocks_per_req = math.ceil(max_tokens_per_req / BLOCK)
        num_blocks = self.blocks_per_req * num_reqs + 2
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.block_tables = perm[: self.blocks_per_req * num_reqs].view(num_reqs, -1).to(torch.int32)
        self.kv_caches = allocate_kv_caches(
            model.num_layers, num_blocks, BLOCK, model.num_kv_heads, model.head_dim, model.dtype
        )
        self.lens = [0] * num_reqs

    @torch.inference_mode()
    def step(self, work: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run one step; work = [(request, new token ids)]. Returns logits [q_len, V] per entry."""
        ids, positions, slots, q_lens, seq_lens, tables = [], [], [], [], [], []
        for req, tokens in work:
            start = self.lens[req]
            pos = list(range(start, start + len(tokens)))
            ids += tokens
            positions += pos
            slots += [int(self.block_tables[req, p // BLOCK]) * BLOCK + p % BLOCK for p in pos]
            q_lens.append(len(tokens))
            self.lens[req] += len(tokens)
            seq_lens.append(self.lens[req])
            tables.append(self.block_tables[req])
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.stack(tables),
        )
        hidden = self.model(torch.tensor(ids), meta.positions, self.kv_caches, meta)  # [T, H]
        logits = self.model.compute_logits(hidden)  # [T, V]
        assert logits.dtype == torch.float32
        return list(logits.split(q_lens))


@torch.inference_mode()
def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:  # [L, V]
    return hf(torch.tensor([tokens])).logits[0].float()


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_prefill_then_decode_matches_transformers(models):
    ours, hf, _ = models
    prompts = _prompts(ours.vocab_size, [5, 11, 1, 8])
    decode_steps = 4
    runner = PagedRunner(ours, max(map(len, prompts)) + decode_steps, len(prompts))

    seqs = [list(p) for p in prompts]
    all_logits = [[row] for row in runner.step(list(enumerate(prompts)))]  # prefill, one batch
    for _ in range(decode_steps):  # every request decodes its greedy token, one batch per step
        work = []
        for n, seq in enumerate(seqs):
            seq.append(int(all_logits[n][-1][-1].argmax()))
            work.append((n, [seq[-1]]))
        for n, row in enumerate(runner.step(work)):
            all_logits[n].append(row)

    for n, seq in enumerate(seqs):
        ours_logits = torch.cat(all_logits[n])  # [prompt + decode_steps, V]
        ref = _hf_logits(hf, seq)
        torch.testing.assert_close(ours_logits, ref, atol=ATOL, rtol=RTOL, msg=f"request {n}")
        # Greedy continuation equals transformers' greedy choice at every decode step.
        assert seq[len(prompts[n]):] == ref[len(prompts[n]) - 1 : -1].argmax(-1).tolist()


def test_chunked_prefill_mixed_with_decode_matches_transformers(models):
    ours, hf, _ = models
    long, short = _prompts(ours.vocab_size, [13, 4], seed=1)
    runner = PagedRunner(ours, 16, 2, seed=1)
    first = runner.step([(0, long[:6]), (1, short)])  # chunk 1 of the long prompt + a short prefill
    short_next = int(first[1][-1].argmax())
    second = runner.step([(1, [short_next]), (0, long[6:])])  # a decode + chunk 2 over cached context
    torch.testing.assert_close(torch.cat([first[0], second[1]]), _hf_logits(hf, long), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(
        torch.cat([first[1], second[0]]), _hf_logits(hf, short + [short_next]), atol=ATOL, rtol=RTOL
    )


def test_fused_expert_layout_loads_like_hub_layout(models):
    """transformers' in-memory state dict (fused experts, mlp.*) loads to the same model."""
    ours, hf, path = models
    fused, _ = load_model(path, dtype="float32", show_progress=False)
    state = hf.state_dict()
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    fused.load_weights(state.items())
    for (name, a), (_, b) in zip(ours.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_properties_and_bf16_load(models):
    ours, hf, path = models
    assert ours.num_layers == hf.config.num_hidden_layers
    assert ours.num_kv_heads == hf.config.num_key_value_heads
    assert ours.head_dim == getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    assert ours.dtype == torch.float32
    bf16, _ = load_model(path, dtype="bfloat16", show_progress=False)
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    prompt = _prompts(ours.vocab_size, [9], seed=2)
    logits = PagedRunner(bf16, 9, 1).step([(0, prompt[0])])[0]
    ref = _hf_logits(hf, prompt[0])
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()


def test_empty_batch_returns_no_rows(models):
    """Ranks with no work still run a step (EP lockstep): T = 0 must flow through every layer."""
    ours, _, _ = models
    runner = PagedRunner(ours, 4, 1)
    empty_i32 = torch.zeros(0, dtype=torch.int32)
    meta = AttentionMetadata(
        positions=torch.zeros(0, dtype=torch.int64), slot_mapping=torch.zeros(0, dtype=torch.int64),
        query_start_loc=torch.zeros(1, dtype=torch.int32), seq_lens=empty_i32,
        block_tables=torch.zeros(0, 1, dtype=torch.int32),
    )
    with torch.inference_mode():
        hidden = ours(torch.zeros(0, dtype=torch.int64), meta.positions, runner.kv_caches, meta)
    assert hidden.shape == (0, ours.config.hidden_size)


def test_routing_plan_contract():
    """The Rust core's plan, as the MoE layer sees it: pairs sorted by expert, stably."""
    ids = torch.tensor([[2, 0], [0, 3], [2, 1], [3, 0], [0, 2]], dtype=torch.int32)  # [T, k]; expert 4 unused
    sorted_pair_ids, pair_positions, expert_offsets = routing_plan(ids, 5)
    flat = ids.flatten().long()
    assert sorted_pair_ids.tolist() == [1, 2, 7, 8, 5, 0, 4, 9, 3, 6]
    assert torch.equal(sorted_pair_ids[pair_positions], torch.arange(10))
    assert expert_offsets.tolist() == [0, 4, 5, 8, 10, 10]
    assert torch.equal(flat[sorted_pair_ids], flat.sort(stable=True).values)
    assert sorted_pair_ids.dtype == pair_positions.dtype == expert_offsets.dtype == torch.int64


# ---- loader errors --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_path(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("loader"), "mixtral", num_hidden_layers=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_loader_missing_path_config_and_weights(tmp_path, mixtral_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(mixtral_path / "config.json", only_config / "config.json")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_model(only_config)


def test_loader_unsupported_architecture_and_rope(tmp_path, mixtral_path):
    path = _copy(mixtral_path, tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture.*supported: MixtralForCausalLM"):
        load_model(path)
    scaled = {**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
    (path / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(NotImplementedError, match="'yarn'"):
        load_model(path)


def test_loader_missing_unexpected_and_misshaped_weights(tmp_path, mixtral_path):
    weights = load_file(mixtral_path / "model.safetensors")
    path = _copy(mixtral_path, tmp_path / "broken")

    missing = {k: v for k, v in weights.items() if k != "model.layers.0.block_sparse_moe.experts.3.w3.weight"}
    save_file(missing, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 weights.*model\.layers\.0\.mlp\.experts\.3\.up_proj"):
        load_model(path, show_progress=False)

    save_file({**weights, "model.layers.0.extra.weight": torch.zeros(2)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.extra\.weight'.*unexpected"):
        load_model(path, show_progress=False)

    bad = dict(weights)
    bad["model.norm.weight"] = torch.zeros(3)
    save_file(bad, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        load_model(path, show_progress=False)
