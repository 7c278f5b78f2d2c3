"""The typed contracts between stages: each file round-trips through its class, and a file of
another schema version, with a missing field, or missing altogether is refused naming it."""

from __future__ import annotations

import json

import pytest

from app.core.publish import OutputError, current
from app.data.dataset import DatasetError, Manifest, read_manifest
from app.serve.batch import RecommendationsSummary
from app.train.export import ModelError, ModelInfo, read_model_json


def test_the_prepared_manifest_round_trips_and_is_typed(movielens_dir, tmp_path):
    manifest = read_manifest(movielens_dir)
    assert isinstance(manifest, Manifest) and manifest.vocab["users"] == 671
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert json.loads((tmp_path / Manifest.FILE).read_text()) == manifest.to_dict()


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
    assert info.dataset["vocab"] == read_manifest(movielens_dir).vocab
    cfg = load_config(overrides={"workdir": str(trained["work"]), "top_k": 3})
    done = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                           str(tmp_path / "recs"), verbose=False)
    written = RecommendationsSummary.read(current(tmp_path / "recs"))
    assert done.mode == written.mode == "recommend" and written.rows == done.rows == 671 * 3
    assert written.output is None and done.output == str(current(tmp_path / "recs"))
