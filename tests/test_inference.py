"""Batch inference through Ray Data on the model trained in conftest.trained."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.core.config import load_config
from app.core.publish import OutputError, current
from app.data.dataset import SPLITS, DatasetError, read_split_arrays
from app.serve.batch import batch_inference
from app.train.model_folder import ModelError

pytestmark = pytest.mark.slow  # batch inference on a trained model


def inference_config(work: Path, **overrides):
    return load_config(overrides={"workdir": str(work), **overrides})


@pytest.fixture(scope="module")
def recommendations(trained, movielens_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recs") / "recs"
    cfg = inference_config(trained["work"], top_k=20, inference_actors=2,
                           inference_batch_size=128)
    summary = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir), str(out),
                              verbose=False)
    return out, summary


def _index_of(vocab_ids: list) -> dict:
    return {v: i + 1 for i, v in enumerate(vocab_ids)}


def test_every_user_gets_k_ranked_unrated_items(recommendations, movielens_dir):
    from app.data.dataset import load_vocab

    out, summary = recommendations
    df = pd.read_parquet(current(out))
    vocab = load_vocab(movielens_dir)
    users = vocab["users"]["id"].to_pylist()
    assert summary.users == len(users) and summary.rows == len(users) * 20
    assert sorted(df["userId"].unique().tolist()) == sorted(users)
    assert (df.groupby("userId").size() == 20).all()
    df = df.sort_values(["userId", "rank"])
    assert all(r == list(range(1, 21)) for r in df.groupby("userId")["rank"].apply(list))
    assert (df.groupby("userId")["score"].apply(lambda s: bool((np.diff(s) <= 0).all()))).all()
    assert not df["fallback"].any() and df["title"].notna().all()
    # nothing the user rated, in any split
    user_index, item_index = (_index_of(users), _index_of(vocab["items"]["id"].to_pylist()))
    rated = set()
    for split in SPLITS:
        rows = read_split_arrays(movielens_dir / split)
        rated |= set(zip(rows["user"].tolist(), rows["item"].tolist()))
    pairs = zip(df["userId"].map(user_index), df["movieId"].map(item_index))
    assert not any(p in rated for p in pairs)
    assert not list(out.glob(".partial-*"))
    # the pool's start and its batches, as the actors' clocks saw them, within the run's time
    assert 0 < summary.startup_seconds and 0 < summary.batch_seconds
    assert summary.startup_seconds + summary.batch_seconds <= summary.seconds


def test_recommendations_reproduce_the_training_test_recall(trained, movielens_dir, tmp_path):
    """Excluding the training items only (as training-time evaluation does), Recall@20 on the
    test split recomputed from the written table matches the metric in metrics.json."""
    from app.data.dataset import load_vocab

    cfg = inference_config(trained["work"], top_k=20, exclude_rated="train")
    batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir), str(tmp_path / "r"),
                    verbose=False)
    df = pd.read_parquet(current(tmp_path / "r"))
    vocab = load_vocab(movielens_dir)
    user_index = _index_of(vocab["users"]["id"].to_pylist())
    item_index = _index_of(vocab["items"]["id"].to_pylist())
    df["u"], df["i"] = df["userId"].map(user_index), df["movieId"].map(item_index)
    top = df.groupby("u")["i"].apply(set).to_dict()
    test = read_split_arrays(movielens_dir / "test")
    pos = pd.DataFrame({"u": test["user"], "i": test["item"]})[test["label"] > 0]
    recall = np.mean([len(top[u] & set(g)) / len(g) for u, g in pos.groupby("u")["i"]])
    want = json.loads((trained["model_dir"] / "metrics.json").read_text())
    assert recall == pytest.approx(want["model"]["test"]["recall@20"], abs=2e-3)


def test_pair_scores_are_the_models_forward_pass(trained, movielens_dir, tmp_path):
    import torch

    from app.serve.core import Recommender
    from app.train.model_folder import load_exported

    rec = Recommender(trained["model_dir"])
    users = rec.user_ids.iloc[[0, 3, 7, 9]].tolist()
    items = rec.item_ids.iloc[[10, 20, 30, 40]].tolist()
    pairs = pd.DataFrame({"userId": users + [users[0], -5],
                          "movieId": items + [987654321, items[0]]})  # unknown item, user
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    cfg = inference_config(trained["work"])
    summary = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                              str(tmp_path / "scores"), pairs=str(tmp_path / "pairs.csv"),
                              verbose=False)
    got = pd.read_parquet(current(tmp_path / "scores"))
    assert len(got) == 6 and summary.unknown_item_rows == 1
    assert summary.unknown_user_rows == 1
    # CSV ids are read as written: text, echoed as text
    got = got.set_index(["userId", "movieId"]).loc[
        [(str(u), str(i)) for u, i in zip(pairs.userId, pairs.movieId)]]
    model = load_exported(trained["model_dir"])
    with torch.no_grad():
        want = model.score(torch.from_numpy(rec.user_indices(users)),
                           torch.from_numpy(rec.item_indices(items))).numpy()
    assert np.allclose(got["score"].to_numpy()[:4], want, atol=1e-5)
    assert got["score"].isna().to_numpy()[4:].all()
    assert got["known_item"].tolist() == [True] * 4 + [False, True]
    probs = got["prediction_prob"].to_numpy()[:4]
    assert ((probs > 0) & (probs < 1)).all()
    assert got["predicted_class"].isna().to_numpy()[4:].all()


def test_faiss_index_recall_against_exact(trained, movielens_dir, tmp_path, capsys):
    cfg = inference_config(trained["work"], index="faiss", top_k=100)
    summary = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                              str(tmp_path / "r"))
    assert summary.faiss_recall_vs_exact >= 0.95
    assert "recall@100 against exact top-100" in capsys.readouterr().out
    df = pd.read_parquet(current(tmp_path / "r"))
    assert summary.rows == len(df) and summary.users == df["userId"].nunique()
    assert summary.short_lists == 0


def test_mlflow_uri_and_user_file_with_unknown_users(trained, movielens_dir, tmp_path):
    info = json.loads((trained["model_dir"] / "mlflow.json").read_text())
    known = pd.read_parquet(trained["model_dir"] / "vocab" / "users.parquet")["id"][:3]
    users = pd.DataFrame({"userId": known.tolist() + [10 ** 9]})
    users.to_parquet(tmp_path / "users.parquet")
    cfg = inference_config(trained["work"], top_k=5, inference_actors=2)  # every CPU
    summary = batch_inference(cfg, info["registered_uri"], str(movielens_dir),
                              str(tmp_path / "r"), users=str(tmp_path / "users.parquet"),
                              verbose=False)
    assert summary.users == 4 and summary.fallback_users == 1
    df = pd.read_parquet(current(tmp_path / "r"))
    fallback = df[df["userId"] == 10 ** 9].sort_values("rank")
    assert fallback["fallback"].all() and len(fallback) == 5
    popularity = np.load(trained["model_dir"] / "item_popularity.npy")
    assert fallback["score"].tolist() == sorted(popularity[1:], reverse=True)[:5]


def test_a_dataset_that_does_not_match_the_model_is_refused(trained, tmp_path):
    from app.data.prepare import prepare_dataset

    other = tmp_path / "other"
    prepare_dataset(load_config(overrides={"dataset": "synthetic", "rows": 5000}).data,
                    str(other), verbose=False)
    with pytest.raises(DatasetError, match="does not match the model"):
        batch_inference(inference_config(trained["work"]), str(trained["model_dir"]),
                        str(other), str(tmp_path / "r"), verbose=False)
    assert not (tmp_path / "r").exists()


def test_bad_inputs_name_what_is_wrong(trained, movielens_dir, tmp_path):
    cfg = inference_config(trained["work"])
    pd.DataFrame({"user": [1]}).to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(DatasetError, match="missing column.*userId.*movieId"):
        batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                        str(tmp_path / "r"), pairs=str(tmp_path / "pairs.csv"), verbose=False)
    with pytest.raises(ModelError, match="not an MLflow model URI"):
        batch_inference(cfg, str(tmp_path / "nowhere"), str(movielens_dir),
                        str(tmp_path / "r"), verbose=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="holds something other than a batch inference out"):
        batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                        str(tmp_path / "mine"), verbose=False)


def test_empty_header_only_and_unreadable_inputs_fail_in_one_line(trained, movielens_dir,
                                                                  tmp_path):
    cfg = inference_config(trained["work"])
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("userId\n")
    long_line = tmp_path / "long.csv"
    with open(long_line, "w") as f:  # one 40 MB line, no newline: larger than a read block
        f.write("userId\n1")
        f.write("7" * (40 << 20))
    for name, pattern in (("empty.csv", r"empty.csv: empty \(no header, no rows\)"),
                          ("header.csv", r"header.csv: holds no rows"),
                          ("long.csv", r"long.csv: could not be read as CSV")):
        with pytest.raises(DatasetError, match=pattern) as e:
            batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                            str(tmp_path / "r"), users=str(tmp_path / name), verbose=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "r").exists()  # no version, no partial folder


def test_repeated_users_are_recommended_once(trained, movielens_dir, tmp_path):
    known = pd.read_parquet(trained["model_dir"] / "vocab" / "users.parquet")["id"][:3]
    users = known.tolist() + known.tolist()[:2] + [known.tolist()[0]]
    pd.DataFrame({"userId": users}).to_csv(tmp_path / "users.csv", index=False)
    summary = batch_inference(inference_config(trained["work"], top_k=5),
                              str(trained["model_dir"]), str(movielens_dir),
                              str(tmp_path / "r"), users=str(tmp_path / "users.csv"),
                              verbose=False)
    assert summary.users == 3 and summary.duplicate_users_dropped == 3
    df = pd.read_parquet(current(tmp_path / "r"))
    assert len(df) == 15 and df.groupby("userId")["rank"].apply(list).map(
        lambda r: sorted(r) == [1, 2, 3, 4, 5]).all()


def _actor_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "MapWorker(MapBatches(TopK))" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def test_a_killed_actor_still_yields_complete_output(trained, movielens_dir, tmp_path):
    """SIGKILL one actor while batches are in flight: Ray Data restarts it and retries its
    batches; the output holds every user's list exactly once."""
    cfg = inference_config(trained["work"], top_k=10, inference_actors=2,
                           inference_batch_size=4)
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(_actor_pids()) < 2:
            time.sleep(0.05)
        time.sleep(2.0)  # both actors busy with batches by now
        pids = _actor_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    summary = batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir),
                              str(tmp_path / "r"), verbose=False)
    killer.join()
    assert killed
    df = pd.read_parquet(current(tmp_path / "r"))
    n_users = len(pd.read_parquet(trained["model_dir"] / "vocab" / "users.parquet"))
    assert len(df) == n_users * 10 == summary.rows
    assert not df.duplicated(["userId", "rank"]).any()
    assert df["userId"].nunique() == n_users


