"""The per-worker training loop: a plain function of its config, run by Ray Train.

Each worker: reads its partition of the training split (``InteractionStream``), builds the
two-tower model with tables on the meta device, lets TorchRec's planner shard the tables over
all ranks, wraps the model in ``DistributedModelParallel`` and trains it with a fused
row-wise Adagrad for the tables and Adam for the dense layers. After every epoch it evaluates
(validation loss, AUROC for ``bce``, full-catalog Recall/NDCG@K), writes a sharded checkpoint
(``torch.distributed.checkpoint``: every rank writes its own shards) and calls
``ray.train.report``. Restarted after a failure, it resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from app.core import logs
from app.core.config import Config, load_config
from app.core.publish import local_dir
from app.core.storage import Location, resolve
from app.data.dataset import Manifest, read_split_arrays
from app.data.history import HISTORY_FILE, UserHistory
from app.data.reader import InteractionStream, ItemFeatures
from app.train.checkpoint import is_complete, load_sharded
from app.train.metrics import UserItems, binary_auroc, finish, popularity_scores, ranking_sums
from app.train.model import (
    TABLES,
    BatchMaker,
    ModelSpec,
    TwoTower,
    TwoTowerTrainTask,
    log_sampling_probability,
)

STATE_FILE = "state.json"
PLAN_FILE = "sharding_plan.json"
POPULARITY_FILE = "item_popularity.npy"
BATCH_COLUMNS = ("user", "item", "label", "timestamp")  # what a training batch reads


def item_features(model_cfg: Any, data_dir: str | os.PathLike) -> list[ItemFeatures]:
    """The candidate tower's item features (genres, year) that the config asks for and the
    dataset (or model folder) has, in the model's feature order."""
    found = [ItemFeatures.genres(data_dir) if model_cfg.use_genres else None,
             ItemFeatures.years(data_dir) if model_cfg.use_year else None]
    return [f for f in found if f is not None]


def model_spec(cfg: Config, manifest: Manifest, features: list[ItemFeatures]
               ) -> ModelSpec:
    """The model's shape from the config, the dataset's vocabularies and its item features."""
    rows = {f.name: len(f.vocab) for f in features}
    m = cfg.model
    num_items = manifest.vocab["items"] + 1
    return ModelSpec(num_users=manifest.vocab["users"] + 1, num_items=num_items,
                     num_genres=rows.get("item_genres", 0), num_years=rows.get("item_year", 0),
                     embedding_dim=m.embedding_dim,
                     tower_layers=tuple(int(x) for x in m.tower_layers),
                     objective=m.objective, temperature=m.temperature,
                     history_length=m.history_length, use_user_id=m.use_user_id,
                     normalize=m.normalize, negatives=m.resolved_negatives(num_items),
                     in_batch_negatives=m.in_batch_negatives,
                     sampled_negatives=m.sampled_negatives)


def _epoch_of(checkpoint: Any) -> int:
    """The epoch a checkpoint (a folder or a Ray Train ``Checkpoint``) was written after."""
    if isinstance(checkpoint, Location):
        return json.loads(checkpoint.join(STATE_FILE).read_text())["epoch"]
    with checkpoint.as_directory() as d:
        return json.loads(Path(d, STATE_FILE).read_text())["epoch"]


def _complete_checkpoints(run_dir: Any) -> dict[int, Location]:
    """Epoch -> checkpoint folder, for the complete ones under a Ray Train run folder (a path
    or URI): rank 0's state file and every shard file the metadata names."""
    root = resolve(run_dir)
    found = {}
    for name in root.children():
        folder = root.join(name)
        if not name.startswith("checkpoint_") or not folder.is_dir() \
                or not is_complete(folder):
            continue
        try:
            found[json.loads(folder.join(STATE_FILE).read_text())["epoch"]] = folder
        except FileNotFoundError:
            continue  # rank 0's files not there: incomplete
    return found


def checkpoint_of_epoch(run_dir: Any, epoch: int) -> Optional[Location]:
    """The complete checkpoint written after ``epoch`` under a Ray Train run folder, or None."""
    return _complete_checkpoints(run_dir).get(epoch)


def latest_checkpoint(run_dir: Any) -> Optional[Location]:
    """The complete checkpoint with the most epochs under a Ray Train run folder, or None."""
    found = _complete_checkpoints(run_dir)
    return found[max(found)] if found else None


