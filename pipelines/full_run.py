"""The main job: ``python -m pipelines.full_run [--config FILE] [--dataset ...] [--workdir DIR]``.

Runs the stages of the pipeline in order (prepare -> [tune] -> train -> infer) on the resolved
Ray cluster (an embedded local Ray, a cluster through ``--address`` / ``ray job submit``, or
Ray on Databricks) and writes everything under ``--workdir``: ``data/`` (the prepared
dataset), ``sweep/`` (with ``--tune``), ``model/`` (the model folder), ``recommendations/``
(top-K per user, Parquet), ``val_metrics.png``, ``config.yaml`` (the resolved configuration)
and ``summary.json``; MLflow records the runs and the registered model. Ends with a report.
"""

from __future__ import annotations

import argparse
import sys

from app.core import cli
from app.core.config import config_from_args
from app.run import STAGES, run


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.full_run", __doc__)
    stages = parser.add_argument_group("stages")
    stages.add_argument("--tune", action="store_true",
                        help="run a hyperparameter sweep before training and train with the "
                             "best trial's settings (see pipelines.tune)")
    stages.add_argument("--no-refit", dest="refit", action="store_false",
                        help="serve the evaluated model (trained on the train split) instead "
                             "of refitting on every split for its best number of epochs")
    stages.add_argument("--refresh", metavar="MODEL",
                        help="refresh a trained model (models:/name@alias, models:/name/N, a "
                             "folder or URI) with the ratings of --input: the new dataset "
                             "keeps its ids' rows and adds new ids after them, training "
                             "starts from its weights with its model settings, and the gate "
                             "scores it beside the new model on the new test split")
    stages.add_argument("--stages", default=",".join(STAGES), type=_stages,
                        help=f"comma-separated stages to run, in order, among "
                             f"{', '.join(STAGES)} (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        cfg = config_from_args(args)
        print(cfg.describe(), flush=True)
        run(cfg, args.stages, tune=args.tune, refit=args.refit, refresh=args.refresh)

    return cli.main(parser, body, argv)


def _stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or '(none)'}; "
                                         f"stages: {', '.join(STAGES)}")
    return stages


if __name__ == "__main__":
    sys.exit(main())
