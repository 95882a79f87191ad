"""Entry point of a spawned expert-parallel rank: `python -m expertmesh.parallel.worker`.

Reads its place from the env:// variables and the engine config from EXPERTMESH_EP_CONFIG,
then serves rank 0's commands until told to stop (engine/ep_engine.py: worker_loop).
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
    from expertmesh.engine.ep_engine import run_worker
    from expertmesh.parallel.groups import rank_info_from_env
    from expertmesh.parallel.launch import CONFIG_ENV

    info = rank_info_from_env()
    if info is None or CONFIG_ENV not in os.environ:
        print("expertmesh.parallel.worker: RANK, WORLD_SIZE and EXPERTMESH_EP_CONFIG must be set", file=sys.stderr)
        return 2
    config = EngineConfig(**json.loads(os.environ[CONFIG_ENV]))
    run_worker(config, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
