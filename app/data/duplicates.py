"""Duplicate (user, item) rows of the validated blocks, resolved by a policy before labels and
splits, so that one pair never gets two labels.

Policies (``--duplicates``):
    latest  keep the row with the greatest timestamp (ties: the higher rating)
    max     keep the row with the highest rating (ties: the greatest timestamp)
    mean    keep one row: the mean rating of the pair, its greatest timestamp
    keep    keep every row (nothing here runs)
Rows equal in both timestamp and rating are the same interaction; the last in input order is
kept, so the result never depends on how the input was split into blocks.

How (plain Ray tasks over the materialised blocks, no Ray Data shuffle of whole rows):
    per block    ids -> vocabulary indices (kept for encoding); the accepted rows' (pair key,
                 position) hash-partitioned by user, each part sorted by key
    per part     merge the sorted runs; for the repeated pairs only, read timestamp and rating
                 from their blocks and choose the survivor; return the decisions (block, row,
                 new rating or NaN = merged away), sorted by block
    per block    (in the encode step) mark / re-rate its rows, see :func:`decisions_for`
Only 16 bytes per accepted row cross the object store, and the blocks sort their own runs in
parallel, so the one serial step per part is a merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from app.data.validate import VALIDATED_SCHEMA

_PART_SCHEMA = pa.schema([("key", pa.int64()),   # user index * (items + 1) + item index
                          ("pos", pa.int64())])  # block << 32 | row
DECISION_SCHEMA = pa.schema([("block", pa.int32()), ("row", pa.int32()),
                             ("rating", pa.float64())])  # NaN: merged away
_ROWS_PER_PART = 8_000_000  # keeps one reducer's sort within about 0.5 GB


def vocab_indices(table: pa.Table, users: pa.Array, items: pa.Array) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Vocabulary indices (1..N; 0 for unknown or missing ids) of a validated block.

    Returns:
        (user indices int32 (rows,), item indices int32 (rows,))
    """
    user = pc.fill_null(pc.add(pc.index_in(table["user"], value_set=users), 1), 0)
    item = pc.fill_null(pc.add(pc.index_in(table["item"], value_set=items), 1), 0)
    return user.to_numpy().astype(np.int32), item.to_numpy().astype(np.int32)


def partition_block(table: pa.Table, block: int, users: pa.Array, items: pa.Array,
                    parts: int) -> list[pa.Table]:
    """Vocabulary indices of a validated block and its accepted rows' pair keys, by user.

    Args:
        table: a validated block (:data:`app.data.validate.VALIDATED_SCHEMA`).
        block: its position among the blocks.
        users, items: the vocabularies (ids as text, index i - 1 holds id of index i).
        parts: number of partitions.

    Returns:
        ``[indices, part 0, ..., part parts-1]``: indices has user_idx, item_idx (int32) for
        every row; part p holds (key, pos) of the accepted rows whose user index is p modulo
        ``parts``, sorted by key.
    """
    if table.num_rows == 0:  # an empty block may come without columns
        table = VALIDATED_SCHEMA.empty_table()
    user, item = vocab_indices(table, users, items)
    indices = pa.table({"user_idx": user, "item_idx": item})
    ok = np.flatnonzero(pc.is_null(table["reason"]).to_numpy(zero_copy_only=False))
    key = user[ok].astype(np.int64) * (len(items) + 1) + item[ok]  # unique per (user, item)
    pos = (np.int64(block) << 32) | ok
    part = user[ok] % parts
    out = [indices]
    for p in range(parts):
        mine = np.flatnonzero(part == p) if parts > 1 else np.arange(len(ok))
        mine = mine[np.argsort(key[mine])]
        out.append(pa.table({"key": key[mine], "pos": pos[mine]}, schema=_PART_SCHEMA))
    return out


