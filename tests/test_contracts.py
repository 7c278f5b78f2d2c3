"""The typed contracts between stages: each file round-trips through its class, and a file of
another schema version, with a missing field, or missing altogether is refused naming it."""

from __future__ import annotations

import json

import pytest

from app.core.publish import OutputError, current
from app.data.dataset import (SCHEMA_VERSION, Counts, DatasetError, Duplicates, LabelRule,
                              Manifest, SplitRule, Vocab, read_manifest)
from app.data.mds import INTERACTION_COLUMNS
from app.serve.batch import RecommendationsSummary
from app.train.model_folder import ModelError, ModelInfo, read_model_json


def toy_manifest() -> Manifest:
    return Manifest(
        schema_version=SCHEMA_VERSION, created_unix=1, source={"dataset": "toy"},
        columns={"user": "u", "item": "i", "rating": "r", "timestamp": "t"},
        mds_columns=INTERACTION_COLUMNS,
        counts=Counts(read=4, accepted=3, rejected=1, rejected_by_reason={"missing u": 1},
                      duplicates=Duplicates(policy="latest", rows_merged=1, pairs=1),
                      splits={"train": 2, "val": 0, "test": 0},
                      positives={"train": 1, "val": 0, "test": 0}),
        label=LabelRule(rule="threshold", threshold=4.0, mean_rating=3.5),
        split=SplitRule(rule="random", seed=7, fractions={"train": 0.7, "val": 0.2, "test": 0.1}),
        vocab=Vocab(users=2, items=2, unknown_index=0, user_id_type="string",
                    item_id_type="int64", item_metadata=[]),
        config={"dataset": "toy"})


def test_the_prepared_manifest_round_trips_and_is_typed(movielens_dir, tmp_path):
    manifest = read_manifest(movielens_dir)
    assert isinstance(manifest, Manifest) and manifest.vocab.users == 671
    assert isinstance(manifest.counts, Counts) and isinstance(manifest.counts.duplicates,
                                                             Duplicates)
    assert sum(manifest.counts.splits.values()) == manifest.counts.accepted == 100_004
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert json.loads((tmp_path / Manifest.FILE).read_text()) == manifest.to_dict()
    # read and written again, the file is the same, byte for byte
    assert (tmp_path / Manifest.FILE).read_text() == (movielens_dir / Manifest.FILE).read_text()


def test_nested_parts_are_written_as_the_json_objects_they_replace(tmp_path):
    toy_manifest().write(tmp_path)
    data = json.loads((tmp_path / Manifest.FILE).read_text())
    assert data["counts"] == {"read": 4, "accepted": 3, "rejected": 1,
                              "rejected_by_reason": {"missing u": 1},
                              "duplicates": {"policy": "latest", "rows_merged": 1, "pairs": 1},
                              "splits": {"train": 2, "val": 0, "test": 0},
                              "positives": {"train": 1, "val": 0, "test": 0}}
    assert list(data) == ["schema_version", "created_unix", "source", "columns", "mds_columns",
                          "counts", "label", "split", "vocab", "config", "seconds"]
    assert list(data["vocab"]) == ["users", "items", "unknown_index", "user_id_type",
                                   "item_id_type", "item_metadata"]
    assert data["label"] == {"rule": "threshold", "threshold": 4.0, "mean_rating": 3.5}
    back = Manifest.read(tmp_path)
    assert back == toy_manifest() and back.counts.splits["train"] == 2
    assert back.split.fractions["test"] == 0.1 and back.counts.duplicates.rows_merged == 1


def test_a_missing_or_malformed_nested_field_is_refused_naming_it(tmp_path):
    path = tmp_path / Manifest.FILE
    data = toy_manifest().to_dict()
    del data["counts"]["splits"], data["counts"]["duplicates"]["pairs"], data["vocab"]["users"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as e:
        Manifest.read(tmp_path)
    assert str(e.value) == (f"{path}: lacks counts.splits, counts.duplicates.pairs, "
                            f"vocab.users")
    data = toy_manifest().to_dict()
    data["label"] = 4.0
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"{path}: label: expected a JSON object, got float"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("cls, error", [(Manifest, DatasetError), (ModelInfo, ModelError),
                                        (RecommendationsSummary, OutputError)])
def test_a_contract_file_that_breaks_the_contract_is_refused_naming_it(cls, error, tmp_path):
    with pytest.raises(error, match=str(tmp_path)):
        cls.read(tmp_path)  # no file at all
    path = tmp_path / cls.FILE
    path.write_text(json.dumps({"schema_version": cls.SCHEMA_VERSION + 1}))
    with pytest.raises(error, match=rf"{path}: schema version {cls.SCHEMA_VERSION + 1}, this "
                                    rf"code reads version {cls.SCHEMA_VERSION}"):
        cls.read(tmp_path)
    path.write_text(json.dumps({"schema_version": cls.SCHEMA_VERSION}))
    with pytest.raises(error, match=rf"{path}: lacks "):
        cls.read(tmp_path)
    path.write_text("{not json")
    with pytest.raises(error, match="not JSON"):
        cls.read(tmp_path)


def test_the_model_folder_and_the_recommendations_carry_typed_contracts(trained, movielens_dir,
                                                                        tmp_path):
    from app.core.config import load_config
    from app.serve.batch import batch_inference

    info = read_model_json(trained["model_dir"])
    assert isinstance(info, ModelInfo) and len(info.weights_sha256) == 64
    manifest = read_manifest(movielens_dir)
    assert info.dataset.vocab == manifest.vocab  # the same JSON object in model.json
    assert info.dataset.splits == manifest.counts.splits
    cfg = load_config(overrides={"workdir": str(trained["work"]), "top_k": 3})
    done = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                           str(tmp_path / "recs"), verbose=False)
    written = RecommendationsSummary.read(current(tmp_path / "recs"))
    assert done.mode == written.mode == "recommend" and written.rows == done.rows == 671 * 3
    assert written.output == done.output == str(current(tmp_path / "recs"))


def test_the_reports_examples_are_the_smallest_users_first_items_read_by_a_scan(tmp_path):
    """The report's example lists come from a scan of the recommendations folder (the users
    found a batch at a time, then only their first rows read), whatever the files' order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.core.report import examples

    out = tmp_path / "recs"
    out.mkdir()
    users = np.repeat(np.array([40, 7, 12, 3, 25], dtype=np.int64), 10)
    for part, rows in enumerate(np.array_split(np.arange(len(users))[::-1], 3)):
        pq.write_table(pa.table({"userId": users[rows], "rank": (rows % 10 + 1).astype(np.int32),
                                 "movieId": users[rows] * 100 + rows % 10}),
                       out / f"part-{part}.parquet", row_group_size=7)
    (out / "_summary.json").write_text("{}")  # beside the files, never read as one
    text = examples(out, users=3, k=2).splitlines()
    assert text == ["  user 3: 300; 301", "  user 7: 700; 701", "  user 12: 1200; 1201"]
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"userId": pa.array([], pa.int64()),
                             "rank": pa.array([], pa.int32()),
                             "movieId": pa.array([], pa.int64())}), empty / "part-0.parquet")
    assert examples(empty) == "  (no recommendations)"
