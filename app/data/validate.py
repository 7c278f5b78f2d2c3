"""Row validation of raw ratings, vectorised with pyarrow compute.

Every raw row comes out either accepted (normalised types) or rejected with the first reason it
failed, so rejected rows can be quarantined and counted instead of dropped.

Ids are exact text: text columns keep what is written (``007``, ``7`` and ``+7`` are three
ids; surrounding whitespace is trimmed), integer columns become their decimal text, float
columns their integer's text when the value is integral (``1.0`` -> ``1``); NaN is a missing
id and any other float (``1.5``, inf) is rejected. :func:`id_text` is the rule, shared with
batch inference.

Timestamps become epoch seconds (UTC): ISO-8601 text with ``Z`` or an offset is converted to
UTC, without one it is read as UTC; numbers are read in ``timestamp_unit``, whose ``auto``
reads the unit from the number of digits (:data:`AUTO_UNIT_LIMITS`). Values outside
``[timestamp_min, timestamp_max]`` are rejected, so misread units and placeholder dates never
pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import numpy as np
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
_INTEGER = r"^[+-]?\d{1,18}$"  # fits int64; longer numbers are read as floats
# Tried in order, each only on the values still unparsed; %z takes Z, +02:00 and -0530.
# Fractional seconds are cut before parsing (epoch seconds are whole).
_DATETIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z",
                     "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M",
                     "%Y-%m-%dT%H:%M%z", "%Y-%m-%d")

TIMESTAMP_UNITS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}  # per second
# auto: |value| below 1e12 (up to 12 digits) is seconds, below 1e15 milliseconds, below 1e18
# microseconds, else nanoseconds. Seconds then reach the year 33658 and each finer unit starts at
# 2001-09-09, so a value read in the wrong unit lands centuries outside any plausible range and
# is rejected, never shifted silently (milliseconds before 2001-09-09 need timestamp_unit "ms").
AUTO_UNIT_LIMITS = ((10**12, 1), (10**15, 10**3), (10**18, 10**6))
TIMESTAMP_MIN = 0               # 1970-01-01, the default plausible range ...
TIMESTAMP_MAX = 4_102_444_800   # ... up to 2100-01-01 (UTC)
_FLOAT_ID_LIMIT = 2.0**63       # float ids at or beyond the int64 range have no exact text


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
    try:  # fast path: integer text has no space to trim and no empty value (8x a trim)
        pc.cast(col, pa.int64())
        return col
    except pa.ArrowInvalid:
        pass
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


def id_text(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """Ids as exact text, whatever the column type.

    Text stays as written (trimmed; empty -> null); integers become their decimal text; floats
    their integer's text when integral (``1.0`` -> ``"1"``), NaN null. Other floats (``1.5``,
    inf, beyond the int64 range) have no exact id: they keep their float text, flagged.

    Args:
        col: an id column of any type.

    Returns:
        (text, null where missing; mask of non-integral float ids, to reject or ignore)
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not pa.types.is_floating(col.type):
        # integers cast to their exact decimal text; text is trimmed
        return _text(col), pa.array(np.zeros(len(col), bool))
    value = pc.cast(col, pa.float64())
    missing = pc.fill_null(pc.is_nan(value), True)  # NaN is how pandas writes a missing id
    exact = pc.and_(pc.and_(pc.is_finite(value), pc.equal(pc.floor(value), value)),
                    pc.less(pc.abs(value), _FLOAT_ID_LIMIT))
    exact = pc.fill_null(exact, False)
    bad = pc.and_(pc.invert(missing), pc.invert(exact))
    as_int = pc.cast(pc.cast(pc.if_else(exact, value, None), pa.int64()), pa.string())
    text = pc.if_else(bad, pc.cast(value, pa.string()), as_int)  # bad ones kept for rejects
    return text, bad


def first_repeated(ids: pa.Array | pa.ChunkedArray) -> Optional[str]:
    """The first id that occurs more than once (as text), or None when all are distinct."""
    if pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return None
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    return str(repeated.field("values")[0].as_py())


