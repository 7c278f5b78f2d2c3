"""The sections of the configuration: one dataclass per concern, each field with its default,
a one-line help text (``--help``) and the checks of :meth:`validate`, which name the flag.

:class:`app.core.config.Config` holds one of each; load and override it there.
"""

from __future__ import annotations

import dataclasses
import numbers
import reprlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Optional

from app.core.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


WORKDIR_ENV = "TWOTOWER_WORKDIR"  # the default --workdir of a cluster's jobs

# Upper bounds of the settings that could hang a process or exhaust a machine: generous, far
# beyond any real use, so that a typo (1e9 for 1e3) fails at parse time instead of at run time.
MAX_SEED = 2**32 - 1  # numpy's and mosaicml's seeds are 32-bit
MAX_PROCS = 1024  # workers, actors, replicas, trials at once, CPUs of one worker or node
MAX_GPUS = 16  # GPUs of one replica or Spark node: more than any machine has
MAX_BATCH = 1 << 20  # samples or users in one batch
MAX_DIM = 8192  # embedding and layer sizes
MAX_K = 10_000  # cut-offs and list lengths
MAX_EPOCHS = 10_000
DAY_S = 86_400  # timeouts and intervals, in seconds
MAX_WINDOW_DAYS = 36_500  # --window-days: a century of ratings
MAX_BATCH_WAIT_MS = 1000  # a batch waits at most this long for requests to fill it
DATASETS = ("movielens-small", "lfs", "csv", "parquet", "synthetic")
LFS_URL = "https://files.grouplens.org/datasets/learning-from-sets-2019/learning-from-sets-2019.zip"


