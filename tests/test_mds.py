import filecmp
import os

import numpy as np
import pytest
from streaming import MDSWriter, StreamingDataset

from app.data.mds import INTERACTION_COLUMNS, write_mds_columns


def columns(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"user": rng.integers(1, 1000, n).astype(np.int32),
            "item": rng.integers(1, 500, n).astype(np.int32),
            "label": rng.integers(0, 2, n).astype(np.uint8),
            "rating": rng.random(n).astype(np.float32),
            "timestamp": rng.integers(0, 2**40, n)}


def test_columnar_writer_matches_mdswriter_byte_for_byte(tmp_path):
    cols = columns(7000)
    write_mds_columns(str(tmp_path / "fast"), cols, size_limit=1 << 16)
    with MDSWriter(columns=INTERACTION_COLUMNS, out=str(tmp_path / "ref"),
                   size_limit=1 << 16) as w:
        for i in range(7000):
            w.write({k: v[i] for k, v in cols.items()})
    files = sorted(os.listdir(tmp_path / "ref"))
    assert len(files) > 3  # several shards, so shard boundaries are compared too
    assert sorted(os.listdir(tmp_path / "fast")) == files
    for f in files:
        assert filecmp.cmp(tmp_path / "fast" / f, tmp_path / "ref" / f, shallow=False), f


def test_streaming_dataset_reads_back_every_row(tmp_path):
    cols = columns(3000, seed=1)
    write_mds_columns(str(tmp_path / "d"), cols, size_limit=1 << 16)
    ds = StreamingDataset(local=str(tmp_path / "d"), batch_size=1, shuffle=False)
    assert len(ds) == 3000
    for i in (0, 1234, 2999):
        s = ds[i]
        assert s["user"] == cols["user"][i] and s["timestamp"] == cols["timestamp"][i]
        assert s["rating"] == cols["rating"][i]


def test_a_splits_columns_are_read_alone_and_an_unknown_one_is_named(movielens_dir):
    from app.core.publish import current
    from app.data.dataset import DatasetError, read_split_arrays

    split = current(movielens_dir) / "val"
    every = read_split_arrays(split)
    some = read_split_arrays(split, ("user", "label"))
    assert list(some) == ["user", "label"] and len(some["user"]) == len(every["user"]) > 0
    for name in some:
        assert np.array_equal(some[name], every[name]) and some[name].dtype == every[name].dtype
    with pytest.raises(DatasetError, match="no column 'score'"):
        read_split_arrays(split, ("user", "score"))
