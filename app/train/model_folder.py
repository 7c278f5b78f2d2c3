"""The model folder contract: every file name, writing, sealing, opening, resolving a reference.

A model folder holds::

    model.json                 schema version, ModelSpec, objective, dataset it was trained on,
                               calibration, the sha256 of every file a loader reads
    config.yaml                the resolved configuration of the run
    weights.pt                 consolidated weights of ExportedTwoTower (plain torch)
    vocab/users.parquet        the dataset's vocabularies (index <-> id, item metadata)
    vocab/items.parquet
    item_popularity.npy        positives per item index in the training split
    user_history.npz           each user's positives in time order (the history bag)
    rated_items.npz            each user's rated items in every split (what serving leaves out)
    sharding_plan.json         where each embedding table was placed during training
    metrics.json               final metrics: {"model": {"val": ..., "test": ...},
                                               "popularity": {"val": ..., "test": ...}, ...}
    history.json               per-epoch metrics
    mlflow.json                the MLflow run and registered version (when registered)

Every stage goes through this module: training writes a folder with :func:`write_model_folder`
(``model.json`` last, sealing the other files by sha256), and the serving core, batch inference,
the Ray Serve app and the pyfunc turn a reference (a folder, a URI, ``models:/name/N``,
``models:/name@alias``, ``runs:/...``: :class:`ModelRef`) into a local folder with
:func:`resolve_model` and open it with :func:`load_exported`, which verifies every seal.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch

from app.core.contracts import Contract, Part
from app.core.errors import ModelError, OutputError
from app.core.publish import current, local_dir
from app.core.storage import Location, is_remote
from app.data.dataset import (
    SPLITS,
    VOCAB_RECORDS,
    DatasetError,
    ItemFeatures,
    Manifest,
    Vocab,
    VocabBase,
    read_split_arrays,
)
from app.data.history import HISTORY_FILE, UserHistory
from app.train.export import ExportedTwoTower
from app.train.metrics import UserItems
from app.train.model import ModelSpec

if TYPE_CHECKING:
    from app.core.config import ClusterConfig, Config

MODEL_SCHEMA_VERSION = 3  # 2: history bag, item year, normalised towers; 3: sha256 of files
MODEL_JSON = "model.json"
CONFIG_FILE = "config.yaml"
WEIGHTS = "weights.pt"
VOCAB_DIR = "vocab"
POPULARITY_FILE = "item_popularity.npy"
RATED_FILE = "rated_items.npz"
PLAN_FILE = "sharding_plan.json"
METRICS_FILE = "metrics.json"
HISTORY_JSON = "history.json"
MLFLOW_FILE = "mlflow.json"
# what a training checkpoint carries into the model folder as it is
FROM_CHECKPOINT = (HISTORY_FILE, PLAN_FILE, POPULARITY_FILE)
__all__ = ["HISTORY_FILE", "ModelError"]  # re-exported names besides this module's own


def sha256_of(path: Path) -> str:
    """The sha256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sealed_files(model_dir: str | os.PathLike) -> list[str]:
    """The files a loader reads besides model.json: the weights, the users' histories, the
    item popularity, the rated items and the vocabularies (paths relative to the folder)."""
    root = Path(model_dir)
    names = [WEIGHTS, HISTORY_FILE, POPULARITY_FILE, RATED_FILE]
    names += sorted(str(p.relative_to(root)) for p in (root / VOCAB_DIR).rglob("*") if p.is_file())
    return [n for n in names if (root / n).is_file()]


@dataclass
class TrainedOn(Part):
    """The prepared dataset a model was trained on, as ``model.json`` records it."""

    path: str                       # the dataset version's folder
    created_unix: int               # when it was prepared
    vocab: Vocab                    # its vocabularies (the model's rows are their indices)
    splits: dict[str, int]          # rows per split


@dataclass
class ModelInfo(Contract):
    """``model.json`` of a model folder: the shape of the model (``spec``, a
    :class:`ModelSpec` as a dict), the dataset it was trained on (``dataset``: path,
    created_unix, vocab, splits), the calibration of pair probabilities (``sigmoid(a * score
    + b)``) and the sha256 of every file a loader reads."""

    FILE = MODEL_JSON
    SCHEMA_VERSION = MODEL_SCHEMA_VERSION
    Error = ModelError
    REDO = "; export or train it again"

    schema_version: int
    spec: dict[str, Any]            # ModelSpec.to_dict(); read with ModelSpec.from_dict
    dataset: TrainedOn
    calibration: dict[str, Any] = field(default_factory=lambda: {"a": 1.0, "b": 0.0})
    sha256: dict[str, str] = field(default_factory=dict)

    @classmethod
    def missing(cls, folder: str) -> str:
        return f"{folder} is not a model folder (no {MODEL_JSON})"

    @property
    def weights_sha256(self) -> str:
        return self.sha256.get(WEIGHTS, "")


