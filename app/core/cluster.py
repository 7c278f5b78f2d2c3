"""Where Ray comes from, decided in one place.

In order: an existing cluster (``--address`` or ``RAY_ADDRESS``: a standalone cluster, or the
cluster a ``ray job submit`` runs in); Databricks (``--databricks``, or a Databricks runtime
detected from ``DATABRICKS_RUNTIME_VERSION``): Ray started on the Spark cluster's workers with
``ray.util.spark.setup_ray_cluster``; else an embedded local Ray whose every listener (GCS,
raylet, workers, agents, dashboard, metrics) is on 127.0.0.1 (see :func:`loopback_only`).

On Databricks, MLflow defaults to the workspace (tracking URI ``databricks``) and Unity
Catalog (registry URI ``databricks-uc``), and outputs belong on a Unity Catalog volume
(``--workdir /Volumes/<catalog>/<schema>/<volume>/...``), which every node sees. Credentials
(``DATABRICKS_HOST``, ``DATABRICKS_TOKEN``) come from the environment only; nothing here
prints or stores them.

Nothing attaches by accident: without ``--address`` / ``RAY_ADDRESS`` the embedded Ray is
always a new one (``address="local"``), whatever address file an earlier ``ray start`` left
behind; ``--address auto`` means "the cluster started on this machine". Every connection is
checked within ``--ray-connect-timeout`` seconds and fails with one line naming the address.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

from app.core import logs
from app.core.config import ClusterConfig, ConfigError
from app.core.errors import ClusterError  # noqa: F401  (raised here, importable from here)


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
        from app.core.storage import is_remote

        if not (str(cfg.workdir).startswith(("/Volumes/", "/dbfs/"))
                or is_remote(cfg.workdir)):
            raise ConfigError(f"--workdir {cfg.workdir}: on Databricks, outputs must be on "
                              f"storage every node sees, e.g. "
                              f"--workdir /Volumes/<catalog>/<schema>/<volume>/twotower "
                              f"(or an s3://, gs:// or abfss:// URI)")
        spark: dict[str, Any] = {"max_worker_nodes": cfg.spark_worker_nodes,
                                 "min_worker_nodes": cfg.spark_worker_nodes}
        if not is_remote(cfg.workdir):  # Ray copies its logs there (a mounted path)
            spark["collect_log_to_path"] = f"{cfg.workdir}/ray_logs"
        if env.get("RAY_TMPDIR"):  # where Ray's nodes keep their files, as for any Ray
            spark["ray_temp_root_dir"] = env["RAY_TMPDIR"]
        cpus, gpus = cfg.spark_cpus_per_node, cfg.spark_gpus_per_node
        if gpus is not None and cpus is None:
            raise ConfigError("--spark-gpus-per-node needs --spark-cpus-per-node too: Ray on "
                              "Spark sizes a worker node by both (or by neither: a whole "
                              "Spark worker each)")
        if cpus is not None:  # (Ray on Spark takes both or neither)
            spark.update(num_cpus_worker_node=cpus, num_gpus_worker_node=gpus or 0)
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


def _host_port(address: str) -> tuple[str, int]:
    """host and port of a GCS (``host:port``) or Ray Client (``ray://host:port``) address."""
    bare = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ClusterError(f"--address {address}: expected host:port (the head node's GCS, "
                           f"e.g. 10.0.0.1:6379), ray://host:10001, or auto")
    return host.strip("[]"), int(port)


def resolve_address(address: str, timeout: float) -> str:
    """The address to join, checked: ``auto`` becomes the cluster started on this machine,
    and the head node must answer on its port within ``timeout`` seconds.

    Raises:
        ClusterError: one line naming the address and what to check.
    """
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address}: that is a dashboard (job API) address; "
                           f"give the head node's GCS address (host:6379) or ray://host:10001, "
                           f"or submit the job with `ray job submit --address {address}`")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError) as e:
            raise ClusterError(f"--address auto: no Ray cluster is running on this machine "
                               f"({e}); start one with `ray start --head`, or leave --address "
                               f"and RAY_ADDRESS unset for an embedded Ray") from None
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=max(
                0.5, min(5.0, deadline - time.monotonic()))).close()
            return address
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"could not reach the Ray cluster at {address} within {timeout:g}s ({e}): "
                    f"check that its head node is running (`ray status --address "
                    f"{host}:{port}`), that this machine can reach port {port}, and "
                    f"--address / RAY_ADDRESS (unset both for an embedded local Ray)") from None
            time.sleep(0.5)


def _join(address: str, timeout: float, **kwargs: Any) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    address = resolve_address(address, timeout)
    try:
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    except AuthenticationError as e:
        raise ClusterError(
            f"the Ray cluster at {address} refused this process ({str(e).splitlines()[0]}): "
            f"it runs with token authentication; export RAY_AUTH_MODE=token and give its "
            f"token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head "
            f"node prints it)") from None
    except ConnectionError as e:
        raise ClusterError(f"could not join the Ray cluster at {address}: "
                           f"{str(e).splitlines()[0]}") from None


# Ray's own switch for a local-only instance (its default on macOS and Windows)
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# where a Ray process finds the state API when given no address (a dashboard URL)
_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Around the start of an embedded Ray: every process of it listens on loopback only.

    The node address decides every bind: the gRPC servers (GCS, raylet, workers, dashboard
    agent), the agents' HTTP servers and the metrics exporters listen on loopback when it is
    loopback, else on all interfaces or the machine's address. ``ray.init`` turns
    ``_node_ip_address="127.0.0.1"`` into the machine's address unless Ray runs local-only
    (``ray._private.services.resolve_ip_for_localhost``), which this switches on. The variable
    is inherited by every Ray process started meanwhile (raylet, agents, workers, a job's
    driver: they resolve 127.0.0.1 the same way); this process's flag, read when Ray was
    imported, is restored afterwards, so a later join of a real cluster resolves as usual.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = saved_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_stop_registered: list[bool] = []


