"""The main job: ``python -m pipelines.full_run [--config FILE] [--dataset ...] [--workdir DIR]``.

Runs the stages of the pipeline in order (prepare -> train -> infer) on the resolved Ray
cluster (an embedded local Ray by default) and writes everything under ``--workdir``:
``data/`` (the prepared dataset), ``model/`` (the model folder), ``recommendations/`` (top-K
per user, Parquet), ``config.yaml`` (the resolved configuration) and ``summary.json``; MLflow
records the training run and the registered model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from app.cluster import init_ray
from app.config import Config, ConfigError, add_arguments, config_from_args
from app.dataset import DatasetError, read_manifest
from app.export import ModelError
from app.placement import ResourceError
from app.prepare import prepare_dataset
from app.sources import DataError
from app.train import TrainError

STAGES = ("prepare", "train", "infer")

_VOLATILE = {"output", "overwrite"}  # settings that do not change what is prepared


def _prepared_with(data_dir: Path, cfg: Config) -> bool:
    """True when data_dir already holds a dataset prepared with the same data settings."""
    try:
        manifest = read_manifest(data_dir)
    except DatasetError:
        return False
    want = {k: v for k, v in vars(cfg.data).items() if k not in _VOLATILE}
    have = {k: v for k, v in manifest.get("config", {}).items() if k not in _VOLATILE}
    return want == have


def run(cfg: Config, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Run the stages in order; returns the summary (also ``<workdir>/summary.json``)."""
    workdir = Path(cfg.cluster.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg.dump_yaml(workdir / "config.yaml")
    init_ray(cfg.cluster)
    summary: dict[str, Any] = {"workdir": str(workdir), "stages": {}}

    data_dir = Path(cfg.data.output) if cfg.data.output else workdir / "data"
    t0 = time.perf_counter()
    if not cfg.data.overwrite and _prepared_with(data_dir, cfg):
        manifest = read_manifest(data_dir)
        print(f"[prepare] reusing {data_dir} (prepared with the same data settings; "
              f"--overwrite prepares it again)")
    else:
        # The workdir is this job's own: its dataset is replaced when the settings changed.
        # A dataset elsewhere (--output) is replaced only with --overwrite.
        cfg.data.overwrite = cfg.data.overwrite or workdir in data_dir.absolute().parents
        manifest = prepare_dataset(cfg.data, str(data_dir))
    seconds = time.perf_counter() - t0
    summary["stages"]["prepare"] = {"seconds": round(seconds, 2),
                                    "rows": manifest["counts"]["read"],
                                    "counts": manifest["counts"], "output": str(data_dir)}
    if "train" in stages:
        from app.train import train

        model_dir = workdir / "model"
        t0 = time.perf_counter()
        result = train(cfg, str(data_dir), str(model_dir))
        samples = manifest["counts"]["splits"]["train"] * cfg.train.epochs
        summary["stages"]["train"] = {"seconds": round(time.perf_counter() - t0, 2),
                                      "rows": samples, "output": str(model_dir),
                                      "metrics": result["metrics"], "mlflow": result["mlflow"]}
    if "infer" in stages:
        from app.inference import batch_inference

        recs = workdir / "recommendations"
        t0 = time.perf_counter()
        result = batch_inference(cfg, str(workdir / "model"), str(data_dir), str(recs))
        summary["stages"]["infer"] = {"seconds": round(time.perf_counter() - t0, 2),
                                      "rows": result["users"], "output": str(recs),
                                      "summary": result}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n" + "=" * 72)
    print(f"{'stage':<12}{'seconds':>10}{'rows':>14}{'rows/s':>14}")
    for name, st in summary["stages"].items():
        rate = st["rows"] / st["seconds"] if st["seconds"] else float("nan")
        print(f"{name:<12}{st['seconds']:>10.1f}{st['rows']:>14,}{rate:>14,.0f}")
    c = manifest["counts"]
    print(f"dataset   : {data_dir}  (train {c['splits']['train']:,} / val {c['splits']['val']:,}"
          f" / test {c['splits']['test']:,}; {c['rejected']:,} rejected)")
    if "train" in summary["stages"]:
        st = summary["stages"]["train"]
        m = st["metrics"]
        print(f"model     : {st['output']}")
        for k in ("recall@20", "ndcg@20"):
            print(f"  test {k:<10} model {m['model']['test'][k]:.4f}   popularity "
                  f"{m['popularity']['test'][k]:.4f}")
        print(f"mlflow    : run {st['mlflow']['run_id']}, {st['mlflow']['registered_uri']}")
    if "infer" in summary["stages"]:
        st = summary["stages"]["infer"]
        print(f"recommend : {st['output']}  ({st['summary']['users']:,} users x top "
              f"{st['summary']['k']})")
    print(f"summary   : {workdir / 'summary.json'}")
    print("=" * 72)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, in order (default: all of "
                             f"{','.join(STAGES)})")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)} "
                              f"(stages: {', '.join(STAGES)})")
        cfg = config_from_args(args)
        print(cfg.describe(), flush=True)
        run(cfg, stages)
    except (ConfigError, DataError, DatasetError, ModelError, ResourceError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
