"""Distributed training on CPU: 2 gloo workers under Ray Train, TorchRec sharding, recovery,
resume, the model folder and the registered MLflow model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from app.core.config import load_config
from app.train.placement import ResourceError
from tests.conftest import exported_recall

pytestmark = pytest.mark.slow  # training runs

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3  # as in conftest.trained


def train_config(workdir: Path, **overrides):
    return load_config(overrides={"epochs": EPOCHS, "num_workers": 2, "workdir": str(workdir),
                                  "registered_model_name": "two-tower-test", **overrides})


def test_two_workers_shard_the_tables_and_learn(trained):
    model_dir = trained["model_dir"]
    plan = json.loads((model_dir / "sharding_plan.json").read_text())
    assert plan["world_size"] == 2
    id_tables = [t for t in plan["tables"]
                 if t["table"] in ("t_user_id", "t_item_id", "t_user_history")]
    assert {t["sharding_type"] for t in id_tables} <= {"table_wise", "column_wise"}
    ranks = {r for t in id_tables for r in t["ranks"]}
    assert ranks == {0, 1}, f"tables not placed on both ranks: {plan['tables']}"
    history = json.loads((model_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    m = json.loads((model_dir / "metrics.json").read_text())
    for who in ("model", "popularity"):
        for split in ("val", "test"):
            assert {"recall@10", "recall@20", "recall@50", "ndcg@20"} <= set(m[who][split])
    assert m["model"]["test"]["recall@20"] > m["popularity"]["test"]["recall@20"]
    assert m["model"]["val"]["recall@20"] > m["popularity"]["val"]["recall@20"]


def test_model_folder_is_complete(trained):
    from app.train.model_folder import read_model_json

    model_dir = trained["model_dir"]
    for name in ("model.json", "config.yaml", "weights.pt", "vocab/users.parquet",
                 "vocab/items.parquet", "item_popularity.npy", "sharding_plan.json",
                 "metrics.json", "history.json", "mlflow.json"):
        assert (model_dir / name).is_file(), name
    info = read_model_json(model_dir)
    assert info.spec["num_items"] == info.dataset.vocab.items + 1
    assert not list(model_dir.parent.glob(".*partial*"))


def test_consolidated_weights_reproduce_the_training_metric(trained, movielens_dir):
    """The single-process export ranks the test split exactly as the sharded model did."""
    got = exported_recall(trained["model_dir"], movielens_dir, "test")
    want = json.loads((trained["model_dir"] / "metrics.json").read_text())["model"]["test"]
    assert got == pytest.approx(want["recall@20"], abs=2e-3)


def test_mlflow_run_has_params_epoch_metrics_and_a_registered_model(trained):
    import mlflow

    info = json.loads((trained["model_dir"] / "mlflow.json").read_text())
    client = mlflow.MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.embedding_dim"] == "64"
    history = client.get_metric_history(info["run_id"], "val_recall_at_20")
    assert [h.step for h in history] == list(range(1, EPOCHS + 1))
    version = client.get_model_version("two-tower-test", str(info["version"]))
    assert version.run_id == info["run_id"]


def test_registered_model_serves_in_a_fresh_process(trained, tmp_path):
    from app.serve.core import Recommender

    info = json.loads((trained["model_dir"] / "mlflow.json").read_text())
    rec = Recommender(trained["model_dir"])
    users = rec.user_ids.iloc[[0, 5, 100]].tolist() + [-12345]  # the last one is unknown
    pairs = {"userId": users[:3] * 2, "movieId": rec.item_ids.iloc[[0, 1, 2, 3, 4, 5]].tolist()}
    history = rec.item_ids.iloc[[10, 20, 30]].tolist()  # a new user's recent items
    script = f"""
import json, sys, mlflow, pandas as pd
mlflow.set_tracking_uri({info['tracking_uri']!r})
model = mlflow.pyfunc.load_model({info['registered_uri']!r})
top = model.predict(pd.DataFrame({{"userId": {users!r}}}), params={{"k": 7}})
pairs = model.predict(pd.DataFrame({pairs!r}))
new = model.predict(pd.DataFrame({{"userId": [-7], "history": [{history!r}]}}),
                    params={{"k": 5}})
json.dump({{"top": top.to_dict("list"), "pairs": pairs.to_dict("list"),
            "new": new.to_dict("list"),
            "torchrec": "torchrec" in sys.modules}}, open(sys.argv[1], "w"), default=str)