@dataclass
class DataConfig:
    """Where ratings come from and how they become a prepared dataset."""

    dataset: Literal["movielens-small", "lfs", "csv", "parquet", "synthetic"] = _f(
        "movielens-small", "data source")
    input: Optional[str] = _f(None, "file, folder, glob or URI to read (lfs, csv, parquet)")
    output: Optional[str] = _f(None, "prepared dataset folder (default: <workdir>/data)")
    base: Optional[str] = _f(None, "prepared dataset (folder or URI) whose vocabularies this "
                                   "one extends: its ids keep their rows, new ids follow")
    window_days: float = _f(0.0, "keep only ratings of the last N days before the latest "
                                 "timestamp of the input (a daily refresh on a recent window); "
                                 "0: every rating")
    overwrite: bool = _f(False, "replace an existing prepared dataset at --output")
    download_url: str = _f(LFS_URL, "where --dataset lfs downloads from when --input is not given")
    user_col: str = _f("userId", "user id column in the raw ratings")
    item_col: str = _f("movieId", "item id column in the raw ratings")
    rating_col: str = _f("rating", "rating column in the raw ratings")
    timestamp_col: str = _f("timestamp", "timestamp column: epoch numbers (see --timestamp-unit) "
                                         "or ISO-8601 date-times (UTC unless they carry Z or an "
                                         "offset)")
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = _f(
        "auto", "unit of numeric timestamps; auto reads it per value from the digits: up to 12 "
                "seconds, 13-15 milliseconds, 16-18 microseconds, more nanoseconds")
    timestamp_min: str = _f("1970-01-01", "earliest plausible timestamp (ISO-8601 date or "
                                          "date-time, UTC); rows before it are quarantined")
    timestamp_max: str = _f("2100-01-01", "latest plausible timestamp (ISO-8601 date or "
                                          "date-time, UTC); rows after it are quarantined")
    duplicates: Literal["latest", "max", "mean", "keep"] = _f(
        "latest", "rows repeating a (user, item) pair: keep the latest (ties: the higher "
                  "rating), the highest rating (ties: the latest), one row with the mean rating "
                  "and the latest time, or keep every row")
    rating_min: float = _f(0.5, "smallest valid rating (inclusive)")
    rating_max: float = _f(5.0, "largest valid rating (inclusive)")
    label_rule: Literal["threshold", "mean"] = _f(
        "threshold", "label = rating >= threshold, or >= the mean accepted rating")
    label_threshold: float = _f(4.0, "rating at or above which an interaction is positive")
    split: Literal["random", "temporal"] = _f(
        "random", "random (seeded, per row) or temporal (per user, latest held out)")
    val_fraction: float = _f(0.2, "share of interactions in the validation split")
    test_fraction: float = _f(0.1, "share of interactions in the test split")
    seed: int = _f(42, "seed for the random split and the synthetic generator")
    rows: int = _f(1_000_000, "rows to generate (synthetic)")
    synthetic_users: int = _f(0, "users to generate (synthetic; 0 = rows / 50)")
    synthetic_items: int = _f(0, "items to generate (synthetic; 0 = rows / 200, at least 100)")
    shard_size_limit: int = _f(1 << 26, "bytes per MDS shard file")
    read_block_size: int = _f(16 << 20, "bytes of CSV input per Ray Data block")

    def validate(self) -> None:
        _check(self.dataset in DATASETS, "dataset", f"must be one of {', '.join(DATASETS)}",
               self.dataset)
        _check(self.dataset not in ("csv", "parquet") or bool(self.input), "input",
               f"is required with --dataset {self.dataset}", self.input)
        _check(self.rating_min < self.rating_max, "rating_min",
               f"must be below --rating-max ({self.rating_max})", self.rating_min)
        # outside the accepted ratings, every row or no row would be positive
        _check(self.label_rule != "threshold"
               or self.rating_min <= self.label_threshold <= self.rating_max, "label_threshold",
               f"must be within [--rating-min, --rating-max] ({self.rating_min}, "
               f"{self.rating_max})", self.label_threshold)
        _check(0 <= self.seed <= MAX_SEED, "seed", f"must be in [0, {MAX_SEED}]", self.seed)
        _check(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)", self.val_fraction)
        _check(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)",
               self.test_fraction)
        _check(self.val_fraction + self.test_fraction < 1, "test_fraction",
               "plus --val-fraction must leave a non-empty training split",
               self.test_fraction)
        _check(0 < self.rows <= 10**10, "rows", "must be in [1, 10,000,000,000]", self.rows)
        for name in ("synthetic_users", "synthetic_items"):
            _check(0 <= getattr(self, name) <= 10**8, name, "must be in [0, 100,000,000]",
                   getattr(self, name))
        _check(1 << 16 <= self.shard_size_limit < 1 << 32, "shard_size_limit",
               "must be in [64 KiB, 4 GiB)", self.shard_size_limit)
        _check(1 << 20 <= self.read_block_size <= 1 << 30, "read_block_size",
               "must be in [1 MiB, 1 GiB]", self.read_block_size)
        for name in ("user_col", "item_col", "rating_col", "timestamp_col"):
            _check(bool(getattr(self, name)), name, "must not be empty", getattr(self, name))
        _check(self.timestamp_unit in ("auto", "s", "ms", "us", "ns"), "timestamp_unit",
               "must be one of auto, s, ms, us, ns", self.timestamp_unit)
        _check(self.duplicates in ("latest", "max", "mean", "keep"), "duplicates",
               "must be one of latest, max, mean, keep", self.duplicates)
        low, high = (_epoch_seconds(self.timestamp_min, "timestamp_min"),
                     _epoch_seconds(self.timestamp_max, "timestamp_max"))
        _check(low < high, "timestamp_min", f"must be before --timestamp-max "
                                            f"({self.timestamp_max})", self.timestamp_min)
        _check(self.base is None or bool(self.base.strip()), "base",
               "must name a prepared dataset folder or URI", self.base)
        _check(0 <= self.window_days <= MAX_WINDOW_DAYS, "window_days",
               f"must be in [0, {MAX_WINDOW_DAYS:,}] days (0: every rating)", self.window_days)

    def timestamp_bounds(self) -> tuple[int, int]:
        """The plausible timestamp range, inclusive, as epoch seconds."""
        return (_epoch_seconds(self.timestamp_min, "timestamp_min"),
                _epoch_seconds(self.timestamp_max, "timestamp_max"))

    @property
    def train_fraction(self) -> float:
        return 1.0 - self.val_fraction - self.test_fraction


