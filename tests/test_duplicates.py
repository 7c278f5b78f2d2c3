"""Resolving repeated (user, item) rows: the per-partition rule and its application to a block."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from app.data.duplicates import _PART_SCHEMA, decisions_for, resolve

# one pair (key 11) rated four times across two blocks, one pair (key 12) rated once;
# the last two rows of key 11 tie on timestamp
ROWS = [  # key, timestamp, rating, block, row
    (11, 100, 3.0, 0, 0),
    (12, 100, 1.0, 0, 1),
    (11, 300, 2.0, 1, 0),
    (11, 300, 4.0, 1, 1),
    (11, 200, 5.0, 0, 2),
]


def parts_and_blocks(rows=ROWS) -> tuple[list[pa.Table], list[pa.Table]]:
    """The rows as validated blocks (timestamp, rating at their row) and as sorted runs of
    (key, pos), one run per block as the partition step sends them."""
    n_blocks = max(r[3] for r in rows) + 1
    blocks, runs = [], []
    for b in range(n_blocks):
        mine = [r for r in rows if r[3] == b]
        size = max(r[4] for r in mine) + 1 if mine else 0
        ts, rating = np.zeros(size, np.int64), np.zeros(size)
        for key, t, x, _, row in mine:
            ts[row], rating[row] = t, x
        blocks.append(pa.table({"timestamp": ts, "rating": rating}))
        mine.sort()
        runs.append(pa.table({"key": [r[0] for r in mine],
                              "pos": [(b << 32) | r[4] for r in mine]}, schema=_PART_SCHEMA))
    return runs, blocks


def decided(policy: str, rows=ROWS) -> tuple[dict, dict]:
    runs, blocks = parts_and_blocks(rows)
    table, stats = resolve(runs, policy, blocks)
    got = {(b, r): x for b, r, x in zip(*(table[c].to_pylist()
                                          for c in ("block", "row", "rating")))}
    return got, stats


def test_latest_keeps_the_greatest_timestamp_ties_the_higher_rating():
    got, stats = decided("latest")
    survivor = (1, 1)  # timestamp 300 and rating 4 beats timestamp 300 and rating 2
    assert survivor not in got and set(got) == {(0, 0), (1, 0), (0, 2)}
    assert all(np.isnan(x) for x in got.values())  # dropped
    assert stats == {"rows_merged": 3, "pairs": 1, "rating_delta": -(3.0 + 2.0 + 5.0)}


def test_max_keeps_the_highest_rating_ties_the_latest():
    got, stats = decided("max")
    assert set(got) == {(0, 0), (1, 0), (1, 1)}  # (0, 2) has rating 5
    rows = ROWS + [(11, 400, 5.0, 1, 2)]  # the same top rating, later
    got, _ = decided("max", rows)
    assert (1, 2) not in got and (0, 2) in got


def test_mean_keeps_one_row_with_the_mean_rating_at_the_latest_time():
    got, stats = decided("mean")
    assert {k for k, v in got.items() if np.isnan(v)} == {(0, 0), (1, 0), (0, 2)}
    assert got[(1, 1)] == pytest.approx((3 + 2 + 4 + 5) / 4)
    assert stats["rows_merged"] == 3 and stats["pairs"] == 1
    assert stats["rating_delta"] == pytest.approx(3.5 - (3 + 2 + 4 + 5))


def test_identical_rows_keep_the_last_in_input_order_and_no_repeats_decide_nothing():
    rows = [(5, 100, 4.0, 0, 3), (5, 100, 4.0, 2, 0), (5, 100, 4.0, 1, 7)]
    got, stats = decided("latest", rows)
    assert set(got) == {(0, 3), (1, 7)} and stats["rows_merged"] == 2
    runs, blocks = parts_and_blocks(ROWS[:2])
    table, stats = resolve(runs, "latest", blocks)
    assert table.num_rows == 0 and stats["rows_merged"] == 0
    table, stats = resolve([], "mean", [])
    assert table.num_rows == 0


def test_each_block_gets_its_own_decisions():
    runs, blocks = parts_and_blocks()
    table, _ = resolve(runs, "mean", blocks)
    rows, ratings = decisions_for(0, [table])
    assert sorted(rows.tolist()) == [0, 2] and np.isnan(ratings).all()
    rows, ratings = decisions_for(1, [table, table.slice(0, 0)])
    assert rows.tolist() == [0, 1] and np.isnan(ratings[0]) and ratings[1] == 3.5
    assert decisions_for(3, [table])[0].size == 0