def test_the_calibration_is_the_same_fitted_in_chunks(trained, movielens_dir, monkeypatch):
    """Platt scaling scores its validation pairs in bounded chunks: the fit is the one the
    model folder recorded, and the same as scoring every pair at once."""
    import app.train.evaluate as evaluate
    from app.train.model_folder import read_model_json

    model_dir = trained["model_dir"]
    recorded = read_model_json(model_dir).calibration
    monkeypatch.setattr(evaluate, "CALIBRATION_CHUNK", 1_000)
    chunked = evaluate.calibrate(model_dir, str(movielens_dir), "softmax")
    monkeypatch.setattr(evaluate, "CALIBRATION_CHUNK", 10**9)
    whole = evaluate.calibrate(model_dir, str(movielens_dir), "softmax")
    assert chunked["pairs"] == whole["pairs"] == recorded["pairs"] > 1_000
    for key in ("a", "b"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-4)
        assert chunked[key] == pytest.approx(recorded[key], rel=1e-4)


def test_scores_in_cache_sized_parts_rank_as_one_product(trained, monkeypatch):
    """The serving core scores a chunk of users in parts (about 64 MB of scores each; here
    parts of 100 users) through a padded copy of the catalog: the same lists (items and
    scores) as one product for the whole chunk, and as the item embeddings as they are (a
    real-time request's path), with rated items and a given history left out on the right
    rows."""
    import app.serve.core as core
    from app.serve.core import Recommender

    rec = Recommender(trained["model_dir"])
    users = np.arange(rec.model.spec.num_users)
    given = [np.array([5, 9, 11]) if u % 7 == 0 else None for u in users]
    assert len(users) > core.BATCH_ROWS
    monkeypatch.setattr(core, "score_rows", lambda n, cap=2048: min(cap, 100))
    parted = rec.top_k(users, 20, given)
    assert rec._catalog is not None and rec._catalog.items_t.shape[1] % 16 == 0
    monkeypatch.setattr(core, "score_rows", lambda n, cap=2048: cap)
    whole = rec.top_k(users, 20, given)
    monkeypatch.setattr(core, "BATCH_ROWS", len(users) + 1)
    plain = rec.top_k(users, 20, given)
    for other in (whole, plain):
        assert np.array_equal(parted[1], other[1]) and np.array_equal(parted[2], other[2])
        assert np.allclose(parted[0], other[0])
    assert not np.isin(parted[1][::7], [5, 9, 11]).any()  # the given histories' items
