"""The driver-side baselines: EASE against a brute-force solve of its definition, iALS through
`implicit` on a matrix with a clear structure, both chosen on a sample of validation users and
scored on every user; on movielens-small, iALS well above popularity and the sampled λ equal to
the full grid's."""

import numpy as np
import pytest

from app.train.baselines import (
    IALS,
    describe,
    driver_baselines,
    ease_baseline,
    fit_ease,
    fit_ials,
    ials_baseline,
    positives_matrix,
    which_baselines,
)
from app.train.metrics import UserItems, finish, popularity_scores, ranking_sums


def _brute_force(x: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)
    assert np.allclose(np.diag(b), 0)
    return x @ b


@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("shape", [(12, 7), (6, 15)])
def test_ease_equals_a_brute_force_solve(form, shape):
    rng = np.random.default_rng(0)
    x = (rng.random(shape) < 0.35).astype(np.float64)
    x[0, 0] = 1.0
    x[-1] = 0.0  # a user without training positives scores 0 everywhere
    users, items = np.nonzero(x)
    # indices shifted by one: index 0 is the unknown user / item
    fit = fit_ease(users + 1, items + 1, num_users=shape[0] + 1, num_items=shape[1] + 1,
                   form=form)
    keep = np.flatnonzero(x.sum(0) > 0)  # items without positives score 0 in both
    for lam in (0.5, 3.0, 50.0):
        want = np.zeros_like(x)
        want[:, keep] = _brute_force(x[:, keep], lam)
        got = fit.scores(np.arange(1, shape[0] + 1), lam).numpy()
        assert got.shape == (shape[0], shape[1] + 1)
        np.testing.assert_allclose(got[:, 1:], want, atol=1e-9)
        assert not got[-1].any() and not got[:, 0].any()


def _taste_groups(users: int = 80, groups: int = 4, per_group: int = 10, seed: int = 1):
    """Users in taste groups of ``per_group`` items each: 6 training positives from the user's
    group, 2 held out (val = test). Every item is about as popular as any other, so
    popularity ranks at random and a model of the groups ranks the held-out items first."""
    rng = np.random.default_rng(seed)
    tr_u, tr_i, va_u, va_i = [], [], [], []
    for u in range(1, users + 1):
        picked = 1 + (u % groups) * per_group + rng.permutation(per_group)
        tr_u += [u] * 6
        tr_i += list(picked[:6])
        va_u += [u] * 2
        va_i += list(picked[6:8])
    tr_u, tr_i = np.array(tr_u), np.array(tr_i)
    n_users, n_items = users + 1, groups * per_group + 1
    va = UserItems.build(np.array(va_u), np.array(va_i), n_users)
    return dict(train_users=tr_u, train_items=tr_i, exclude=UserItems.build(tr_u, tr_i, n_users),
                positives={"val": va, "test": va}, num_users=n_users, num_items=n_items)


def _popularity(d: dict, split: str, k: int) -> float:
    users = d["positives"][split].users()
    counts = np.bincount(d["train_items"], minlength=d["num_items"])
    return finish(ranking_sums(popularity_scores(counts, len(users)), users,
                               exclude=d["exclude"], positives=d["positives"][split],
                               ks=[k]))[f"recall@{k}"]


def test_ease_picks_lambda_on_a_sample_and_scores_every_user():
    d = _taste_groups(users=60, groups=2)
    tr_u, tr_i = d.pop("train_users"), d.pop("train_items")
    out = ease_baseline(tr_u, tr_i, ks=[4, 20], lambdas=[1.0, 10.0], max_dim=100,
                        select_users=20, epoch_users=30, **d)
    assert out["lambda"] in (1.0, 10.0) and set(out["grid"]) == {"1.0", "10.0"}
    assert out["select_users"] == 20 and out["test"]["users"] == 60
    assert out["test"]["recall@4"] > 0.6  # random ranking of the 14 unrated items: ~0.29
    # validation is scored on the model's per-epoch sample (30 users), test on every user
    assert out["val"]["users"] == 30
    assert set(out["timing"]) == {"fit", "select", "evaluate"}
    assert describe("ease", out).startswith(f"EASE: lambda {out['lambda']:g} (chosen on 20 val")
    skipped = ease_baseline(tr_u, tr_i, ks=[20], lambdas=[1.0], max_dim=10, **d)
    assert "--ease-max-dim 10" in skipped["skipped"]
    assert describe("ease", skipped) == f"EASE skipped: {skipped['skipped']}"


