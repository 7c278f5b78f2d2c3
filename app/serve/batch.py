"""Batch inference with Ray Data: top-K recommendations for users, or scores for given pairs.

The driver loads the model folder (or downloads it from MLflow), computes every item's
embedding once through the candidate tower, and puts the item embeddings, the vocabularies and
each user's rated items in Ray's object store. Users (or pairs) then flow through
``map_batches`` on an actor pool; each actor holds one copy of the shared arrays (zero-copy
numpy from the object store), computes query embeddings on its device (a GPU per actor when
the cluster has them) and the exact top-K by matrix product and ``topk``, or searches an
approximate FAISS inner-product index. The result is a Parquet folder written beside its final
place and renamed into it when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.core import logs
from app.core.config import Config
from app.core.contracts import Contract
from app.core.publish import OutputError, check_writable, local_dir, version_uri, writer
from app.core.storage import is_remote, pack, resolve, unpack
from app.data.dataset import SPLITS, DatasetError, load_vocab, read_manifest
from app.data.validate import id_text
from app.serve.core import Recommender, build_faiss, id_keys, lookup, vocab_index  # noqa: F401
from app.train.model_folder import ModelError, rated_items, resolve_model

SUMMARY = "_summary.json"  # inside the output folder; Parquet readers skip "_" files


@dataclass
class RecommendationsSummary(Contract):
    """``_summary.json`` of a batch inference output version: what was scored, with what, and
    the counts a reader checks the Parquet files against. ``mode`` "recommend" fills the
    list fields (users, k, short_lists, fallback_users, history_users, exclude_rated,
    index, ...), "pairs" the pair fields (input, unknown_user_rows, unknown_item_rows)."""

    FILE = SUMMARY
    SCHEMA_VERSION = 1
    Error = OutputError
    REDO = "; run batch inference again"

    schema_version: int
    mode: str
    model: str
    dataset: str
    device: str
    actors: int
    rows: int
    seconds: float
    output: Optional[str] = None  # the published version (set once published)
    users: Optional[int] = None
    k: Optional[int] = None
    short_lists: Optional[int] = None
    fallback_users: Optional[int] = None
    history_users: Optional[int] = None
    exclude_rated: Optional[str] = None
    index: Optional[str] = None
    faiss_recall_vs_exact: Optional[float] = None
    duplicate_users_dropped: Optional[int] = None
    history: Optional[dict[str, Any]] = None
    input: Optional[str] = None
    unknown_user_rows: Optional[int] = None
    unknown_item_rows: Optional[int] = None


def check_dataset_matches(model_dir: Path, data_dir: str) -> None:
    """The dataset's vocabularies must be the model's (same ids at the same indices).

    Raises:
        DatasetError: naming what differs.
    """
    mine, theirs = load_vocab(model_dir), load_vocab(data_dir)
    for kind in ("users", "items"):
        a, b = mine[kind]["id"], theirs[kind]["id"]
        if len(a) != len(b) or a.type != b.type or not a.equals(b):
            raise DatasetError(f"{data_dir} does not match the model {model_dir}: the model has "
                               f"{len(a):,} {kind} ({a.type}), the dataset {len(b):,} "
                               f"({b.type}); use the dataset the model was trained on")


def model_folder(model_dir: Any) -> str:
    """The model folder on this node: a path as given, or ``[ref]`` of a folder packed by the
    driver (:func:`app.core.storage.pack`), unpacked into this node's cache: an actor on another
    node never needs the driver's disk."""
    if isinstance(model_dir, list):
        import ray

        files = ray.get(model_dir[0]) if isinstance(model_dir[0], ray.ObjectRef) \
            else model_dir[0]
        return str(unpack(files))
    return str(model_dir)


class TopK:
    """Ray Data actor: top-K items for a batch of users (column ``userId``), by the serving
    core (:class:`app.serve.core.Recommender`).

    Args:
        model_dir: the model folder (each actor loads its own towers): a path, or ``[ref]``
            of the packed folder (:func:`model_folder`).
        shared: ``[ref]`` of a dict with ``items`` (num_items, D) embeddings, ``rated``
            (UserItems or None: what is left out), ``given`` (user id text -> item indices
            of a history, or None) and ``faiss`` (serialized index or None).
        k: items per user.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, model_dir: Any, shared: list, k: int, device: str,
                 ef_search: int = 128) -> None:
        import ray

        s = ray.get(shared[0]) if isinstance(shared[0], ray.ObjectRef) else shared[0]
        self.core = Recommender(model_folder(model_dir), device, rated=s["rated"],
                                items=s["items"], faiss_index=s["faiss"], ef_search=ef_search)
        self.given: dict[str, np.ndarray] = s.get("given") or {}  # user id -> recent items
        self.k = min(k, self.core.num_items - 1)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        given = None
        if self.given:
            given = [self.given.get(v) if v is not pd.NA else None
                     for v in id_keys(batch["userId"]).tolist()]
        return self.core.recommend(batch["userId"], self.k, given=given)


class PairScores:
    """Ray Data actor: scores of (userId, movieId) pairs by the serving core, unknown ids
    flagged, never dropped."""

    def __init__(self, model_dir: Any, device: str) -> None:
        self.core = Recommender(model_folder(model_dir), device, rated=None)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.core.score_pairs(batch["userId"], batch["movieId"])


def _device_and_pool(cfg: Config) -> tuple[str, int, dict[str, Any]]:
    """(device, pool size, Ray resources per actor) from the config and the cluster."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    want = cfg.inference.inference_device
    if want == "gpu" and gpus == 0:
        raise ModelError("--inference-device gpu: the cluster has no GPUs")
    use_gpu = gpus > 0 and want in ("auto", "gpu")
    size = cfg.inference.inference_actors or (gpus if use_gpu else max(1, cpus // 2))
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    return ("cuda" if use_gpu else "cpu"), size, resources


def _parquet_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))


