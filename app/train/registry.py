"""The registered model: the model folder logged to MLflow as a pyfunc and registered.

The pyfunc model is logged as code (MLflow's models-from-code, :data:`MODEL_CODE`), not pickled:
the model folder is its ``model_dir`` artifact and ``app/`` travels as its code, so it loads in a
fresh process with MLflow's pickle loading switched off.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow

from app.core import logs
from app.core.config import ClusterConfig
from app.core.tracking import configure
from app.data.dataset import load_vocab

APP_DIR = Path(__file__).resolve().parents[1]  # the whole app package travels as code
# MLflow runs this file to build the model when it loads it, so nothing is unpickled
MODEL_CODE = APP_DIR / "serve" / "pyfunc_model.py"


@dataclass
class RegisteredModel:
    """A model folder logged to an MLflow run and registered (``mlflow.json`` of the folder)."""

    run_id: str
    model_uri: str                  # the logged pyfunc model (runs:/... or models:/m-...)
    registered_model: str           # the registered model's name
    version: Optional[int]          # its registered version (None: not registered)
    registered_uri: str             # models:/name/version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def signature(user_type: str, item_type: str) -> Any:
    """Inputs, outputs and params of the registered pyfunc (Unity Catalog requires all).

    Outputs are one schema for both uses: top-K rows (rank, fallback, source, title) and pair
    scores (prediction_prob, predicted_class, known_user, known_item); the columns of the other use are absent.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    kind = {"int64": "long", "int32": "integer", "string": "string", "large_string": "string"}
    user, item = kind.get(user_type, "string"), kind.get(item_type, "string")
    return ModelSignature(
        inputs=Schema([ColSpec(user, "userId"), ColSpec(item, "movieId", required=False),
                       ColSpec(Array(item), "history", required=False)]),
        outputs=Schema([ColSpec(user, "userId"), ColSpec(item, "movieId"),
                        ColSpec("float", "score"),
                        ColSpec("integer", "rank", required=False),
                        ColSpec("boolean", "fallback", required=False),
                        ColSpec("string", "source", required=False),
                        ColSpec("string", "title", required=False),
                        ColSpec("double", "prediction_prob", required=False),
                        ColSpec("integer", "predicted_class", required=False),
                        ColSpec("boolean", "known_user", required=False),
                        ColSpec("boolean", "known_item", required=False)]),
        params=ParamSchema([ParamSpec("k", "long", 10),
                            ParamSpec("exclude_rated", "boolean", True)]))


def input_example(model_dir: str | os.PathLike) -> Any:
    """A one-user request for the logged model (a user of its own vocabulary), with k."""
    import pandas as pd

    first = load_vocab(model_dir)["users"]["id"][0].as_py()
    return pd.DataFrame({"userId": [first]}), {"k": 10}


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "numpy", "pandas", "pyarrow", "mlflow")]


def log_trained_model(cluster: ClusterConfig, run_id: str, model_dir: str | os.PathLike,
                      vocab_types: dict[str, str],
                      version_tags: Optional[dict[str, str]] = None) -> RegisteredModel:
    """Log the model folder as artifacts and as a pyfunc model, and register it.

    The pyfunc model is logged as code (:data:`MODEL_CODE`), not pickled: the model folder is
    its ``model_dir`` artifact and ``app/`` travels as its code, so it loads in a fresh
    process with MLflow's pickle loading switched off.

    Args:
        version_tags: tags of the registered version (its lineage: ``init_from``).

    Returns:
        The run, the logged model's URI and the registered version.
    """
    configure(cluster)
    # MLflow prints its registration notices to stderr itself; the caller reports the version
    chatter = (contextlib.nullcontext() if logs.level() == "verbose"
               else contextlib.redirect_stderr(io.StringIO()))
    with mlflow.start_run(run_id=run_id), chatter:
        mlflow.log_artifacts(str(model_dir), artifact_path="model_folder")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_CODE),
            artifacts={"model_dir": str(model_dir)}, code_paths=[str(APP_DIR)],
            signature=signature(vocab_types["user_id_type"], vocab_types["item_id_type"]),
            input_example=input_example(model_dir),
            pip_requirements=_requirements(),
            registered_model_name=cluster.registered_model_name)
    version = info.registered_model_version
    if version is not None:
        client = mlflow.MlflowClient()
        for key, value in (version_tags or {}).items():
            client.set_model_version_tag(cluster.registered_model_name, str(version), key,
                                         value)
    return RegisteredModel(run_id=run_id, model_uri=info.model_uri,
                           registered_model=cluster.registered_model_name,
                           version=int(version) if version is not None else None,
                           registered_uri=f"models:/{cluster.registered_model_name}/"
                                          f"{version}")
