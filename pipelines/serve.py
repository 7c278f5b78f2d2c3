"""Real-time recommendations over HTTP: ``python -m pipelines.serve --model MODEL [--host H]
[--port P] ...``

MODEL is a model folder (or URI; the app follows its CURRENT version) or a registered MLflow
model: ``models:/name/N`` (fixed) or ``models:/name@alias`` (the app follows the alias; a full
run moves ``champion``). Deploys a Ray Serve app on the resolved Ray cluster (embedded by
default, --address or RAY_ADDRESS to join one) and serves until Ctrl-C or SIGTERM:

  POST /recommend  {"user_id": "42", "k": 20, "history": ["1", "50"], "exclude_rated": true}
  POST /score      {"pairs": [{"user_id": "42", "item_id": "1"}]}
  GET  /healthz, GET /version, and the API page at /docs

On a cluster, ``serve deploy serve_config.yaml`` starts the same app.
"""

from __future__ import annotations

import argparse
import sys

from app.core import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipelines.serve", __doc__, ["serve", "cluster"],
                        required="--model MODEL")
    parser.add_argument("--model", required=True,
                        help="model folder or URI, models:/name/N or models:/name@alias")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> None:
        from app.core import logs
        from app.core.config import config_from_args
        from app.core.preflight import check_serve

        cfg = config_from_args(args)  # a bad setting is refused before the heavy imports
        print(cfg.describe(), flush=True)
        check_serve(cfg.cluster, args.model)  # and storage, before them too
        from app.serve.http import run

        with logs.stage("serve"):
            run(cfg, args.model, say=lambda msg: logs.say("serve", msg))

    return cli.main(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
