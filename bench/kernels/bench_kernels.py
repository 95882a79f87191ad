"""Time each Triton kernel against its torch reference and the hardware floor.

    python bench/kernels/bench_kernels.py                 # on a GPU: table + bench/results/kernels_<device>.json
    python bench/kernels/bench_kernels.py --check-only    # anywhere: correctness at small sizes
                                                          # (TRITON_INTERPRET=1 on a CPU)

Floors, measured in the same run: HBM bandwidth from a large device-to-device copy
(2 x bytes / time) and bf16 dense matmul peak from an 8192^3 torch.matmul. Decode attention and
small-batch MoE are bound by bytes (KV cache read; weights of the experts hit), prefill and
large-batch MoE by FLOPs. Shapes: Mixtral-8x7B and Qwen3-30B-A3B layers, bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

MODELS = {  # NH, NKV, D, E, k, H, I
    "mixtral-8x7b": dict(nh=32, nkv=8, d=128, e=8, k=2, h=4096, i=14336),
    "qwen3-30b-a3b": dict(nh=32, nkv=4, d=128, e=128, k=8, h=2048, i=768),
}
ROOT = Path(__file__).resolve().parents[2]


def _paged(reqs, nkv, d, dtype, device, block=16):
    """Random paged cache and metadata for (context, new) requests; q for the new tokens."""
    seq_lens = [c + q for c, q in reqs]
    blocks = [math.ceil(s / block) for s in seq_lens]
    mb = max(blocks)
    perm = torch.randperm(sum(blocks), device=device).to(torch.int32)
    tables = torch.zeros(len(reqs), mb, dtype=torch.int32, device=device)
    at = 0
    for n, b in enumerate(blocks):
        tables[n, :b] = perm[at : at + b]
        at += b
    kc = torch.randn(sum(blocks), block, nkv, d, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor([q for _, q in reqs]), 0)), dtype=torch.int32, device=device)
    return kc, vc, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def cases(device, dtype, small):
    """(name, model, run_triton, run_ref, bytes, flops) for every kernel and model shape."""
    from expertmesh_kernels.attention import paged_attention_ref
    from expertmesh_kernels.decode_attention import paged_decode_attention
    from expertmesh_kernels.fused_moe import fused_moe, fused_moe_ref
    from expertmesh_kernels.gating import topk_gating, topk_gating_ref
    from expertmesh_kernels.prefill_attention import varlen_prefill_attention

    out = []
    for model, m in MODELS.items():
        if small:
            m = dict(nh=8, nkv=m["nkv"] // 4 or 1, d=32, e=min(m["e"], 16), k=m["k"] // 2 or 1, h=64, i=48)
        es = torch.finfo(dtype).bits // 8
        nh, nkv, d = m["nh"], m["nkv"], m["d"]
        for batch, ctx in ([(4, 40)] if small else [(1, 4096), (64, 2048), (256, 1024)]):
            kc, vc, bt, qsl, sl = _paged([(ctx, 1)] * batch, nkv, d, dtype, device)
            q = torch.randn(batch, nh, d, dtype=dtype, device=device)
            byt = 2 * batch * (ctx + 1) * nkv * d * es
            out.append((f"decode_attn b={batch} ctx={ctx}", model, "bytes",
                        lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl: paged_decode_attention(q, kc, vc, bt, sl, d**-0.5),
                        lambda q=q, kc=kc, vc=vc, bt=bt, qsl=qsl, sl=sl: paged_attention_ref(q, kc, vc, bt, qsl, sl, d**-0.5),
                        byt, 4 * batch * (ctx + 1) * nh * d))
        for nreq, qlen in ([(2, 20)] if small else [(1, 4096), (8, 512)]):
            kc, vc, bt, qsl, sl = _paged([(0, qlen)] * nreq, nkv, d, dtype, device)
            q = torch.randn(nreq * qlen, nh, d, dtype=dtype, device=device)
            flops = 4 * nreq * nh * d * qlen * (qlen + 1) / 2  # causal
            out.append((f"prefill_attn n={nreq} q={qlen}", model, "flops",
                        lambda q=q, kc=kc, vc=vc, bt=bt, qsl=qsl, sl=sl, ql=qlen: varlen_prefill_attention(
                            q, kc, vc, bt, qsl, sl, d**-0.5, max_query_len=ql),
                        lambda q=q, kc=kc, vc=vc, bt=bt, qsl=qsl, sl=sl: paged_attention_ref(q, kc, vc, bt, qsl, sl, d**-0.5),
                        2 * nreq * qlen * nkv * d * es, flops))
        e, k, h, i = m["e"], m["k"], m["h"], m["i"]
        wgu = torch.randn(e, 2 * i, h, dtype=dtype, device=device) * h**-0.5
        wd = torch.randn(e, h, i, dtype=dtype, device=device) * i**-0.5
        for t in ([1, 9] if small else [1, 16, 256, 4096]):
            x = torch.randn(t, h, dtype=dtype, device=device)
            logits = torch.randn(t, e, dtype=dtype, device=device)
            w, ids = topk_gating_ref(logits, k, True)
            hit = min(e, t * k)  # experts touched (upper bound for random routing)
            byt = hit * 3 * h * i * es + 2 * t * h * es
            kind = "bytes" if t * k <= 2 * e else "flops"
            out.append((f"fused_moe T={t}", model, kind,
                        lambda x=x, w=w, ids=ids: fused_moe(x, wgu, wd, w, ids),
                        lambda x=x, w=w, ids=ids: fused_moe_ref(x, wgu, wd, w, ids),
                        byt, 2 * t * k * 3 * h * i))
            out.append((f"topk_gating T={t}", model, "bytes",
                        lambda lg=logits: topk_gating(lg, k, True), lambda lg=logits: topk_gating_ref(lg, k, True),
                        t * e * es + t * k * 8, 0))
    return out


def _close(a, b):
    a = a if isinstance(a, torch.Tensor) else a[0]
    b = b if isinstance(b, torch.Tensor) else b[0]
    return (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()


def check_only():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        for name, model, _, tri, ref, _, _ in cases(device, dtype, small=True):
            err, scale = _close(tri(), ref())
            ok = err <= (1e-4 if dtype == torch.float32 else 4e-2) * max(1.0, scale)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {model:14s} {name:28s} {str(dtype):15s} max err {err:.2e}")
    return failures


def floors(device):
    import triton.testing

    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    bw = 2 * a.numel() * 2 / (ms * 1e-3)
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = triton.testing.do_bench(lambda: x @ x)
    return bw, 2 * 8192**3 / (ms * 1e-3)


def bench():
    import triton.testing

    device = torch.device("cuda")
    bw, peak = floors(device)
    name = torch.cuda.get_device_name(device).replace(" ", "_")
    rows = []
    print(f"device {name}: copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    print(f"{'model':14s} {'case':28s} {'triton us':>10s} {'torch us':>10s} {'speedup':>8s} {'floor us':>9s} {'% floor':>8s}")
    for case, model, kind, tri, ref, byt, flops in cases(device, torch.bfloat16, small=False):
        t_ms = triton.testing.do_bench(tri)
        try:
            r_ms = triton.testing.do_bench(ref)
        except torch.OutOfMemoryError:
            r_ms = float("nan")
        floor_s = byt / bw if kind == "bytes" else flops / peak
        row = dict(model=model, case=case, bound=kind, triton_us=t_ms * 1e3, torch_us=r_ms * 1e3,
                   floor_us=floor_s * 1e6, bytes=byt, flops=flops)
        rows.append(row)
        print(f"{model:14s} {case:28s} {row['triton_us']:10.1f} {row['torch_us']:10.1f} "
              f"{r_ms / t_ms:8.2f} {row['floor_us']:9.1f} {100 * row['floor_us'] / row['triton_us']:7.1f}%")
    path = ROOT / "bench" / "results" / f"kernels_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(device=name, torch=torch.__version__, copy_bandwidth_Bps=bw,
                                    bf16_matmul_flops=peak, rows=rows), indent=1))
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="correctness at small sizes only (CPU ok)")
    args = parser.parse_args()
    if args.check_only:
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        sys.exit(1 if check_only() else 0)
    if not torch.cuda.is_available():
        sys.exit("timing needs a CUDA GPU; use --check-only on a CPU")
    bench()


if __name__ == "__main__":
    main()
