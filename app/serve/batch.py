"""Batch inference with Ray Data: top-K recommendations for users, or scores for given pairs.

The driver loads the model folder (or downloads it from MLflow), computes every item's
embedding once through the candidate tower, and puts the item embeddings, the vocabularies and
each user's rated items in Ray's object store. Users (or pairs) then flow through
``map_batches`` on an actor pool; each actor holds one copy of the shared arrays (zero-copy
numpy from the object store), computes query embeddings on its device (a GPU per actor when
the cluster has them) and the exact top-K by matrix product and ``topk``, or searches an
approximate FAISS inner-product index. Each actor writes its batches' rows as Parquet files
straight into the version being published, hashing the bytes it wrote, and returns one row per
file (its name, size, sha256 and counts): the driver never reads the output back and no write
task waits for a free CPU behind the pool. The version is published when complete.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from app.core import logs
from app.core.config import Config, InferenceConfig
from app.core.contracts import Contract
from app.core.preflight import check_infer
from app.core.redact import redact
from app.core.publish import OutputError, check_writable, local_dir, version_uri, writer
from app.core.storage import FileSum, Location, NodeFolder, is_remote, resolve
from app.data.dataset import SPLITS, DatasetError, load_vocab, read_manifest
from app.data.sink import put_parquet
from app.serve.core import Recommender, build_faiss, id_keys
from app.serve.inputs import read_histories, read_table, unique_users, with_history_users
from app.train.model import ModelSpec
from app.train.model_folder import (
    WEIGHTS,
    ModelError,
    rated_items,
    read_model_json,
    resolve_model,
)

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
    startup_seconds: Optional[float] = None  # the pool's start: to the first batch
    batch_seconds: Optional[float] = None    # the first batch's start to the last one's end
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
    """The model folder on this node: a path as given, or a :class:`NodeFolder` (read in place
    on its node, fetched from it and unpacked into this node's cache elsewhere: an actor on
    another node never needs the driver's disk)."""
    if isinstance(model_dir, NodeFolder):
        return model_dir.local()
    return str(model_dir)


class PartWriter:
    """Base of the pool's actors: each batch's output is written as one Parquet file
    ``part-<uuid>.parquet`` into the version's folder (``target``, on any node), and the actor
    returns one row for it: ``file``, ``size``, ``sha256``, ``started`` and ``ended`` (the
    batch's wall-clock span, Unix seconds) and the counts of :meth:`tally`."""

    target: Location
    DICTIONARY: Any = True  # the columns put_parquet dictionary-encodes (True: any that pays)

    def tally(self, table: pa.Table) -> dict[str, int]:
        """Counts of one written file that the driver adds up for the summary."""
        raise NotImplementedError

    def written(self, frame: pd.DataFrame, started: float) -> pd.DataFrame:
        """``frame`` written as one file; ``started``: when the batch's call began."""
        table = pa.Table.from_pandas(frame, preserve_index=False)
        name = f"part-{uuid.uuid4().hex}.parquet"
        done = put_parquet(table, self.target.join(name), self.DICTIONARY)
        return pd.DataFrame([{"file": name, "size": done.size, "sha256": done.sha256,
                              "started": started, "ended": time.time(),
                              **self.tally(table)}])


class TopK(PartWriter):
    """Ray Data actor: top-K items for a batch of users (column ``userId``), by the serving
    core (:class:`app.serve.core.Recommender`), written as one Parquet file (:class:`PartWriter`).

    Args:
        model_dir: the model folder (each actor loads its own towers): a path, or a
            :class:`NodeFolder` (:func:`model_folder`).
        shared: ``[ref]`` of a dict with ``items`` (num_items, D) embeddings, ``rated``
            (UserItems or None: what is left out), ``given`` (user id text -> item indices
            of a history, or None) and ``faiss`` (serialized index or None).
        k: items per user.
        device: ``cpu`` or ``cuda``.
        target: the folder the files go to.
    """

    # a user's id, fallback and source repeat on its k rows; the items, scores, ranks and
    # titles vary too much for a dictionary to pay: 5.5 ms for 100,000 rows, against 11.5
    DICTIONARY = ["userId", "fallback", "source"]

    def __init__(self, model_dir: Any, shared: list, k: int, device: str, target: Location,
                 ef_search: int = 128) -> None:
        import ray

        s = ray.get(shared[0]) if isinstance(shared[0], ray.ObjectRef) else shared[0]
        self.core = Recommender(model_folder(model_dir), device, rated=s["rated"],
                                items=s["items"], faiss_index=s["faiss"], ef_search=ef_search)
        self.given: dict[str, np.ndarray] = s.get("given") or {}  # user id -> recent items
        self.k = min(k, self.core.num_items - 1)
        self.target = target

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.time()
        given = None
        if self.given:
            given = [self.given.get(v) if v is not pd.NA else None
                     for v in id_keys(batch["userId"]).tolist()]
        return self.written(self.core.recommend(batch["userId"], self.k, given=given),
                            started)

    def tally(self, table: pa.Table) -> dict[str, int]:
        firsts = pc.equal(table["rank"], 1)
        return {"rows": table.num_rows,
                "users": pc.count_distinct(table["userId"]).as_py(),
                "firsts": int(pc.sum(firsts).as_py() or 0),
                "fallback_users": int(pc.sum(pc.and_(firsts, table["fallback"])).as_py() or 0),
                "history_users": int(pc.sum(pc.and_(
                    firsts, pc.equal(table["source"], "history"))).as_py() or 0)}


class PairScores(PartWriter):
    """Ray Data actor: scores of (userId, movieId) pairs by the serving core, unknown ids
    flagged, never dropped; written as one Parquet file per batch (:class:`PartWriter`)."""

    def __init__(self, model_dir: Any, device: str, target: Location) -> None:
        self.core = Recommender(model_folder(model_dir), device, rated=None)
        self.target = target

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.time()
        return self.written(self.core.score_pairs(batch["userId"], batch["movieId"]), started)

    def tally(self, table: pa.Table) -> dict[str, int]:
        n = table.num_rows
        return {"rows": n,
                "unknown_user_rows": n - int(pc.sum(table["known_user"]).as_py() or 0),
                "unknown_item_rows": n - int(pc.sum(table["known_item"]).as_py() or 0)}


# what an actor holds besides its model's weights and two copies of the item embeddings (the
# shared one and the padded, transposed one it scores with): the interpreter with torch,
# pandas and pyarrow, the vocabularies, one block of scores (64 MB) and a batch's output
ACTOR_BASE_BYTES = 768 << 20


def _device_and_pool(cfg: Config, model_dir: Path, *, reads: bool = False
                     ) -> tuple[str, int, dict[str, Any]]:
    """(device, pool size, Ray resources per actor) for this model on the running cluster
    (:func:`pool_shape`)."""
    import ray

    return pool_shape(ray.cluster_resources(), cfg.inference, actor_model_bytes(model_dir),
                      reads=reads)


def pool_shape(resources: dict[str, float], inf: InferenceConfig, model_bytes: int, *,
               reads: bool = False) -> tuple[str, int, dict[str, Any]]:
    """(device, pool size, Ray resources per actor) from the cluster's resources and the
    inference config (``inference_device``, ``inference_actors``).

    The default pool is one actor per GPU, else one per CPU: on a CPU each actor scores on
    one thread, and separate processes rank faster than one process's threads (on 2 cores,
    2 actors scored 100,000 users x 50,000 items in 12 s, 1 actor with 2 threads in 19 s).
    ``reads``: the rows come from Ray Data read tasks that run while the pool scores (a pairs
    file), so one CPU is left to them. On CPUs the pool is also kept to what the cluster's
    ``memory`` holds: each actor loads the model (:data:`ACTOR_BASE_BYTES` + ``model_bytes``,
    :func:`actor_model_bytes`)."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    want = inf.inference_device
    if want == "gpu" and gpus == 0:
        raise ModelError("--inference-device gpu: the cluster has no GPUs")
    if gpus > 0 and want in ("auto", "gpu"):
        return "cuda", inf.inference_actors or gpus, {"num_gpus": 1}
    size = inf.inference_actors
    if not size:
        size = max(1, cpus - 1 if reads else cpus)
        if resources.get("memory"):
            size = max(1, min(size, int(resources["memory"] // (ACTOR_BASE_BYTES + model_bytes))))
    return "cpu", size, {"num_cpus": 1}


def actor_model_bytes(model_dir: Path) -> int:
    """Bytes of the model an actor loads: the weights file, and the item embeddings twice
    (a float32 row per item, read from ``model.json``'s spec)."""
    spec = ModelSpec.from_dict(read_model_json(model_dir).spec)
    return (model_dir / WEIGHTS).stat().st_size + 2 * 4 * spec.num_items * spec.output_dim


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

    Recipe: check the dataset and the model -> the job (:func:`recommend_job` or
    :func:`pairs_job`) -> one actor pool writes the version's Parquet files and returns their
    sums and counts (:func:`write_with_actors`) -> ``_summary.json`` -> publish.

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
        say = (lambda msg: logs.say("infer", msg)) if verbose else (lambda msg: None)
        t0 = time.perf_counter()
        check_infer(cfg.cluster, model, data_dir, output, users, pairs, history)
        out = resolve(output)
        check_writable(out, "batch inference output", SUMMARY)
        ctx = open_context(cfg, model, data_dir, reads=pairs is not None)
        with writer(out, "batch_inference", timeout=cfg.cluster.lease_timeout,
                    say=say) as lease, lease.staged() as tmp:
            job = pairs_job(ctx, pairs, say) if pairs is not None \
                else recommend_job(ctx, users, history, say)
            if job.batches is not None:  # an actor more than the batches would only start up
                ctx.pool = max(1, min(ctx.pool, job.batches))
            say(f"{'scoring pairs' if pairs is not None else f'top {cfg.inference.top_k}'} "
                f"with {ctx.pool} {ctx.device} actor(s) from {redact(model)}")
            summary: dict[str, Any] = {
                "model": model if ":/" in model and not is_remote(model) else version_uri(model),
                "device": ctx.device, "dataset": ctx.data_uri, "actors": ctx.pool,
                **job.fields}
            files, counts, timing = write_with_actors(ctx, job, lease.target)
            lease.record(files)  # hashed by the actors as written: never read back
            summary.update(job.summarize(counts))
            summary.update(timing)
            summary["seconds"] = round(time.perf_counter() - t0, 2)
            # the version this block publishes: its name is chosen before it is written
            summary["output"] = lease.version.uri
            done = RecommendationsSummary(
                schema_version=RecommendationsSummary.SCHEMA_VERSION, **summary)
            done.write(tmp)
        what = (f"{done.users:,} users x {done.k} = {done.rows:,} rows"
                if done.mode == "recommend" else f"{done.rows:,} pairs")
        pool = (f"; {done.startup_seconds:.1f}s starting, {done.batch_seconds:.1f}s on the "
                f"batches" if done.batch_seconds is not None else "")
        say(f"{what} in {done.seconds:.1f}s ({ctx.pool} {ctx.device} actor(s){pool}) -> "
            f"{done.output}")
        return done


@dataclass
class Context:
    """What every job of one batch inference run shares: the checked model and dataset, the
    configuration, and the actor pool's device, size and resources."""

    cfg: Config
    model_dir: Path                        # the model folder on this machine
    model_ref: NodeFolder                  # the folder, as the actors find it
    data_dir: str                          # the dataset version on this machine
    data_uri: str                          # the dataset version read throughout
    vocab: dict[str, Any]
    device: str
    pool: int
    resources: dict[str, Any]


@dataclass
class Job:
    """One job over the actor pool: the rows in, the actor that maps a batch of them, its
    arguments, the summary fields known up front, and the summary's fields from the written
    files' counts added up (:meth:`PartWriter.tally`)."""

    rows: Any                              # a Ray dataset
    actor: type                            # TopK or PairScores
    kwargs: dict[str, Any]                 # the actor's arguments besides model, device, target
    summarize: Callable[[Counter], dict[str, Any]]
    fields: dict[str, Any] = field(default_factory=dict)
    batches: Optional[int] = None          # map_batches calls, where known before the run


def open_context(cfg: Config, model: str, data_dir: str, *, reads: bool = False) -> Context:
    """One version of the dataset throughout (on an object store: its copy on this machine),
    Ray, the model resolved and checked against the dataset, and the pool's shape."""
    from app.core.cluster import init_ray

    data_uri = version_uri(data_dir)
    local = str(local_dir(data_uri))
    read_manifest(local)
    init_ray(cfg.cluster)
    model_dir = resolve_model(model, cfg.cluster)
    check_dataset_matches(model_dir, local)
    device, pool, resources = _device_and_pool(cfg, model_dir, reads=reads)
    # the actors on this node read the folder in place; one elsewhere fetches it from here
    return Context(cfg=cfg, model_dir=model_dir, model_ref=NodeFolder.here(model_dir),
                   data_dir=local, data_uri=data_uri, vocab=load_vocab(model_dir),
                   device=device, pool=pool, resources=resources)


def write_with_actors(ctx: Context, job: Job, target: Location
                      ) -> tuple[dict[str, FileSum], Counter, dict[str, float]]:
    """The job's rows through ``map_batches`` on one actor pool, each batch written by its
    actor as a Parquet file in the version's folder ``target``.

    Returns:
        (file name -> its sum as written, the files' counts added up: 0 where none, the
        pool's timing: ``startup_seconds`` from the execution's start to the first batch's
        (the actors' start: a fresh process each, importing torch), ``batch_seconds`` from
        then to the last batch's end; wall clocks of the actors' nodes). A file in
        ``target`` that no returned row names (a retried batch's first attempt) is deleted,
        so the version holds each row once.
    """
    from ray.data import ActorPoolStrategy

    parts = job.rows.map_batches(
        job.actor, batch_format="pandas", batch_size=ctx.cfg.inference.inference_batch_size,
        fn_constructor_kwargs={"model_dir": ctx.model_ref, **job.kwargs,
                               "device": ctx.device, "target": target},
        compute=ActorPoolStrategy(size=ctx.pool), **ctx.resources)
    submitted = time.time()  # the pool starts with the execution
    with logs.native_notices_filtered():
        rows = parts.to_pandas()
    files = {r.file: FileSum(int(r.size), r.sha256) for r in rows.itertuples()}
    for name in target.children():
        if name.startswith("part-") and name not in files:
            target.join(name).delete()
    counted = rows.drop(columns=["file", "size", "sha256", "started", "ended"],
                        errors="ignore")
    # clocks of other nodes may run a little apart from this one's: never below 0
    timing = {"startup_seconds": round(max(0.0, float(rows["started"].min()) - submitted), 2),
              "batch_seconds": round(float(rows["ended"].max() - rows["started"].min()), 2)} \
        if len(rows) else {}
    return files, Counter({c: int(counted[c].sum()) for c in counted.columns}), timing


def pairs_job(ctx: Context, pairs: str, say: Callable[[str], None]) -> Job:
    """Scores of the (userId, movieId) pairs of a file; unknown ids are kept and counted."""
    def summarize(counts: Counter) -> dict[str, Any]:
        unknown_users, unknown_items = counts["unknown_user_rows"], counts["unknown_item_rows"]
        if unknown_items or unknown_users:
            say(f"pairs with unknown ids (kept, score NaN, known_* False): {unknown_users:,} "
                f"unknown users, {unknown_items:,} unknown items")
        return {"rows": counts["rows"], "unknown_user_rows": unknown_users,
                "unknown_item_rows": unknown_items}

    return Job(rows=read_table(pairs, ["userId", "movieId"]), actor=PairScores, kwargs={},
               summarize=summarize, fields={"mode": "pairs", "input": str(pairs)})


def recommend_job(ctx: Context, users: str, history: Optional[str],
                  say: Callable[[str], None]) -> Job:
    """Top-K lists for every user of the vocabulary (or of a users file), with the item
    embeddings, exclusions, histories and FAISS index shared through the object store."""
    import ray

    inf = ctx.cfg.inference
    fields: dict[str, Any] = {"mode": "recommend", "exclude_rated": inf.exclude_rated,
                              "index": inf.index}
    shared, k = shared_state(ctx, history, fields, say)
    ids = user_ids(ctx, users, shared["given"], fields, say)
    step = max(inf.inference_batch_size, 1)
    # one block per batch, its metadata taken here: from_arrow would ask a remote task per
    # block, and those tasks start worker processes (up to 3.5 s before the pool starts)
    blocks = [pa.table({"userId": ids.slice(s, step)}) for s in range(0, len(ids), step)]
    rows = ray.data.from_blocks(blocks)

    def summarize(counts: Counter) -> dict[str, Any]:
        # every user is in one batch (ids are unique), so the batches' counts add up
        n_users = counts["users"]
        if n_users != counts["firsts"]:
            raise ModelError(f"the written lists start at rank 1 {counts['firsts']:,} times "
                             f"for {n_users:,} users")
        return {"users": n_users, "k": k, "rows": counts["rows"],
                "short_lists": n_users * k - counts["rows"],
                "fallback_users": counts["fallback_users"],
                "history_users": counts["history_users"]}

    return Job(rows=rows, actor=TopK,
               kwargs={"shared": [ray.put(shared)], "k": k, "ef_search": inf.faiss_ef_search},
               summarize=summarize, fields=fields, batches=len(blocks))


def shared_state(ctx: Context, history: Optional[str], fields: dict[str, Any],
                 say: Callable[[str], None]) -> tuple[dict[str, Any], int]:
    """What every TopK actor shares: every item's embedding (computed once), the rated items
    left out, the histories given and the FAISS index; and the list length k."""
    inf = ctx.cfg.inference
    core = Recommender(ctx.model_dir, rated=None)  # every item's embedding, once
    spec, items = core.model.spec, core.item_embeddings.numpy()
    exclude = {"all": SPLITS, "train": ("train",), "none": ()}[inf.exclude_rated]
    shared: dict[str, Any] = {
        "items": items, "faiss": None, "given": None,
        "rated": rated_items(ctx.data_dir, exclude, spec.num_users, dtype=np.int32)
        if exclude else None}  # int32 items: half the bytes in the object store
    if history is not None:
        if not spec.history_length:
            raise ModelError(f"--history {history}: this model has no history feature "
                             f"(trained with --history-length 0)")
        shared["given"], counts = read_histories(history, ctx.vocab, spec.history_length)
        fields["history"] = {"input": str(history), **counts}
        say(f"histories: {counts['users']:,} users from {counts['rows']:,} rows; "
            f"{counts['unknown_item_rows']:,} row(s) with items the model does not know "
            f"(ignored)")
    k = min(inf.top_k, spec.num_items - 1)
    if inf.index == "faiss":
        import faiss

        shared["faiss"] = faiss.serialize_index(
            build_faiss(items, inf.faiss_m, inf.faiss_ef_search))
        sample = np.random.default_rng(0).permutation(np.arange(1, spec.num_users))[:1000]
        recall = exact_recall(shared, ctx.model_dir, sample, k, inf.faiss_ef_search)
        fields["faiss_recall_vs_exact"] = recall
        say(f"FAISS HNSW (M={inf.faiss_m}, efSearch={inf.faiss_ef_search}): recall@{k} "
            f"against exact top-{k} on {len(sample):,} users: {recall:.4f}")
    return shared, k


def user_ids(ctx: Context, users: str, given: Optional[dict[str, np.ndarray]],
             fields: dict[str, Any], say: Callable[[str], None]) -> pa.Array:
    """The users to recommend for: the vocabulary's (and those only a history names), or a
    users file's, each once."""
    if users == "all":
        ids = ctx.vocab["users"]["id"]
        return with_history_users(ids, given) if given else ids
    ids, duplicates = unique_users(read_table(users, ["userId"]), users)
    fields["duplicate_users_dropped"] = duplicates
    if duplicates:
        say(f"{users}: {duplicates:,} repeated user id(s) dropped (each user gets one list)")
    return ids
