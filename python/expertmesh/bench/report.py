"""Benchmark output: the readable table, the result JSON, and the PNG plots.

The JSON layout is versioned (SCHEMA_VERSION) and checked by tests/test_bench.py, so scripts
that read saved results keep working: top-level keys "schema_version", "kind" ("serve" or
"offline"), "date", "machine", "config", "metrics", and for serve runs "requests" (one entry
per request, in request order, with its timings) and "timeline" (per-second buckets).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from expertmesh.bench.metrics import RequestResult, timeline

SCHEMA_VERSION = 1
REQUEST_FIELDS = ("index", "success", "error_kind", "error", "prompt_len", "max_tokens", "output_tokens",
                  "start_time", "ttft", "latency", "tpot", "itl")


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU model from /proc/cpuinfo, like lscpu's model name)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "arch": platform.machine(),
                            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def request_row(r: RequestResult) -> dict[str, Any]:
    row = asdict(r)
    row["tpot"] = r.tpot
    return {k: row[k] for k in REQUEST_FIELDS}


def result_document(kind: str, config: dict[str, Any], metrics: dict[str, Any],
                    results: list[RequestResult] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": config,
        "metrics": metrics,
    }
    if results is not None:
        doc["requests"] = [request_row(r) for r in results]
        doc["timeline"] = timeline(results, 1.0)
    doc.update(extra or {})
    return doc


def save_json(doc: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    return p


def _line(label: str, value: Any, fmt: str = "{:.2f}") -> str:
    text = "n/a" if value is None else (fmt.format(value) if isinstance(value, float) else str(value))
    return f"{label:<40}{text:>12}"


def serve_table(m: dict[str, Any], percentiles: tuple[float, ...]) -> str:
    """The table in vLLM's layout, plus lost requests and errors by kind."""
    out = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=52, c="="),
           _line("Successful requests:", m["completed"]),
           _line("Failed requests:", m["failed"]),
           _line("Lost requests:", m["lost"]),
           _line("Benchmark duration (s):", m["duration_s"]),
           _line("Total input tokens:", m["total_input_tokens"]),
           _line("Total generated tokens:", m["total_output_tokens"]),
           _line("Request throughput (req/s):", m["request_throughput"])]
    if m.get("request_goodput") is not None:
        out.append(_line("Request goodput (req/s):", m["request_goodput"]))
    out += [_line("Output token throughput (tok/s):", m["output_throughput"]),
            _line("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"]),
            _line("Peak concurrent requests:", m["max_concurrent_requests"]),
            _line("Total token throughput (tok/s):", m["total_token_throughput"])]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key, title in titles.items():
        out.append("{s:{c}^{n}}".format(s=title, n=52, c="-"))
        out.append(_line(f"Mean {key.upper()} (ms):", m[f"mean_{key}_ms"]))
        out.append(_line(f"Median {key.upper()} (ms):", m[f"median_{key}_ms"]))
        for p in percentiles:
            if p == 50:
                continue  # the median, already shown
            out.append(_line(f"P{p:g} {key.upper()} (ms):", m[f"p{p:g}_{key}_ms"]))
    if m["errors"]:
        out.append("{s:{c}^{n}}".format(s="Errors", n=52, c="-"))
        out += [_line(f"{kind}:", count) for kind, count in m["errors"].items()]
    out.append("=" * 52)
    return "\n".join(out)


def plot_serve(doc: dict[str, Any], path: str | Path) -> Path:
    """Latency distributions (TTFT, TPOT, ITL, E2EL) and throughput / concurrency over time."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    reqs = [r for r in doc["requests"] if r["success"]]
    series = {"TTFT": [r["ttft"] * 1e3 for r in reqs],
              "TPOT": [r["tpot"] * 1e3 for r in reqs if r["tpot"] is not None],
              "ITL": [g * 1e3 for r in reqs for g in r["itl"]],
              "E2E latency": [r["latency"] * 1e3 for r in reqs]}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, values) in zip(axes.flat, series.items()):
        if values:
            ax.hist(values, bins=40, color="tab:blue", alpha=0.8)
        ax.set_title(f"{name} (ms), n={len(values)}")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    # Finer buckets than the JSON's 1 s ones, so short runs still show a shape.
    duration = float(doc["metrics"]["duration_s"]) or 1.0
    rows = [RequestResult(index=r["index"], prompt_len=r["prompt_len"], max_tokens=r["max_tokens"], success=True,
                          start_time=r["start_time"], ttft=r["ttft"], latency=r["latency"], itl=r["itl"])
            for r in reqs]
    tl = timeline(rows, max(0.1, duration / 60))
    ax = axes.flat[4]
    ax.plot(tl["t"], tl["output_chunks_per_s"], label="output tokens/s", color="tab:green")
    ax.set_xlabel("seconds since start")
    ax.set_title("throughput over time")
    ax.legend(loc="upper left")
    ax2 = ax.twinx()
    ax2.plot(tl["t"], tl["in_flight"], label="requests in flight", color="tab:orange")
    ax2.legend(loc="upper right")
    ax = axes.flat[5]
    ax.axis("off")
    m, c = doc["metrics"], doc["config"]
    text = (f"{c.get('dataset')} x {m['num_requested']}, rate {c.get('request_rate')}, "
            f"max conc {c.get('max_concurrency')}\n"
            f"completed {m['completed']}, failed {m['failed']}, lost {m['lost']}\n"
            f"req/s {m['request_throughput']:.2f}, out tok/s {m['output_throughput']:.1f}\n"
            f"TTFT p50/p99 {m['median_ttft_ms']:.1f}/{m['p99_ttft_ms']:.1f} ms\n"
            f"TPOT p50/p99 {m['median_tpot_ms']:.1f}/{m['p99_tpot_ms']:.1f} ms\n"
            f"{doc['machine']['cpu']} ({doc['machine']['cpu_count']} cores)")
    ax.text(0.0, 0.95, text, va="top", family="monospace", fontsize=9)
    fig.suptitle(f"expertmesh bench serve: {c.get('model')} at {c.get('base_url')}")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
