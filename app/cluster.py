"""Where Ray comes from, decided in one place.

In order: an existing cluster (``--address`` or ``RAY_ADDRESS``: a standalone cluster, or the
cluster a ``ray job submit`` runs in); Databricks (``--databricks``, or a Databricks runtime
detected from ``DATABRICKS_RUNTIME_VERSION``): Ray started on the Spark cluster's workers with
``ray.util.spark.setup_ray_cluster``; else an embedded local Ray bound to 127.0.0.1.

On Databricks, MLflow defaults to the workspace (tracking URI ``databricks``) and Unity
Catalog (registry URI ``databricks-uc``), and outputs belong on a Unity Catalog volume
(``--workdir /Volumes/<catalog>/<schema>/<volume>/...``), which every node sees. Credentials
(``DATABRICKS_HOST``, ``DATABRICKS_TOKEN``) come from the environment only; nothing here
prints or stores them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from app.config import ClusterConfig, ConfigError


def on_databricks(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a Databricks runtime (notebook, job or its driver)."""
    return bool(env.get("DATABRICKS_RUNTIME_VERSION"))


@dataclass(frozen=True)
class RaySetup:
    """How this process gets its Ray cluster (pure data, decided by :func:`plan`)."""

    kind: Literal["connected", "address", "databricks", "local"]
    address: Optional[str] = None
    spark_args: dict[str, Any] = field(default_factory=dict)
    local_args: dict[str, Any] = field(default_factory=dict)


def plan(cfg: ClusterConfig, env: Mapping[str, str] = os.environ,
         connected: bool = False) -> RaySetup:
    """Decide where Ray comes from (see the module docstring for the order).

    Raises:
        ConfigError: Databricks without a volume workdir, or both an address and Databricks.
    """
    if connected:
        return RaySetup("connected")
    address = cfg.address or env.get("RAY_ADDRESS")
    if address and cfg.databricks:
        raise ConfigError("--address and --databricks exclude each other: Ray on Databricks "
                          "is started on the Spark cluster")
    if address:
        return RaySetup("address", address=address)
    if cfg.databricks or on_databricks(env):
        if not str(cfg.workdir).startswith(("/Volumes/", "/dbfs/")):
            raise ConfigError(f"--workdir {cfg.workdir}: on Databricks, outputs must be on "
                              f"storage every node sees, e.g. "
                              f"--workdir /Volumes/<catalog>/<schema>/<volume>/twotower")
        spark = {"max_worker_nodes": cfg.spark_worker_nodes,
                 "min_worker_nodes": cfg.spark_worker_nodes,
                 "collect_log_to_path": f"{cfg.workdir}/ray_logs"}
        if cfg.spark_cpus_per_node is not None:
            spark["num_cpus_worker_node"] = cfg.spark_cpus_per_node
        if cfg.spark_gpus_per_node is not None:
            spark["num_gpus_worker_node"] = cfg.spark_gpus_per_node
        return RaySetup("databricks", spark_args=spark)
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs to
    # release the workers of a run whose driver was stopped (a Tune trial stopped early).
    return RaySetup("local", local_args={"num_cpus": cfg.num_cpus, "include_dashboard": True,
                                         "dashboard_host": "127.0.0.1",
                                         "_node_ip_address": "127.0.0.1"})


def mlflow_defaults(cfg: ClusterConfig, env: Mapping[str, str] = os.environ
                    ) -> tuple[Optional[str], Optional[str]]:
    """(tracking URI, registry URI) when the config leaves them unset: the workspace and Unity
    Catalog on Databricks, else None (the local store)."""
    if cfg.databricks or on_databricks(env):
        return (cfg.mlflow_tracking_uri or "databricks",
                cfg.mlflow_registry_uri or "databricks-uc")
    return cfg.mlflow_tracking_uri, cfg.mlflow_registry_uri


def init_ray(cfg: ClusterConfig) -> RaySetup:
    """Connect this process to its Ray cluster (starting one when needed); returns the plan.

    Does nothing when already connected (a second stage of the same job, or inside
    ``ray job submit``, where ``RAY_ADDRESS`` is set for the entrypoint).
    """
    import ray

    setup = plan(cfg, connected=ray.is_initialized())
    if setup.kind == "address":
        ray.init(address=setup.address, logging_level=logging.WARNING)
    elif setup.kind == "databricks":
        from ray.util.spark import setup_ray_cluster

        address, _ = setup_ray_cluster(**setup.spark_args)
        ray.init(address=address, logging_level=logging.WARNING)
    elif setup.kind == "local":
        ray.init(logging_level=logging.WARNING, **setup.local_args)
    return setup
