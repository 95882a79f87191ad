"""The router's hash ring and policies, in process: adding or removing one of N replicas moves
about 1/N of the keys (and only to or from that replica); bounded load caps a hot prefix;
prefix keys follow the server's block alignment."""

from __future__ import annotations

import math
from array import array
from collections import Counter

import pytest

from expertmesh.router.policies import PrefixKeyer
from expertmesh.router.ring import HashRing

KEYS = [f"prefix-{i}".encode() for i in range(20_000)]


def _homes(ring: HashRing) -> dict[bytes, str]:
    return {k: next(ring.walk(k)) for k in KEYS}


def test_adding_a_replica_moves_about_one_nth_of_the_keys_and_only_to_it():
    ring = HashRing([f"r{i}" for i in range(4)])
    before = _homes(ring)
    ring.add("r4")
    after = _homes(ring)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "r4" for k in moved)  # nothing moves between the old replicas
    assert 0.5 / 5 < len(moved) / len(KEYS) < 1.5 / 5, len(moved) / len(KEYS)
    shares = Counter(after.values())
    assert max(shares.values()) / min(shares.values()) < 1.5, shares  # virtual nodes even the arcs out


def test_removing_a_replica_moves_only_its_keys():
    ring = HashRing([f"r{i}" for i in range(5)])
    before = _homes(ring)
    ring.remove("r2")
    after = _homes(ring)
    assert [k for k in KEYS if before[k] != after[k]] == [k for k in KEYS if before[k] == "r2"]


def test_walk_gives_every_node_once_home_first():
    ring = HashRing(["a", "b", "c"])
    for key in KEYS[:200]:
        order = list(ring.walk(key))
        assert sorted(order) == ["a", "b", "c"] and order[0] == next(ring.walk(key))


@pytest.mark.parametrize("load_factor", [1.25, 2.0])
def test_bounded_load_caps_a_hot_prefix(load_factor):
    """80% of 2,000 concurrent requests share one prefix: no replica holds more than the bound."""
    ring = HashRing([f"r{i}" for i in range(4)])
    loads: Counter = Counter()
    for i in range(2_000):
        key = b"hot" if i % 5 else f"cold-{i}".encode()
        node = ring.pick(key, loads, load_factor)[0]
        bound = math.ceil(load_factor * (sum(loads.values()) + 1) / 4)
        assert loads[node] + 1 <= bound
        loads[node] += 1
    assert max(loads.values()) <= math.ceil(load_factor * 2_000 / 4)
    # Unloaded, the hot prefix stays home: bounded load only bites under load.
    assert ring.pick(b"hot", Counter(), load_factor)[0] == next(ring.walk(b"hot"))


def test_at_low_load_affinity_beats_balance():
    ring = HashRing([f"r{i}" for i in range(4)])
    home = next(ring.walk(b"hot"))
    loads = Counter({home: 5})  # 5 of 5 in flight on one replica: past 1.25 x the average
    assert ring.pick(b"hot", loads, 1.25)[0] != home
    assert ring.pick(b"hot", loads, 1.25, min_bound=8)[0] == home  # but under the absolute threshold
    assert ring.pick(b"hot", Counter({home: 8}), 1.25, min_bound=8)[0] != home


def test_pick_skips_replicas_that_may_not_take_work():
    ring = HashRing(["a", "b", "c"])
    home = next(ring.walk(b"k"))
    order = ring.pick(b"k", {}, allowed={"a", "b", "c"} - {home})
    assert home not in order and len(order) == 2


def test_prefix_keys_are_block_aligned():
    keyer = PrefixKeyer(None, block_size=4, max_blocks=2)
    key = lambda ids: keyer.key("/v1/completions", {"prompt": ids})  # noqa: E731
    assert key(list(range(10))) == array("q", range(8)).tobytes()  # two full blocks of four
    assert key(list(range(9))) == key(list(range(8)) + [99])  # what follows the blocks does not matter
    assert key([1, 2, 3]) == array("q", [1, 2, 3]).tobytes()  # under one block: all of it
    assert key([[5, 6, 7, 8, 9]]) == array("q", [5, 6, 7, 8]).tobytes()  # a batch: its first prompt


def _router(policy: str):
    from expertmesh.router.backends import Backend, BackendPool
    from expertmesh.router.policies import Router

    pool = BackendPool([Backend(f"http://r{i}") for i in range(3)])
    return Router(policy, pool, PrefixKeyer(None)), pool


def test_least_loaded_counts_in_flight_and_the_backends_own_queues():
    router, pool = _router("least-loaded")
    pool.backends["http://r0"].in_flight = 3
    pool.backends["http://r1"].in_flight, pool.backends["http://r1"].queued = 1, 2  # its /metrics: 2 (ours + others)
    pool.backends["http://r2"].queued = 1
    assert router.order("/v1/completions", {"prompt": "x"}) == ["http://r2", "http://r1", "http://r0"]
    pool.mark_down("http://r2", "test")
    assert router.order("/v1/completions", {"prompt": "x"}) == ["http://r1", "http://r0"]


def test_round_robin_takes_turns_among_the_healthy():
    router, pool = _router("round-robin")
    firsts = [router.order("/v1/completions", {"prompt": "x"})[0] for _ in range(6)]
    assert firsts == ["http://r0", "http://r1", "http://r2"] * 2
    pool.mark_down("http://r1", "test")
    assert {router.order("/v1/completions", {"prompt": "x"})[0] for _ in range(4)} == {"http://r0", "http://r2"}


def test_prefix_hash_keeps_a_key_home_and_fails_over_clockwise():
    router, pool = _router("prefix-hash")
    body = {"prompt": list(range(40))}
    home, *rest = router.order("/v1/completions", body)
    assert all(router.order("/v1/completions", {"prompt": list(range(32)) + [7] * 8})[0] == home for _ in range(3))
    pool.mark_down(home, "test")
    assert router.order("/v1/completions", body) == rest  # the next ones clockwise, in ring order
    assert _router("prefix-hash")[0].order("/v1/completions", {"prompt": "no tokenizer: hashed as text"})


def test_router_options_come_from_the_command_line_and_the_config_file(tmp_path):
    from expertmesh.cli import build_parser
    from expertmesh.router.main import _load_config

    config = tmp_path / "router.toml"
    config.write_text('policy = "round-robin"\nload_factor = 2.0\n[[backends]]\nurl = "http://b:1/"\napi_key = "kb"\n')
    args = build_parser().parse_args(["router", "--backend", "http://a:1", "--backend-api-key", "ka",
                                      "--config", str(config)])
    backends = _load_config(args)
    assert [(b.url, b.api_key) for b in backends] == [("http://a:1", "ka"), ("http://b:1", "kb")]
    assert (args.policy, args.load_factor, args.host) == ("round-robin", 2.0, "127.0.0.1")  # loopback by default
    with pytest.raises(SystemExit, match="at least one --backend"):
        _load_config(build_parser().parse_args(["router"]))
    config.write_text('polcy = "x"\n')
    with pytest.raises(SystemExit, match="unknown option 'polcy'"):
        _load_config(build_parser().parse_args(["router", "--backend", "http://a:1", "--config", str(config)]))
