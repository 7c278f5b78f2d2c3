"""Retrieval metrics over the full catalog, and the popularity baseline.

Definitions (per user with at least one positive in the evaluated split, then averaged):

- items the user has in the training split are excluded from the ranking, as is index 0
  (unknown item);
- Recall@K = (positives in the top K) / (number of positives);
- NDCG@K   = sum over hits of 1 / log2(rank + 1), divided by the same sum for an ideal
  ranking (all positives first).

The functions return sums and a user count, so that ranks of a distributed job can
``all_reduce`` them before dividing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class UserItems:
    """Items per user as CSR arrays: the items of user u are ``items[offsets[u]:offsets[u+1]]``."""

    offsets: np.ndarray  # (num_users + 1,) int64
    items: np.ndarray    # (nnz,) int64, or int32 where stored (rows_and_items: int64)

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, num_users: int,
              dtype: Any = np.int64) -> "UserItems":
        """From parallel arrays of user and item indices (user indices < num_users); the
        items in ``dtype`` (int32 for a file, where half the bytes matter)."""
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users, minlength=num_users)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   items[order].astype(dtype, copy=False))

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows_and_items(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row position in ``users``, item) for every item of the given users, vectorised."""
        starts, ends = self.offsets[users], self.offsets[users + 1]
        lengths = ends - starts
        row_first = np.cumsum(lengths) - lengths
        idx = np.repeat(starts - row_first, lengths) + np.arange(int(lengths.sum()))
        return (np.repeat(np.arange(len(users)), lengths),
                self.items[idx].astype(np.int64, copy=False))  # int64 whatever is stored

    def users(self) -> np.ndarray:
        """(n,) the users with at least one item, ascending."""
        return np.flatnonzero(self.counts() > 0)

    def only(self, users: np.ndarray) -> "UserItems":
        """The same items for ``users`` and none for anyone else (a split's positives
        restricted to a sample of its users)."""
        rows, items = self.rows_and_items(users)
        return UserItems.build(users[rows], items, len(self.offsets) - 1)


