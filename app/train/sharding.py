"""Sharding the two-tower model over the ranks with TorchRec's planner, and one training step.

The tables are built on the meta device, planned by ``EmbeddingShardingPlanner`` under
per-table constraints (:func:`sharding_constraints`) and a per-worker memory budget
(:func:`worker_budget`, ``--table-memory-gb``), and materialised by
``DistributedModelParallel``; the table optimizer (row-wise Adagrad) runs inside the backward
kernels, Adam updates the dense layers.

A table larger than one worker's budget is split by rows over the ranks (``row_wise`` /
``table_row_wise``), on CPU workers (gloo) too: TorchRec lists the row-wise types for GPUs only,
but its CPU kernels and gloo's collectives (all_to_all, reduce_scatter) run them; the sharded
lookups match an unsharded table's. On GPU workers a table larger than the GPU's budget may also
stay in host memory behind a GPU cache (FBGEMM's UVM caching kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from app.core.config import TrainConfig
from app.core.errors import ResourceError
from app.train.model import TABLES, ModelSpec, TwoTower
from app.train.objectives import TwoTowerTrainTask, log_sampling_probability
from app.train.placement import Placement

GB = 1024 ** 3
# the planner keeps this share of each worker's budget for the dense layers and activations
RESERVED = 0.15
# --table-memory-gb 0 on CPU workers: this share of the host's memory over its workers. Ray
# keeps 30% of a node's memory for its object store, and the rest of a training group (data
# stream, batches, evaluation, EASE on the driver) peaked at 7.9 GB of 23 GB at 1M rows with
# tables of a few MB, so a third is what tables can take without starving either.
AUTO_HOST_SHARE = 1 / 3
ROW_WISE = ["row_wise", "table_row_wise"]
GPU_KERNELS = ["fused", "fused_uvm_caching"]  # in GPU memory; in host memory behind a GPU cache


@dataclass(frozen=True)
class TableBudget:
    """Memory of one worker the planner may fill with embedding tables, in bytes.

    ``hbm`` is GPU memory (0 on CPU workers), ``ddr`` host memory. On a GPU worker a table
    lives in GPU memory, or in host memory with a cache in GPU memory (UVM caching).
    """

    hbm: int
    ddr: int
    on_gpu: bool

    def per_table(self) -> float:
        """Bytes one table may take on one worker without being split (after the reserve)."""
        return (self.hbm if self.on_gpu else self.ddr) * (1 - RESERVED)

    def total(self) -> float:
        """Bytes all of one worker's table shards may take (after the reserve)."""
        return (self.hbm + self.ddr if self.on_gpu else self.ddr) * (1 - RESERVED)

    def describe(self) -> str:
        if self.on_gpu:
            return f"{_size(self.hbm)} GPU + {_size(self.ddr)} host memory"
        return _size(self.ddr)


def table_bytes(rows: int, dim: int) -> int:
    """A float32 table and its row-wise Adagrad state (one float per row)."""
    return rows * dim * 4 + rows * 4


def table_sizes(spec: ModelSpec) -> dict[str, int]:
    """Table name -> bytes, for the tables the model uses."""
    return {TABLES[f]: table_bytes(rows, spec.embedding_dim)
            for f, rows in spec.table_rows().items()}


def _size(n: float) -> str:
    if n >= GB / 10:
        return f"{n / GB:.2f} GB"
    return f"{n / 2 ** 20:.1f} MB" if n >= 2 ** 20 / 10 else f"{n / 1024:.0f} KB"


def host_memory() -> int:
    """This host's memory in bytes, or its container's limit when lower (cgroup v2 or v1):
    inside a container psutil reports the whole machine's."""
    import psutil

    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def worker_budget(table_memory_gb: float, device: torch.device,
                  local_world_size: int) -> TableBudget:
    """This worker's table budget: ``--table-memory-gb`` (GPU memory on GPU workers), or with 0
    a third of the host's memory over its workers on CPU and the GPU's memory on GPU."""
    host = int(host_memory() * AUTO_HOST_SHARE / max(1, local_world_size))
    explicit = int(table_memory_gb * GB)
    if device.type == "cuda":
        hbm = explicit or torch.cuda.get_device_properties(device).total_memory
        return TableBudget(hbm=hbm, ddr=host, on_gpu=True)
    return TableBudget(hbm=0, ddr=explicit or host, on_gpu=False)