def _seconds(value: np.ndarray, unit: str) -> np.ndarray:
    """Numeric timestamps (int64 or float64) in ``unit`` -> whole epoch seconds (floor)."""
    if unit == "auto":
        lo, hi = (value.min(), value.max()) if len(value) else (0, 0)
        if -AUTO_UNIT_LIMITS[0][0] < lo and hi < AUTO_UNIT_LIMITS[0][0]:
            factor: np.ndarray | int = 1  # the usual case: every value in seconds
        else:
            magnitude = np.abs(value)
            factor = np.select([magnitude < limit for limit, _ in AUTO_UNIT_LIMITS],
                               [f for _, f in AUTO_UNIT_LIMITS], TIMESTAMP_UNITS["ns"])
    else:
        factor = TIMESTAMP_UNITS[unit]
    if value.dtype.kind == "f":
        # beyond int64 it is out of any range anyway; clip so the cast stays defined
        return np.clip(np.floor(value / factor), -2.0**62, 2.0**62).astype(np.int64)
    if isinstance(factor, int) and factor == 1:
        return value.astype(np.int64, copy=False)
    return np.floor_divide(value, factor)


def _numeric_seconds(col: pa.Array, unit: str) -> pa.Array:
    """An int64 or float64 column of numeric timestamps -> int64 epoch seconds (nulls kept)."""
    missing = pc.is_null(col)
    if pa.types.is_floating(col.type):
        missing = pc.or_(missing, pc.fill_null(pc.is_nan(col), False))
        col = pc.if_else(missing, pa.scalar(0.0, col.type), col)
    has_nulls = pc.any(missing).as_py()
    values = pc.fill_null(col, 0).to_numpy(zero_copy_only=False)
    seconds = _seconds(values, unit)
    return pa.array(seconds, pa.int64(), mask=missing.to_numpy(zero_copy_only=False)
                    if has_nulls else None)


