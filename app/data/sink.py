"""Where the encoded rows land: MDS shards per split and quarantined rejects.

:class:`InteractionSink` is the one Ray Data write of the data stage; :func:`merge_split_index`
joins its tasks' shard indexes; :func:`index_rows` and :func:`rejects_rows` count what is on
disk, which the driver checks against what the tasks reported. Every file is hashed by whoever
writes its bytes (a task, or the driver for the merged indexes) and its sum collected in
:attr:`InteractionSink.files`, for the version's ``_SUCCESS`` (:mod:`app.core.publish`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block

from app.core.storage import FileSum, Location, resolve
from app.data.blocks import REJECTED
from app.data.dataset import SPLITS
from app.data.mds import write_mds_files
from app.data.validate import Columns


@dataclass
class TaskWritten:
    """What one write task returns: its counts, and each file it wrote (path under the
    sink's root) with the size and sha256 of the bytes it wrote."""

    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, FileSum] = field(default_factory=dict)


class InteractionSink(Datasink):
    """Writes each split as MDS shards (one folder per write task) plus quarantined rejects.

    ``on_write_complete`` (on the driver) merges each split's per-task ``index.json`` files
    into one and adds up what the tasks wrote into :attr:`written`: rows per split and
    ``rejected``, and positives per split as ``<split>_positives``; :attr:`files` gets every
    file written under the root (the merged indexes too) with its size and sha256.
    """

    def __init__(self, root: str, *, columns: Columns, size_limit: int) -> None:
        self.root = root  # a local path or a URI (app.core.storage): every node writes there
        self.columns = columns
        self.size_limit = size_limit
        self.written: Counter = Counter()
        self.files: dict[str, FileSum] = {}

    def write(self, blocks: Iterable[Block], ctx: Any) -> TaskWritten:
        tables = [b for b in blocks if b.num_rows]
        out = TaskWritten()
        counts = out.counts
        if not tables:
            return out
        table = pa.concat_tables(tables)
        code = table["split"].to_numpy()
        part = f"part-{ctx.task_idx:05d}"
        root = resolve(self.root)
        # the MDS columns as numpy, taken per split (the id texts are not copied)
        mds = {"user": "user_idx", "item": "item_idx", "label": "label", "rating": "rating32",
               "timestamp": "timestamp"}
        arrays = {k: pc.fill_null(table[v], 0).to_numpy() for k, v in mds.items()} \
            if (code < len(SPLITS)).any() else {}  # nulls: rejected rows' timestamps
        for sid, name in enumerate(SPLITS):
            idx = np.flatnonzero(code == sid)
            if len(idx):
                rows = {k: a[idx] for k, a in arrays.items()}
                with _local_folder(root.join(name, part)) as folder:
                    sums = write_mds_files(str(folder), rows, size_limit=self.size_limit)
                out.files.update({f"{name}/{part}/{f}": s for f, s in sums.items()})
                counts[name] = len(idx)
                counts[f"{name}_positives"] = int(rows["label"].sum())
        rejected = np.flatnonzero(code == REJECTED)
        if len(rejected):
            t = table.take(pa.array(rejected))
            c = self.columns
            rel = f"rejects/{part}.parquet"
            out.files[rel] = put_parquet(pa.table({
                c.user: t["user"], c.item: t["item"], c.rating: t["rating_raw"],
                c.timestamp: t["timestamp_raw"], "reason": t["reason"]}), root.join(rel))
            counts["rejected"] = len(rejected)
        return out

    def on_write_complete(self, write_result: Any) -> None:
        for task in write_result.write_returns:
            self.written.update(task.counts)
            self.files.update(task.files)
        for name in SPLITS:
            self.files[f"{name}/index.json"] = merge_split_index(resolve(self.root).join(name))


def put_parquet(table: pa.Table, target: Location,
                use_dictionary: Union[bool, list[str]] = True) -> FileSum:
    """Write ``table`` as one Parquet file at ``target`` (one PUT on an object store),
    hashing the bytes written rather than reading the file back. Returns their sum.
    ``use_dictionary``: every column dictionary-encoded where it pays (pyarrow's default), or
    only the columns named (the rest plain: no dictionary is built and dropped)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, use_dictionary=use_dictionary)
    data = buf.getvalue().to_pybytes()
    target.write_bytes(data)
    return FileSum.of(data)


@contextlib.contextmanager
def _local_folder(target: Location) -> Iterator[Path]:
    """A local folder to write ``target``'s files into: itself, or a temporary folder
    uploaded to ``target`` (an object store) when the block succeeds."""
    if not target.remote:
        yield target.local_path()
        return
    tmp = Path(tempfile.mkdtemp(prefix="part-"))
    try:
        yield tmp / "out"
        target.upload(tmp / "out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_split_index(split_dir: Union[str, os.PathLike, Location]) -> FileSum:
    """One ``index.json`` for a split (a path or URI) from its per-task folders, in task order.

    The same merge as ``streaming.base.util.merge_index`` (shard entries of each part, basenames
    prefixed by the part folder), done here so the driver need not import streaming (and torch).
    An empty split gets a valid index with no shards.

    Returns:
        The size and sha256 of the ``index.json`` written.
    """
    if not isinstance(split_dir, Location):
        split_dir = resolve(split_dir)
    shards = []
    for folder in split_dir.children():
        if not folder.startswith("part-"):
            continue
        for shard in json.loads(split_dir.join(folder, "index.json").read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{folder}/{shard[key]['basename']}"
            shards.append(shard)
    data = json.dumps({"version": 2, "shards": shards}).encode()
    split_dir.join("index.json").write_bytes(data)
    return FileSum.of(data)


def index_rows(split_dir: Location) -> int:
    """Rows of a split by its merged ``index.json``."""
    index = json.loads(split_dir.join("index.json").read_text())
    return sum(s["samples"] for s in index["shards"])


def rejects_rows(rejects_dir: Location) -> int:
    """Rows of the rejects folder's Parquet files, from their footers."""
    total = 0
    for name, _ in rejects_dir.files():
        if name.endswith(".parquet"):
            with rejects_dir.fs.open_input_file(rejects_dir.join(name).path) as f:
                total += pq.read_metadata(f).num_rows
    return total
