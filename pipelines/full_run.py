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
import copy
import json
import sys
import time
from typing import Any

from app.core import cli, logs
from app.core.cluster import init_ray
from app.core.config import Config, config_from_args, load_config
from app.core.publish import OutputError, current, version_uri, writer
from app.core.redact import redact, redact_values
from app.core.report import examples, plot_history, render
from app.core.storage import Location, resolve
from app.core.tracking import tracking_uri
from app.data.dataset import DatasetError, read_manifest
from app.data.prepare import prepare_dataset

STAGES = ("prepare", "train", "infer")

_VOLATILE = {"output", "overwrite"}  # settings that do not change what is prepared


def _prepared_with(data_dir: Location, cfg: Config) -> bool:
    """True when data_dir already holds a dataset prepared with the same data settings."""
    try:
        manifest = read_manifest(data_dir.uri)
    except (DatasetError, OutputError):
        return False
    want = {k: redact_values(v) for k, v in vars(cfg.data).items() if k not in _VOLATILE}
    have = {k: v for k, v in manifest.config.items() if k not in _VOLATILE}
    return want == have


def refit_config(cfg: Config, epochs: int) -> Config:
    """The evaluated run's configuration for a refit: exactly ``epochs`` epochs, no early
    stopping (there is no held-out split left to stop on)."""
    out = copy.deepcopy(cfg)
    out.train.epochs, out.train.patience, out.train.resume = max(1, int(epochs)), 0, False
    return out


def run(cfg: Config, stages: tuple[str, ...] = STAGES, *, tune: bool = False,
        refit: bool = True) -> dict[str, Any]:
    """Run the stages in order; returns the summary (also ``<workdir>/summary.json``).

    Args:
        cfg: the resolved configuration.
        stages: which of prepare, train, infer to run.
        tune: sweep first (``cfg.tune``) and train the model with the best trial's settings.
        refit: after the evaluated training run, train again on every accepted rating
            (train + val + test) for the evaluated run's best number of epochs; ``model/``,
            the registered model and the recommendations come from the refit, the held-out
            metrics from the evaluated run (its folder: ``model-heldout/``).
    """
    workdir = resolve(cfg.cluster.workdir)  # a local path or a URI (app.core.storage)
    # one full run per workdir at a time (each stage also holds its own output's lease)
    with writer(workdir, "full_run", timeout=cfg.cluster.lease_timeout,
                say=lambda msg: logs.say("run", msg)):
        return _run(cfg, workdir, stages, tune=tune, refit=refit)


