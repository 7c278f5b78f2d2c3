"""Sharding under a per-worker memory budget (``--table-memory-gb``): a table larger than one
worker's budget is split by rows over the workers, on CPU workers (gloo) too, and tables that
cannot fit fail before training with one line naming their sizes and the budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.config import load_config
from app.core.errors import ResourceError
from app.train.model import ModelSpec, TwoTower
from app.train.placement import placement
from app.train.sharding import (
    GB,
    ROW_WISE,
    TableBudget,
    check_requested_budget,
    check_tables_fit,
    host_memory,
    plan_rows,
    plan_tables,
    sharding_constraints,
    table_sizes,
    worker_budget,
)

# a user table of 2.5 MB (20,001 x 32 float32 + one Adagrad float per row), items 0.25 MB
SPEC = ModelSpec(num_users=20_001, num_items=2_001, num_genres=0, embedding_dim=32,
                 tower_layers=(32,), negatives="in_batch")
USER_MB = table_sizes(SPEC)["t_user_id"] / 2 ** 20
SMALL_GB = 0.002  # 2 MB per worker: less than the user table, more than half of it


def _budget(gb: float) -> TableBudget:
    return TableBudget(hbm=0, ddr=int(gb * GB), on_gpu=False)


def _plan(gb: float, **overrides):
    train = load_config(overrides={"table_memory_gb": gb, **overrides}).train
    return plan_tables(TwoTower(SPEC, table_device=torch.device("meta")), train, SPEC,
                       _budget(gb), world_size=2, local_world_size=2, device_type="cpu",
                       collective=False)


def _tables(plan) -> dict[str, dict]:
    return {r["table"]: r for r in plan_rows(plan)}


def test_only_a_table_larger_than_a_worker_budget_is_limited_to_row_wise():
    train = load_config().train
    today = sharding_constraints(train, SPEC, on_gpu=False)
    roomy = sharding_constraints(train, SPEC, on_gpu=False, budget=_budget(1.0))
    tight = sharding_constraints(train, SPEC, on_gpu=False, budget=_budget(SMALL_GB))
    assert today["t_user_id"].sharding_types == ["table_wise", "column_wise"]
    assert roomy["t_user_id"].sharding_types == today["t_user_id"].sharding_types
    assert tight["t_user_id"].sharding_types == ROW_WISE
    assert tight["t_item_id"].sharding_types == today["t_item_id"].sharding_types
    # an explicit --sharding still applies to every table
    explicit = load_config(overrides={"sharding": "column_wise"}).train
    assert sharding_constraints(explicit, SPEC, on_gpu=False, budget=_budget(SMALL_GB))[
        "t_user_id"].sharding_types == ["column_wise"]


def test_gpu_tables_may_stay_in_host_memory_behind_a_gpu_cache():
    c = sharding_constraints(load_config().train, SPEC, on_gpu=True,
                             budget=TableBudget(hbm=int(SMALL_GB * GB), ddr=GB, on_gpu=True))
    assert c["t_user_id"].sharding_types == ROW_WISE
    assert c["t_user_id"].compute_kernels == ["fused", "fused_uvm_caching"]
    assert "row_wise" in c["t_item_id"].sharding_types  # as before on GPU


def test_the_planner_splits_the_table_over_budget_by_rows_on_cpu():
    tables = _tables(_plan(SMALL_GB))
    user = tables["t_user_id"]
    assert user["sharding_type"] in ROW_WISE and sorted(set(user["ranks"])) == [0, 1]
    rows = [s["sizes"][0] for s in user["shards"]]
    assert sum(rows) == SPEC.num_users and max(rows) - min(rows) <= 1
    # with room the plan is today's: each table whole on one rank
    roomy = _tables(_plan(1.0))
    assert {t["sharding_type"] for t in roomy.values()} == {"table_wise"}


def test_on_gpu_the_planner_caches_a_table_over_budget_from_host_memory():
    """The planner needs no GPU: for one GPU with 2 MB the user table (2.5 MB) is kept in host
    memory behind a GPU cache; with room every table is fused in GPU memory."""
    task = TwoTower(SPEC, table_device=torch.device("meta"))

    def plan(hbm_gb: float) -> dict[str, dict]:
        train = load_config(overrides={"table_memory_gb": hbm_gb}).train
        return _tables(plan_tables(task, train, SPEC, TableBudget(hbm=int(hbm_gb * GB), ddr=GB,
                                                                  on_gpu=True),
                                   world_size=1, local_world_size=1, device_type="cuda",
                                   collective=False))

    assert plan(SMALL_GB)["t_user_id"]["compute_kernel"] == "fused_uvm_caching"
    assert {t["compute_kernel"] for t in plan(1.0).values()} == {"fused"}


def test_tables_that_cannot_fit_fail_with_their_sizes_and_the_budget():
    with pytest.raises(ResourceError) as e:
        check_tables_fit(SPEC, _budget(0.001), world_size=2)
    line = str(e.value)
    assert "\n" not in line and f"user_id {USER_MB:.1f} MB" in line
    assert "2 worker(s) x 1.0 MB" in line and "--table-memory-gb" in line
    check_tables_fit(SPEC, _budget(SMALL_GB), world_size=2)  # fits: nothing raised
    # the total fits, no split does: the planner's refusal becomes the same kind of line
    with pytest.raises(ResourceError) as e:
        _plan(0.0016)
    assert "\n" not in str(e.value) and "no split of the tables fits" in str(e.value)
    assert f"user_id {USER_MB:.1f} MB" in str(e.value)


def test_the_driver_refuses_an_explicit_budget_before_any_worker_starts():
    tight = load_config(overrides={"table_memory_gb": 0.001, "num_workers": 2}).train
    with pytest.raises(ResourceError, match="1.0 MB"):
        check_requested_budget(tight, SPEC, placement(tight))
    auto = load_config(overrides={"num_workers": 2}).train  # known on the workers only
    check_requested_budget(auto, SPEC, placement(auto))


def test_the_automatic_budget_is_a_third_of_the_host_over_its_workers():
    auto = worker_budget(0.0, torch.device("cpu"), local_world_size=2)
    assert auto.hbm == 0 and not auto.on_gpu
    assert auto.ddr == int(host_memory() / 3 / 2)
    assert worker_budget(0.5, torch.device("cpu"), local_world_size=2).ddr == GB // 2


def _row_wise_worker(config: dict) -> None:
    """Ray Train worker: the sharded model under a 2 MB budget (at half the learning rates, as
    a warm start's ``--warm-lr-scale 0.5``), its local user-table rows and a few training steps
    on one batch."""
    import ray.train

    from app.train.batches import BatchMaker
    from app.train.sharding import build_sharded, plan_rows, train_step

    ctx = ray.train.get_context()
    torch.manual_seed(0)
    cfg = load_config(overrides={"table_memory_gb": config["gb"]})
    dmp, optimizer, plan = build_sharded(cfg.train, SPEC, np.ones(SPEC.num_items),
                                         device=torch.device("cpu"),
                                         local_world_size=ctx.get_local_world_size(),
                                         lr_scale=0.5)
    weight = next(v for k, v in dmp.state_dict().items() if k.endswith("t_user_id.weight"))
    shards = [{"offsets": list(s.metadata.shard_offsets), "shape": list(s.tensor.shape)}
              for s in weight.local_shards()]
    rng = np.random.default_rng(ctx.get_world_rank())
    n = 256
    batch = BatchMaker(SPEC)({"user": rng.integers(1, SPEC.num_users, n),
                              "item": rng.integers(1, SPEC.num_items, n),
                              "label": np.ones(n, np.float32)}, train=True)
    dmp.train()
    losses = [float(train_step(dmp, optimizer, batch).detach()) for _ in range(5)]
    Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(
        {"shards": shards, "losses": losses, "plan": plan_rows(plan),
         "lrs": sorted({g["lr"] for g in optimizer.param_groups})}))


@pytest.mark.slow  # a Ray Train worker group that trains
def test_two_cpu_workers_each_hold_half_the_rows_of_a_table_over_budget(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from app.train.rendezvous import torch_config

    out = tmp_path / "ranks"
    out.mkdir()
    TorchTrainer(_row_wise_worker, train_loop_config={"gb": SMALL_GB, "out": str(out)},
                 torch_config=torch_config("gloo"),
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(storage_path=str(tmp_path / "runs"))).fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    user = {r["table"]: r for r in ranks[0]["plan"]}["t_user_id"]
    assert user["sharding_type"] in ROW_WISE and sorted(set(user["ranks"])) == [0, 1]
    # the materialised shards: each rank holds about half of the rows, all columns
    local = [r["shards"] for r in ranks]
    assert all(len(s) == 1 and s[0]["shape"][1] == SPEC.embedding_dim for s in local)
    rows = [s[0]["shape"][0] for s in local]
    assert sum(rows) == SPEC.num_users and abs(rows[0] - rows[1]) <= 1
    (start0, rows0), (start1, _) = sorted((s[0]["offsets"][0], s[0]["shape"][0]) for s in local)
    assert start0 == 0 and start1 == rows0  # together every row once
    for r in ranks:
        assert all(math.isfinite(x) for x in r["losses"]), r["losses"]
        assert r["losses"][-1] < r["losses"][0], r["losses"]  # the steps learn
        # both optimizers (fused row-wise Adagrad, Adam) at the scaled rates
        cfg = load_config()
        assert r["lrs"] == pytest.approx(sorted([cfg.train.dense_lr / 2,
                                                 cfg.train.embedding_lr / 2])), r["lrs"]


@pytest.mark.slow  # trains
def test_a_row_wise_model_trains_and_exports_on_cpu_workers(ray_local, movielens_dir, tmp_path):
    """Every table split by rows over 2 gloo workers: training, evaluation, checkpoints and the
    export all read the row shards (the plain-torch export ranks as the sharded model did)."""
    from app.train.driver import train
    from tests.conftest import exported_recall

    cfg = load_config(overrides={"epochs": 2, "sharding": "row_wise", "workdir": str(tmp_path),
                                 "registered_model_name": "two-tower-row-wise"})
    summary = train(cfg, str(movielens_dir), str(tmp_path / "model"), verbose=False)
    model_dir = Path(summary.model_dir)
    plan = json.loads((model_dir / "sharding_plan.json").read_text())
    assert {t["sharding_type"] for t in plan["tables"]} == {"row_wise"}
    assert all(sorted(set(t["ranks"])) == [0, 1] for t in plan["tables"])
    history = json.loads((model_dir / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    want = json.loads((model_dir / "metrics.json").read_text())["model"]["test"]["recall@20"]
    assert want > 0 and exported_recall(model_dir, movielens_dir, "test") == pytest.approx(
        want, abs=2e-3)
