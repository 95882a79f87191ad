"""Prefix KV moved from a prefill engine to a decode engine (engine/kv_transfer.py), over real
TCP between two engines in this process: greedy outputs equal a colocated engine's; only blocks
the decode side lacks travel; the decode side computes only what the blocks do not cover;
pins are released on receipt or at their timeout; failed pulls raise clear errors and leave
nothing behind; block counts return to all-free on both sides."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from expertmesh import LLM, SamplingParams
from expertmesh.engine.kv_transfer import KvExporter, KvImporter, KvTransferError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PREFILL = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _llm(mixtral_dir) -> LLM:
    return LLM(str(mixtral_dir), max_num_batched_tokens=512, kv_cache_blocks=128, show_progress=False)


@pytest.fixture(scope="module")
def engines(mixtral_dir):
    prefill, decode, colocated = _llm(mixtral_dir), _llm(mixtral_dir), _llm(mixtral_dir)
    pulled = threading.Semaphore(0)
    exporter = KvExporter(prefill.engine.scheduler, prefill.engine.runner.kv_caches, notify=pulled.release)
    importer = KvImporter(decode.engine.scheduler, decode.engine.runner.kv_caches)
    yield prefill, decode, colocated, exporter, importer, pulled
    exporter.close()


def _tokens(llm: LLM, prompt: list[int]) -> list[int]:
    return llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def _all_free(llm: LLM) -> bool:
    s = llm.engine.scheduler
    return not s.has_unfinished() and s.num_free_blocks == s.num_blocks and s.num_pinned_transfers == 0


def _move(engines, prompt: list[int]) -> tuple[int, int]:
    """Prefill on one engine, move the KV, return (blocks the decode side had, blocks installed)."""
    prefill, decode, _, exporter, importer, pulled = engines
    prefill.generate([prompt], PREFILL, use_tqdm=False)
    params = exporter.export(prompt)
    assert exporter.num_pinned == 1
    first, count = importer.missing(prompt, params)
    data = importer.fetch(params, first, count)
    assert data.shape[2] == count  # [L, 2, n, B, NKV, D]
    installed = importer.install(prompt, first, data)
    assert pulled.acquire(timeout=10)  # the exporter saw the receipt...
    exporter.release_finished()  # ...and lets the pins go on the engine's thread
    assert exporter.num_pinned == 0
    return first, installed


def test_decode_after_a_moved_prefill_equals_colocated_and_computes_only_the_tail(engines):
    prefill, decode, colocated, exporter, importer, _ = engines
    gen = torch.Generator().manual_seed(3)
    for length in (17, 40, 64, 100):
        prompt = torch.randint(3, 600, (length,), generator=gen).tolist()
        hits0 = decode.engine.scheduler.stats()["prefix_cache_hits"]
        first, installed = _move(engines, prompt)
        assert (first, installed) == (0, (length - 1) // 16)  # every block a hit can use, none held before
        assert _tokens(decode, prompt) == _tokens(colocated, prompt), length
        assert decode.engine.scheduler.stats()["prefix_cache_hits"] - hits0 == installed * 16  # the rest was computed
    assert all(_all_free(e) for e in (prefill, decode, colocated))


def test_only_blocks_the_decode_side_lacks_travel(engines):
    prefill, decode, colocated, exporter, importer, _ = engines
    gen = torch.Generator().manual_seed(4)
    shared = torch.randint(3, 600, (48,), generator=gen).tolist()  # three blocks both prompts start with
    first_prompt = shared + torch.randint(3, 600, (20,), generator=gen).tolist()
    second_prompt = shared + torch.randint(3, 600, (40,), generator=gen).tolist()  # 88 tokens: 5 hit blocks
    assert _move(engines, first_prompt) == (0, 4)
    bytes0 = importer.stats["bytes"]
    assert _move(engines, second_prompt) == (3, 2)  # the shared blocks stayed home
    per_block = 2 * len(decode.engine.runner.kv_caches) * decode.engine.runner.kv_caches[0][0][0].numel() * 4
    assert importer.stats["bytes"] - bytes0 == 2 * per_block
    assert _tokens(decode, second_prompt) == _tokens(colocated, second_prompt)
    assert all(_all_free(e) for e in (prefill, decode))


def test_unpulled_pins_expire_and_bad_pulls_fail_cleanly(engines):
    prefill, decode, _, _, importer, _ = engines
    exporter = KvExporter(prefill.engine.scheduler, prefill.engine.runner.kv_caches, notify=lambda: None,
                          pin_timeout_s=0.5)
    try:
        prompt = list(range(5, 45))
        prefill.generate([prompt], PREFILL, use_tqdm=False)
        params = exporter.export(prompt)
        assert prefill.engine.scheduler.num_pinned_transfers == 1
        with pytest.raises(KvTransferError, match="outside the 2 exported"):
            importer.fetch(params, 1, 5)
        with pytest.raises(KvTransferError, match="no pinned KV under transfer_id 7"):
            importer.fetch({**params, "transfer_id": 7}, 0, 1)
        with pytest.raises(KvTransferError, match="layouts differ"):
            importer.fetch({**params, "layout": {**params["layout"], "num_kv_heads": 99}}, 0, 1)
        exporter.release_finished()
        assert exporter.num_pinned == 1  # nothing was pulled and the timeout has not passed
        time.sleep(0.6)
        exporter.release_finished()
        assert exporter.num_pinned == 0 and exporter.stats["expired"] == 1
        assert _all_free(prefill) and _all_free(decode)
        with pytest.raises(KvTransferError, match="no pinned KV"):  # expired: refused from now on
            importer.fetch(params, 0, 1)
    finally:
        exporter.close()
