"""Hyperparameter sweeps with Ray Tune over the distributed trainer.

Every trial is a Tune function that builds the same ``TorchTrainer`` as ``pipelines.train``
(:func:`app.train.driver.make_trainer`) with the trial's settings and fits it, so each trial is a
sharded, distributed training run with its own workers. Ray Train's ``TuneReportCallback``
forwards every epoch's metrics to Tune, where ASHA stops weak trials early and a search
algorithm (Optuna's TPE, or random sampling) proposes the next ones. MLflow gets a parent run
for the sweep and a child run per trial. The output folder receives the results table, the
best configuration (``best_config.yaml``, which ``pipelines.train --config`` takes as is) and a
plot of the metric against the embedding dimension.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from app.core import logs
from app.core.config import Config, ConfigError
from app.core.publish import version_uri, write_success
from app.core.redact import redact_values
from app.core.storage import FileSum, Location
from app.train.placement import Placement, ResourceError, check_resources, cluster_nodes, placement

EXPERIMENT = "sweep"


@dataclass
class Trial:
    """One trial of a sweep, as its results table shows it."""

    trial: str  # Tune's trial id
    metric: Optional[float]  # the tuned metric at the last reported epoch (None: never reported)
    epochs: int  # epochs it ran
    status: str  # "completed", "stopped early" (by the scheduler) or "error"
    params: dict[str, Any]  # the settings the sweep chose for it
    params_all: dict[str, Any]  # every model and train setting it ran with

    def summary(self) -> dict[str, Any]:
        """The row as ``results.json`` holds it (without ``params_all``)."""
        return {"trial": self.trial, "metric": self.metric, "epochs": self.epochs,
                "status": self.status, "params": self.params}


@dataclass
class SweepResult:
    """What :func:`sweep` found, and where it wrote it."""

    rows: list[Trial]  # every trial, best first
    best: Trial  # the best trial that completed or was stopped early
    best_config: str  # path or URI of best_config.yaml (``pipelines.train --config`` takes it)
    plot: str  # path or URI of metric_by_embedding_dim.png
    parent_run_id: str  # the sweep's MLflow run (each trial's run is its child)
    seconds: float  # wall time of the sweep


def tune_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The config's search space (setting -> {sampler: args}) as Ray Tune domains."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, spec in space.items():
        kind, args = next(iter(spec.items()))
        out[name] = {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
                     "uniform": lambda a: tune.uniform(*a),
                     "loguniform": lambda a: tune.loguniform(*a),
                     "randint": lambda a: tune.randint(*a)}[kind](args)
    return out


def trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The base configuration (:meth:`Config.to_dict`) with a trial's settings applied
    (validated)."""
    return Config.from_dict(base, overrides)


def check_sweep_fits(cfg: Config, nodes: list[dict[str, float]]) -> Placement:
    """Fail at once when ``max_concurrent`` trials of the topology's workers cannot be placed.

    Raises:
        ResourceError: naming the trials, the workers per trial, and what the cluster has.
    """
    one = placement(cfg.train)
    check_resources(one, nodes)
    together = Placement(one.topology, one.num_workers * cfg.tune.max_concurrent, one.use_gpu,
                         one.resources_per_worker,
                         "PACK" if one.strategy == "STRICT_PACK" else one.strategy)
    try:
        check_resources(together, nodes)
    except ResourceError as e:
        raise ResourceError(f"--max-concurrent {cfg.tune.max_concurrent} trials x "
                            f"{one.num_workers} worker(s) each do not fit: {e}") from None
    return one


