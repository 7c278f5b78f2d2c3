"""MDS (mosaicml-streaming) shards for interaction rows, written a column batch at a time.

``MDSWriter.write`` encodes one sample per call from Python (about 20k rows/s). Interaction
rows are fixed-size, so a whole shard is one packed numpy record array: MDS stores the columns
of a sample in name order, little-endian, with no per-sample header when every column is
fixed-size. :func:`write_mds_columns` writes shards and ``index.json`` exactly as ``MDSWriter``
does for the same rows (byte for byte, tested), without importing ``streaming``: that import
pulls in torch and torchvision, seconds per Ray worker process, which would dominate the write.
Reading stays with ``streaming.StreamingDataset``. :func:`write_mds_files` also returns each
file's size and sha256, hashed from the bytes as they are written (no second read), for the
version's ``_SUCCESS`` (:mod:`app.core.publish`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from app.core.storage import FileSum

# The MDS columns of every split of a prepared dataset: name -> MDS encoding.
INTERACTION_COLUMNS: dict[str, str] = {
    "user": "int32",       # user index (1..num_users; 0 is reserved for unknown ids)
    "item": "int32",       # item index (1..num_items)
    "label": "uint8",      # 1 if rating >= the label threshold
    "rating": "float32",   # the raw rating
    "timestamp": "int64",  # epoch seconds
}

_NUMPY_DTYPES = {
    "int8": "<i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint8": "<u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "float16": "<f2", "float32": "<f4", "float64": "<f8",
}
_OFFSET_BYTES = 4  # MDSWriter.extra_bytes_per_sample: one uint32 offset per sample


def record_dtype(columns: Mapping[str, str]) -> np.dtype:
    """The packed numpy record type of one MDS sample with these fixed-size columns."""
    try:
        return np.dtype([(name, _NUMPY_DTYPES[columns[name]]) for name in sorted(columns)])
    except KeyError as e:
        raise TypeError(f"column encoding {e} is not a fixed-size numeric MDS encoding") from None


def shard_config(columns: Mapping[str, str], size_limit: int) -> dict[str, Any]:
    """What ``MDSWriter.get_config()`` returns for these columns (no compression, no hashes)."""
    names = sorted(columns)
    return {"version": 2, "format": "mds", "compression": None, "hashes": [],
            "size_limit": size_limit, "column_names": names,
            "column_encodings": [columns[n] for n in names],
            "column_sizes": [np.dtype(_NUMPY_DTYPES[columns[n]]).itemsize for n in names]}


def write_mds_columns(out: str, columns: Mapping[str, np.ndarray], *,
                      encodings: Mapping[str, str] = INTERACTION_COLUMNS,
                      size_limit: int = 1 << 26) -> int:
    """Write one MDS directory (``shard.NNNNN.mds`` files and ``index.json``) holding the rows
    (:func:`write_mds_files`).

    Returns:
        The number of rows written.
    """
    write_mds_files(out, columns, encodings=encodings, size_limit=size_limit)
    return len(columns[record_dtype(encodings).names[0]])


def write_mds_files(out: str, columns: Mapping[str, np.ndarray], *,
                    encodings: Mapping[str, str] = INTERACTION_COLUMNS,
                    size_limit: int = 1 << 26) -> dict[str, FileSum]:
    """Write one MDS directory (``shard.NNNNN.mds`` files and ``index.json``) holding the rows.

    Args:
        out: the directory; replaced if it exists (a retried task starts from scratch).
        columns: column name -> 1-D array of shape (N,), cast to the column's encoding.
        encodings: column name -> MDS encoding (fixed-size numeric only).
        size_limit: shard size limit in bytes, as ``MDSWriter``'s ``size_limit``.

    Returns:
        Each file written (name inside ``out``) -> its size and sha256.
    """
    record = record_dtype(encodings)
    n = len(columns[record.names[0]])
    records = np.empty(n, dtype=record)
    for name in record.names:
        if len(columns[name]) != n:
            raise ValueError(f"column {name} has {len(columns[name])} rows, expected {n}")
        records[name] = columns[name]
    config = shard_config(encodings, size_limit)
    config_data = json.dumps(config, sort_keys=True).encode("utf-8")
    # MDSWriter's rule: a shard takes samples while header + samples stay within the limit.
    per_shard = max(1, (size_limit - 8 - len(config_data)) // (record.itemsize + _OFFSET_BYTES))

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    shards, sums = [], {}
    for i, start in enumerate(range(0, n, per_shard)):
        part = records[start:start + per_shard]
        k = len(part)
        # Layout: num_samples (u32), k + 1 offsets (u32) from the file start, config, samples.
        first = 4 + 4 * (k + 1) + len(config_data)
        offsets = first + np.arange(k + 1, dtype=np.int64) * record.itemsize
        raw = b"".join([np.uint32(k).tobytes(), offsets.astype("<u4").tobytes(), config_data,
                        part.tobytes()])
        basename = f"shard.{i:05}.mds"
        with open(os.path.join(out, basename), "wb") as f:
            f.write(raw)
        sums[basename] = FileSum.of(raw)
        shards.append({"samples": k, "raw_data": {"basename": basename, "bytes": len(raw),
                                                  "hashes": {}},
                       "zip_data": None, **config})
    index = json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode()
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(index)
    sums["index.json"] = FileSum.of(index)
    return sums
