"""The full run: prepare -> [tune] -> train -> refit -> promotion gate -> batch inference -> report.

:func:`run` is what ``python -m pipelines.full_run`` calls: every stage in order on the resolved
Ray cluster, writing everything under the workdir (``data/``, ``sweep/``, ``model-heldout/``,
``model/``, ``recommendations/``, ``val_metrics.png``, ``config.yaml``) and ``summary.json``
(:class:`RunSummary`) last. Each stage is one named step; this module holds the policy between
them (reuse a dataset prepared with the same settings, refit on every split for the evaluated
run's best number of epochs, gate the served version).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from app.core import logs
from app.core.cluster import init_ray
from app.core.config import Config, load_config
from app.core.contracts import Contract
from app.core.errors import ConfigError, DatasetError, OutputError
from app.core.memory import release_freed
from app.core.preflight import check_run
from app.core.publish import current, version_uri, writer
from app.core.redact import redact, redact_values
from app.core.report import examples, plot_history, render
from app.core.storage import Location, resolve
from app.data.dataset import read_manifest

STAGES = ("prepare", "train", "infer")
SUMMARY_FILE = "summary.json"
SUMMARY_SCHEMA_VERSION = 1

_VOLATILE = {"output", "overwrite"}  # settings that do not change what is prepared


@dataclass
class StageSummary:
    """One stage of a full run in ``summary.json``: its time, the rows it went through and its
    output, plus what that stage adds (counts, metrics, the MLflow run ...)."""

    seconds: float
    rows: int
    output: str
    counts: Optional[dict[str, Any]] = None      # prepare: the manifest's counts
    metrics: Optional[dict[str, Any]] = None     # train: the evaluated model's metrics.json
    mlflow: Optional[dict[str, Any]] = None      # train, refit: run and registered version
    training_rows: Optional[int] = None          # refit: rows of one epoch
    epochs: Optional[int] = None                 # refit: epochs trained
    best: Optional[dict[str, Any]] = None        # tune: the best trial's settings
    best_metric: Optional[float] = None          # tune: its metric
    summary: Optional[dict[str, Any]] = None     # infer: the recommendations' _summary.json

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class RunSummary(Contract):
    """``summary.json`` of a full run's workdir, written last."""

    FILE = SUMMARY_FILE
    SCHEMA_VERSION = SUMMARY_SCHEMA_VERSION
    Error = OutputError
    REDO = "; run it again"

    schema_version: int
    workdir: str
    stages: dict[str, StageSummary] = field(default_factory=dict)
    promotion: Optional[dict[str, Any]] = None   # the gate's decision (app.core.tracking.promote)
    tracking_uri: Optional[str] = None
    plot: Optional[str] = None                   # validation metrics per epoch (PNG)
    examples: Optional[str] = None               # a few users' recommendations, as text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": self.schema_version, "workdir": self.workdir,
                               "stages": {k: s.to_dict() for k, s in self.stages.items()}}
        for key in ("promotion", "tracking_uri", "plot", "examples"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "RunSummary":
        summary = super().from_dict(data, where)
        summary.stages = {k: StageSummary(**v) for k, v in summary.stages.items()}
        return summary


def run(cfg: Config, stages: tuple[str, ...] = STAGES, *, tune: bool = False,
        refit: bool = True, refresh: Optional[str] = None) -> RunSummary:
    """Run the stages in order; returns the summary (also ``<workdir>/summary.json``).

    Args:
        cfg: the resolved configuration.
        stages: which of prepare, train, infer to run.
        tune: sweep first (``cfg.tune``) and train the model with the best trial's settings.
        refit: after the evaluated training run, train again on every accepted rating
            (train + val + test) for the evaluated run's best number of epochs; ``model/``,
            the registered model and the recommendations come from the refit, the held-out
            metrics from the evaluated run (its folder: ``model-heldout/``).
        refresh: a trained model (``models:/name@alias``, a version, a folder) to refresh
            with the new ratings: the dataset keeps its ids' rows (``--base``), training
            starts from its weights (``--init-from``) with its model settings, and the gate
            scores it beside the new model on the new test split (:func:`refresh_config`).
    """
    if refresh is not None:
        if tune:
            raise ConfigError("--refresh keeps the refreshed model's settings; --tune would "
                              "choose others (tune, then train from scratch)")
        cfg = refresh_config(cfg, refresh)
    check_run(cfg, stages)  # every location, before the workdir's lease and Ray
    workdir = resolve(cfg.cluster.workdir)  # a local path or a URI (app.core.storage)
    # one full run per workdir at a time (each stage also holds its own output's lease)
    with writer(workdir, "full_run", timeout=cfg.cluster.lease_timeout,
                say=lambda msg: logs.say("run", msg)):
        cfg.dump_yaml(workdir / "config.yaml")
        init_ray(cfg.cluster)
        summary = RunSummary(schema_version=SUMMARY_SCHEMA_VERSION, workdir=str(workdir))
        data_dir = resolve(cfg.data.output) if cfg.data.output else workdir / "data"
        summary.stages["prepare"] = prepare_step(cfg, workdir, data_dir)
        release_freed()  # each stage starts without the last one's leftover heap pages
        if tune:
            cfg = tune_step(cfg, data_dir, workdir, summary)
        if "train" in stages:
            train_step(cfg, data_dir, workdir, summary, refit=refit)
        if "infer" in stages:
            release_freed()
            infer_step(cfg, data_dir, workdir, summary)
        summary.write(workdir)
        print(render(summary.to_dict()))
        return summary


def prepare_step(cfg: Config, workdir: Location, data_dir: Location) -> StageSummary:
    """Prepare the dataset, or reuse the one there when it was prepared with the same data
    settings. The workdir's own dataset is replaced when the settings changed; a dataset
    elsewhere (``--output``) only with ``--overwrite``."""
    from app.data.prepare import prepare_dataset

    with logs.stage("prepare"):
        t0 = time.perf_counter()
        if not cfg.data.overwrite and prepared_with(data_dir, cfg):
            manifest = read_manifest(data_dir.uri)
            logs.say("prepare", f"reusing {data_dir} (prepared with the same data settings; "
                                f"--overwrite prepares it again)")
        else:
            cfg.data.overwrite = cfg.data.overwrite or \
                data_dir.uri.startswith(workdir.uri.rstrip("/") + "/")
            manifest = prepare_dataset(cfg.data, data_dir.uri,
                                       lease_timeout=cfg.cluster.lease_timeout)
    return StageSummary(seconds=round(time.perf_counter() - t0, 2), rows=manifest.counts.read,
                        counts=manifest.counts.to_dict(), output=data_dir.uri)


def tune_step(cfg: Config, data_dir: Location, workdir: Location, summary: RunSummary
              ) -> Config:
    """Sweep; returns the configuration with the best trial's settings (the rest as
    configured, the credentials in use carried over: the saved file has them masked)."""
    from app.tune import sweep

    t0 = time.perf_counter()
    out = workdir / "sweep"
    swept = sweep(cfg, data_dir.uri, out.uri)
    summary.stages["tune"] = StageSummary(
        seconds=round(time.perf_counter() - t0, 2), rows=len(swept.rows), output=out.uri,
        best=swept.best.params, best_metric=swept.best.metric)
    return load_config(swept.best_config, {"workdir": cfg.cluster.workdir,
                                           **cfg.credentials()})


def train_step(cfg: Config, data_dir: Location, workdir: Location, summary: RunSummary, *,
               refit: bool) -> None:
    """The evaluated run (``model-heldout/`` with a refit, else ``model/``), the refit, the
    promotion gate on the served version, and the plot of validation metrics."""
    from app.train.driver import train

    model_dir = workdir / "model"
    t0 = time.perf_counter()
    evaluated_dir = workdir / "model-heldout" if refit else model_dir
    result = train(cfg, data_dir.uri, evaluated_dir.uri)
    summary.stages["train"] = StageSummary(
        seconds=round(time.perf_counter() - t0, 2),
        rows=result.training_rows * result.metrics["epochs"], output=evaluated_dir.uri,
        metrics=result.metrics, mlflow=result.mlflow.to_dict())
    served = result.mlflow
    if refit:
        release_freed()
        best = result.metrics["best_epoch"]
        logs.say("refit", f"training on every split (train + val + test) for {best} "
                          f"epoch(s), the evaluated run's best; it is the model served")
        t0 = time.perf_counter()
        again = train(refit_config(cfg, best), data_dir.uri, model_dir.uri, refit=True,
                      tags={"evaluated_run_id": result.mlflow.run_id})
        summary.stages["refit"] = StageSummary(
            seconds=round(time.perf_counter() - t0, 2), rows=again.training_rows * best,
            training_rows=again.training_rows, epochs=best, output=model_dir.uri,
            mlflow=again.mlflow.to_dict())
        served = again.mlflow
    if served.version is not None:
        from app.core.tracking import PROMOTION_METRIC, promote

        test = result.metrics.get("model", {}).get("test", {})
        summary.promotion = promote(cfg, served.version, test.get(PROMOTION_METRIC),
                                    version_uri(data_dir.uri),
                                    compare=same_split(cfg, result.model_dir, data_dir))
    from app.core.tracking import tracking_uri

    summary.tracking_uri = redact(tracking_uri(cfg.cluster))
    summary.plot = (workdir / "val_metrics.png").uri
    plot_history(result.history, summary.plot, [int(k) for k in cfg.train.eval_k])


def same_split(cfg: Config, candidate: str, data_dir: Location
               ) -> Callable[[str], Optional[dict[str, Any]]]:
    """The gate's comparison with a champion of another dataset version: both scored on this
    run's test split (:func:`app.train.gate.compare_on_split`), the candidate being the
    evaluated model (the one with held-out figures)."""

    def compare(champion_version: str) -> Optional[dict[str, Any]]:
        from app.core.publish import local_dir
        from app.train.gate import compare_on_split
        from app.train.model_folder import resolve_model

        t0 = time.perf_counter()
        champion = resolve_model(f"models:/{cfg.cluster.registered_model_name}/"
                                 f"{champion_version}", cfg.cluster)
        ks = tuple(int(k) for k in cfg.train.eval_ks())
        same = compare_on_split(local_dir(candidate), champion, local_dir(data_dir.uri),
                                ks=ks if 20 in ks else (*ks, 20))
        if same is not None:
            logs.say("gate", f"the champion (version {champion_version}) and this model on "
                             f"this dataset's test split: recall@20 "
                             f"{same.champion['recall@20']:.4f} vs "
                             f"{same.candidate['recall@20']:.4f} ({same.rows:,} positives, "
                             f"{same.left_out:,} the champion was trained on left out); "
                             f"{time.perf_counter() - t0:.1f}s")
        return same.to_dict() if same is not None else None

    return compare


def refresh_config(cfg: Config, model: str) -> Config:
    """The configuration of a refresh of ``model`` (``full_run --refresh``): the dataset
    extends the model's vocabularies (``--base``: every id keeps its row), training starts
    from its weights (``--init-from``, a registered alias fixed to its version now) with its
    model settings (its folder's ``config.yaml``); the rest as given."""
    from app.train.model_folder import CONFIG_FILE, fixed_reference, resolve_model

    out = copy.deepcopy(cfg)
    fixed = fixed_reference(model, cfg.cluster)  # the alias's version now, for the run
    folder = resolve_model(fixed, cfg.cluster)
    out.data.base, out.train.init_from = str(folder), fixed
    if (folder / CONFIG_FILE).is_file():
        out.model = load_config(str(folder / CONFIG_FILE)).model
    logs.say("refresh", f"refreshing {redact(model)}"
                        + (f" ({fixed})" if fixed != model else "")
                        + f": its vocabularies kept, its weights the start, its model "
                          f"settings (dim {out.model.embedding_dim}, towers "
                          f"{list(out.model.tower_layers)})")
    return out


def infer_step(cfg: Config, data_dir: Location, workdir: Location, summary: RunSummary) -> None:
    """Top-K recommendations for every user of the dataset from the served model folder."""
    from app.serve.batch import batch_inference

    recs = workdir / "recommendations"
    t0 = time.perf_counter()
    result = batch_inference(cfg, (workdir / "model").uri, data_dir.uri, recs.uri)
    summary.stages["infer"] = StageSummary(seconds=round(time.perf_counter() - t0, 2),
                                           rows=result.users, output=recs.uri,
                                           summary=result.to_dict())
    summary.examples = examples(current(recs.uri))


def prepared_with(data_dir: Location, cfg: Config) -> bool:
    """True when data_dir already holds a dataset prepared with the same data settings."""
    try:
        manifest = read_manifest(data_dir.uri)
    except (DatasetError, OutputError):
        return False
    want = {k: redact_values(v) for k, v in vars(cfg.data).items() if k not in _VOLATILE}
    have = {k: v for k, v in manifest.config.items() if k not in _VOLATILE}
    return want == have


def refit_config(cfg: Config, epochs: int) -> Config:
    """The evaluated run's configuration for a refit: exactly ``epochs`` epochs, no early
    stopping (there is no held-out split left to stop on)."""
    out = copy.deepcopy(cfg)
    out.train.epochs, out.train.patience, out.train.resume = max(1, int(epochs)), 0, False
    return out
