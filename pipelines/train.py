"""Train the two-tower model: ``python -m pipelines.train --data DIR --output MODEL_DIR
[--topology cpu|snsg|snmg|mnmg] [--num-workers N] [--epochs N] [--embedding-dim D]
[--config FILE] [--resume] ...``"""

from __future__ import annotations

import argparse
import sys

from app.core import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.train", __doc__, ["model", "train", "cluster"],
                        required="--data DIR --output MODEL_DIR")
    parser.add_argument("--data", required=True, help="prepared dataset folder")
    parser.add_argument("--output", required=True, help="model folder to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        from app.core.config import config_from_args
        from app.core.preflight import check_train
        from app.core.report import comparison

        cfg = config_from_args(args)  # a bad setting is refused before the heavy imports
        print(cfg.describe(), flush=True)
        check_train(cfg.cluster, args.data, args.output)  # and storage, before them too
        from app.train.driver import train

        summary = train(cfg, args.data, args.output)
        print("\n".join(comparison(summary.metrics)))

    return cli.main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
