"""EASE against a brute-force solve of its definition."""

import numpy as np
import pytest

from app.train.baselines import ease_baseline, fit_ease
from app.train.metrics import UserItems


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


def test_ease_baseline_picks_lambda_on_validation_and_learns():
    # two taste groups: items 1-10 and 11-20; held-out positives come from the user's group
    rng = np.random.default_rng(1)
    tr_u, tr_i, va_u, va_i = [], [], [], []
    for u in range(1, 61):
        group = np.arange(1, 11) if u % 2 else np.arange(11, 21)
        picked = rng.permutation(group)
        tr_u += [u] * 6
        tr_i += list(picked[:6])
        va_u += [u] * 2
        va_i += list(picked[6:8])
    tr_u, tr_i = np.array(tr_u), np.array(tr_i)
    va = UserItems.build(np.array(va_u), np.array(va_i), 61)
    out = ease_baseline(tr_u, tr_i, exclude=UserItems.build(tr_u, tr_i, 61),
                        positives={"val": va, "test": va}, num_users=61, num_items=21,
                        ks=[4, 20], lambdas=[1.0, 10.0], max_dim=100)
    assert out["lambda"] in (1.0, 10.0) and set(out["grid"]) == {"1.0", "10.0"}
    assert out["val"]["recall@4"] > 0.6  # random ranking of the 14 unrated items: ~0.29
    assert out["test"] == out["val"]
    skipped = ease_baseline(tr_u, tr_i, exclude=UserItems.build(tr_u, tr_i, 61),
                            positives={"val": va}, num_users=61, num_items=21, ks=[20],
                            lambdas=[1.0], max_dim=10)
    assert "--ease-max-dim 10" in skipped["skipped"]
