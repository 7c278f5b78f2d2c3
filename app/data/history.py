"""Users' histories: each user's positive items in time order, for the query tower's history bag.

:class:`UserHistory` keeps every user's positives sorted by (user, timestamp) as CSR arrays and
answers two vectorised questions:

- :meth:`UserHistory.before`: for training rows, the latest ``n`` positives of the row's user
  strictly before the row's timestamp, without the row's own item (no leakage of the target
  or of the future);
- :meth:`UserHistory.latest`: for evaluation and inference, the latest ``n`` positives.

Both return ``(lengths (B,), values (sum of lengths,))``, the jagged layout of a
``KeyedJaggedTensor`` feature. numpy only: inference actors and the driver import it cheaply.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

HISTORY_FILE = "user_history.npz"


def _gather(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[starts[r] : starts[r] + lengths[r]] for every row r, concatenated."""
    row_first = np.cumsum(lengths) - lengths
    idx = np.repeat(starts - row_first, lengths) + np.arange(int(lengths.sum()))
    return values[idx]


@dataclass
class UserHistory:
    """Positives per user in time order: user u's are ``items[offsets[u]:offsets[u + 1]]``."""

    offsets: np.ndarray     # (num_users + 1,) int64
    items: np.ndarray       # (nnz,) int64, per user in ascending time
    timestamps: np.ndarray  # (nnz,) int64

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
              num_users: int) -> "UserHistory":
        """From parallel arrays of positives (user indices < num_users). Ties in time keep
        item order, so the result does not depend on row order."""
        users = users.astype(np.int64)
        order = np.lexsort((items, timestamps, users))
        counts = np.bincount(users, minlength=num_users)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   items[order].astype(np.int64), timestamps[order].astype(np.int64))

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def latest(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The latest ``n`` positives of each user (fewer when the user has fewer)."""
        users = np.asarray(users, np.int64)
        known = (users >= 0) & (users < self.num_users)
        u = np.where(known, users, 0)
        ends = np.where(known, self.offsets[u + 1], 0)
        starts = np.maximum(np.where(known, self.offsets[u], 0), ends - n)
        lengths = ends - starts
        return lengths, _gather(starts, lengths, self.items)

    def before(self, users: np.ndarray, timestamps: np.ndarray, targets: np.ndarray, n: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """For each row: the latest ``n`` positives of its user strictly before its timestamp,
        leaving out the row's own item (a repeat of the target is not a hint of it)."""
        users = np.asarray(users, np.int64)
        timestamps = np.asarray(timestamps, np.int64)
        starts, ends = self.offsets[users], self.offsets[users + 1]
        # first position in each user's run with a timestamp >= the row's: a binary search
        # per row, vectorised as a fixed number of halving steps over all rows at once
        lo, hi = starts.copy(), ends.copy()
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            less = np.zeros(len(lo), bool)
            less[active] = self.timestamps[mid[active]] < timestamps[active]
            lo = np.where(active & less, mid + 1, lo)
            hi = np.where(active & ~less, mid, hi)
        first = np.maximum(starts, lo - n)
        lengths = lo - first
        values = _gather(first, lengths, self.items)
        keep = values != np.repeat(np.asarray(targets, np.int64), lengths)
        if not keep.all():
            rows = np.repeat(np.arange(len(users)), lengths)
            lengths = np.bincount(rows[keep], minlength=len(users)).astype(np.int64)
            values = values[keep]
        return lengths, values

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, offsets=self.offsets, items=self.items, timestamps=self.timestamps)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UserHistory":
        """Inverse of :meth:`to_bytes` (plain arrays only: nothing is unpickled)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["offsets"].astype(np.int64), z["items"].astype(np.int64),
                       z["timestamps"].astype(np.int64))
