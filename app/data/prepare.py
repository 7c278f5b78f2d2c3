"""The data stage: raw ratings -> Ray Data -> a prepared dataset folder of MDS splits.

Recipe (:func:`prepare_dataset`; the steps of :func:`_build`):
    read -> validate (bad rows tagged with a reason) -> materialise               _validated
    -> per-block statistics + unreadable lines -> counts by reason                _tally
    -> with --window-days: accepted rows before the window left out (counted)     _window
    -> id vocabularies (driver), extending --base's if given                      _vocabularies
    -> repeated (user, item) rows resolved by --duplicates (:mod:`app.data.duplicates`)
    -> the label threshold (driver)                                               _label_rule
    -> encode ids, label, split (:mod:`app.data.blocks`) -> one write: MDS shards
       per split + quarantined rejects (:mod:`app.data.sink`)                     _write
    -> merged index.json per split, checked against what the tasks wrote          _splits_written
    -> manifest.json -> atomic rename into place (:mod:`app.core.publish`).

Every file is hashed where its bytes are written (the tasks' shards and rejects by the tasks,
the merged indexes and the unreadable lines' rejects by the driver, handed to the lease; the
vocabularies and manifest when the staging folder is published), so the version's
``_SUCCESS`` lists each file's sha256 without reading the dataset back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from app.core import logs
from app.core.config import DataConfig
from app.core.publish import check_writable, is_published, writer
from app.core.redact import redact, redact_values
from app.core.storage import FileSum, Location, resolve
from app.data import duplicates
from app.data.blocks import (
    block_stats,
    encode_blocks,
    remote_block_stats,
    remote_window_block,
    temporal_split,
)
from app.data.dataset import (
    MANIFEST,
    SCHEMA_VERSION,
    SPLITS,
    BaseDataset,
    Counts,
    DatasetError,
    Duplicates,
    LabelRule,
    Manifest,
    SplitRule,
    Vocab,
    VocabBase,
    id_text,
    read_base,
    read_manifest,
)
from app.data.mds import INTERACTION_COLUMNS

# InteractionSink and merge_split_index: importable from here as before the sink had a module
from app.data.sink import (  # noqa: F401
    InteractionSink,
    index_rows,
    merge_split_index,
    put_parquet,
    rejects_rows,
)
from app.data.sources import DataError, Source, open_source
from app.data.validate import VALIDATED_SCHEMA, Columns, first_repeated, validate_table

_INT_ID = r"^-?[1-9]\d{0,18}$|^0$"  # an integer as int64 writes it (range checked after)
_DAY_S = 86_400  # seconds in a day (validated timestamps are epoch seconds)


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
            manifest = _build(cfg, tmp, lease.target, record=lease.record, verbose=verbose)
            shutil.rmtree(tmp / "_scratch", ignore_errors=True)
    return manifest


def _build(cfg: DataConfig, tmp: Path, target: Location, *,
           record: Callable[[Mapping[str, FileSum]], None], verbose: bool) -> Manifest:
    """Prepare into a version being staged: the driver's files (vocabularies, manifest) go
    to ``tmp``, the tasks' (shards, rejects) to ``target``, the same folder when local;
    ``record`` gets the sums of the files written straight into ``target``
    (:meth:`app.core.publish.Lease.record`)."""
    t0 = time.perf_counter()
    say, detail = _printers(t0, verbose)
    base = read_base(cfg.base) if cfg.base else None  # a bad base fails before any Ray work
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    source = open_source(cfg, scratch_dir=str(tmp / "_scratch"),
                         malformed_dir=str(target.join("_malformed")))
    validated = _validated(source, cfg)
    detail(f"validated {validated.num_blocks()} blocks")
    blocks = validated.to_arrow_refs()
    tally = _tally(blocks, source, target)
    where = redact(source.description.get("input") or source.description["dataset"])
    say(f"read {tally.read:,} rows from {where}: {tally.accepted:,} accepted, "
        f"{tally.rejected:,} rejected")
    if tally.accepted == 0:
        raise tally.nothing_accepted(where)
    if cfg.window_days > 0:
        # before the vocabularies: ids seen only before the window get no row (but --base's)
        blocks, tally = _window(blocks, tally, cfg.window_days, say=say)
        validated = None  # the blocks with the older rows are released

    vocab = _vocabularies(tally.stats, tmp / "vocab", item_metadata=source.item_metadata,
                          base=base)
    merge = _resolve_duplicates(blocks, vocab, accepted=tally.kept, policy=cfg.duplicates,
                                say=say)
    label = _label_rule(cfg, tally, merge)
    say(f"vocabularies: {_vocab_sizes(vocab.part)}; label: "
        f"rating >= {label.threshold:.4g} ({label.rule})")
    written, files = _write(cfg, blocks, vocab, merge, threshold=label.threshold,
                            columns=source.columns, target=target)
    record({**tally.files, **files})
    dup = Duplicates(policy=cfg.duplicates, rows_merged=merge.rows_merged, pairs=merge.pairs)
    validated = blocks = merge = None  # release the materialised blocks
    detail("wrote MDS shards")

    splits = _splits_written(target, written, kept=tally.kept - dup.rows_merged,
                             rejected=tally.rejected)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        created_unix=int(time.time()),
        source=redact_values(source.description),  # no credentials saved
        columns=asdict(source.columns),  # user, item, rating, timestamp
        mds_columns=INTERACTION_COLUMNS,
        counts=Counts(read=tally.read, accepted=tally.accepted, rejected=tally.rejected,
                      rejected_by_reason=dict(sorted(tally.by_reason.items())),
                      duplicates=dup, splits=splits,
                      positives={name: written[f"{name}_positives"] for name in SPLITS},
                      outside_window=tally.outside_window),
        label=label,
        split=SplitRule(rule=cfg.split, seed=cfg.seed,
                        fractions={"train": cfg.train_fraction, "val": cfg.val_fraction,
                                   "test": cfg.test_fraction}),
        vocab=vocab.part,
        config=redact_values(dict(vars(cfg))),
        seconds=round(time.perf_counter() - t0, 2),
    )
    manifest.write(tmp)
    merged = f"; duplicates merged {dup.rows_merged:,}" if dup.rows_merged else ""
    say("splits: " + ", ".join(f"{k} {v:,}" for k, v in splits.items())
        + f"; rejected {tally.rejected:,}{merged}; {manifest.seconds:.1f}s")
    if not target.remote:
        read_manifest(tmp)  # the contract check a reader will run (on S3: after publishing)
    return manifest


def _printers(t0: float, verbose: bool) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """(say: a line per step, with the seconds since ``t0``; detail: a line worth printing
    only with --verbose)."""
    def say(msg: str) -> None:
        if verbose:
            logs.say("prepare", f"{time.perf_counter() - t0:5.1f}s {msg}")

    def detail(msg: str) -> None:
        if logs.level() == "verbose":
            say(msg)

    return say, detail


# ---------------------------------------------------------------- the steps, in recipe order

def _validated(source: Source, cfg: DataConfig) -> ray.data.MaterializedDataset:
    """The source's rows with a reason on each bad one (:func:`validate_table`), materialised:
    every later step reads these blocks."""
    ts_min, ts_max = cfg.timestamp_bounds()
    return source.dataset.map_batches(
        validate_table, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs=dict(columns=source.columns, rating_min=cfg.rating_min,
                       rating_max=cfg.rating_max, timestamp_unit=cfg.timestamp_unit,
                       timestamp_min=ts_min, timestamp_max=ts_max),
    ).materialize()


@dataclass
class _Tally:
    """What validation found, before duplicates are resolved."""

    stats: pa.Table     # one row per block (:func:`app.data.blocks.block_stats`)
    accepted: int
    by_reason: Counter  # rejected rows by reason, unreadable lines included
    files: dict[str, FileSum]  # what it wrote into the version (the unreadable lines' rejects)
    outside_window: int = 0  # accepted rows before --window-days' window (not in ``stats``)

    @property
    def kept(self) -> int:
        """Accepted rows that go on to the splits (before duplicates are merged)."""
        return self.accepted - self.outside_window

    @property
    def rejected(self) -> int:
        return sum(self.by_reason.values())

    @property
    def read(self) -> int:
        return self.accepted + self.rejected

    def nothing_accepted(self, where: str) -> DataError:
        """The error for a source without a valid row, with what was wrong with its rows."""
        reasons = "; ".join(f"{r}: {n}" for r, n in self.by_reason.most_common())
        return DataError(f"{where}: no valid rows to prepare ({self.read} read; "
                         f"{reasons or 'no data rows'})")


def _tally(blocks: list, source: Source, target: Location) -> _Tally:
    """Summarise every validated block (a task each) and count the source's unreadable lines,
    which go to the rejects of the version ``target`` as they are."""
    summaries = ray.get([remote_block_stats.remote(ref) for ref in blocks])
    # the empty summary first keeps the table typed when there are no blocks at all
    stats = pa.concat_tables([block_stats(VALIDATED_SCHEMA.empty_table())] + summaries)
    accepted = int(pc.sum(stats["accepted"]).as_py() or 0)
    by_reason: Counter = Counter()
    for text in stats["rejected"].to_pylist():
        by_reason.update(json.loads(text))
    malformed, files = _malformed_rejects(source, target)
    by_reason.update(malformed)
    return _Tally(stats=stats, accepted=accepted, by_reason=by_reason, files=files)


def _malformed_rejects(source: Source, target: Location
                       ) -> tuple[Counter, dict[str, FileSum]]:
    """Turn recorded unreadable CSV lines into a rejects Parquet file of the version
    ``target``; count them. The records are removed once they are in it.

    Returns:
        (rows by reason, the file written -> its size and sha256)
    """
    counts: Counter = Counter()
    files: dict[str, FileSum] = {}
    if not source.malformed_dir:
        return counts, files
    recorded = resolve(source.malformed_dir)
    records = []
    for f, _ in recorded.files():
        records += [json.loads(line) for line in recorded.join(f).read_text().splitlines()
                    if line]
    if records:
        records.sort(key=lambda r: (r["line"] is None, r["line"] or 0, r["text"]))
        rel = "rejects/malformed-lines.parquet"
        files[rel] = put_parquet(pa.Table.from_pylist(records, schema=pa.schema(
            [("line", pa.int64()), ("text", pa.string()), ("reason", pa.string())])),
            target.join(rel))
        counts.update(r["reason"] for r in records)
    recorded.delete()
    return counts, files


def _window(blocks: list, tally: _Tally, days: float, *, say: Callable[[str], None]
            ) -> tuple[list, _Tally]:
    """Leave out the accepted rows older than ``days`` days before the latest accepted
    timestamp: a task per block returns it without them (its rejected rows stay) and its new
    summary. The rows left out are counted, never written.

    Returns:
        (the new blocks, the tally of what they hold, with ``outside_window``)

    Raises:
        DataError: no accepted row is left in the window.
    """
    latest = int(pc.max(tally.stats["ts_max"]).as_py())
    cutoff = math.ceil(latest - days * _DAY_S)  # timestamps are whole seconds: ts >= cutoff
    pairs = [remote_window_block.remote(ref, cutoff) for ref in blocks]
    stats = pa.concat_tables([block_stats(VALIDATED_SCHEMA.empty_table())]
                             + ray.get([summary for _, summary in pairs]))
    kept = int(pc.sum(stats["accepted"]).as_py() or 0)
    since = datetime.fromtimestamp(cutoff, timezone.utc).date().isoformat()
    if kept == 0:
        raise DataError(f"--window-days {days:g}: no accepted row from {since} on")
    say(f"window: the last {days:g} days (from {since}): {tally.accepted - kept:,} rows "
        f"older left out")
    return ([block for block, _ in pairs],
            dataclasses.replace(tally, stats=stats, outside_window=tally.accepted - kept))


@dataclass
class _Vocabularies:
    """The id vocabularies as the encode step looks ids up: ids as text, index i + 1 <-> id i."""

    users_text: pa.Array
    items_text: pa.Array
    part: Vocab  # what the manifest says of them


def _vocabularies(stats: pa.Table, folder: Path, *, item_metadata: Optional[pa.Table] = None,
                  base: Optional[BaseDataset] = None) -> _Vocabularies:
    """Build the user and item vocabularies from the blocks' distinct ids (after the ``base``
    dataset's ids, at their indices, when given) and save them to ``folder``
    (``users.parquet``, ``items.parquet`` with the item metadata columns)."""
    folder.mkdir()
    if base is None:
        users_text, users = _vocabulary(stats["users"])
        items_text, items = _vocabulary(stats["items"])
        _save_vocab(folder / "users.parquet", users)
        _save_vocab(folder / "items.parquet", items, item_metadata, items_text)
        metadata = item_metadata.column_names if item_metadata is not None else []
        ref = VocabBase()
    else:
        users_text, users, new_users, absent_users = _extended(stats["users"], base.users["id"])
        items_text, items, new_items, absent_items = _extended(stats["items"], base.items["id"])
        merged = _merged_metadata(items_text, item_metadata, base.items)
        _save_vocab(folder / "users.parquet", users)
        _save_vocab(folder / "items.parquet", items, merged, items_text)
        metadata = merged.column_names if merged is not None else []
        ref = VocabBase(uri=redact(base.ref.uri), version=base.ref.version,  # no credentials
                        manifest_sha256=base.ref.manifest_sha256, new_users=new_users,
                        new_items=new_items, absent_users=absent_users,
                        absent_items=absent_items)
    return _Vocabularies(users_text, items_text, Vocab(
        users=len(users), items=len(items), unknown_index=0, user_id_type=str(users.type),
        item_id_type=str(items.type), item_metadata=[c for c in metadata if c != "item"],
        base=ref))


def _vocab_sizes(vocab: Vocab) -> str:
    """``610 users, 9,000 items``; with a base, how many ids of each are new and how many only
    in the base: ``610 users (12 new, 3 only in the base), ...``."""
    b = vocab.base

    def one(n: int, kind: str, new: int, absent: int) -> str:
        extra = f" ({new:,} new, {absent:,} only in the base)" if b.uri else ""
        return f"{n:,} {kind}{extra}"

    return (one(vocab.users, "users", b.new_users, b.absent_users) + ", "
            + one(vocab.items, "items", b.new_items, b.absent_items))


def _integers(text: pa.Array) -> Optional[pa.Array]:
    """``text`` as int64 when every id is an integer written as int64 writes it (``7``,
    ``-3``; not ``007``, ``+7``, ``-0`` or beyond int64), else None."""
    if not len(text) or not pc.all(pc.match_substring_regex(text, _INT_ID)).as_py():
        return None
    try:
        return pc.cast(text, pa.int64())
    except pa.ArrowInvalid:  # 19 digits beyond int64: the ids stay text
        return None


def _vocabulary(id_lists: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Distinct ids in a stable order: numeric order when every id is an integer's own text.

    Ids are text and stay exact: the vocabulary is saved as int64 only when every id is an
    integer written as int64 writes it (:func:`_integers`), so an int64 vocabulary's decimal
    text is exactly its ids.

    Args:
        id_lists: one list of distinct ids (text) per block.

    Returns:
        (ids as text, for lookups; ids in their natural type, for the saved vocabulary)
    """
    text = pc.unique(pc.list_flatten(id_lists.combine_chunks()))
    natural = _integers(text)
    if natural is not None:
        order = pc.sort_indices(natural)
        return pc.take(text, order), pc.take(natural, order)
    text = pc.take(text, pc.sort_indices(text))
    return text, text