def _read_table(path: str, columns: list[str]) -> Any:
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


def _unique_users(ds: Any, path: str) -> tuple[pa.Array, int]:
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


def _with_history_users(ids: pa.Array, given: dict[str, np.ndarray]) -> pa.Array:
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
    ds = _read_table(path, ["userId", "movieId"])
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


def exact_recall(shared: dict[str, Any], model_dir: Path, users: np.ndarray, k: int,
                 ef_search: int) -> float:
    """Recall@k of the FAISS index against exact top-k on the given users (same exclusions)."""
    exact = Recommender(model_dir, rated=shared["rated"], items=shared["items"])
    approx = Recommender(model_dir, rated=shared["rated"], items=shared["items"],
                         faiss_index=shared["faiss"], ef_search=ef_search)
    _, want, _ = exact.top_k(users, k)
    _, got, _ = approx.top_k(users, k)
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(want, got))
    return hits / float(want.size)


def batch_inference(cfg: Config, model: str, data_dir: str, output: str, *,
                    users: str = "all", pairs: Optional[str] = None,
                    history: Optional[str] = None, verbose: bool = True
                    ) -> RecommendationsSummary:
    """Write recommendations (or pair scores) for a prepared dataset's users to ``output``.

    Args:
        cfg: the resolved configuration (``cfg.inference``).
        model: a model folder or an MLflow model URI.
        data_dir: the prepared dataset the model was trained on (vocabularies, rated items).
        output: the output folder; each run publishes a new version of it (Parquet files
            and ``_summary.json`` in ``output/<CURRENT>``, see :mod:`app.core.publish`).
        users: ``all`` (every user of the vocabulary) or a CSV/Parquet file with ``userId``.
        pairs: a CSV/Parquet file with ``userId, movieId``: score these pairs instead.
        history: a CSV/Parquet file with ``userId, movieId`` rows: users' recent items. A user
            with a history is recommended from it (``source`` "history"; a user the model
            does not know gets personal recommendations), and its items are left out.
        verbose: print progress.

    Returns:
        The summary (also written to the version's ``_summary.json``).
    """
    with logs.stage("infer"):
        return _batch_inference(cfg, model, data_dir, output, users=users, pairs=pairs,
                                history=history, verbose=verbose)


