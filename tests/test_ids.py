"""Exact ids, timestamp policy and duplicate policy through the real data stage (Ray Data, MDS)
and batch inference: ``007``, ``7`` and ``0007`` are three users from the raw file to the
recommendations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.core.config import ConfigError, load_config
from app.core.publish import current
from app.data.dataset import (DatasetError, Duplicates, Manifest, load_vocab, read_manifest,
                              read_split_arrays)
from app.data.prepare import prepare_dataset
from tests.conftest import data_config

PADDED = ["007", "7", "0007", "+7", "12345678901234567890"]


def write_csv(path: Path, rows: list[tuple], header: str = "userId,movieId,rating,timestamp"
              ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def prepare(tmp_path: Path, source: Path, name: str = "data", **overrides) -> tuple[Path, dict]:
    kind = "parquet" if source.suffix == ".parquet" else "csv"
    out = tmp_path / name
    manifest = prepare_dataset(data_config(dataset=kind, input=str(source), **overrides),
                               str(out), verbose=False)
    return current(out), manifest


def rows_by_user(data: Path) -> dict[str, list[tuple]]:
    """Every split's rows as (item id, rating, timestamp, label), keyed by the raw user id."""
    vocab = load_vocab(data)
    users = vocab["users"]["id"].to_pylist()
    items = vocab["items"]["id"].to_pylist()
    out: dict[str, list[tuple]] = {}
    for split in ("train", "val", "test"):
        r = read_split_arrays(data / split)
        for u, i, rating, ts, label in zip(r["user"], r["item"], r["rating"], r["timestamp"],
                                           r["label"]):
            out.setdefault(str(users[u - 1]), []).append(
                (str(items[i - 1]), float(rating), int(ts), int(label)))
    return out


# ---------------------------------------------------------------- ids

def test_zero_padded_and_signed_ids_are_distinct_users(ray_local, tmp_path):
    rows = [(u, 10 + n, 4.0, 1_700_000_000 + n) for n, u in enumerate(PADDED)]
    rows += [("7", 99, 3.0, 1_700_000_100), ("007", 99, 5.0, 1_700_000_100)]
    data, m = prepare(tmp_path, write_csv(tmp_path / "in.csv", rows), val_fraction=0,
                      test_fraction=0)
    users = load_vocab(data)["users"]
    assert sorted(users["id"].to_pylist()) == sorted(PADDED)
    assert users["id"].type == pa.string() and m.vocab.user_id_type == "string"
    assert m.vocab.users == 5 and m.counts.accepted == 7
    got = rows_by_user(data)
    assert got["7"] == [("11", 4.0, 1_700_000_001, 1), ("99", 3.0, 1_700_000_100, 0)]
    assert got["007"] == [("10", 4.0, 1_700_000_000, 1), ("99", 5.0, 1_700_000_100, 1)]
    assert got["0007"] == [("12", 4.0, 1_700_000_002, 1)]
    assert got["+7"] == [("13", 4.0, 1_700_000_003, 1)]
    assert got["12345678901234567890"] == [("14", 4.0, 1_700_000_004, 1)]


def test_integer_ids_keep_an_integer_vocabulary(ray_local, tmp_path):
    rows = [(u, i, 4.0, 1_700_000_000) for u, i in ((1, 5), (20, 5), (3, 6), (-4, 6))]
    data, m = prepare(tmp_path, write_csv(tmp_path / "in.csv", rows), val_fraction=0,
                      test_fraction=0)
    users = load_vocab(data)["users"]["id"]
    assert users.type == pa.int64() and users.to_pylist() == [-4, 1, 3, 20]  # numeric order
    assert m.vocab.item_id_type == "int64"


