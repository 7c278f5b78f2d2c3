"""The data stage: raw ratings -> Ray Data -> a prepared dataset folder of MDS splits.

Recipe (:func:`prepare_dataset`):
    read -> validate (bad rows tagged with a reason) -> materialise
    -> per-block statistics -> id vocabularies (driver)
    -> repeated (user, item) rows resolved by --duplicates (:mod:`app.data.duplicates`)
    -> the label threshold (driver)
    -> encode ids, label, split -> one write: MDS shards per split + quarantined rejects
    -> merged index.json per split, manifest.json -> atomic rename into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import Block

from app.core import logs
from app.core.config import DataConfig
from app.core.publish import check_writable, is_published, writer
from app.core.redact import redact, redact_values
from app.core.storage import Location, resolve
from app.data import duplicates
from app.data.dataset import MANIFEST, SCHEMA_VERSION, SPLITS, Manifest, read_manifest
from app.data.mds import INTERACTION_COLUMNS, write_mds_columns
from app.data.sources import DataError, Source, open_source
from app.data.validate import VALIDATED_SCHEMA, Columns, first_repeated, validate_table

REJECTED = len(SPLITS)  # split code of quarantined rows
MERGED = REJECTED + 1   # split code of repeated rows merged into another (never written)
_INT_ID = r"^-?[1-9]\d{0,18}$|^0$"  # an integer as int64 writes it (range checked after)


# ---------------------------------------------------------------- per-block functions (workers)

def _block_stats(table: pa.Table) -> pa.Table:
    """One row summarising a validated block: distinct ids, rating sum, counts by reason."""
    if table.num_rows == 0:  # an empty block may come without columns
        table = VALIDATED_SCHEMA.empty_table()
    ok = pc.is_null(table["reason"])
    # a filter copies every column even when it keeps every row: skip it when nothing failed
    acc = table if table["reason"].null_count == table.num_rows else table.filter(ok)
    reasons = pc.value_counts(table["reason"].filter(pc.invert(ok)))
    by_reason = {r["values"].as_py(): r["counts"].as_py() for r in reasons}
    def one_list(col: pa.ChunkedArray) -> pa.Array:
        ids = pc.unique(col).cast(pa.string())
        return pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids)

    return pa.table({
        "users": one_list(acc["user"]),
        "items": one_list(acc["item"]),
        "rating_sum": [pc.sum(acc["rating"]).as_py() or 0.0],
        "accepted": [acc.num_rows],
        "rejected": [json.dumps(by_reason)],
    })


# A plain task per materialised block: a tiny summary each, without a second Dataset plan.
_remote_block_stats = ray.remote(num_cpus=1)(_block_stats)


def _split_hash(user: np.ndarray, item: np.ndarray, ts: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row from its content (splitmix64), independent of order."""
    with np.errstate(over="ignore"):
        x = (user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ item.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ ts.astype(np.uint64) * np.uint64(0x165667B19E3779F9)
             ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _encode(table: pa.Table, *, user: np.ndarray, item: np.ndarray, threshold: float,
            split: str, val_fraction: float, test_fraction: float, seed: int,
            merged: Optional[tuple[np.ndarray, np.ndarray]] = None) -> pa.Table:
    """Vocabulary indices, label, and (for the random rule) the split code of a block.

    Args:
        table: a validated block.
        user, item: its rows' vocabulary indices, int32 (rows,).
        threshold, split, val_fraction, test_fraction, seed: the label and split rules.
        merged: the block's duplicate decisions (:func:`duplicates.decisions_for`): rows, and
            their new rating or NaN for rows merged into another (split code ``MERGED``:
            marked rather than removed, which would copy the block).
    """
    ok = pc.is_null(table["reason"]).to_numpy(zero_copy_only=False)
    rating = pc.fill_null(table["rating"], 0.0).to_numpy().astype(np.float32)
    ts = pc.fill_null(table["timestamp"], 0).to_numpy()
    rows, new_rating = merged if merged is not None else (np.empty(0, np.int64), np.empty(0))
    rerate = ~np.isnan(new_rating)
    rating[rows[rerate]] = new_rating[rerate]  # the mean policy: before the label
    code = np.full(len(ok), REJECTED, np.uint8)
    if split == "random":
        u = _split_hash(user, item, ts, seed)
        code[ok] = np.where(u[ok] < 1 - val_fraction - test_fraction, 0,
                            np.where(u[ok] < 1 - test_fraction, 1, 2))
    else:
        code[ok] = 0  # assigned per user by _temporal_split
    code[rows[~rerate]] = MERGED
    return table.append_column("user_idx", pa.array(user)) \
        .append_column("item_idx", pa.array(item)) \
        .append_column("label", pa.array((rating >= threshold).astype(np.uint8))) \
        .append_column("rating32", pa.array(rating)) \
        .append_column("split", pa.array(code))


def _encode_blocks(batch: dict[str, np.ndarray], *, blocks: list, users: pa.Array,
                   items: pa.Array, indices: Optional[list], decisions: Optional[list],
                   **rules: Any) -> pa.Table:
    """Encode validated blocks by position (a Ray Data task over block numbers, so that each
    block meets its own vocabulary indices and duplicate decisions).

    Args:
        batch: ``{"id": block numbers}``.
        blocks: object references of the validated blocks.
        users, items: the vocabularies as text.
        indices: references of each block's vocabulary indices (:func:`duplicates.plan`), or
            None to look the ids up here.
        decisions: references of every partition's duplicate decisions, or None.
        rules: keyword arguments of :func:`_encode`.
    """
    out = []
    resolved = ray.get(decisions) if decisions else []
    for b in batch["id"].tolist():
        table = ray.get(blocks[b])
        if table.num_rows == 0:
            continue  # the sink skips empty blocks; one may come without columns
        if indices is not None:
            idx = ray.get(indices[b])
            user, item = idx["user_idx"].to_numpy(), idx["item_idx"].to_numpy()
        else:
            user, item = duplicates.vocab_indices(table, users, items)
        merged = duplicates.decisions_for(b, resolved) if resolved else None
        out.append(_encode(table, user=user, item=item, merged=merged, **rules))
    return pa.concat_tables(out) if out else VALIDATED_SCHEMA.empty_table()


def _temporal_split(table: pa.Table, *, val_fraction: float, test_fraction: float) -> pa.Table:
    """Per user, the latest ``test_fraction`` of rows -> test, the ones before -> val.

    The block holds every row of each of its users (hash-partitioned by user). Ties in time
    are broken by item index so the result does not depend on row order.
    """
    if table.num_rows == 0:
        return table
    merged = table["split"].to_numpy() == MERGED
    if merged.any():  # merged rows are not interactions of their user
        table = table.filter(pa.array(~merged))
    user = table["user_idx"].to_numpy()
    order = np.lexsort((table["item_idx"].to_numpy(), table["timestamp"].to_numpy(), user))
    table = table.take(pa.array(order))
    user = user[order]
    code = table["split"].to_numpy().copy()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    n = np.repeat(counts, counts)
    from_end = np.repeat(starts + counts, counts) - 1 - np.arange(len(user))
    n_test = np.floor(n * test_fraction + 0.5).astype(np.int64)
    n_val = np.floor(n * val_fraction + 0.5).astype(np.int64)
    n_val = np.minimum(n_val, np.maximum(n - 1 - n_test, 0))  # keep one row for training
    n_test = np.minimum(n_test, n - 1)
    accepted = code != REJECTED
    code[accepted & (from_end < n_test + n_val)] = 1
    code[accepted & (from_end < n_test)] = 2
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(code))