def smallest_budget(budget: TableBudget, device: torch.device) -> TableBudget:
    """The smallest budget over the ranks (a collective call): the planner gives every rank
    the same capacity, and every rank must take the same decisions from it."""
    caps = torch.tensor([budget.hbm, budget.ddr], dtype=torch.int64, device=device)
    dist.all_reduce(caps, op=dist.ReduceOp.MIN)
    return TableBudget(hbm=int(caps[0]), ddr=int(caps[1]), on_gpu=budget.on_gpu)


def too_big(spec: ModelSpec, budget: TableBudget, world_size: int, planner: str = "") -> str:
    """The one line that says the tables do not fit the workers' budget; ``planner``: the
    planner's reason, when the total fits but no split of the tables does."""
    sizes = table_sizes(spec)
    listed = ", ".join(f"{name.removeprefix('t_')} {_size(b)}" for name, b in
                       sorted(sizes.items(), key=lambda kv: -kv[1]))
    held = (f"hold {_size(world_size * budget.total())} in all but no split of the tables fits "
            f"each worker (the planner: {planner})" if planner
            else f"hold {_size(world_size * budget.total())}")
    return (f"the embedding tables need {_size(sum(sizes.values()))} ({listed}; weights and "
            f"row-wise Adagrad state) but {world_size} worker(s) x {budget.describe()} "
            f"(--table-memory-gb; {RESERVED:.0%} of it is kept for the dense layers) {held}: "
            f"raise --table-memory-gb, add workers or lower --embedding-dim")


def check_tables_fit(spec: ModelSpec, budget: TableBudget, world_size: int) -> None:
    """Fail at once, with the table sizes and the budget, when the tables cannot fit the
    workers' budget together (the planner gives a long report that does not name them)."""
    if sum(table_sizes(spec).values()) > world_size * budget.total():
        raise ResourceError(too_big(spec, budget, world_size))


def check_requested_budget(train: TrainConfig, spec: ModelSpec, place: Placement) -> None:
    """On the driver, before any worker starts: an explicit ``--table-memory-gb`` for CPU
    workers that cannot hold the tables fails at once. (The automatic budget, and a GPU
    worker's host memory, are known on the workers only: they check those before planning.)"""
    if train.table_memory_gb and not place.use_gpu:
        check_tables_fit(spec, TableBudget(hbm=0, ddr=int(train.table_memory_gb * GB),
                                           on_gpu=False), place.num_workers)


def sharding_constraints(train: TrainConfig, spec: ModelSpec, on_gpu: bool,
                         budget: Optional[TableBudget] = None) -> dict[str, Any]:
    """Planner constraints per table.

    ``auto`` allows table_wise and column_wise for the id tables (and row-wise types on GPU)
    and lets a small genre or year table be replicated; a table larger than one worker's
    budget may only be split by rows, so that each rank holds a share of its rows whatever the
    number of ranks (column-wise pieces are bounded by the embedding dimension). An explicit
    ``--sharding`` applies to every table. On GPU the tables may be fused in GPU memory or
    kept in host memory behind a GPU cache.
    """
    from torchrec.distributed.planner.types import ParameterConstraints

    kernels = GPU_KERNELS if on_gpu else None
    sizes = table_sizes(spec)
    out = {}
    for f in spec.table_rows():
        name = TABLES[f]
        if train.sharding != "auto":
            types = [train.sharding]
        elif budget is not None and sizes[name] > budget.per_table():
            types = list(ROW_WISE)
        else:
            types = ["table_wise", "column_wise"] + (list(ROW_WISE) if on_gpu else [])
            if f in ("item_genres", "item_year"):  # a few hundred rows: may be replicated
                types.append("data_parallel")
        out[name] = ParameterConstraints(
            sharding_types=types,
            compute_kernels=(kernels + (["dense"] if "data_parallel" in types else []))
            if kernels else None)
    return out


