"""Consistent hashing with virtual nodes and bounded load.

Each backend owns `vnodes` points on a 64-bit ring (blake2b of "name#i"); a key belongs to the
first point clockwise from its hash. Adding or removing one of N backends moves only the keys
of the arcs it gains or loses, about 1/N of them. Bounded load (Mirrokni, Thorup, Zadimoghaddam,
"Consistent Hashing with Bounded Loads"): a backend whose load would pass
ceil(load_factor x (total + 1) / N) passes the key on to the next distinct backend clockwise,
so a hot prefix cannot pile everything onto one replica while cold keys keep their homes. With
few requests in flight that bound is a handful and would scatter prefixes for no gain, so it is
never below `min_bound` (the router's --balance-abs-threshold, after SGLang's router).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, nodes: list[str] | None = None, vnodes: int = 160) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self._points: list[int] = []  # sorted ring positions
        self._owner: dict[int, str] = {}  # position -> node
        self._nodes: set[str] = set()
        for node in nodes or []:
            self.add(node)

    @property
    def nodes(self) -> set[str]:
        return set(self._nodes)

    def add(self, node: str) -> None:
        if node in self._nodes:
            return
        self._nodes.add(node)
        for i in range(self.vnodes):
            point = hash64(f"{node}#{i}".encode())
            if point in self._owner:  # a 64-bit collision: astronomically rare, keep the first owner
                continue
            self._owner[point] = node
            bisect.insort(self._points, point)

    def remove(self, node: str) -> None:
        if node not in self._nodes:
            return
        self._nodes.discard(node)
        mine = {p for p, n in self._owner.items() if n == node}
        self._points = [p for p in self._points if p not in mine]
        for p in mine:
            del self._owner[p]

    def walk(self, key: bytes) -> Iterator[str]:
        """Distinct nodes clockwise from the key's hash: its home first."""
        if not self._points:
            return
        start = bisect.bisect(self._points, hash64(key)) % len(self._points)
        seen: set[str] = set()
        for i in range(len(self._points)):
            node = self._owner[self._points[(start + i) % len(self._points)]]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == len(self._nodes):
                    return

    def pick(self, key: bytes, loads: dict[str, int], load_factor: float = 1.25,
             allowed: set[str] | None = None, min_bound: int = 0) -> list[str]:
        """Nodes in the order to try for `key`: clockwise from its home, the first whose load is
        under the bound put first (`allowed`: the nodes that may take work, e.g. the healthy ones).
        The bound is never below `min_bound`: at low load, affinity beats balance."""
        order = [n for n in self.walk(key) if allowed is None or n in allowed]
        if not order:
            return []
        total = sum(loads.get(n, 0) for n in order)
        bound = max(math.ceil(load_factor * (total + 1) / len(order)), min_bound)
        for i, node in enumerate(order):
            if loads.get(node, 0) + 1 <= bound:
                return order[i:] + order[:i]
        return order
