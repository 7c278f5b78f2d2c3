"""Ray Train callbacks of a training run, in a module of their own: Ray Train's controller
unpickles them before it starts the workers, so whatever this module imports is on the path of
every run's start (the driver module would add torch, MLflow and the rest: 2.5 s)."""

from __future__ import annotations

import math
import time
from typing import Any

from ray.train import UserCallback


class EpochMetricsToMlflow(UserCallback):
    """Logs each epoch's metrics (rank 0's report) to the MLflow run, from Ray Train's
    controller, which runs on the driver's node: the workers never write to the tracking
    store, which may be a file only the driver's machine has (the default SQLite store)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        m = metrics[0] if metrics else {}
        if "epoch" not in m:
            return
        stamp = int(time.time() * 1000)
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=[
            Metric(k.replace("@", "_at_"), float(v), stamp, int(m["epoch"]))
            for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)])
