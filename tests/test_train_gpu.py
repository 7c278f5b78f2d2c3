"""GPU-only paths: nccl, FBGEMM's CUDA kernels, TorchRec's sparse-dist train pipeline.
Run with ``pytest -m gpu`` on a machine with GPUs (setup installs fbgemm-gpu there)."""

from __future__ import annotations

import json

import pytest

from app.core.config import load_config
from tests.conftest import start_local_ray

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _train(tmp_path, movielens_dir, **overrides):
    from app.train.driver import train

    cfg = load_config(overrides={"epochs": 2, "workdir": str(tmp_path),
                                 "registered_model_name": "two-tower-gpu", **overrides})
    return train(cfg, str(movielens_dir), str(tmp_path / "model"), verbose=False)


def test_snsg_trains_on_one_gpu_with_fused_cuda_kernels(ray_gpu, movielens_dir, tmp_path):
    summary = _train(tmp_path, movielens_dir, topology="snsg")
    plan = json.loads((tmp_path / "model" / "sharding_plan.json").read_text())
    assert plan["device"] == "cuda" and plan["world_size"] == 1
    assert all(t["compute_kernel"] in ("fused", "dense") for t in plan["tables"])
    m = summary.metrics
    assert m["model"]["test"]["recall@20"] > m["popularity"]["test"]["recall@20"]
    assert "nccl" in summary.placement


def test_snmg_row_wise_sharding_over_all_gpus(ray_gpu, movielens_dir, tmp_path):
    n = _gpus()
    if n < 2:
        pytest.skip(f"snmg needs 2 GPUs, this machine has {n}")
    summary = _train(tmp_path, movielens_dir, topology="snmg", num_workers=n,
                     sharding="row_wise")
    plan = json.loads((tmp_path / "model" / "sharding_plan.json").read_text())
    assert plan["world_size"] == n
    assert {t["sharding_type"] for t in plan["tables"]} == {"row_wise"}
    assert summary.metrics["epochs"] == 2


def test_tables_over_a_small_gpu_budget_are_cached_from_host_memory(ray_gpu, movielens_dir,
                                                                      tmp_path):
    """--table-memory-gb below the item tables' size (2.2 MB each at dim 64): on one GPU they
    stay in host memory behind a GPU cache (FBGEMM's UVM caching kernel), and the model
    trains and ranks better than popularity."""
    summary = _train(tmp_path, movielens_dir, topology="snsg", table_memory_gb=0.002)
    plan = json.loads((tmp_path / "model" / "sharding_plan.json").read_text())
    tables = {t["table"]: t for t in plan["tables"]}
    for name in ("t_item_id", "t_user_history"):
        assert tables[name]["compute_kernel"] == "fused_uvm_caching", plan["tables"]
        assert tables[name]["sharding_type"] in ("row_wise", "table_row_wise")
    m = summary.metrics
    assert m["epochs"] == 2
    assert m["model"]["test"]["recall@20"] > m["popularity"]["test"]["recall@20"]


@pytest.fixture(scope="module")
def ray_gpu(ray_local):
    """The session's Ray cannot see GPUs (num_cpus=2 only); restart it with the GPUs."""
    import ray

    ray.shutdown()
    start_local_ray(num_cpus=None)
    yield
    ray.shutdown()
    start_local_ray()
