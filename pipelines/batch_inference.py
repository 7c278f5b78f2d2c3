"""Batch inference: ``python -m pipelines.batch_inference --model MODEL --data DIR --output OUT
[--users all|PATH] [--history PATH] [--top-k K] [--pairs PATH] [--index exact|faiss] ...``

MODEL is a model folder or an MLflow model URI (``models:/name/version``, ``models:/name@alias``,
``runs:/<run id>/model``). OUT becomes a Parquet folder: ``userId, rank, movieId, score,
fallback, source`` (+ ``title``) per recommendation (source: ``model`` for a known user,
``history`` for a user recommended from ``--history``, ``popularity`` otherwise), or ``userId, movieId, score, prediction_prob,
predicted_class, known_user, known_item`` per pair with ``--pairs``.
"""

from __future__ import annotations

import argparse
import sys

from app.core import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.batch_inference", __doc__,
                        ["inference", "cluster"],
                        required="--model MODEL --data DIR --output DIR")
    parser.add_argument("--model", required=True, help="model folder or MLflow model URI")
    parser.add_argument("--data", required=True, help="the prepared dataset of the model")
    parser.add_argument("--output", required=True, help="Parquet folder to write")
    parser.add_argument("--users", default="all",
                        help="all (default) or a CSV/TSV/Parquet file with a userId column")
    parser.add_argument("--pairs", help="CSV/TSV/Parquet file with userId, movieId: score pairs")
    parser.add_argument("--history",
                        help="CSV/TSV/Parquet file with userId, movieId (and timestamp) rows: "
                             "users' recent items; new users get recommendations from them, a "
                             "known user's replace the stored ones")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        from app.core.config import config_from_args
        from app.core.preflight import check_infer

        cfg = config_from_args(args)  # a bad setting is refused before the heavy imports
        print(cfg.describe(), flush=True)
        check_infer(cfg.cluster, args.model, args.data, args.output, users=args.users,
                    pairs=args.pairs, history=args.history)  # and storage, before them too
        from app.serve.batch import batch_inference

        batch_inference(cfg, args.model, args.data, args.output, users=args.users,
                        pairs=args.pairs, history=args.history)

    return cli.main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
