"""What the embedded Ray exposes: started as the pipeline starts it (``app.core.cluster.init_ray``
without an address, in a plain shell), every socket its processes listen on is on loopback,
and it still runs tasks, actors, the state API (also beside another Ray instance) and a
2-worker gloo process group set up as training sets it up (``app.train.rendezvous``); and the
serving app, started as users start it, listens on loopback only too."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, short_tmp, user_shell_env

pytestmark = pytest.mark.slow  # every listener of an embedded Ray and its apps

# the pipeline's start, then real work, then hold the instance until told to stop
CHILD = """
import os, sys
import ray
from app.core.cluster import init_ray
from app.core.config import load_config

init_ray(load_config(overrides={"num_cpus": 2}).cluster)

@ray.remote
def pid():
    return os.getpid()

@ray.remote
class Counter:
    def __init__(self):
        self.n = 0
    def add(self, k):
        self.n += k
        return self.n

@ray.remote
def node_ips():
    # the dashboard's state API, queried from a worker as Ray Train's placement-group cleaner
    # does: without an address, with another Ray instance running on the machine
    from ray.util.state import list_nodes
    return [n.node_ip for n in list_nodes()]

assert ray.get(pid.remote()) != os.getpid()
c = Counter.remote()
assert ray.get([c.add.remote(1), c.add.remote(2)]) == [1, 3]
gcs = ray.get_runtime_context().gcs_address
ips = ray.get(node_ips.remote())
assert len(ips) == 1, ips

# the training workers' process group, set up as app.train.driver sets it up; each worker lists what
# its own process listens on while the group is up (gloo's pairs, rank 0's store)
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from app.train.rendezvous import LoopbackTorchConfig, torch_config

def listeners(cfg):
    import json, psutil, torch, torch.distributed as dist
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size() == 2
    found = [[c.laddr.ip, c.laddr.port] for c in psutil.Process().net_connections("inet")
             if c.laddr and c.status == psutil.CONN_LISTEN]
    with open(f"{cfg['out']}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(found, f)
    dist.barrier()

tc = torch_config("gloo")
assert isinstance(tc, LoopbackTorchConfig), tc
TorchTrainer(listeners, train_loop_config={"out": sys.argv[1]}, torch_config=tc,
             scaling_config=ScalingConfig(num_workers=2),
             run_config=RunConfig(storage_path=sys.argv[1], name="pg")).fit()
print("READY", gcs, ips[0], flush=True)
sys.stdin.readline()
ray.shutdown()
print("STOPPED", flush=True)
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, where gRPC binds a v4 loopback
    return addr.is_loopback


def _bound(procs: list[psutil.Process]) -> set[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every TCP listener and bound UDP socket."""
    found = set()
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                udp = c.type == socket.SOCK_DGRAM
                if c.laddr and (udp or c.status == psutil.CONN_LISTEN):
                    found.add((p.pid, name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that exited meanwhile
    return found


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_the_embedded_ray_listens_on_loopback_only(ray_local):
    """(``ray_local``: the tests' own Ray is a second instance on the machine, which the
    child's workers must not confuse with theirs.)"""
    rt = short_tmp()
    env = user_shell_env(RAY_TMPDIR=rt)
    env.pop("RAY_ADDRESS", None)  # the pipeline's default: a new embedded Ray
    child = subprocess.Popen([sys.executable, "-c", CHILD, rt], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    procs: list[psutil.Process] = []
    lines: list[str] = []
    watchdog = threading.Timer(300, child.kill)  # a hung start ends the read below
    watchdog.start()
    try:
        for line in child.stdout:
            lines.append(line)
            if line.startswith("READY"):
                break
        assert lines and lines[-1].startswith("READY"), "".join(lines)[-4000:]
        _, gcs_address, node_ip = lines[-1].split()
        # listeners come up over a few seconds (metrics servers, agents): several looks
        bound: set[tuple[int, str, str, int]] = set()
        for _ in range(4):
            procs = _tree(child.pid)
            bound |= _bound(procs)
            time.sleep(1)
        names = {name for _, name, _, _ in bound}
        assert {"gcs_server", "raylet"} <= names, names  # the instance was looked at
        exposed = sorted(b for b in bound if not _loopback(b[2]))
        assert not exposed, "listening outside loopback:\n" + "\n".join(
            f"  {name} (pid {pid}) on {ip}:{port}" for pid, name, ip, port in exposed)
        ranks = [json.loads((Path(rt) / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(ranks), ranks  # the process group was up while each rank looked
        assert not [a for rank in ranks for a in rank if not _loopback(a[0])], ranks
        assert _loopback(node_ip) and _loopback(gcs_address.rsplit(":", 1)[0].strip("[]"))
        child.stdin.write("stop\n")
        child.stdin.flush()
        rest = child.stdout.read()
        assert child.wait(timeout=120) == 0 and "STOPPED" in rest, rest[-4000:]
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
        for p in procs[1:]:  # what this test started and a failed run left behind
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(rt, ignore_errors=True)


def test_the_serving_app_listens_on_loopback_only(trained):
    """``python -m pipelines.serve`` as users start it (its own embedded Ray): every TCP
    listener and bound UDP socket of its processes, the Serve controller, proxy and replica
    among them (the replica's inter-deployment gRPC server, which Ray binds to ``[::]``, is
    moved to loopback), is on loopback while it answers requests."""
    import requests

    from tests.test_serve_entry import ServeProcess

    app = ServeProcess(trained["model_dir"].parent)
    try:
        app.wait_line("[serve] serving until")
        body = requests.post(app.url + "/recommend", json={"user_id": "1", "k": 3},
                             timeout=30).json()
        assert len(body["items"]) == 3, body
        bound: set[tuple[int, str, str, int]] = set()
        for _ in range(4):  # listeners come up over a few seconds
            bound |= _bound(app.remember_tree())
            time.sleep(1)
        names = {name for _, name, _, _ in bound}
        assert {"gcs_server", "raylet"} <= names, names
        assert [b for b in bound if b[3] == app.port], bound  # the HTTP proxy was seen
        assert any("ServeRepli" in name for name in names), names  # ... and the replica
        exposed = sorted(b for b in bound if not _loopback(b[2]))
        assert not exposed, "listening outside loopback:\n" + "\n".join(
            f"  {name} (pid {pid}) on {ip}:{port}" for pid, name, ip, port in exposed)
        again = requests.post(app.url + "/recommend", json={"user_id": "1", "k": 3},
                              timeout=30).json()
        assert again["items"] == body["items"]
    finally:
        app.close()