@dataclass
class ModelConfig:
    """The two-tower model."""

    embedding_dim: int = _f(64, "embedding table dimension")
    tower_layers: list = _f([64], "MLP layer sizes per tower; the last is the output dim (one "
                                  "size: a linear projection, no hidden layer)")
    objective: Literal["bce", "softmax"] = _f("softmax", "training objective")
    negatives: Literal["auto", "catalog", "mixed", "in_batch"] = _f(
        "auto", "softmax negatives: the whole catalog, a fixed mix of in-batch and uniformly "
                "sampled items, or the batch's positives; auto: catalog while an epoch's full "
                "softmax stays cheap (--catalog-max-logits, --catalog-max-items), else mixed")
    catalog_max_items: int = _f(20000, "largest catalog that auto trains with a full softmax")
    catalog_max_logits: float = _f(
        1e9, "auto: a full softmax only while an epoch's logits (training rows x catalog "
             "items) are at most this many; measured on CPU (bench/train) a logit costs "
             "about 8 ns more than mixed negatives do, so 1e9 adds ~8 CPU-seconds an epoch. "
             "Above it, mixed negatives, whose cost per row does not grow with the catalog")
    in_batch_negatives: int = _f(512, "mixed negatives: in-batch positives used per batch")
    sampled_negatives: int = _f(512, "mixed negatives: uniformly sampled items per batch")
    temperature: float = _f(0.2, "softmax temperature (divides the dot products)")
    normalize: bool = _f(True, "L2-normalise both towers' outputs (dot product = cosine)")
    history_length: int = _f(50, "recent positive items of the user in the query tower's "
                                 "history bag (0: no history feature)")
    use_user_id: bool = _f(True, "user id embedding in the query tower")
    use_genres: bool = _f(True, "add item genres to the candidate tower when the dataset has "
                                "item metadata")
    use_year: bool = _f(True, "add the release year to the candidate tower when the item "
                              "metadata has one (a year column or a title ending in (YYYY))")

    def validate(self) -> None:
        _check(0 < self.embedding_dim <= MAX_DIM, "embedding_dim",
               f"must be in [1, {MAX_DIM}]", self.embedding_dim)
        _check(len(self.tower_layers) > 0 and all(_count(x, MAX_DIM) for x in self.tower_layers),
               "tower_layers", f"must be a non-empty list of sizes in [1, {MAX_DIM}]",
               self.tower_layers)
        _check(self.objective in ("bce", "softmax"), "objective", "must be bce or softmax",
               self.objective)
        _check(self.negatives in ("auto", "catalog", "mixed", "in_batch"), "negatives",
               "must be one of auto, catalog, mixed, in_batch", self.negatives)
        # a full softmax holds batch x catalog logits: 2048 x 1,000,000 floats is 8 GB
        _check(0 <= self.catalog_max_items <= 1_000_000, "catalog_max_items",
               "must be in [0, 1,000,000]", self.catalog_max_items)
        _check(0 <= self.catalog_max_logits <= 1e11, "catalog_max_logits",
               "must be in [0, 1e11]", self.catalog_max_logits)
        for name in ("in_batch_negatives", "sampled_negatives"):
            _check(0 <= getattr(self, name) <= 100_000, name, "must be in [0, 100,000]",
                   getattr(self, name))
        _check(self.temperature > 0, "temperature", "must be positive", self.temperature)
        _check(0 <= self.history_length <= MAX_K, "history_length", f"must be in [0, {MAX_K:,}]",
               self.history_length)
        _check(self.use_user_id or self.history_length > 0, "use_user_id",
               "can be off only with --history-length above 0 (the query tower needs a "
               "feature)", self.use_user_id)

    def resolved_negatives(self, num_items: int, train_rows: int) -> str:
        """The negatives training uses for a catalog of ``num_items`` items and a training
        split of ``train_rows`` rows: with ``auto``, a full softmax (exact) while its cost
        is small (catalog and epoch logits under their limits), else mixed negatives."""
        if self.negatives != "auto":
            return self.negatives
        cheap = num_items <= self.catalog_max_items \
            and float(num_items) * train_rows <= self.catalog_max_logits
        return "catalog" if cheap else "mixed"


