"""Launch paths: the cluster launcher config."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest
import yaml

from app.core.publish import current

ROOT = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(config)
    types = config["available_node_types"]
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["resources"]["GPU"] >= 1 for t in gpu)
    assert any("setup_env.sh" in c for c in config["setup_commands"])


def test_schema_check_catches_a_typo():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        _validate(config)


def _cluster(**overrides):
    from app.core.config import load_config

    return load_config(overrides=overrides).cluster


def test_ray_comes_from_the_address_then_databricks_then_local():
    from app.core.cluster import plan

    assert plan(_cluster(), env={}).kind == "local"
    assert plan(_cluster(), env={}).local_args["_node_ip_address"] == "127.0.0.1"
    assert plan(_cluster(), env={}, connected=True).kind == "connected"
    by_env = plan(_cluster(), env={"RAY_ADDRESS": "ray://head:10001"})
    assert (by_env.kind, by_env.address) == ("address", "ray://head:10001")
    flag = plan(_cluster(address="10.0.0.1:6379"), env={"RAY_ADDRESS": "other:6379"})
    assert flag.address == "10.0.0.1:6379"  # the flag wins over the environment


def test_databricks_is_detected_and_sized_from_config():
    from app.core.cluster import mlflow_defaults, plan
    from app.core.config import ConfigError

    env = {"DATABRICKS_RUNTIME_VERSION": "16.4", "DATABRICKS_TOKEN": "dapi-secret"}
    vol = "/Volumes/main/recsys/artifacts/twotower"
    setup = plan(_cluster(workdir=vol, spark_worker_nodes=3, spark_cpus_per_node=16,
                          spark_gpus_per_node=4), env=env)
    assert setup.kind == "databricks"
    assert setup.spark_args == {"max_worker_nodes": 3, "min_worker_nodes": 3,
                                "num_cpus_worker_node": 16, "num_gpus_worker_node": 4,
                                "collect_log_to_path": f"{vol}/ray_logs"}
    # Ray on Spark takes CPUs and GPUs per node together: CPUs alone mean no GPUs
    cpus = plan(_cluster(workdir="s3://bucket/run", spark_cpus_per_node=2), env=env)
    assert cpus.spark_args == {"max_worker_nodes": 2, "min_worker_nodes": 2,
                               "num_cpus_worker_node": 2, "num_gpus_worker_node": 0}
    with pytest.raises(ConfigError, match="--spark-gpus-per-node needs --spark-cpus-per-node"):
        plan(_cluster(workdir=vol, spark_gpus_per_node=4), env=env)
    assert "dapi-secret" not in repr(setup)
    assert mlflow_defaults(_cluster(workdir=vol), env=env) == ("databricks", "databricks-uc")
    assert mlflow_defaults(_cluster(mlflow_registry_uri="databricks"), env=env)[1] == \
        "databricks"
    assert mlflow_defaults(_cluster(), env={}) == (None, None)
    # --databricks off a Databricks runtime too, and a workdir only the driver would see
    assert plan(_cluster(databricks=True, workdir=vol), env={}).kind == "databricks"
    with pytest.raises(ConfigError, match="--workdir workdir: on Databricks.*Volumes"):
        plan(_cluster(), env=env)
    with pytest.raises(ConfigError, match="--address and --databricks"):
        plan(_cluster(databricks=True, address="h:6379", workdir=vol), env={})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(port: int, head, timeout: float = 120.0) -> None:
    """Until the head node's dashboard answers (its job API is then up)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start --head exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (with token auth on, an unauthenticated call is refused)
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the head node's dashboard did not answer on port {port} "
                         f"within {timeout:.0f}s")


def _stop_group(proc, timeout: float = 60.0) -> None:
    """SIGTERM the process group of a `ray start --block` (it stops the node it started),
    SIGKILL what is left after ``timeout``."""
    import os
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:  # children of the node that outlive the head process
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


