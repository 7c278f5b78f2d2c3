"""Train the two-tower model: ``python -m pipelines.train --data DIR --output MODEL_DIR
[--topology cpu|snsg|snmg|mnmg] [--num-workers N] [--epochs N] [--embedding-dim D]
[--config FILE] [--resume] ...``"""

from __future__ import annotations

import argparse
import sys

from app.config import ConfigError, add_arguments, config_from_args
from app.dataset import DatasetError
from app.placement import ResourceError
from app.report import comparison
from app.train import TrainError, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset folder")
    parser.add_argument("--output", required=True, help="model folder to write")
    add_arguments(parser, sections=["model", "train", "cluster"])
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        print(cfg.describe(), flush=True)
        summary = train(cfg, args.data, args.output)
    except (ConfigError, DatasetError, ResourceError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(comparison(summary["metrics"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
