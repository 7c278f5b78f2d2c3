"""What batch inference reads besides the model: users, pairs and histories from CSV/Parquet.

Every reader checks the columns it needs and names the file in one line when something is
wrong (missing, empty, unreadable, a missing id); ids stay exactly as written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from app.core.errors import DatasetError
from app.core.storage import resolve
from app.data.validate import id_text
from app.serve.core import id_keys, lookup, vocab_index


def read_table(path: str, columns: list[str]) -> Any:
    """A Ray dataset of a CSV or Parquet file/folder, checked to have the columns.

    CSV columns named in ``columns`` are read as text, so ids stay as written (``007``).
    """
    import ray

    loc = resolve(path)  # a local path or a URI (app.core.storage)
    if not loc.exists():
        raise DatasetError(f"{path}: no such file or folder")
    sizes = dict(loc.files()) if loc.is_dir() else {loc.name: loc.info().size}
    if not sizes or not any(sizes.values()):
        raise DatasetError(f"{path}: empty (no header, no rows); expected the columns "
                           f"{', '.join(columns)}")
    parquet = any(f.endswith(".parquet") for f in sizes)
    try:
        if parquet:
            ds = ray.data.read_parquet(loc.path, filesystem=loc.fs)
        else:
            import pyarrow.csv as pacsv

            from app.data.sources import delimiter_of

            ds = ray.data.read_csv(
                loc.path, filesystem=loc.fs,
                parse_options=pacsv.ParseOptions(delimiter=delimiter_of(sorted(sizes))),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in columns}))
        schema = ds.schema()
        if schema is None:  # Ray Data has no block, hence no schema, for a header only
            raise DatasetError(f"{path}: holds no rows (a header only?)")
        names = schema.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} "
                               f"(has {', '.join(names)})")
        # read to the end before the actor pool starts: actors that hold every CPU would
        # leave the read tasks none (a deadlock on a small cluster)
        ds = ds.select_columns(columns).materialize()
        rows = ds.count()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 (what the reader says, in one line)
        cause = getattr(e, "cause", None) or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise DatasetError(f"{path}: could not be read as {'Parquet' if parquet else 'CSV'} "
                           f"({first[:300]})") from None
    if rows == 0:
        raise DatasetError(f"{path}: holds no rows (a header only?)")
    return ds


def unique_users(ds: Any, path: str) -> tuple[pa.Array, int]:
    """The user ids of a users file, each once (in the order of first occurrence), and how
    many repeats were dropped.

    Ids are exact (:func:`app.data.validate.id_text`): text stays text, trimmed; integer columns
    stay integers, integral floats become int64 (``1.0`` -> 1).

    Raises:
        DatasetError: a missing id or a non-integral float id (``1.5``), naming ``path``.
    """
    import ray

    ids = pa.concat_tables(ray.get(ds.to_arrow_refs()))["userId"].combine_chunks()
    text, bad = id_text(ids)
    unusable = int(pc.sum(pc.or_(pc.is_null(text), bad)).as_py() or 0)
    if unusable:
        raise DatasetError(f"{path}: {unusable} row(s) with a missing or non-integral float "
                           f"userId")
    if pa.types.is_floating(ids.type):
        ids = pc.cast(text, pa.int64())
    elif not pa.types.is_integer(ids.type):
        ids = text
    unique = pc.unique(ids)
    return unique, len(ids) - len(unique)


def with_history_users(ids: pa.Array, given: dict[str, np.ndarray]) -> pa.Array:
    """The vocabulary's user ids, then those only the history names (keys: exact text). An
    int64 vocabulary stays int64 when every new id is an integer as int64 writes it; else the
    ids become text."""
    have = set(pc.cast(ids, pa.string()).to_pylist())
    new = pa.array([u for u in given if u not in have], pa.string())
    if not len(new):
        return ids
    if pa.types.is_integer(ids.type):
        try:
            as_int = pc.cast(new, ids.type)
            if pc.all(pc.equal(pc.cast(as_int, pa.string()), new)).as_py():
                return pa.concat_arrays([ids, as_int])
        except pa.ArrowInvalid:
            pass
        ids = pc.cast(ids, pa.string())
    return pa.concat_arrays([ids, new])


def read_histories(path: str, vocab: dict[str, Any], n: int) -> tuple[dict[str, np.ndarray],
                                                                      dict[str, int]]:
    """Users' recent items from a CSV/Parquet file with ``userId, movieId`` rows (oldest first;
    sorted by ``timestamp`` when the file has one): user id -> the latest ``n`` item indices.

    Item ids the model does not know are ignored and counted; users may be in the model's
    vocabulary (their given history replaces the stored one) or new.

    Returns:
        (histories keyed by the exact id text (:func:`id_keys`), counts: rows, users,
        unknown_item_rows).
    """
    ds = read_table(path, ["userId", "movieId"])
    names = ds.schema().names
    df = ds.to_pandas()
    if "timestamp" in names:
        df = df.sort_values("timestamp", kind="stable")
    users = id_keys(df["userId"])
    items = lookup(vocab_index(vocab["items"]["id"]), id_keys(df["movieId"]))
    if users.isna().any():
        raise DatasetError(f"{path}: {int(users.isna().sum())} row(s) with a missing or "
                           f"non-integral float userId")
    known = items > 0
    frame = pd.DataFrame({"user": users[known].to_numpy(), "item": items[known]})
    out = {u: g["item"].to_numpy()[-n:] for u, g in frame.groupby("user", sort=False)}
    for u in users[~known].unique():  # a user whose items are all unknown: an empty history
        out.setdefault(u, np.empty(0, np.int64))
    return out, {"rows": len(df), "users": len(out), "unknown_item_rows": int((~known).sum())}