def _batch_inference(cfg: Config, model: str, data_dir: str, output: str, *, users: str,
                     pairs: Optional[str], history: Optional[str],
                     verbose: bool) -> RecommendationsSummary:
    import ray
    from ray.data import ActorPoolStrategy

    from app.core.cluster import init_ray

    say = (lambda msg: logs.say("infer", msg)) if verbose else (lambda msg: None)
    t0 = time.perf_counter()
    out = resolve(output)
    check_writable(out, "batch inference output", SUMMARY)
    # one version of the dataset throughout (on an object store: its copy on this machine)
    data_uri = version_uri(data_dir)
    data_dir = str(local_dir(data_uri))
    read_manifest(data_dir)
    init_ray(cfg.cluster)
    model_dir = resolve_model(model, cfg.cluster)
    check_dataset_matches(model_dir, data_dir)
    inf = cfg.inference
    device, pool, resources = _device_and_pool(cfg)
    vocab = load_vocab(model_dir)
    with writer(out, "batch_inference", timeout=cfg.cluster.lease_timeout, say=say) as lease, \
            lease.staged() as tmp:
        target = lease.target  # the version's folder: the actors write their files there
        summary: dict[str, Any] = {"model": model if ":/" in model and not is_remote(model)
                                   else version_uri(model), "device": device,
                                   "dataset": data_uri, "actors": pool}
        # the model folder travels to the actors through the object store
        model_ref = [ray.put(pack(model_dir))]

        if pairs is not None:
            ds = _read_table(pairs, ["userId", "movieId"])
            result = ds.map_batches(PairScores, batch_format="pandas",
                                    batch_size=inf.inference_batch_size,
                                    fn_constructor_kwargs={"model_dir": model_ref,
                                                           "device": device},
                                    compute=ActorPoolStrategy(size=pool), **resources)
            with logs.native_notices_filtered():
                result.write_parquet(target.path, filesystem=target.fs)
            written = pq.read_table(target.path, filesystem=target.fs,
                                    columns=["known_user", "known_item"])
            n = written.num_rows
            unknown_users = n - int(pc.sum(written["known_user"]).as_py() or 0)
            unknown_items = n - int(pc.sum(written["known_item"]).as_py() or 0)
            summary.update(mode="pairs", input=str(pairs), rows=n, unknown_user_rows=unknown_users,
                           unknown_item_rows=unknown_items)
            if unknown_items or unknown_users:
                say(f"pairs with unknown ids (kept, score NaN, known_* False): {unknown_users:,} "
                    f"unknown users, {unknown_items:,} unknown items")
        else:
            core = Recommender(model_dir, rated=None)  # every item's embedding, once
            exported, items = core.model, core.item_embeddings.numpy()
            n_items = exported.spec.num_items
            exclude = {"all": SPLITS, "train": ("train",), "none": ()}[inf.exclude_rated]
            rated = rated_items(data_dir, exclude, exported.spec.num_users) if exclude else None
            given = None
            if history is not None:
                if not exported.spec.history_length:
                    raise ModelError(f"--history {history}: this model has no history feature "
                                     f"(trained with --history-length 0)")
                given, counts = read_histories(history, vocab, exported.spec.history_length)
                summary["history"] = {"input": str(history), **counts}
                say(f"histories: {counts['users']:,} users from {counts['rows']:,} rows; "
                    f"{counts['unknown_item_rows']:,} row(s) with items the model does not know "
                    f"(ignored)")
            shared: dict[str, Any] = {"items": items, "rated": rated, "given": given,
                                      "faiss": None}
            k = min(inf.top_k, n_items - 1)
            if inf.index == "faiss":
                import faiss

                index = build_faiss(items, inf.faiss_m, inf.faiss_ef_search)
                shared["faiss"] = faiss.serialize_index(index)
                sample = np.arange(1, exported.spec.num_users)
                sample = np.random.default_rng(0).permutation(sample)[:1000]
                recall = exact_recall(shared, model_dir, sample, k, inf.faiss_ef_search)
                summary["faiss_recall_vs_exact"] = recall
                say(f"FAISS HNSW (M={inf.faiss_m}, efSearch={inf.faiss_ef_search}): recall@{k} "
                    f"against exact top-{k} on {len(sample):,} users: {recall:.4f}")
            if users == "all":
                ids = vocab["users"]["id"]
                if given:  # and the users that only the history file names
                    ids = _with_history_users(ids, given)
            else:
                ids, duplicates = _unique_users(_read_table(users, ["userId"]), users)
                summary["duplicate_users_dropped"] = duplicates
                if duplicates:
                    say(f"{users}: {duplicates:,} repeated user id(s) dropped (each user gets "
                        f"one list)")
            step = max(inf.inference_batch_size, 1)
            ds = ray.data.from_arrow([pa.table({"userId": ids.slice(s, step)})
                                      for s in range(0, len(ids), step)])
            ref = ray.put(shared)
            result = ds.map_batches(TopK, batch_format="pandas",
                                    batch_size=inf.inference_batch_size,
                                    fn_constructor_kwargs={"model_dir": model_ref,
                                                           "shared": [ref], "k": k,
                                                           "device": device,
                                                           "ef_search": inf.faiss_ef_search},
                                    compute=ActorPoolStrategy(size=pool), **resources)
            with logs.native_notices_filtered():
                result.write_parquet(target.path, filesystem=target.fs)
            written = pq.read_table(target.path, filesystem=target.fs,
                                    columns=["userId", "rank", "fallback", "source"])
            n = written.num_rows
            n_users = pc.count_distinct(written["userId"]).as_py()
            firsts = pc.equal(written["rank"], 1)
            n_fallback = int(pc.sum(pc.and_(firsts, written["fallback"])).as_py() or 0)
            n_history = int(pc.sum(pc.and_(firsts, pc.equal(written["source"], "history")))
                            .as_py() or 0)
            summary.update(mode="recommend", users=n_users, k=k, rows=n,
                           short_lists=n_users * k - n, fallback_users=n_fallback,
                           history_users=n_history,
                           exclude_rated=inf.exclude_rated, index=inf.index)
            if n_users != int(pc.sum(firsts).as_py() or 0):
                raise ModelError("the written lists do not start at rank 1 once per user")
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        done = RecommendationsSummary(schema_version=RecommendationsSummary.SCHEMA_VERSION,
                                      **summary)
        done.write(tmp)
    done.output = version_uri(out)  # the version just published
    what = (f"{done.users:,} users x {done.k} = {done.rows:,} rows"
            if done.mode == "recommend" else f"{done.rows:,} pairs")
    say(f"{what} in {done.seconds:.1f}s ({pool} {device} actor(s)) -> {done.output}")
    return done
