"""Prepare raw ratings into MDS splits: ``python -m pipelines.prepare_data --dataset
movielens-small|lfs|csv|parquet|synthetic [--input PATH] --output DIR [--overwrite] ...``"""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

from app.core import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.prepare_data", __doc__, ["data", "cluster"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        from app.core.config import config_from_args
        from app.core.storage import is_uri

        cfg = config_from_args(args)  # a bad setting is refused before the heavy imports
        output = cfg.data.output or posixpath.join(cfg.cluster.workdir, "data")
        print(cfg.describe(), flush=True)
        from app.core.cluster import init_ray
        from app.core.preflight import check_prepare
        from app.data.prepare import prepare_dataset

        check_prepare(cfg.data, output, cfg.cluster)
        if cfg.data.base:  # a model's vocabularies as the base: folders and models:/ URIs
            from app.train.model_folder import base_folder

            cfg.data.base = base_folder(cfg.data.base, cfg.cluster)
        init_ray(cfg.cluster)
        manifest = prepare_dataset(cfg.data, output, lease_timeout=cfg.cluster.lease_timeout)
        counts = manifest.counts
        merged = counts.duplicates
        where = output if is_uri(output) else Path(output).absolute()
        print(f"prepared dataset: {where} ({sum(counts.splits.values()):,} "
              f"rows: " + ", ".join(f"{k} {v:,}" for k, v in counts.splits.items())
              + f"; {counts.rejected:,} rejected"
              + (f"; {merged.rows_merged:,} repeated (user, item) rows merged "
                 f"({merged.policy})" if merged.rows_merged else "") + ")")

    return cli.main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
