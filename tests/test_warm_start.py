"""Warm start (``train --init-from MODEL``): rows copied by id whatever the row order, new ids
fresh, dense layers copied, a spec that differs refused in one line, the lineage recorded."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from app.core.config import load_config
from app.core.errors import ModelError
from app.core.publish import current
from app.data.dataset import id_rows
from app.data.prepare import prepare_dataset
from app.train.model import ModelSpec
from app.train.warm import check_spec, source_rows

FAST = {"epochs": 1, "patience": 0, "num_workers": 2, "baselines": "none",
        "val_sample_users": 200, "eval_k": [20]}


def test_source_rows_match_ids_whatever_the_order():
    # old vocabulary: index 1 "10", 2 "7", 3 "3"; new: "3", "99" (new), "10"
    assert source_rows(["10", "7", "3"], ["3", "99", "10"]).tolist() == [0, 3, -1, 1]
    assert source_rows([], ["1"]).tolist() == [0, -1]


@pytest.mark.parametrize("field, value, named", [
    ("embedding_dim", 16, "its embedding_dim is 32, this run's is 16"),
    ("tower_layers", (64, 16), "its tower_layers is [64, 32], this run's is [64, 16]"),
    ("num_genres", 0, "candidate_features"),
    ("history_length", 0, "query_features"),
])
def test_a_spec_that_differs_is_named(field, value, named):
    spec = ModelSpec(num_users=5, num_items=9, num_genres=4, embedding_dim=32,
                     tower_layers=(64, 32), history_length=10)
    check_spec(spec, ModelSpec(**{**spec.__dict__, "num_users": 50, "num_items": 90,
                                  "objective": "bce"}), "m")  # sizes and objective may differ
    other = ModelSpec(**{**spec.__dict__, field: value})
    with pytest.raises(ModelError, match=named.replace("[", r"\[").replace("]", r"\]")):
        check_spec(spec, other, "m")


@pytest.fixture(scope="module")
def day_one(ray_local, tmp_path_factory):
    """A model trained on the ratings before 2010 (fewer users and items than the whole
    dataset, so an id sits on another row in the whole dataset's vocabulary)."""
    from app.train.driver import train

    work = tmp_path_factory.mktemp("warm")
    cfg = load_config(overrides={**FAST, "workdir": str(work), "timestamp_max": "2010-01-01",
                                 "registered_model_name": "two-tower-warm"})
    prepare_dataset(cfg.data, str(work / "data1"), verbose=False)
    result = train(cfg, str(current(work / "data1")), str(work / "model1"), verbose=False)
    return {"work": work, "cfg": cfg, "model": Path(result.model_dir), "result": result}


def _tables(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "weights.pt", weights_only=True)


@pytest.mark.slow
def test_warm_start_copies_rows_by_id_and_records_its_lineage(day_one, movielens_dir):
    from app.train.driver import train

    work = day_one["work"]
    ref = "models:/two-tower-warm/1"
    # learning rates so small that one epoch leaves every copied weight where it was
    cfg = load_config(overrides={**FAST, "workdir": str(work), "init_from": ref,
                                 "registered_model_name": "two-tower-warm",
                                 "embedding_lr": 1e-12, "dense_lr": 1e-12})
    result = train(cfg, str(movielens_dir), str(work / "model2"), verbose=False)
    old, new = _tables(day_one["model"]), _tables(Path(result.model_dir))
    old_rows, new_rows = id_rows(day_one["model"]), id_rows(movielens_dir)
    for kind, key in (("users", "query.tables.user_id.weight"),
                      ("items", "candidate.tables.item_id.weight")):
        shared = [i for i in new_rows[kind] if i in old_rows[kind]]
        fresh = [i for i in new_rows[kind] if i not in old_rows[kind]]
        assert len(shared) > 100 and len(fresh) > 100, (kind, len(shared), len(fresh))
        # the rows moved: the same id sits on another row in the new vocabulary
        moved = sum(old_rows[kind][i] != new_rows[kind][i] for i in shared)
        assert moved > len(shared) // 2
        a = old[key][[old_rows[kind][i] for i in shared]]
        b = new[key][[new_rows[kind][i] for i in shared]]
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        # a new id starts as a fresh table's row would: not a copy of any old row
        f = new[key][[new_rows[kind][i] for i in fresh]]
        assert f.abs().sum() > 0
        assert torch.cdist(f, old[key]).min() > 1e-4
    for key in old:
        if ".tables." not in key:
            torch.testing.assert_close(new[key], old[key], atol=1e-6, rtol=0)
    # the lineage: metrics.json, the MLflow run and the registered version
    assert result.metrics["init_from"] == ref
    client = mlflow.MlflowClient()
    version = client.get_model_version("two-tower-warm", str(result.mlflow.version))
    assert version.tags["init_from"] == ref
    assert client.get_run(result.mlflow.run_id).data.tags["init_from"] == ref


@pytest.mark.slow
def test_a_model_of_another_shape_is_refused_before_training(day_one, movielens_dir):
    from app.train.driver import train

    work = day_one["work"]
    cfg = load_config(overrides={**FAST, "workdir": str(work), "embedding_dim": 16,
                                 "init_from": str(day_one["model"].parent)})
    with pytest.raises(ModelError, match=r"^--init-from .*: its embedding_dim is \d+, this "
                                         r"run's is 16"):
        train(cfg, str(movielens_dir), str(work / "model3"), verbose=False)
    assert not (work / "model3" / "CURRENT").exists()
    missing = load_config(overrides={**FAST, "workdir": str(work),
                                     "init_from": str(work / "nothing")})
    with pytest.raises(ModelError, match="^--init-from: .*nothing: no such folder"):
        train(missing, str(movielens_dir), str(work / "model3"), verbose=False)
    assert np.isfinite(day_one["result"].metrics["model"]["test"]["recall@20"])
