"""The training workers' process-group rendezvous, on loopback when the cluster is this machine.

Ray Train's torch backend starts PyTorch's rendezvous store (``TCPStore``) on rank 0 and gloo's
pair listeners on each worker; both listen on every interface, whatever address Ray's node
has. When every node of the cluster has a loopback address (the embedded local Ray, or a
``ray.cluster_utils.Cluster`` on one machine), :func:`torch_config` returns a backend that

- opens the store's listening socket on 127.0.0.1 itself and hands it to ``TCPStore``
  (``master_listen_fd``), so the store never binds a public address;
- starts gloo (and NCCL's bootstrap) on the loopback interface (``GLOO_SOCKET_IFNAME``,
  ``NCCL_SOCKET_IFNAME``).

On a real cluster the workers need each other's addresses and Ray Train's own backend is used.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from ray.train.torch import TorchConfig

# Ray Train's torch backend: this one differs only in how the process group is created
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

# rank 0's rendezvous store and the socket it serves on, kept for the process group's life
_STORE: Any = None
_SOCKET: Optional[socket.socket] = None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


def cluster_on_loopback(nodes: Optional[list[dict[str, Any]]] = None) -> bool:
    """True when every alive node of the connected Ray cluster has a loopback address."""
    import ray

    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    return bool(nodes) and all(_is_loopback(str(n.get("NodeManagerAddress", "")))
                               for n in nodes)


def loopback_interface() -> str:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and _is_loopback(a.address) for a in addrs):
            return name
    return "lo"


def _serve_store(world_size: int, timeout_s: int) -> int:
    """On rank 0: the rendezvous store on a 127.0.0.1 socket opened here; returns its port."""
    import torch.distributed as dist

    global _STORE, _SOCKET
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(64, world_size))
    port = sock.getsockname()[1]
    _STORE = dist.TCPStore("127.0.0.1", port, world_size, True, timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=sock.fileno())
    _SOCKET = sock
    return port


def _join(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """On each worker: the process group over the loopback store and interface."""
    import torch.distributed as dist

    iface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    store = _STORE if rank == 0 else dist.TCPStore(
        "127.0.0.1", port, world_size, False, timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


class _LoopbackBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: "LoopbackTorchConfig") -> None:
        import ray

        n = len(worker_group)
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        worker_group.execute(_set_torch_distributed_env_vars)
        port = worker_group.execute_single(0, _serve_store, n, backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(i, _join, backend, i, n, port,
                                                   backend_config.timeout_s)
                 for i in range(n)])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """:class:`~ray.train.torch.TorchConfig` whose process group listens on loopback only."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackBackend


def torch_config(backend: str) -> TorchConfig:
    """The process-group setup for training on the connected cluster (see module docstring)."""
    return (LoopbackTorchConfig if cluster_on_loopback() else TorchConfig)(backend=backend)
