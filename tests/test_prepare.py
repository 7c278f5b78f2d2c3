"""The data stage end to end on the real stack: Ray Data, MDS files on disk, StreamingDataset."""

from __future__ import annotations

import filecmp
import functools
import http.server
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from streaming import StreamingDataset

from app.core.publish import current
from app.data.dataset import SPLITS, Manifest, load_vocab, read_manifest, read_split_arrays
from app.data.prepare import InteractionSink, prepare_dataset
from app.data.reader import InteractionStream
from app.data.sources import DataError
from pipelines import prepare_data
from tests.conftest import data_config, movielens_table, write_lfs_csv


def streaming_rows(split_dir: Path) -> int:
    """Rows a StreamingDataset reads back from the split; a sample of them is decoded one at a
    time by StreamingDataset itself and compared with the batch reader."""
    ds = InteractionStream(str(split_dir), batch_size=4096)
    batches = list(ds.iter_batches())
    n = sum(len(b["user"]) for b in batches)
    assert n == len(ds)
    plain = StreamingDataset(local=str(split_dir), batch_size=1, shuffle=False)
    rows = read_split_arrays(split_dir)
    for i in np.linspace(0, n - 1, 7).astype(int):
        assert {k: rows[k][i] for k in rows} == plain[int(i)]
    return n


def check_counts_add_up(out: Path) -> Manifest:
    m = read_manifest(out)
    c = m.counts
    assert c.read == c.accepted + c.rejected
    assert c.rejected == sum(c.rejected_by_reason.values())
    # repeated (user, item) rows merged by --duplicates are accepted but not written twice
    assert sum(c.splits.values()) == c.accepted - c.duplicates.rows_merged
    return m


def test_movielens_small(movielens_dir):
    m = check_counts_add_up(movielens_dir)
    assert m.counts.read == 100_004 and m.counts.rejected == 0
    for split in SPLITS:
        assert streaming_rows(movielens_dir / split) == m.counts.splits[split]
    # 0.7 / 0.2 / 0.1 within sampling noise
    assert abs(m.counts.splits["train"] / 100_004 - 0.7) < 0.01
    vocab = load_vocab(movielens_dir)
    assert m.vocab.users == len(vocab["users"]) == 671
    assert m.vocab.items == len(vocab["items"]) == 9066
    # ids map to distinct indices 1..N (no collisions, 0 reserved), and back to the raw ids
    assert vocab["items"]["index"].to_pylist() == list(range(1, 9067))
    raw = movielens_table()
    train = read_split_arrays(movielens_dir / "train")
    ids = pc.take(vocab["items"]["id"], pa.array(train["item"][:50] - 1)).to_pylist()
    assert set(ids) <= set(raw["movieId"].to_pylist())
    assert "title" in vocab["items"].column_names and vocab["items"]["title"][0].as_py()
    assert 0 < m.counts.positives["train"] < m.counts.splits["train"]
    assert (train["label"] == (train["rating"] >= 4.0)).all()


def test_lfs_csv_with_string_user_ids(ray_local, tmp_path):
    written = write_lfs_csv(tmp_path / "in" / "item_ratings.csv")
    out = tmp_path / "lfs"
    prepare_dataset(data_config(dataset="lfs", input=str(tmp_path / "in")), str(out),
                    verbose=False)
    m = check_counts_add_up(out)
    assert m.counts.accepted == written.num_rows
    assert m.vocab.user_id_type == "string"
    users = load_vocab(out)["users"]["id"].to_pylist()
    assert set(users) == set(written["userId"].to_pylist())
    for split in SPLITS:
        assert streaming_rows(current(out) / split) == m.counts.splits[split]
    ts = np.concatenate([read_split_arrays(current(out) / s)["timestamp"] for s in SPLITS])
    assert ts.min() > 800_000_000  # datetimes parsed to epoch seconds


def test_lfs_download_from_a_served_zip(ray_local, tmp_path):
    write_lfs_csv(tmp_path / "src" / "lfs" / "item_ratings.csv", rows=3000)
    served = tmp_path / "www"
    served.mkdir()
    with zipfile.ZipFile(served / "learning-from-sets-2019.zip", "w") as z:
        z.write(tmp_path / "src" / "lfs" / "item_ratings.csv", "lfs/item_ratings.csv")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/learning-from-sets-2019.zip"
        out = tmp_path / "out"
        prepare_dataset(data_config(dataset="lfs", download_url=url), str(out), verbose=False)
    finally:
        server.shutdown()
    assert check_counts_add_up(out).counts.accepted == 3000
    assert not (current(out) / "_scratch").exists()  # the download is not part of the dataset