def _columns_at(blocks: list, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(timestamp int64, rating float64) of the rows at ``pos`` (block << 32 | row), read from
    the blocks (object references, or tables in tests)."""
    ts, rating = np.empty(len(pos), np.int64), np.empty(len(pos), np.float64)
    block, row = pos >> 32, pos & 0xFFFFFFFF
    for b in np.unique(block):
        sel = np.flatnonzero(block == b)
        ref = blocks[int(b)]
        table = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        at = pa.array(row[sel])
        ts[sel] = table["timestamp"].take(at).to_numpy()
        rating[sel] = table["rating"].take(at).to_numpy()
    return ts, rating


def resolve(parts: list[pa.Table], policy: str, blocks: list) -> tuple[pa.Table,
                                                                       dict[str, Any]]:
    """Survivors of the repeated pairs in one partition.

    Args:
        parts: this partition's sorted runs from every block (:data:`_PART_SCHEMA`).
        policy: latest, max or mean.
        blocks: the validated blocks (object references), to read repeated rows from.

    Returns:
        (decisions sorted by (block, row): the rows merged away (rating NaN) and, for
        ``mean``, the survivors' new rating; stats: ``rows_merged``, ``pairs`` (repeated pairs) and
        ``rating_delta`` (change of the accepted ratings' sum))
    """
    t = pa.concat_tables(parts) if parts else _PART_SCHEMA.empty_table()
    key = t["key"].to_numpy()
    order = np.argsort(key, kind="stable")  # timsort: a merge of the sorted runs
    sorted_key = key[order]
    repeat = sorted_key[1:] == sorted_key[:-1]
    if not repeat.any():
        return DECISION_SCHEMA.empty_table(), {"rows_merged": 0, "pairs": 0,
                                               "rating_delta": 0.0}
    in_pair = np.zeros(len(key), bool)
    in_pair[1:] |= repeat
    in_pair[:-1] |= repeat
    rows = order[in_pair]  # only the rows of repeated pairs are read and ordered in full
    key, pos = key[rows], t["pos"].to_numpy()[rows]
    ts, rating = _columns_at(blocks, pos)
    first, second = (rating, ts) if policy == "max" else (ts, rating)
    order = np.lexsort((pos, second, first, key))  # the survivor ends its pair
    key, ts, rating, pos = key[order], ts[order], rating[order], pos[order]
    last = np.r_[key[1:] != key[:-1], True]
    new_rating = np.where(last, rating, np.nan)
    if policy == "mean":
        starts = np.flatnonzero(np.r_[True, last[:-1]])  # a pair starts after a survivor
        means = np.add.reduceat(rating, starts) / np.diff(np.r_[starts, len(key)])
        new_rating[last] = means
        keep = last  # every survivor is re-rated (to its own rating for equal ones)
    else:
        keep = np.zeros(len(key), bool)  # survivors stay as they are
    changed = ~last | keep
    delta = float(np.nansum(new_rating[keep] - rating[keep]) - rating[~last].sum())
    pos = pos[changed]
    order = np.argsort(pos)  # by block, then row
    decisions = pa.table({"block": (pos[order] >> 32).astype(np.int32),
                          "row": (pos[order] & 0xFFFFFFFF).astype(np.int32),
                          "rating": new_rating[changed][order]}, schema=DECISION_SCHEMA)
    return decisions, {"rows_merged": int((~last).sum()), "pairs": int(last.sum()),
                       "rating_delta": delta}


def decisions_for(block: int, decisions: list[pa.Table]) -> tuple[np.ndarray, np.ndarray]:
    """One block's decisions from every partition's (each sorted by block).

    Returns:
        (rows int64, new ratings float64 with NaN for rows merged away)
    """
    rows, ratings = [], []
    for d in decisions:
        blocks = d["block"].to_numpy()
        lo, hi = np.searchsorted(blocks, block, "left"), np.searchsorted(blocks, block, "right")
        rows.append(d["row"].to_numpy()[lo:hi].astype(np.int64))
        ratings.append(d["rating"].to_numpy()[lo:hi])
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    return np.concatenate(rows), np.concatenate(ratings)


@dataclass
class Plan:
    """What :func:`plan` found: per-block vocabulary indices and every partition's decisions
    (object references, in block order), and the totals."""

    indices: list = field(default_factory=list)
    decisions: list = field(default_factory=list)
    rows_merged: int = 0
    pairs: int = 0
    rating_delta: float = 0.0


def _parts_for(accepted: int, blocks: int) -> int:
    """Partitions: a multiple of the CPUs (each sorts one at a time, in parallel, in even
    waves), enough that none holds more than about ``_ROWS_PER_PART`` rows."""
    cpus = max(1, min(blocks, int(ray.cluster_resources().get("CPU", 1))))
    waves = max(1, -(-accepted // (cpus * _ROWS_PER_PART)))
    return int(min(1024, cpus * waves))


_remote_partition = ray.remote(num_cpus=1)(partition_block)


@ray.remote(num_cpus=1, num_returns=2)
def _remote_resolve(policy: str, blocks: list, *parts: pa.Table) -> tuple[pa.Table,
                                                                          dict[str, Any]]:
    return resolve(list(parts), policy, blocks)


def plan(blocks: list, *, users: Any, items: Any, accepted: int, policy: str) -> Plan:
    """Find the repeated pairs of the validated blocks and decide what each block keeps.

    Args:
        blocks: object references of the validated blocks, in order.
        users, items: the vocabularies (text arrays, or object references of them).
        accepted: accepted rows in all (sizes the partitions).
        policy: latest, max or mean.

    Returns:
        The plan: references to pass to the encode step, and the totals.
    """
    parts = _parts_for(accepted, len(blocks))
    outputs = [_remote_partition.options(num_returns=parts + 1).remote(ref, b, users, items,
                                                                       parts)
               for b, ref in enumerate(blocks)]
    indices = [out[0] for out in outputs]
    # the blocks go inside a list: references the task reads only for repeated rows
    resolved = [_remote_resolve.remote(policy, list(blocks), *[out[p + 1] for out in outputs])
                for p in range(parts)]
    decisions = [r[0] for r in resolved]
    stats = ray.get([r[1] for r in resolved])
    return Plan(indices=indices, decisions=decisions,
                rows_merged=sum(s["rows_merged"] for s in stats),
                pairs=sum(s["pairs"] for s in stats),
                rating_delta=sum(s["rating_delta"] for s in stats))
