"""Write the Mixtral-shaped random-weight checkpoint `bench offline` uses as its larger model.

    .venv/bin/python bench/offline/make_model.py [--out DIR] [--preset medium]

Default DIR: $EXPERTMESH_CACHE/bench-mixtral-medium (else ~/.cache/expertmesh/...). The
weights are random (transformers MixtralConfig + save_pretrained, bf16, ~1 GB) and never
committed; the preset's shape is in expertmesh.bench.offline.MODEL_PRESETS.
"""

from __future__ import annotations

import argparse

from expertmesh.bench.offline import MODEL_PRESETS, make_random_mixtral
from expertmesh.default_model import cache_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="medium")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = args.out or cache_root() / f"bench-mixtral-{args.preset}"
    print(make_random_mixtral(out, args.preset))


if __name__ == "__main__":
    main()