def test_parquet_float_ids_integral_kept_others_quarantined(ray_local, tmp_path):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "userId": pa.array([1.0, 2.0, 1.5, float("nan"), float("inf"), 3.0]),
        "movieId": pa.array([10, 11, 12, 13, 14, 2**62], pa.int64()),
        "rating": [4.0] * 6, "timestamp": [1_700_000_000] * 6}), source)
    data, m = prepare(tmp_path, source, val_fraction=0, test_fraction=0)
    assert m.counts.rejected_by_reason == {"missing userId": 1,
                                                 "non-integral float userId": 2}
    vocab = load_vocab(data)
    assert vocab["users"]["id"].to_pylist() == [1, 2, 3]  # no user "nan", "1.5" or "inf"
    assert vocab["items"]["id"].to_pylist() == [10, 11, 2**62]  # integers: exact
    rejects = pd.read_parquet(data / "rejects").sort_values("reason")
    assert rejects["reason"].tolist() == ["missing userId", "non-integral float userId",
                                          "non-integral float userId"]
    assert sorted(rejects["userId"].dropna()) == ["1.5", "inf"]


def test_a_vocabulary_with_a_repeated_id_is_refused_when_read(ray_local, tmp_path):
    from app.data.dataset import load_vocab
    from app.data.prepare import _save_vocab

    rows = [(u, 1, 4.0, 1_700_000_000) for u in ("a", "b")]
    data, _ = prepare(tmp_path, write_csv(tmp_path / "in.csv", rows))
    assert set(load_vocab(data)["users"]["id"].to_pylist()) == {"a", "b"}
    path = data / "vocab" / "users.parquet"
    pq.write_table(pa.table({"index": pa.array([1, 2, 3], pa.int32()), "id": [7, 7, 8]}), path)
    with pytest.raises(DatasetError, match=r"users.parquet: id '7' occurs more than once"):
        load_vocab(data)
    with pytest.raises(RuntimeError, match=r"x.parquet: id '7' occurs more than once"):
        _save_vocab(tmp_path / "x.parquet", pa.array([7, 8, 7]))


# ---------------------------------------------------------------- timestamps

def test_timestamps_in_any_unit_and_zone_become_utc_seconds(ray_local, tmp_path):
    s = 1_704_164_645  # 2024-01-02T03:04:05Z
    rows = [("a", 1, 4, s), ("a", 2, 4, s * 1000), ("a", 3, 4, s * 10**6),
            ("a", 4, 4, "2024-01-02T05:04:05+02:00"), ("a", 5, 4, "2024-01-01T21:34:05-0530"),
            ("a", 6, 4, "2024-01-02T03:04:05.25Z"),
            ("b", 1, 4, "1900-01-01"), ("b", 2, 4, "9999-12-31"), ("b", 3, 4, 253402300799)]
    source = write_csv(tmp_path / "in.csv", rows)
    data, m = prepare(tmp_path, source, val_fraction=0, test_fraction=0)
    assert [ts for _, _, ts, _ in rows_by_user(data)["a"]] == [s] * 6
    assert m.counts.rejected_by_reason == {
        "timestamp out of range [1970-01-01, 2100-01-01]": 3}
    assert m.config["timestamp_unit"] == "auto"

    # seconds forced: the millisecond and microsecond values are quarantined, not misdated
    _, m = prepare(tmp_path, source, "forced", timestamp_unit="s",
                   timestamp_max="2030-01-01T00:00:00Z", val_fraction=0, test_fraction=0)
    assert m.counts.rejected_by_reason == {
        "timestamp out of range [1970-01-01, 2030-01-01]": 5}


def test_timestamp_settings_are_checked_and_are_flags():
    from pipelines import prepare_data

    for value in ("yesterday", "2024-13-01"):
        with pytest.raises(ConfigError, match="--timestamp-min must be an ISO-8601 date"):
            load_config(overrides={"timestamp_min": value})
    with pytest.raises(ConfigError, match="--timestamp-min must be before --timestamp-max"):
        load_config(overrides={"timestamp_min": "2101-01-01"})
    cfg = load_config(overrides={"timestamp_max": "2030-01-01T02:00:00+02:00"}).data
    assert cfg.timestamp_bounds() == (0, 1_893_456_000)
    text = prepare_data.build_parser().format_help()
    assert "--timestamp-unit {auto,s,ms,us,ns}" in text
    assert "--duplicates {latest,max,mean,keep}" in text and "--timestamp-max" in text


# ---------------------------------------------------------------- duplicates