def score_rows(num_items: int, cap: int = 2048) -> int:
    """Users to score at once against every item: about 64 MB of float32 scores (2^24; at
    50,000 items 335 users), on a CPU as on a GPU. The matrix product gains from more rows
    per call and the top-K costs the same per row: 12,000 users x 50,001 items, 64
    dimensions, on one thread: the product 1.16 s in 64 MB parts, 1.43 s in 16 MB, 2.28 s in
    4 MB; the top-50 0.70 s in each."""
    return int(max(1, min(cap, (1 << 24) // max(num_items, 1))))


class Product:
    """``q @ items.T`` for chunks of queries, written into one reused block of scores.

    A new block per chunk (16 MB then) was returned to the operating system when freed, so
    every chunk paid its page faults again: at 50,000 items and 32 dimensions that was half
    the product's time (2.3 s against 1.1 s for 20,000 users on one thread), and the product
    is most of ranking a catalog.

    The items are kept transposed, contiguous, and padded with zero columns to a multiple of
    16 (64 bytes): a catalog's tables have one row more than its items (index 0, unknown),
    and a matrix product whose width is odd runs at about half speed on a CPU (279 queries x
    15,001 items x 64 on one thread: 46 GFLOP/s, against 81 at 15,008; 39 against 69 at
    50,001). The scores returned are the first ``len(items)`` columns of the block.

    The returned scores are a view of the block: use them (or copy them) before the next
    call. ``host``: scores computed on a GPU are copied into a reused block in CPU memory.
    ``share``: a product of the same items whose transposed copy this one uses (no new copy).
    """

    ALIGN = 16  # columns: 64 bytes of float32

    def __init__(self, items: Optional[torch.Tensor] = None, *, host: bool = False,
                 share: Optional["Product"] = None) -> None:
        if share is not None:
            self.items_t, self.width = share.items_t, share.width
        else:
            self.width, dim = items.shape
            padded = -(-self.width // self.ALIGN) * self.ALIGN
            self.items_t = items.new_zeros(dim, padded)                       # (D, padded)
            self.items_t[:, :self.width] = items.T
        self.host = host and self.items_t.device.type != "cpu"
        self.out: Optional[torch.Tensor] = None
        self.out_host: Optional[torch.Tensor] = None

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        n, padded = len(q), self.items_t.shape[1]
        if self.out is None or len(self.out) < n:
            self.out = torch.empty(n, padded, dtype=torch.result_type(q, self.items_t),
                                   device=self.items_t.device)
        scores = torch.mm(q, self.items_t, out=self.out[:n])
        if self.host:
            if self.out_host is None or len(self.out_host) < n:
                self.out_host = torch.empty(n, padded, dtype=scores.dtype)
            scores = self.out_host[:n].copy_(scores)
        return scores[:, :self.width]


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest scores and their columns, largest first: ``scores.topk(k,
    dim=1)``, exact, and on a CPU 1.4x faster or more over a large catalog.

    On a CPU the columns are cut into blocks; a row's k largest scores lie in its k blocks
    with the largest maxima (any other block's maximum is below k distinct larger scores), so
    the top-k is taken over those k x block candidates only. Which of several equal scores
    comes first may differ from ``topk``'s (its order among ties is unspecified too)."""
    n_rows, n = scores.shape
    k = min(k, n)
    block = topk_block(n, k) if scores.device.type == "cpu" else 0
    if not block:
        out = scores.topk(k, dim=1)
        return out.values, out.indices
    full = n // block * block
    maxima = scores[:, :full].view(n_rows, full // block, block).amax(2)
    blocks = maxima.topk(k, dim=1, sorted=False).indices                        # (rows, k)
    columns = (blocks[:, :, None] * block + torch.arange(block)).reshape(n_rows, -1)
    if full < n:  # the last, partial block is always a candidate
        columns = torch.cat([columns, torch.arange(full, n).expand(n_rows, -1)], 1)
    values, at = scores.gather(1, columns).topk(k, dim=1)
    return values, columns.gather(1, at)


def topk_block(n: int, k: int) -> int:
    """:func:`top_k`'s block width for ``n`` columns: 32 where the catalog is at least 400
    times ``k`` (the top 50 of 50,000 items: 1.4x ``topk``'s speed, of 200,000: 1.5-3.7x, on 2
    cores), else 0: a plain ``topk``, faster on smaller catalogs (15,000 items: 0.7x)."""
    return 32 if n >= 400 * k else 0


def sample_users(positives: UserItems, size: int, seed: int = 0) -> np.ndarray:
    """A fixed random draw of ``size`` users among those with positives, ascending.

    A function of the positives, ``size`` and ``seed`` only, so every epoch, every rank, the
    driver's baselines and every run on the same dataset score the same users.

    Args:
        positives: a split's relevant items per user.
        size: users to draw; 0, or at least the users with positives, takes them all.
        seed: the draw's seed.

    Returns:
        (min(size, n),) user indices, ascending (every user, in order, when not smaller).
    """
    users = positives.users()
    if size <= 0 or size >= len(users):
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=size, replace=False))


def ranking_sums(scores: torch.Tensor, users: np.ndarray, *, exclude: UserItems,
                 positives: UserItems, ks: list[int], owned: bool = False) -> dict[str, float]:
    """Sums of Recall@K and NDCG@K over a chunk of users, and the number of users counted.

    Args:
        scores: (U, num_items) scores of every item for each user (column 0 = unknown item).
        users: (U,) user indices of the rows; rows of users without positives are skipped.
        exclude: items removed from each user's ranking (their training items).
        positives: the relevant items of each user in the evaluated split.
        ks: cut-offs.
        owned: the caller hands ``scores`` over: they are masked in place instead of copied
            (a chunk of 1,024 users x 50,000 items is 200 MB).

    Returns:
        ``{"recall@K": sum, "ndcg@K": sum, ..., "users": count}``.
    """
    n_rows, n_items = scores.shape
    as_float = scores.float()
    if not owned and as_float.data_ptr() == scores.data_ptr():
        as_float = as_float.clone()
    scores = as_float
    scores[:, 0] = float("-inf")
    rows, items = exclude.rows_and_items(users)
    scores[torch.from_numpy(rows), torch.from_numpy(items)] = float("-inf")
    kmax = min(max(ks), n_items)
    top = top_k(scores, kmax)[1].numpy()                                       # (U, kmax)
    return top_sums(top, users, positives=positives, ks=ks, n_items=n_items)


def top_sums(top: np.ndarray, users: np.ndarray, *, positives: UserItems, ks: list[int],
             n_items: int) -> dict[str, float]:
    """:func:`ranking_sums` from each user's ranked items: ``top`` (U, kmax) item indices,
    best first (-1: no item there)."""
    n_rows, kmax = top.shape
    # each user's relevant items as sorted (row, item) keys, each pair once
    rows, items = positives.rows_and_items(users)
    relevant = np.unique(rows * n_items + items)
    n_pos = torch.from_numpy(np.bincount(relevant // n_items, minlength=n_rows))   # (U,)
    keys = np.where(top >= 0, np.arange(n_rows, dtype=np.int64)[:, None] * n_items + top, -1)
    hits = torch.from_numpy(np.isin(keys, relevant)).float()                  # (U, kmax)
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float32))
    keep = n_pos > 0
    out: dict[str, float] = {"users": float(keep.sum())}
    for k in ks:
        k_ = min(k, kmax)
        recall = hits[:, :k_].sum(1) / n_pos.clamp(min=1)
        ideal = torch.cumsum(discount, 0)[(n_pos.clamp(min=1, max=k_) - 1)]
        ndcg = (hits[:, :k_] * discount[:k_]).sum(1) / ideal
        out[f"recall@{k}"] = float(recall[keep].sum())
        out[f"ndcg@{k}"] = float(ndcg[keep].sum())
    return out


def finish(sums: dict[str, float]) -> dict[str, float]:
    """Averages from summed ranking metrics (divide by the user count)."""
    n = max(sums["users"], 1.0)
    return {k: (v / n if k != "users" else int(v)) for k, v in sums.items()}


def popularity_scores(positive_counts: np.ndarray, n_users: int) -> torch.Tensor:
    """The popularity baseline's scores: every user gets each item's training positives."""
    return torch.from_numpy(positive_counts.astype(np.float32)).expand(n_users, -1)


def popularity_order(positive_counts: np.ndarray) -> np.ndarray:
    """Item indices by training positives, most first, ties by index (item 0, the unknown
    item, left out): the popularity baseline's ranking, the same for every user."""
    order = np.argsort(-positive_counts, kind="stable")
    return order[order != 0]


def popularity_top(order: np.ndarray, users: np.ndarray, exclude: UserItems, k: int
                   ) -> np.ndarray:
    """Each user's top ``k`` of :func:`popularity_order` without its excluded items: (U, k)
    item indices, -1 where fewer are left. Only the first ``k`` + (the most items a user of
    the chunk has excluded) places of the order can hold them, so this scans that many
    columns instead of ranking the whole catalog per user."""
    rows, items = exclude.rows_and_items(users)
    counts = np.bincount(rows, minlength=len(users))
    width = min(len(order), k + (int(counts.max()) if len(counts) else 0))
    place = np.full(int(order.max(initial=0)) + 1, width, np.int64)
    place[order[:width]] = np.arange(width)
    p = place[items]
    hidden = np.zeros((len(users), width + 1), bool)  # (the last column: beyond the width)
    hidden[rows, p] = True
    shown = ~hidden[:, :width]
    first = shown & (np.cumsum(shown, axis=1) <= k)
    top = np.full((len(users), k), -1, np.int64)
    r, c = np.nonzero(first)
    top[r, np.cumsum(first, axis=1)[r, c] - 1] = order[c]
    return top


def binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties counted as half), NaN if only one class is present."""
    from scipy.stats import rankdata

    pos = labels > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_platt(scores: np.ndarray, labels: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """Platt scaling: (a, b) of P(label=1 | score) = sigmoid(a * score + b), fitted by Newton's
    method on the log loss (a small ridge keeps it finite when the classes separate)."""
    x = np.stack([scores.astype(np.float64), np.ones(len(scores))], axis=1)  # (N, 2)
    y = labels.astype(np.float64)
    w = np.array([1.0, 0.0])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + 1e-6 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(w[0]), float(w[1])