@pytest.mark.slow  # ray job submit of a full run
def test_ray_job_submit_runs_the_full_pipeline(ray_local, tmp_path):
    """The README's local head-node recipe from a user's shell (the environment the tests
    started with, the venv activated, a token in ~/.ray/auth_token): `export
    RAY_AUTH_MODE=token`, `ray get-auth-token --generate`, `ray start --head`, then the main
    job through `ray job submit --working-dir .`, as on a standalone cluster. Only the head
    node started here is stopped (its process group), never every Ray on the machine."""
    import shutil
    import subprocess

    import ray

    from tests.conftest import short_tmp, start_local_ray, user_shell_env

    ray_tmp = short_tmp()
    home = tmp_path / "home"  # ~/.ray/auth_token of this shell, in the test's own folder
    home.mkdir()
    env = user_shell_env(HOME=str(home), RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    ray.shutdown()  # the 2 CPUs go to the head node below; ours comes back after
    dash = _free_port()
    dashboard = f"http://127.0.0.1:{dash}"
    workdir = tmp_path / "wd"
    head = None
    try:
        # ray get-auth-token --generate: the token exists before the head node starts (as
        # after any embedded run), so `ray start --head` turns token authentication on
        gen = subprocess.run(["ray", "get-auth-token", "--generate"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0 and (home / ".ray" / "auth_token").is_file(), gen.stderr
        # `ray start --head` as the README has it, in the foreground of our process group
        head = subprocess.Popen(["ray", "start", "--head", "--block",
                                 "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
                                 "--num-cpus=2", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dash}", "--disable-usage-stats"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        _wait_for_dashboard(dash, head)
        # without the export, the client sends no token: why the README says to export it
        plain = subprocess.run(["ray", "job", "list", "--address", dashboard], env=env,
                               capture_output=True, text=True, timeout=120)
        assert plain.returncode != 0 and "authentication token" in plain.stdout + plain.stderr
        env["RAY_AUTH_MODE"] = "token"  # export RAY_AUTH_MODE=token
        for _ in range(30):  # the job agent comes up a little after the dashboard
            job = subprocess.run(
                ["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                 "python", "-m", "pipelines.full_run", "--dataset", "synthetic", "--rows",
                 "20000", "--epochs", "1", "--no-refit", "--workdir", str(workdir),
                 "--registered-model-name", "two-tower-job"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            log = job.stdout + job.stderr
            if "No available agent" not in log:
                break
            time.sleep(2)
        assert job.returncode == 0, log[-4000:]
        assert "registered model" in log and "example recommendations" in log
        job_id = re.search(r"raysubmit_\w+", log).group(0)
        status = subprocess.run(["ray", "job", "status", "--address", dashboard, job_id],
                                env=env, capture_output=True, text=True, timeout=120)
        assert re.search(rf"Job '{job_id}' succeeded", re.sub(r"\x1b\[[0-9;]*m", "",
                                                              status.stdout + status.stderr))
    finally:
        if head is not None:
            _stop_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        start_local_ray()
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary["stages"]) == ["prepare", "train", "infer"]  # --no-refit: CI time
    assert (current(workdir / "model") / "weights.pt").is_file()
    assert (current(workdir / "recommendations") / "_summary.json").is_file()
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)


def test_the_cluster_gives_every_node_one_bucket_as_the_default_workdir(monkeypatch):
    """cluster.yaml exports TWOTOWER_WORKDIR (a bucket) on the head and on every worker; a
    job's --workdir defaults to it, and checkpoints to <workdir>/checkpoints."""
    import re

    from app.core.config import WORKDIR_ENV, load_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    found = {m for c in starts for m in re.findall(rf"{WORKDIR_ENV}=(\S+?);", c)}
    assert len(found) == 1 and next(iter(found)).startswith("s3://"), found
    assert all(WORKDIR_ENV in c for c in starts if " ray start" in c or "ray start" in c)
    monkeypatch.setenv(WORKDIR_ENV, "s3://bucket/twotower")
    assert load_config().cluster.workdir == "s3://bucket/twotower"
    assert load_config(overrides={"workdir": "elsewhere"}).cluster.workdir == "elsewhere"
    monkeypatch.delenv(WORKDIR_ENV)
    assert load_config().cluster.workdir == "workdir"