def test_ials_learns_the_taste_groups_far_above_popularity():
    d = _taste_groups()
    tr_u, tr_i = d["train_users"], d["train_items"]
    kw = {k: v for k, v in d.items() if k not in ("train_users", "train_items")}
    out = ials_baseline(tr_u, tr_i, ks=[5], factors=[4, 8], regularization=[0.1, 10.0],
                        alpha=10.0, iterations=10, select_users=40, threads=1, gpu=False, **kw)
    assert len(out["grid"]) == 4 and out["select_users"] == 40 and out["device"] == "cpu"
    assert out["factors"] in (4, 8) and out["regularization"] in (0.1, 10.0)
    assert out["grid"][f"factors={out['factors']} regularization={out['regularization']:g}"] \
        == max(out["grid"].values())
    pop = _popularity(d, "test", 5)
    # 2 held-out items among the user's 4 remaining group items and 30 others: popularity
    # ranks at random (~5/34 of them in the top 5), a model of the groups finds nearly all
    assert pop < 0.35
    assert out["test"]["recall@5"] > 0.8 and out["test"]["recall@5"] > 2.5 * pop
    assert out["val"]["users"] == 80
    # the grid's first round fits a third of the passes; the kept point is fitted on from its
    # factors, which is the same as fitting it once with every pass
    x = positives_matrix(tr_u, tr_i, (kw["num_users"], kw["num_items"]))
    kw = dict(factors=8, regularization=10.0, alpha=10.0, seed=0, threads=1, gpu=False)
    stepped = IALS(x, **kw).fit(3).fit(7)
    assert stepped.iterations == 10
    for a, b in zip(stepped.factors(), fit_ials(x, iterations=10, **kw)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_baselines_setting_picks_which_run():
    assert which_baselines("all") == {"ease": None, "ials": None}
    assert which_baselines("ials") == {"ease": "--baselines ials", "ials": None}
    assert which_baselines("none") == {"ease": "--baselines none", "ials": "--baselines none"}


@pytest.mark.slow
def test_on_movielens_ials_beats_popularity_and_the_sampled_lambda_is_the_full_grids(
        movielens_dir):
    from app.core.config import load_config
    from app.data.dataset import read_manifest, read_split_arrays

    vocab = read_manifest(movielens_dir).vocab
    num_users, num_items = vocab.users + 1, vocab.items + 1
    train = load_config().train
    out = driver_baselines(train, str(movielens_dir), num_users, num_items)  # the defaults
    tr = read_split_arrays(movielens_dir / "train")
    pos = tr["label"] > 0
    positives = {}
    for split in ("val", "test"):
        rows = read_split_arrays(movielens_dir / split)
        keep = rows["label"] > 0
        positives[split] = UserItems.build(rows["user"][keep].astype(np.int64),
                                           rows["item"][keep].astype(np.int64), num_users)
    d = dict(train_users=tr["user"][pos].astype(np.int64),
             train_items=tr["item"][pos].astype(np.int64),
             exclude=UserItems.build(tr["user"].astype(np.int64), tr["item"].astype(np.int64),
                                     num_users),
             positives=positives, num_users=num_users, num_items=num_items)

    pop = _popularity(d, "test", 20)
    assert out["ials"]["test"]["recall@20"] >= 1.5 * pop, (out["ials"], pop)
    assert out["ease"]["test"]["recall@20"] >= 1.5 * pop

    # λ on every validation user vs on the driver's sample (all 651 at the default 5,000)
    # and on a draw of half of them
    kw = dict(exclude=d["exclude"], positives=positives, num_users=num_users,
              num_items=num_items, ks=train.eval_ks(), max_dim=train.ease_max_dim,
              lambdas=[float(x) for x in train.ease_lambdas])
    full = ease_baseline(d["train_users"], d["train_items"], select_users=0, **kw)
    half = ease_baseline(d["train_users"], d["train_items"],
                         select_users=len(positives["val"].users()) // 2, **kw)
    assert out["ease"]["lambda"] == full["lambda"] == half["lambda"]
    assert half["select_users"] < full["select_users"] == out["ease"]["select_users"]
    assert half["val"] == full["val"]  # the same λ scored on every user


def test_users_ranked_in_threads_give_the_figures_of_one_thread():
    """iALS's scorer ranked from several threads at once (each scoring into a block of its own)
    sums the same figures as one thread, and torch's thread count is restored after, an
    error included."""
    import torch

    from app.train.baselines import split_metrics

    rng = np.random.default_rng(4)
    n_users, n_items = 300, 501
    users, items = rng.integers(1, n_users, 6000), rng.integers(1, n_items, 6000)
    x = positives_matrix(users[:5000], items[:5000], (n_users, n_items))
    model = IALS(x, factors=8, regularization=1.0, alpha=10.0, threads=1, gpu=False).fit(3)
    score = model.scorer()
    exclude = UserItems.build(users[:5000], items[:5000], n_users)
    positives = UserItems.build(users[5000:], items[5000:], n_users)
    ranked = positives.users()
    kw = dict(exclude=exclude, positives=positives, ks=[5, 20], chunk=7)
    one = split_metrics(score, ranked, threads=1, **kw)
    before = torch.get_num_threads()
    assert split_metrics(score, ranked, threads=3, **kw) == one
    assert torch.get_num_threads() == before
    assert one["users"] == len(ranked) and 0 < one["recall@20"] < 1
    # the same as ranking every user at once
    uf, vf = model.factors()
    scores = torch.from_numpy(uf[ranked] @ vf.T)
    whole = finish(ranking_sums(scores, ranked, exclude=exclude, positives=positives,
                                ks=[5, 20]))
    assert whole["users"] == one["users"]
    assert abs(whole["recall@20"] - one["recall@20"]) < 1e-9

    def broken(part):
        raise ValueError("no scores")

    with pytest.raises(ValueError, match="no scores"):
        split_metrics(lambda part: score(part) if part[0] == ranked[0] else broken(part),
                      ranked, threads=2, **kw)
    assert torch.get_num_threads() == before
