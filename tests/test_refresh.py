"""The daily refresh: ``full_run --refresh`` on day-2 ratings, and a gate that scores the
champion beside the candidate on the candidate's test split (a real MLflow store)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from app.core.config import load_config
from app.core.publish import current
from tests.conftest import movielens_table


def _days(tmp: Path) -> tuple[Path, Path, pa.Table, pa.Table]:
    """movielens-small cut by time: day 1 the earliest 80% of ratings, day 2 all of them."""
    table = movielens_table().sort_by("timestamp")
    day1 = table.slice(0, int(len(table) * 0.8))
    paths = tmp / "day1.csv", tmp / "day2.csv"
    pacsv.write_csv(day1, paths[0])
    pacsv.write_csv(table, paths[1])
    return paths[0], paths[1], day1, table


def promotion_version(summary) -> str:
    return summary.promotion["version"]


def _gate(tmp_path, compare):
    from app.core.tracking import configure, promote

    cfg = load_config(overrides={"workdir": str(tmp_path), "registered_model_name": "gate-t"})
    configure(cfg.cluster)
    client = mlflow.MlflowClient()
    client.create_registered_model("gate-t")
    run = client.create_run(client.create_experiment("gate")).info.run_id
    versions = [client.create_model_version("gate-t", f"runs:/{run}/m", run).version
                for _ in range(3)]
    assert promote(cfg, versions[0], 0.20, "data/v-1")["promoted"]
    return cfg, versions, lambda v, m, d: promote(cfg, v, m, d, compare=compare)


def test_the_gate_scores_the_champion_on_the_new_split_and_says_why(tmp_path):
    """A champion of another dataset version is compared on the candidate's test split:
    promoted when the candidate is better there, kept (saying why) when not or when no row
    is left to compare on."""
    figures = {"candidate": {"recall@20": 0.30, "users": 50},
               "champion": {"recall@20": 0.25, "users": 50}, "rows": 120, "left_out": 30}
    cfg, versions, gate = _gate(tmp_path, lambda champion: dict(figures))
    # its own recorded test figure (0.10) is below the champion's (0.20), but that was on
    # another split: the same-split figures decide
    better = gate(versions[1], 0.10, "data/v-2")
    assert better["promoted"] and better["champion"] == versions[0]
    assert better["same_split"]["champion"]["recall@20"] == 0.25
    assert "0.3000 beats the champion's (version 1) 0.2500 on this dataset's test split " \
           "(120 positives of 50 users; 30 the champion was trained on left out)" \
           in better["reason"]
    figures["champion"] = {"recall@20": 0.35, "users": 50}
    worse = gate(versions[2], 0.90, "data/v-3")
    assert not worse["promoted"] and "0.3000 does not beat the champion's (version 2) " \
                                     "0.3500" in worse["reason"]
    from app.core.tracking import promote

    nothing = promote(cfg, versions[2], 0.90, "data/v-3", compare=lambda champion: None)
    assert not nothing["promoted"] and "no test row of this one is left" in nothing["reason"]
    assert mlflow.MlflowClient().get_model_version_by_alias("gate-t", "champion").version \
        == versions[1]


FAST = {"epochs": 2, "patience": 0, "num_workers": 2, "baselines": "none",
        "val_sample_users": 300, "dataset": "csv", "registered_model_name": "refresh-t"}


@pytest.mark.slow
def test_a_refresh_warm_starts_from_the_champion_beats_it_and_serving_follows(
        ray_local, tmp_path):
    from app.run import run
    from app.serve.core import Recommender

    day1_csv, day2_csv, day1, day2 = _days(tmp_path)
    work = tmp_path / "work"
    # day 1: a champion that learned little (one epoch, learning rates near zero)
    weak = load_config(overrides={**FAST, "input": str(day1_csv), "workdir": str(work),
                                  "epochs": 1, "embedding_lr": 1e-9, "dense_lr": 1e-9})
    first = run(weak, ("prepare", "train"))
    assert first.promotion["promoted"]
    champion_v = first.promotion["version"]

    # day 2: refresh the champion with every rating so far
    cfg = load_config(overrides={**FAST, "input": str(day2_csv), "workdir": str(work)})
    summary = run(cfg, ("prepare", "train"), refresh="models:/refresh-t@champion")
    data = current(work / "data")
    from app.data.dataset import id_rows, read_manifest

    manifest = read_manifest(data)
    base = manifest.vocab.base
    new_users = len(set(pc.unique(day2["userId"]).to_pylist())
                    - set(pc.unique(day1["userId"]).to_pylist()))
    assert base.uri and base.new_users == new_users > 0 and base.new_items > 0
    # every id of the champion keeps its row
    model_dir = Path(first.stages["refit"].output)
    old = id_rows(current(model_dir))
    now = id_rows(data)
    assert all(now["users"][u] == row for u, row in old["users"].items())
    assert all(now["items"][i] == row for i, row in old["items"].items())
    # warm-started from the champion's fixed version, recorded as its lineage
    train = summary.stages["train"]
    assert train.metrics["init_from"] == f"models:/refresh-t/{champion_v}"
    assert summary.stages["refit"].mlflow["version"] == int(promotion_version(summary))
    promotion = summary.promotion
    same = promotion["same_split"]
    assert same["rows"] > 0 and same["left_out"] > 0
    mine, theirs = same["candidate"]["recall@20"], same["champion"]["recall@20"]
    assert mine > theirs and promotion["promoted"], promotion
    assert "on this dataset's test split" in promotion["reason"]
    client = mlflow.MlflowClient()
    served = client.get_model_version_by_alias("refresh-t", "champion")
    assert str(served.version) == promotion["version"] != str(champion_v)
    assert served.tags["init_from"] == train.metrics["init_from"]

    # serving follows the alias: a user seen only on day 2 gets the model's own list
    from app.core.tracking import configure
    from app.train.model_folder import resolve_model

    configure(cfg.cluster)
    rec = Recommender(resolve_model("models:/refresh-t@champion", cfg.cluster))
    only_day2 = sorted(set(pc.unique(day2["userId"]).to_pylist())
                       - set(pc.unique(day1["userId"]).to_pylist()))[0]
    out = rec.recommend([only_day2], k=10)
    assert len(out) == 10 and set(out["source"]) == {"model"} and not out["fallback"].any()
    popular = rec.item_ids.to_numpy()[rec.popular[:10] - 1]
    assert list(out["movieId"]) != list(popular)
    assert np.isfinite(out["score"]).all()
