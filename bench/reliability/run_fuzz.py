"""A long fuzzing session of the three fuzzers the test suite runs briefly, with a summary.

1. proptest on the Rust scheduler (rust/tests/scheduler_fuzz.rs): arbitrary call sequences,
   FUZZ_CASES cases, release build.
2. hypothesis on the request validator (tests/test_validation_props.py), with
   EXPERTMESH_HYPOTHESIS_EXAMPLES examples per property.
3. schemathesis against a real `expertmesh serve` for --minutes, unseeded, every route of its
   /openapi.json; afterwards the server must stop cleanly (exit 0) with no traceback logged.

    .venv/bin/python bench/reliability/run_fuzz.py --minutes 10 --rust-cases 3000000 \
        --hypothesis-examples 20000 --out bench/results/reliability-fuzz-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from server_util import ServerProcess  # noqa: E402 - the tests' own launcher

KEY = "fuzz-key"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float]:
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return run.returncode, run.stdout + run.stderr, time.monotonic() - start


def rust(cases: int) -> dict:
    code, out, took = _run(["cargo", "test", "--release", "--quiet", "--test", "scheduler_fuzz"],
                           {"FUZZ_CASES": str(cases)})
    return {"fuzzer": "proptest: Rust scheduler API", "cases": cases, "seconds": round(took, 1),
            "passed": code == 0, "failures": [] if code == 0 else [out[-3000:]]}


def hypothesis(examples: int) -> dict:
    code, out, took = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_validation_props.py"], {"EXPERTMESH_HYPOTHESIS_EXAMPLES": str(examples)})
    props = re.search(r"(\d+) passed", out)
    return {"fuzzer": "hypothesis: request validator", "cases": examples * (int(props.group(1)) if props else 0),
            "examples_per_property": examples, "seconds": round(took, 1), "passed": code == 0,
            "failures": [] if code == 0 else [out[-3000:]]}


def schemathesis(minutes: float, log: Path) -> dict:
    srv = ServerProcess(["--api-key", KEY, "--max-model-len", "48", "--max-num-seqs-per-request", "8",
                         "--kv-cache-blocks", "512"], log)
    try:
        code, out, took = _run([sys.executable, "-c",
                                "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
                                "run", srv.url + "/openapi.json", "--header", f"Authorization: Bearer {KEY}",
                                "--max-time", str(int(minutes * 60)), "--exclude-checks", "positive_data_acceptance",
                                "--generation-database", "none", "--request-timeout", "60",
                                "--suppress-health-check", "all", "--no-color", "--workers", "2"])
    finally:
        server_code = srv.stop()
    generated = re.search(r"(\d+) generated", out)
    failures = re.findall(r"^\s*❌ (ST\d+ [^:]+): (\d+)", out, flags=re.M)
    # aiohttp logs the malformed requests it refuses itself (a NUL in a header, ...) with a
    # traceback of its parser; only a traceback through expertmesh's code is a finding.
    server_log = log.read_text()
    ours = [block for block in server_log.split("Traceback (most recent call last):")[1:] if "expertmesh/" in block]
    return {"fuzzer": "schemathesis: /v1/completions, /v1/chat/completions, /tokenize, /detokenize, /v1/models, "
                      "/health, /metrics", "cases": int(generated.group(1)) if generated else 0,
            "seconds": round(took, 1), "passed": code == 0 and server_code == 0 and not ours,
            "schemathesis_exit": code, "server_exit": server_code, "server_tracebacks": len(ours),
            "failures": [f"{name}: {n}" for name, n in failures] + [t[-2000:] for t in ours]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="schemathesis time budget")
    parser.add_argument("--rust-cases", type=int, default=3_000_000)
    parser.add_argument("--hypothesis-examples", type=int, default=20_000)
    parser.add_argument("--only", nargs="+", choices=["rust", "hypothesis", "schemathesis"], default=None,
                        help="run only these (their entries replace the ones already in --out)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args()
    steps = [("rust", lambda: rust(args.rust_cases)), ("hypothesis", lambda: hypothesis(args.hypothesis_examples)),
             ("schemathesis", lambda: schemathesis(args.minutes, Path("/tmp/expertmesh-fuzz-server.log")))]
    steps = [(name, step) for name, step in steps if args.only is None or name in args.only]
    results = []
    for name, step in tqdm(steps, desc="fuzzers", unit="fuzzer"):
        results.append(step())
        tqdm.write(f"{name}: {results[-1]['cases']} cases in {results[-1]['seconds']} s, "
                   f"{'passed' if results[-1]['passed'] else 'FAILED'} {results[-1]['failures'] or ''}")
    for r in results:
        r["date"] = time.strftime("%Y-%m-%d %H:%M")
    if args.out and args.only and args.out.exists():  # keep the other fuzzers' entries
        kept = [r for r in json.loads(args.out.read_text())["results"] if r["fuzzer"] not in
                {n["fuzzer"] for n in results}]
        results = kept + results
    summary = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
               "config": vars(args) | {"out": str(args.out)}, "results": results}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'fuzzer':<40} {'cases':>10} {'minutes':>8}  result")
    for r in results:
        print(f"{r['fuzzer'][:40]:<40} {r['cases']:>10} {r['seconds'] / 60:>8.1f}  {'pass' if r['passed'] else 'FAIL'}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
