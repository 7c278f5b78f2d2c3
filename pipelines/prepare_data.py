"""Prepare raw ratings into MDS splits.

    python -m pipelines.prepare_data --dataset ... --output DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.cluster import init_ray
from app.config import ConfigError, add_arguments, config_from_args
from app.dataset import DatasetError
from app.prepare import prepare_dataset
from app.sources import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, sections=["data", "cluster"])
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        output = cfg.data.output or str(Path(cfg.cluster.workdir) / "data")
        print(cfg.describe(), flush=True)
        init_ray(cfg.cluster)
        manifest = prepare_dataset(cfg.data, output)
    except (ConfigError, DataError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(f"prepared dataset: {Path(output).absolute()} ({counts['accepted']:,} rows: "
          + ", ".join(f"{k} {v:,}" for k, v in counts["splits"].items())
          + f"; {counts['rejected']:,} rejected)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
