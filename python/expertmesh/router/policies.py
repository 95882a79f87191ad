"""Which replica a request goes to: the order in which to try the healthy backends.

  prefix-hash   (default) the prompt's leading KV blocks, tokenized with the model's tokenizer
                and cut at the server's block size, are the key on a consistent-hash ring with
                bounded load (ring.py): requests that the replicas' prefix caches could share
                land on the same replica, unless it is overloaded.
  least-loaded  fewest requests: the running + waiting count the backend publishes in /metrics
                (as of the last health check), or this router's in-flight count if higher.
  round-robin   each healthy backend in turn.

A down backend keeps its ring points (health flapping reshuffles nothing); its keys are served
by the next backend clockwise until it is back.
"""

from __future__ import annotations

import itertools
import json
from array import array
from typing import Any

from expertmesh.router.backends import BackendPool
from expertmesh.router.ring import HashRing
from expertmesh.tokenizer import CheckpointTokenizer

POLICIES = ("prefix-hash", "least-loaded", "round-robin")


class PrefixKeyer:
    """The key of a request: its first `max_blocks` full blocks of `block_size` tokens (all of
    its tokens when it has less than one block), as the prefix cache would see them."""

    def __init__(self, tokenizer: CheckpointTokenizer | None, block_size: int = 16, max_blocks: int = 4) -> None:
        self.tokenizer, self.block_size, self.max_blocks = tokenizer, block_size, max_blocks

    def key(self, path: str, body: dict[str, Any]) -> bytes:
        ids = self._token_ids(path, body)
        if ids is None:  # nothing to tokenize: hash what the request says
            return json.dumps(body.get("prompt", body.get("messages")), sort_keys=True, default=str).encode()
        blocks = min(len(ids) // self.block_size, self.max_blocks)
        prefix = ids[: blocks * self.block_size] if blocks else ids
        return array("q", prefix).tobytes()

    def _token_ids(self, path: str, body: dict[str, Any]) -> list[int] | None:
        try:
            if path.endswith("/chat/completions"):
                messages = body.get("messages")
                if self.tokenizer is None or not isinstance(messages, list):
                    return None
                return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch: the first prompt decides
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return prompt
            if isinstance(prompt, str) and self.tokenizer is not None:
                return self.tokenizer.encode(prompt)
        except Exception:  # noqa: BLE001 - a request the tokenizer refuses still gets routed; the backend judges it
            return None
        return None


class Router:
    def __init__(self, policy: str, pool: BackendPool, keyer: PrefixKeyer, load_factor: float = 1.25,
                 vnodes: int = 160, min_bound: int = 8, members: set[str] | None = None) -> None:
        """members: the backends of the pool this router picks from (default: all of them)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.pool, self.keyer, self.load_factor, self.min_bound = policy, pool, keyer, load_factor, min_bound
        self.members = set(pool.backends) if members is None else members
        self.ring = HashRing(sorted(self.members), vnodes)
        self._turn = itertools.count()

    def order(self, path: str, body: dict[str, Any]) -> list[str]:
        """Healthy backends in the order to try them (the first is where the request goes)."""
        healthy = self.pool.healthy() & self.members
        if not healthy:
            return []
        backends = self.pool.backends
        if self.policy == "prefix-hash":  # this router's own, exact counts: the bound reacts at once
            loads = {url: backends[url].in_flight for url in self.members}
            return self.ring.pick(self.keyer.key(path, body), loads, self.load_factor, allowed=healthy,
                                  min_bound=self.min_bound)
        ordered = sorted(healthy)
        if self.policy == "least-loaded":
            return sorted(ordered, key=lambda url: backends[url].load)
        start = next(self._turn) % len(ordered)
        return ordered[start:] + ordered[:start]
