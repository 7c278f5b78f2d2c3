"""Every stage on an object store: inputs and outputs on a real S3 API server (moto), nothing
written under the current folder or elsewhere on local disk but the declared cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.core.publish import SUCCESS, current, local_dir, version_uri
from app.core.storage import CACHE_ENV, resolve
from app.data.dataset import SPLITS, read_manifest, read_split_arrays
from app.data.prepare import prepare_dataset
from tests.conftest import ROOT, data_config, write_lfs_csv

pytestmark = pytest.mark.slow  # two-node runs from a bucket


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty current folder, to check that nothing lands there, and the node cache (the
    session's, which Ray's workers use too)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd, Path(os.environ[CACHE_ENV])


def _local_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_dataset_prepared_into_a_bucket_from_a_bucket(ray_local, s3, tmp_path, isolated):
    cwd, cache = isolated
    src = tmp_path / "ratings.csv"
    table = write_lfs_csv(src, rows=3000)
    with src.open("a") as f:
        f.write("u1,2,3.0,2020-01-01 00:00:00,extra\n")  # a malformed line, quarantined
    resolve(f"{s3}/raw/ratings.csv").write_bytes(src.read_bytes())

    manifest = prepare_dataset(data_config(dataset="csv", input=f"{s3}/raw/ratings.csv"),
                               f"{s3}/data", verbose=False)
    assert _local_files(cwd) == []
    version = current(f"{s3}/data")
    files = dict(version.files())
    assert {"manifest.json", "vocab/users.parquet", "vocab/items.parquet", "train/index.json",
            "rejects/malformed-lines.parquet", SUCCESS} <= set(files)
    assert [f for f in files if f.startswith("_")] == [SUCCESS]  # no scratch left behind
    counts = manifest.counts
    assert counts.read == table.num_rows + 1 and counts.rejected >= 1
    # every node reads one local copy of the version, checked against _SUCCESS
    assert read_manifest(f"{s3}/data") == manifest
    local = local_dir(f"{s3}/data")
    assert local.is_relative_to(cache)
    rows = {s: read_split_arrays(local / s) for s in SPLITS}
    assert {s: len(r["user"]) for s, r in rows.items()} == counts.splits
    rejects = pq.read_table(local / "rejects" / "malformed-lines.parquet").to_pylist()
    assert [r["text"] for r in rejects] == ["u1,2,3.0,2020-01-01 00:00:00,extra"]
    assert version_uri(f"{s3}/data") == version.uri

    # mosaicml-streaming reads the shards from the bucket itself (remote + a local cache)
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=f"{version.uri}/train", local=str(cache / "stream"),
                          shuffle=False, batch_size=1)
    got = np.array([ds[i]["user"] for i in range(len(ds))])
    assert len(ds) == counts.splits["train"] and (got == rows["train"]["user"]).all()


def check_node_folder_on_both_nodes(folder: Path) -> None:
    """A folder handed to tasks as a NodeFolder: read in place on its node, fetched (packed
    by a task there) and unpacked on the other node, the same files either way."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from app.core.storage import NodeFolder

    (folder / "vocab").mkdir(parents=True)
    files = {"weights.pt": os.urandom(3000), "vocab/users.parquet": b"ids"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    where = NodeFolder.here(folder)

    @ray.remote(num_cpus=0)
    def read(f: NodeFolder) -> tuple[str, dict[str, bytes]]:
        local = Path(f.local())
        return str(local), {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*")
                            if p.is_file() and p.name != ".complete"}  # the cache's marker

    for node in (n["NodeID"] for n in ray.nodes() if n["Alive"]):
        on = NodeAffinitySchedulingStrategy(node, soft=False)
        path, got = ray.get(read.options(scheduling_strategy=on).remote(where))
        assert got == files
        assert (path == str(folder)) == (node == where.node_id), (path, node)


def test_full_run_on_two_nodes_with_the_workdir_in_a_bucket(ray_local, s3, tmp_path,
                                                            isolated):
    """The README's cluster recipe: two nodes, every output in the bucket (dataset, model,
    checkpoints, MLflow artifacts, recommendations), the workers reading nothing from the
    driver's disk; a training worker SIGKILLed in epoch 2 resumes from the bucket's
    checkpoint; ``--resume`` later continues from there; batch inference reads a users file
    in the bucket and the model from it. The mnmg placement puts one worker on each node
    (CPU workers standing in for GPUs), trained with the pointwise (bce) objective."""
    import ray
    from ray.cluster_utils import Cluster

    from app.core.config import load_config
    from app.serve.batch import RecommendationsSummary, batch_inference
    from app.serve.core import Recommender
    from app.train.driver import train
    from app.run import run
    from tests.conftest import start_local_ray
    from tests.test_train import kill_a_worker_in_epoch_two

    cwd, driver_cache = isolated
    # the nodes' cache, not the driver's: what the workers read came from the bucket. (Both
    # nodes run on this machine and share it, as Ray nodes of one host do: mosaicml-streaming
    # keys its shared memory in /dev/shm by these paths)
    node_cache = tmp_path / "node-cache"
    workdir = f"{s3}/run"
    settings = {"topology": "mnmg", "accelerator": "cpu", "num_workers": 2, "objective": "bce",
                "workdir": workdir, "registered_model_name": "two-tower-s3-run"}
    ray.shutdown()  # this test needs its own cluster; the session's local Ray comes back after
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "env_vars": {CACHE_ENV: str(node_cache)}})
    killed: list[int] = []
    try:
        cluster.add_node(num_cpus=1, env_vars={CACHE_ENV: str(node_cache)})
        cluster.wait_for_nodes()
        # (the workers import the project from its folder: this process's cwd is elsewhere)
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        check_node_folder_on_both_nodes(tmp_path / "folder")
        checkpoints = resolve(f"{workdir}/checkpoints")
        killer = kill_a_worker_in_epoch_two(lambda: any(
            f.endswith("/state.json") for f, _ in checkpoints.files()), killed)
        summary = run(load_config(overrides={**settings, "epochs": 2}), refit=False)
        killer.join()
        assert killed, "no training worker was found to kill"
        trained = summary.stages["train"].metrics
        assert trained["epochs"] == 2 and trained["resumed_at_epochs"] == [1]

        top = resolve(workdir).children()
        assert {"data", "model", "recommendations", "checkpoints", "mlartifacts",
                "config.yaml", "summary.json", "val_metrics.png"} <= set(top)
        assert ".lease" not in top  # the run's lease was released
        model = current(f"{workdir}/model")
        assert {"weights.pt", "model.json", "vocab/users.parquet", "mlflow.json"} <= \
            {f for f, _ in model.files()}
        # mnmg: one worker per node, the sharded tables over both ranks
        plan = json.loads((model / "sharding_plan.json").read_text())
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(set(plan["rank_nodes"])) == 2 and set(plan["rank_nodes"]) <= nodes
        assert {r for t in plan["tables"] if t["sharding_type"] != "data_parallel"
                for r in t["ranks"]} == {0, 1}
        # the pointwise objective reports AUROC; two epochs already separate the labels
        assert 0.55 < trained["model"]["val"]["auroc"] <= 1.0
        info = json.loads((model / "mlflow.json").read_text())
        assert info["registered_uri"].startswith("models:/two-tower-s3-run/")
        assert summary.stages["infer"].output == f"{workdir}/recommendations"
        recs = current(f"{workdir}/recommendations")
        assert pq.read_table(recs.path, filesystem=recs.fs).num_rows == \
            summary.stages["infer"].summary["rows"] > 0
        # the workers read the dataset from the bucket into their nodes' cache
        assert any(p.name.startswith("v-000001-") for p in node_cache.iterdir())
        assert node_cache != driver_cache

        # served from the bucket: the model folder's copy in this machine's cache
        rec = Recommender(f"{workdir}/model")
        assert rec.model_dir.is_relative_to(driver_cache)
        # batch inference: a users file in the bucket, the model from it, the output there
        users = rec.user_ids.iloc[:5].astype(str).tolist()
        resolve(f"{s3}/in/users.csv").write_text("userId\n" + "\n".join(users) + "\n")
        cfg = load_config(overrides=settings)
        done = batch_inference(cfg, f"{workdir}/model", f"{workdir}/data", f"{s3}/recs",
                               users=f"{s3}/in/users.csv", verbose=False)
        out = current(f"{s3}/recs")
        assert done.output == out.uri and done.users == 5
        table = pq.read_table(out.path, filesystem=out.fs)
        assert table.num_rows == done.rows == 5 * done.k
        assert RecommendationsSummary.read(out).model == model.uri
        assert sorted(set(table["userId"].to_pylist())) == sorted(users)  # ids as written

        again = train(load_config(overrides={**settings, "epochs": 3, "resume": True}),
                      f"{workdir}/data", f"{workdir}/model", verbose=False)
        assert again.metrics["resumed_at_epochs"][-1] == 2
        assert [h["epoch"] for h in again.history] == [1, 2, 3]
        assert again.model_dir.startswith(f"{workdir}/model/v-000002-")
        assert _local_files(cwd) == []
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.chdir(ROOT)  # the session's Ray imports the project from its driver's folder
        start_local_ray()