@dataclass
class TrainConfig:
    """Distributed training."""

    topology: Literal["cpu", "snsg", "snmg", "mnmg"] = _f("cpu", "worker placement")
    num_workers: int = _f(2, "training workers: CPU workers (cpu) or GPUs in all (snmg, mnmg); "
                                 "snsg is always 1")
    epochs: int = _f(30, "most passes over the training split (early stopping may end sooner)")
    patience: int = _f(3, "stop after this many epochs without a better validation metric "
                          "and keep the best epoch's model (0: no early stopping)")
    min_improvement: float = _f(
        0.0, "early stopping: an epoch counts as better only when its validation metric beats "
             "the best so far by more than this fraction of it (0.01: 1%); smaller gains are "
             "noise on a validation sample and neither move the best epoch nor reset patience")
    select_metric: str = _f("recall@20", "validation metric of early stopping and of the "
                                         "best epoch (recall@K or ndcg@K)")
    batch_size: int = _f(2048, "samples per batch per worker")
    embedding_lr: float = _f(0.05, "learning rate of the fused embedding optimizer")
    dense_lr: float = _f(1e-3, "learning rate of the dense (MLP) optimizer")
    eval_k: list = _f([10, 20, 50], "cut-offs K of the Recall@K and NDCG@K evaluated")
    val_sample_users: int = _f(
        5000, "validation users ranked after every epoch (early stopping, the epoch line, "
              "metrics.json's val figures, for the model and the baselines alike): a fixed "
              "seeded draw of those with validation positives, the same every epoch; test is "
              "ranked once on every user. 5,000 keeps an evaluation under ~10% of an epoch "
              "from 1M rows up (0: every user)")
    history_dropout: float = _f(0.9, "share of history items dropped at random from each "
                                     "training batch (denoising)")
    user_id_dropout: float = _f(0.1, "share of training rows whose user id is hidden (the "
                                     "query tower learns to serve new users from history)")
    ease_lambdas: list = _f([50, 100, 200, 400, 800, 1600],
                            "EASE baseline: L2 penalties tried, chosen on validation")
    ease_max_dim: int = _f(3000, "EASE baseline: largest min(users, items) it is fitted for "
                                 "(a dense matrix of that size, one Cholesky solve per lambda: "
                                 "about 8 s at 3,000 and 22 s at 5,000 on 2 cores); skipped "
                                 "above, where iALS is the strong baseline")
    baseline_select_users: int = _f(
        5000, "EASE and iALS baselines: validation users (a fixed seeded draw) their settings "
              "are chosen on; they are then scored on --val-sample-users validation users "
              "and every test user, as the model is (0: every user)")
    baselines: Literal["all", "ease", "ials", "none"] = _f(
        "all", "driver-side baselines beside popularity: all = EASE (where it fits under "
               "--ease-max-dim) and iALS")
    ials_factors: list = _f([32, 64], "iALS baseline: latent factors tried, chosen on "
                                      "validation")
    ials_regularization: list = _f([10, 100], "iALS baseline: L2 penalties tried with each "
                                              "--ials-factors, chosen on validation")
    ials_alpha: float = _f(10.0, "iALS baseline: confidence weight of a training positive")
    ials_iterations: int = _f(15, "iALS baseline: alternating passes of every fit")
    accelerator: Literal["gpu", "cpu"] = _f(
        "gpu", "device of snsg/snmg/mnmg workers; cpu places the same topology on CPU workers")
    cpus_per_worker: int = _f(1, "CPUs reserved per training worker")
    sharding: Literal["auto", "table_wise", "column_wise", "row_wise", "table_row_wise",
                      "data_parallel"] = _f(
        "auto", "sharding of the id tables; auto lets the planner choose a model-parallel type")
    table_memory_gb: float = _f(
        0.0, "memory per worker for the embedding tables and their optimizer state, in GB "
             "(GPU memory on GPU workers); a table larger than it is split by rows over the "
             "workers (on GPU also cached from host memory); 0: a third of the host's memory "
             "over its workers on CPU, the GPU's memory on GPU")
    max_failures: int = _f(1, "restarts of the worker group from the latest checkpoint")
    keep_checkpoints: int = _f(2, "epoch checkpoints kept on storage")
    log_every: int = _f(20, "steps between progress lines on rank 0")
    train_seed: int = _f(0, "seed of model initialisation and data order")
    resume: bool = _f(False, "continue the run of this output folder from its latest checkpoint")
    init_from: Optional[str] = _f(
        None, "warm start: a trained model (folder, URI or models:/name@alias) whose embedding "
              "rows are copied by id (new ids start fresh) and whose dense layers are copied; "
              "the optimizer starts fresh. Its dimension, tower layers and features must match")
    warm_lr_scale: float = _f(
        0.3, "warm start: both learning rates are multiplied by this. A fresh optimizer's first "
             "steps are its largest; at the full rates they push a converged model away from "
             "its optimum and the run spends as many epochs as one from scratch finding it "
             "again (1: the full rates)")

    def eval_ks(self) -> list[int]:
        """Cut-offs evaluated: --eval-k and the K of --select-metric."""
        return sorted({int(k) for k in self.eval_k} | {int(self.select_metric.split("@")[1])})

    def validate(self) -> None:
        _check(self.topology in ("cpu", "snsg", "snmg", "mnmg"), "topology",
               "must be one of cpu, snsg, snmg, mnmg", self.topology)
        _check(0 < self.num_workers <= MAX_PROCS, "num_workers", f"must be in [1, {MAX_PROCS}]",
               self.num_workers)
        _check(self.epochs > 0, "epochs", "must be positive", self.epochs)
        _check(self.epochs <= MAX_EPOCHS, "epochs", f"must be at most {MAX_EPOCHS:,}",
               self.epochs)
        _check(0 <= self.patience <= MAX_EPOCHS, "patience", f"must be in [0, {MAX_EPOCHS:,}]",
               self.patience)
        _check(0 <= self.min_improvement < 1, "min_improvement", "must be in [0, 1)",
               self.min_improvement)
        _check(0 < self.warm_lr_scale <= 1, "warm_lr_scale", "must be in (0, 1]",
               self.warm_lr_scale)
        _check(0 <= self.history_dropout < 1, "history_dropout", "must be in [0, 1)",
               self.history_dropout)
        _check(0 <= self.user_id_dropout < 1, "user_id_dropout", "must be in [0, 1)",
               self.user_id_dropout)
        m = self.select_metric.split("@")
        _check(len(m) == 2 and m[0] in ("recall", "ndcg") and m[1].isdigit()
               and 0 < int(m[1]) <= MAX_K, "select_metric",
               f"must be recall@K or ndcg@K with K in [1, {MAX_K:,}]", self.select_metric)
        _check(len(self.ease_lambdas) > 0 and all(x > 0 for x in self.ease_lambdas),
               "ease_lambdas", "must be a non-empty list of positive numbers",
               self.ease_lambdas)
        # EASE inverts a dense dim x dim matrix: 50,000 is 20 GB in float64
        _check(0 <= self.ease_max_dim <= 50_000, "ease_max_dim", "must be in [0, 50,000]",
               self.ease_max_dim)
        # more users than any dataset has: 0 asks for all of them
        _check(0 <= self.baseline_select_users <= 100_000_000, "baseline_select_users",
               "must be in [0, 100,000,000] (0: every user)", self.baseline_select_users)
        _check(len(self.ials_factors) > 0 and all(_count(f, MAX_DIM) for f in self.ials_factors),
               "ials_factors", f"must be a non-empty list of integers in [1, {MAX_DIM:,}]",
               self.ials_factors)
        # penalties and weights far above the counts of a binary matrix only flatten the model
        _check(len(self.ials_regularization) > 0
               and all(0 < x <= 1e6 for x in self.ials_regularization), "ials_regularization",
               "must be a non-empty list of numbers in (0, 1,000,000]", self.ials_regularization)
        _check(0 < self.ials_alpha <= 1e6, "ials_alpha", "must be in (0, 1,000,000]",
               self.ials_alpha)
        _check(0 < self.ials_iterations <= 1000, "ials_iterations", "must be in [1, 1000]",
               self.ials_iterations)
        _check(0 < self.batch_size <= MAX_BATCH, "batch_size", f"must be in [1, {MAX_BATCH:,}]",
               self.batch_size)
        _check(self.embedding_lr > 0, "embedding_lr", "must be positive", self.embedding_lr)
        _check(self.dense_lr > 0, "dense_lr", "must be positive", self.dense_lr)
        _check(self.init_from is None or bool(self.init_from.strip()), "init_from",
               "must name a model folder, URI or models:/name@alias", self.init_from)
        _check(len(self.eval_k) > 0 and all(_count(k, MAX_K) for k in self.eval_k), "eval_k",
               f"must be a non-empty list of integers in [1, {MAX_K:,}]", self.eval_k)
        # more users than any dataset has: 0 asks for all of them
        _check(0 <= self.val_sample_users <= 100_000_000, "val_sample_users",
               "must be in [0, 100,000,000] (0: every user)", self.val_sample_users)
        _check(0 < self.cpus_per_worker <= MAX_PROCS, "cpus_per_worker",
               f"must be in [1, {MAX_PROCS}]", self.cpus_per_worker)
        _check(-1 <= self.max_failures <= 1000, "max_failures",
               "must be in [-1, 1000] (-1: no limit)", self.max_failures)
        _check(0 < self.keep_checkpoints <= 1000, "keep_checkpoints", "must be in [1, 1000]",
               self.keep_checkpoints)
        _check(self.log_every > 0, "log_every", "must be positive", self.log_every)
        _check(0 <= self.train_seed <= MAX_SEED, "train_seed", f"must be in [0, {MAX_SEED}]",
               self.train_seed)
        # a petabyte per worker is beyond any machine; 0 asks for the automatic share
        _check(0 <= self.table_memory_gb <= 1_000_000, "table_memory_gb",
               "must be in [0, 1,000,000] (0: automatic)", self.table_memory_gb)


