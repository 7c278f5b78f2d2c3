"""Strong baselines the model is judged against: EASE (and popularity, in :mod:`app.train.metrics`).

EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data") is a closed-form
item-item linear model over the binary matrix X (users x items) of training positives::

    P = (XᵀX + λI)⁻¹,   B = I - P / diag(P)   (so diag(B) = 0),   scores = X B

Fitting a grid of λ the direct way costs one items x items inverse per λ. Here one symmetric
eigendecomposition serves the whole grid, in whichever of two forms is smaller:

- primal (items <= users): XᵀX = V diag(s) Vᵀ, so P = V diag(1 / (s + λ)) Vᵀ;
- dual (users < items, e.g. MovieLens: 671 users, 9k items): by Woodbury,
  λP = I - Xᵀ W diag(1 / (e + λ)) Wᵀ X with XXᵀ = W diag(e) Wᵀ, which needs only a users x users
  eigendecomposition. λ cancels in P / diag(P).

Only items with at least one training positive take part (the others score 0, as they do in
EASE). The fit is skipped, with the reason, when the smaller side exceeds ``max_dim``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from app.core.config import TrainConfig
from app.data.dataset import read_split_arrays
from app.train.metrics import UserItems, finish, ranking_sums


@dataclass
class EaseFit:
    """One eigendecomposition of the training positives, from which any λ is cheap."""

    num_items: int
    rows: np.ndarray      # (num_users + 1,) user index -> row of X, -1 if the user has none
    cols: np.ndarray      # (n,) item index of each column of X
    x: torch.Tensor       # (U, n) float64 binary training positives (dense)
    form: str             # "primal" or "dual"
    vecs: torch.Tensor    # primal: V (n, n); dual: W (U, U)
    vals: torch.Tensor    # primal: s (n,); dual: e (U,)
    a: Optional[torch.Tensor] = None  # dual: A = Wᵀ X (U, n)

    def scores(self, users: np.ndarray, lam: float) -> torch.Tensor:
        """EASE scores of every item index for the given users: (len(users), num_items)."""
        out = torch.zeros(len(users), self.num_items, dtype=torch.float64)
        r = self.rows[users]
        have = np.flatnonzero(r >= 0)
        if not len(have):
            return out
        xu = self.x[r[have]]                                                # (u, n)
        inv = 1.0 / (self.vals.clamp(min=0) + lam)
        if self.form == "primal":
            xp = (xu @ self.vecs) * inv @ self.vecs.T                       # X_u P   (u, n)
            diag = (self.vecs ** 2) @ inv                                   # diag(P) (n,)
        else:
            e = self.vals.clamp(min=0)
            xp = xu - (self.vecs[r[have]] * (e * inv)) @ self.a             # λ X_u P (u, n)
            diag = 1.0 - (self.a ** 2 * inv[:, None]).sum(0)                # λ diag(P)
        block = xu - xp / diag
        out[torch.from_numpy(have)[:, None], torch.from_numpy(self.cols)[None, :]] = block
        return out


def fit_ease(users: np.ndarray, items: np.ndarray, *, num_users: int, num_items: int,
             form: str = "auto") -> EaseFit:
    """Eigendecompose the binary matrix of (user, item) training positives.

    Args:
        users, items: (N,) indices of the training positives (repeats count once).
        num_users, num_items: table sizes (index 0 included).
        form: "primal", "dual" or "auto" (the smaller eigenproblem).
    """
    row_users = np.unique(users)
    cols = np.unique(items)
    rows = np.full(num_users + 1, -1, np.int64)
    rows[row_users] = np.arange(len(row_users))
    col_of = np.full(num_items, -1, np.int64)
    col_of[cols] = np.arange(len(cols))
    x = torch.zeros(len(row_users), len(cols), dtype=torch.float64)
    x[torch.from_numpy(rows[users]), torch.from_numpy(col_of[items])] = 1.0
    if form == "auto":
        form = "primal" if len(cols) <= len(row_users) else "dual"
    if form == "primal":
        vals, vecs = torch.linalg.eigh(x.T @ x)
        return EaseFit(num_items, rows, cols, x, "primal", vecs, vals)
    vals, vecs = torch.linalg.eigh(x @ x.T)
    return EaseFit(num_items, rows, cols, x, "dual", vecs, vals, a=vecs.T @ x)


def ease_size(users: np.ndarray, items: np.ndarray) -> int:
    """The side of the eigenproblem EASE would solve for these positives."""
    return int(min(len(np.unique(users)), len(np.unique(items))))


def ease_baseline(train_users: np.ndarray, train_items: np.ndarray, *,
                  exclude: UserItems, positives: dict[str, UserItems], num_users: int,
                  num_items: int, ks: list[int], lambdas: list[float], max_dim: int,
                  select_on: str = "val", chunk: int = 1024) -> dict:
    """EASE fitted on the training positives, λ chosen on one split, evaluated on all.

    Args:
        train_users, train_items: (N,) the training positives.
        exclude: items left out of each user's ranking (the training items, as for the model).
        positives: split name -> the relevant items of each user in that split.
        num_users, num_items: table sizes (index 0 included).
        ks: Recall/NDCG cut-offs.
        lambdas: the λ grid.
        max_dim: largest eigenproblem side to attempt; above it the baseline is skipped.
        select_on: the split whose Recall@20 (or the largest K below it) picks λ.

    Returns:
        ``{"lambda", "form", "seconds", "grid": {λ: select-split recall}, split: metrics}``,
        or ``{"skipped": reason}``.
    """
    side = ease_size(train_users, train_items)
    if side > max_dim:
        return {"skipped": f"EASE needs a {side:,} x {side:,} eigendecomposition, above "
                           f"--ease-max-dim {max_dim:,}"}
    if side == 0:
        return {"skipped": "no training positives"}
    t0 = time.perf_counter()
    fit = fit_ease(train_users, train_items, num_users=num_users, num_items=num_items)
    key = f"recall@{20 if 20 in ks else max(ks)}"

    def evaluate(split: str, lam: float) -> dict[str, float]:
        users = np.flatnonzero(positives[split].counts() > 0)
        sums: dict[str, float] = {}
        for s in range(0, len(users), chunk):
            part = users[s:s + chunk]
            for k, v in ranking_sums(fit.scores(part, lam), part, exclude=exclude,
                                     positives=positives[split], ks=ks).items():
                sums[k] = sums.get(k, 0.0) + v
        return finish(sums or {"users": 0.0})

    grid = {float(lam): evaluate(select_on, float(lam)) for lam in lambdas}
    best = max(grid, key=lambda lam: grid[lam].get(key, 0.0))
    out: dict = {"lambda": best, "form": fit.form, "dim": side,
                 "grid": {str(lam): m.get(key, 0.0) for lam, m in grid.items()},
                 select_on: grid[best]}
    for split in positives:
        if split != select_on:
            out[split] = evaluate(split, best)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def driver_baselines(train: TrainConfig, data_dir: str, num_users: int, num_items: int
                     ) -> dict[str, Any]:
    """Baselines that need the whole training matrix at once (EASE), fitted here once per run
    and handed to the workers, which report them beside the model every epoch."""
    tr = read_split_arrays(Path(data_dir, "train"))
    pos = tr["label"] > 0
    positives = {}
    for split in ("val", "test"):
        rows = read_split_arrays(Path(data_dir, split))
        keep = rows["label"] > 0
        positives[split] = UserItems.build(rows["user"][keep].astype(np.int64),
                                           rows["item"][keep].astype(np.int64), num_users)
    ease = ease_baseline(tr["user"][pos].astype(np.int64), tr["item"][pos].astype(np.int64),
                         exclude=UserItems.build(tr["user"].astype(np.int64),
                                                 tr["item"].astype(np.int64), num_users),
                         positives=positives, num_users=num_users, num_items=num_items,
                         ks=train.eval_ks(),
                         lambdas=[float(x) for x in train.ease_lambdas],
                         max_dim=train.ease_max_dim)
    return {"ease": ease}
