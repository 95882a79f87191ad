"""Entry point of a spawned rank process: `python -m expertmesh.engine.rank_worker`.

Reads its place from the env:// variables and the engine config from EXPERTMESH_RANK_CONFIG,
then serves until rank 0 stops it (engine/factory.py: run_rank).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys


def _die_with_parent() -> None:
    # Linux: a worker whose rank 0 is killed goes too, instead of lingering (best effort).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> int:
    _die_with_parent()
    from expertmesh.config import EngineConfig
    from expertmesh.engine.factory import run_rank
    from expertmesh.parallel.groups import rank_info_from_env
    from expertmesh.parallel.launch import CONFIG_ENV, setup_rank

    info = rank_info_from_env()
    if info is None or CONFIG_ENV not in os.environ:
        print("expertmesh.engine.rank_worker: RANK, WORLD_SIZE and EXPERTMESH_RANK_CONFIG must be set", file=sys.stderr)
        return 2
    config = EngineConfig(**json.loads(os.environ[CONFIG_ENV]))
    run_rank(config, setup_rank(config, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