REPEATS = [  # user, item, rating, timestamp; (u, 1) four times over two files
    ("u", 1, 3.0, 1_700_000_100),
    ("u", 1, 2.0, 1_700_000_300),
    ("v", 1, 4.0, 1_700_000_000),
    ("u", 2, 5.0, 1_700_000_000),
]
REPEATS_2 = [
    ("u", 1, 4.5, 1_700_000_300),  # the latest, tied with the rating 2 row: higher rating
    ("u", 1, 5.0, 1_700_000_200),  # the highest rating
]


@pytest.mark.parametrize("policy, want_u1", [
    ("latest", [("1", 4.5, 1_700_000_300, 1)]),
    ("max", [("1", 5.0, 1_700_000_200, 1)]),
    ("mean", [("1", 3.625, 1_700_000_300, 0)]),
    ("keep", [("1", 2.0, 1_700_000_300, 0), ("1", 3.0, 1_700_000_100, 0),
              ("1", 4.5, 1_700_000_300, 1), ("1", 5.0, 1_700_000_200, 1)]),
])
def test_duplicate_policies_across_blocks(ray_local, tmp_path, policy, want_u1):
    folder = tmp_path / "in"
    write_csv(folder / "a.csv", REPEATS)
    write_csv(folder / "b.csv", REPEATS_2)  # another file: another block
    out = tmp_path / "data"
    m = prepare_dataset(data_config(dataset="csv", input=str(folder), duplicates=policy,
                                    label_threshold=4.0), str(out), verbose=False)
    got = rows_by_user(current(out))
    assert sorted(r for r in got["u"] if r[0] == "1") == want_u1
    assert got["v"] == [("1", 4.0, 1_700_000_000, 1)]
    assert [r for r in got["u"] if r[0] == "2"] == [("2", 5.0, 1_700_000_000, 1)]
    merged = 0 if policy == "keep" else 3
    assert m.counts.duplicates == Duplicates(policy=policy, rows_merged=merged,
                                             pairs=0 if policy == "keep" else 1)
    assert m.counts.accepted == 6 == sum(m.counts.splits.values()) + merged
    assert m.config["duplicates"] == policy
    if policy != "keep":  # one label per pair
        pairs = [(u, r[0]) for u, rs in got.items() for r in rs]
        assert len(pairs) == len(set(pairs))


def test_merged_rows_are_not_split_temporally(ray_local, tmp_path):
    folder = tmp_path / "in"
    write_csv(folder / "a.csv", REPEATS)
    write_csv(folder / "b.csv", REPEATS_2)
    data, m = prepare(tmp_path, folder, split="temporal")
    got = rows_by_user(data)
    assert sorted(got["u"]) == [("1", 4.5, 1_700_000_300, 1), ("2", 5.0, 1_700_000_000, 1)]
    # two interactions of u, not five: too few to hold any out (five would put one in test)
    assert m.counts.splits == {"train": 3, "val": 0, "test": 0}


def test_duplicates_are_merged_before_the_mean_label_and_reported(ray_local, tmp_path, capsys):
    rows = [("u", 1, 1.0, 1_700_000_000)] * 3 + [("u", 2, 5.0, 1_700_000_000)]
    out = tmp_path / "data"
    m = prepare_dataset(data_config(dataset="csv", input=str(write_csv(tmp_path / "in.csv",
                                                                       rows)),
                                    label_rule="mean"), str(out))
    assert m.label.mean_rating == 3.0  # (1 + 5) / 2: one rating per pair
    assert "duplicates: 2 rows merged into 1 (user, item) pairs (latest)" in \
        capsys.readouterr().out
    assert Manifest.read(current(out)).counts.duplicates.rows_merged == 2
    read_manifest(out)


# ---------------------------------------------------------------- batch inference

def test_inference_id_keys_follow_the_data_stage_rule():
    from app.serve.core import id_keys, lookup, vocab_index
    from app.serve.inputs import with_history_users

    index = vocab_index(pa.array([7, 12], pa.int64()))  # an int64 vocabulary: its ids' text
    keys = id_keys(pd.Series(["007", "7", " 12 ", None]))
    assert keys.tolist()[:3] == ["007", "7", "12"] and keys.isna().tolist()[3]
    assert lookup(index, keys).tolist() == [0, 1, 2, 0]
    assert lookup(index, id_keys(pd.Series([7.0, 7.5, np.nan]))).tolist() == [1, 0, 0]
    assert lookup(index, id_keys(pa.array([12], pa.int32()))).tolist() == [2]
    # users only a history names join an int64 vocabulary as integers when they are ones
    ids = pa.array([7, 12], pa.int64())
    assert with_history_users(ids, {"12": None, "30": None}).to_pylist() == [7, 12, 30]
    assert with_history_users(ids, {"007": None}).to_pylist() == ["7", "12", "007"]
    assert with_history_users(pa.array(["a"]), {"a": None}).to_pylist() == ["a"]