class InteractionSink(Datasink):
    """Writes each split as MDS shards (one folder per write task) plus quarantined rejects.

    ``on_write_complete`` (on the driver) merges each split's per-task ``index.json`` files
    into one and adds up what the tasks wrote into :attr:`written`: rows per split and
    ``rejected``, and positives per split as ``<split>_positives``.
    """

    def __init__(self, root: str, *, columns: Columns, size_limit: int) -> None:
        self.root = root  # a local path or a URI (app.core.storage): every node writes there
        self.columns = columns
        self.size_limit = size_limit
        self.written: Counter = Counter()

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, int]:
        tables = [b for b in blocks if b.num_rows]
        counts: dict[str, int] = {}
        if not tables:
            return counts
        table = pa.concat_tables(tables)
        code = table["split"].to_numpy()
        part = f"part-{ctx.task_idx:05d}"
        root = resolve(self.root)
        for sid, name in enumerate(SPLITS):
            idx = np.flatnonzero(code == sid)
            if len(idx):
                t = table.take(pa.array(idx))
                with _local_folder(root.join(name, part)) as folder:
                    write_mds_columns(str(folder), {
                        "user": t["user_idx"].to_numpy(), "item": t["item_idx"].to_numpy(),
                        "label": t["label"].to_numpy(), "rating": t["rating32"].to_numpy(),
                        "timestamp": t["timestamp"].to_numpy()}, size_limit=self.size_limit)
                counts[name] = len(idx)
                counts[f"{name}_positives"] = int(t["label"].to_numpy().sum())
        rejected = np.flatnonzero(code == REJECTED)
        if len(rejected):
            t = table.take(pa.array(rejected))
            c = self.columns
            target = root.join("rejects", f"{part}.parquet")
            if not root.remote:
                os.makedirs(os.path.dirname(target.path), exist_ok=True)
            pq.write_table(pa.table({c.user: t["user"], c.item: t["item"],
                                     c.rating: t["rating_raw"], c.timestamp: t["timestamp_raw"],
                                     "reason": t["reason"]}), target.path, filesystem=root.fs)
            counts["rejected"] = len(rejected)
        return counts

    def on_write_complete(self, write_result: Any) -> None:
        for counts in write_result.write_returns:
            self.written.update(counts)
        for name in SPLITS:
            merge_split_index(resolve(self.root).join(name))


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


