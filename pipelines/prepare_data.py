"""Prepare raw ratings into MDS splits: ``python -m pipelines.prepare_data --dataset
movielens-small|lfs|csv|parquet|synthetic [--input PATH] --output DIR [--overwrite] ...``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.prepare_data", __doc__, ["data", "cluster"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        from app.cluster import init_ray
        from app.config import config_from_args
        from app.prepare import prepare_dataset

        cfg = config_from_args(args)
        output = cfg.data.output or str(Path(cfg.cluster.workdir) / "data")
        print(cfg.describe(), flush=True)
        init_ray(cfg.cluster)
        manifest = prepare_dataset(cfg.data, output)
        counts = manifest["counts"]
        print(f"prepared dataset: {Path(output).absolute()} ({counts['accepted']:,} rows: "
              + ", ".join(f"{k} {v:,}" for k, v in counts["splits"].items())
              + f"; {counts['rejected']:,} rejected)")

    return cli.main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