@dataclass
class TrainingInputs:
    """What every rank reads before building the model."""

    spec: ModelSpec
    features: list[ItemFeatures]     # the candidate tower's item features
    rows: dict[str, np.ndarray]      # the training rows (exclusions in evaluation)
    positive_counts: np.ndarray      # (num_items,) positives per item: log-Q, popularity
    history: UserHistory             # training positives per user in time order

    def batch_maker(self, seed: int = 0, history_dropout: float = 0.0,
                    user_id_dropout: float = 0.0) -> BatchMaker:
        return BatchMaker(self.spec, self.features, self.history, seed, history_dropout,
                          user_id_dropout)


def training_rows(data_dir: str, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The rows of the given splits, concatenated (split order)."""
    parts = [read_split_arrays(Path(data_dir, s)) for s in splits]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def training_inputs(cfg: Config, data_dir: str, splits: tuple[str, ...] = ("train",)
                    ) -> TrainingInputs:
    """The model's shape, its item features, the training rows (of ``splits``: the train
    split, or every split for a refit), positives per item and the users' histories."""
    from app.data.dataset import read_manifest

    manifest = read_manifest(data_dir)
    features = item_features(cfg.model, data_dir)
    spec = model_spec(cfg, manifest, features)
    rows = training_rows(data_dir, splits)
    pos = rows["label"] > 0
    counts = np.bincount(rows["item"][pos].astype(np.int64), minlength=spec.num_items)
    history = UserHistory.build(rows["user"][pos], rows["item"][pos], rows["timestamp"][pos],
                                spec.num_users)
    return TrainingInputs(spec, features, rows, counts, history)


