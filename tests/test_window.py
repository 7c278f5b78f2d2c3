"""``prepare_data --window-days N``: only the accepted ratings of the last N days before the
input's latest timestamp reach the splits and the vocabularies; the older ones are counted in
the manifest (``counts.outside_window``), never dropped silently."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from app.core.config import ConfigError, load_config
from app.core.publish import current
from app.data.dataset import SPLITS, Manifest, id_rows, read_manifest, read_split_arrays
from app.data.prepare import prepare_dataset
from tests.conftest import data_config

DAY = 86_400
START = 1_530_000_000  # 2018-06-26
LATEST = START + 100 * DAY - 1  # the ratings span 100 days


def ratings() -> list[tuple]:
    """(user, item, rating, timestamp) over 100 days: 20 users rate 30 items, one rating every
    few hours; user 900 and item 9000 rate and are rated only in the first half; one (user,
    item) pair is repeated inside the last days and one across the edge of a 10-day window."""
    rows = []
    n = 20 * 30
    for k, (u, i) in enumerate((u, i) for u in range(1, 21) for i in range(100, 130)):
        ts = START + (k * 13) % n * (100 * DAY // n)  # spread, not in user order
        rows.append((u, i, 1.0 + (u * i) % 5, ts))
    rows += [(900, 100 + d, 4.0, START + d * DAY) for d in range(10)]  # old user only
    rows += [(u, 9000, 5.0, START + u * DAY) for u in range(1, 11)]    # old item only
    rows += [(3, 200, 2.0, LATEST - DAY), (3, 200, 4.0, LATEST)]       # a duplicate, recent
    rows += [(4, 201, 3.0, LATEST - 30 * DAY), (4, 201, 5.0, LATEST - DAY)]  # across the edge
    rows.append((5, 111, 99.0, START))  # a rejected row (rating out of range), old
    return rows


def write_csv(path: Path, rows: list[tuple]) -> str:
    path.write_text("\n".join(["userId,movieId,rating,timestamp"]
                              + [",".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def prepare(source: str, out: Path, **overrides) -> tuple[Manifest, Path]:
    cfg = data_config(dataset="csv", input=source, **overrides)
    return prepare_dataset(cfg, str(out), verbose=True), current(out)


def rows_by_id(data: Path) -> list[tuple[str, str, int]]:
    """(user id, item id, timestamp) of every row of every split, through the vocabularies."""
    ids = {k: {r: i for i, r in v.items()} for k, v in id_rows(data).items()}
    out = []
    for split in SPLITS:
        s = read_split_arrays(data / split)
        out += [(ids["users"][u], ids["items"][i], int(t))
                for u, i, t in zip(s["user"], s["item"], s["timestamp"])]
    return sorted(out)


def test_a_window_keeps_the_last_days_and_counts_the_rest(ray_local, tmp_path, capsys):
    rows = ratings()
    src = write_csv(tmp_path / "r.csv", rows)
    m, data = prepare(src, tmp_path / "data", window_days=10)

    cutoff = LATEST - 10 * DAY
    accepted = [r for r in rows if r[2] <= 5.0]
    inside = [r for r in accepted if r[3] >= cutoff]
    older = len(accepted) - len(inside)
    assert 0 < len(inside) < len(accepted) and older > 100
    # the recent duplicate merges; the pair across the edge keeps its one row in the window
    expected = sorted({(str(u), str(i), t) for u, i, _, t in inside}
                      - {("3", "200", LATEST - DAY)})
    assert rows_by_id(data) == expected

    c = m.counts
    assert (c.read, c.accepted, c.rejected) == (len(rows), len(accepted), 1)
    assert c.outside_window == older and c.duplicates.rows_merged == 1
    assert sum(c.splits.values()) == c.accepted - c.duplicates.rows_merged - c.outside_window
    assert read_manifest(data).counts.outside_window == older  # as written
    assert m.config["window_days"] == 10
    assert list((data / "rejects").rglob("*.parquet"))  # the old reject is still quarantined

    # ids seen only before the window have no row
    vocab = id_rows(data)
    assert "900" not in vocab["users"] and "9000" not in vocab["items"]
    assert set(vocab["users"]) == {str(r[0]) for r in inside}
    assert set(vocab["items"]) == {str(r[1]) for r in inside}

    since = datetime.fromtimestamp(cutoff, timezone.utc).date().isoformat()
    line = re.search(r"window: .*", capsys.readouterr().out).group(0)
    assert line == f"window: the last 10 days (from {since}): {older:,} rows older left out"


def test_no_window_changes_nothing(ray_local, tmp_path):
    rows = ratings()
    src = write_csv(tmp_path / "r.csv", rows)
    m, data = prepare(src, tmp_path / "all")
    assert m.config["window_days"] == 0 and m.counts.outside_window == 0
    assert "outside_window" not in read_manifest(data).to_dict()["counts"]  # as before
    assert sum(m.counts.splits.values()) == m.counts.accepted - m.counts.duplicates.rows_merged
    vocab = id_rows(data)
    assert "900" in vocab["users"] and "9000" in vocab["items"]

    # a window longer than the data leaves nothing out: the same rows, split the same way
    wide, wide_data = prepare(src, tmp_path / "wide", window_days=365)
    assert wide.counts == m.counts and wide.vocab == m.vocab
    for split in SPLITS:
        a, b = read_split_arrays(data / split), read_split_arrays(wide_data / split)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", [float("nan"), "nan", -1, -0.5, 36_501, float("inf")])
def test_a_window_that_is_not_a_number_of_days_is_refused(value):
    with pytest.raises(ConfigError, match="--window-days"):
        load_config(overrides={"window_days": value})
    assert load_config(overrides={"window_days": 0.5}).data.window_days == 0.5