def test_users_file_ids_are_looked_up_exactly(trained, movielens_dir, tmp_path):
    """The movielens model knows user 7, not 007: a CSV users file gets 7's list for "7" and
    the popularity fallback for "007"; Parquet integral floats are integers, others refused."""
    from app.serve.batch import batch_inference

    cfg = load_config(overrides={"workdir": str(trained["work"]), "top_k": 5,
                                 "exclude_rated": "none"})
    write_csv(tmp_path / "users.csv", [("007",), ("7",), (" 7 ",), ("0007",)], header="userId")
    summary = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                              str(tmp_path / "r"), users=str(tmp_path / "users.csv"),
                              verbose=False)
    assert summary.users == 3 and summary.duplicate_users_dropped == 1
    df = pd.read_parquet(current(tmp_path / "r"))
    first = df[df["rank"] == 1].set_index("userId")
    assert first.loc["7", "source"] == "model"
    assert first.loc["007", "fallback"] and first.loc["0007", "fallback"]

    pq.write_table(pa.table({"userId": [7.0]}), tmp_path / "floats.parquet")
    batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir), str(tmp_path / "f"),
                    users=str(tmp_path / "floats.parquet"), verbose=False)
    got = pd.read_parquet(current(tmp_path / "f")).sort_values("rank")
    assert got["userId"].tolist() == [7] * 5
    assert got["movieId"].tolist() == df[df["userId"] == "7"].sort_values("rank")[
        "movieId"].tolist()
    pq.write_table(pa.table({"userId": [7.0, 7.5]}), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match=r"bad.parquet: 1 row\(s\) with a missing or "
                                           r"non-integral float userId"):
        batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                        str(tmp_path / "b"), users=str(tmp_path / "bad.parquet"),
                        verbose=False)


@pytest.mark.slow  # a training run
def test_padded_ids_end_to_end_through_training(ray_local, tmp_path):
    """Prepare -> train -> batch inference on users 007, 7 and 0007: each gets its own list,
    the one the model computes for its own index."""
    from app.serve.batch import batch_inference
    from app.serve.core import Recommender
    from app.train.driver import train

    rng = np.random.default_rng(0)
    users = ["007", "7", "0007"] + [f"u{n}" for n in range(20)]
    rows = [(u, int(i), float(rng.integers(1, 11)) / 2, 1_700_000_000 + n)
            for n, u in enumerate(users) for i in rng.choice(40, 12, replace=False)]
    data, _ = prepare(tmp_path, write_csv(tmp_path / "in.csv", rows))
    cfg = load_config(overrides={"epochs": 1, "num_workers": 1, "workdir": str(tmp_path),
                                 "registered_model_name": "two-tower-ids", "top_k": 5,
                                 "exclude_rated": "none", "history_length": 0})
    model = Path(train(cfg, str(data), str(tmp_path / "model"), verbose=False).model_dir)
    write_csv(tmp_path / "users.csv", [("007",), ("7",), ("0007",)], header="userId")
    batch_inference(cfg, str(model), str(data), str(tmp_path / "r"),
                    users=str(tmp_path / "users.csv"), verbose=False)
    df = pd.read_parquet(current(tmp_path / "r")).sort_values(["userId", "rank"])
    got = {u: g["movieId"].tolist() for u, g in df.groupby("userId")}
    assert set(got) == {"007", "7", "0007"} and not df["fallback"].any()
    rec = Recommender(model)
    for u in ("007", "7", "0007"):
        assert got[u] == rec.recommend([u], k=5, exclude_rated=False)["movieId"].tolist()
    assert got["007"] != got["7"] or got["7"] != got["0007"]
