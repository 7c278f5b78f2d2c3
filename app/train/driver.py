"""The training driver: a ``TorchTrainer`` over :func:`app.train.loop.train_loop`, then the
model folder and the MLflow run.

``train(cfg, data_dir, output)``:

1. checks the dataset and that the cluster can place the topology's workers (fails at once
   with what is missing, instead of waiting for resources);
2. runs the workers under Ray Train with a ``FailureConfig`` (a failed worker group restarts
   from the latest epoch checkpoint); ``--resume`` continues a stopped run of the same output;
3. consolidates the last sharded checkpoint into plain weights (one process, no TorchRec
   runtime) and publishes the model folder atomically (see :mod:`app.train.model_folder`);
4. logs the folder to MLflow and registers the pyfunc model.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from app.core import logs
from app.core.config import Config
from app.core.errors import TrainError  # noqa: F401  (raised here, importable from here)
from app.core.memory import release_freed
from app.core.preflight import check_train
from app.core.publish import (
    Lease,
    check_writable,
    current,
    local_dir,
    version_of,
    version_uri,
    writer,
)
from app.core.redact import redact_values
from app.core.storage import Location, local_copy, ray_storage, resolve
from app.data.dataset import SPLITS, DatasetError, Manifest, read_manifest
from app.train import registry
from app.train.baselines import describe as describe_baseline
from app.train.baselines import driver_baselines
from app.train.callbacks import EpochMetricsToMlflow
from app.train.checkpoint import CheckpointState, checkpoint_of_epoch, latest_checkpoint
from app.train.evaluate import calibrate, final_metrics
from app.train.inputs import item_features, model_spec
from app.train.loop import WorkerArgs, train_loop
from app.train.model_folder import MLFLOW_FILE, MODEL_JSON
from app.train.placement import placement, wait_for_placement
from app.train.registry import RegisteredModel
from app.train.sharding import check_requested_budget


@dataclass
class TrainResult:
    """What a training run produced (:func:`train`'s return value)."""

    model_dir: str                  # the published version of the model folder
    metrics: dict[str, Any]         # the folder's metrics.json (see final_metrics)
    history: list[dict[str, Any]]   # one entry per epoch: train_loss, val_*, test_*, baselines
    mlflow: RegisteredModel         # the MLflow run and the registered version
    checkpoint: str                 # the run's last checkpoint (path or URI)
    seconds: float
    placement: str                  # where the workers ran, in words
    refit: bool
    training_rows: int              # rows of one epoch


def run_name(output: Any) -> str:
    """A stable Ray Train run name per output folder (so ``--resume`` finds its checkpoints):
    ``output`` is a path, URI or :class:`~app.core.storage.Location`."""
    loc = resolve(output)
    digest = hashlib.sha1(loc.uri.encode()).hexdigest()[:8]
    return f"train-{re.sub(r'[^A-Za-z0-9_.-]', '_', loc.name)}-{digest}"


def consolidate(checkpoint_dir: Path) -> dict[str, Any]:
    """The model part of a sharded checkpoint as full tensors, in this process (read without
    unpickling anything but checkpoint data: :mod:`app.train.checkpoint`)."""
    from app.train.checkpoint import load_full

    return load_full(checkpoint_dir)["model"]


def _trainer_class() -> type:
    """``TorchTrainer`` whose interrupts are the caller's: Ray Train's own SIGINT handler
    (it aborts the run, then exits the whole process with status 0) is not installed; the
    driver's handler raises instead and :meth:`abort` stops the run's workers."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        _controller = None

        def _register_sigint_handler(self, controller: Any) -> None:
            self._controller = controller

        def abort(self, timeout: float = 60.0) -> None:
            """Stop the workers of a run in progress (nothing when none is)."""
            import ray

            if self._controller is not None:
                try:
                    ray.get(self._controller.abort.remote(), timeout=timeout)
                except Exception:  # noqa: BLE001 (the run ended, or its controller did)
                    pass

    return Trainer


def make_trainer(cfg: Config, data_dir: str, *, name: str, storage: Any,
                 mlflow_info: Optional[dict[str, str]] = None,
                 callbacks: Optional[list] = None, refit: bool = False,
                 baselines: Optional[dict[str, Any]] = None, warm: Any = None) -> Any:
    """The ``TorchTrainer`` of one training run (also what every tuning trial fits).

    Args:
        cfg: the resolved configuration.
        data_dir: the prepared dataset version (a path or URI every worker can read).
        name, storage: the Ray Train run name and storage path or URI (checkpoints).
        mlflow_info: ``{"tracking_uri", "run_id"}`` of the run rank 0 logs epochs to.
        callbacks: Ray Train ``UserCallback``s (Tune's report callback in a sweep).
        refit: train on every split, without evaluation.
        baselines: driver-side baseline metrics the workers report beside the model's.
        warm: an object store reference to a warm start (:func:`app.train.warm.payload`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from app.train.rendezvous import torch_config

    place = placement(cfg.train)
    storage = resolve(storage)
    storage_path, storage_fs = ray_storage(storage)
    return _trainer_class()(
        train_loop,
        train_loop_config=WorkerArgs(
            config=cfg.to_dict(), data_dir=data_dir, mlflow=mlflow_info,
            run_dir=storage.join(name).uri, splits=tuple(SPLITS) if refit else ("train",),
            evaluate=not refit, baselines=baselines or {}, warm=warm).to_dict(),
        scaling_config=place.scaling_config(),
        torch_config=torch_config(place.backend),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             # the best epoch is at most `patience` epochs back
                             checkpoint_config=CheckpointConfig(num_to_keep=max(
                                 cfg.train.keep_checkpoints, cfg.train.patience + 1)),
                             callbacks=[*(callbacks or []),
                                        *([EpochMetricsToMlflow(**mlflow_info)]
                                          if mlflow_info else [])]))


def _fit_and_export(cfg: Config, trainer: Any, data_dir: str, lease: Lease, *, spec: Any,
                    manifest: Manifest, run_dir: Location, refit: bool,
                    baselines: dict[str, Any], data_root: str, data_version: Optional[str],
                    register: Any, say: Any, init_from: Optional[str] = None
                    ) -> tuple[CheckpointState, Location, dict[str, Any], RegisteredModel]:
    """Fit, then publish the best epoch's model folder as a new version of the output;
    returns (state, checkpoint, metrics, registered). Nothing is published or registered when
    the dataset was replaced while training (see :mod:`app.core.publish`)."""
    from app.train.export import export_state_dict
    from app.train.model_folder import write_model_folder

    try:
        result = trainer.fit()
    except Exception as e:
        where = ("" if logs.level() == "verbose"
                 else f" (the workers' full output: {logs.log_dir()})")
        raise TrainError(f"training failed: {e}{where}") from e
    if result.checkpoint is None:
        raise TrainError("training finished without a checkpoint")
    ckpt = run_dir.join(posixpath.basename(result.checkpoint.path.rstrip("/")))
    state = CheckpointState.read(ckpt)
    if state.epoch != cfg.train.epochs and not state.stopped_early:
        raise TrainError(f"training stopped after {state.epoch} of {cfg.train.epochs} "
                         f"epochs; --resume continues it from {ckpt}")
    best_epoch = state.best_epoch
    best_ckpt = checkpoint_of_epoch(run_dir, best_epoch) if best_epoch != state.epoch \
        else ckpt
    if best_ckpt is None:
        raise TrainError(f"the checkpoint of the best epoch ({best_epoch}) is not under "
                         f"{run_dir}")
    if best_epoch != state.epoch and not state.stopped_early:
        # (after an early stop the workers' last line named the best epoch already)
        say(f"exporting epoch {best_epoch}, the best on validation, of {state.epoch}")
    metrics = (final_metrics(state.history, best_epoch, baselines) if not refit
               else {"epochs": state.epoch, "best_epoch": best_epoch, "refit": True,
                     "train_loss": state.history[-1]["train_loss"]})
    metrics["resumed_at_epochs"] = state.resumed_at_epochs
    if init_from is not None:
        metrics["init_from"] = init_from
    with lease.staged() as tmp:
        best_local = local_copy(best_ckpt)  # on an object store: a copy in this node's cache
        weights = export_state_dict(consolidate(best_local))
        if best_ckpt.remote:
            shutil.rmtree(best_local, ignore_errors=True)
        write_model_folder(tmp, weights=weights, data_dir=data_dir, checkpoint=ckpt, spec=spec,
                           manifest=manifest, config=cfg, metrics=metrics,
                           history=state.history,
                           calibrate=lambda folder: calibrate(folder, data_dir, spec.objective))
        release_freed()  # calibration's model and pairs, before MLflow loads the model again
        now = version_of(data_root)
        if now != data_version:
            raise TrainError(f"{data_root} was replaced while training (version {data_version} "
                             f"-> {now}); the model was not published: train again on the "
                             f"new version")
        registered = register(tmp)  # from the staged folder, so MLflow gets exactly this
    return state, ckpt, metrics, registered


def train(cfg: Config, data_dir: str, output: str, *, verbose: bool = True,
          refit: bool = False, tags: Optional[dict[str, str]] = None) -> TrainResult:
    """Train on a prepared dataset and write the model folder ``output``.

    Args:
        cfg: the resolved configuration (``cfg.train.resume`` continues a stopped run).
        data_dir: a prepared dataset folder.
        output: the model folder; each run publishes a new version of it (see
            :mod:`app.core.publish`; one writer at a time).
        verbose: print progress.
        refit: train on every split (train + val + test) for exactly ``cfg.train.epochs``
            epochs, without evaluation: the model to serve after an evaluated run chose the
            settings and the number of epochs.
        tags: extra MLflow run tags.

    Returns:
        What the run produced: the model folder, its metrics, the MLflow run and version.
    """
    tag = "refit" if refit else "train"
    check_train(cfg.cluster, data_dir, output)  # before the lease, the dataset and Ray
    out = resolve(output)
    check_writable(out, "model folder", MODEL_JSON)
    with logs.stage(tag), writer(out, tag, timeout=cfg.cluster.lease_timeout,
                                 say=lambda msg: logs.say(tag, msg)) as lease:
        return _train(cfg, data_dir, lease, verbose=verbose, refit=refit, tags=tags)


@dataclass
class RunInputs:
    """One training run's checked inputs: one version of the dataset throughout (publishing
    checks it is still the current one; the workers read ``data_uri``, on an object store each
    node its own copy, the driver ``data_dir``, that version's local folder), the model's shape
    and the workers' placement."""

    data_version: Optional[str]
    data_uri: str
    data_dir: str
    manifest: Manifest
    spec: Any                              # ModelSpec
    place: Any                             # Placement


def _train(cfg: Config, data_root: str, lease: Lease, *, verbose: bool, refit: bool,
           tags: Optional[dict[str, str]]) -> TrainResult:
    """check inputs -> baselines -> run folder -> MLflow run -> fit and export -> result."""
    from app.core import tracking

    tag = "refit" if refit else "train"
    say = (lambda msg: logs.say(tag, msg)) if verbose else (lambda msg: None)
    t0 = time.perf_counter()
    run = check_inputs(cfg, data_root, refit=refit, say=say)
    baselines: dict[str, Any] = {}
    if not refit:
        baselines = driver_baselines(cfg.train, run.data_dir, run.spec.num_users, run.spec.num_items)
        for key, result in baselines.items():
            say(describe_baseline(key, result))
    warm = warm_ref = None
    if cfg.train.init_from:
        import ray

        from app.train.warm import payload, warm_start_from

        warm = warm_start_from(cfg.train.init_from, cfg.cluster, run.spec, run.data_dir,
                               say=say, lr_scale=cfg.train.warm_lr_scale)
        warm_ref = ray.put(payload(warm))
    lineage = {"init_from": warm.label} if warm is not None else {}
    storage, name = run_folder(cfg, lease.out, refit=refit, say=say)
    run_id = tracking.start_run(
        cfg, run_name=tracking.run_label(tag, cfg, run.manifest.source.get("dataset")),
        tags={"stage": tag, "dataset": run.data_uri, "output": str(lease.out),
              "refit": str(refit).lower(), **lineage, **(tags or {})})
    mlflow_info = {"tracking_uri": tracking.tracking_uri(cfg.cluster), "run_id": run_id}
    # the workers start from the latest checkpoint in the run folder: --resume keeps it
    trainer = make_trainer(cfg, run.data_uri, name=name, storage=storage,
                           mlflow_info=mlflow_info, refit=refit, baselines=baselines,
                           warm=warm_ref)

    def register(folder: Path) -> RegisteredModel:
        registered = registry.log_trained_model(cfg.cluster, run_id, folder,
                                                run.manifest.vocab.to_dict(),
                                                version_tags=lineage)
        (folder / MLFLOW_FILE).write_text(json.dumps(  # no credentials saved
            redact_values({**registered.to_dict(), **mlflow_info}), indent=2) + "\n")
        return registered

    try:
        state, ckpt, metrics, registered = _fit_and_export(
            cfg, trainer, run.data_dir, lease, spec=run.spec, manifest=run.manifest,
            run_dir=storage.join(name), refit=refit, baselines=baselines, data_root=data_root,
            data_version=run.data_version, register=register, say=say,
            init_from=warm.label if warm is not None else None)
    except BaseException as e:
        killed = isinstance(e, KeyboardInterrupt)  # SIGINT or SIGTERM (app.core.logs)
        if killed:
            trainer.abort()
        tracking.end_run(cfg.cluster, run_id, status="KILLED" if killed else "FAILED")
        raise
    tracking.end_run(cfg.cluster, run_id)
    seconds = round(time.perf_counter() - t0, 1)
    say(f"model folder {current(lease.out)}; MLflow run {run_id}, registered "
        f"{registered.registered_uri}; {seconds}s")
    return TrainResult(model_dir=str(current(lease.out)), metrics=metrics,
                       history=state.history, mlflow=registered, checkpoint=ckpt.uri,
                       seconds=seconds, placement=run.place.describe(), refit=refit,
                       training_rows=sum(run.manifest.counts.splits[s] for s in
                                         (SPLITS if refit else ("train",))))


def check_inputs(cfg: Config, data_root: str, *, refit: bool,
                 say: Callable[[str], None]) -> RunInputs:
    """The dataset version (every split non-empty), the model's shape, Ray, and workers the
    cluster can place (fails at once with what is missing); one line says what will run."""
    from app.core.cluster import init_ray

    data_version, data_uri = version_of(data_root), version_uri(data_root)
    data_dir = str(local_dir(data_uri))
    manifest = read_manifest(data_dir)
    for split in SPLITS:
        if manifest.counts.splits[split] == 0:
            raise DatasetError(f"{data_dir}: the {split} split is empty; training needs rows "
                               f"in train, val and test")
    spec = model_spec(cfg.model, manifest, item_features(cfg.model, data_dir))
    check_requested_budget(cfg.train, spec, placement(cfg.train))  # before Ray starts
    init_ray(cfg.cluster)
    place = placement(cfg.train)
    tag = "refit" if refit else "train"
    wait_for_placement(place, cfg.cluster.autoscale_timeout, say=lambda m: logs.say(tag, m))
    if refit:  # the same model as the evaluated run's: one line of what differs
        say(f"placement {place.describe()}; every split, {cfg.train.epochs} epoch(s)")
    else:
        say(f"placement {place.describe()}; model: {spec.num_users - 1:,} users, "
            f"{spec.num_items - 1:,} items, dim {spec.embedding_dim}, towers "
            f"{list(spec.tower_layers)}, objective {spec.objective}"
            + (f" ({spec.negatives} negatives)" if spec.objective == "softmax" else "")
            + f", history {spec.history_length}, user id "
            + ("on" if spec.use_user_id else "off"))
    return RunInputs(data_version, data_uri, data_dir, manifest, spec, place)


def run_folder(cfg: Config, out: Location, *, refit: bool,
               say: Callable[[str], None]) -> tuple[Location, str]:
    """The Ray Train storage and run name of this output's checkpoints: kept with --resume
    (which needs one), else emptied. Returns (storage, name)."""
    storage = resolve(cfg.cluster.storage_path
                      or f"{str(cfg.cluster.workdir).rstrip('/')}/checkpoints")
    name = run_name(out) + ("-refit" if refit else "")
    run_dir = storage.join(name)
    if cfg.train.resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise TrainError(f"--resume: no checkpoint of this output under {run_dir}")
        say(f"resuming after epoch {CheckpointState.read(resume_from).epoch} from "
            f"{resume_from}")
    else:
        run_dir.delete()
    return storage, name