def _equal_share(ids: np.ndarray, device: torch.device) -> np.ndarray:
    """Truncate this rank's sample ids to the shortest rank's count, so that every rank runs
    the same number of steps (sharded lookups are collective); at most a few rows per epoch."""
    n = torch.tensor([len(ids)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return ids[: int(n.item())]


def _prefetch(make: Callable[[int], Any], n: int, depth: int = 2) -> Iterator[Any]:
    """Yield make(0..n-1), building up to ``depth`` items ahead in a background thread
    (decoding and KJT building overlap the model step)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def run() -> None:
        try:
            for i in range(n):
                q.put(make(i))
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    threading.Thread(target=run, daemon=True).start()
    for _ in range(n):
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        yield item


def sharding_constraints(cfg: Config, spec: ModelSpec, on_gpu: bool) -> dict[str, Any]:
    """Planner constraints per table: ``auto`` allows the model-parallel types the device
    supports for the id tables (row-wise types need a GPU) and lets a small genre table be
    replicated; an explicit ``--sharding`` applies to every table."""
    from torchrec.distributed.planner.types import ParameterConstraints

    if cfg.train.sharding != "auto":
        types = [cfg.train.sharding]
        return {TABLES[f]: ParameterConstraints(sharding_types=types) for f in spec.table_rows()}
    model_parallel = ["table_wise", "column_wise"] + (["row_wise", "table_row_wise"]
                                                      if on_gpu else [])
    small = ("item_genres", "item_year")  # a few hundred rows: may be replicated
    return {TABLES[f]: ParameterConstraints(
        sharding_types=model_parallel + (["data_parallel"] if f in small else []))
        for f in spec.table_rows()}


def plan_rows(plan: Any) -> list[dict[str, Any]]:
    """A TorchRec ``ShardingPlan`` as JSON-able rows: one per table, with its shards."""
    rows = []
    for module, params in plan.plan.items():
        for table, ps in params.items():
            shards = []
            if ps.sharding_spec is not None:
                shards = [{"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                           "placement": str(s.placement)} for s in ps.sharding_spec.shards]
            rows.append({"module": module, "table": table, "sharding_type": ps.sharding_type,
                         "compute_kernel": ps.compute_kernel, "ranks": list(ps.ranks or []),
                         "shards": shards})
    return rows



def build_sharded(cfg: Config, spec: ModelSpec, positive_counts: np.ndarray, *,
                  device: torch.device, local_world_size: int) -> tuple[Any, Any, Any]:
    """The sharded train task on this rank (call on every rank of an initialised process
    group): tables built on meta, planned by TorchRec's planner, materialised by
    ``DistributedModelParallel``; fused row-wise Adagrad for the tables, Adam for the rest.

    Returns:
        (DistributedModelParallel of a TwoTowerTrainTask, its combined optimizer, the plan).
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    model = TwoTower(spec, table_device=torch.device("meta"), device=device)
    task = TwoTowerTrainTask(model, log_q=log_sampling_probability(positive_counts).to(device))
    # the table optimizer runs inside the backward kernels (no dense gradient of a table)
    apply_optimizer_in_backward(RowWiseAdagrad,
                                list(model.query.ebc.parameters())
                                + list(model.candidate.ebc.parameters()),
                                {"lr": cfg.train.embedding_lr})
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=dist.get_world_size(), local_world_size=local_world_size),
        kernel_config=KernelConfig(compute_device=device.type))
    # an explicit reservation (TorchRec's default heuristic is deprecated, with a warning)
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=sharding_constraints(cfg, spec, device.type == "cuda"),
        storage_reservation=FixedPercentageStorageReservation(0.15))
    plan = planner.collective_plan(task, [EmbeddingBagCollectionSharder()],
                                   dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(task, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda ps: torch.optim.Adam(ps, lr=cfg.train.dense_lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), plan


def plan_summary(plan: Any) -> str:
    """One line for a sharding plan: each table's sharding type and ranks."""
    parts = []
    for module in plan.plan.values():
        for name, ps in module.items():
            parts.append(f"{name.removeprefix('t_')} {ps.sharding_type} "
                         f"{sorted(set(ps.ranks or []))}")
    return "; ".join(parts)


def train_step(dmp: Any, optimizer: Any, batch: Any) -> torch.Tensor:
    """One step of the plain (CPU) loop: forward, backward (tables update in it), dense step."""
    loss, _ = dmp(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


class Evaluator:
    """Full-catalog retrieval metrics, computed jointly by all ranks.

    Item embeddings: each rank runs the candidate tower on a slice of the catalog and the
    slices are all-gathered. Users: each rank ranks the catalog for its share of the users;
    metric sums are all-reduced. Every rank runs the same number of sharded forward calls.
    """

    def __init__(self, data_dir: str, spec: ModelSpec, maker: BatchMaker,
                 train_rows: dict[str, np.ndarray], ks: list[int], device: torch.device) -> None:
        self.spec, self.maker, self.ks, self.device = spec, maker, [int(k) for k in ks], device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.exclude = UserItems.build(train_rows["user"].astype(np.int64),
                                       train_rows["item"].astype(np.int64), spec.num_users)
        self.positives: dict[str, UserItems] = {}
        for split in ("val", "test"):
            rows = read_split_arrays(Path(data_dir, split))
            pos = rows["label"] > 0
            self.positives[split] = UserItems.build(rows["user"][pos].astype(np.int64),
                                                    rows["item"][pos].astype(np.int64),
                                                    spec.num_users)
        # each user scored at once: (users, items) floats, kept to ~64 MB
        self.chunk = int(max(1, min(2048, (1 << 24) // spec.num_items)))

    def _my_users(self, split: str) -> np.ndarray:
        users = np.flatnonzero(self.positives[split].counts() > 0)
        return users[self.rank::self.world]

    def _n_chunks(self, n: int, chunk: int) -> int:
        t = torch.tensor([(n + chunk - 1) // chunk], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _reduce(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return finish(dict(zip(keys, t.cpu().tolist())))

    @torch.no_grad()
    def item_embeddings(self, model: TwoTower) -> torch.Tensor:
        """(num_items, D) candidate-tower outputs for every item index, on every rank."""
        n = self.spec.num_items
        per = (n + self.world - 1) // self.world
        mine = np.arange(self.rank * per, min(n, (self.rank + 1) * per))
        out = []
        chunk = 8192
        for c in range(self._n_chunks(len(mine), chunk)):
            part = mine[c * chunk:(c + 1) * chunk]
            items = part if len(part) else np.zeros(1, np.int64)  # keep collectives in step
            emb = model.candidate(self.maker.candidate(items).to(self.device))
            out.append(emb[: len(part)])
        local = torch.cat(out) if out else torch.empty(0, self.spec.output_dim,
                                                       device=self.device)
        padded = torch.zeros(per, self.spec.output_dim, device=self.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:n]

    @torch.no_grad()
    def ranking(self, model: TwoTower, split: str, items: torch.Tensor) -> dict[str, float]:
        """Recall@K / NDCG@K of the model on a split's positives (this rank's users, reduced)."""
        users = self._my_users(split)
        sums: dict[str, float] = {}
        for c in range(self._n_chunks(len(users), self.chunk)):
            part = users[c * self.chunk:(c + 1) * self.chunk]
            # the query tower reads each user's latest training positives
            q = model.query(self.maker.query(part if len(part) else np.zeros(1, np.int64))
                            .to(self.device))
            if not len(part):
                continue
            scores = (q @ items.T).cpu()                                      # (U, num_items)
            for k, v in ranking_sums(scores, part, exclude=self.exclude,
                                     positives=self.positives[split], ks=self.ks).items():
                sums[k] = sums.get(k, 0.0) + v
        return self._reduce(sums or {"users": 0.0, **{f"{m}@{k}": 0.0 for k in self.ks
                                                      for m in ("recall", "ndcg")}})

    def popularity(self, split: str, positive_counts: np.ndarray) -> dict[str, float]:
        """The same metrics for the popularity baseline (no model involved)."""
        users = self._my_users(split)
        sums: dict[str, float] = {"users": 0.0, **{f"{m}@{k}": 0.0 for k in self.ks
                                                    for m in ("recall", "ndcg")}}
        for start in range(0, len(users), self.chunk):
            part = users[start:start + self.chunk]
            for k, v in ranking_sums(popularity_scores(positive_counts, len(part)), part,
                                     exclude=self.exclude, positives=self.positives[split],
                                     ks=self.ks).items():
                sums[k] += v
        return self._reduce(sums)


def _validation_loss(dmp: Any, stream: InteractionStream, maker: BatchMaker,
                     batch_size: int, device: torch.device, objective: str
                     ) -> dict[str, float]:
    """Mean validation loss (weighted by rows, or positives for softmax); AUROC for bce."""
    ids = _equal_share(stream.epoch_sample_ids(epoch=0), device)
    total, weight = 0.0, 0.0
    scores, labels = [], []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = maker(stream.gather(ids[start:start + batch_size], BATCH_COLUMNS)
                          ).to(device)
            loss, (_, s, y) = dmp(batch)
            w = float(len(y)) if objective == "bce" else float((y > 0).sum())
            total += float(loss) * w
            weight += w
            if objective == "bce":
                scores.append(s.cpu().numpy())
                labels.append(y.cpu().numpy())
    t = torch.tensor([total, weight], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    out = {"val_loss": float(t[0] / max(float(t[1]), 1.0))}
    if objective == "bce":
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (np.concatenate(scores) if scores else np.empty(0),
                                          np.concatenate(labels) if labels else np.empty(0)))
        out["val_auroc"] = binary_auroc(np.concatenate([g[0] for g in gathered]),
                                        np.concatenate([g[1] for g in gathered]))
    return out


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items() if k != "users"}


def _baseline_metrics(baselines: dict[str, Any]) -> dict[str, float]:
    """Flat ``<baseline>_<split>_<metric>`` entries of baselines computed by the driver."""
    out: dict[str, float] = {}
    for name, result in baselines.items():
        for split in ("val", "test"):
            out.update(_prefixed(f"{name}_{split}", result.get(split, {})))
    return out


def _improved(state: dict[str, Any], value: float) -> bool:
    """True when ``value`` beats the best validation value so far."""
    return state.get("best_value") is None or value > state["best_value"]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function: restore -> per epoch: train -> evaluate -> save -> report.

    Args:
        config: ``{"config": Config.to_dict(), "data_dir": str, "mlflow": {"tracking_uri",
            "run_id"} or None, "run_dir": the Ray Train run folder (checkpoints),
            "splits": the splits trained on (default train), "evaluate": whether to evaluate
            each epoch on val/test (off for a refit on every split), "baselines": metrics
            of baselines computed by the driver ({"ease": {"val": ..., "test": ...}})}``.
    """
    import logging

    # TorchRec, FBGEMM and streaming log every kernel load and default at INFO
    for name in ("", "torchrec", "fbgemm_gpu", "streaming"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray.train
    from ray.train import Checkpoint
    from torch.distributed import checkpoint as dcp

    cfg: Config = load_config(overrides={k: v for section in config["config"].values()
                                         for k, v in section.items()})
    data_dir = str(local_dir(config["data_dir"]))  # on an object store: this node's copy
    splits = tuple(config.get("splits") or ("train",))
    evaluate = bool(config.get("evaluate", True))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    tag = "train" if evaluate else "refit"
    say = (lambda msg: logs.say(tag, msg)) if rank == 0 else (lambda msg: None)
    verbose = logs.level() == "verbose"
    torch.manual_seed(cfg.train.train_seed)

    inputs = training_inputs(cfg, data_dir, splits)
    spec = inputs.spec
    dmp, optimizer, plan = build_sharded(cfg, spec, inputs.positive_counts, device=device,
                                         local_world_size=ctx.get_local_world_size())
    model = dmp.module.model
    import ray
    rank_nodes: list[Any] = [None] * world  # which node each rank runs on, saved with the plan
    dist.all_gather_object(rank_nodes, ray.get_runtime_context().get_node_id())

    state: dict[str, Any] = {"epoch": 0, "history": [], "resumed_at_epochs": [],
                             "best_epoch": 0, "best_value": None}
    # After a failure Ray Train hands back the latest checkpoint it registered. A worker that
    # dies right after an epoch's checkpoint is written, or an interrupt, can take the report
    # with it, so the run folder is read too (it holds only this run's, or --resume's) and
    # the later complete checkpoint of the two wins.
    restored = ray.train.get_checkpoint()
    found = latest_checkpoint(config["run_dir"]) if config.get("run_dir") else None
    if found is not None and (restored is None or _epoch_of(restored) < _epoch_of(found)):
        restored = Checkpoint(found.path, filesystem=found.fs)
    if restored is not None:
        with restored.as_directory() as d:
            sd = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
            load_sharded(sd, d)  # nothing but checkpoint data is unpickled
            dmp.load_state_dict(sd["model"])
            optimizer.load_state_dict(sd["optim"])
            state = json.loads(Path(d, STATE_FILE).read_text())
        state["resumed_at_epochs"].append(state["epoch"])
        say(f"resumed from the checkpoint after epoch {state['epoch']}")
    else:
        if verbose:
            say(f"sharding plan ({world} rank(s), {device.type}):\n{plan}")
        elif evaluate:  # (a refit's plan is the evaluated run's)
            say(f"sharding ({world} rank(s), {device.type}): {plan_summary(plan)}")

    from streaming import Stream
    train_stream = InteractionStream(
        streams=[Stream(local=str(Path(data_dir, s))) for s in splits],
        batch_size=cfg.train.batch_size, shuffle=True, shuffle_seed=cfg.train.train_seed + 1)
    maker = inputs.batch_maker(seed=cfg.train.train_seed + 2,
                               history_dropout=cfg.train.history_dropout,
                               user_id_dropout=cfg.train.user_id_dropout)
    baselines: dict[str, float] = {}
    if evaluate:
        val_stream = InteractionStream(str(Path(data_dir, "val")),
                                       batch_size=cfg.train.batch_size)
        evaluator = Evaluator(data_dir, spec, maker, inputs.rows, cfg.train.eval_ks(), device)
        baselines = _prefixed_popularity(evaluator, inputs.positive_counts)
        baselines.update(_baseline_metrics(config.get("baselines") or {}))
    select = f"val_{cfg.train.select_metric}"
    patience = cfg.train.patience if evaluate else 0
    pipeline = None
    if on_gpu:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)

    bs = cfg.train.batch_size
    t_line = time.perf_counter()  # when rank 0 last printed a line
    for epoch in range(state["epoch"], cfg.train.epochs):
        if patience and state["epoch"] - state["best_epoch"] >= patience:
            break  # a resumed run that had already stopped early
        # -- train one epoch
        dmp.train()
        ids = _equal_share(train_stream.epoch_sample_ids(epoch=epoch), device)
        steps = (len(ids) + bs - 1) // bs
        maker.reseed(cfg.train.train_seed + 2 + epoch)  # sampled negatives: a function of the epoch
        batches = _prefetch(lambda i: maker(train_stream.gather(
            ids[i * bs:(i + 1) * bs], BATCH_COLUMNS), train=True), steps)
        if pipeline is not None:
            pipeline.reset()  # a fresh iterator each epoch
        t0 = t_last = time.perf_counter()
        seen_last, losses = 0, []
        for step in range(steps):
            if pipeline is not None:
                loss = pipeline.progress(batches)[0]
            else:
                loss = train_step(dmp, optimizer, next(batches).to(device))
            losses.append(float(loss.detach()))
            now = time.perf_counter()
            # a progress line every --log-every steps with --verbose, else when an epoch is
            # long enough to need one (60 s without a line)
            if rank == 0 and ((step + 1) % cfg.train.log_every == 0 or step + 1 == steps) \
                    and (verbose or now - t_line >= 60.0):
                rows = min((step + 1) * bs, len(ids)) - seen_last
                say(f"epoch {epoch + 1}/{cfg.train.epochs} step {step + 1}/{steps} "
                    f"loss {np.mean(losses[-cfg.train.log_every:]):.4f} "
                    f"{rows / max(now - t_last, 1e-9):,.0f} samples/s/worker")
                t_last = t_line = now
                seen_last += rows
        train_seconds = time.perf_counter() - t0
        if pipeline is not None:
            pipeline.detach()  # restore the sharded modules' own forward for evaluation

        # -- evaluate: val every epoch; test only for a new best epoch (the one exported)
        dmp.eval()
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                                   "train_rows": len(ids) * world,  # equal shares
                                   "train_samples_per_s_per_worker":
                                       len(ids) / max(train_seconds, 1e-9)}
        state["epoch"] = epoch + 1
        if evaluate:
            metrics.update(_validation_loss(dmp, val_stream, maker, bs, device,
                                            spec.objective))
            items = evaluator.item_embeddings(model)
            metrics.update(_prefixed("val", evaluator.ranking(model, "val", items)))
            # the exported epoch: the best so far with early stopping, else the last
            chosen = (_improved(state, metrics[select]) if patience
                      else epoch + 1 == cfg.train.epochs)
            if chosen:
                metrics.update(_prefixed("test", evaluator.ranking(model, "test", items)))
                state["best_epoch"], state["best_value"] = epoch + 1, metrics[select]
            metrics.update(baselines)
            line = _epoch_line(metrics, state["best_epoch"])
        else:
            state["best_epoch"] = epoch + 1
            line = (f"epoch {epoch + 1}/{cfg.train.epochs}: train_loss "
                    f"{metrics['train_loss']:.4f} "
                    f"{metrics['train_samples_per_s_per_worker']:,.0f} samples/s/worker")
        metrics["best_epoch"] = state["best_epoch"]
        state["history"].append(metrics)
        stop = bool(patience) and state["epoch"] - state["best_epoch"] >= patience
        if stop:
            line += (f"; early stop: no better {select} for {patience} epoch(s), the best "
                     f"epoch is {state['best_epoch']} ({select} {state['best_value']:.4f})")
        # Every epoch with --verbose; else a new best, every 5th, the last, and any epoch
        # after 60 s without a line (refit epochs have no validation: the 5th and the last)
        now = time.perf_counter()
        if verbose or stop or epoch + 1 == cfg.train.epochs or (epoch + 1) % 5 == 0 \
                or now - t_line >= 60.0 or (evaluate and state["best_epoch"] == epoch + 1):
            say(line)
            t_line = now
        state["stopped_early"] = stop

        # -- save (every rank its shards) and report
        with tempfile.TemporaryDirectory() as tmp:
            dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()},
                     checkpoint_id=tmp)
            if rank == 0:
                Path(tmp, STATE_FILE).write_text(json.dumps(state, indent=1))
                Path(tmp, PLAN_FILE).write_text(json.dumps(
                    {"world_size": world, "device": device.type, "rank_nodes": rank_nodes,
                     "tables": plan_rows(plan)},
                    indent=1))
                np.save(os.path.join(tmp, POPULARITY_FILE), inputs.positive_counts)
                Path(tmp, HISTORY_FILE).write_bytes(inputs.history.to_bytes())
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        if stop:
            break


def _prefixed_popularity(evaluator: Evaluator, positive_counts: np.ndarray
                         ) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in ("val", "test"):
        out.update(_prefixed(f"popularity_{split}", evaluator.popularity(split, positive_counts)))
    return out


def _epoch_line(m: dict[str, Any], best_epoch: int) -> str:
    """One line per epoch: losses, validation Recall@20 of the model and the baselines."""
    key = "recall@20" if "val_recall@20" in m else next(
        k[4:] for k in m if k.startswith("val_recall@"))
    base = ", ".join(f"{name} {m[f'{prefix}_val_{key}']:.4f}"
                     for name, prefix in (("popularity", "popularity"), ("EASE", "ease"))
                     if f"{prefix}_val_{key}" in m)
    return (f"epoch {m['epoch']}: train_loss {m['train_loss']:.4f} val_loss "
            f"{m['val_loss']:.4f} val {key} {m[f'val_{key}']:.4f} ({base})"
            + (f"; best epoch {best_epoch}" if best_epoch else ""))
