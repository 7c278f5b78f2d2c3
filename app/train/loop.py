"""The per-worker training loop: a plain function of its arguments, run by Ray Train.

Each worker: reads its partition of the training split (``InteractionStream``), builds the
two-tower model with tables on the meta device, lets TorchRec's planner shard the tables over
all ranks (:mod:`app.train.sharding`) and trains it with a fused row-wise Adagrad for the tables
and Adam for the dense layers. The recipe, :func:`train_loop`, reads as its steps:

    setup -> restore -> per epoch: run_epoch -> evaluate -> save_and_report
                                   (after the last: score_exported, inside save_and_report)

After every epoch it evaluates (validation loss, AUROC for ``bce``, full-catalog Recall/NDCG@K
on a fixed sample of the validation users beside the baselines on the same users:
:mod:`app.train.evaluate`); after the last, the exported epoch ranks every test user
once. Each epoch writes a sharded checkpoint
(``torch.distributed.checkpoint``: every rank writes its own shards, rank 0 the
:class:`~app.train.checkpoint.CheckpointState`) and calls ``ray.train.report``. Restarted after
a failure, it resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from app.core import logs
from app.core.config import Config
from app.core.publish import local_dir
from app.data.reader import InteractionStream
from app.train.batches import BatchMaker
from app.train.checkpoint import (
    CheckpointState,
    checkpoint_of_epoch,
    epoch_of,
    latest_checkpoint,
    load_sharded,
)
from app.train.evaluate import (
    Evaluator,
    baseline_metrics,
    epoch_line,
    exported_metrics,
    popularity_metrics,
    prefixed,
    validation_loss,
)
from app.train.inputs import TrainingInputs, epoch_batches, training_inputs
from app.train.model_folder import HISTORY_FILE, PLAN_FILE, POPULARITY_FILE
from app.train.sharding import build_sharded, plan_rows, plan_summary, train_step

LINE_SECONDS = 60.0  # a progress line at least this often, even without --verbose


@dataclass
class WorkerArgs:
    """What the driver hands every training worker (Ray Train's ``train_loop_config``, as a
    plain dict: :meth:`to_dict` / :meth:`from_dict`)."""

    config: dict[str, Any]                 # Config.to_dict() of the run
    data_dir: str                          # the prepared dataset version (path or URI)
    run_dir: Optional[str] = None          # the Ray Train run folder (its checkpoints)
    mlflow: Optional[dict[str, str]] = None  # {"tracking_uri", "run_id"} epochs are logged to
    splits: tuple[str, ...] = ("train",)   # the splits trained on (every split for a refit)
    evaluate: bool = True                  # evaluate each epoch on val/test (off for a refit)
    baselines: dict[str, Any] = field(default_factory=dict)  # driver-side baseline metrics
    warm: Any = None                       # ObjectRef of app.train.warm.payload (--init-from)

    def to_dict(self) -> dict[str, Any]:
        # shallow: the warm start travels as an object store reference, not a copy
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerArgs":
        return cls(**{**data, "splits": tuple(data.get("splits") or ("train",))})


@dataclass
class Worker:
    """One rank's training context, built once by :func:`setup`."""

    cfg: Config
    args: WorkerArgs
    data_dir: str                          # this node's copy of the dataset
    rank: int
    world: int
    device: torch.device
    inputs: TrainingInputs
    dmp: Any                               # DistributedModelParallel(TwoTowerTrainTask)
    optimizer: Any                         # fused table optimizer + Adam for the dense layers
    plan: Any                              # TorchRec's ShardingPlan
    rank_nodes: list[Any]                  # the Ray node of each rank (saved with the plan)
    say: Callable[[str], None]             # rank 0 prints, the others are silent
    verbose: bool
    last_line: float = 0.0                 # when rank 0 last printed a line

    @property
    def tag(self) -> str:
        return "train" if self.args.evaluate else "refit"

    def line_due(self, now: float) -> bool:
        return self.verbose or now - self.last_line >= LINE_SECONDS


