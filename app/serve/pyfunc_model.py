"""The registered MLflow model, logged as code (MLflow's models-from-code).

:func:`app.train.registry.log_trained_model` logs this file as the model: MLflow copies it
beside the model and runs it on load (``mlflow.models.set_model`` names the model), with the
project's ``app/`` package from the model's ``code/`` folder on ``sys.path``. Nothing is pickled
or unpickled; the weights load through :func:`app.train.model_folder.load_exported`
(``weights_only``, sha256 checked) from the model folder logged as the ``model_dir`` artifact.
"""

from __future__ import annotations

from typing import Any, Optional

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TwoTowerPyfunc(PythonModel):
    """The registered model: top-K items for users, or scores for (user, item) pairs.

    Input: a DataFrame with ``userId`` (and ``movieId`` for pair scores; an optional
    ``history`` column holds each user's recent item ids, which a new user is recommended
    from). Params: ``k`` (items per user, default 10), ``exclude_rated`` (leave out the items
    each user rated, default True, as on every serving path). Output:
    :meth:`app.serve.core.Recommender.recommend` or :meth:`app.serve.core.Recommender.score_pairs`
    rows.
    """

    def load_context(self, context: Any) -> None:
        from app.serve.core import Recommender

        self.recommender = Recommender(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        if "userId" not in model_input.columns:
            raise ValueError(f"input needs a userId column; got {list(model_input.columns)}")
        if "movieId" in model_input.columns and model_input["movieId"].notna().any():
            return self.recommender.score_pairs(model_input["userId"], model_input["movieId"])
        params = params or {}
        histories = model_input["history"].tolist() if "history" in model_input else None
        return self.recommender.recommend(model_input["userId"], int(params.get("k", 10)),
                                          histories, bool(params.get("exclude_rated", True)))


mlflow.models.set_model(TwoTowerPyfunc())
