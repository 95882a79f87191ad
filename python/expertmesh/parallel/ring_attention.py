"""Ring attention over a CP-sharded paged cache: pass-KV and pass-Q in one ring.

Each CP rank holds part of every context-parallel request's KV and computes part of its new
tokens (context_parallel.py says which). One ring of N-1 steps carries, from every rank, one
message: the KV it holds of pass-KV requests and the queries it computes of pass-Q requests.
At each step a rank posts the message in hand to its successor and the receive from its
predecessor, then, while those travel, attends

  its own pass-KV queries over the KV in hand (partials merged into its running output), and
  the pass-Q queries in hand over its own KV (partials kept for their owner).

After the ring the pass-Q partials go home in one all-to-all of point-to-point messages and
merge there. Merging is exact in fp32 by log-sum-exp; a partial that saw no key has lse -inf.
Message sizes follow from the plan, so empty messages are skipped on both ends. The ring is a
TorchRing (below) or a shm_ring.ShmRing: `post` starts sends and receives, `wait` ends them.

Legend: Tq query rows, Tk key rows, NH/NKV heads held, G = NH / NKV, D head dim, L KV tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.errors import CollectiveError

_MAX_SCORE_ELEMENTS = 1 << 20  # bound on the fp32 [NKV, G, Tq, Tk] score tile (4 MB: fastest on the CPU)
_ROWS = 512  # query rows per flash-attention call on the CPU


def _attend_tile(q, q_pos, k, v, k_pos, scale: float, window: int | None):
    """fp32 (out [Tq, NH, D], lse [Tq, NH]) of q over k/v with the causal (and window) mask."""
    tq, nh, d = q.shape
    nkv = k.shape[1]
    qg = q.float().view(tq, nkv, nh // nkv, d)  # [Tq, NKV, G, D]
    scores = torch.einsum("qhgd,khd->hgqk", qg, k.float()) * scale  # [NKV, G, Tq, Tk]
    visible = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
    if window is not None:  # the HF rule: a key is seen while q_pos - k_pos < window
        visible &= q_pos[:, None] - k_pos[None, :] < window
    scores.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [NKV, G, Tq]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # masked rows: all 0
    out = torch.einsum("hgqk,khd->qhgd", probs, v.float()).reshape(tq, nh, d)
    return out, lse.permute(2, 0, 1).reshape(tq, nh)


def _flash(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float, mask: torch.Tensor | None):
    """torch's CPU flash attention (fp32, it returns the LSE) of q [Tq, NH, D] over kh/vh
    [1, NKV, Tk, D]: the G query heads of a KV head ride as G x Tq rows against it, so no KV
    is repeated. mask [Tq, Tk] additive (0 / -inf), or None for all keys visible.
    Returns (out [Tq, NH, D], lse [Tq, NH])."""
    tq, nh, d = q.shape
    nkv = kh.shape[1]
    g = nh // nkv
    rows = q.float().view(tq, nkv, g, d).permute(1, 2, 0, 3).reshape(1, nkv, g * tq, d)  # [1, NKV, G*Tq, D]
    if mask is not None:
        mask = mask.repeat(g, 1)[None, None]  # [1, 1, G*Tq, Tk]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(rows, kh, vh, 0.0, False,
                                                                           attn_mask=mask, scale=scale)
    out = out.view(nkv, g, tq, d).permute(2, 0, 1, 3).reshape(tq, nh, d)
    return out, lse.view(nkv, g, tq).permute(2, 0, 1).reshape(tq, nh)


def _attend_cpu(q, q_pos: np.ndarray, k, v, k_pos: np.ndarray, scale: float, window: int | None, out, lse) -> None:
    """out/lse [Tq, ...] <- q over k/v (positions sorted), by row tiles: the keys every row of a
    tile sees in one unmasked call, the band at its diagonal (and window edge) in a masked one."""
    kh = k.float().permute(1, 0, 2)[None].contiguous()  # [1, NKV, Tk, D]
    vh = v.float().permute(1, 0, 2)[None].contiguous()
    for r in range(0, q.shape[0], _ROWS):
        qp = q_pos[r:r + _ROWS]
        o, s = out[r:r + _ROWS], lse[r:r + _ROWS]
        band_hi = int(np.searchsorted(k_pos, qp[-1], side="right"))
        if window is None:  # keys at or before the tile's first position: seen by every row
            band_lo = int(np.searchsorted(k_pos, qp[0], side="right"))
            if band_lo:
                o[:], s[:] = _flash(q[r:r + _ROWS], kh[:, :, :band_lo], vh[:, :, :band_lo], scale, None)
        else:
            band_lo = int(np.searchsorted(k_pos, qp[0] - window + 1))
        if band_hi <= band_lo:
            continue
        kp = k_pos[band_lo:band_hi]
        visible = kp[None, :] <= qp[:, None]  # [R, Tb]
        if window is not None:
            visible &= qp[:, None] - kp[None, :] < window
        mask = torch.zeros(visible.shape).masked_fill_(torch.from_numpy(~visible), float("-inf"))
        bo, bs = _flash(q[r:r + _ROWS], kh[:, :, band_lo:band_hi], vh[:, :, band_lo:band_hi], scale, mask)
        bs.masked_fill_(torch.from_numpy(~visible.any(axis=1))[:, None], float("-inf"))  # flash gives 0 there
        merge(o, s, bo, bs)


def partial_attention(q: torch.Tensor, q_pos: np.ndarray, k: torch.Tensor, v: torch.Tensor, k_pos: np.ndarray,
                      segments: list[tuple[int, int, int, int]], scale: float,
                      window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows q [Tq, NH, D] over some of their requests' keys k/v [Tk, NKV, D]:
    `segments` pairs each request's query rows with its key rows (positions sorted in both).
    Returns fp32 out [Tq, NH, D] and lse [Tq, NH]; rows that see no key get 0 and -inf. On the
    CPU, torch's flash attention (15-30x the einsum tiles at 4K tokens, bench/cp); elsewhere
    einsum tiles."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for q_lo, q_hi, k_lo, k_hi in segments:
        keys = k_pos[k_lo:k_hi]
        # Keys after the last query, or before the first one's window, are seen by no row.
        hi = k_lo + int(np.searchsorted(keys, q_pos[q_hi - 1], side="right"))
        lo = k_lo + (int(np.searchsorted(keys, q_pos[q_lo] - window + 1)) if window is not None else 0)
        if lo >= hi:
            continue
        if q.device.type == "cpu":
            _attend_cpu(q[q_lo:q_hi], q_pos[q_lo:q_hi], k[lo:hi], v[lo:hi], k_pos[lo:hi], scale, window,
                        out[q_lo:q_hi], lse[q_lo:q_hi])
            continue
        rows = max(1, _MAX_SCORE_ELEMENTS // (q.shape[1] * (hi - lo)))
        kp = torch.from_numpy(k_pos[lo:hi]).to(q.device)
        for r in range(q_lo, q_hi, rows):
            r_hi = min(q_hi, r + rows)
            qp = torch.from_numpy(q_pos[r:r_hi]).to(q.device)
            out[r:r_hi], lse[r:r_hi] = _attend_tile(q[r:r_hi], qp, k[lo:hi], v[lo:hi], kp, scale, window)
    return out, lse


def merge(out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor, other_lse: torch.Tensor) -> None:
    """Fold a partial (other_out [T, NH, D], other_lse [T, NH], fp32) into out/lse, in place."""
    top = torch.maximum(lse, other_lse)
    top = torch.where(torch.isinf(top), 0.0, top)  # both -inf: weights 0, result stays empty
    a, b = torch.exp(lse - top), torch.exp(other_lse - top)
    total = a + b
    safe = torch.where(total > 0, total, 1.0)
    out.mul_((a / safe).unsqueeze(-1)).add_(other_out * (b / safe).unsqueeze(-1))
    lse.copy_(top + torch.log(total))


class TorchRing:
    """Point-to-point messages between a ring's ranks over torch.distributed (gloo, NCCL)."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup, ranks: list[int], rank: int, timeout_s: float) -> None:
        self.group, self.ranks, self.rank, self.size = group, ranks, rank, len(ranks)
        self.timeout_s = timeout_s

    def post(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> list:
        """Start sends/receives (CP rank -> tensor); returns handles for `wait`."""
        works = [dist.isend(t.contiguous(), self.ranks[dst], group=self.group) for dst, t in sends.items()]
        works += [dist.irecv(t, self.ranks[src], group=self.group) for src, t in recvs.items()]
        return works

    def wait(self, works: list) -> None:
        for work in works:
            try:
                work.wait()
            except RuntimeError as exc:  # a peer died or timed out
                raise CollectiveError(f"context-parallel ring: CP rank {self.rank} of {self.size} lost a peer "
                                      f"({exc})") from exc

    def close(self) -> None:
        """Nothing to free: the messages ride the process group."""


def ring_attention(ring, step, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   scale: float, window: int | None) -> tuple[torch.Tensor, int]:
    """fp32 attention [Tc, NH, D] of this rank's context-parallel query rows q [Tc, NH, D]
    (pass-KV rows first, as the plan orders them), and the bytes this rank sent."""
    me, n = ring.rank, ring.size
    nh, d = q.shape[1], q.shape[2]
    nkv = k_cache.shape[2]
    held = step.holdings
    own = held[me]
    k_own = k_cache.view(-1, nkv, d).index_select(0, step.own_slots)  # [L, NKV, D]
    v_own = v_cache.view(-1, nkv, d).index_select(0, step.own_slots)

    def numel(x: int) -> int:  # message from CP rank x: its pass-KV KV, then its pass-Q queries
        return 2 * held[x].kv_split * nkv * d + (held[x].q_pos.shape[0] - held[x].q_split) * nh * d

    def unpack(msg: torch.Tensor, x: int):
        lk = held[x].kv_split
        kv = msg[: 2 * lk * nkv * d].view(2, lk, nkv, d)
        return kv[0], kv[1], msg[2 * lk * nkv * d:].view(-1, nh, d)

    cut = own.q_split
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [Tc, NH, D]
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    returned: dict[int, torch.Tensor] = {}  # CP rank -> partials of its pass-Q rows, [Tq, NH, D + 1]
    msg = torch.cat([k_own[: own.kv_split].reshape(-1), v_own[: own.kv_split].reshape(-1),
                     q[cut:].to(k_cache.dtype).reshape(-1)])
    sent = 0
    for s in range(n):
        src = (me - s) % n
        works, incoming = [], None
        if s < n - 1:
            sends = {(me + 1) % n: msg} if numel(src) else {}
            nxt = (me - s - 1) % n
            incoming = torch.empty(numel(nxt), dtype=k_cache.dtype, device=q.device)
            works = ring.post(sends, {(me - 1) % n: incoming} if numel(nxt) else {})
            sent += msg.numel() * msg.element_size() if sends else 0
        k_in, v_in, q_in = unpack(msg, src)
        if step.kv_pairs[src]:  # my pass-KV queries over src's KV
            o, l = partial_attention(q[:cut], own.q_pos[:cut], k_in, v_in, held[src].kv_pos[: held[src].kv_split],
                                     step.kv_pairs[src], scale, window)
            merge(out[:cut], lse[:cut], o, l)
        if step.q_pairs[src]:  # src's pass-Q queries over my KV
            o, l = partial_attention(q_in, held[src].q_pos[held[src].q_split:], k_own[own.kv_split:],
                                     v_own[own.kv_split:], own.kv_pos[own.kv_split:], step.q_pairs[src],
                                     scale, window)
            returned[src] = torch.cat([o, l.unsqueeze(-1)], dim=-1)
        ring.wait(works)
        if incoming is not None:
            msg = incoming
    # Pass-Q partials go home: from every rank that computed one, to the queries' owner.
    mine_q = own.q_pos.shape[0] - cut
    sends = {x: t for x, t in returned.items() if x != me}
    recvs = {x: torch.empty(mine_q, nh, d + 1, dtype=torch.float32, device=q.device)
             for x in step.returns_from} if mine_q else {}
    ring.wait(ring.post(sends, recvs))
    sent += sum(t.numel() * 4 for t in sends.values())
    for part in [returned.get(me), *recvs.values()]:
        if part is not None:
            merge(out[cut:], lse[cut:], part[..., :d], part[..., d])
    return out, sent