def run_trial(config: dict[str, Any], credentials: Optional[dict[str, str]] = None) -> None:
    """Tune function: one distributed training run with the trial's settings (``credentials``:
    the settings Tune's saved trial configs hold masked, see :meth:`Config.credentials`)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from app.core import tracking
    from app.train.driver import make_trainer

    cfg = trial_config(config["base"], {**config["params"], **(credentials or {})})
    ctx = ray.tune.get_context()
    run_id = tracking.start_run(cfg, run_name=f"{tracking.run_label('trial', cfg)} "
                                               f"{ctx.get_trial_name()}",
                                tags={"stage": "tune-trial", "trial_id": ctx.get_trial_id()},
                                parent_run_id=config["parent_run_id"])
    trainer = make_trainer(cfg, config["data_dir"], name=f"trial-{ctx.get_trial_id()}",
                           storage=config["storage"],
                           mlflow_info={"tracking_uri": tracking.tracking_uri(cfg.cluster),
                                        "run_id": run_id},
                           callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except Exception:
        tracking.end_run(cfg.cluster, run_id, status="FAILED")
        raise
    tracking.end_run(cfg.cluster, run_id)


def _searcher(cfg: Config, metric: str) -> Optional[Any]:
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode="max", seed=cfg.tune.tune_seed)
    return None  # Tune's own random / grid variant generator


def _scheduler(cfg: Config, metric: str) -> Optional[Any]:
    if cfg.tune.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(metric=metric, mode="max", max_t=cfg.train.epochs,
                             grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                             reduction_factor=cfg.tune.reduction_factor,
                             time_attr="epoch")
    return None


def results_table(rows: list[Trial], metric: str) -> str:
    """One line per trial, best first; trials stopped by the scheduler are marked."""
    params = sorted({k for r in rows for k in r.params})
    head = f"{'trial':<14}{metric:>16}{'epochs':>8}  {'status':<14}" + "".join(
        f"{p:>16}" for p in params)
    lines = [head, "-" * len(head)]
    for r in rows:
        value = r.metric
        shown = f"{value:.4f}" if value is not None else "-"
        cells = "".join(f"{_short(r.params.get(p)):>16}" for p in params)
        lines.append(f"{r.trial:<14}{shown:>16}{r.epochs:>8}  {r.status:<14}{cells}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v) if v is not None else "-"


def plot_metric(rows: list[Trial], metric: str, path: Path) -> None:
    """The metric of each trial against its embedding dimension (stopped trials hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for stopped, style in ((False, "o"), (True, "x")):
        pts = [(r.params_all["embedding_dim"], r.metric) for r in rows
               if r.metric is not None and (r.status == "stopped early") == stopped]
        if pts:
            ax.scatter(*zip(*pts), marker=style,
                       label="stopped early" if stopped else "completed")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension")
    ax.set_ylabel(f"{metric} (last reported epoch)")
    ax.set_title("sweep: validation metric by embedding dimension")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class _Plan:
    """Where the trials run and what with: the output (Tune's experiment is under it), the
    MLflow parent run, and the parameter space of every trial."""

    out: Location  # the sweep's folder (or bucket prefix)
    resuming: bool  # continue the experiment there (``--resume``)
    parent_run_id: str
    base: dict[str, Any]  # the configuration every trial starts from
    param_space: dict[str, Any]

    @property
    def experiment(self) -> Location:
        return self.out.join(EXPERIMENT)


def _tune_storage(out: Location) -> tuple[str, str, Any]:
    """(the experiment's path, the storage path, their filesystem) as Tune takes them for a
    sweep into ``out``: bucket paths on an object store, with the filesystem of
    :mod:`app.core.storage` (Tune would not honour ``AWS_ENDPOINT_URL`` by itself)."""
    from app.core.storage import ray_storage

    storage_path, fs = ray_storage(out.uri)
    experiment = out.join(EXPERIMENT)
    return (experiment.path if out.remote else experiment.uri), storage_path, fs


def sweep(cfg: Config, data_dir: str, output: str, *, verbose: bool = True) -> SweepResult:
    """Run a sweep over ``cfg.tune.search_space`` and write its results to ``output``.

    ``cfg.train.resume`` continues an interrupted sweep of the same output folder.

    Returns:
        The trials (best first), the best one, and where its results were written.
    """
    from app.core.preflight import check_tune
    from app.core.publish import writer
    from app.core.storage import is_remote

    check_tune(cfg.cluster, data_dir, output)  # before the lease, the dataset and Ray
    target = output if is_remote(output) else Path(output).resolve()
    with logs.stage("tune"), writer(target, "tune", timeout=cfg.cluster.lease_timeout,
                                    say=lambda msg: logs.say("tune", msg)):
        return _sweep(cfg, data_dir, str(target), verbose=verbose)


def _sweep(cfg: Config, data_dir: str, output: str, *, verbose: bool) -> SweepResult:
    """The sweep as steps: check the cluster -> plan -> run the trials -> pick the best ->
    publish the results."""
    from app.core.cluster import init_ray
    from app.core.storage import resolve
    from app.data.dataset import read_manifest

    say = (lambda msg: logs.say("tune", msg)) if verbose else (lambda msg: None)
    t0 = time.perf_counter()
    read_manifest(data_dir)
    out = resolve(output)  # a folder or a URI (s3://...): Tune's experiment and the results
    if not out.remote:
        Path(out.path).mkdir(parents=True, exist_ok=True)
    init_ray(cfg.cluster)
    per_trial = check_sweep_fits(cfg, cluster_nodes())
    metric = cfg.tune.tune_metric
    say(f"sweep: {cfg.tune.num_samples} sample(s) over {sorted(cfg.tune.search_space)}; "
        f"{cfg.tune.max_concurrent} at once, each {per_trial.describe()}; search "
        f"{cfg.tune.search_alg}, scheduler {cfg.tune.scheduler}, maximising {metric}")
    plan = _plan(cfg, data_dir, out, say)
    rows = _trial_rows(_run_trials(cfg, plan), epochs=cfg.train.epochs, metric=metric)
    best = _pick_best(rows, metric, plan.experiment)
    table = results_table(rows, metric)
    _publish(cfg, out, rows, best, plan)
    seconds = round(time.perf_counter() - t0, 1)
    say(table)
    say(f"best: {metric} {best.metric:.4f} with {best.params}; config: "
        f"{out.join('best_config.yaml')}; {seconds}s")
    return SweepResult(rows=rows, best=best, best_config=out.join("best_config.yaml").uri,
                       plot=out.join("metric_by_embedding_dim.png").uri,
                       parent_run_id=plan.parent_run_id, seconds=seconds)


def _plan(cfg: Config, data_dir: str, out: Location, say: Any) -> _Plan:
    """The search: a new MLflow parent run (or, resuming, the interrupted sweep's), and the
    parameter space every trial gets (the base configuration, its settings, the data)."""
    from ray import tune

    from app.core import tracking

    state = out.join("sweep_state.json")
    experiment, _, fs = _tune_storage(out)
    resuming = cfg.train.resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    if cfg.train.resume and not resuming:
        raise ConfigError(f"--resume: no sweep to continue under {out.join(EXPERIMENT)}")
    if resuming:
        parent_run_id = json.loads(state.read_text())["parent_run_id"]
        say(f"continuing the sweep in {out.join(EXPERIMENT)}")
    else:
        parent_run_id = tracking.start_run(cfg, run_name=tracking.run_label("sweep", cfg),
                                           tags={"stage": "tune"})
        state.write_text(json.dumps({"parent_run_id": parent_run_id}) + "\n")
    base = cfg.to_dict()
    base["train"]["resume"] = False  # trials start from scratch
    param_space = {"params": tune_space(cfg.tune.search_space), "base": redact_values(base),
                   "data_dir": version_uri(data_dir), "storage": out.join("trials").uri,
                   "parent_run_id": parent_run_id}
    return _Plan(out, resuming, parent_run_id, base, param_space)


def _run_trials(cfg: Config, plan: _Plan) -> Any:
    """Fit every trial (or the rest of an interrupted sweep's); Tune's ResultGrid."""
    from ray import tune

    # the trial function only drives its trainer; the training workers hold the CPUs/GPUs.
    # (A zero request is refused by Tune, hence a token byte of memory.)
    # Tune saves the param space with the experiment: credentials travel beside it, in memory
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, credentials=cfg.credentials()), {"CPU": 0, "memory": 1})
    experiment, storage_path, fs = _tune_storage(plan.out)
    if plan.resuming:
        return tune.Tuner.restore(experiment, trainable=trainable, param_space=plan.param_space,
                                  resume_errored=True, storage_filesystem=fs).fit()
    metric = cfg.tune.tune_metric
    # a search algorithm or scheduler takes the metric itself; Tune must not get it twice
    named = cfg.tune.search_alg == "optuna" or cfg.tune.scheduler == "asha"
    return tune.Tuner(
        trainable, param_space=plan.param_space,
        tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent,
                                    search_alg=_searcher(cfg, metric),
                                    scheduler=_scheduler(cfg, metric),
                                    metric=None if named else metric,
                                    mode=None if named else "max"),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_path,
                                  storage_filesystem=fs)).fit()