def vocab_record(folder: Path) -> Optional[tuple[Vocab, Path]]:
    """A model folder as a ``--base``: the vocabulary record of the dataset it was trained on
    (its ``vocab/`` holds those vocabularies) and the file that fingerprints it; None for a
    folder that is not a model folder."""
    path = Path(folder, MODEL_JSON)
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text())["dataset"]["vocab"]
        return Vocab(**{**vocab, "base": VocabBase(**(vocab.get("base") or {}))}), path
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: no vocabulary record of the dataset the model was "
                           f"trained on ({type(e).__name__}: {e})") from None


VOCAB_RECORDS.append(vocab_record)


def base_folder(base: str, cluster: "ClusterConfig") -> str:
    """A ``--base`` value as ``prepare_data`` reads it: an MLflow model (``models:/name@alias``,
    ``models:/name/N``, ``runs:/...``) becomes its downloaded model folder; a folder or URI
    stays as it is (a model folder is read through :func:`vocab_record`)."""
    if not ModelRef(base).mlflow:
        return base
    try:
        return str(resolve_model(base, cluster))
    except ModelError as e:
        raise DatasetError(f"--base: {str(e).removeprefix('--model ')}") from None


def write_model_json(model_dir: str | os.PathLike, spec: ModelSpec, *,
                     data_dir: str, manifest: Manifest,
                     calibration: Optional[dict[str, float]] = None,
                     sha256: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The folder's contract file: schema version, spec, the dataset it was trained on, the
    calibration of pair probabilities (``sigmoid(a * score + b)``) and the sha256 of every
    file a loader reads (write those first; ``sha256``: checksums already computed for the
    same files). Returns the checksums."""
    if sha256 is None:
        sha256 = {name: sha256_of(Path(model_dir, name)) for name in sealed_files(model_dir)}
    ModelInfo(schema_version=MODEL_SCHEMA_VERSION, spec=spec.to_dict(),
              dataset=TrainedOn(path=str(Path(data_dir).resolve()),
                                created_unix=manifest.created_unix, vocab=manifest.vocab,
                                splits=dict(manifest.counts.splits)),
              calibration=calibration or {"a": 1.0, "b": 0.0}, sha256=sha256).write(model_dir)
    return sha256


def verify_files(model_dir: str | os.PathLike, info: ModelInfo) -> None:
    """Check every file model.json seals against its sha256.

    Raises:
        ModelError: one line naming the first file that is missing or differs (changed,
            truncated or damaged after export).
    """
    for name, want in sorted(info.sha256.items(),
                             key=lambda kv: (kv[0] != WEIGHTS, kv[0])):
        path = Path(model_dir, name)
        if not path.is_file():
            raise ModelError(f"{path}: missing (model.json records its sha256)")
        have = sha256_of(path)
        if have != want:
            raise ModelError(f"{path}: sha256 {have[:12]}... differs from the {want[:12]}... "
                             f"that model.json records: the file changed or was damaged "
                             f"after export")


def read_model_json(model_dir: str | os.PathLike) -> ModelInfo:
    """Load and check ``model.json`` of a model folder's published version.

    Raises:
        ModelError: no model folder there, or a schema version this code cannot read.
    """
    folder = local_dir(model_dir)
    if not (folder / MODEL_JSON).is_file():
        raise ModelError(ModelInfo.missing(str(model_dir)))
    return ModelInfo.read(folder)


def load_exported(model_dir: str | os.PathLike,
                  map_location: str | torch.device = "cpu") -> ExportedTwoTower:
    """The serving model of a model folder, in eval mode.

    Raises:
        ModelError: missing files, or weights that do not match the folder's spec.
    """
    model_dir = local_dir(model_dir)  # its published version, read once (on S3: a copy)
    info = read_model_json(model_dir)
    verify_files(model_dir, info)
    spec = ModelSpec.from_dict(info.spec)
    model = ExportedTwoTower(spec, model_features(model_dir, spec), user_history(model_dir))
    weights = Path(model_dir, WEIGHTS)
    if not weights.is_file():
        raise ModelError(f"{model_dir}: no {WEIGHTS}")
    try:  # tensors only: a file that would run code (a pickled payload) is refused
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{weights}: refused to load: not a file of tensors that loads "
                         f"without running code, or damaged ({first[:200]})") from None
    try:
        model.load_state_dict({**state, **model.buffers_for()})
    except RuntimeError as e:
        raise ModelError(f"{weights} does not match {MODEL_JSON}: {e}") from None
    return model.to(map_location).eval()


def model_features(model_dir: str | os.PathLike, spec: ModelSpec) -> list[ItemFeatures]:
    """The item features a model uses, read from its folder's vocabulary."""
    readers = {"item_genres": ItemFeatures.genres, "item_year": ItemFeatures.years}
    out = []
    for name in spec.candidate_features()[1:]:
        feature = readers[name](model_dir)
        if feature is None:
            raise ModelError(f"{model_dir}: the model uses {name}, which its vocabulary lacks")
        out.append(feature)
    return out


def user_history(model_dir: str | os.PathLike) -> Optional[UserHistory]:
    """The users' positives the model was trained with (None for a folder without them)."""
    path = Path(model_dir, HISTORY_FILE)
    return UserHistory.from_bytes(path.read_bytes()) if path.is_file() else None


def item_popularity(model_dir: str | os.PathLike) -> np.ndarray:
    """Positives per item index in the training split (index 0 = unknown, always 0)."""
    return np.load(Path(model_dir, POPULARITY_FILE))


def split_pairs(data_dir: str | os.PathLike, splits: Sequence[str]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of the given splits, concatenated, as stored (int32)."""
    parts = [read_split_arrays(Path(data_dir, split), ("user", "item")) for split in splits]
    return (np.concatenate([p["user"] for p in parts] or [np.empty(0, np.int32)]),
            np.concatenate([p["item"] for p in parts] or [np.empty(0, np.int32)]))


def rated_items(data_dir: str | os.PathLike, splits: Sequence[str], num_users: int,
                dtype: Any = np.int64) -> UserItems:
    """Each user's items in the given splits of a prepared dataset (what is left out), the
    items in ``dtype``."""
    return UserItems.build(*split_pairs(data_dir, splits), num_users, dtype=dtype)


def write_rated_items(model_dir: str | os.PathLike, data_dir: str | os.PathLike,
                      num_users: int) -> None:
    """The model folder's :data:`RATED_FILE`: every split's (user, item) pairs as CSR arrays,
    the items in int32 and written straight to the file (at 10M rows an int64 form and an
    in-memory copy of the file were ~0.3 GB of the driver's peak)."""
    rated = UserItems.build(*split_pairs(data_dir, SPLITS), num_users, dtype=np.int32)
    with open(Path(model_dir, RATED_FILE), "wb") as f:  # a file object: no suffix added
        np.savez(f, offsets=rated.offsets, items=rated.items)


def read_rated_items(model_dir: str | os.PathLike) -> Optional[UserItems]:
    """The model folder's rated items (None for a folder without them); plain arrays only,
    the items as stored (int32: every process that serves holds them)."""
    path = Path(model_dir, RATED_FILE)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return UserItems(z["offsets"].astype(np.int64), z["items"])


def write_model_folder(folder: Path, *, weights: dict[str, torch.Tensor], data_dir: str,
                       checkpoint: Location, spec: ModelSpec, manifest: Manifest,
                       config: "Config", metrics: dict[str, Any],
                       history: list[dict[str, Any]],
                       calibrate: Callable[[Path], dict[str, Any]]) -> None:
    """Write every file of a model folder into ``folder`` (a staging folder that the caller
    publishes), ``model.json`` last.

    Args:
        weights: the :class:`ExportedTwoTower` state dict (:func:`app.train.export.export_state_dict`).
        data_dir: the prepared dataset it was trained on (vocabularies, rated items).
        checkpoint: the training checkpoint that holds :data:`FROM_CHECKPOINT`.
        calibrate: the calibration of pair probabilities, fitted on the sealed folder.
    """
    torch.save(weights, folder / WEIGHTS)
    shutil.copytree(Path(data_dir, VOCAB_DIR), folder / VOCAB_DIR)
    for name in FROM_CHECKPOINT:
        (folder / name).write_bytes(checkpoint.join(name).read_bytes())
    write_rated_items(folder, data_dir, spec.num_users)  # what serving leaves out
    # model.json seals every loaded file (load_exported checks them); the calibration is
    # fitted on the sealed folder, then written beside the same seals
    sealed = write_model_json(folder, spec, data_dir=data_dir, manifest=manifest)
    write_model_json(folder, spec, data_dir=data_dir, manifest=manifest, sha256=sealed,
                     calibration=calibrate(folder))
    config.dump_yaml(folder / CONFIG_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (folder / HISTORY_JSON).write_text(json.dumps(history, indent=1) + "\n")


def read_metrics(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The folder's final metrics (:data:`METRICS_FILE`)."""
    return json.loads(Path(model_dir, METRICS_FILE).read_text())


# ---------------------------------------------------------------- model references

@dataclass(frozen=True)
class ModelRef:
    """What a ``--model`` value names: a model folder (a path or a URI, following its
    ``CURRENT`` version) or an MLflow model: ``models:/name/N`` (fixed), ``models:/name@alias``
    (follows the alias) or ``runs:/<id>/...`` (fixed)."""

    text: str

    @property
    def mlflow(self) -> bool:
        return self.text.startswith(("models:/", "runs:/"))

    @property
    def registered(self) -> bool:
        return self.text.startswith("models:/")

    @property
    def name(self) -> Optional[str]:
        """The registered model's name."""
        if not self.registered:
            return None
        rest = self.text[len("models:/"):]
        return rest.rsplit("@", 1)[0] if "@" in rest else rest.partition("/")[0]

    @property
    def alias(self) -> Optional[str]:
        rest = self.text[len("models:/"):] if self.registered else ""
        return rest.rsplit("@", 1)[1] if "@" in rest else None

    @property
    def version(self) -> Optional[str]:
        """The registered version number of ``models:/name/N``."""
        if not self.registered or self.alias is not None:
            return None
        return self.text[len("models:/"):].partition("/")[2] or None

    @property
    def label(self) -> str:
        """``name/N`` of a fixed registered version, the URI itself for a run."""
        return self.text[len("models:/"):] if self.registered else self.text


def fixed_reference(model: str, cluster: "ClusterConfig") -> str:
    """``models:/name@alias`` as the version the alias points at now (``models:/name/N``);
    any other reference as it is.

    Raises:
        ModelError: the alias names no version.
    """
    ref = ModelRef(model)
    if not ref.registered or ref.alias is None:
        return model
    import mlflow

    from app.core import tracking

    tracking.configure(cluster)
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(ref.name, ref.alias).version
    except Exception as e:  # noqa: BLE001 (MLflow raises its own errors for a missing alias)
        raise ModelError(f"{model}: no version has the alias {ref.alias!r} "
                         f"({type(e).__name__})") from None
    return f"models:/{ref.name}/{version}"


def resolve_model(model: str, cluster: "ClusterConfig", cache_dir: Optional[str] = None
                  ) -> Path:
    """A local model folder for ``model``: a folder path, a folder on an object store
    (``s3://...``: its published version's copy in this node's cache), or an MLflow URI
    (``models:/name/1``, ``models:/name@alias``, ``runs:/<id>/model``) whose artifacts are
    downloaded.

    Raises:
        ModelError: nothing usable there.
    """
    if is_remote(model):
        try:
            path = local_dir(model)
        except OutputError as e:
            raise ModelError(f"--model {model}: {e}") from None
        read_model_json(path)
        return path
    path = Path(model)
    if path.exists():
        path = current(path)  # a versioned folder: its published version
        read_model_json(path)
        return path
    if ":/" not in model:
        raise ModelError(f"--model {model}: no such folder, and not an MLflow model URI")
    from mlflow.artifacts import download_artifacts

    from app.core import tracking

    tracking.configure(cluster)
    local = Path(download_artifacts(artifact_uri=model,
                                    dst_path=cache_dir or tempfile.mkdtemp(prefix="model-")))
    # a model folder itself (runs:/<id>/model_folder), or the pyfunc model's copy of it
    for candidate in [local, *sorted((local / "artifacts").glob("*"))]:
        if (candidate / MODEL_JSON).is_file():
            read_model_json(candidate)
            return candidate
    raise ModelError(f"--model {model}: downloaded to {local}, but it holds no model folder")
