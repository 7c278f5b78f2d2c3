"""Every stage on an object store: inputs and outputs on a real S3 API server (moto), nothing
written under the current folder or elsewhere on local disk but the declared cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.dataset import SPLITS, read_manifest, read_split_arrays
from app.prepare import prepare_dataset
from app.publish import SUCCESS, current, local_dir, version_uri
from app.storage import CACHE_ENV, resolve
from tests.conftest import data_config, write_lfs_csv


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
    counts = manifest["counts"]
    assert counts["read"] == table.num_rows + 1 and counts["rejected"] >= 1
    # every node reads one local copy of the version, checked against _SUCCESS
    assert read_manifest(f"{s3}/data") == manifest
    local = local_dir(f"{s3}/data")
    assert local.is_relative_to(cache)
    rows = {s: read_split_arrays(local / s) for s in SPLITS}
    assert {s: len(r["user"]) for s, r in rows.items()} == counts["splits"]
    rejects = pq.read_table(local / "rejects" / "malformed-lines.parquet").to_pylist()
    assert [r["text"] for r in rejects] == ["u1,2,3.0,2020-01-01 00:00:00,extra"]
    assert version_uri(f"{s3}/data") == version.uri

    # mosaicml-streaming reads the shards from the bucket itself (remote + a local cache)
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=f"{version.uri}/train", local=str(cache / "stream"),
                          shuffle=False, batch_size=1)
    got = np.array([ds[i]["user"] for i in range(len(ds))])
    assert len(ds) == counts["splits"]["train"] and (got == rows["train"]["user"]).all()


def test_training_reads_a_dataset_in_a_bucket_and_publishes_the_model_there(
        ray_local, s3, isolated):
    from app.config import load_config
    from app.serving import Recommender
    from app.train import train

    cwd, cache = isolated
    prepare_dataset(data_config(), f"{s3}/data", verbose=False)
    cfg = load_config(overrides={"epochs": 2, "num_workers": 2, "workdir": f"{s3}/work",
                                 "registered_model_name": "two-tower-s3"})
    summary = train(cfg, f"{s3}/data", f"{s3}/model", verbose=False)
    assert _local_files(cwd) == []
    model = current(f"{s3}/model")
    assert summary["model_dir"] == model.uri
    files = dict(model.files())
    assert {"weights.pt", "model.json", "vocab/users.parquet", "mlflow.json"} <= set(files)
    # the checkpoints went to the bucket through Ray Train's storage
    assert summary["checkpoint"].startswith(f"{s3}/work/checkpoints/train-model-")
    ckpt = resolve(summary["checkpoint"])
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 2
    # MLflow's artifacts are in the bucket too
    info = json.loads((model / "mlflow.json").read_text())
    assert any(f.startswith("mlartifacts/") for f, _ in resolve(f"{s3}/work").files())
    assert info["registered_uri"].startswith("models:/two-tower-s3/")
    # served from the bucket: the model folder's copy in this node's cache
    rec = Recommender(f"{s3}/model")
    assert rec.model_dir.is_relative_to(cache)
    top = rec.recommend(rec.user_ids.iloc[:2].tolist(), k=5)
    assert len(top) == 10 and not top["fallback"].any()