def _extended(id_lists: pa.ChunkedArray, base_ids: pa.ChunkedArray
              ) -> tuple[pa.Array, pa.Array, int, int]:
    """A base vocabulary extended by the blocks' distinct ids: the base's ids first, at their
    indices (those absent from the blocks too: a model can still serve them), then the new
    ids in :func:`_vocabulary`'s order for the union's type.

    The union follows :func:`_vocabulary`'s rule as a whole: int64 only when every id, old and
    new, is an integer's own text; else every id is saved as its text (a base of int64 ids
    becomes text then, ``7`` stays ``7`` and a new ``007`` is another id).

    Returns:
        (ids as text, ids in their natural type, new ids, base ids absent from the blocks)
    """
    seen = pc.unique(pc.list_flatten(id_lists.combine_chunks()))
    old = id_text(base_ids)
    fresh = seen.filter(pc.invert(pc.is_in(seen, value_set=old)))
    absent = len(old) - int(pc.sum(pc.is_in(old, value_set=seen)).as_py() or 0)
    natural = _integers(pa.concat_arrays([old, fresh]))
    order = pc.sort_indices(natural[len(old):] if natural is not None else fresh)
    text = pa.concat_arrays([old, pc.take(fresh, order)])
    natural = pc.cast(text, pa.int64()) if natural is not None else text
    return text, natural, len(fresh), absent


