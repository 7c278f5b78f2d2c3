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
from pathlib import Path
from typing import Any, Optional

from app.core import logs
from app.core.config import Config, ConfigError, load_config
from app.core.publish import SUCCESS, version_uri
from app.core.redact import redact_values
from app.train.placement import Placement, ResourceError, check_resources, cluster_nodes, placement

EXPERIMENT = "sweep"


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
    """The base configuration with a trial's settings applied (validated)."""
    flat = {k: v for section in base.values() for k, v in section.items()}
    flat.update(overrides)
    return load_config(overrides=flat)


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
        tracking.end_run(cfg, run_id, status="FAILED")
        raise
    tracking.end_run(cfg, run_id)


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


def results_table(rows: list[dict[str, Any]], metric: str) -> str:
    """One line per trial, best first; trials stopped by the scheduler are marked."""
    params = sorted({k for r in rows for k in r["params"]})
    head = f"{'trial':<14}{metric:>16}{'epochs':>8}  {'status':<14}" + "".join(
        f"{p:>16}" for p in params)
    lines = [head, "-" * len(head)]
    for r in rows:
        value = r["metric"]
        shown = f"{value:.4f}" if value is not None else "-"
        cells = "".join(f"{_short(r['params'].get(p)):>16}" for p in params)
        lines.append(f"{r['trial']:<14}{shown:>16}{r['epochs']:>8}  {r['status']:<14}{cells}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v) if v is not None else "-"


def plot_metric(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """The metric of each trial against its embedding dimension (stopped trials hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for stopped, style in ((False, "o"), (True, "x")):
        pts = [(r["params_all"]["embedding_dim"], r["metric"]) for r in rows
               if r["metric"] is not None and (r["status"] == "stopped early") == stopped]
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


def sweep(cfg: Config, data_dir: str, output: str, *, verbose: bool = True) -> dict[str, Any]:
    """Run a sweep over ``cfg.tune.search_space`` and write its results to ``output``.

    ``cfg.train.resume`` continues an interrupted sweep of the same output folder.

    Returns:
        ``{"rows": [...], "best": {...}, "best_config": path, "plot": path, ...}``.
    """
    from app.core.publish import writer
    from app.core.storage import is_remote

    target = output if is_remote(output) else Path(output).resolve()
    with logs.stage("tune"), writer(target, "tune", timeout=cfg.cluster.lease_timeout,
                                    say=lambda msg: logs.say("tune", msg)):
        return _sweep(cfg, data_dir, str(target), verbose=verbose)


def _sweep(cfg: Config, data_dir: str, output: str, *, verbose: bool) -> dict[str, Any]:
    from ray import tune

    from app.core import tracking
    from app.core.cluster import init_ray
    from app.core.storage import ray_storage, resolve
    from app.data.dataset import read_manifest

    say = (lambda msg: logs.say("tune", msg)) if verbose else (lambda msg: None)
    t0 = time.perf_counter()
    read_manifest(data_dir)
    out = resolve(output)  # a folder or a URI (s3://...): Tune's experiment and the results
    if not out.remote:
        Path(out.path).mkdir(parents=True, exist_ok=True)
    experiment = out.join(EXPERIMENT)
    storage_path, storage_fs = ray_storage(out.uri)
    experiment_path = experiment.path if out.remote else experiment.uri
    init_ray(cfg.cluster)
    per_trial = check_sweep_fits(cfg, cluster_nodes())
    metric = cfg.tune.tune_metric
    say(f"sweep: {cfg.tune.num_samples} sample(s) over {sorted(cfg.tune.search_space)}; "
        f"{cfg.tune.max_concurrent} at once, each {per_trial.describe()}; search "
        f"{cfg.tune.search_alg}, scheduler {cfg.tune.scheduler}, maximising {metric}")

    state = out.join("sweep_state.json")
    resuming = cfg.train.resume and tune.Tuner.can_restore(experiment_path,
                                                           storage_filesystem=storage_fs)
    if cfg.train.resume and not resuming:
        raise ConfigError(f"--resume: no sweep to continue under {experiment}")
    if resuming:
        parent_run_id = json.loads(state.read_text())["parent_run_id"]
        say(f"continuing the sweep in {experiment}")
    else:
        parent_run_id = tracking.start_run(cfg, run_name=tracking.run_label("sweep", cfg),
                                           tags={"stage": "tune"})
        state.write_text(json.dumps({"parent_run_id": parent_run_id}) + "\n")
    base = cfg.to_dict()
    base["train"]["resume"] = False  # trials start from scratch
    # the trial function only drives its trainer; the training workers hold the CPUs/GPUs.
    # (A zero request is refused by Tune, hence a token byte of memory.)
    # Tune saves the param space with the experiment: credentials travel beside it, in memory
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, credentials=cfg.credentials()), {"CPU": 0, "memory": 1})
    param_space = {"params": tune_space(cfg.tune.search_space), "base": redact_values(base),
                   "data_dir": version_uri(data_dir), "storage": out.join("trials").uri,
                   "parent_run_id": parent_run_id}
    if resuming:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable,
                                   param_space=param_space, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent,
                                        search_alg=_searcher(cfg, metric),
                                        scheduler=_scheduler(cfg, metric),
                                        metric=None if cfg.tune.search_alg == "optuna"
                                        or cfg.tune.scheduler == "asha" else metric,
                                        mode=None if cfg.tune.search_alg == "optuna"
                                        or cfg.tune.scheduler == "asha" else "max"),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_path,
                                      storage_filesystem=storage_fs))
    grid = tuner.fit()

    rows = []
    for result in grid:
        m = result.metrics or {}
        params = result.config["params"]
        epochs = int(m.get("epoch", 0))
        status = ("error" if result.error else "completed" if epochs >= cfg.train.epochs
                  else "stopped early")
        full = trial_config(result.config["base"], params)
        rows.append({"trial": m.get("trial_id", Path(result.path).name[:12]),
                     "metric": m.get(metric), "epochs": epochs, "status": status,
                     "params": params, "params_all": {**full.model.__dict__,
                                                      **full.train.__dict__}})
    rows.sort(key=lambda r: (r["metric"] is None, -(r["metric"] or 0.0)))
    done = [r for r in rows if r["metric"] is not None and r["status"] != "error"]
    if not done:
        raise RuntimeError(f"no trial of the sweep reported {metric}; see {experiment}")
    best = done[0]
    table = results_table(rows, metric)
    with tempfile.TemporaryDirectory(prefix="sweep-results-") as tmp:
        # the result files, made here, logged to MLflow and copied into the output (a folder
        # or a bucket); _SUCCESS, written last, lists them
        trial_config(base, best["params"]).dump_yaml(Path(tmp, "best_config.yaml"))
        plot_metric(rows, metric, Path(tmp, "metric_by_embedding_dim.png"))
        Path(tmp, "results.txt").write_text(table + "\n")
        Path(tmp, "results.json").write_text(json.dumps(
            [{k: v for k, v in r.items() if k != "params_all"} for r in rows], indent=2,
            default=str) + "\n")
        _close_child_runs(cfg, parent_run_id, rows)
        tracking.log_sweep(cfg, parent_run_id, best=best, metric=metric, folder=tmp)
        names = sorted(p.name for p in Path(tmp).iterdir())
        for name in names:
            out.join(name).write_bytes(Path(tmp, name).read_bytes())
    out.join(SUCCESS).write_text(json.dumps({"files": names}) + "\n")
    seconds = round(time.perf_counter() - t0, 1)
    say(table)
    say(f"best: {metric} {best['metric']:.4f} with {best['params']}; config: "
        f"{out.join('best_config.yaml')}; {seconds}s")
    return {"rows": rows, "best": best, "best_config": out.join("best_config.yaml").uri,
            "plot": out.join("metric_by_embedding_dim.png").uri,
            "parent_run_id": parent_run_id, "seconds": seconds}


def _close_child_runs(cfg: Config, parent_run_id: str, rows: list[dict[str, Any]]) -> None:
    """Give every trial's MLflow run the status of its trial: a trial stopped by the scheduler
    is killed mid-run (its run may be left RUNNING, or marked FAILED by the interrupted fit),
    so it is marked KILLED; completed trials FINISHED; errored ones FAILED."""
    import mlflow

    from app.core import tracking

    status = {"completed": "FINISHED", "stopped early": "KILLED", "error": "FAILED"}
    by_trial = {r["trial"]: status[r["status"]] for r in rows}
    exp_id = tracking.configure(cfg.cluster)
    client = mlflow.MlflowClient()
    for run in client.search_runs([exp_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        want = by_trial.get(run.data.tags.get("trial_id"))
        if want and run.info.status != want:
            client.set_terminated(run.info.run_id, status=want)
