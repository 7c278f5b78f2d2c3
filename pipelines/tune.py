"""Hyperparameter sweep: ``python -m pipelines.tune --data DIR --output DIR [--num-samples N]
[--max-concurrent M] [--search-alg optuna|random] [--scheduler asha|none] [--config FILE]
[--resume] ...``

Each trial is a distributed training run (the same trainer as ``pipelines.train``). The output
folder gets ``results.txt`` / ``results.json`` (one row per trial, best first),
``best_config.yaml`` (``pipelines.train --config`` takes it as is) and
``metric_by_embedding_dim.png``. The search space lives in the config (``tune.search_space``
in YAML, or ``--search-space '{"embedding_dim": {"choice": [16, 64]}}'``).
"""

from __future__ import annotations

import argparse
import sys

from app.core import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.tune", __doc__,
                        ["model", "train", "tune", "cluster"],
                        required="--data DIR --output DIR")
    parser.add_argument("--data", required=True, help="prepared dataset folder")
    parser.add_argument("--output", required=True, help="folder for the sweep's results")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        from app.core.config import config_from_args
        from app.core.preflight import check_tune

        cfg = config_from_args(args)  # a bad setting is refused before the heavy imports
        print(cfg.describe(), flush=True)
        check_tune(cfg.cluster, args.data, args.output)  # and storage, before them too
        from app.tune import sweep

        sweep(cfg, args.data, args.output)

    return cli.main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