def _merged_metadata(items_text: pa.Array, new: Optional[pa.Table], base: pa.Table
                     ) -> Optional[pa.Table]:
    """The item metadata of an extended vocabulary, aligned with ``items_text``: for each
    column, the new source's value where it has one, else the base's (the base's columns
    first, in its order, then the source's others).

    Raises:
        DatasetError: a column of both cannot take the base's values in the source's type.
    """
    base_cols = [c for c in base.column_names if c not in ("index", "id")]
    new_cols = [c for c in (new.column_names if new is not None else []) if c != "item"]
    if not base_cols and new is None:
        return None
    in_base = pc.index_in(items_text, value_set=id_text(base["id"]))
    in_new = pc.index_in(items_text, value_set=new["item"]) if new is not None else None
    columns = {"item": items_text}
    for col in base_cols + [c for c in new_cols if c not in base_cols]:
        old = pc.take(base[col], in_base) if col in base_cols else None
        ours = pc.take(new[col], in_new) if col in new_cols else None
        if ours is not None and old is not None:
            try:
                old = old.cast(ours.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DatasetError(f"--base: item metadata column {col!r} is {old.type} there "
                                   f"and {ours.type} in the new data") from None
        columns[col] = old if ours is None else ours if old is None else pc.coalesce(ours, old)
    return pa.table(columns)


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


def _resolve_duplicates(blocks: list, vocab: _Vocabularies, *, accepted: int, policy: str,
                        say: Callable[[str], None]) -> duplicates.Plan:
    """Repeated (user, item) rows resolved by ``policy`` before labels and splits, so each
    pair gets one label (an empty plan for ``keep``)."""
    if policy == "keep":
        return duplicates.Plan()
    merge = duplicates.plan(blocks, users=ray.put(vocab.users_text),
                            items=ray.put(vocab.items_text), accepted=accepted, policy=policy)
    if merge.rows_merged:
        say(f"duplicates: {merge.rows_merged:,} rows merged into {merge.pairs:,} "
            f"(user, item) pairs ({policy})")
    return merge


def _label_rule(cfg: DataConfig, tally: _Tally, merge: duplicates.Plan) -> LabelRule:
    """The label threshold: ``--label-threshold``, or the mean rating of the rows kept (one
    rating per merged pair)."""
    kept = tally.kept - merge.rows_merged
    mean = (float(pc.sum(tally.stats["rating_sum"]).as_py()) + merge.rating_delta) / kept
    threshold = mean if cfg.label_rule == "mean" else cfg.label_threshold
    return LabelRule(rule=cfg.label_rule, threshold=threshold, mean_rating=mean)


def _write(cfg: DataConfig, blocks: list, vocab: _Vocabularies, merge: duplicates.Plan, *,
           threshold: float, columns: Columns, target: Location
           ) -> tuple[Counter, dict[str, FileSum]]:
    """Encode every block (ids, label, split code), apply the temporal split if asked, and
    write the splits' MDS shards and the rejects under ``target`` in one Ray Data write.

    Returns:
        What the write tasks wrote (:attr:`InteractionSink.written`), and every file written
        with its size and sha256 (:attr:`InteractionSink.files`).
    """
    # A dataset of block numbers, so each task meets its block's indices and decisions.
    encoded = ray.data.range(len(blocks), override_num_blocks=max(1, len(blocks))).map_batches(
        encode_blocks, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(blocks=blocks, users=vocab.users_text, items=vocab.items_text,
                       indices=merge.indices or None, decisions=merge.decisions or None,
                       threshold=threshold, split=cfg.split, val_fraction=cfg.val_fraction,
                       test_fraction=cfg.test_fraction, seed=cfg.seed))
    if cfg.split == "temporal":
        encoded = encoded.repartition(max(1, len(blocks)), keys=["user_idx"]) \
            .map_batches(temporal_split, batch_size=None, batch_format="pyarrow",
                         fn_kwargs=dict(val_fraction=cfg.val_fraction,
                                        test_fraction=cfg.test_fraction))
    sink = InteractionSink(target.uri, columns=columns, size_limit=cfg.shard_size_limit)
    encoded.write_datasink(sink)
    return sink.written, sink.files


def _splits_written(target: Location, written: Counter, *, kept: int,
                    rejected: int) -> dict[str, int]:
    """Rows per split by the merged indexes on disk, checked against what the tasks wrote.

    Raises:
        RuntimeError: the indexes or reject files on disk do not hold what the tasks wrote.
    """
    split_rows = {name: index_rows(target.join(name)) for name in SPLITS}
    rejects_written = rejects_rows(target.join("rejects"))
    if (split_rows != {name: written[name] for name in SPLITS}
            or sum(split_rows.values()) != kept or rejects_written != rejected):
        raise RuntimeError(f"written rows do not add up: splits {split_rows} vs {kept} "
                           f"accepted and kept, {rejects_written} rejects vs {rejected}")
    return split_rows