def test_synthetic(ray_local, tmp_path):
    out = tmp_path / "syn"
    # the generator's rows as generated (its repeated pairs are part of its popularity skew)
    prepare_dataset(data_config(dataset="synthetic", rows=300_000, duplicates="keep"), str(out),
                    verbose=False)
    m = check_counts_add_up(out)
    assert m.counts.accepted == 300_000
    for split in SPLITS:
        assert streaming_rows(current(out) / split) == m.counts.splits[split]
    train = read_split_arrays(current(out) / "train")
    counts = np.bincount(train["item"])
    top = np.sort(counts)[::-1]
    assert top[: len(top) // 100].sum() > 0.1 * counts.sum()  # popularity skew


MALFORMED = """userId,movieId,rating,timestamp
1,10,4.0,1260759144
1,11,3.5,1260759145

2,,4.0,1260759146
2,12,abc,1260759147
3,13,9.5,1260759148
3,14,NaN,1260759149
,15,4.0,1260759150
4,16,2.0,not-a-time
4,17,4.5,1260759151,extra
5,18,5.0,1260759152
5,19,1.0,
"""


def test_malformed_rows_are_quarantined_with_reasons(ray_local, tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text(MALFORMED)
    out = tmp_path / "out"
    prepare_dataset(data_config(dataset="csv", input=str(src)), str(out), verbose=False)
    m = check_counts_add_up(out)
    assert m.counts.read == 12 and m.counts.accepted == 3
    assert m.counts.rejected_by_reason == {
        "empty row": 1,
        "malformed line: expected 4 fields, got 5": 1,
        "missing movieId": 1, "missing userId": 1, "missing timestamp": 1,
        "unparsable rating": 2, "rating outside [0.5, 5]": 1, "unparsable timestamp": 1}
    rejects = pa.concat_tables([pq.read_table(p).select(["reason"])
                                for p in sorted((current(out) / "rejects").glob("*.parquet"))])
    assert rejects.num_rows == 9
    rows = [r for p in sorted((current(out) / "rejects").glob("part-*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    assert {"userId": "2", "movieId": "12", "rating": "abc", "timestamp": "1260759147",
            "reason": "unparsable rating"} in rows
    lines = pq.read_table(current(out) / "rejects" / "malformed-lines.parquet").to_pylist()
    assert [r["text"] for r in lines] == ["4,17,4.5,1260759151,extra"]
    kept = np.concatenate([read_split_arrays(current(out) / s)["rating"] for s in SPLITS])
    assert sorted(kept.tolist()) == [3.5, 4.0, 5.0]


@pytest.mark.parametrize("content, message", [
    ("userId,movieId,timestamp\n1,2,3\n", "missing required column 'rating'"),
    # a stray space in the header is shown, quoted, and named as the near miss
    ("userId ,movieId,rating,timestamp\n1,2,3,4\n",
     "missing required column 'userId' (found: 'userId ', 'movieId', 'rating', 'timestamp'); "
     "'userId ' differs from it only in spaces or case"),
    ("", "file is empty"),
    ("userId,movieId,rating,timestamp\n", "no valid rows"),
    (None, "no such file or directory"),
])
def test_bad_inputs_exit_nonzero_and_leave_nothing(ray_local, tmp_path, capsys, content,
                                                   message):
    src = tmp_path / "in.csv"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out"
    code = prepare_data.main(["--dataset", "csv", "--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err and len(err.splitlines()) == 1, err
    assert str(src) in err
    assert not out.exists()


def test_parquet_source_and_mean_label(ray_local, tmp_path):
    t = movielens_table().slice(0, 10_000)
    (tmp_path / "pq").mkdir()
    pq.write_table(t.slice(0, 5000), tmp_path / "pq" / "a.parquet")
    pq.write_table(t.slice(5000), tmp_path / "pq" / "b.parquet")
    out = tmp_path / "out"
    prepare_dataset(data_config(dataset="parquet", input=str(tmp_path / "pq" / "*.parquet"),
                                label_rule="mean"), str(out), verbose=False)
    m = check_counts_add_up(out)
    assert m.counts.accepted == 10_000
    mean = float(pc.mean(t["rating"]).as_py())
    assert abs(m.label.threshold - mean) < 1e-9
    rows = {s: read_split_arrays(current(out) / s) for s in SPLITS}
    for r in rows.values():
        assert (r["label"] == (r["rating"] >= np.float32(mean))).all()


def test_temporal_split_holds_out_each_users_latest(ray_local, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(data_config(split="temporal"), str(out), verbose=False)
    m = check_counts_add_up(out)
    s = {name: read_split_arrays(current(out) / name) for name in SPLITS}
    last_train = np.zeros(700, np.int64)
    np.maximum.at(last_train, s["train"]["user"], s["train"]["timestamp"])
    first_test = np.full(700, np.iinfo(np.int64).max)
    np.minimum.at(first_test, s["test"]["user"], s["test"]["timestamp"])
    users = np.unique(s["test"]["user"])
    assert len(users) > 600
    assert (last_train[users] <= first_test[users]).all()
    assert abs(m.counts.splits["test"] / m.counts.accepted - 0.1) < 0.02


def test_same_input_same_output(ray_local, movielens_dir, tmp_path):
    again = tmp_path / "again"
    prepare_dataset(data_config(), str(again), verbose=False)
    again = current(again)
    files = sorted(p.relative_to(movielens_dir) for p in movielens_dir.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    assert files == sorted(p.relative_to(again) for p in again.rglob("*")
                           if p.is_file() and p.name != "manifest.json")
    for f in files:
        assert filecmp.cmp(movielens_dir / f, again / f, shallow=False), f
    a, b = (Manifest.read(d).to_dict() for d in (movielens_dir, again))
    for key in ("counts", "vocab", "label", "split"):
        assert a[key] == b[key]


def test_interrupted_run_leaves_nothing_and_rerun_succeeds(ray_local, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = data_config(dataset="synthetic", rows=50_000)

    def crash(self, result):
        raise KeyboardInterrupt  # as if stopped while the indexes were being merged

    monkeypatch.setattr(InteractionSink, "on_write_complete", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, str(out), verbose=False)
    assert not out.exists()  # no version, no partial folder, no lease
    monkeypatch.undo()
    # a run killed outright leaves its hidden partial folder; it never looks complete, and
    # the next writer (holding the lease) removes it
    (out / ".partial-v-000001-20260101T000000Z" / "train").mkdir(parents=True)
    prepare_dataset(cfg, str(out), verbose=False)
    assert check_counts_add_up(out).counts.accepted == 50_000
    first = current(out).name
    assert sorted(p.name for p in out.iterdir()) == ["CURRENT", first]
    # an existing dataset is replaced only on request, by a new version
    with pytest.raises(DataError, match="--overwrite"):
        prepare_dataset(cfg, str(out), verbose=False)
    cfg.overwrite = True
    prepare_dataset(cfg, str(out), verbose=False)
    assert current(out).name != first
    assert sorted(p.name for p in out.iterdir()) == sorted(["CURRENT", first, current(out).name])


def test_csv_folder_with_a_header_only_file(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("userId,movieId,rating,timestamp\n")
    (tmp_path / "in" / "b.csv").write_text("userId,movieId,rating,timestamp,extra\n"
                                           "1,2,4.0,1260759144,x\n7,8,2.0,1260759145,y\n")
    out = tmp_path / "out"
    prepare_dataset(data_config(dataset="csv", input=str(tmp_path / "in"), split="temporal"),
                    str(out), verbose=False)
    assert check_counts_add_up(out).counts.accepted == 2


def test_tab_separated_input_is_parsed_as_such(ray_local, tmp_path):
    rows = "".join(f"u{i % 7}\t{i % 11}\t{1 + i % 5}.0\t{1260759144 + i}\n" for i in range(60))
    (tmp_path / "r.tsv").write_text("userId\tmovieId\trating\ttimestamp\n" + rows)
    out = tmp_path / "out"
    prepare_dataset(data_config(dataset="csv", input=str(tmp_path / "r.tsv")), str(out),
                    verbose=False)
    manifest = check_counts_add_up(out)
    assert manifest.counts.accepted == 60 and manifest.counts.rejected == 0
    assert pq.read_table(current(out) / "vocab" / "users.parquet")["id"].to_pylist() == \
        [f"u{i}" for i in range(7)]
    # one read takes one kind of separator
    (tmp_path / "mixed").mkdir()
    shutil.copy(tmp_path / "r.tsv", tmp_path / "mixed" / "a.tsv")
    (tmp_path / "mixed" / "b.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.0,1\n")
    with pytest.raises(DataError, match="mixes tab-separated"):
        prepare_dataset(data_config(dataset="csv", input=str(tmp_path / "mixed")),
                        str(tmp_path / "out2"), verbose=False)
