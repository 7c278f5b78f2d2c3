"""Strong baselines the model is judged against: EASE and iALS (popularity is in
:mod:`app.train.metrics`). Both are fitted on the driver from the binary matrix X (users x items)
of training positives, choose their settings on a fixed, seeded sample of validation users
(full-catalog Recall@20, training items excluded, exactly as the model is scored), then score
every user of val and test once with the settings chosen.

EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data") is a closed-form
item-item linear model::

    P = (XᵀX + λI)⁻¹,   B = I - P / diag(P)   (so diag(B) = 0),   scores = X B

in whichever of two forms is smaller:

- primal (items <= users): B itself, one Cholesky inverse of the items x items Gram matrix per
  λ; X stays sparse, so scoring costs nnz(X_u)·n instead of u·n² (at 20k users x 5k items,
  5,000 users take ~1 s instead of ~12 s per λ). No eigendecomposition: on two cores one of
  5k x 5k costs about ten such inverses.
- dual (users < items, e.g. MovieLens: 671 users, 9k items): by Woodbury,
  λP = I - Xᵀ W diag(1 / (e + λ)) Wᵀ X with XXᵀ = W diag(e) Wᵀ, one users x users
  eigendecomposition for the whole grid. λ cancels in P / diag(P).

Only items with at least one training positive take part (the others score 0, as they do in
EASE). EASE is skipped, with the reason, when the smaller side exceeds ``max_dim``.

iALS (Hu, Koren, Volinsky 2008) comes from the ``implicit`` library: its CUDA model where the
installed build has CUDA, else its CPU model on the driver's cores.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch

from app.core.config import TrainConfig
from app.data.dataset import read_split_arrays
from app.train.metrics import (
    Product,
    UserItems,
    finish,
    ranking_sums,
    sample_users,
    score_rows,
)

# user indices (u,) -> scores (u, num_items), the caller's until the scorer's next call
# (ranking masks them in place; iALS writes every call into one reused block per thread)
Scorer = Callable[[np.ndarray], torch.Tensor]
NAMES = {"ease": "EASE", "ials": "iALS"}


def positives_matrix(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]
                     ) -> sp.csr_matrix:
    """The binary (users x items) CSR matrix of training positives (repeats count once)."""
    x = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=shape)
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def split_metrics(score: Scorer, users: np.ndarray, *, exclude: UserItems,
                  positives: UserItems, ks: list[int], chunk: int = 0, threads: int = 1
                  ) -> dict[str, float]:
    """Recall@K / NDCG@K of a scorer over the given users, as for the model.

    ``chunk``: users scored at once; 0 sizes chunks as the model's evaluation does on a CPU
    (:func:`app.train.metrics.score_rows`), learning the width from a first chunk of 64.
    ``threads``: chunks ranked at once, each by one thread with one torch thread (``score``
    must then be safe to call from several threads). A chunk's product, exclusions and
    top-K are small operations that torch's own threads share out poorly: 40,000 users x
    50,000 items, 32 dimensions, on two cores: 3.7 s in two threads, against 4.5 s in one with
    two torch threads (6.2 s with one). The sums are added in chunk order either way.
    """
    sums: dict[str, float] = {}

    def ranked(part: np.ndarray, scores: Optional[torch.Tensor] = None) -> dict[str, float]:
        return ranking_sums(score(part) if scores is None else scores, part, exclude=exclude,
                            positives=positives, ks=ks, owned=True)

    def add(out: dict[str, float]) -> None:
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v

    first = users[:chunk or 64]
    if len(first):
        scores = score(first)
        chunk = chunk or score_rows(scores.shape[1])
        add(ranked(first, scores))
        del scores
    parts = [users[s:s + chunk] for s in range(len(first), len(users), chunk)]
    if threads > 1 and len(parts) > 1:
        with torch_threads(1), ThreadPoolExecutor(threads) as pool:
            for out in pool.map(ranked, parts):
                add(out)
    else:
        for part in parts:
            add(ranked(part))
    return finish(sums or {"users": 0.0})


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (process-wide), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def select_key(ks: list[int]) -> str:
    """The metric a grid is chosen on: Recall@20, or the largest K evaluated."""
    return f"recall@{20 if 20 in ks else max(ks)}"


@dataclass
class Chosen:
    """The grid point a baseline keeps, its metrics on the selection users, and the time spent
    building scorers (fitting) and scoring the selection users (selecting)."""

    name: str
    score: Scorer
    metrics: dict[str, float]
    grid: dict[str, float]
    fit_s: float
    select_s: float


def choose(candidates: Iterable[tuple[str, Callable[[], Scorer]]], users: np.ndarray, *,
           exclude: UserItems, positives: UserItems, ks: list[int], threads: int = 1
           ) -> Chosen:
    """Build each candidate's scorer in turn and keep the best on ``users`` (ties: the first
    in the grid); only the best so far stays in memory. ``threads``: as
    :func:`split_metrics`."""
    key = select_key(ks)
    best: Optional[Chosen] = None
    grid: dict[str, float] = {}
    fit_s = select_s = 0.0
    for name, build in candidates:
        t0 = time.perf_counter()
        score = build()
        t1 = time.perf_counter()
        m = split_metrics(score, users, exclude=exclude, positives=positives, ks=ks,
                          threads=threads)
        fit_s, select_s = fit_s + t1 - t0, select_s + time.perf_counter() - t1
        grid[name] = m.get(key, 0.0)
        if best is None or grid[name] > best.metrics.get(key, 0.0):
            best = Chosen(name, score, m, grid, 0.0, 0.0)
    best.fit_s, best.select_s = fit_s, select_s
    return best


def evaluate_chosen(chosen: Chosen, *, select_users: np.ndarray, epoch_users: np.ndarray,
                    exclude: UserItems, positives: dict[str, UserItems], ks: list[int],
                    select_on: str = "val", threads: int = 1) -> dict[str, Any]:
    """The chosen scorer on the users the model is scored on: every user of each split, but
    for ``select_on`` the model's per-epoch sample (``epoch_users``) when that is one
    (:mod:`app.train.evaluate`); the selection's figures are reused when those are the same
    users. ``threads``: as :func:`split_metrics`."""
    out: dict[str, Any] = {}
    for split in positives:
        users = epoch_users if split == select_on else positives[split].users()
        out[split] = (chosen.metrics if split == select_on
                      and np.array_equal(users, select_users) else
                      split_metrics(chosen.score, users, exclude=exclude,
                                    positives=positives[split], ks=ks, threads=threads))
    return out


def finish_baseline(out: dict[str, Any], chosen: Chosen, *, started: float, setup_s: float,
                    select_users: np.ndarray, epoch_users: int, exclude: UserItems,
                    positives: dict[str, UserItems], ks: list[int], select_on: str,
                    threads: int = 1) -> dict[str, Any]:
    """``out`` (what the baseline chose) with the chosen scorer's metrics
    (:func:`evaluate_chosen`) and how long it all took since ``started``: fitting (``setup_s``,
    e.g. the matrices, and every grid point's fit), selecting, evaluating. ``threads``: as
    :func:`split_metrics`."""
    t = time.perf_counter()
    out.update(evaluate_chosen(chosen, select_users=select_users,
                               epoch_users=sample_users(positives[select_on], epoch_users),
                               exclude=exclude, positives=positives, ks=ks,
                               select_on=select_on, threads=threads))
    done = time.perf_counter()
    out["timing"] = {"fit": round(setup_s + chosen.fit_s, 2),
                     "select": round(chosen.select_s, 2), "evaluate": round(done - t, 2)}
    out["seconds"] = round(done - started, 2)
    return out


# ---------------------------------------------------------------- EASE

@dataclass
class EaseFit:
    """The training positives in the form EASE solves in, from which any λ's scores follow."""

    num_items: int
    rows: np.ndarray      # (num_users + 1,) user index -> row of X, U if the user has none
    cols: np.ndarray      # (n,) item index of each column of X
    x: sp.csr_matrix      # (U + 1, n) binary training positives; row U is empty
    form: str             # "primal" or "dual"
    gram: Optional[torch.Tensor] = None  # primal: XᵀX (n, n) float64
    vecs: Optional[torch.Tensor] = None  # dual: W (U, U)
    vals: Optional[torch.Tensor] = None  # dual: e (U,)
    a: Optional[torch.Tensor] = None     # dual: A = Wᵀ X (U, n)

    def weights(self, lam: float) -> torch.Tensor:
        """Primal form: B = I - P / diag(P), (n, n) float64. One n x n matrix stays (the
        others are freed on the way), so a grid holds at most two besides XᵀX."""
        g = self.gram.clone()
        g.diagonal().add_(lam)
        chol = torch.linalg.cholesky(g)
        del g
        p = torch.cholesky_inverse(chol)                                       # P (n, n)
        del chol
        p.div_(-torch.diagonal(p).clone())                                     # -P_ij / P_jj
        return p.fill_diagonal_(0.0)

    def scorer(self, lam: float) -> Scorer:
        """Scores of every item index for given users: (len(users), num_items) float64."""
        cols, empty = torch.from_numpy(self.cols), self.x.shape[0] - 1
        if self.form == "primal":
            b = self.weights(lam).numpy()

            def primal(users: np.ndarray) -> torch.Tensor:
                # sparse rows times B: nnz(X_u)·n; a user without positives scores 0
                block = torch.from_numpy(self.x[self.rows[users]] @ b)         # (u, n)
                out = torch.zeros(len(users), self.num_items, dtype=torch.float64)
                return out.index_copy_(1, cols, block)

            return primal
        inv = 1.0 / (self.vals.clamp(min=0) + lam)
        e = self.vals.clamp(min=0)
        diag = 1.0 - (self.a ** 2 * inv[:, None]).sum(0)                       # λ diag(P)

        def score(users: np.ndarray) -> torch.Tensor:
            out = torch.zeros(len(users), self.num_items, dtype=torch.float64)
            r = self.rows[users]
            have = np.flatnonzero(r < empty)
            if len(have):
                xu = torch.from_numpy(self.x[r[have]].toarray())               # (u, n)
                xp = xu - (self.vecs[r[have]] * (e * inv)) @ self.a            # λ X_u P
                out[torch.from_numpy(have)[:, None], cols[None, :]] = xu - xp / diag
            return out

        return score

    def scores(self, users: np.ndarray, lam: float) -> torch.Tensor:
        """EASE scores of every item index for the given users: (len(users), num_items)."""
        return self.scorer(lam)(users)


def fit_ease(users: np.ndarray, items: np.ndarray, *, num_users: int, num_items: int,
             form: str = "auto") -> EaseFit:
    """Prepare EASE on the (user, item) training positives: the Gram matrix (primal) or one
    eigendecomposition of XXᵀ (dual).

    Args:
        users, items: (N,) indices of the training positives (repeats count once).
        num_users, num_items: table sizes (index 0 included).
        form: "primal", "dual" or "auto" (the smaller side).
    """
    row_users = np.unique(users)
    cols = np.unique(items)
    rows = np.full(num_users + 1, len(row_users), np.int64)  # no positives: the empty row
    rows[row_users] = np.arange(len(row_users))
    col_of = np.full(num_items, -1, np.int64)
    col_of[cols] = np.arange(len(cols))
    x = positives_matrix(rows[users], col_of[items], (len(row_users) + 1, len(cols)))
    if form == "auto":
        form = "primal" if len(cols) <= len(row_users) else "dual"
    if form == "primal":
        gram = torch.from_numpy((x.T @ x).toarray())  # sparse product: nnz-bound, not U·n²
        return EaseFit(num_items, rows, cols, x, "primal", gram=gram)
    dense = torch.from_numpy(x[:-1].toarray())
    vals, vecs = torch.linalg.eigh(dense @ dense.T)
    return EaseFit(num_items, rows, cols, x, "dual", vecs=vecs, vals=vals, a=vecs.T @ dense)


def ease_size(users: np.ndarray, items: np.ndarray) -> int:
    """The side of the matrix EASE would solve for these positives."""
    return int(min(len(np.unique(users)), len(np.unique(items))))


def ease_baseline(train_users: np.ndarray, train_items: np.ndarray, *,
                  exclude: UserItems, positives: dict[str, UserItems], num_users: int,
                  num_items: int, ks: list[int], lambdas: list[float], max_dim: int,
                  select_users: int = 0, epoch_users: int = 0, select_on: str = "val"
                  ) -> dict:
    """EASE fitted on the training positives, λ chosen on a sample of one split's users, then
    evaluated on the users the model is: every test user, validation's per-epoch sample.

    Args:
        train_users, train_items: (N,) the training positives.
        exclude: items left out of each user's ranking (the training items, as for the model).
        positives: split name -> the relevant items of each user in that split.
        num_users, num_items: table sizes (index 0 included).
        ks: Recall/NDCG cut-offs.
        lambdas: the λ grid.
        max_dim: largest matrix side to attempt; above it the baseline is skipped.
        select_users: users of ``select_on`` drawn to choose λ (0: all;
            :func:`~app.train.metrics.sample_users`, seed 0).
        epoch_users: the size of the model's per-epoch validation sample (same draw): the
            users of the ``select_on`` figures; 0: every user.
        select_on: the split whose Recall@20 (or the largest K below it) picks λ.

    Returns:
        ``{"lambda", "form", "dim", "grid": {λ: sample recall}, "select_users", "seconds",
        "timing": {"fit", "select", "evaluate"}, split: metrics}``,
        or ``{"skipped": reason}``.
    """
    side = ease_size(train_users, train_items)
    if side > max_dim:
        return {"skipped": f"a {side:,} x {side:,} solve, above --ease-max-dim {max_dim:,}"}
    if side == 0:
        return {"skipped": "no training positives"}
    t0 = time.perf_counter()
    fit = fit_ease(train_users, train_items, num_users=num_users, num_items=num_items)
    prepare_s = time.perf_counter() - t0
    chosen_users = sample_users(positives[select_on], select_users)
    best = choose(((str(float(lam)), lambda lam=float(lam): fit.scorer(lam)) for lam in lambdas),
                  chosen_users, exclude=exclude, positives=positives[select_on], ks=ks)
    out = {"lambda": float(best.name), "form": fit.form, "dim": side, "grid": best.grid,
           "select_users": len(chosen_users)}
    return finish_baseline(out, best, started=t0, setup_s=prepare_s,
                           select_users=chosen_users, epoch_users=epoch_users,
                           exclude=exclude, positives=positives, ks=ks, select_on=select_on)


# ---------------------------------------------------------------- iALS

def driver_threads() -> int:
    """CPUs this process may use: its affinity, capped by torch's thread count (which follows
    OMP_NUM_THREADS). The baselines run before the training workers start, so they have the
    driver's cores to themselves."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, torch.get_num_threads()))


class IALS:
    """An iALS model of a binary (users x items) matrix with the ``implicit`` library, fitted
    in steps: :meth:`fit` runs more alternating passes from where the last one stopped.

    Args:
        x: (U, I) CSR training positives.
        factors, regularization, alpha: implicit's AlternatingLeastSquares.
        seed: its random initialisation.
        threads: OpenMP threads of the CPU model (0: :func:`driver_threads`).
        gpu: use the CUDA model (None: where implicit was built with CUDA).
    """

    def __init__(self, x: sp.csr_matrix, *, factors: int, regularization: float, alpha: float,
                 seed: int = 0, threads: int = 0, gpu: Optional[bool] = None) -> None:
        import implicit.gpu
        import threadpoolctl
        from implicit.als import AlternatingLeastSquares

        self.x = x.astype(np.float32, copy=False)
        self.gpu = implicit.gpu.HAS_CUDA if gpu is None else gpu
        # implicit checks BLAS's threads when the model is made (see fit)
        with threadpoolctl.threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(
                factors=factors, regularization=regularization, alpha=alpha, iterations=1,
                use_gpu=self.gpu, num_threads=threads or driver_threads(), random_state=seed)
        self.iterations = 0

    def fit(self, iterations: int) -> "IALS":
        """``iterations`` more alternating passes (the first call initialises the factors)."""
        import threadpoolctl

        if iterations > 0:
            self.model.iterations = iterations
            # implicit parallelises over users with OpenMP; BLAS threads inside its solves
            # would oversubscribe the cores (implicit itself warns and asks for 1)
            with threadpoolctl.threadpool_limits(1, "blas"):
                self.model.fit(self.x, show_progress=False)  # continues from the factors
            self.iterations += iterations
        return self

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """User factors (U, factors) and item factors (I, factors), float32."""
        m = self.model.to_cpu() if self.gpu else self.model
        return np.asarray(m.user_factors), np.asarray(m.item_factors)

    def scorer(self) -> Scorer:
        """Scores of every item for given users, (u, items): safe to call from several
        threads (each scores into a block of its own)."""
        uf, vf = (torch.from_numpy(a) for a in self.factors())
        catalog, local = Product(vf), threading.local()

        def score(users: np.ndarray) -> torch.Tensor:
            if not hasattr(local, "product"):
                local.product = Product(share=catalog)
            return local.product(uf[users])

        return score


def fit_ials(x: sp.csr_matrix, *, factors: int, regularization: float, alpha: float,
             iterations: int, seed: int = 0, threads: int = 0, gpu: Optional[bool] = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """iALS factors of a binary (users x items) matrix after ``iterations`` passes
    (:class:`IALS`): user factors (U, factors) and item factors (I, factors), float32."""
    return IALS(x, factors=factors, regularization=regularization, alpha=alpha, seed=seed,
                threads=threads, gpu=gpu).fit(iterations).factors()


def ials_baseline(train_users: np.ndarray, train_items: np.ndarray, *,
                  exclude: UserItems, positives: dict[str, UserItems], num_users: int,
                  num_items: int, ks: list[int], factors: list[int],
                  regularization: list[float], alpha: float, iterations: int,
                  select_users: int = 0, epoch_users: int = 0, seed: int = 0,
                  threads: int = 0, gpu: Optional[bool] = None, select_on: str = "val"
                  ) -> dict:
    """iALS on the training positives, its (factors, regularization) chosen from a grid on a
    sample of one split's users, then evaluated as :func:`ease_baseline`.

    The grid is searched in two rounds, as successive halving does: every point is fitted
    for a third of ``iterations`` (at least one pass) and scored on the sample; the best one
    is then fitted on to all ``iterations``, and the grid's figures are the first round's. A
    grid of 4 costs 2 full fits instead of 4 (ALS is close to its fixed point after a few
    passes, so the short fits rank the points as the full ones would).

    Args: as :func:`ease_baseline`, and the grid (``factors`` x ``regularization``), the
        confidence weight ``alpha`` and ``iterations`` of the kept fit; ``seed``, ``threads``
        and ``gpu`` as :class:`IALS` (the users are ranked in as many threads too).

    Returns:
        ``{"factors", "regularization", "alpha", "iterations", "device", "grid":
        {"factors=F regularization=R": sample recall after the first round}, "select_users",
        "seconds", "timing": {"fit", "select", "evaluate"}, split: metrics}``, or
        ``{"skipped": reason}``.
    """
    if len(train_users) == 0:
        return {"skipped": "no training positives"}
    import implicit.gpu

    gpu = implicit.gpu.HAS_CUDA if gpu is None else gpu
    threads = threads or driver_threads()
    t0 = time.perf_counter()
    x = positives_matrix(train_users, train_items, (num_users, num_items)).astype(np.float32)
    setup_s = time.perf_counter() - t0
    points = [(int(f), float(r)) for f in factors for r in regularization]
    first = max(1, iterations // 3) if len(points) > 1 else iterations
    models: dict[str, IALS] = {}  # every first-round fit (factors only: tens of MB each)

    def build(name: str, f: int, reg: float) -> Scorer:
        models[name] = IALS(x, factors=f, regularization=reg, alpha=alpha, seed=seed,
                            threads=threads, gpu=gpu).fit(first)
        return models[name].scorer()

    names = [f"factors={f} regularization={r:g}" for f, r in points]
    chosen_users = sample_users(positives[select_on], select_users)
    best = choose(((n, lambda n=n, f=f, r=r: build(n, f, r))
                   for n, (f, r) in zip(names, points)),
                  chosen_users, exclude=exclude, positives=positives[select_on], ks=ks,
                  threads=threads)
    f, r = points[names.index(best.name)]
    if first < iterations:  # the second round: the chosen point fitted on, from its factors
        t1 = time.perf_counter()
        kept = models[best.name]
        models.clear()
        best.score = kept.fit(iterations - kept.iterations).scorer()
        best.fit_s += time.perf_counter() - t1
        t2 = time.perf_counter()
        best.metrics = split_metrics(best.score, chosen_users, exclude=exclude,
                                     positives=positives[select_on], ks=ks, threads=threads)
        best.select_s += time.perf_counter() - t2
    out = {"factors": f, "regularization": r, "alpha": float(alpha),
           "iterations": int(iterations), "device": "gpu" if gpu else "cpu",
           "grid": best.grid, "select_users": len(chosen_users)}
    return finish_baseline(out, best, started=t0, setup_s=setup_s,
                           select_users=chosen_users, epoch_users=epoch_users,
                           exclude=exclude, positives=positives, ks=ks, select_on=select_on,
                           threads=threads)


# ---------------------------------------------------------------- on the driver

def which_baselines(choice: str) -> dict[str, Optional[str]]:
    """For ``--baselines``: each driver-side baseline -> None if it runs, else why not. Both run
    by default: at 1M rows (20k users x 5k items) EASE takes ~20 s and iALS ~5 s of a ~170 s
    training stage on two cores, and neither wins everywhere."""
    runs = {"all": ("ease", "ials"), "ease": ("ease",), "ials": ("ials",), "none": ()}[choice]
    return {name: None if name in runs else f"--baselines {choice}" for name in NAMES}


def driver_baselines(train: TrainConfig, data_dir: str, num_users: int, num_items: int
                     ) -> dict[str, Any]:
    """Baselines that need the whole training matrix at once (EASE, iALS), fitted here once per
    run and handed to the workers, which report them beside the model every epoch."""
    wanted = ("user", "item", "label")  # 9 of a row's 21 bytes (not rating, timestamp)
    tr = read_split_arrays(Path(data_dir, "train"), wanted)
    pos = tr["label"] > 0
    users, items = tr["user"][pos].astype(np.int64), tr["item"][pos].astype(np.int64)
    exclude = UserItems.build(tr["user"].astype(np.int64), tr["item"].astype(np.int64),
                              num_users)
    del tr, pos
    positives = {}
    for split in ("val", "test"):
        rows = read_split_arrays(Path(data_dir, split), wanted)
        keep = rows["label"] > 0
        positives[split] = UserItems.build(rows["user"][keep].astype(np.int64),
                                           rows["item"][keep].astype(np.int64), num_users)
    common = dict(exclude=exclude, positives=positives, num_users=num_users, num_items=num_items,
                  ks=train.eval_ks(), select_users=train.baseline_select_users,
                  epoch_users=train.val_sample_users)
    plan = which_baselines(train.baselines)
    out: dict[str, Any] = {}
    out["ease"] = ({"skipped": plan["ease"]} if plan["ease"] else ease_baseline(
        users, items, lambdas=[float(x) for x in train.ease_lambdas],
        max_dim=train.ease_max_dim, **common))
    out["ials"] = ({"skipped": plan["ials"]} if plan["ials"] else ials_baseline(
        users, items, factors=[int(f) for f in train.ials_factors],
        regularization=[float(r) for r in train.ials_regularization],
        alpha=train.ials_alpha, iterations=train.ials_iterations, seed=train.train_seed,
        **common))
    return out


def describe(name: str, result: dict[str, Any]) -> str:
    """One line per baseline for the training log: what was chosen, on how many users, its
    validation Recall@20, and where the time went (or why it was skipped)."""
    label = NAMES[name]
    if "skipped" in result:
        return f"{label} skipped: {result['skipped']}"
    chosen = (f"lambda {result['lambda']:g}" if name == "ease" else
              f"factors {result['factors']}, regularization {result['regularization']:g}")
    t = result["timing"]
    return (f"{label}: {chosen} (chosen on {result['select_users']:,} val users), val "
            f"recall@20 {result['val'].get('recall@20', float('nan')):.4f}; "
            f"{result['seconds']}s (fit {t['fit']}s, select {t['select']}s, evaluate "
            f"{t['evaluate']}s)")
