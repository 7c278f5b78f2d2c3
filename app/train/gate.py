"""The promotion gate's like-for-like comparison: the candidate and the champion on one split.

A champion trained on another dataset version (yesterday's) cannot be compared by the figures
each recorded on its own split. :func:`compare_on_split` scores both on the candidate's test
split, in this process, with one protocol (the training-time one: the full catalog ranked,
each user's training rows left out, Recall@K and NDCG@K):

- ids are matched by their exact text: the champion ranks the items it knows (an item new in
  this dataset is one it cannot recommend), and every user is queried with the same history,
  the user's positives in the candidate's training split, as serving answers a request with
  a history; a user the champion does not know is answered from that history, or with its
  most popular items when the history has no item it knows (or it reads no history);
- test rows whose (user, item) pair the champion was trained on (its ``rated_items.npz``: every
  split of its dataset) are left out for both models, so neither is scored on what the
  champion has already seen.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from app.data.dataset import read_split_arrays
from app.data.history import UserHistory
from app.train.export import ExportedTwoTower
from app.train.metrics import UserItems, finish, ranking_sums
from app.train.model_folder import item_popularity, load_exported, read_rated_items
from app.train.warm import vocab_ids, source_rows


@dataclass
class SameSplit:
    """Both models on the same rows of the candidate's test split."""

    candidate: dict[str, float]   # recall@K, ndcg@K, users
    champion: dict[str, float]
    rows: int                     # test positives scored
    left_out: int                 # test positives the champion was trained on (not scored)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_on_split(candidate_dir: str | os.PathLike, champion_dir: str | os.PathLike,
                     data_dir: str | os.PathLike, ks: tuple[int, ...] = (20,),
                     split: str = "test") -> Optional[SameSplit]:
    """Score the candidate (trained on ``data_dir``) and the champion on ``split`` of
    ``data_dir``; None when no test row is left once the champion's own rows are left out."""
    data_dir = Path(data_dir)
    cand, champ = load_exported(candidate_dir), load_exported(champion_dir)
    n_users, n_items = cand.spec.num_users, cand.spec.num_items
    ours, theirs = vocab_ids(data_dir), vocab_ids(champion_dir)
    user_map = source_rows(theirs["users"], ours["users"])   # our row -> the champion's, -1
    item_map = source_rows(theirs["items"], ours["items"])
    if len(user_map) != n_users or len(item_map) != n_items:
        raise ValueError(f"{candidate_dir} was not trained on {data_dir}")
    train = read_split_arrays(data_dir / "train", ("user", "item", "label", "timestamp"))
    rows = read_split_arrays(data_dir / split, ("user", "item", "label"))
    pos = rows["label"] > 0
    seen = _seen_pairs(read_rated_items(champion_dir), user_map, item_map, n_items)
    keys = rows["user"].astype(np.int64) * n_items + rows["item"].astype(np.int64)
    fresh = pos & ~np.isin(keys, seen)
    if not fresh.any():
        return None
    positives = UserItems.build(rows["user"][fresh].astype(np.int64),
                                rows["item"][fresh].astype(np.int64), n_users)
    exclude = UserItems.build(train["user"].astype(np.int64), train["item"].astype(np.int64),
                              n_users)
    tp = train["label"] > 0
    history = UserHistory.build(train["user"][tp], train["item"][tp], train["timestamp"][tp],
                                n_users)
    users = positives.users()
    common = dict(users=users, history=history, exclude=exclude, positives=positives,
                  ks=list(ks), n_items=n_items)
    identity = np.arange(n_items, dtype=np.int64)
    return SameSplit(
        candidate=_ranked(cand, user_rows=users, item_map=identity,
                          popularity=item_popularity(candidate_dir), **common),
        champion=_ranked(champ, user_rows=np.maximum(user_map[users], 0), item_map=item_map,
                         popularity=item_popularity(champion_dir), **common),
        rows=int(fresh.sum()), left_out=int((pos & ~fresh).sum()))


def _seen_pairs(rated: Optional[UserItems], user_map: np.ndarray, item_map: np.ndarray,
                n_items: int) -> np.ndarray:
    """The (user, item) pairs the champion was trained on, as ``user * n_items + item`` in
    this dataset's rows (pairs of ids this dataset lacks are dropped)."""
    if rated is None:
        return np.empty(0, np.int64)
    mine_u = np.full(len(rated.offsets) - 1, -1, np.int64)
    mine_u[user_map[user_map >= 0]] = np.flatnonzero(user_map >= 0)
    mine_i = np.full(int(item_map.max(initial=0)) + 1, -1, np.int64)
    mine_i[item_map[item_map >= 0]] = np.flatnonzero(item_map >= 0)
    users, items = rated.rows_and_items(np.arange(len(rated.offsets) - 1))
    items = np.where(items < len(mine_i), items, 0)
    u, i = mine_u[users], mine_i[items]
    keep = (u > 0) & (i > 0)
    return np.unique(u[keep] * n_items + i[keep])


@torch.no_grad()
def _ranked(model: ExportedTwoTower, *, users: np.ndarray, user_rows: np.ndarray,
            item_map: np.ndarray, popularity: np.ndarray, history: UserHistory,
            exclude: UserItems, positives: UserItems, ks: list[int], n_items: int
            ) -> dict[str, float]:
    """One model's metrics over ``users`` (this dataset's rows; ``user_rows``: the model's,
    0 for a user it does not know), ranking this dataset's items (``item_map``: the model's
    row of each, -1 for one it does not know)."""
    spec = model.spec
    known = np.flatnonzero(item_map > 0)
    items = torch.full((n_items, spec.output_dim), 0.0)
    items[known] = torch.cat([model.item_embeddings(torch.from_numpy(item_map[known][s:s + 65536]))
                              for s in range(0, len(known), 65536)])
    pop = np.full(n_items, -np.inf, np.float32)
    pop[known] = popularity[item_map[known]]
    chunk = max(1, min(2048, (1 << 24) // n_items))
    sums: dict[str, float] = {}
    for start in range(0, len(users), chunk):
        part, rows = users[start:start + chunk], user_rows[start:start + chunk]
        lengths, values = history.latest(part, max(spec.history_length, 1))
        bags = np.split(item_map[values], np.cumsum(lengths)[:-1])
        given = [b[b > 0] if len(b[b > 0]) else None for b in bags]
        has = np.array([g is not None for g in given]) & bool(spec.history_length)
        modelled = (rows > 0) | has
        q = model.user_embeddings_given(torch.from_numpy(rows),
                                        given if spec.history_length else [None] * len(rows))
        scores = torch.full((len(part), n_items), float("-inf"))
        scores[:, known] = q @ items[known].T
        if (~modelled).any():  # neither known nor a history it can read: popularity
            scores[torch.from_numpy(~modelled)] = torch.from_numpy(pop)
        for k, v in ranking_sums(scores, part, exclude=exclude, positives=positives,
                                 ks=ks, owned=True).items():
            sums[k] = sums.get(k, 0.0) + v
    return finish(sums or {"users": 0.0})
