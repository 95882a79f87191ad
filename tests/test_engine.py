"""The engine end to end on the CPU: outputs equal transformers' greedy generate, and do not
change with batch composition, chunked prefill, prefix-cache hits or preemption; no block leaks."""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0, vocab: int = 652) -> list[list[int]]:
    """n prompts of different lengths (3..40 tokens) as token ids."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3 + (7 * i + 5) % 38 for i in range(n)]
    return [torch.randint(3, vocab, (n_tok,), generator=gen).tolist() for n_tok in lengths]


def greedy_tokens(llm: LLM, batch: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(batch, params, use_tqdm=False)]


def assert_no_leak(llm: LLM) -> None:
    sched = llm.engine.scheduler
    assert not sched.has_unfinished()
    assert sched.num_free_blocks == sched.num_blocks


@pytest.fixture(scope="module")
def llm(mixtral_dir):
    return LLM(str(mixtral_dir), max_num_batched_tokens=512, kv_cache_blocks=256, show_progress=False)


@pytest.fixture(scope="module")
def hf_model(mixtral_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_batch_equals_transformers_generate(llm, hf_model):
    batch = prompts(6)
    ours = greedy_tokens(llm, batch)
    theirs = [hf_greedy(hf_model, p, GREEDY.max_tokens) for p in batch]
    assert ours == theirs
    assert_no_leak(llm)


def test_output_does_not_depend_on_batch_neighbours(llm):
    batch = prompts(8, seed=1)
    together = greedy_tokens(llm, batch)
    alone = [greedy_tokens(llm, [p])[0] for p in batch[:3]]
    assert together[:3] == alone
    reversed_batch = greedy_tokens(llm, batch[::-1])
    assert reversed_batch[::-1] == together
    assert_no_leak(llm)


def test_chunked_prefill_gives_same_output(mixtral_dir, llm):
    batch = prompts(5, seed=2)
    reference = greedy_tokens(llm, batch)
    chunked = LLM(str(mixtral_dir), max_num_batched_tokens=8, kv_cache_blocks=256, show_progress=False)
    assert greedy_tokens(chunked, batch) == reference
    assert_no_leak(chunked)


def test_prefix_cache_hits_give_same_output(mixtral_dir):
    shared = prompts(1, seed=3)[0] * 2  # a long common prefix (more than two blocks)
    batch = [shared + tail for tail in ([5, 6, 7], [8, 9], [10])]
    cold = LLM(str(mixtral_dir), enable_prefix_caching=False, kv_cache_blocks=256, show_progress=False)
    expected = greedy_tokens(cold, batch)
    warm = LLM(str(mixtral_dir), kv_cache_blocks=256, show_progress=False)
    first = greedy_tokens(warm, batch[:1])
    assert first == expected[:1]
    assert greedy_tokens(warm, batch) == expected
    stats = warm.stats()
    assert stats["prefix_cache_hits"] >= 2 * 16, stats
    assert_no_leak(warm)


def test_preemption_gives_same_output(mixtral_dir, llm):
    batch = prompts(6, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = greedy_tokens(llm, batch, params)
    # 12 blocks of 16 tokens cannot hold six growing sequences at once: the scheduler must preempt.
    small = LLM(str(mixtral_dir), kv_cache_blocks=12, max_model_len=128, show_progress=False)
    assert greedy_tokens(small, batch, params) == reference
    assert small.stats()["num_preemptions"] > 0
    assert_no_leak(small)


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(llm):
    batch = prompts(4, seed=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    alone = greedy_tokens(llm, batch[:1], seeded)[0]
    mixed = llm.generate(batch, [seeded, unseeded, unseeded, unseeded], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True)
    assert greedy_tokens(llm, batch[:1], other_seed)[0] != alone


def test_n_sequences_finish_reasons_and_usage(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    (out,) = llm.generate([prompts(1, seed=6)[0]], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # seed + i per sequence
    assert out.usage.completion_tokens == 15
    assert out.usage.prompt_tokens == len(out.prompt_token_ids)
    assert_no_leak(llm)


def test_stop_token_and_stop_string(llm):
    prompt = prompts(1, seed=8)[0]
    free = greedy_tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    stop_id = free[4]
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]), use_tqdm=False)
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == free[: free.index(stop_id) + 1]
    # A stop string made of the text of tokens 2..3 ends generation and is left out of the text.
    full_text = llm.tokenizer.decode(free)
    piece = llm.tokenizer.decode(free[2:4]).strip()
    if piece and piece in full_text:
        (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[piece]), use_tqdm=False)
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == piece
        assert c.text == full_text[: full_text.index(piece)]
    assert_no_leak(llm)


def test_logprobs_match_the_logits(llm):
    (out,) = llm.generate([prompts(1, seed=9)[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True), use_tqdm=False)
    c = out.outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == 4
    for token, entry in zip(c.token_ids, c.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        assert max(lp.logprob for lp in entry.values()) == entry[token].logprob
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))


def test_text_prompt_and_chat(llm):
    (out,) = llm.generate("The experts", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert out.prompt_token_ids == llm.tokenizer.encode("The experts")
    assert isinstance(out.outputs[0].text, str)
    (chat,) = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert chat.prompt_token_ids == llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "prompt, params, param",
    [
        ([1] * 5000, SamplingParams(max_tokens=1), "prompt"),
        ([1, 2, 3], SamplingParams(max_tokens=10**6), "max_tokens"),
        ("", SamplingParams(), "prompt"),
        ([1, 100000], SamplingParams(), "prompt[1]"),
        ([1, 2], SamplingParams(stop_token_ids=[5, 100000]), "stop_token_ids[1]"),  # beyond the vocabulary
    ],
)
def test_bad_requests_raise_clear_errors(llm, prompt, params, param):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([prompt], params, use_tqdm=False)
    assert info.value.param == param
    assert not llm.engine.has_unfinished_requests()
    assert_no_leak(llm)


def test_bad_model_paths_raise_clear_errors(tmp_path, mixtral_dir):
    with pytest.raises(InvalidRequestError, match="not a directory"):
        LLM(str(tmp_path / "missing"))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(Exception, match="MixtralForCausalLM"):
        LLM(str(odd))


def test_builtin_default_model_runs():
    llm = LLM(show_progress=False)
    outs = llm.generate(["Hello, world!", "The experts"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert all(o.finished and o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    again = LLM(show_progress=False).generate(["Hello, world!"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert_no_leak(llm)


def test_failed_forward_pass_ends_requests_with_error_and_engine_goes_on(llm, monkeypatch):
    batch = prompts(3, seed=10)
    real_execute = llm.engine.runner.execute
    calls = {"n": 0}

    def failing_once(step_batch):
        calls["n"] += 1
        if calls["n"] == 2:  # fail mid-generation, after the prefill step
            raise RuntimeError("injected fault")
        return real_execute(step_batch)

    monkeypatch.setattr(llm.engine.runner, "execute", failing_once)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error"] * 3
    assert_no_leak(llm)
    monkeypatch.setattr(llm.engine.runner, "execute", real_execute)
    assert greedy_tokens(llm, batch[:1])[0] == greedy_tokens(llm, batch)[0]


def test_bfloat16_engine_runs_and_stays_close_to_float32(mixtral_dir):
    bf16 = LLM(str(mixtral_dir), dtype="bfloat16", kv_cache_blocks=64, show_progress=False)
    assert bf16.engine.runner.dtype == torch.bfloat16
    # The cache is in the model's dtype on the CPU too: half the memory of an fp32 copy.
    assert bf16.engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    batch = prompts(3, seed=11)
    (out,) = bf16.generate(batch[:1], SamplingParams(temperature=0, max_tokens=4, logprobs=1, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    fp32 = LLM(str(mixtral_dir), kv_cache_blocks=64, show_progress=False)
    (ref,) = fp32.generate(batch[:1], SamplingParams(temperature=0, max_tokens=1, logprobs=1, ignore_eos=True), use_tqdm=False)
    # The first token's logprob under bf16 arithmetic is close to fp32's (bf16 has ~3 digits).
    first_bf16 = out.outputs[0].logprobs[0]
    first_fp32 = ref.outputs[0].logprobs[0]
    token = ref.outputs[0].token_ids[0]
    assert out.outputs[0].token_ids[0] == token
    assert first_bf16[token].logprob == pytest.approx(first_fp32[token].logprob, abs=0.05)
    assert_no_leak(bf16)


def test_output_kinds_carry_all_new_or_final(llm):
    """CUMULATIVE outputs hold everything so far, DELTA outputs only what each step added (so
    per-step work does not grow with the output), FINAL_ONLY only the finished output; all
    three end with the same tokens, text and logprobs (the three requests share batches, so
    their logprobs agree to fp32 summation order, not bit for bit)."""
    from expertmesh.outputs import RequestOutputKind

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=1, n=2)
    prompt = prompts(1, seed=21)[0]
    ids = {kind: engine.add_request(prompt, params, output_kind=kind) for kind in RequestOutputKind}
    seen: dict[str, list] = {rid: [] for rid in ids.values()}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    cumulative, deltas, final = (seen[ids[k]] for k in RequestOutputKind)
    assert len(final) == 1 and final[0].finished and len(deltas) == len(cumulative) > 1
    assert all(len(seq.token_ids) <= 1 for out in deltas[1:] for seq in out.outputs)  # one token per step
    def values(logprobs):
        return [{tok: lp.logprob for tok, lp in entry.items()} for entry in logprobs]

    for index in range(2):
        whole, last = cumulative[-1].outputs[index], final[0].outputs[index]
        assert (last.token_ids, last.text, last.finish_reason) == (whole.token_ids, whole.text, "length")
        assert last.text_delta == whole.text  # nothing was handed out before
        assert sum((out.outputs[index].token_ids for out in deltas), []) == whole.token_ids
        assert "".join(out.outputs[index].text for out in deltas) == whole.text
        delta_lps = sum((out.outputs[index].logprobs for out in deltas), [])
        for got in (delta_lps, last.logprobs):
            assert [d.keys() for d in values(got)] == [d.keys() for d in values(whole.logprobs)]
            flat = [v for d in values(got) for v in d.values()]
            assert flat == pytest.approx([v for d in values(whole.logprobs) for v in d.values()], abs=1e-5)
        assert deltas[-1].outputs[index].finish_reason == "length"
    assert_no_leak(llm)
