"""Ray Tune sweeps over the distributed trainer on movielens-small, with the sweep's output
(Tune's experiment, the trials' checkpoints, the results) in a bucket of the session's S3
server."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from app.core.config import ConfigError, load_config
from app.core.publish import current, read_success, version_of, version_uri
from app.core.storage import resolve
from app.train.placement import ResourceError
from app.tune import EXPERIMENT, SweepResult

DIMS = [64, 4]  # ASHA stops the weaker at its first rung


@pytest.fixture(scope="module")
def swept(ray_local, s3_server, movielens_dir, tmp_path_factory):
    """A sweep into s3://<bucket>/sweep; returns (its SweepResult, local work folder, sweep URI)."""
    from app.tune import sweep

    out = tmp_path_factory.mktemp("sweep")
    uri = f"s3://{s3_server.bucket()}/sweep"
    cfg = load_config(overrides={
        "workdir": str(out / "work"), "epochs": 2, "num_workers": 2, "num_samples": 1,
        "max_concurrent": 1, "search_alg": "random", "scheduler": "asha", "grace_period": 1,
        "reduction_factor": 2, "search_space": json.dumps({"embedding_dim": {"grid": DIMS}})})
    summary = sweep(cfg, str(movielens_dir), uri, verbose=False)
    assert isinstance(summary, SweepResult)
    return summary, out, uri


def test_sweep_runs_every_trial_and_stops_weak_ones(swept):
    summary, out, uri = swept
    rows = summary.rows
    assert sorted(r.params["embedding_dim"] for r in rows) == sorted(DIMS)
    assert all(r.status in ("completed", "stopped early") for r in rows)
    assert any(r.status == "stopped early" for r in rows), rows
    assert any(r.status == "completed" for r in rows)
    metrics = [r.metric for r in rows]
    assert metrics == sorted(metrics, reverse=True)  # best first
    sweep_dir = resolve(uri)  # everything is in the bucket, the list of files last
    table = sweep_dir.join("results.txt").read_text()
    assert "stopped early" in table and table.count("\n") == len(DIMS) + 2
    png = sweep_dir.join("metric_by_embedding_dim.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    listed = json.loads(sweep_dir.join("_SUCCESS").read_text())["files"]
    assert {"best_config.yaml", "results.json", "results.txt"} <= set(listed)
    assert listed["results.txt"] == len(table.encode())  # name -> size, as every version
    assert sweep_dir.join(EXPERIMENT).is_dir() and sweep_dir.join("trials").is_dir()


def test_the_sweep_folder_reads_through_the_publish_readers(swept):
    """The sweep publishes its folder in place, with the _SUCCESS of every published folder:
    current() reads it as it is, checked against that list."""
    summary, out, uri = swept
    folder = current(uri)
    assert folder.uri == resolve(uri).uri and version_of(uri) is None
    assert version_uri(uri) == uri
    assert set(read_success(folder)) == {"best_config.yaml", "metric_by_embedding_dim.png",
                                         "results.json", "results.txt"}
    assert summary.best_config == folder.join("best_config.yaml").uri
    assert summary.plot == folder.join("metric_by_embedding_dim.png").uri


def test_sweep_is_tracked_as_a_parent_run_with_a_child_per_trial(swept):
    import mlflow

    from app.core import tracking

    summary, out, uri = swept
    cfg = load_config(overrides={"workdir": str(out / "work")})
    exp = tracking.configure(cfg.cluster)
    client = mlflow.MlflowClient()
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert "best.embedding_dim" in parent.data.params
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    assert len(children) == len(DIMS)
    status = {r.trial: r.status for r in summary.rows}
    want = {"completed": "FINISHED", "stopped early": "KILLED"}
    assert {c.data.tags["trial_id"]: c.info.status for c in children} == \
        {t: want[s] for t, s in status.items()}
    assert any(client.get_metric_history(c.info.run_id, "val_recall_at_20") for c in children)


def test_best_config_retrains_to_the_same_metric(swept, movielens_dir, tmp_path):
    from app.train.driver import train

    summary, out, uri = swept
    best_file = f"{uri}/best_config.yaml"
    assert summary.best_config == best_file
    assert yaml.safe_load(resolve(best_file).read_text())["model"]["embedding_dim"] == \
        summary.best.params["embedding_dim"]
    cfg = load_config(best_file, {"workdir": str(tmp_path)})  # taken as is, from the bucket
    result = train(cfg, str(movielens_dir), str(tmp_path / "model"), verbose=False)
    assert result.history[-1]["val_recall@20"] == pytest.approx(summary.best.metric,
                                                                    abs=0.01)


def test_resume_restores_a_finished_sweep_without_rerunning(swept, movielens_dir):
    from app.tune import sweep

    summary, out, uri = swept
    cfg = load_config(overrides={
        "workdir": str(out / "work"), "epochs": 2, "num_workers": 2, "resume": True,
        "search_alg": "random", "search_space": json.dumps({"embedding_dim": {"grid": DIMS}})})
    t0 = time.perf_counter()
    again = sweep(cfg, str(movielens_dir), uri, verbose=False)
    assert time.perf_counter() - t0 < 60
    assert [r.metric for r in again.rows] == [r.metric for r in summary.rows]
    assert again.parent_run_id == summary.parent_run_id


@pytest.mark.slow  # a sweep
def test_a_sweep_that_cannot_fit_fails_at_once(ray_local, movielens_dir, tmp_path):
    from app.tune import sweep

    cfg = load_config(overrides={"workdir": str(tmp_path), "num_workers": 2,
                                 "max_concurrent": 2})
    t0 = time.perf_counter()
    with pytest.raises(ResourceError, match="--max-concurrent 2 trials x 2 worker"):
        sweep(cfg, str(movielens_dir), str(tmp_path / "sweep"), verbose=False)
    assert time.perf_counter() - t0 < 30


def test_search_space_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--search-space names 'workdir'"):
        load_config(overrides={"search_space": '{"workdir": {"choice": ["a"]}}'})
    with pytest.raises(ConfigError, match="--search-space entry embedding_dim"):
        load_config(overrides={"search_space": '{"embedding_dim": {"normal": [1, 2]}}'})
    with pytest.raises(ConfigError, match="--search-alg optuna does not take grid"):
        load_config(overrides={"search_space": '{"embedding_dim": {"grid": [8, 16]}}'})


def test_search_space_becomes_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    from app.tune import tune_space

    space = tune_space(load_config().tune.search_space)
    assert isinstance(space["embedding_dim"], Categorical)
    assert isinstance(space["dense_lr"], Float)
    assert space["embedding_dim"].categories == [32, 64, 128]
    assert isinstance(space["history_dropout"], Float)
