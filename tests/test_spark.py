"""The Databricks launch path run for real: a local Spark cluster (``local-cluster`` master:
a Spark worker in its own JVM, with executors), Ray started on it by ``--databricks``
(``ray.util.spark.setup_ray_cluster``), then a small full run whose workdir is a bucket on the
session's S3 server; MLflow records to a local store (Unity Catalog itself cannot run here;
its naming rules are tested in test_registry.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.storage import CACHE_ENV, resolve
from tests.conftest import ROOT, short_tmp, user_shell_env

pytestmark = pytest.mark.slow  # Ray on a local Spark

# What a notebook cell on a Databricks cluster runs, after the session Databricks gives it
# (made here: one Spark worker with 2 cores, the executors on this venv's Python)
NOTEBOOK = """
import os, sys
os.environ["PYSPARK_PYTHON"] = sys.executable
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local-cluster[1,2,2048]").appName("twotower-test")
         .config("spark.ui.enabled", "false").getOrCreate())
from pipelines.full_run import main
code = main(sys.argv[1:])
import json, ray
print("RAY_NODES", json.dumps([n["Resources"].get("CPU", 0) for n in ray.nodes()
                               if n["Alive"]]))
from ray.util.spark import shutdown_ray_cluster
shutdown_ray_cluster()  # the Ray nodes go before the Spark session they run in
spark.stop()
sys.exit(code)
"""


def _stop_leftovers(folder) -> None:
    """Stop what the run started and left running (Ray's agents outlive
    ``shutdown_ray_cluster``; a failed run leaves more): the processes working in its folder."""
    import psutil

    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and Path(p.cwd()).is_relative_to(folder):
                p.kill()
        except (psutil.Error, OSError):
            continue


def test_full_run_on_ray_on_spark_with_the_workdir_in_a_bucket(s3_server, s3, tmp_path):
    if shutil.which("java") is None:
        pytest.fail("the Spark test needs Java (a JDK 17 with `java` on PATH): Spark runs in "
                    "a JVM; install one, e.g. apt-get install openjdk-17-jre-headless")
    rt = short_tmp()
    workdir = f"{s3}/spark-run"
    env = user_shell_env(**s3_server.env, HOME=str(tmp_path / "home"), RAY_TMPDIR=rt,
                         **{CACHE_ENV: str(tmp_path / "cache")})
    env.pop("RAY_ADDRESS", None)
    db = tmp_path / "mlflow.db"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", NOTEBOOK, "--databricks", "--spark-worker-nodes", "1",
             "--spark-cpus-per-node", "2", "--dataset", "synthetic", "--rows", "20000",
             "--epochs", "1", "--no-refit", "--workdir", workdir,
             "--mlflow-tracking-uri", f"sqlite:///{db}",
             "--mlflow-registry-uri", f"sqlite:///{db}",
             "--registered-model-name", "two-tower-spark"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=1500)
    finally:
        _stop_leftovers(tmp_path)
        shutil.rmtree(rt, ignore_errors=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    summary = json.loads(resolve(f"{workdir}/summary.json").read_text())
    assert list(summary["stages"]) == ["prepare", "train", "infer"]
    assert summary["stages"]["infer"]["summary"]["users"] > 0
    assert "registered model" in log and "example recommendations" in log
    # Ray ran on Spark: a head without CPUs on the driver, and the one worker node (2 CPUs)
    # that a Spark task started; every stage's work ran there
    nodes = json.loads(log.split("RAY_NODES", 1)[1].splitlines()[0])
    assert sorted(nodes) == [0, 2], nodes
    assert not (tmp_path / "workdir").exists()  # nothing local: the outputs are in the bucket
