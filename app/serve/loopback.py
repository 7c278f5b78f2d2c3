"""A Serve replica's inter-deployment gRPC server on loopback, when Ray is the embedded one.

Ray Serve 2.60 starts a gRPC server in every replica (``ray.serve._private.replica``,
``_on_initialized``) bound in code to ``[::]:0``: every interface, an ephemeral port, whatever
the node's address. No Serve option moves it. Every other process of the embedded Ray listens
on 127.0.0.1 (:func:`app.core.cluster.loopback_only`), so on that cluster the replica's bind is
rewritten to ``127.0.0.1:0``: Ray's ``worker_process_setup_hook`` (a deployment-level
``runtime_env``, as Ray's own LLM deployments set one) runs :func:`replica_setup` in the replica
process before the replica module binds, and wraps that module's ``add_port_to_grpc_server``.
The router reaches a replica at its node's address, which is 127.0.0.1 on the embedded
cluster, so requests still find it.

On a real cluster (``--address``) nothing is rewritten: replicas must be reachable from the
other nodes. Should a Ray upgrade rename what is wrapped, the app refuses to deploy on the
embedded cluster (one line naming the missing name) rather than listen on every interface.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
from pathlib import Path
from typing import Any, Callable

from app.core.errors import ClusterError

REPLICA_MODULE = "ray.serve._private.replica"
# set in the replicas' environment where their bind must be on loopback (checked by the replica)
PIN_ENV = "TWOTOWER_REPLICA_LOOPBACK"
BINDER = "add_port_to_grpc_server"
LOOPBACK = "127.0.0.1"
# the hosts that mean "every interface" in a gRPC bind address
_ANY_HOSTS = ("[::]", "0.0.0.0", "", "[::0]")


class LoopbackError(ClusterError):
    """Ray's replica code no longer has what :func:`pin_replica_grpc` wraps."""


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def on_loopback(address: str) -> str:
    """A gRPC bind address with its every-interface host replaced by 127.0.0.1 (the port
    kept); any other address as it is. ``[::]:0`` -> ``127.0.0.1:0``."""
    host, sep, port = address.rpartition(":")
    if not sep or host not in _ANY_HOSTS:
        return address
    return f"{LOOPBACK}:{port}"


def _replica_module() -> Any:
    """Ray's replica module, checked to still bind through :data:`BINDER`.

    Raises:
        LoopbackError: naming the missing module or name.
    """
    try:
        module = importlib.import_module(REPLICA_MODULE)
    except ImportError as e:
        raise LoopbackError(f"this Ray has no {REPLICA_MODULE} ({e}); its replicas' gRPC "
                            f"server cannot be kept on loopback") from None
    if not callable(getattr(module, BINDER, None)):
        raise LoopbackError(f"{REPLICA_MODULE} has no {BINDER} in this Ray; its replicas' "
                            f"gRPC server cannot be kept on loopback, so the app is not "
                            f"deployed (the embedded Ray listens on 127.0.0.1 only)")
    return module


def _hook_env_var() -> str:
    """The variable Ray's worker reads its setup hook from. Ray turns a ``runtime_env``'s
    ``worker_process_setup_hook`` into it for the job-level environment only, so a
    deployment-level hook must set it as well.

    Raises:
        LoopbackError: this Ray has no such variable.
    """
    from ray._private import ray_constants

    name = getattr(ray_constants, "WORKER_PROCESS_SETUP_HOOK_ENV_VAR", None)
    if not name:
        raise LoopbackError("this Ray has no WORKER_PROCESS_SETUP_HOOK_ENV_VAR; its replicas' "
                            "gRPC server cannot be kept on loopback")
    return name


def check() -> None:
    """Fail before deploying when :func:`pin_replica_grpc` could not work in this Ray.

    Raises:
        LoopbackError: one line naming what is missing.
    """
    _replica_module()
    _hook_env_var()


def require_pinned() -> None:
    """In a replica whose environment asks for it (:data:`PIN_ENV`): the bind is wrapped,
    or the replica stops here, before Serve binds its gRPC server.

    Raises:
        LoopbackError: the setup hook did not run in this process.
    """
    if os.environ.get(PIN_ENV) != "1":
        return
    binder = getattr(_replica_module(), BINDER)
    if not getattr(binder, "__wrapped_for_loopback__", False):
        raise LoopbackError(f"the replica's setup hook ({__name__}.replica_setup) did not run, "
                            f"so its gRPC server would listen on every interface; the app is "
                            f"not served")


def pin_replica_grpc() -> None:
    """Wrap the replica module's ``add_port_to_grpc_server`` so that an every-interface
    address binds 127.0.0.1 (TLS and the port are left to Ray's own function).

    Raises:
        LoopbackError: Ray's replica module no longer has that name.
    """
    module = _replica_module()
    original: Callable[[Any, str], int] = getattr(module, BINDER)
    if getattr(original, "__wrapped_for_loopback__", False):
        return

    def bind_on_loopback(server: Any, address: str) -> int:
        return original(server, on_loopback(address))

    bind_on_loopback.__wrapped_for_loopback__ = True  # type: ignore[attr-defined]
    setattr(module, BINDER, bind_on_loopback)


def replica_setup() -> None:
    """The replicas' ``worker_process_setup_hook`` on the embedded Ray: the project's output
    filters (the job-level hook it replaces, :func:`app.core.logs.worker_setup`), then the
    loopback bind. Raising here stops the replica (Ray reports the hook's error)."""
    from app.core import logs

    logs.worker_setup()
    pin_replica_grpc()


def embedded_cluster() -> bool:
    """True when this process's Ray node has a loopback address (the embedded cluster)."""
    import ray

    if not ray.is_initialized():
        return False
    return is_loopback(ray.util.get_node_ip_address())


def runtime_env(existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """``existing`` (a deployment's ``runtime_env``) with :func:`replica_setup` as its setup
    hook, its own ``env_vars`` kept.

    Raises:
        LoopbackError: this Ray lacks what the hook needs (:func:`check`).
    """
    check()
    hook = f"{__name__}.replica_setup"
    out = dict(existing or {})
    out["worker_process_setup_hook"] = hook
    env = dict(out.get("env_vars", {}))
    # the hook runs before Ray puts the driver's code paths on the worker's sys.path: the
    # project's root (this machine's, as the cluster is embedded) goes on PYTHONPATH
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", os.environ.get("PYTHONPATH", "")).split(
        os.pathsep) if p and p != root]
    env.update({"PYTHONPATH": os.pathsep.join([root, *paths]), _hook_env_var(): hook,
                PIN_ENV: "1"})
    out["env_vars"] = env
    return out