def _sharder() -> Any:
    """TorchRec's ``EmbeddingBagCollection`` sharder, with the row-wise types offered on CPU.

    TorchRec lists row_wise and table_row_wise for GPU devices only, yet on CPU with gloo
    (torch 2.14: all_to_all and reduce_scatter) they run, and the pooled lookups of a table
    split by rows over 2 ranks equal the unsharded table's (checked to 3e-8)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class Sharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = super().sharding_types(compute_device_type)
            if compute_device_type == "cpu":
                types += [t for t in ROW_WISE if t not in types]
            return types

    return Sharder()


def plan_tables(task: Any, train: TrainConfig, spec: ModelSpec, budget: TableBudget, *,
                world_size: int, local_world_size: int, device_type: str,
                sharder: Any = None, collective: bool = True) -> Any:
    """The sharding plan of ``task`` for ``world_size`` ranks under ``budget`` per rank.

    With ``collective`` rank 0 plans and broadcasts the plan, or the planner's error, so that
    every rank fails alike (TorchRec's ``collective_plan`` would leave the other ranks waiting
    for a plan that never comes); without it this process plans alone (no process group).

    Raises:
        ResourceError: the tables do not fit the budget (one line with the sizes).
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import (KernelConfig, PlannerError, TopologyFactory,
                                                    TrainerConfig)

    check_tables_fit(spec, budget, world_size)
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local_world_size,
                      hbm_cap_bytes=budget.hbm if budget.on_gpu else None,
                      ddr_cap_bytes=budget.ddr),
        kernel_config=KernelConfig(compute_device=device_type))
    # an explicit reservation (TorchRec's default heuristic is deprecated, with a warning)
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=sharding_constraints(train, spec, device_type == "cuda", budget),
        storage_reservation=FixedPercentageStorageReservation(RESERVED))
    result: list[Any] = [None]
    if not collective or dist.get_rank() == 0:
        try:
            result[0] = planner.plan(task, [sharder or _sharder()])
        except PlannerError as e:
            first = str(e).strip().splitlines()[0].strip() if str(e).strip() else repr(e)
            result[0] = too_big(spec, budget, world_size, planner=first.rstrip("."))
    if collective:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], str):
        raise ResourceError(result[0])
    return result[0]


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
                  device: torch.device, local_world_size: int, lr_scale: float = 1.0
                  ) -> tuple[Any, Any, Any]:
    """The sharded train task on this rank (call on every rank of an initialised process
    group): tables built on meta, planned by TorchRec's planner under the smallest worker's
    table budget (``--table-memory-gb``), materialised by ``DistributedModelParallel``; fused
    row-wise Adagrad for the tables, Adam for the rest, at ``lr_scale`` times their learning
    rates (a warm start's ``--warm-lr-scale``).

    Raises:
        ResourceError: the tables do not fit the workers' budget (on every rank alike).

    Returns:
        (DistributedModelParallel of a TwoTowerTrainTask, its combined optimizer, the plan).
    """
    from torchrec.distributed import DistributedModelParallel
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
                                {"lr": train.embedding_lr * lr_scale})
    budget = smallest_budget(worker_budget(train.table_memory_gb, device, local_world_size),
                             device)
    sharder = _sharder()
    plan = plan_tables(task, train, spec, budget, world_size=dist.get_world_size(),
                       local_world_size=local_world_size, device_type=device.type,
                       sharder=sharder)
    dmp = DistributedModelParallel(task, device=device, plan=plan, sharders=[sharder])
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda ps: torch.optim.Adam(ps, lr=train.dense_lr * lr_scale))
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
