"""Batch inference with one GPU per actor (``pytest -m gpu`` on a machine with GPUs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.core.config import load_config
from app.core.publish import current
from app.serve.batch import batch_inference
from tests.conftest import start_local_ray

pytestmark = pytest.mark.gpu


def test_gpu_actors_give_the_cpu_recommendations(trained, movielens_dir, tmp_path):
    import ray

    ray.shutdown()  # the session's Ray was started without GPUs
    start_local_ray(num_cpus=None)
    try:
        assert ray.cluster_resources().get("GPU", 0) >= 1
        out = {}
        for device in ("gpu", "cpu"):
            cfg = load_config(overrides={"workdir": str(trained["work"]), "top_k": 20,
                                         "inference_device": device})
            summary = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                                      str(tmp_path / device), verbose=False)
            assert summary.device == ("cuda" if device == "gpu" else "cpu")
            out[device] = pd.read_parquet(current(tmp_path / device)).sort_values(["userId", "rank"])
        assert len(out["gpu"]) == len(out["cpu"])
        assert np.allclose(out["gpu"]["score"], out["cpu"]["score"], atol=1e-3)
        same = (out["gpu"]["movieId"].to_numpy() == out["cpu"]["movieId"].to_numpy()).mean()
        assert same > 0.99  # ties may order differently on another device
    finally:
        ray.shutdown()
        start_local_ray()
