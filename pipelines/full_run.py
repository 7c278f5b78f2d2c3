"""The main job: ``python -m pipelines.full_run [--config FILE] [--dataset ...] [--workdir DIR]``.

Runs the stages of the pipeline in order on the resolved Ray cluster (an embedded local Ray by
default) and writes everything under ``--workdir``: ``data/`` (the prepared dataset),
``config.yaml`` (the resolved configuration) and ``summary.json``.
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
from app.prepare import prepare_dataset
from app.sources import DataError

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


def run(cfg: Config) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to ``<workdir>/summary.json``)."""
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
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n" + "=" * 72)
    print(f"{'stage':<12}{'seconds':>10}{'rows':>14}{'rows/s':>14}")
    for name, st in summary["stages"].items():
        rate = st["rows"] / st["seconds"] if st["seconds"] else float("nan")
        print(f"{name:<12}{st['seconds']:>10.1f}{st['rows']:>14,}{rate:>14,.0f}")
    c = manifest["counts"]
    print(f"dataset   : {data_dir}  (train {c['splits']['train']:,} / val {c['splits']['val']:,}"
          f" / test {c['splits']['test']:,}; {c['rejected']:,} rejected)")
    print(f"summary   : {workdir / 'summary.json'}")
    print("=" * 72)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        print(cfg.describe(), flush=True)
        run(cfg)
    except (ConfigError, DataError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
