"""Row validation of raw ratings, vectorised with pyarrow compute.

Every raw row comes out either accepted (normalised types) or rejected with the first reason it
failed, so rejected rows can be quarantined and counted instead of dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# Normalised columns of a validated batch.
VALIDATED_SCHEMA = pa.schema([
    ("user", pa.string()),           # trimmed user id text
    ("item", pa.string()),           # trimmed item id text
    ("rating", pa.float64()),        # null when rejected
    ("timestamp", pa.int64()),       # epoch seconds; null when rejected
    ("reason", pa.string()),         # null when accepted
    ("rating_raw", pa.string()),     # original text, kept for rejected rows only
    ("timestamp_raw", pa.string()),  # original text, kept for rejected rows only
])

_NUMBER = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"
_INTEGER = r"^[+-]?\d+$"
_DATETIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


@dataclass(frozen=True)
class Columns:
    """Names of the four required columns in the raw input."""

    user: str = "userId"
    item: str = "movieId"
    rating: str = "rating"
    timestamp: str = "timestamp"

    def required(self) -> list[str]:
        return [self.user, self.item, self.rating, self.timestamp]


def _text(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any column as trimmed text; empty strings become null."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    col = pc.utf8_trim_whitespace(col)
    empty = pc.equal(pc.binary_length(col), 0)  # faster than comparing with ""
    if not pc.any(empty).as_py():
        return col
    return pc.if_else(empty, pa.scalar(None, pa.string()), col)


def _parse_rating(col: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Returns (value float64, missing mask, unparsable mask)."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        value = pc.cast(col, pa.float64())
        missing = pc.is_null(value)
        bad = pc.fill_null(pc.is_nan(value), False)  # NaN is a value we cannot use
        return pc.if_else(bad, None, value), missing, bad
    try:  # fast path: every value parses; "nan" / "inf" parse too and are rejected below
        value = pc.cast(col, pa.float64())
        missing = pc.is_null(value)
        bad = pc.fill_null(pc.invert(pc.is_finite(value)), False)
        return pc.if_else(bad, None, value), missing, bad
    except pa.ArrowInvalid:
        pass
    text = _text(col)
    missing = pc.is_null(text)
    ok = pc.fill_null(pc.match_substring_regex(text, _NUMBER), False)
    value = pc.cast(pc.if_else(ok, text, None), pa.float64())
    return value, missing, pc.and_(pc.invert(missing), pc.invert(ok))


def _parse_timestamp(col: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Epoch seconds from integers, epoch-second text or ISO-8601 datetimes.

    Returns (value int64, missing mask, unparsable mask).
    """
    if pa.types.is_integer(col.type):
        value = pc.cast(col, pa.int64())
        missing = pc.is_null(value)
        return value, missing, pc.and_(missing, False)
    if pa.types.is_timestamp(col.type):
        value = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
        missing = pc.is_null(value)
        return value, missing, pc.and_(missing, False)
    try:  # fast path: all epoch seconds
        value = pc.cast(col, pa.int64())
        missing = pc.is_null(value)
        return value, missing, pc.and_(missing, False)
    except pa.ArrowInvalid:
        pass
    text = _text(col)
    missing = pc.is_null(text)
    is_int = pc.fill_null(pc.match_substring_regex(text, _INTEGER), False)
    value = pc.cast(pc.if_else(is_int, text, None), pa.int64())
    whole_seconds = pc.replace_substring_regex(text, r"(:\d\d)\.\d+$", r"\1")
    for fmt in _DATETIME_FORMATS:
        parsed = pc.strptime(whole_seconds, format=fmt, unit="s", error_is_null=True)
        value = pc.coalesce(value, pc.cast(parsed, pa.int64()))
    return value, missing, pc.and_(pc.invert(missing), pc.is_null(value))


def validate_table(table: pa.Table, *, columns: Columns, rating_min: float,
                   rating_max: float) -> pa.Table:
    """Validate raw rows.

    Args:
        table: raw rows holding at least the four required columns, of any types.
        columns: names of the required columns.
        rating_min, rating_max: inclusive valid rating range.

    Returns:
        A table with :data:`VALIDATED_SCHEMA`, one row per input row, in input order.
    """
    if table.num_rows == 0:  # an empty block may come without columns
        return VALIDATED_SCHEMA.empty_table()
    user = _text(table[columns.user])
    item = _text(table[columns.item])
    rating_col = table[columns.rating].combine_chunks()
    ts_col = table[columns.timestamp].combine_chunks()
    rating, rating_missing, rating_bad = _parse_rating(rating_col)
    ts, ts_missing, ts_bad = _parse_timestamp(ts_col)
    out_of_range = pc.fill_null(
        pc.or_(pc.less(rating, rating_min), pc.greater(rating, rating_max)), False)

    # First failing check wins; checks are listed in the order a person would fix them.
    empty = pc.and_(pc.and_(pc.is_null(user), pc.is_null(item)),
                    pc.and_(rating_missing, ts_missing))
    checks = [
        (empty, "empty row"),  # a blank CSV line, or one with only separators
        (pc.is_null(user), f"missing {columns.user}"),
        (pc.is_null(item), f"missing {columns.item}"),
        (rating_missing, f"missing {columns.rating}"),
        (rating_bad, f"unparsable {columns.rating}"),
        (out_of_range, f"{columns.rating} outside [{rating_min:g}, {rating_max:g}]"),
        (ts_missing, f"missing {columns.timestamp}"),
        (ts_bad, f"unparsable {columns.timestamp}"),
    ]
    any_rejected = any(pc.any(mask).as_py() for mask, _ in checks)
    reason = pa.nulls(len(table), pa.string())
    if any_rejected:
        for mask, text in reversed(checks):
            reason = pc.if_else(mask, text, reason)
    rejected = pc.is_valid(reason)

    def raw_if_rejected(col: pa.Array) -> pa.Array:
        if not any_rejected:
            return pa.nulls(len(table), pa.string())
        return pc.if_else(rejected, _text(col), None)

    if any_rejected:
        rating, ts = pc.if_else(rejected, None, rating), pc.if_else(rejected, None, ts)
    return pa.Table.from_arrays(
        [user, item, rating, ts,
         reason, raw_if_rejected(rating_col), raw_if_rejected(ts_col)],
        schema=VALIDATED_SCHEMA)