DEFAULT_SEARCH_SPACE = {  # around the defaults that bench/quality.py measured best
    "embedding_dim": {"choice": [32, 64, 128]},
    "embedding_lr": {"loguniform": [0.01, 0.1]},
    "dense_lr": {"loguniform": [3e-4, 3e-3]},
    "temperature": {"loguniform": [0.1, 0.4]},
    "history_dropout": {"uniform": [0.5, 0.95]},
    "user_id_dropout": {"uniform": [0.0, 0.3]},
}
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


def trial_fields() -> set[str]:
    """The settings a sweep may vary: the model's and training's."""
    return {f.name for c in (ModelConfig, TrainConfig) for f in dataclasses.fields(c)}


@dataclass
class TuneConfig:
    """Hyperparameter sweeps."""

    num_samples: int = _f(8, "trials to sample (each grid point is run this many times)")
    max_concurrent: int = _f(1, "trials running at once (each with its own training workers)")
    search_alg: Literal["random", "optuna"] = _f(
        "optuna", "how trials are chosen: random sampling or Optuna's TPE")
    scheduler: Literal["asha", "none"] = _f(
        "asha", "early stopping of weak trials (ASHA), or run every trial to the end")
    tune_metric: str = _f("val_recall@20", "metric the sweep maximises (reported per epoch)")
    grace_period: int = _f(1, "epochs every trial runs before ASHA may stop it")
    reduction_factor: int = _f(2, "ASHA keeps 1 / reduction_factor of the trials per rung")
    tune_seed: int = _f(0, "seed of the search algorithm")
    search_space: dict = _f(DEFAULT_SEARCH_SPACE,
                            "setting -> {sampler: args}; samplers: " + ", ".join(SAMPLERS))

    def validate(self) -> None:
        _check(0 < self.num_samples <= 100_000, "num_samples", "must be in [1, 100,000]",
               self.num_samples)
        _check(0 < self.max_concurrent <= MAX_PROCS, "max_concurrent",
               f"must be in [1, {MAX_PROCS}]", self.max_concurrent)
        _check(0 < self.grace_period <= MAX_EPOCHS, "grace_period",
               f"must be in [1, {MAX_EPOCHS:,}]", self.grace_period)
        _check(self.reduction_factor > 1, "reduction_factor", "must be at least 2",
               self.reduction_factor)
        _check(0 <= self.tune_seed <= MAX_SEED, "tune_seed", f"must be in [0, {MAX_SEED}]",
               self.tune_seed)
        _check(bool(self.search_space), "search_space", "must not be empty", self.search_space)
        for name, spec in self.search_space.items():
            _check(name in trial_fields(), "search_space",
                   f"names {name!r}, which is not a model or train setting", self.search_space)
            _check(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS,
                   "search_space", f"entry {name} must be one {{sampler: args}} with a sampler "
                   f"among {', '.join(SAMPLERS)}", spec)
            kind, args = next(iter(spec.items()))
            _check(isinstance(args, list) and len(args) > 0
                   and (kind in ("choice", "grid") or len(args) == 2), "search_space",
                   f"entry {name}: {kind} takes a list" + ("" if kind in ("choice", "grid")
                                                             else " [low, high]"), spec)
        _check(self.search_alg != "optuna" or not any(
            "grid" in spec for spec in self.search_space.values()), "search_alg",
            "optuna does not take grid entries in --search-space; use choice, or random",
            self.search_alg)


