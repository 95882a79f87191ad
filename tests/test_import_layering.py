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
