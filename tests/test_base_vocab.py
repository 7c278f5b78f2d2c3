"""Stable vocabularies across dataset versions (``prepare_data --base``): every id of the base
keeps its row, new ids follow, vanished ids keep theirs, and ids stay exact across the union."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.core.config import ConfigError, load_config
from app.core.publish import current, version_of, version_uri
from app.data.dataset import (DatasetError, Manifest, VocabBase, id_rows, load_vocab, read_base,
                              read_split_arrays)
from app.data.prepare import _extended, _merged_metadata, prepare_dataset
from pipelines import prepare_data
from tests.conftest import data_config


def write_csv(path: Path, rows: list[tuple]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["userId,movieId,rating,timestamp"]
                              + [",".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def prepare(source: str, out: Path, **overrides) -> Manifest:
    cfg = data_config(dataset="csv", input=source, val_fraction=0, test_fraction=0,
                      **overrides)
    return prepare_dataset(cfg, str(out), verbose=True)


def ratings(users: list, items: list) -> list[tuple]:
    """One rating of every item by every user."""
    return [(u, i, 4.0, 1_700_000_000 + n) for n, (u, i) in
            enumerate((u, i) for u in users for i in items)]


def pairs_by_id(data: Path) -> set[tuple[str, str]]:
    """The (user id, item id) of every row of the training split, through the vocabularies."""
    rows = {k: {r: i for i, r in v.items()} for k, v in id_rows(data).items()}
    s = read_split_arrays(data / "train")
    return {(rows["users"][u], rows["items"][i]) for u, i in zip(s["user"], s["item"])}


# ---------------------------------------------------------------- the union, without Ray

def test_extended_vocabulary_keeps_base_rows_and_exact_ids():
    lists = lambda *ids: pa.chunked_array([pa.array([list(ids)], pa.list_(pa.string()))])
    base = pa.chunked_array([pa.array([10, 2, 7], pa.int64())])  # indices 1, 2, 3

    # integers only: still int64; the base's order kept, new ids in numeric order after it
    text, natural, new, absent = _extended(lists("7", "30", "4", "2"), base)
    assert natural.type == pa.int64() and natural.to_pylist() == [10, 2, 7, 4, 30]
    assert text.to_pylist() == ["10", "2", "7", "4", "30"] and (new, absent) == (2, 1)

    # a zero-padded or signed id turns the whole vocabulary into text; 7 stays 7, 007 is new
    text, natural, new, absent = _extended(lists("007", "7", "+7", "-7"), base)
    assert natural.type == pa.string()
    assert natural.to_pylist() == ["10", "2", "7", "+7", "-7", "007"]  # text order after
    assert (new, absent) == (3, 2)

    # a text base: "007" and "7" keep their rows; a new integer id stays text
    text, natural, new, absent = _extended(lists("7", "8"), pa.chunked_array([["007", "7"]]))
    assert natural.to_pylist() == ["007", "7", "8"] and (new, absent) == (1, 1)


def test_item_metadata_new_values_win_else_the_base():
    base = pa.table({"index": pa.array([1, 2], pa.int32()), "id": pa.array([5, 6]),
                     "title": ["Old five", "Old six"], "genres": ["A", "B"]})
    new = pa.table({"item": ["6", "9"], "title": ["New six", None], "year": [2001, 2002]})
    merged = _merged_metadata(pa.array(["5", "6", "9"]), new, base)
    assert merged.column_names == ["item", "title", "genres", "year"]
    assert merged["title"].to_pylist() == ["Old five", "New six", None]
    assert merged["genres"].to_pylist() == ["A", "B", None]
    assert merged["year"].to_pylist() == [None, 2001, 2002]
    assert _merged_metadata(pa.array(["5"]), None, base.select(["index", "id"])) is None


def test_base_setting_is_a_flag_and_checked():
    assert load_config(overrides={"base": "data/v1"}).data.base == "data/v1"
    assert load_config().data.base is None
    with pytest.raises(ConfigError, match="--base must name a prepared dataset"):
        load_config(overrides={"base": " "})
    assert "--base BASE" in prepare_data.build_parser().format_help()


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_ids_keep_their_rows_across_versions(ray_local, tmp_path, capsys):
    # version 1, no base: the vocabularies as always (numeric order, int64)
    v1 = prepare(write_csv(tmp_path / "day1.csv", ratings([1, 2, 3, 10], [100, 101, 102])),
                 tmp_path / "v1")
    day1 = current(tmp_path / "v1")
    assert v1.vocab.base == VocabBase() and v1.vocab.user_id_type == "int64"
    assert load_vocab(day1)["users"]["id"].to_pylist() == [1, 2, 3, 10]
    rows1 = id_rows(day1)
    assert rows1["users"] == {"1": 1, "2": 2, "3": 3, "10": 4}

    # version 2 extends it: user 1 and item 100 vanish, users 11 and 4 and item 103 are new
    v2 = prepare(write_csv(tmp_path / "day2.csv", ratings([11, 2, 3, 10, 4], [101, 102, 103])),
                 tmp_path / "data", base=str(tmp_path / "v1"))
    day2 = current(tmp_path / "data")
    rows2 = id_rows(day2)
    for kind in ("users", "items"):
        assert {i: rows2[kind][i] for i in rows1[kind]} == rows1[kind], kind  # every row kept
    assert rows2["users"] == {**rows1["users"], "4": 5, "11": 6}  # new ids after, in order
    assert rows2["items"] == {**rows1["items"], "103": 4}
    assert v2.vocab.user_id_type == "int64" and (v2.vocab.users, v2.vocab.items) == (6, 4)
    b = v2.vocab.base
    assert (b.new_users, b.absent_users, b.new_items, b.absent_items) == (2, 1, 1, 1)
    assert b.uri == version_uri(tmp_path / "v1") and b.version == version_of(tmp_path / "v1")
    assert b.manifest_sha256 == read_base(str(tmp_path / "v1")).ref.manifest_sha256
    assert len(b.manifest_sha256) == 64
    assert Manifest.read(day2).vocab.base == b  # as recorded
    assert pairs_by_id(day2) == {(str(u), str(i)) for u in (11, 2, 3, 10, 4)
                                 for i in (101, 102, 103)}  # rows encoded with those rows
    out = capsys.readouterr().out
    assert ("vocabularies: 6 users (2 new, 1 only in the base), 4 items (1 new, 1 only in "
            "the base);") in out

    # version 3 over version 2, the same folder (a daily run): padded and signed ids are new,
    # distinct users; the vocabulary becomes text and every earlier id keeps its row
    v3 = prepare(write_csv(tmp_path / "day3.csv", ratings(["007", "7", "+7", "2"], [101])),
                 tmp_path / "data", base=str(tmp_path / "data"), overwrite=True)
    day3 = current(tmp_path / "data")
    assert day3 != day2 and v3.vocab.base.version == day2.name
    rows3 = id_rows(day3)
    assert rows3["users"] == {**rows2["users"], "+7": 7, "007": 8, "7": 9}
    assert load_vocab(day3)["users"]["id"].type == pa.string()
    assert v3.vocab.user_id_type == "string" and v3.vocab.item_id_type == "int64"
    b = v3.vocab.base
    assert (b.new_users, b.absent_users, b.new_items, b.absent_items) == (3, 5, 0, 3)
    assert pairs_by_id(day3) == {(u, "101") for u in ("007", "7", "+7", "2")}


@pytest.mark.slow
def test_a_bad_base_fails_in_one_line(ray_local, tmp_path, capsys):
    src = write_csv(tmp_path / "in.csv", ratings([1, 2], [5]))
    missing = tmp_path / "nowhere"
    code = prepare_data.main(["--dataset", "csv", "--input", src, "--output",
                              str(tmp_path / "out"), "--base", str(missing)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--base: {missing}: not a prepared dataset" in err
    assert not (tmp_path / "out").exists()

    prepare(src, tmp_path / "good")
    good = current(tmp_path / "good")

    def broken(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    other = broken("other-schema")
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    floats = broken("float-ids")
    pq.write_table(pa.table({"index": pa.array([1, 2], pa.int32()), "id": [1.0, 2.0]}),
                   floats / "vocab" / "users.parquet")
    gaps = broken("gaps")
    pq.write_table(pa.table({"index": pa.array([1, 3], pa.int32()), "id": [1, 2]}),
                   gaps / "vocab" / "users.parquet")
    for folder, message in ((other, "schema version 99, this code reads version 1"),
                            (floats, "ids of type double (its manifest says int64); only "
                                     "int64 or string ids can be extended"),
                            (gaps, "not indices 1..2 <-> one id each")):
        with pytest.raises(DatasetError) as e:
            read_base(str(folder))
        assert str(e.value).startswith(f"--base: {folder}") and message in str(e.value)
        assert "\n" not in str(e.value)