@dataclass
class InferenceConfig:
    """Batch inference."""

    top_k: int = _f(100, "length of each user's recommendation list")
    inference_batch_size: int = _f(1024, "users (or pairs) per map_batches call")
    inference_actors: int = _f(
        0, "actors in the pool (0: one per GPU, else one per CPU, as many as memory holds)")
    inference_device: Literal["auto", "cpu", "gpu"] = _f(
        "auto", "where actors score: a GPU each when the cluster has GPUs (auto), or as given")
    exclude_rated: Literal["all", "train", "none"] = _f(
        "all", "items left out of a user's list: rated in any split, in train only, or none")
    index: Literal["exact", "faiss"] = _f(
        "exact", "exact top-K by matrix product, or an approximate FAISS inner-product index")
    faiss_m: int = _f(32, "FAISS HNSW graph degree")
    faiss_ef_search: int = _f(128, "FAISS HNSW search breadth (higher: better recall, slower)")

    def validate(self) -> None:
        _check(0 < self.top_k <= MAX_K, "top_k", f"must be in [1, {MAX_K:,}]", self.top_k)
        _check(0 < self.inference_batch_size <= MAX_BATCH, "inference_batch_size",
               f"must be in [1, {MAX_BATCH:,}]", self.inference_batch_size)
        _check(0 <= self.inference_actors <= MAX_PROCS, "inference_actors",
               f"must be in [0, {MAX_PROCS}]", self.inference_actors)
        _check(2 <= self.faiss_m <= 1024, "faiss_m", "must be in [2, 1024]", self.faiss_m)
        _check(0 < self.faiss_ef_search <= 1 << 16, "faiss_ef_search",
               f"must be in [1, {1 << 16:,}]", self.faiss_ef_search)