@dataclass
class Loaders:
    """What an epoch reads: the training stream and batch maker, and for evaluation the
    validation stream, the evaluator and the baselines' fixed metrics."""

    train: InteractionStream
    maker: BatchMaker
    val: Optional[InteractionStream] = None
    evaluator: Optional[Evaluator] = None
    baselines: dict[str, float] = field(default_factory=dict)
    pipeline: Any = None                   # TorchRec's TrainPipelineSparseDist on a GPU

    def release(self) -> None:
        """Once every rank is done reading: the streams' shared memory and locks go
        (:meth:`~app.data.reader.InteractionStream.release`)."""
        for stream in (self.train, self.val):
            if stream is not None:
                stream.release()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function: setup -> restore -> per epoch: run_epoch -> evaluate ->
    save_and_report, until the last epoch or an early stop.

    Args:
        config: :meth:`WorkerArgs.to_dict` of the run.
    """
    w = setup(WorkerArgs.from_dict(config))
    state = restore(w)
    loaders = make_loaders(w)
    patience = w.cfg.train.patience if w.args.evaluate else 0
    for epoch in range(state.epoch, w.cfg.train.epochs):
        if patience and state.epoch - state.best_epoch >= patience:
            break  # a resumed run that had already stopped early
        metrics = run_epoch(w, loaders, epoch)
        state.epoch = epoch + 1
        line = evaluate(w, loaders, state, metrics) if w.args.evaluate \
            else refit_line(w, state, metrics)
        metrics["best_epoch"] = state.best_epoch
        state.history.append(metrics)
        state.stopped_early = bool(patience) and state.epoch - state.best_epoch >= patience
        report_line(w, state, line, patience)
        last = state.stopped_early or state.epoch == w.cfg.train.epochs
        save_and_report(w, state, metrics,
                        final=loaders if last and w.args.evaluate else None)
        if state.stopped_early:
            break
    dist.barrier()  # every rank has read its last batch
    loaders.release()


def setup(args: WorkerArgs) -> Worker:
    """This rank's context: the config, the dataset on this node, the training inputs and the
    sharded model with its optimizer (a collective call: every rank plans together)."""
    import logging

    import ray
    import ray.train

    # TorchRec, FBGEMM and streaming log every kernel load and default at INFO
    for name in ("", "torchrec", "fbgemm_gpu", "streaming"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = Config.from_dict(args.config)
    data_dir = str(local_dir(args.data_dir))  # on an object store: this node's copy
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tag = "train" if args.evaluate else "refit"
    torch.manual_seed(cfg.train.train_seed)
    inputs = training_inputs(cfg.model, data_dir, args.splits)
    dmp, optimizer, plan = build_sharded(cfg.train, inputs.spec, inputs.positive_counts,
                                         device=device,
                                         local_world_size=ctx.get_local_world_size(),
                                         lr_scale=cfg.train.warm_lr_scale
                                         if args.warm is not None else 1.0)
    rank_nodes: list[Any] = [None] * world
    dist.all_gather_object(rank_nodes, ray.get_runtime_context().get_node_id())
    return Worker(cfg=cfg, args=args, data_dir=data_dir, rank=rank, world=world, device=device,
                  inputs=inputs, dmp=dmp, optimizer=optimizer, plan=plan,
                  rank_nodes=rank_nodes, verbose=logs.level() == "verbose",
                  say=(lambda msg: logs.say(tag, msg)) if rank == 0 else (lambda msg: None),
                  last_line=time.perf_counter())


def restore(w: Worker) -> CheckpointState:
    """The state to continue from: the latest checkpoint's (model and optimizer loaded into
    this rank's shards), or a fresh one.

    After a failure Ray Train hands back the latest checkpoint it registered. A worker that
    dies right after an epoch's checkpoint is written, or an interrupt, can take the report
    with it, so the run folder is read too (it holds only this run's, or --resume's) and the
    later complete checkpoint of the two wins.
    """
    import ray.train
    from ray.train import Checkpoint

    restored = ray.train.get_checkpoint()
    found = latest_checkpoint(w.args.run_dir) if w.args.run_dir else None
    if found is not None and (restored is None or epoch_of(restored) < epoch_of(found)):
        restored = Checkpoint(found.path, filesystem=found.fs)
    if restored is None:
        if w.args.warm is not None:
            warm_start(w)
        if w.verbose:
            w.say(f"sharding plan ({w.world} rank(s), {w.device.type}):\n{w.plan}")
        elif w.args.evaluate:  # (a refit's plan is the evaluated run's)
            w.say(f"sharding ({w.world} rank(s), {w.device.type}): {plan_summary(w.plan)}")
        return CheckpointState()
    with restored.as_directory() as d:
        sd = {"model": w.dmp.state_dict(), "optim": w.optimizer.state_dict()}
        load_sharded(sd, d)  # nothing but checkpoint data is unpickled
        w.dmp.load_state_dict(sd["model"])
        w.optimizer.load_state_dict(sd["optim"])
        state = CheckpointState.read(d)
    state.resumed_at_epochs.append(state.epoch)
    w.say(f"resumed from the checkpoint after epoch {state.epoch}")
    return state


def warm_start(w: Worker) -> None:
    """A fresh run with --init-from: this rank's shards of every table take the model's rows
    of the same ids, the dense layers the model's (:mod:`app.train.warm`)."""
    import ray

    from app.train.warm import apply_warm_start

    t0 = time.perf_counter()
    apply_warm_start(w.dmp, ray.get(w.args.warm))
    if w.verbose:
        w.say(f"warm start applied to this rank's shards; {time.perf_counter() - t0:.1f}s")