def _trial_rows(grid: Any, *, epochs: int, metric: str) -> list[Trial]:
    """One row per trial of Tune's ResultGrid, best first (trials without the metric last)."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = result.config["params"]
        ran = int(m.get("epoch", 0))
        status = ("error" if result.error else "completed" if ran >= epochs
                  else "stopped early")
        full = trial_config(result.config["base"], params)
        rows.append(Trial(trial=m.get("trial_id", Path(result.path).name[:12]),
                          metric=m.get(metric), epochs=ran, status=status, params=params,
                          params_all={**full.model.__dict__, **full.train.__dict__}))
    rows.sort(key=lambda r: (r.metric is None, -(r.metric or 0.0)))
    return rows


def _pick_best(rows: list[Trial], metric: str, experiment: Location) -> Trial:
    """The best trial that reported the metric without an error (``rows`` are best first)."""
    done = [r for r in rows if r.metric is not None and r.status != "error"]
    if not done:
        raise RuntimeError(f"no trial of the sweep reported {metric}; see {experiment}")
    return done[0]


def write_results(folder: Path, rows: list[Trial], best: Trial, *,
                  base: dict[str, Any], metric: str) -> None:
    """The sweep's result files in a local folder: ``best_config.yaml``, the results table
    (``results.txt``, ``results.json``) and ``metric_by_embedding_dim.png``."""
    trial_config(base, best.params).dump_yaml(folder / "best_config.yaml")
    plot_metric(rows, metric, folder / "metric_by_embedding_dim.png")
    (folder / "results.txt").write_text(results_table(rows, metric) + "\n")
    (folder / "results.json").write_text(json.dumps(
        [r.summary() for r in rows], indent=2,
        default=str) + "\n")


def _publish(cfg: Config, out: Location, rows: list[Trial], best: Trial,
             plan: _Plan) -> None:
    """Write the result files, log them to MLflow (closing every trial's run), and copy them
    into the output (a folder or a bucket) with ``_SUCCESS``, listing them, written last."""
    from app.core import tracking

    metric = cfg.tune.tune_metric
    with tempfile.TemporaryDirectory(prefix="sweep-results-") as tmp:
        write_results(Path(tmp), rows, best, base=plan.base, metric=metric)
        _close_child_runs(cfg, plan.parent_run_id, rows)
        tracking.log_sweep(cfg.cluster, plan.parent_run_id, best=best.summary(), metric=metric,
                           folder=tmp)
        files = {}
        for p in sorted(Path(tmp).iterdir()):
            data = p.read_bytes()
            out.join(p.name).write_bytes(data)
            files[p.name] = FileSum.of(data)  # hashed from the bytes written, not read back
    write_success(out, files, stage="tune")


def _close_child_runs(cfg: Config, parent_run_id: str, rows: list[Trial]) -> None:
    """Give every trial's MLflow run the status of its trial: a trial stopped by the scheduler
    is killed mid-run (its run may be left RUNNING, or marked FAILED by the interrupted fit),
    so it is marked KILLED; completed trials FINISHED; errored ones FAILED."""
    import mlflow

    from app.core import tracking

    status = {"completed": "FINISHED", "stopped early": "KILLED", "error": "FAILED"}
    by_trial = {r.trial: status[r.status] for r in rows}
    exp_id = tracking.configure(cfg.cluster)
    client = mlflow.MlflowClient()
    for run in client.search_runs([exp_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        want = by_trial.get(run.data.tags.get("trial_id"))
        if want and run.info.status != want:
            client.set_terminated(run.info.run_id, status=want)
