"""Schemathesis against a real server, driven by the server's own /openapi.json: bodies that fit
the published request schemas and bodies just outside them, on every route.

Checks: no 5xx (not_a_server_error), only documented statuses and content types, responses
(and every SSE event) matching their schemas, and schema-invalid requests refused with a 4xx
(negative_data_rejection: the validator is not looser than the document). The document's
cross-field rules (best_of == n, prompts x n per request, context length after the chat
template) make schema-valid requests 400 on purpose, so positive_data_acceptance is replaced
by tests/test_validation_props.py, which checks acceptance against those rules in process.
The server runs with a short context so that the generated requests finish quickly.
"""

from __future__ import annotations

import re
import subprocess
import sys

from server_util import ServerProcess

KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 80
SEED = 20261201  # fixed: CI runs the same cases; bench/reliability records longer, unseeded runs


def test_schemathesis_finds_no_server_error_and_no_schema_drift(tmp_path):
    srv = ServerProcess(["--api-key", KEY, "--max-model-len", "48", "--max-num-seqs-per-request", "8",
                         "--kv-cache-blocks", "512"], tmp_path / "server.log")
    try:
        cmd = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
               "run", srv.url + "/openapi.json", "--header", f"Authorization: Bearer {KEY}",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED),
               "--exclude-checks", "positive_data_acceptance", "--generation-database", "none",
               "--request-timeout", "60", "--suppress-health-check", "all", "--no-color", "--workers", "2"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-6000:]
        generated = re.search(r"(\d+) generated, (\d+) passed", out)
        assert generated and int(generated.group(1)) >= 5 * EXAMPLES_PER_OPERATION, out[-3000:]
        assert "Tested: 7" in out, out[-3000:]  # every route of the document
    finally:
        assert srv.stop() == 0, srv.log()