def make_loaders(w: Worker) -> Loaders:
    """The streams an epoch reads, and (when evaluating) the evaluator and the baselines'
    metrics, which do not change between epochs."""
    from app.data.reader import Stream

    t = w.cfg.train
    loaders = Loaders(
        train=InteractionStream(streams=[Stream(local=str(Path(w.data_dir, s)))
                                         for s in w.args.splits],
                                batch_size=t.batch_size, shuffle=True,
                                shuffle_seed=t.train_seed + 1),
        maker=w.inputs.batch_maker(seed=t.train_seed + 2, history_dropout=t.history_dropout,
                                   user_id_dropout=t.user_id_dropout))
    if w.args.evaluate:
        loaders.val = InteractionStream(str(Path(w.data_dir, "val")), batch_size=t.batch_size)
        loaders.evaluator = Evaluator(w.data_dir, w.inputs.spec, loaders.maker, w.inputs.rows,
                                      t.eval_ks(), w.device,
                                      val_sample_users=t.val_sample_users)
        loaders.baselines = popularity_metrics(loaders.evaluator, w.inputs.positive_counts)
        loaders.baselines.update(baseline_metrics(w.args.baselines))
    if w.device.type == "cuda":
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        loaders.pipeline = TrainPipelineSparseDist(w.dmp, w.optimizer, w.device,
                                                   execute_all_batches=True)
    return loaders


def run_epoch(w: Worker, loaders: Loaders, epoch: int) -> dict[str, Any]:
    """Train one epoch on this rank's equal share; returns the epoch's training metrics."""
    bs, t = w.cfg.train.batch_size, w.cfg.train
    w.dmp.train()
    loaders.maker.reseed(t.train_seed + 2 + epoch)  # sampled negatives: a function of the epoch
    share, steps, batches = epoch_batches(loaders.train, loaders.maker, epoch, w.device, bs)
    if loaders.pipeline is not None:
        loaders.pipeline.reset()  # a fresh iterator each epoch
    t0 = t_last = time.perf_counter()
    seen_last, losses = 0, []
    for step in range(steps):
        if loaders.pipeline is not None:
            loss = loaders.pipeline.progress(batches)[0]
        else:
            loss = train_step(w.dmp, w.optimizer, next(batches).to(w.device))
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        # a progress line every --log-every steps with --verbose, else when an epoch is long
        # enough to need one
        if w.rank == 0 and ((step + 1) % t.log_every == 0 or step + 1 == steps) \
                and w.line_due(now):
            rows = share.rows_in(step + 1) - seen_last
            w.say(f"epoch {epoch + 1}/{t.epochs} step {step + 1}/{steps} "
                  f"loss {np.mean(losses[-t.log_every:]):.4f} "
                  f"{rows / max(now - t_last, 1e-9):,.0f} samples/s/worker")
            t_last = w.last_line = now
            seen_last += rows
    seconds = time.perf_counter() - t0
    if loaders.pipeline is not None:
        loaders.pipeline.detach()  # restore the sharded modules' own forward for evaluation
    return {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
            "train_rows": share.total_rows,
            "train_samples_per_s_per_worker": share.rows / max(seconds, 1e-9)}


def evaluate(w: Worker, loaders: Loaders, state: CheckpointState,
             metrics: dict[str, Any]) -> str:
    """Validation every epoch, ranked for the validation sample (the same users every epoch);
    picks the epoch to export (the best so far with early stopping, else the last). The test
    split waits for :func:`score_exported`. Adds to ``metrics``; returns the epoch's line."""
    assert loaders.evaluator is not None and loaders.val is not None
    t, t0 = w.cfg.train, time.perf_counter()
    select = f"val_{t.select_metric}"
    w.dmp.eval()
    ev = loaders.evaluator
    # the loss too is over the sample's rows: at 1M rows it costs more than the ranking
    metrics.update(validation_loss(w.dmp, loaders.val, loaders.maker, t.batch_size, w.device,
                                   w.inputs.spec.objective,
                                   users=ev.sample if ev.sampled else None))
    model = w.dmp.module.model
    t_rank = time.perf_counter()
    items = ev.item_embeddings(model)
    metrics.update(prefixed("val", ev.ranking(model, "val", items, sample=True)))
    metrics["ranking_seconds"] = time.perf_counter() - t_rank
    chosen = state.improved(metrics[select], t.min_improvement) if t.patience \
        else state.epoch == t.epochs
    if chosen:
        state.best_epoch, state.best_value = state.epoch, metrics[select]
    metrics.update(loaders.baselines)
    metrics["eval_seconds"] = time.perf_counter() - t0  # the epoch's evaluation, on rank 0
    return epoch_line(metrics, state.best_epoch)


