"""Where Ray comes from: an existing cluster (``--address``, ``RAY_ADDRESS``) or a local one."""

from __future__ import annotations

import logging
import os

import ray

from app.config import ClusterConfig


def init_ray(cfg: ClusterConfig) -> None:
    """Connect to the configured cluster, or start a local Ray bound to 127.0.0.1.

    Does nothing when this process is already connected (e.g. inside ``ray job submit``).
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING)
