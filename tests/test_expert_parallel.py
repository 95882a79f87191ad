"""Expert parallelism on CPU processes (gloo + shared memory): the Rust plans through the
bindings, both transports against each other, the MoE all-to-all against the single-rank
computation, and whole engines at EP=2 and EP=4 against EP=1 (greedy tokens and logprobs),
including an idle rank, ranks without tokens, steps split into chunks and a dying rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ep_util import run_ranks
from ep_workers import exchange_both, moe_both
from expertmesh import LLM, SamplingParams
from expertmesh._core import A2aCapacity, CoreError, PhaseRing, plan_dispatch, plan_receive
from expertmesh.errors import CollectiveError
from expertmesh.parallel.groups import free_port


def test_plans_through_the_bindings():
    ids = np.array([[1, 0], [3, 1], [0, 2]], dtype=np.int32)
    d = plan_dispatch(ids, 4, 2)
    assert d.send_counts.tolist() == [3, 2] and d.send_token_ids.tolist() == [0, 1, 2, 1, 2]
    assert d.send_local_experts.shape == (5, 2)
    r = plan_receive([1, 2], np.array([[0, -1], [1, -1], [-1, 0]]), 2)
    assert r.sorted_pair_ids.tolist() == [0, 5, 2] and r.expert_offsets.tolist() == [0, 2, 3]
    with pytest.raises(CoreError, match=r"num_experts=4\), got 4"):
        plan_dispatch(np.array([[4]], dtype=np.int64), 4, 2)
    cap = A2aCapacity(max_tokens_per_rank=16, top_k=8, num_experts=64, num_ranks=4)
    assert (cap.max_send_rows, cap.max_recv_rows, cap.num_chunks(33)) == (64, 64, 3)
    with pytest.raises(CoreError, match="rows sent to rank 2 must be in"):
        cap.check_send_counts([0, 0, 17, 0])
    ring = PhaseRing(2)
    a, b = ring.acquire(), ring.acquire()
    with pytest.raises(CoreError, match="still in flight"):
        ring.acquire()
    ring.release(a)
    with pytest.raises(CoreError, match="already released"):
        ring.release(a)
    ring.release(b)
    assert ring.num_in_flight == 0


@pytest.mark.parametrize("world", [2, 4])
def test_transports_agree(world):
    for rank, out in enumerate(run_ranks(exchange_both, world)):
        torch_res, shm_res = out["torch"], out["shm"]
        for (tx, tid, tc), (sx, sid, sc) in zip(torch_res[:4], shm_res[:4]):
            assert tc == sc and torch.equal(tx, sx) and torch.equal(tid, sid)
            # Rows arrive grouped by source, and source s sent its ids starting at 100 * s.
            assert sorted(set((tid // 100).tolist())) == [s for s in range(world) if tc[s]]
        assert torch_res[4] == shm_res[4] == 3 * (world - 1)
        # Dispatch-like exchange_rows and combine-like exchange_add: same rows as through gloo,
        # and every row comes home to its index unchanged (exact: added once onto zeros).
        (t_recv, t_out, x), (s_recv, s_out, _) = torch_res[5], shm_res[5]
        assert t_recv[2] == s_recv[2] and torch.equal(t_recv[0], s_recv[0]) and torch.equal(t_recv[1], s_recv[1])
        assert torch.equal(t_out, x) and torch.equal(s_out, x)
        assert "slot_rows=8, got 9" in shm_res[6]


@pytest.mark.parametrize(
    "world,top_k,chunk,routing",
    [(2, 2, 4, "random"), (2, 2, 3, "idle_rank"), (4, 2, 2, "one_rank_experts"), (4, 8, 5, "random")],
)
def test_moe_all_to_all_equals_single_rank(world, top_k, chunk, routing):
    for want, got in run_ranks(moe_both, world, top_k, chunk, routing):
        for name, y in got.items():
            # The expert GEMMs see other batches than on one rank: equal up to fp32 rounding.
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6, msg=name)


PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 652, (16,), generator=gen).tolist()  # one full block, shared by two
    return [torch.randint(3, 652, (n,), generator=gen).tolist() for n in (5, 23, 9)] + [shared + [7, 8], shared + [9]]


def _run(llm: LLM, prompts):
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


@pytest.fixture(scope="module")
def reference(mixtral_dir):
    llm = LLM(str(mixtral_dir), show_progress=False)
    prompts = _prompts()
    return prompts, _run(llm, prompts), _run(llm, prompts[:1])


def _assert_same(got, want):
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        np.testing.assert_allclose(lps, want_lps, rtol=1e-4, atol=1e-4)


def test_ep2_shared_memory_equals_single_rank(mixtral_dir, reference):
    prompts, want, want_one = reference
    allowed = sorted(os.sched_getaffinity(0))  # before rank 0 (this process) is bound
    # 4 tokens per rank per all-to-all call: every prefill is split into chunks.
    with LLM(str(mixtral_dir), show_progress=False, expert_parallel_size=2, ep_transport="shm",
             ep_max_tokens_per_rank=4, step_breakdown=True) as llm:
        _assert_same(_run(llm, prompts), want)
        _assert_same(_run(llm, prompts[:1]), want_one)  # one request: the other rank idles
        engine = llm.engine
        ranks = engine.stats()["ranks"]
        # Each rank runs on its own share of the cores (one thread per core), or all share one.
        cores = [r["cpu_cores"] for r in ranks]
        assert cores == ([[c] for c in allowed[:2]] if len(allowed) == 2 else
                         [allowed[: len(allowed) // 2], allowed[len(allowed) // 2:]] if len(allowed) > 2 else
                         [allowed, allowed])
        for r in ranks:  # every step was timed, and the exchange sections saw time
            ms = r["step_breakdown"]["ms_per_step"]
            assert r["step_breakdown"]["steps"] > 0 and ms["all_to_all"] > 0 and ms["control"] > 0 and ms["experts"] > 0
        # The two prompts sharing a first block went to one rank (prefix-cache hits).
        load = llm.expert_load()
        assert len(load["rank_tokens"]) == 2 and all(len(layer) == 2 for layer in load["rank_tokens"])
        assert all(sum(layer) > 0 for layer in load["rank_tokens"])
        assert engine.pick_replica(prompts[3]) == engine.pick_replica(prompts[4])
    assert sorted(os.sched_getaffinity(0)) == allowed  # closing gave the cores back


def test_ep4_torch_transport_equals_single_rank(mixtral_dir, reference):
    prompts, want, _ = reference
    with LLM(str(mixtral_dir), show_progress=False, expert_parallel_size=4, ep_transport="torch") as llm:
        _assert_same(_run(llm, prompts), want)


def test_dead_rank_fails_cleanly(mixtral_dir):
    llm = LLM(str(mixtral_dir), show_progress=False, expert_parallel_size=2, ep_timeout_s=20)
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
        llm.engine.runner.rank.procs[0].kill()
        llm.engine.runner.rank.procs[0].wait()
        start = time.monotonic()
        with pytest.raises(CollectiveError, match="rank 1"):
            llm.generate([[5, 6, 7], [8, 9, 10]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - start < 20
    finally:
        llm.close()


def test_idle_longer_than_the_collective_timeout_keeps_the_ranks_alive(mixtral_dir):
    # Worker ranks wait for rank 0's next command without a deadline: an engine left idle (a
    # quiet server, a pause between generate() calls) must not lose its ranks.
    with LLM(str(mixtral_dir), show_progress=False, expert_parallel_size=2, ep_timeout_s=2) as llm:
        first = _run(llm, [[5, 6, 7], [8, 9, 10]])
        time.sleep(4)
        assert all(proc.poll() is None for proc in llm.engine.runner.rank.procs)
        assert _run(llm, [[5, 6, 7], [8, 9, 10]]) == first


def test_a_rank_dying_at_start_up_fails_the_launch_at_once_and_the_next_launch_works(mixtral_dir, tmp_path,
                                                                                      monkeypatch):
    # Rank 0 watches the ranks it spawned while it waits for them to join; a failed launch must
    # leave nothing behind that breaks the next one from the same process.
    (tmp_path / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n    os._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    with pytest.raises(CollectiveError, match=r"rank 1 \(pid \d+\) exited with code 3"):
        LLM(str(mixtral_dir), show_progress=False, expert_parallel_size=2)
    assert time.monotonic() - start < 30  # not the 60 s collective timeout
    monkeypatch.undo()
    with LLM(str(mixtral_dir), show_progress=False, expert_parallel_size=2, ep_timeout_s=2) as llm:
        assert _run(llm, [[5, 6, 7]])[0][0]  # tokens came back


@pytest.mark.parametrize("layout", [["--ep", "2"], ["-tp", "2"]])
def test_torchrun_launch_equals_single_rank(mixtral_dir, tmp_path, layout):
    # Under torchrun every process runs the CLI; ranks form their groups from the env://
    # variables and only rank 0 prints.
    def generate(prefix: list[str], flags: list[str]) -> str:
        argv = [*prefix, "-m", "expertmesh.cli", "generate", "--model", str(mixtral_dir), "--prompt", "The experts",
                "--max-tokens", "6", "--ignore-eos", "--max-model-len", "256", "--kv-cache-blocks", "64", *flags]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [line for line in proc.stdout.splitlines() if line.startswith("output[")][0]

    single = generate([sys.executable], [])
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launched = generate([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port())], layout)
    assert launched == single
    assert generate([sys.executable], layout) == single  # ranks started by rank 0 itself