@dataclass
class ServeConfig:
    """Real-time serving (the Ray Serve app)."""

    host: str = _f("127.0.0.1", "address the HTTP server listens on (0.0.0.0: every interface)")
    port: int = _f(8000, "HTTP port")
    max_k: int = _f(1000, "largest k a request may ask for")
    max_pairs: int = _f(10000, "most pairs one /score request may hold")
    max_history: int = _f(1000, "most items one request's history may hold")
    max_batch_size: int = _f(32, "requests answered by one matrix product (@serve.batch)")
    batch_wait_ms: float = _f(2.0, "how long a batch waits to fill, in milliseconds")
    replicas: int = _f(1, "replicas of the app (the least, when autoscaling)")
    max_replicas: int = _f(0, "autoscale up to this many replicas (0: a fixed number)")
    replica_cpus: float = _f(1.0, "CPUs per replica")
    replica_gpus: float = _f(0.0, "GPUs per replica (the towers and the ranking then run there)")
    reload_interval: float = _f(30.0, "seconds between checks for a new model version (the "
                                      "alias of models:/name@alias, or a folder's CURRENT; 0: "
                                      "never)")
    promote: Literal["if-better", "always", "never"] = _f(
        "if-better", "full run: point the champion alias at the new model if its test "
                     "Recall@20 beats the champion's on the same dataset, always, or never")
    champion_alias: str = _f("champion", "the registered-model alias that serving follows")

    def validate(self) -> None:
        _check(0 < self.port < 65536, "port", "must be in 1..65535", self.port)
        # what one request may ask for, and what one replica holds at once
        for name, high in (("max_k", MAX_K), ("max_pairs", 1_000_000), ("max_history", MAX_K),
                           ("max_batch_size", 4096), ("replicas", MAX_PROCS)):
            _check(0 < getattr(self, name) <= high, name, f"must be in [1, {high:,}]",
                   getattr(self, name))
        # every request waits up to this long for its batch: 1e9 would hang all of them
        _check(0 <= self.batch_wait_ms <= MAX_BATCH_WAIT_MS, "batch_wait_ms",
               f"must be in [0, {MAX_BATCH_WAIT_MS:,}] ms", self.batch_wait_ms)
        _check(self.max_replicas == 0 or self.replicas <= self.max_replicas <= MAX_PROCS,
               "max_replicas", f"must be 0 or in [--replicas, {MAX_PROCS}]", self.max_replicas)
        _check(self.replica_cpus >= 0 and self.replica_gpus >= 0, "replica_cpus",
               "and --replica-gpus must be 0 or more", (self.replica_cpus, self.replica_gpus))
        _check(self.replica_cpus <= MAX_PROCS, "replica_cpus", f"must be at most {MAX_PROCS}",
               self.replica_cpus)
        _check(self.replica_gpus <= MAX_GPUS, "replica_gpus", f"must be at most {MAX_GPUS}",
               self.replica_gpus)
        _check(0 <= self.reload_interval <= DAY_S, "reload_interval",
               f"must be in [0, {DAY_S:,}] seconds", self.reload_interval)
        _check(bool(self.champion_alias.strip()), "champion_alias", "must not be empty",
               self.champion_alias)