def _run(cfg: Config, workdir: Location, stages: tuple[str, ...], *, tune: bool,
         refit: bool) -> dict[str, Any]:
    cfg.dump_yaml(workdir / "config.yaml")
    init_ray(cfg.cluster)
    summary: dict[str, Any] = {"workdir": str(workdir), "stages": {}}

    data_dir = resolve(cfg.data.output) if cfg.data.output else workdir / "data"
    with logs.stage("prepare"):
        t0 = time.perf_counter()
        if not cfg.data.overwrite and _prepared_with(data_dir, cfg):
            manifest = read_manifest(data_dir.uri)
            logs.say("prepare", f"reusing {data_dir} (prepared with the same data settings; "
                                f"--overwrite prepares it again)")
        else:
            # The workdir is this job's own: its dataset is replaced when the settings changed.
            # A dataset elsewhere (--output) is replaced only with --overwrite.
            cfg.data.overwrite = cfg.data.overwrite or \
                data_dir.uri.startswith(workdir.uri.rstrip("/") + "/")
            manifest = prepare_dataset(cfg.data, data_dir.uri,
                                       lease_timeout=cfg.cluster.lease_timeout)
    seconds = time.perf_counter() - t0
    summary["stages"]["prepare"] = {"seconds": round(seconds, 2),
                                    "rows": manifest.counts["read"],
                                    "counts": manifest.counts, "output": data_dir.uri}
    model_dir = workdir / "model"
    if tune:
        from app.tune import sweep

        t0 = time.perf_counter()
        swept = sweep(cfg, data_dir.uri, (workdir / "sweep").uri)
        summary["stages"]["tune"] = {"seconds": round(time.perf_counter() - t0, 2),
                                     "rows": len(swept["rows"]), "output": (workdir / "sweep").uri,
                                     "best": swept["best"]["params"],
                                     "best_metric": swept["best"]["metric"]}
        # the model is trained with the best trial's settings (the rest as configured)
        # (the saved file has credentials masked: the ones in use are carried over)
        cfg = load_config(swept["best_config"], {"workdir": cfg.cluster.workdir,
                                                 **cfg.credentials()})
    if "train" in stages:
        from app.train.driver import train

        t0 = time.perf_counter()
        evaluated_dir = workdir / "model-heldout" if refit else model_dir
        result = train(cfg, data_dir.uri, evaluated_dir.uri)
        epochs = result["metrics"]["epochs"]
        summary["stages"]["train"] = {"seconds": round(time.perf_counter() - t0, 2),
                                      "rows": result["training_rows"] * epochs,
                                      "output": evaluated_dir.uri,
                                      "metrics": result["metrics"], "mlflow": result["mlflow"]}
        if refit:
            best = result["metrics"]["best_epoch"]
            logs.say("refit", f"training on every split (train + val + test) for {best} "
                              f"epoch(s), the evaluated run's best; it is the model served")
            t0 = time.perf_counter()
            again = train(refit_config(cfg, best), data_dir.uri, model_dir.uri, refit=True,
                          tags={"evaluated_run_id": result["mlflow"]["run_id"]})
            summary["stages"]["refit"] = {"seconds": round(time.perf_counter() - t0, 2),
                                          "rows": again["training_rows"] * best,
                                          "training_rows": again["training_rows"],
                                          "epochs": best, "output": model_dir.uri,
                                          "mlflow": again["mlflow"]}
        served = (summary["stages"].get("refit") or summary["stages"]["train"])["mlflow"]
        if served.get("version") is not None:
            from app.core.tracking import PROMOTION_METRIC, promote

            test = result["metrics"].get("model", {}).get("test", {})
            summary["promotion"] = promote(cfg, served["version"], test.get(PROMOTION_METRIC),
                                           version_uri(data_dir.uri))
        summary["tracking_uri"] = redact(tracking_uri(cfg.cluster))
        summary["plot"] = (workdir / "val_metrics.png").uri
        plot_history(result["history"], (workdir / "val_metrics.png").uri,
                     [int(k) for k in cfg.train.eval_k])
    if "infer" in stages:
        from app.serve.batch import batch_inference

        recs = workdir / "recommendations"
        t0 = time.perf_counter()
        result = batch_inference(cfg, model_dir.uri, data_dir.uri, recs.uri)
        summary["stages"]["infer"] = {"seconds": round(time.perf_counter() - t0, 2),
                                      "rows": result.users, "output": recs.uri,
                                      "summary": result.to_dict()}
        summary["examples"] = examples(current(recs.uri))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(render(summary))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.full_run", __doc__)
    stages = parser.add_argument_group("stages")
    stages.add_argument("--tune", action="store_true",
                        help="run a hyperparameter sweep before training and train with the "
                             "best trial's settings (see pipelines.tune)")
    stages.add_argument("--no-refit", dest="refit", action="store_false",
                        help="serve the evaluated model (trained on the train split) instead "
                             "of refitting on every split for its best number of epochs")
    stages.add_argument("--stages", default=",".join(STAGES), type=_stages,
                        help=f"comma-separated stages to run, in order, among "
                             f"{', '.join(STAGES)} (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        cfg = config_from_args(args)
        print(cfg.describe(), flush=True)
        run(cfg, args.stages, tune=args.tune, refit=args.refit)

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
