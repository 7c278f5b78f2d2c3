"""Sharding the two-tower model over the ranks with TorchRec's planner, and one training step.

The tables are built on the meta device, planned by ``EmbeddingShardingPlanner`` under
per-table constraints (:func:`sharding_constraints`) and materialised by
``DistributedModelParallel``; the table optimizer (row-wise Adagrad) runs inside the backward
kernels, Adam updates the dense layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from app.core.config import TrainConfig
from app.train.model import TABLES, ModelSpec, TwoTower
from app.train.objectives import TwoTowerTrainTask, log_sampling_probability


def sharding_constraints(train: TrainConfig, spec: ModelSpec, on_gpu: bool) -> dict[str, Any]:
    """Planner constraints per table: ``auto`` allows the model-parallel types the device
    supports for the id tables (row-wise types need a GPU) and lets a small genre table be
    replicated; an explicit ``--sharding`` applies to every table."""
    from torchrec.distributed.planner.types import ParameterConstraints

    if train.sharding != "auto":
        types = [train.sharding]
        return {TABLES[f]: ParameterConstraints(sharding_types=types) for f in spec.table_rows()}
    model_parallel = ["table_wise", "column_wise"] + (["row_wise", "table_row_wise"]
                                                      if on_gpu else [])
    small = ("item_genres", "item_year")  # a few hundred rows: may be replicated
    return {TABLES[f]: ParameterConstraints(
        sharding_types=model_parallel + (["data_parallel"] if f in small else []))
        for f in spec.table_rows()}


def plan_rows(plan: Any) -> list[dict[str, Any]]:
    """A TorchRec ``ShardingPlan`` as JSON-able rows: one per table, with its shards."""
    rows = []
    for module, params in plan.plan.items():
        for table, ps in params.items():
            shards = []
            if ps.sharding_spec is not None:
                shards = [{"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                           "placement": str(s.placement)} for s in ps.sharding_spec.shards]
            rows.append({"module": module, "table": table, "sharding_type": ps.sharding_type,
                         "compute_kernel": ps.compute_kernel, "ranks": list(ps.ranks or []),
                         "shards": shards})
    return rows


def build_sharded(train: TrainConfig, spec: ModelSpec, positive_counts: np.ndarray, *,
                  device: torch.device, local_world_size: int) -> tuple[Any, Any, Any]:
    """The sharded train task on this rank (call on every rank of an initialised process
    group): tables built on meta, planned by TorchRec's planner, materialised by
    ``DistributedModelParallel``; fused row-wise Adagrad for the tables, Adam for the rest.

    Returns:
        (DistributedModelParallel of a TwoTowerTrainTask, its combined optimizer, the plan).
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    model = TwoTower(spec, table_device=torch.device("meta"), device=device)
    task = TwoTowerTrainTask(model, log_q=log_sampling_probability(positive_counts).to(device))
    # the table optimizer runs inside the backward kernels (no dense gradient of a table)
    apply_optimizer_in_backward(RowWiseAdagrad,
                                list(model.query.ebc.parameters())
                                + list(model.candidate.ebc.parameters()),
                                {"lr": train.embedding_lr})
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=dist.get_world_size(), local_world_size=local_world_size),
        kernel_config=KernelConfig(compute_device=device.type))
    # an explicit reservation (TorchRec's default heuristic is deprecated, with a warning)
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=sharding_constraints(train, spec, device.type == "cuda"),
        storage_reservation=FixedPercentageStorageReservation(0.15))
    plan = planner.collective_plan(task, [EmbeddingBagCollectionSharder()],
                                   dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(task, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda ps: torch.optim.Adam(ps, lr=train.dense_lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), plan


def plan_summary(plan: Any) -> str:
    """One line for a sharding plan: each table's sharding type and ranks."""
    parts = []
    for module in plan.plan.values():
        for name, ps in module.items():
            parts.append(f"{name.removeprefix('t_')} {ps.sharding_type} "
                         f"{sorted(set(ps.ranks or []))}")
    return "; ".join(parts)


def train_step(dmp: Any, optimizer: Any, batch: Any) -> torch.Tensor:
    """One step of the plain (CPU) loop: forward, backward (tables update in it), dense step."""
    loss, _ = dmp(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
