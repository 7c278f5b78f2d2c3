"""Placement on an autoscaling cluster: a real Ray autoscaler (its fake multi-node provider,
which starts worker nodes as raylets on this machine) grows the cluster for a topology that
does not fit yet; a request beyond its largest size fails at once; nodes that do not come in
time fail with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import ray

from app.core.config import load_config
from app.train.placement import ResourceError, placement, wait_for_placement
from tests.conftest import short_tmp, start_local_ray, user_shell_env

pytestmark = pytest.mark.slow  # an autoscaling cluster


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _autoscaling_config(gcs: str) -> dict:
    """A head without CPUs for training and one worker type of 1 CPU, at most 2 nodes."""
    return {
        "cluster_name": "autoscale-test", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": gcs},
        "auth": {"ssh_user": "ubuntu"}, "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 1}, "node_config": {},
                           "min_workers": 0, "max_workers": 2}},
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}


def test_an_autoscaling_cluster_grows_for_the_topology_or_fails_clearly(tmp_path):
    rt = short_tmp()
    port = _free_port()
    cfg_file = tmp_path / "autoscaling.json"
    cfg_file.write_text(json.dumps(_autoscaling_config(f"127.0.0.1:{port}")))
    env = user_shell_env(RAY_TMPDIR=rt, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                         HOME=str(tmp_path))
    env.pop("RAY_ADDRESS", None)
    # this test needs its own cluster; the session's local Ray, if up, comes back after (it is
    # not started here: other tests look for the Ray instances running on this machine)
    session_ray = ray.is_initialized()
    ray.shutdown()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", f"--autoscaling-config={cfg_file}", "--dashboard-host=127.0.0.1",
         "--disable-usage-stats"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        two = placement(load_config(overrides={"topology": "mnmg", "accelerator": "cpu",
                                               "num_workers": 2}).train)
        four = placement(load_config(overrides={"topology": "mnmg", "accelerator": "cpu",
                                                "num_workers": 4}).train)
        t0 = time.monotonic()
        with pytest.raises(ResourceError, match="even at its largest"):
            wait_for_placement(four, timeout=300, say=lines.append)
        assert time.monotonic() - t0 < 10
        with pytest.raises(ResourceError, match="did not add the nodes .* within 1s"):
            wait_for_placement(two, timeout=1, say=lines.append, poll=0.2)
        wait_for_placement(two, timeout=240, say=lines.append)
        assert len([n for n in ray.nodes() if n["Alive"]]) >= 2
        assert any("waiting up to 240s for the autoscaler" in line for line in lines), lines
        assert any("the cluster grew to" in line for line in lines), lines
    finally:
        ray.shutdown()
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # the fake provider's nodes, started by the autoscaler in the head's group
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # and any of this cluster's processes outside that group (their sessions live in rt):
        # a raylet left waiting for its head would be found by a later `--address auto`
        import psutil

        left = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(rt) in arg for arg in proc.info["cmdline"] or []):
                    proc.kill()
                    left.append(proc)
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=30)
        shutil.rmtree(rt, ignore_errors=True)
        if session_ray:
            start_local_ray()