# Ray Train's controller polls its workers this often (its default: every 2 s). A run's end is
# noticed by a poll, so the default added 2-4 s to every training run; a poll is one small call
# per worker. Set in the environment of an embedded Ray's processes and in a joined
# cluster's job environment, where the controller reads it; a value the user set
# wins.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def start_embedded(**kwargs: Any) -> None:
    """``ray.init`` of a new local Ray, on loopback only (:func:`loopback_only`), whose
    processes find its state API by address.

    Ray Train's placement-group cleaner (an actor) looks the state API up without an address,
    from the Ray instances running on the machine; with two of them (two runs, a head node
    beside a job) it fails ("Found multiple active Ray instances") and the placement group of
    a stopped run is never released. ``RAY_API_SERVER_ADDRESS``, set while Ray starts, is
    inherited by every process of this instance and names its own dashboard.
    """
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # every process of it inherits it
    import ray

    if not _stop_registered:  # (also when interrupted inside ray.init) it runs before Ray's
        atexit.register(stop_embedded)  # own exit hook, registered when Ray was imported
        _stop_registered.append(True)
    port = kwargs.pop("dashboard_port", None) or _free_port()
    saved = os.environ.get(_API_SERVER_ENV)
    os.environ[_API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        with loopback_only():
            ray.init(address="local", dashboard_port=port, **kwargs)
    finally:
        if saved is None:
            os.environ.pop(_API_SERVER_ENV, None)
        else:
            os.environ[_API_SERVER_ENV] = saved


def descendants() -> list[Any]:
    """This process's descendants now (for an embedded Ray: the GCS, the raylet, the
    raylet's agents and workers, Serve's actors)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def stop_embedded(known: Sequence[Any] = (), grace: float = 5.0) -> None:
    """``ray.shutdown`` of the embedded Ray, then SIGTERM (SIGKILL after ``grace`` seconds)
    to whatever process it started still runs.

    Ray's shutdown stops the GCS and the raylet, but the raylet's agents (dashboard agent,
    runtime-env agent) and a worker busy in a task notice their parent's death only after a
    minute or more, after Ctrl-C or SIGTERM in particular. The processes are this process's
    descendants, listed before the shutdown, with ``known`` (processes listed earlier, which
    an early death of their parent may have orphaned) and their children; psutil checks a
    pid's start time, so a reused pid is never touched, and nothing else on the machine is.
    """
    import psutil
    import ray

    ours = [*known, *descendants()]
    ray.shutdown()
    alive: dict[int, Any] = {}
    for p in ours:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive[p.pid] = p
                for child in p.children(recursive=True):
                    alive.setdefault(child.pid, child)
    procs = list(alive.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, left = psutil.wait_procs(procs, timeout=grace)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=grace)


def _shutdown_ray_on_spark() -> None:
    import ray
    from ray.util.spark import shutdown_ray_cluster

    ray.shutdown()
    with contextlib.suppress(Exception):  # already shut down
        shutdown_ray_cluster()


def init_ray(cfg: ClusterConfig) -> RaySetup:
    """Connect this process to its Ray cluster (starting one when needed); returns the plan.

    Does nothing when already connected (a second stage of the same job, or inside
    ``ray job submit``, where ``RAY_ADDRESS`` is set for the entrypoint).

    Raises:
        ClusterError: the cluster could not be reached within ``cfg.ray_connect_timeout``.
    """
    import ray

    from app.core.storage import component_env, worker_env

    setup = plan(cfg, connected=ray.is_initialized())
    os.environ.update(component_env())  # streaming and MLflow: the same S3 endpoint
    options = {"runtime_env": logs.runtime_env(logs.level())}
    options["runtime_env"]["env_vars"].update(worker_env())
    options["runtime_env"]["env_vars"][TRAIN_POLL_ENV] = os.environ.get(TRAIN_POLL_ENV,
                                                                        TRAIN_POLL_S)
    if setup.kind == "address":
        _join(setup.address, cfg.ray_connect_timeout, **options)
    elif setup.kind == "databricks":
        from pyspark.sql import SparkSession
        from ray.util.spark import setup_ray_cluster

        # a notebook's session; in a job's own process, the cluster's (getOrCreate)
        if SparkSession.getActiveSession() is None:
            SparkSession.builder.getOrCreate()
        # `ray start` turns token authentication on by itself where ~/.ray/auth_token exists
        # (on the driver, after any earlier local run), but the Ray nodes in Spark tasks on
        # other machines have no token: Ray on Spark runs without it unless RAY_AUTH_MODE
        # says otherwise (its nodes stay inside the Spark cluster's network)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        address, _ = setup_ray_cluster(**setup.spark_args)
        atexit.register(_shutdown_ray_on_spark)  # the nodes this job started go with it
        _join(address, cfg.ray_connect_timeout, **options)
    elif setup.kind == "local":
        # Ray's default for a new local cluster is token authentication (its notice about
        # that is filtered by app.core.logs); an exported RAY_AUTH_MODE wins
        start_embedded(logging_level=logging.WARNING, **options, **setup.local_args)
    if setup.kind != "connected":
        logs.after_ray_init()
        logs.install_signal_handlers()  # ray.init replaced the driver's SIGTERM handler
    return setup