def score_exported(w: Worker, loaders: Loaders, state: CheckpointState) -> dict[str, float]:
    """After the last epoch: the exported epoch on every test user, once.

    Its weights are loaded from its checkpoint when it is an earlier epoch (this epoch's are
    saved already). The figures join its history entry, where ``metrics.json`` reads them,
    and are returned for this epoch's report (MLflow)."""
    assert loaders.evaluator is not None
    t0 = time.perf_counter()
    if state.best_epoch != state.epoch:
        load_epoch_weights(w, state.best_epoch)
    w.dmp.eval()
    evaluator = loaders.evaluator
    evaluator.timing = dict.fromkeys(evaluator.timing, 0.0)
    t1 = time.perf_counter()
    out = exported_metrics(evaluator, w.dmp.module.model)
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    best.update(out)
    ks = w.cfg.train.eval_ks()
    key = f"recall@{20 if 20 in ks else max(ks)}"
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in
                      {"weights": t1 - t0, **evaluator.timing}.items())
    w.say(f"epoch {state.best_epoch} (exported): test {key} {best[f'test_{key}']:.4f} on "
          f"every user ({best['test_users']:,}), val {key} {best[f'val_{key}']:.4f} on "
          f"{best['val_users']:,} ({parts}); {time.perf_counter() - t0:.2f}s")
    return out


def load_epoch_weights(w: Worker, epoch: int) -> None:
    """Load an earlier epoch's model weights (not its optimizer) into this rank's shards
    from that epoch's checkpoint under the run folder (a collective call)."""
    from ray.train import Checkpoint

    found = checkpoint_of_epoch(w.args.run_dir, epoch) if w.args.run_dir else None
    if found is None:
        raise RuntimeError(f"the checkpoint of epoch {epoch} is not under {w.args.run_dir}")
    with Checkpoint(found.path, filesystem=found.fs).as_directory() as d:
        sd = {"model": w.dmp.state_dict()}
        load_sharded(sd, d)  # nothing but checkpoint data is unpickled
        w.dmp.load_state_dict(sd["model"])


def refit_line(w: Worker, state: CheckpointState, metrics: dict[str, Any]) -> str:
    """A refit exports its last epoch; its line has no validation."""
    state.best_epoch = state.epoch
    return (f"epoch {state.epoch}/{w.cfg.train.epochs}: train_loss {metrics['train_loss']:.4f} "
            f"{metrics['train_samples_per_s_per_worker']:,.0f} samples/s/worker")


def report_line(w: Worker, state: CheckpointState, line: str, patience: int) -> None:
    """Print the epoch's line: every epoch with --verbose; else a new best, every 5th, the
    last, an early stop, and any epoch after a minute without a line."""
    select = f"val_{w.cfg.train.select_metric}"
    if state.stopped_early:
        line += (f"; early stop: no better {select} for {patience} epoch(s), the best "
                 f"epoch is {state.best_epoch} ({select} {state.best_value:.4f})")
    now = time.perf_counter()
    if state.stopped_early or state.epoch == w.cfg.train.epochs or state.epoch % 5 == 0 \
            or w.line_due(now) or (w.args.evaluate and state.best_epoch == state.epoch):
        w.say(line)
        w.last_line = now


def save_and_report(w: Worker, state: CheckpointState, metrics: dict[str, Any],
                    final: Optional[Loaders] = None) -> None:
    """Every rank saves its shards, rank 0 the state, the plan and the inputs the model folder
    needs; then one ``ray.train.report`` per rank with the checkpoint.

    Args:
        final: after the last epoch, the evaluation's loaders: the exported epoch ranks
            every test user (:func:`score_exported`) between this epoch's shards and its
            state, so the state holds the figures while the shards stay this epoch's.
    """
    import json

    import ray.train
    from ray.train import Checkpoint
    from torch.distributed import checkpoint as dcp

    with tempfile.TemporaryDirectory() as tmp:
        dcp.save({"model": w.dmp.state_dict(), "optim": w.optimizer.state_dict()},
                 checkpoint_id=tmp)
        exported = score_exported(w, final, state) if final is not None else {}
        if w.rank == 0:
            state.write(tmp)
            Path(tmp, PLAN_FILE).write_text(json.dumps(
                {"world_size": w.world, "device": w.device.type, "rank_nodes": w.rank_nodes,
                 "tables": plan_rows(w.plan)}, indent=1))
            np.save(os.path.join(tmp, POPULARITY_FILE), w.inputs.positive_counts)
            Path(tmp, HISTORY_FILE).write_bytes(w.inputs.history.to_bytes())
        ray.train.report({**metrics, **exported}, checkpoint=Checkpoint.from_directory(tmp))
