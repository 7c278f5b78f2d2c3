"""MLflow: where runs go, what a training run records, and the registered pyfunc model.

A local store (``sqlite:///<workdir>/mlflow.db``, artifacts under ``<workdir>/mlartifacts``) is
the default; any tracking URI (``databricks``, ``http://...``) and registry URI
(``databricks-uc``) come from the config. Credentials come from the environment (or the URI);
what is logged or saved has them masked (:mod:`app.core.redact`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import mlflow

from app.core import logs
from app.core.config import ClusterConfig, Config, ConfigError
from app.core.redact import redact
from app.core.storage import cache_root, is_remote, resolve

# importing mlflow sets its loggers' levels: quiet them again (as the entry point asked)
logs.quiet_third_party(logs.level())


def tracking_uri(cluster: ClusterConfig) -> str:
    from app.core.cluster import mlflow_defaults

    uri, _ = mlflow_defaults(cluster)
    if uri:
        return uri
    if is_remote(cluster.workdir):
        # a database cannot live in a bucket: this machine keeps it (artifacts go to the
        # bucket); a tracking server (--mlflow-tracking-uri) gives a record every node shares
        workdir = resolve(cluster.workdir)
        key = hashlib.sha256(workdir.uri.encode()).hexdigest()[:12]
        folder = cache_root() / "mlflow" / f"{workdir.name}-{key}"
    else:
        folder = Path(cluster.workdir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


# a Unity Catalog model: catalog.schema.model, each part letters, digits and underscores
_UC_NAME = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")


def check_model_name(name: str, registry_uri: Optional[str]) -> None:
    """Unity Catalog (registry ``databricks-uc``) names a model ``catalog.schema.model``.

    Raises:
        ConfigError: naming the name and the rule, before any training runs.
    """
    if (registry_uri or "").startswith("databricks-uc") and not _UC_NAME.fullmatch(name):
        raise ConfigError(f"--registered-model-name {name!r}: Unity Catalog names a model "
                          f"<catalog>.<schema>.<model>, each part letters, digits or "
                          f"underscores (e.g. main.recsys.two_tower); or register in the "
                          f"workspace registry with --mlflow-registry-uri databricks")


def databricks_user() -> str:
    """The Databricks user these credentials belong to (the SDK's usual auth chain)."""
    try:
        from databricks.sdk import WorkspaceClient

        return WorkspaceClient().current_user.me().user_name
    except Exception as e:  # no SDK, no credentials, no workspace
        raise ConfigError(f"could not look up the Databricks user for the default MLflow "
                          f"experiment ({type(e).__name__}: {redact(str(e)).splitlines()[0]}); "
                          f"give a workspace path: --mlflow-experiment "
                          f"/Users/<you>/two-tower") from None


def experiment_name(cluster: ClusterConfig, tracking: str,
                    user: Any = databricks_user) -> str:
    """The experiment to log to. A Databricks workspace keeps experiments at workspace paths:
    a bare name there lives in the current user's folder (``/Users/<user>/<name>``)."""
    name = cluster.mlflow_experiment
    if tracking.startswith("databricks") and not name.startswith("/"):
        return f"/Users/{user()}/{name}"
    return name


def connect(cluster: ClusterConfig) -> str:
    """Point this process's MLflow at the configured tracking and registry stores (what a
    reader of the registry needs: nothing is created); returns the tracking URI."""
    from app.core.cluster import mlflow_defaults

    uri = tracking_uri(cluster)
    mlflow.set_tracking_uri(uri)
    if redact(uri) != uri:  # MLflow prints run links with the URI as given, credential and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    registry = mlflow_defaults(cluster)[1]
    if registry:
        mlflow.set_registry_uri(registry)
    return uri


def configure(cluster: ClusterConfig) -> str:
    """Point this process's MLflow at the configured stores and experiment (created when
    missing); returns its id."""
    from app.core.cluster import mlflow_defaults

    uri = connect(cluster)
    check_model_name(cluster.registered_model_name, mlflow_defaults(cluster)[1])
    name = experiment_name(cluster, uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (resolve(cluster.workdir).join("mlartifacts").uri if is_remote(cluster.workdir)
                    else (Path(cluster.workdir).resolve() / "mlartifacts").as_uri())
    return mlflow.create_experiment(name, artifact_location=location)


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as MLflow params: ``section.field -> value`` (credentials masked)."""
    return {f"{s}.{k}": str(v)[:500] for s, fields in cfg.shown().items()
            for k, v in fields.items()}


def run_label(stage: str, cfg: Config, dataset: Optional[str] = None) -> str:
    """An MLflow run name that says what ran: stage, dataset (default: the configured one),
    objective and start time, e.g. ``train movielens-small softmax 2026-11-30 01:54``."""
    dataset = dataset or cfg.data.dataset
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return f"{stage} {dataset} {cfg.model.objective} {when}"


def start_run(cfg: Config, *, run_name: str, tags: Optional[dict[str, str]] = None,
              parent_run_id: Optional[str] = None) -> str:
    """Create a run with the config as params; returns its id (the run is left closed, so
    workers and later steps log to it by id)."""
    experiment_id = configure(cfg.cluster)
    all_tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    params = flat_params(cfg)
    keys = sorted(params)
    for start in range(0, len(keys), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, params[k])
                                                  for k in keys[start:start + 100]])
    return run.info.run_id


def end_run(cluster: ClusterConfig, run_id: str, status: str = "FINISHED") -> None:
    configure(cluster)
    mlflow.MlflowClient().set_terminated(run_id, status=status)


def log_sweep(cluster: ClusterConfig, parent_run_id: str, *, best: dict[str, Any], metric: str,
              folder: str | os.PathLike) -> None:
    """The sweep's parent run: the best trial's settings and metric, the result files."""
    configure(cluster)
    client = mlflow.MlflowClient()
    client.log_batch(parent_run_id, params=[
        mlflow.entities.Param(f"best.{k}", str(v)[:500]) for k, v in best["params"].items()],
        metrics=[mlflow.entities.Metric(f"best_{metric}".replace("@", "_at_"),
                                        float(best["metric"]), int(time.time() * 1000), 0)])
    for name in ("results.txt", "results.json", "best_config.yaml",
                 "metric_by_embedding_dim.png"):
        path = Path(folder, name)
        if path.is_file():
            client.log_artifact(parent_run_id, str(path))
    client.set_terminated(parent_run_id)


PROMOTION_METRIC = "recall@20"


def promote(cfg: Config, version: Any, metric: Optional[float], dataset: str,
            compare: Optional[Callable[[str], Optional[dict[str, Any]]]] = None
            ) -> dict[str, Any]:
    """The promotion gate: point the alias ``cfg.serve.champion_alias`` (what serving follows)
    at a newly registered version, per ``cfg.serve.promote``.

    ``if-better`` promotes when the version beats the current champion on the same split, or
    when there is no champion yet. On the same dataset version the two test Recall@20 tags
    are compared. A champion trained on another dataset version is scored with the new
    version on the new version's test split by ``compare`` (the rows it was not trained on:
    :func:`app.train.gate.compare_on_split`); without ``compare``, or with no such row, it is
    not comparable and stays (``--promote always`` replaces it). The version is tagged with
    its metric and dataset either way, so a later run can compare.

    Args:
        version: the registered version (of ``cfg.cluster.registered_model_name``).
        metric: its test Recall@20 (None when not measured).
        dataset: the dataset version it was trained and evaluated on.
        compare: champion version -> ``{"candidate": {...}, "champion": {...}, "rows",
            "left_out"}`` (:class:`app.train.gate.SameSplit`), or None when nothing is left
            to compare on.

    Returns:
        ``{"promoted", "alias", "version", "champion" (the one before, or None), "reason"}``,
        and ``"same_split"`` when the champion was scored on this version's split.
    """
    configure(cfg.cluster)
    client = mlflow.MlflowClient()
    name, alias, mode = (cfg.cluster.registered_model_name, cfg.serve.champion_alias,
                         cfg.serve.promote)
    tag = PROMOTION_METRIC.replace("@", "_at_")
    version = str(version)
    if metric is not None:
        client.set_model_version_tag(name, version, f"test_{tag}", f"{metric:.6f}")
    client.set_model_version_tag(name, version, "dataset", dataset)
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 (MLflow raises its own error for a missing alias)
        champion = None
    before = champion.version if champion is not None else None
    out: dict[str, Any] = {"alias": alias, "version": version, "champion": before}

    def decide(promoted: bool, reason: str) -> dict[str, Any]:
        if promoted:
            client.set_registered_model_alias(name, alias, version)
        return {**out, "promoted": promoted, "reason": reason}

    if mode == "never":
        return decide(False, "--promote never")
    if mode == "always":
        return decide(True, "--promote always")
    if champion is None:
        return decide(True, "the first model: no champion yet")
    if str(before) == version:
        return decide(False, f"version {version} is the champion already")
    theirs = champion.tags.get(f"test_{tag}")
    if champion.tags.get("dataset") != dataset or theirs is None:
        same = compare(str(before)) if compare is not None else None
        if same is not None:
            out["same_split"] = same
        return decide(*_across_versions(same, before))
    if metric is None:
        return decide(False, f"this model has no test {PROMOTION_METRIC}")
    theirs = float(theirs)
    if metric > theirs:
        return decide(True, f"test {PROMOTION_METRIC} {metric:.4f} beats the champion's "
                            f"(version {before}) {theirs:.4f}")
    return decide(False, f"test {PROMOTION_METRIC} {metric:.4f} does not beat the champion's "
                         f"(version {before}) {theirs:.4f}")


def _across_versions(same: Optional[dict[str, Any]], champion: Any) -> tuple[bool, str]:
    """The gate's decision against a champion of another dataset version, from both models'
    figures on this version's test split (None: no row left to compare on)."""
    if same is None:
        return False, (f"the champion (version {champion}) was evaluated on another dataset "
                       f"version and no test row of this one is left to score it on; not "
                       f"comparable (--promote always replaces it)")
    mine, theirs = same["candidate"][PROMOTION_METRIC], same["champion"][PROMOTION_METRIC]
    where = (f"on this dataset's test split ({same['rows']:,} positives of "
             f"{same['candidate']['users']:,} users; {same['left_out']:,} the champion was "
             f"trained on left out)")
    verdict = "beats" if mine > theirs else "does not beat"
    return mine > theirs, (f"test {PROMOTION_METRIC} {mine:.4f} {verdict} the champion's "
                           f"(version {champion}) {theirs:.4f} {where}")
