"""Deterministic synthetic ratings in the raw schema, with structure a model can learn.

Users and items each belong to one of ``CLUSTERS`` taste clusters. Users are drawn with a skewed
activity, items with a popularity skew (a few items get most ratings), and most of a user's
ratings fall in their own cluster, where ratings are higher. Rows are generated in fixed-size
chunks, each from its own seeded generator, so the output does not depend on how Ray splits
the work.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from app.core.config import DataConfig

CLUSTERS = 20
CHUNK_ROWS = 250_000
_START = 1_420_070_400  # 2015-01-01, epoch seconds


def sizes(rows: int, users: int = 0, items: int = 0) -> tuple[int, int]:
    """Default user and item counts for a given number of rows."""
    return (users or max(CLUSTERS, rows // 50)), (items or max(100, rows // 200))


def generate_chunk(chunk: int, *, rows: int, seed: int, users: int = 0,
                   items: int = 0) -> pa.Table:
    """Rows ``chunk * CHUNK_ROWS`` up to ``rows`` of the synthetic dataset.

    Returns:
        A table with userId (int64), movieId (int64), rating (float64), timestamp (int64).
    """
    num_users, num_items = sizes(rows, users, items)
    n = min(CHUNK_ROWS, rows - chunk * CHUNK_ROWS)
    rng = np.random.default_rng([seed, chunk])
    user = (num_users * rng.random(n) ** 1.5).astype(np.int64)          # skewed activity
    user_cluster = (user * 2654435761) % CLUSTERS
    per_cluster = max(1, num_items // CLUSTERS)
    in_cluster = rng.random(n) < 0.8
    rank_in_cluster = (per_cluster * rng.random(n) ** 2.5).astype(np.int64)
    item = np.where(in_cluster,
                    np.minimum(rank_in_cluster * CLUSTERS + user_cluster, num_items - 1),
                    (num_items * rng.random(n) ** 3).astype(np.int64))  # global popularity
    match = (item % CLUSTERS) == user_cluster
    rating = 2.6 + 1.6 * match + rng.normal(0.0, 0.8, n)
    rating = np.clip(np.round(rating * 2) / 2, 0.5, 5.0)
    timestamp = _START + chunk * 86_400 + rng.integers(0, 86_400 * 365, n)
    return pa.table({"userId": user + 1, "movieId": item + 1, "rating": rating,
                     "timestamp": timestamp})


def num_chunks(rows: int) -> int:
    return -(-rows // CHUNK_ROWS)


def synthetic_dataset(cfg: DataConfig) -> ray.data.Dataset:
    """The synthetic dataset of ``cfg.rows`` rows as a lazy Ray Dataset."""
    kwargs = dict(rows=cfg.rows, seed=cfg.seed, users=cfg.synthetic_users,
                  items=cfg.synthetic_items)

    def make(batch: dict[str, np.ndarray]) -> pa.Table:
        return pa.concat_tables([generate_chunk(int(c), **kwargs) for c in batch["id"]])

    return ray.data.range(num_chunks(cfg.rows)).map_batches(make, batch_size=1,
                                                            batch_format="numpy")
