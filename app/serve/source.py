"""Where the serving app's model comes from, and the core's answers in the API's shapes.

:class:`ModelSource` tells the version to serve now (an alias, a fixed registered version, or a
folder's ``CURRENT``) and loads it; :func:`recommend_many` and :func:`score_many` answer
requests with one serving core (one model version per batch).
"""

from typing import Any

from app.core.config import Config
from app.serve.api import Pair, RecommendRequest


class ModelSource:
    """The model the app serves and how to tell its version now.

    ``models:/name@alias`` follows the alias; ``models:/name/N`` and ``runs:/...`` are fixed;
    a folder or URI follows its ``CURRENT`` published version.
    """

    def __init__(self, model: str, cfg: Config) -> None:
        from app.train.model_folder import ModelRef

        self.model, self.cfg, self.ref = model, cfg, ModelRef(model)
        self.mlflow, self.name, self.alias = self.ref.mlflow, self.ref.name, self.ref.alias

    @property
    def follows(self) -> bool:
        return self.alias is not None or not self.mlflow

    def version(self) -> str:
        """The version to serve now: ``name/N`` for a registered model, the published
        version's folder name for a folder."""
        from app.train.model_folder import ModelError

        if self.alias is not None:
            import mlflow

            from app.core import tracking

            tracking.connect(self.cfg.cluster)
            try:
                v = mlflow.MlflowClient().get_model_version_by_alias(self.name, self.alias)
            except Exception as e:  # noqa: BLE001 (MLflow's own errors vary by store)
                raise ModelError(f"{self.model}: no version has the alias {self.alias!r} "
                                 f"({str(e).splitlines()[0][:200]})") from None
            return f"{self.name}/{v.version}"
        if self.mlflow:
            return self.ref.label
        from app.core.publish import version_uri

        return version_uri(self.model).rstrip("/").rsplit("/", 1)[-1]

    def fingerprint(self, label: str) -> str:
        """What identifies version ``label``'s files: a registered version is fixed (its
        label); a folder's version, the names, sizes and modification times of its files, so
        a version refused for its files is tried again once they change."""
        if self.mlflow:
            return label
        import pyarrow.fs as pafs

        from app.core.publish import version_uri
        from app.core.storage import resolve

        where = resolve(version_uri(self.model))
        infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True))
        return label + "|" + ";".join(sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos
                                             if i.type == pafs.FileType.File))

    def load(self, label: str, device: str) -> Any:
        """The serving core of version ``label`` (:meth:`version`), warmed."""
        from app.core.publish import version_uri
        from app.serve.core import Recommender
        from app.train.model_folder import resolve_model

        if self.alias is not None:
            where = resolve_model(f"models:/{label}", self.cfg.cluster)
        elif self.mlflow:
            where = resolve_model(self.model, self.cfg.cluster)
        else:
            where = version_uri(self.model)
            if not where.rstrip("/").endswith(label):
                raise RuntimeError(f"{self.model}: CURRENT moved while loading {label}")
        core = Recommender(where, device, version=label)
        warm(core)
        return core


def warm(core: Any) -> None:
    """One request of each kind, so the first real one pays no first-call costs."""
    first = core.user_ids.iloc[:1].tolist()
    core.recommend(first + ["\x00unknown"], k=10)
    core.score_pairs(first, core.item_ids.iloc[:1].tolist())


def recommend_many(core: Any, requests: list[RecommendRequest]) -> list[dict[str, Any]]:
    """Answers to several requests by one ranking of the catalog (one model version)."""
    import numpy as np

    users = core.user_indices([str(r.user_id) for r in requests])
    histories = [[str(i) for i in r.history] if r.history else None for r in requests]
    given, unknown = core.history_rows(histories)
    k = max(r.k for r in requests)
    scores, items, source = core.top_k(users, k, given,
                                       np.array([r.exclude_rated for r in requests]))
    out = []
    for row, r in enumerate(requests):
        n = min(r.k, scores.shape[1])
        keep = np.isfinite(scores[row, :n]) & (items[row, :n] > 0)
        idx, sc = items[row, :n][keep], scores[row, :n][keep]
        titles = (core.titles.take(idx - 1).to_pylist() if core.titles is not None
                  else [None] * len(idx))
        out.append({"model_version": core.version, "user_known": bool(users[row] > 0),
                    "source": str(source[row]), "unknown_history_items": int(unknown[row]),
                    "items": [{"item_id": core.item_id_text[i - 1], "score": float(v),
                               "title": t} for i, v, t in zip(idx.tolist(), sc.tolist(),
                                                              titles)]})
    return out


def score_many(core: Any, pairs: list[Pair]) -> dict[str, Any]:
    """Scores and calibrated probabilities of the pairs of one request (one model version);
    a pair with an unknown id has neither, and says which id is unknown."""
    import math

    df = core.score_pairs([str(p.user_id) for p in pairs], [str(p.item_id) for p in pairs])
    rows = []
    for u, i, s, prob, ku, ki in zip(df["userId"], df["movieId"], df["score"].tolist(),
                                     df["prediction_prob"].tolist(), df["known_user"],
                                     df["known_item"]):
        known = bool(ku and ki)
        rows.append({"user_id": u, "item_id": i,
                     "score": s if known and not math.isnan(s) else None,
                     "probability": prob if known and not math.isnan(prob) else None,
                     "known_user": bool(ku), "known_item": bool(ki)})
    return {"model_version": core.version, "pairs": rows}


