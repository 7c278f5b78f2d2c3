"""The split reader: StreamingDataset partitioning under Ray Train, KeyedJaggedTensor batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from app.data.dataset import read_split_arrays
from app.data.reader import InteractionStream, ItemFeatures
from app.train.batches import candidate_kjt, query_kjt


def test_batches_cover_the_split_once_per_epoch_and_reshuffle(movielens_dir):
    rows = read_split_arrays(movielens_dir / "val")
    ds = InteractionStream(str(movielens_dir / "val"), batch_size=1000, shuffle=True,
                           shuffle_seed=7)
    epochs = []
    for _ in range(2):
        batches = list(ds.iter_batches())
        assert all(len(b["user"]) == 1000 for b in batches[:-1])
        got = np.concatenate([b["user"].astype(np.int64) * 100_000 + b["item"]
                              for b in batches])
        epochs.append(got)
    want = np.sort(rows["user"].astype(np.int64) * 100_000 + rows["item"])
    for got in epochs:
        assert np.array_equal(np.sort(got), want)  # every row once
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch


def test_release_removes_the_streams_shared_memory_and_locks(movielens_dir):
    """A stream's shared memory blocks and file locks are named by its prefix; after
    release() none of them is left, and batches already being read still decode."""
    import tempfile

    ds = InteractionStream(str(movielens_dir / "val"), batch_size=1000)
    tag = f"{ds._shm_prefix_int:06}_"
    first = next(ds.iter_batches())

    def left() -> list[str]:
        return sorted([n for n in os.listdir("/dev/shm") if n.startswith(tag)]
                      + [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(tag)])

    assert any(n.endswith("_locals") for n in left()), left()  # what the stream made
    assert any(n.endswith("_filelock") for n in left()), left()
    ds.release()
    assert left() == []
    assert len(first["user"]) == 1000 and ds.size > 0
    ds.release()  # twice is harmless


def test_kjt_from_a_batch(movielens_dir):
    genres = ItemFeatures.genres(movielens_dir)
    assert genres is not None and "Drama" in genres.vocab
    batch = next(InteractionStream(str(movielens_dir / "train"), batch_size=512).iter_batches())
    query = query_kjt(batch["user"])
    assert query.keys() == ["user_id"] and query.stride() == 512
    assert torch.equal(query.to_dict()["user_id"].values(),
                       torch.from_numpy(batch["user"].astype(np.int64)))
    kjt = candidate_kjt(batch["item"], [genres])
    assert kjt.keys() == ["item_id", "item_genres"]
    assert kjt.stride() == 512
    d = kjt.to_dict()
    assert torch.equal(d["item_id"].values(), torch.from_numpy(batch["item"].astype(np.int64)))
    # the vectorised genre lookup agrees with a plain per-item reading of the metadata
    from app.data.dataset import load_vocab

    text = load_vocab(movielens_dir)["items"]["genres"].to_pylist()
    per_row = d["item_genres"].to_dense()
    assert len(per_row) == 512
    for row in (0, 17, 511):
        names = [genres.vocab[v] for v in per_row[row].tolist()]
        g = text[batch["item"][row] - 1]
        assert names == ([] if g in (None, "(no genres listed)") else g.split("|"))


def _read_partition(config: dict) -> None:
    """Ray Train worker: read this rank's partition of the split and record it."""
    import ray.train

    import torch

    from app.train.inputs import training_share

    ctx = ray.train.get_context()
    ds = InteractionStream(config["split"], batch_size=256)
    batches = list(ds.iter_batches())
    users = np.concatenate([b["user"] for b in batches]).tolist()
    items = np.concatenate([b["item"] for b in batches]).tolist()
    # a softmax's epoch share: this rank's positives, evened out with the other rank's
    share = training_share(ds, ds.epoch_sample_ids(epoch=0), torch.device("cpu"), 1000,
                           positives_only=True)
    Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(
        json.dumps({"pairs": list(zip(users, items)), "world": ctx.get_world_size(),
                    "positive_ids": share.ids.tolist(), "batch_size": share.batch_size,
                    "total_rows": share.total_rows}))


@pytest.mark.slow  # a Ray Train worker group
def test_two_ray_train_workers_each_read_their_half(ray_local, movielens_dir, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "parts"
    out.mkdir()
    TorchTrainer(_read_partition,
                 train_loop_config={"split": str(movielens_dir / "test"), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(storage_path=str(tmp_path / "runs"))).fit()
    parts = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(p["world"] == 2 for p in parts)
    rows = read_split_arrays(movielens_dir / "test")
    want = sorted(zip(rows["user"].tolist(), rows["item"].tolist()))
    a, b = (sorted(map(tuple, p["pairs"])) for p in parts)
    assert abs(len(a) - len(b)) <= 1 and len(a) > 0.45 * len(want)
    assert sorted(a + b) == want  # together exactly the split, no row read twice
    # a softmax epoch: as many positive ids on each rank (TorchRec's row-wise tables need
    # batches of one size), each a positive, none twice, fewer than 2 left out
    pos0, pos1 = (p["positive_ids"] for p in parts)
    positives = int((rows["label"] > 0).sum())
    assert len(pos0) == len(pos1) == positives // 2 and not set(pos0) & set(pos1)
    ds = InteractionStream(str(movielens_dir / "test"), batch_size=256)
    assert (ds.gather(np.array(pos0 + pos1), ("label",))["label"] > 0).all()
    assert parts[0]["batch_size"] == parts[1]["batch_size"] \
        == round(1000 * positives / len(want))  # as many positives a step as 1,000 rows hold
    assert parts[0]["total_rows"] == len(want) - positives % 2


def test_reader_rejects_a_dataset_that_does_not_match(tmp_path, movielens_dir):
    import shutil

    from app.data.dataset import DatasetError, read_manifest

    bad = tmp_path / "bad"
    shutil.copytree(movielens_dir, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="schema version 99"):
        read_manifest(bad)
    shard = next((bad / "val").rglob("shard.00000.mds"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        read_split_arrays(bad / "val")


def test_reading_a_split_does_not_import_transformers():
    """mosaicml-streaming's package imports transformers (its text datasets); a training
    worker imports only what reading MDS splits needs, and the package's names still work."""
    import subprocess
    import sys

    code = ("import sys, app.train.loop, app.data.reader as r\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "from streaming import StreamingDataset, MDSWriter, Stream\n"
            "import streaming\n"
            "assert StreamingDataset is r.StreamingDataset and Stream is r.Stream\n"
            "assert streaming.__version__ and MDSWriter.__name__ == 'MDSWriter'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
