"""The import arrows run one way: engine -> parallel -> models -> layers -> kernels. Layer and
model files never import parallel/ or engine/ (they read the same on 1 rank or 1,000), and
parallel/ never imports engine/ or the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "expertmesh"
FORBIDDEN = {
    "layers": ("expertmesh.parallel", "expertmesh.engine", "expertmesh.server", "expertmesh.models"),
    "models": ("expertmesh.parallel", "expertmesh.engine", "expertmesh.server"),
    "parallel": ("expertmesh.engine", "expertmesh.server", "expertmesh.llm"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_backwards(package):
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files
    bad = [(f.name, name) for f in files for name in _imports(f) if name.startswith(FORBIDDEN[package])]
    assert not bad, bad


def test_the_router_starts_without_torch_or_the_engine():
    """`expertmesh router` builds the whole command line and its state without importing torch
    (seconds to import and hundreds of MB it would never use)."""
    import subprocess
    import sys

    from expertmesh.default_model import default_model_path

    tokenizer = str(default_model_path())  # written here if it is not yet: that part needs torch
    code = ("import sys\n"
            "from expertmesh.cli import build_parser\n"
            "from expertmesh.router.main import build_state\n"
            "build_state(build_parser().parse_args(['router', '--backend', 'http://127.0.0.1:9', '--tokenizer', "
            f"{tokenizer!r}]))\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('expertmesh.engine'))\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
