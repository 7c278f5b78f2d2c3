"""Topologies -> Ray Train worker placement, and a check that the cluster can provide it.

==========  ==============================  ===============  ==================
topology    workers                         per worker       placement strategy
==========  ==============================  ===============  ==================
``cpu``     ``--num-workers`` CPU workers   CPUs             PACK
``snsg``    1                               1 GPU            PACK
``snmg``    ``--num-workers`` (GPUs)        1 GPU            STRICT_PACK (1 node)
``mnmg``    ``--num-workers`` (GPUs)        1 GPU            SPREAD (over nodes)
==========  ==============================  ===============  ==================

``--accelerator cpu`` keeps the placement of snsg/snmg/mnmg but asks for CPUs instead of
GPUs (gloo instead of nccl): the way to exercise a GPU topology on a machine without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from app.config import TrainConfig


class ResourceError(RuntimeError):
    """The cluster cannot place the requested workers."""


@dataclass(frozen=True)
class Placement:
    topology: str
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    strategy: str

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    def scaling_config(self) -> Any:
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker=dict(self.resources_per_worker),
                             placement_strategy=self.strategy)

    def describe(self) -> str:
        res = ", ".join(f"{v:g} {k}" for k, v in self.resources_per_worker.items())
        return (f"{self.topology}: {self.num_workers} worker(s) x ({res}), {self.strategy}, "
                f"{self.backend}")


def placement(cfg: TrainConfig) -> Placement:
    """The worker placement a topology asks for (pure)."""
    gpu = cfg.topology != "cpu" and cfg.accelerator == "gpu"
    per_worker: dict[str, float] = {"CPU": float(cfg.cpus_per_worker)}
    if gpu:
        per_worker["GPU"] = 1.0
    workers = 1 if cfg.topology == "snsg" else cfg.num_workers
    strategy = {"cpu": "PACK", "snsg": "PACK", "snmg": "STRICT_PACK", "mnmg": "SPREAD"}
    return Placement(cfg.topology, workers, gpu, per_worker, strategy[cfg.topology])


def _fits(node: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many workers fit on a node of the given total resources."""
    return int(min(node.get(k, 0.0) // v for k, v in per_worker.items() if v > 0))


def check_resources(p: Placement, nodes: Iterable[dict[str, float]]) -> None:
    """Raise :class:`ResourceError`, saying what is missing, if the placement cannot fit.

    Args:
        p: the placement.
        nodes: total resources of each alive node (``ray.nodes()[i]["Resources"]``).
    """
    nodes = list(nodes)
    fits = [_fits(n, p.resources_per_worker) for n in nodes]
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    have = f"the cluster has {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
    need = p.describe()
    if p.use_gpu and gpus == 0:
        raise ResourceError(f"topology {need} needs GPUs, but {have}; use --topology cpu, "
                            f"or --accelerator cpu to place the same topology on CPU workers")
    if p.strategy == "STRICT_PACK" and max(fits, default=0) < p.num_workers:
        raise ResourceError(f"topology {need} needs {p.num_workers} workers on one node, but "
                            f"at most {max(fits, default=0)} fit on any node ({have})")
    if p.strategy == "SPREAD" and p.num_workers > 1 and sum(f > 0 for f in fits) < 2:
        raise ResourceError(f"topology {need} spreads workers over several nodes, but only "
                            f"{sum(f > 0 for f in fits)} node(s) can hold one ({have}); "
                            f"use --topology snmg on a single node")
    if sum(fits) < p.num_workers:
        raise ResourceError(f"topology {need} needs {p.num_workers} workers, but only "
                            f"{sum(fits)} fit ({have})")


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