def _parse_timestamp(col: pa.Array, unit: str = "auto"
                     ) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Epoch seconds (UTC) from numbers, numeric text, timestamps, dates or ISO-8601 text.

    Args:
        col: the raw timestamp column.
        unit: unit of numeric values: ``auto`` (by magnitude, see :data:`AUTO_UNIT_LIMITS`),
            ``s``, ``ms``, ``us`` or ``ns``. Typed timestamp and date columns carry their own.

    Returns:
        (value int64, missing mask, unparsable mask).
    """
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type):
        missing = pc.is_null(col)
        return _numeric_seconds(pc.cast(col, pa.int64()), unit), missing, pc.and_(missing, False)
    if pa.types.is_floating(col.type):
        value = pc.cast(col, pa.float64())
        missing = pc.or_(pc.is_null(value), pc.fill_null(pc.is_nan(value), False))
        bad = pc.fill_null(pc.is_inf(value), False)
        return _numeric_seconds(pc.if_else(bad, None, value), unit), missing, bad
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        if pa.types.is_date(col.type):
            col = pc.cast(col, pa.timestamp("s"))
        # the stored integers are UTC in the column's own unit
        value = _numeric_seconds(pc.cast(col, pa.int64()), col.type.unit)
        missing = pc.is_null(value)
        return value, missing, pc.and_(missing, False)
    try:  # fast path: every value is integer text, the common epoch-number CSV
        value = _numeric_seconds(pc.cast(col, pa.int64()), unit)
        missing = pc.is_null(value)
        return value, missing, pc.and_(missing, False)
    except pa.ArrowInvalid:
        pass
    return _text_seconds(_text(col), unit)


def _text_seconds(text: pa.Array, unit: str) -> tuple[pa.Array, pa.Array, pa.Array]:
    """:func:`_parse_timestamp` of trimmed text: integers, decimal numbers, then the date and
    time formats of :data:`_DATETIME_FORMATS`, each tried only on the rows still unparsed."""
    missing = pc.is_null(text)
    is_int = pc.fill_null(pc.match_substring_regex(text, _INTEGER), False)
    # Arrow's integer cast refuses a leading "+"
    value = _numeric_seconds(pc.cast(pc.replace_substring_regex(
        pc.if_else(is_int, text, None), r"^\+", ""), pa.int64()), unit)
    todo = pc.and_(pc.invert(missing), pc.invert(is_int))
    if pc.any(todo).as_py():  # decimal numbers: "1700000000.5", "1.7e12"
        number = pc.fill_null(pc.match_substring_regex(text, _NUMBER), False)
        number = pc.and_(number, todo)
        if pc.any(number).as_py():
            decimal = _numeric_seconds(pc.cast(pc.if_else(number, text, None), pa.float64()),
                                       unit)
            value = pc.coalesce(value, decimal)
        todo = pc.and_(todo, pc.invert(number))
    if pc.any(todo).as_py():
        whole_seconds = pc.replace_substring_regex(text, r"(:\d\d)[.,]\d+", r"\1",
                                                   max_replacements=1)
        for fmt in _DATETIME_FORMATS:
            parsed = pc.strptime(pc.if_else(todo, whole_seconds, None), format=fmt, unit="s",
                                 error_is_null=True)
            value = pc.coalesce(value, pc.cast(parsed, pa.int64()))
            todo = pc.and_(todo, pc.is_null(parsed))
            if not pc.any(todo).as_py():
                break
    return value, missing, pc.and_(pc.invert(missing), pc.is_null(value))


def iso(seconds: int) -> str:
    """Epoch seconds as ISO-8601 UTC text: the date alone at midnight."""
    t = datetime.fromtimestamp(seconds, timezone.utc)
    return t.strftime("%Y-%m-%d") if t.time() == datetime.min.time() else \
        t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_reason(checks: list[tuple[pa.Array, str]], rows: int) -> pa.Array:
    """Per row, the text of the first check whose mask is set; null where none is."""
    reason = pa.nulls(rows, pa.string())
    for mask, text in reversed(checks):
        reason = pc.if_else(mask, text, reason)
    return reason


def validate_table(table: pa.Table, *, columns: Columns, rating_min: float,
                   rating_max: float, timestamp_unit: str = "auto",
                   timestamp_min: int = TIMESTAMP_MIN,
                   timestamp_max: int = TIMESTAMP_MAX) -> pa.Table:
    """Validate raw rows.

    Args:
        table: raw rows holding at least the four required columns, of any types.
        columns: names of the required columns.
        rating_min, rating_max: inclusive valid rating range.
        timestamp_unit: unit of numeric timestamps (``auto``, ``s``, ``ms``, ``us``, ``ns``).
        timestamp_min, timestamp_max: inclusive plausible range, epoch seconds.

    Returns:
        A table with :data:`VALIDATED_SCHEMA`, one row per input row, in input order.
    """
    if table.num_rows == 0:  # an empty block may come without columns
        return VALIDATED_SCHEMA.empty_table()
    user, user_bad = id_text(table[columns.user])
    item, item_bad = id_text(table[columns.item])
    rating_col = table[columns.rating].combine_chunks()
    ts_col = table[columns.timestamp].combine_chunks()
    rating, rating_missing, rating_bad = _parse_rating(rating_col)
    ts, ts_missing, ts_bad = _parse_timestamp(ts_col, timestamp_unit)
    out_of_range = pc.fill_null(
        pc.or_(pc.less(rating, rating_min), pc.greater(rating, rating_max)), False)
    ts_out_of_range = pc.fill_null(
        pc.or_(pc.less(ts, timestamp_min), pc.greater(ts, timestamp_max)), False)

    # First failing check wins; checks are listed in the order a person would fix them.
    empty = pc.and_(pc.and_(pc.is_null(user), pc.is_null(item)),
                    pc.and_(rating_missing, ts_missing))
    checks = [
        (empty, "empty row"),  # a blank CSV line, or one with only separators
        (pc.is_null(user), f"missing {columns.user}"),
        (user_bad, f"non-integral float {columns.user}"),
        (pc.is_null(item), f"missing {columns.item}"),
        (item_bad, f"non-integral float {columns.item}"),
        (rating_missing, f"missing {columns.rating}"),
        (rating_bad, f"unparsable {columns.rating}"),
        (out_of_range, f"{columns.rating} outside [{rating_min:g}, {rating_max:g}]"),
        (ts_missing, f"missing {columns.timestamp}"),
        (ts_bad, f"unparsable {columns.timestamp}"),
        (ts_out_of_range, f"{columns.timestamp} out of range "
                          f"[{iso(timestamp_min)}, {iso(timestamp_max)}]"),
    ]
    any_rejected = any(pc.any(mask).as_py() for mask, _ in checks)
    reason = _first_reason(checks, len(table)) if any_rejected else \
        pa.nulls(len(table), pa.string())
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