@dataclass
class ClusterConfig:
    """Where Ray and MLflow run."""

    address: Optional[str] = _f(None, "Ray cluster to join: host:6379, ray://host:10001, or "
                                      "auto (the cluster started on this machine); default: "
                                      "RAY_ADDRESS, else a new embedded local Ray")
    ray_connect_timeout: float = _f(30.0, "seconds to wait for the Ray cluster of --address "
                                          "before failing")
    databricks: bool = _f(False, "start Ray on this Databricks cluster's Spark workers "
                                 "(also when a Databricks runtime is detected)")
    spark_worker_nodes: int = _f(2, "Ray worker nodes on Spark (Databricks)")
    spark_cpus_per_node: Optional[int] = _f(None, "CPUs per Ray worker node on Spark "
                                                  "(default: all of a Spark worker's)")
    spark_gpus_per_node: Optional[int] = _f(None, "GPUs per Ray worker node on Spark "
                                                  "(default: all of a Spark worker's)")
    num_cpus: Optional[int] = _f(None, "CPUs for an embedded local Ray (default: all)")
    workdir: str = _f("workdir", "folder or URI (s3://...) for the outputs of a full run "
                                 "(default: $TWOTOWER_WORKDIR, else ./workdir)")
    autoscale_timeout: float = _f(600.0, "seconds to wait for an autoscaling cluster to add "
                                         "the nodes a topology needs (0: fail at once)")
    lease_timeout: float = _f(60.0, "seconds without a heartbeat after which another run may "
                                    "take over an output's writer lease")
    storage_timeout: float = _f(10.0, "seconds to wait for a storage endpoint (S3 API) to "
                                      "answer when every URI is checked before Ray starts")
    storage_path: Optional[str] = _f(None, "Ray Train checkpoint storage, shared by all nodes "
                                           "(default: <workdir>/checkpoints)")
    mlflow_tracking_uri: Optional[str] = _f(
        None, "MLflow tracking URI, e.g. databricks (default: sqlite:///<workdir>/mlflow.db)")
    mlflow_registry_uri: Optional[str] = _f(
        None, "MLflow model registry URI, e.g. databricks-uc (default: the tracking URI)")
    mlflow_experiment: str = _f("two-tower", "MLflow experiment name (or workspace path)")
    registered_model_name: str = _f("two-tower", "name of the registered MLflow model")

    def validate(self) -> None:
        for name, low, high in (("num_cpus", 1, MAX_PROCS), ("spark_worker_nodes", 1, MAX_PROCS),
                                ("spark_cpus_per_node", 1, MAX_PROCS),
                                ("spark_gpus_per_node", 0, MAX_GPUS)):
            value = getattr(self, name)  # None: the default of the machine
            _check(value is None or low <= value <= high, name, f"must be in [{low}, {high}]",
                   value)
        # a timeout of 0 fails at once; above a day it is a hang in all but name
        for name in ("ray_connect_timeout", "lease_timeout", "storage_timeout"):
            _check(0 < getattr(self, name) <= DAY_S, name,
                   f"must be in (0, {DAY_S:,}] seconds", getattr(self, name))
        _check(0 <= self.autoscale_timeout <= DAY_S, "autoscale_timeout",
               f"must be in [0, {DAY_S:,}] seconds", self.autoscale_timeout)


def _check(ok: bool, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{flag(name)} {message}, got {brief(value)}")


def _bounded_repr() -> reprlib.Repr:
    """A repr that stops early: a YAML file's aliases can nest a small text into an
    exponentially large value, whose full repr would never end."""
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple = 3, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = 120, 120, 60
    return r


_REPR = _bounded_repr()


def brief(value: Any, limit: int = 160) -> str:
    """``repr(value)`` for an error message: one line, at most ``limit`` characters."""
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _count(value: Any, high: int) -> bool:
    """An integer in [1, high] (a size or cut-off in a list setting; 64.0 is not one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) \
        and 0 < value <= high


def _epoch_seconds(text: str, name: str) -> int:
    """An ISO-8601 date or date-time (UTC unless it carries Z or an offset) as epoch seconds.

    Raises:
        ConfigError: naming the flag ``name`` when ``text`` is not one.
    """
    try:
        when = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise ConfigError(f"{flag(name)} must be an ISO-8601 date or date-time such as "
                          f"2100-01-01, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp())