"""
    out = tmp_path / "served.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # the model is code, not a pickle
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, cwd=tmp_path,
                   env=env, timeout=300)
    served = json.loads(out.read_text())
    assert not served["torchrec"]  # plain torch serving
    top = served["top"]
    want = rec.recommend(users, k=7)
    assert top["movieId"] == want["movieId"].tolist()
    assert np.allclose(top["score"], want["score"], atol=1e-4)
    assert top["rank"] == list(range(1, 8)) * 4
    assert top["fallback"] == [False] * 21 + [True] * 7
    assert served["new"]["source"] == ["history"] * 5
    assert served["new"]["movieId"] == rec.recommend([-7], 5, [history])["movieId"].tolist()
    want_pairs = rec.score_pairs(pairs["userId"], pairs["movieId"])
    assert np.allclose(served["pairs"]["score"], want_pairs["score"], atol=1e-4)


def test_a_topology_the_cluster_cannot_place_fails_at_once(ray_local, movielens_dir, tmp_path):
    from app.train.driver import train

    cfg = train_config(tmp_path, topology="snmg", num_workers=2)
    t0 = time.perf_counter()
    with pytest.raises(ResourceError, match="needs GPUs"):
        train(cfg, str(movielens_dir), str(tmp_path / "model"), verbose=False)
    assert time.perf_counter() - t0 < 30


def _worker_pids(started_after: float) -> list[int]:
    """Training workers of this test's Ray (started by this process, not another Ray on the
    host) that were started after the given time (not an exiting worker of an earlier run)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if (" ".join(p.cmdline()).startswith("ray::RayTrainWorker")
                    and p.create_time() >= started_after and p.is_running()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def kill_a_worker_in_epoch_two(checkpointed: Callable[[], bool], killed: list[int],
                               timeout: float = 600) -> threading.Thread:
    """A started thread that SIGKILLs one training worker (of those started from now on) a
    second after ``checkpointed()`` first holds (the first epoch's checkpoint is written), and
    records its pid in ``killed``."""
    started = time.time()

    def kill() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not checkpointed():
            time.sleep(0.1)
        time.sleep(1.0)  # into the second epoch's training steps
        pids = _worker_pids(started)
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_killed_worker_resumes_from_the_last_checkpoint(trained, movielens_dir, tmp_path):
    """SIGKILL one worker during epoch 2: the group restarts from the epoch-1 checkpoint and
    finishes all epochs, with metrics within noise of the uninterrupted run."""
    from app.train.driver import run_name, train

    cfg = train_config(tmp_path)
    output = tmp_path / "model"
    run_dir = tmp_path / "checkpoints" / run_name(output)
    killed: list[int] = []

    killer = kill_a_worker_in_epoch_two(
        lambda: bool(list(run_dir.glob("checkpoint_*/state.json"))), killed)
    summary = train(cfg, str(movielens_dir), str(output), verbose=False)
    killer.join()
    assert killed, "no training worker was found to kill"
    m = summary.metrics
    assert m["epochs"] == EPOCHS
    assert m["resumed_at_epochs"] == [1]
    assert [h["epoch"] for h in summary.history] == list(range(1, EPOCHS + 1))
    base = trained["summary"].metrics["model"]
    for split in ("val", "test"):
        assert m["model"][split]["recall@20"] == pytest.approx(base[split]["recall@20"],
                                                              abs=0.01)


def test_resume_continues_a_stopped_run(ray_local, movielens_dir, tmp_path):
    from app.train.driver import TrainError, train

    output = tmp_path / "model"
    with pytest.raises(TrainError, match="no checkpoint"):
        train(train_config(tmp_path, epochs=1, resume=True), str(movielens_dir), str(output),
              verbose=False)
    first = train(train_config(tmp_path, epochs=1), str(movielens_dir), str(output),
                  verbose=False)
    assert first.metrics["epochs"] == 1
    second = train(train_config(tmp_path, epochs=2, resume=True), str(movielens_dir),
                   str(output), verbose=False)
    assert second.metrics["resumed_at_epochs"] == [1]
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]  # epoch 1 was not run again


def test_output_that_is_not_a_model_folder_is_refused(ray_local, movielens_dir, tmp_path):
    from app.core.publish import OutputError
    from app.train.driver import train

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds something other than a model folder"):
        train(train_config(tmp_path), str(movielens_dir), str(tmp_path / "model"),
              verbose=False)
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"


def test_a_checkpoint_missing_a_ranks_shards_is_not_resumed_from(trained, tmp_path):
    """A run stopped while the ranks were uploading an epoch's checkpoint leaves a folder
    with rank 0's state file but not every rank's shards: resume skips it."""
    import shutil

    from app.train.checkpoint import is_complete
    from app.train.checkpoint import checkpoint_of_epoch, latest_checkpoint

    src = Path(trained["summary"].checkpoint)
    run = tmp_path / "run"
    shutil.copytree(src, run / "checkpoint_a")
    epoch = json.loads((src / "state.json").read_text())["epoch"]
    assert latest_checkpoint(run).path == str(run / "checkpoint_a")
    assert is_complete(run / "checkpoint_a")
    shards = sorted((run / "checkpoint_a").glob("*.distcp"))
    assert len(shards) == 2  # one per rank
    shards[-1].unlink()
    assert not is_complete(run / "checkpoint_a")
    assert latest_checkpoint(run) is None and checkpoint_of_epoch(run, epoch) is None
