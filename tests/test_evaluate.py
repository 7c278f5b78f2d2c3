"""Per-epoch validation on a fixed sample of users, and the test split on every user.

Unit tier: the draw of the sample, restricted positives, popularity's and the catalog's top-K,
the metrics.json shape and the epoch line. Slow tier: 2 workers train with a sample smaller
than the validation users; every epoch and metrics.json's val are scored on exactly the sample
(the baselines too) and the exported epoch on every test user.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.train.evaluate import baseline_metrics, epoch_line, final_metrics
from app.train.metrics import (
    Product,
    UserItems,
    finish,
    popularity_order,
    popularity_scores,
    popularity_top,
    ranking_sums,
    sample_users,
    top_k,
    top_sums,
    topk_block,
)


def _positives(num_users: int = 1_000, seed: int = 3) -> UserItems:
    """Positives for about half of the users (the others have none)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(np.arange(1, num_users), size=num_users // 2, replace=False)
    users = np.repeat(users, rng.integers(1, 4, size=len(users)))
    return UserItems.build(users, rng.integers(1, 50, size=len(users)), num_users)


def test_the_sample_is_fixed_seeded_capped_and_only_users_with_positives():
    pos = _positives()
    have = set(np.flatnonzero(pos.counts() > 0).tolist())
    first = sample_users(pos, 100)
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert set(first.tolist()) <= have
    assert np.array_equal(first, np.sort(first))
    assert np.array_equal(first, sample_users(pos, 100))  # every epoch: the same users
    assert not np.array_equal(first, sample_users(pos, 100, seed=1))  # the seed draws
    # 0, or a size beyond the users with positives: every one of them, in order
    everyone = np.array(sorted(have))
    assert np.array_equal(sample_users(pos, 0), everyone)
    assert np.array_equal(sample_users(pos, len(have)), everyone)
    assert np.array_equal(sample_users(pos, 10 * len(have)), everyone)


def test_positives_restricted_to_the_sample_keep_each_users_items():
    pos = _positives()
    sample = sample_users(pos, 50)
    only = pos.only(sample)
    assert np.array_equal(only.users(), sample)
    for u in sample[:10]:
        assert sorted(only.items[only.offsets[u]:only.offsets[u + 1]]) == \
            sorted(pos.items[pos.offsets[u]:pos.offsets[u + 1]])


def _epoch(epoch: int, val: float, **extra: float) -> dict:
    return {"epoch": epoch, "train_loss": 1.0, "val_loss": 0.5, "val_recall@20": val,
            "val_users": 100, "popularity_val_recall@20": 0.05, "popularity_val_users": 100,
            "popularity_test_recall@20": 0.04, "popularity_test_users": 900,
            "ease_val_recall@20": 0.2, "ease_val_users": 100, **extra}


@pytest.mark.parametrize("n, k", [(50_000, 50), (40_007, 100), (20_000, 50), (3_000, 20)])
def test_block_top_k_is_the_catalogs_top_k(n, k):
    """The blocked top-K (large catalogs, on a CPU) returns topk's scores, in order, and
    columns holding them: with excluded (-inf) columns, ties, a partial last block, and rows
    with fewer than k finite scores."""
    import torch

    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(64, n, generator=gen)
    scores[:, torch.randint(0, n, (n // 10,), generator=gen)] = float("-inf")
    scores[:8] = torch.randint(0, 40, (8, n), generator=gen).float()   # many ties
    scores[8, k // 2:] = float("-inf")                                  # fewer than k left
    scores[9, : n - 7] = float("-inf")                                  # only the tail left
    want = scores.topk(k, dim=1)
    values, columns = top_k(scores, k)
    assert (topk_block(n, k) > 0) == (n >= 400 * k)
    assert torch.equal(values, want.values)
    assert torch.equal(scores.gather(1, columns), values)
    assert all(len(set(r)) == k for r in columns.tolist())              # k distinct columns
    untied = torch.arange(10, 64)
    assert torch.equal(columns[untied], want.indices[untied])


def test_the_product_reuses_one_block_and_equals_the_matrix_product():
    """Chunks of queries of any size are scored into one block (no new allocation after the
    largest), with the scores of ``q @ items.T``; an odd catalog's rows are padded to 64
    bytes, and a product that shares another's items scores the same."""
    import torch

    gen = torch.Generator().manual_seed(3)
    items = torch.randn(5001, 16, generator=gen)
    product = Product(items, host=True)  # (host: no copy on a CPU)
    assert product.items_t.shape == (16, 5008)
    first = product(torch.randn(40, 16, generator=gen))
    for rows in (40, 7, 40, 1):
        q = torch.randn(rows, 16, generator=gen)
        scores = product(q)
        assert scores.shape == (rows, 5001) and scores.data_ptr() == first.data_ptr()
        assert scores.stride() == (5008, 1)
        assert torch.allclose(scores, q @ items.T, rtol=1e-5, atol=1e-5)
    bigger = product(torch.randn(41, 16, generator=gen))
    assert bigger.shape == (41, 5001)
    shared = Product(share=product)
    assert shared.items_t is product.items_t
    q = torch.randn(9, 16, generator=gen)
    assert torch.equal(shared(q), product(q).clone())
    # the padded scores rank as the plain ones do
    values, columns = top_k(product(q), 50)
    want = (q @ items.T).topk(50, dim=1)
    assert torch.allclose(values, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(columns, want.indices)


def test_popularity_ranks_without_scoring_the_whole_catalog():
    """The popularity baseline's top k from the first k + (most excluded) places of one
    global order: the same items as ranking every item per user, ties by item index; a user
    who excluded almost everything gets the few left, then -1."""
    rng = np.random.default_rng(5)
    n_users, n_items, k = 300, 400, 20
    users = np.arange(n_users)
    ex_u = rng.integers(0, n_users, 6_000)
    ex_i = rng.integers(1, n_items, 6_000)
    ex_u = np.r_[ex_u, np.zeros(n_items - 3, np.int64)]  # user 0: all but two items excluded
    ex_i = np.r_[ex_i, np.arange(1, n_items - 2)]
    exclude = UserItems.build(ex_u, ex_i, n_users)
    positives = UserItems.build(rng.integers(0, n_users, 900), rng.integers(1, n_items, 900),
                                n_users)
    for counts in (rng.permutation(n_items) * 3,          # no ties
                   rng.integers(0, 6, n_items)):          # many ties
        top = popularity_top(popularity_order(counts), users, exclude, k)
        # the reference: every item ranked per user by (count desc, index asc), exclusions out
        hidden = np.zeros((n_users, n_items), bool)
        rows, items = exclude.rows_and_items(users)
        hidden[rows, items] = hidden[:, 0] = True
        for u in (0, 1, 7, 150, 299):
            ranked = [i for i in np.lexsort((np.arange(n_items), -counts)) if not hidden[u, i]]
            want = (ranked + [-1] * k)[:k]
            assert top[u].tolist() == want, u
        assert (top[0] == -1).sum() >= k - 2  # at most two items were left to user 0
        got = finish(top_sums(top, users, positives=positives, ks=[5, k], n_items=n_items))
        if len(set(counts.tolist())) == n_items:  # without ties the full ranking agrees
            full = finish(ranking_sums(popularity_scores(counts, n_users), users,
                                       exclude=exclude, positives=positives, ks=[5, k]))
            assert got == pytest.approx(full)
        assert got["users"] == len(positives.users())


def test_metrics_json_has_the_sample_on_val_every_user_on_test_and_says_how_many():
    ease = {"lambda": 100.0, "seconds": 1.0,
            "val": {"recall@20": 0.2, "users": 100},
            "test": {"recall@20": 0.18, "users": 900}}
    history = [_epoch(1, 0.10),
               _epoch(2, 0.12, test_users=900, **{"test_recall@20": 0.11}),
               _epoch(3, 0.11)]
    m = final_metrics(history, 2, {"ease": ease})
    # validation: the exported epoch's figures on the 100 sampled users; test: all 900
    assert m["model"]["val"] == {"loss": 0.5, "recall@20": 0.12, "users": 100}
    assert m["model"]["test"] == {"recall@20": 0.11, "users": 900}
    assert m["popularity"]["val"] == {"recall@20": 0.05, "users": 100}
    assert m["popularity"]["test"] == {"recall@20": 0.04, "users": 900}
    assert m["ease"] == ease
    assert (m["epochs"], m["best_epoch"]) == (3, 2)
    # per epoch, EASE is reported on the same users as the model
    assert baseline_metrics({"ease": ease})["ease_val_users"] == 100
    assert baseline_metrics({"ease": ease})["ease_val_recall@20"] == 0.2
    line = epoch_line({**history[0], **baseline_metrics({"ease": ease})}, 1)
    assert "val recall@20 0.1000 on 100 users (popularity 0.0500, EASE 0.2000)" in line


@pytest.mark.slow
def test_validation_scores_the_sample_and_test_every_user(ray_local, movielens_dir, tmp_path):
    """2 workers, a 200-user sample, an early stop (the exported epoch is an earlier one):
    every epoch's model, popularity and EASE validation figures are over exactly the 200
    users, metrics.json's too, and its test figures over every test user, as the exported
    weights score them."""
    from app.core.config import load_config
    from app.train.driver import train

    size = 200
    # a learning rate far too high and no dropout: validation recall peaks early
    cfg = load_config(overrides={"num_workers": 2, "workdir": str(tmp_path), "epochs": 8,
                                 "patience": 1, "embedding_lr": 0.5, "history_dropout": 0.0,
                                 "temperature": 0.02, "val_sample_users": size,
                                 "registered_model_name": "two-tower-sample"})
    result = train(cfg, str(movielens_dir), str(tmp_path / "model"), verbose=False)
    m, history = result.metrics, result.history
    best = m["best_epoch"]
    assert best < m["epochs"], "the exported epoch is the last one: no weights were reloaded"
    for h in history:
        assert h["val_users"] == h["popularity_val_users"] == h["ease_val_users"] == size
    val_pos, test_pos = (_split_positives(movielens_dir, s) for s in ("val", "test"))
    n_val, n_test = len(val_pos.users()), len(test_pos.users())
    assert size < n_val
    for who in ("model", "popularity", "ease"):
        assert m[who]["val"]["users"] == size and m[who]["test"]["users"] == n_test
    assert "test_recall@20" in history[best - 1] and "test_recall@20" not in history[-1]
    # the figures are the exported (best) epoch's: its weights, on the sample and on everyone
    model_dir = Path(result.model_dir)
    sample = sample_users(val_pos, size)
    assert m["model"]["val"]["recall@20"] == history[best - 1]["val_recall@20"]
    assert _recall(model_dir, movielens_dir, val_pos, sample) == pytest.approx(
        m["model"]["val"]["recall@20"], abs=2e-3)
    assert _recall(model_dir, movielens_dir, test_pos, test_pos.users()) == pytest.approx(
        m["model"]["test"]["recall@20"], abs=2e-3)
    saved = json.loads((model_dir / "metrics.json").read_text())
    assert saved["model"]["test"]["users"] == n_test


def _split_positives(data_dir: Path, split: str) -> UserItems:
    from app.data.dataset import read_manifest, read_split_arrays

    n = read_manifest(data_dir).vocab.users + 1
    rows = read_split_arrays(data_dir / split)
    pos = rows["label"] > 0
    return UserItems.build(rows["user"][pos].astype(np.int64),
                           rows["item"][pos].astype(np.int64), n)


def _recall(model_dir: Path, data_dir: Path, positives: UserItems, users: np.ndarray) -> float:
    """Recall@20 of a model folder's export for the given users, computed in this process
    with the training-time protocol (full catalog, training items excluded)."""
    import torch

    from app.data.dataset import read_split_arrays
    from app.serve.core import Recommender
    from app.train.metrics import finish, ranking_sums

    rec = Recommender(model_dir)
    train = read_split_arrays(data_dir / "train")
    exclude = UserItems.build(train["user"].astype(np.int64), train["item"].astype(np.int64),
                              rec.model.spec.num_users)
    with torch.no_grad():
        scores = rec.model.user_embeddings(torch.from_numpy(users)) @ rec.item_embeddings.T
    return finish(ranking_sums(scores, users, exclude=exclude, positives=positives,
                               ks=[20]))["recall@20"]