def merge_split_index(split_dir: Location) -> None:
    """One ``index.json`` for a split from its per-task folders, in task order.

    The same merge as ``streaming.base.util.merge_index`` (shard entries of each part, basenames
    prefixed by the part folder), done here so the driver need not import streaming (and torch).
    An empty split gets a valid index with no shards.
    """
    shards = []
    for folder in split_dir.children():
        if not folder.startswith("part-"):
            continue
        for shard in json.loads(split_dir.join(folder, "index.json").read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{folder}/{shard[key]['basename']}"
            shards.append(shard)
    split_dir.join("index.json").write_text(json.dumps({"version": 2, "shards": shards}))


# ---------------------------------------------------------------- driver side

def _vocabulary(id_lists: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Distinct ids in a stable order: numeric order when every id is an integer's own text.

    Ids are text and stay exact: the vocabulary is saved as int64 only when every id is an
    integer written as int64 writes it (``7``, ``-3``; not ``007``, ``+7``, ``-0`` or beyond
    int64), so an int64 vocabulary's decimal text is exactly its ids.

    Args:
        id_lists: one list of distinct ids (text) per block.

    Returns:
        (ids as text, for lookups; ids in their natural type, for the saved vocabulary)
    """
    text = pc.unique(pc.list_flatten(id_lists.combine_chunks()))
    if len(text) and pc.all(pc.match_substring_regex(text, _INT_ID)).as_py():
        try:
            natural = pc.cast(text, pa.int64())
        except pa.ArrowInvalid:  # 19 digits beyond int64: the ids stay text
            natural = None
        if natural is not None:
            order = pc.sort_indices(natural)
            return pc.take(text, order), pc.take(natural, order)
    text = pc.take(text, pc.sort_indices(text))
    return text, text


def _save_vocab(path: Path, ids: pa.Array, extra: Optional[pa.Table] = None,
                text: Optional[pa.Array] = None) -> None:
    """Write a vocabulary: index 1..N <-> id (+ the item metadata columns of ``extra``).

    Raises:
        RuntimeError: an id occurs twice (two indices for one id would split its rows).
    """
    repeated = first_repeated(ids)
    if repeated is not None:
        raise RuntimeError(f"{path}: id {repeated!r} occurs more than once in the vocabulary")
    table = pa.table({"index": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
                      "id": ids})
    if extra is not None and text is not None:
        pos = pc.index_in(text, value_set=extra["item"])
        for col in extra.column_names:
            if col != "item":
                table = table.append_column(col, pc.take(extra[col], pos))
    pq.write_table(table, path)


def _malformed_rejects(source: Source, rejects_dir: Location) -> Counter:
    """Turn recorded unreadable CSV lines into a rejects Parquet file; count them. The
    records are removed once they are in it."""
    counts: Counter = Counter()
    if not source.malformed_dir:
        return counts
    recorded = resolve(source.malformed_dir)
    records = []
    for f, _ in recorded.files():
        records += [json.loads(line) for line in recorded.join(f).read_text().splitlines()
                    if line]
    if records:
        records.sort(key=lambda r: (r["line"] is None, r["line"] or 0, r["text"]))
        target = rejects_dir.join("malformed-lines.parquet")
        if not target.remote:
            os.makedirs(rejects_dir.path, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records, schema=pa.schema(
            [("line", pa.int64()), ("text", pa.string()), ("reason", pa.string())])),
            target.path, filesystem=target.fs)
        counts.update(r["reason"] for r in records)
    recorded.delete()
    return counts


def _check_output(out: Location, overwrite: bool) -> None:
    check_writable(out, "prepared dataset", MANIFEST)
    if is_published(out) and not overwrite:
        raise DataError(f"{out}: already holds a prepared dataset; pass --overwrite to "
                        f"publish a new version of it")


def prepare_dataset(cfg: DataConfig, output: str, *, verbose: bool = True,
                    lease_timeout: float = 60.0) -> Manifest:
    """Prepare ``cfg``'s source into the folder ``output`` as a new version of it.

    Args:
        cfg: the data configuration.
        output: the prepared dataset folder (:mod:`app.core.publish`: readers see the previous
            version until this one is complete; one writer at a time).
        verbose: print a line per step.
        lease_timeout: seconds without a heartbeat after which a writer's lease is stale.

    Returns:
        The manifest (also written to ``manifest.json`` of the new version).
    """
    out = resolve(output)
    _check_output(out, cfg.overwrite)
    say = (lambda msg: logs.say("prepare", msg))
    with logs.stage("prepare"), writer(out, "prepare_data", timeout=lease_timeout,
                                       say=say) as lease:
        _check_output(out, cfg.overwrite)  # again, under the lease: another run may have won
        with lease.staged() as tmp:
            manifest = _build(cfg, tmp, lease.target, verbose=verbose)
            shutil.rmtree(tmp / "_scratch", ignore_errors=True)
    return manifest


def _build(cfg: DataConfig, tmp: Path, target: Location, *, verbose: bool) -> Manifest:
    """Prepare into a version being staged: the driver's files (vocabularies, manifest) go
    to ``tmp``, the tasks' (shards, rejects) to ``target``, the same folder when local."""
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if verbose:
            logs.say("prepare", f"{time.perf_counter() - t0:5.1f}s {msg}")

    def detail(msg: str) -> None:  # a step worth a line only with --verbose
        if logs.level() == "verbose":
            say(msg)

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    source = open_source(cfg, scratch_dir=str(tmp / "_scratch"),
                         malformed_dir=str(target.join("_malformed")))
    cols = source.columns
    ts_min, ts_max = cfg.timestamp_bounds()
    validated = source.dataset.map_batches(
        validate_table, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs=dict(columns=cols, rating_min=cfg.rating_min, rating_max=cfg.rating_max,
                       timestamp_unit=cfg.timestamp_unit, timestamp_min=ts_min,
                       timestamp_max=ts_max),
    ).materialize()
    detail(f"validated {validated.num_blocks()} blocks")
    blocks = validated.to_arrow_refs()
    block_stats = [_remote_block_stats.remote(ref) for ref in blocks]
    # the empty summary first keeps the table typed when there are no blocks at all
    stats = pa.concat_tables([_block_stats(VALIDATED_SCHEMA.empty_table())]
                             + ray.get(block_stats))
    accepted = int(pc.sum(stats["accepted"]).as_py() or 0)
    rejected: Counter = Counter()
    for text in stats["rejected"].to_pylist():
        rejected.update(json.loads(text))
    rejects_dir = target.join("rejects")
    malformed = _malformed_rejects(source, rejects_dir)
    rejected.update(malformed)
    n_read = accepted + sum(rejected.values())
    where = redact(source.description.get("input") or source.description["dataset"])
    say(f"read {n_read:,} rows from {where}: {accepted:,} accepted, "
        f"{sum(rejected.values()):,} rejected")
    if accepted == 0:
        detail = "; ".join(f"{r}: {n}" for r, n in rejected.most_common()) or "no data rows"
        raise DataError(f"{where}: no valid rows to prepare ({n_read} read; {detail})")

    users_text, users = _vocabulary(stats["users"])
    items_text, items = _vocabulary(stats["items"])
    (tmp / "vocab").mkdir()
    _save_vocab(tmp / "vocab" / "users.parquet", users)
    _save_vocab(tmp / "vocab" / "items.parquet", items, source.item_metadata, items_text)
    # Repeated (user, item) pairs are resolved before labels and splits: one label per pair.
    merge = duplicates.Plan()
    if cfg.duplicates != "keep":
        merge = duplicates.plan(blocks, users=ray.put(users_text), items=ray.put(items_text),
                                accepted=accepted, policy=cfg.duplicates)
        if merge.rows_merged:
            say(f"duplicates: {merge.rows_merged:,} rows merged into {merge.pairs:,} "
                f"(user, item) pairs ({cfg.duplicates})")
    kept, pairs = accepted - merge.rows_merged, merge.pairs
    mean = (float(pc.sum(stats["rating_sum"]).as_py()) + merge.rating_delta) / kept
    threshold = mean if cfg.label_rule == "mean" else cfg.label_threshold
    say(f"vocabularies: {len(users):,} users, {len(items):,} items; label: rating >= "
        f"{threshold:.4g} ({cfg.label_rule})")

    # A dataset of block numbers, so each task meets its block's indices and decisions.
    encoded = ray.data.range(len(blocks), override_num_blocks=max(1, len(blocks))).map_batches(
        _encode_blocks, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(blocks=blocks, users=users_text, items=items_text,
                       indices=merge.indices or None, decisions=merge.decisions or None,
                       threshold=threshold, split=cfg.split, val_fraction=cfg.val_fraction,
                       test_fraction=cfg.test_fraction, seed=cfg.seed))
    if cfg.split == "temporal":
        encoded = encoded.repartition(max(1, len(blocks)), keys=["user_idx"]) \
            .map_batches(_temporal_split, batch_size=None, batch_format="pyarrow",
                         fn_kwargs=dict(val_fraction=cfg.val_fraction,
                                        test_fraction=cfg.test_fraction))
    sink = InteractionSink(target.uri, columns=cols, size_limit=cfg.shard_size_limit)
    encoded.write_datasink(sink)
    validated = blocks = merge = encoded = None  # release the materialised blocks
    detail("wrote MDS shards")

    # What the indexes and reject files on disk hold must match what the tasks wrote.
    split_rows = {name: _index_rows(target.join(name)) for name in SPLITS}
    rejects_written = _rejects_rows(rejects_dir)
    if (split_rows != {name: sink.written[name] for name in SPLITS}
            or sum(split_rows.values()) != kept
            or rejects_written != sum(rejected.values())):
        raise RuntimeError(f"written rows do not add up: splits {split_rows} vs {kept} "
                           f"accepted and kept, {rejects_written} rejects vs "
                           f"{sum(rejected.values())}")
    positives = {name: sink.written[f"{name}_positives"] for name in SPLITS}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        created_unix=int(time.time()),
        source=redact_values(source.description),  # no credentials saved
        columns={"user": cols.user, "item": cols.item, "rating": cols.rating,
                 "timestamp": cols.timestamp},
        mds_columns=INTERACTION_COLUMNS,
        counts={"read": n_read, "accepted": accepted, "rejected": sum(rejected.values()),
                "rejected_by_reason": dict(sorted(rejected.items())),
                # accepted rows = the splits' rows + rows_merged
                "duplicates": {"policy": cfg.duplicates, "rows_merged": accepted - kept,
                               "pairs": pairs},
                "splits": split_rows, "positives": positives},
        label={"rule": cfg.label_rule, "threshold": threshold, "mean_rating": mean},
        split={"rule": cfg.split, "seed": cfg.seed,
               "fractions": {"train": cfg.train_fraction, "val": cfg.val_fraction,
                             "test": cfg.test_fraction}},
        vocab={"users": len(users), "items": len(items), "unknown_index": 0,
               "user_id_type": str(users.type), "item_id_type": str(items.type),
               "item_metadata": [c for c in (source.item_metadata.column_names
                                             if source.item_metadata is not None else [])
                                 if c != "item"]},
        config=redact_values(dict(vars(cfg))),
        seconds=round(time.perf_counter() - t0, 2),
    )
    manifest.write(tmp)
    merged = f"; duplicates merged {accepted - kept:,}" if accepted > kept else ""
    say("splits: " + ", ".join(f"{k} {v:,}" for k, v in split_rows.items())
        + f"; rejected {sum(rejected.values()):,}{merged}; {manifest.seconds:.1f}s")
    if not target.remote:
        read_manifest(tmp)  # the contract check a reader will run (on S3: after publishing)
    return manifest


def _index_rows(split_dir: Location) -> int:
    index = json.loads(split_dir.join("index.json").read_text())
    return sum(s["samples"] for s in index["shards"])


def _rejects_rows(rejects_dir: Location) -> int:
    total = 0
    for name, _ in rejects_dir.files():
        if name.endswith(".parquet"):
            with rejects_dir.fs.open_input_file(rejects_dir.join(name).path) as f:
                total += pq.read_metadata(f).num_rows
    return total
