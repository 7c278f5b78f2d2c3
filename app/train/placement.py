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

On a cluster that autoscales (``cluster.yaml``'s worker types, Ray on Spark with fewer nodes
than its maximum), :func:`wait_for_placement` asks the autoscaler for the workers and waits for
the nodes (``--autoscale-timeout``) instead of refusing; a request that even the largest
cluster of its autoscaling config could not place still fails at once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from app.core.config import TrainConfig
from app.core.errors import ResourceError  # noqa: F401  (raised here, importable from here)


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


def autoscaler_config() -> Optional[dict[str, Any]]:
    """The connected cluster's autoscaling configuration, read where its autoscaler runs: on
    this machine (the head node, where ``ray job submit`` runs the driver; the Spark driver
    of Ray on Spark). None when no autoscaler of this cluster runs here: it cannot grow, or
    its limits are not known here."""
    import psutil
    import ray
    import yaml

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(c.endswith("monitor.py") for c in cmd[:3]):
            continue
        args = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        if args.get("gcs-address", "").rsplit(":", 1)[-1] != port \
                or not args.get("autoscaling-config"):
            continue
        try:
            with open(os.path.expanduser(args["autoscaling-config"])) as f:
                return yaml.safe_load(f)  # YAML or JSON
        except (OSError, yaml.YAMLError):
            return None
    return None


def largest_cluster(config: dict[str, Any], per_worker: dict[str, float]
                    ) -> list[dict[str, float]]:
    """Total resources of each node of the largest cluster an autoscaling configuration
    allows: the head, and each worker type up to its ``max_workers`` within the cluster's
    ``max_workers`` (the types that hold the most of these workers first)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    nodes = [dict(types[head].get("resources") or {})] if head in types else []
    budget = int(config.get("max_workers", 10 ** 6))
    workers = sorted(((n, t) for n, t in types.items() if n != head),
                     key=lambda nt: -_fits(nt[1].get("resources") or {}, per_worker))
    for _, t in workers:
        n = max(0, min(int(t.get("max_workers", 0)), budget))
        budget -= n
        nodes += [dict(t.get("resources") or {})] * n
    return nodes


def wait_for_placement(p: Placement, timeout: float, say: Any = print,
                       poll: float = 2.0) -> None:
    """Return once the cluster can place ``p``; on an autoscaling cluster, ask the autoscaler
    for the workers and wait up to ``timeout`` seconds for the nodes, with a progress line.

    Raises:
        ResourceError: at once when the cluster cannot grow and lacks the resources, or when
            even the largest cluster its autoscaler may build cannot place ``p``; after
            ``timeout`` when the nodes did not come.
    """
    from ray.autoscaler.sdk import request_resources

    try:
        return check_resources(p, cluster_nodes())
    except ResourceError:
        config = autoscaler_config() if timeout > 0 else None
        if config is None:
            raise
    largest = largest_cluster(config, p.resources_per_worker)
    try:
        check_resources(p, largest)
    except ResourceError as e:
        raise ResourceError(f"{e}; this cluster autoscales, but even at its largest "
                            f"({len(largest)} node(s), its autoscaling config) it cannot "
                            f"place them") from None
    request_resources(bundles=[dict(p.resources_per_worker)] * p.num_workers)
    say(f"waiting up to {timeout:.0f}s for the autoscaler to add nodes for {p.describe()}")
    t0 = time.monotonic()
    last_line = t0
    try:
        while True:
            time.sleep(max(0.0, min(poll, timeout - (time.monotonic() - t0))))
            nodes = cluster_nodes()
            try:
                check_resources(p, nodes)
                say(f"the cluster grew to {len(nodes)} node(s) in "
                    f"{time.monotonic() - t0:.0f}s")
                return
            except ResourceError as e:
                missing = e
            waited = time.monotonic() - t0
            if waited >= timeout:
                raise ResourceError(
                    f"the autoscaler did not add the nodes for {p.describe()} within "
                    f"{timeout:.0f}s ({missing}); check the cluster's pending and failed "
                    f"launches (`ray status` on the head node), or give --autoscale-timeout "
                    f"more time") from None
            if time.monotonic() - last_line >= 30:
                say(f"still waiting for nodes ({waited:.0f}s of {timeout:.0f}s): {missing}")
                last_line = time.monotonic()
    finally:
        request_resources(bundles=[])  # Ray Train's placement group holds the demand now
