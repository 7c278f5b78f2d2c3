"""The serving core: recommendations and pair scores from a model folder, in one process.

:class:`Recommender` is what every way of serving runs: the batch inference actors
(:mod:`app.serve.batch`), the registered MLflow pyfunc (:mod:`app.serve.pyfunc_model`) and the
Ray Serve app (:mod:`app.serve.http`). It

- maps raw ids to vocabulary indices by their exact text (``007`` stays ``007``, see
  :func:`id_keys`), so an id matches whatever type the caller holds it in;
- computes every item's embedding once (or takes them computed, as the batch actors do);
- ranks the whole catalog exactly by matrix product and ``topk``, or searches a FAISS
  inner-product index when one is given;
- leaves out the items each user rated (``rated_items.npz`` of the model folder: every split
  of the dataset the model was trained on) and the items of a given history, unless asked not
  to (``exclude_rated=False``): the one default of every serving path;
- recommends from a given history (``source`` "history"; one with no known item counts as
  none), and gives users neither known nor with a history the most popular items
  (``source`` "popularity", ``fallback`` True);
- scores (user, item) pairs with calibrated probabilities, unknown ids flagged
  (``known_user`` / ``known_item``), never dropped.

Output columns, the same on every path: top-K rows ``userId, rank, movieId, score, fallback,
source`` (+ ``title``); pair rows ``userId, movieId, score, prediction_prob, predicted_class,
known_user, known_item``.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from app.core.publish import local_dir
from app.data.dataset import load_vocab
from app.data.validate import id_text
from app.train.export import pair_probabilities
from app.train.metrics import Product, UserItems, score_rows, top_k
from app.train.model_folder import (
    item_popularity,
    load_exported,
    read_model_json,
    read_rated_items,
)

# a call that ranks at least this many users (batch inference) scores through a transposed,
# padded copy of the catalog into a reused block per thread (app.train.metrics.Product); a
# smaller one (a real-time request) multiplies by the item embeddings as they are
BATCH_ROWS = 256

SOURCES = np.array(["history", "model", "popularity"])  # a list's ``source``, sorted
_SOURCE_TEXT = pa.array(SOURCES)


def id_keys(values: Any) -> pd.Series:
    """Raw ids -> their exact text (the rule of :func:`app.data.validate.id_text`: ``007`` stays
    ``007``, ``1.0`` is ``1``); missing and non-integral float ids -> missing."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        col = values
    else:
        values = list(values) if not isinstance(values, (pd.Series, np.ndarray)) else values
        try:
            col = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types (1 and "a"): as text
            col = pa.array([None if v is None or v is pd.NA else str(v) for v in values],
                           pa.string())
    text, bad = id_text(col)
    return pc.if_else(bad, None, text).to_pandas().astype("string")


def vocab_index(vocab_ids: pa.Array) -> pd.Index:
    """A vocabulary's ids as the text :func:`lookup` matches (an int64 vocabulary holds only
    integers written as int64 writes them, so its decimal text is exactly its ids)."""
    return pd.Index(pc.cast(vocab_ids, pa.string()).to_pandas().astype("string"))


def lookup(index: pd.Index, keys: pd.Series) -> np.ndarray:
    """Id texts (:func:`id_keys`) -> vocabulary indices (1..N), 0 for unknown or missing."""
    pos = index.get_indexer(pd.Index(keys))
    return (pos + 1).astype(np.int64)


def _column(values: Any) -> Any:
    """Ids as given (a Series or an array stays as it is; any other sequence becomes an
    object Series, so mixed types keep their own)."""
    if isinstance(values, (pd.Series, np.ndarray)):
        return values
    return pd.Series(list(values), dtype=object)


def mips_augment(items: np.ndarray) -> np.ndarray:
    """Items (N, D) -> (N, D + 1) with a last coordinate sqrt(M^2 - |x|^2), M the largest
    norm: every item then has norm M, so for a query padded with 0 the L2 order equals the
    inner-product order (Bachrach et al., 2014). The index ranks by dot product exactly as the
    model does; HNSW builds a far better graph in L2 than with METRIC_INNER_PRODUCT (on
    movielens-small, recall@100 0.996 against 0.87 at the same search breadth)."""
    norms = np.linalg.norm(items, axis=1)
    extra = np.sqrt(np.maximum(norms.max() ** 2 - norms ** 2, 0.0))
    return np.ascontiguousarray(np.hstack([items, extra[:, None]]), dtype=np.float32)


def build_faiss(items: np.ndarray, m: int, ef_search: int) -> Any:
    """An HNSW index that ranks items by inner product (see :func:`mips_augment`). Row i of
    ``items`` is item index i; index 0 (unknown) is left out, so faiss row r is item r + 1."""
    import faiss

    vectors = mips_augment(items[1:])
    index = faiss.IndexHNSWFlat(vectors.shape[1], m)
    index.hnsw.efConstruction = max(2 * m, 128)
    index.add(vectors)
    index.hnsw.efSearch = ef_search
    return index


class Recommender:
    """A loaded model folder.

    Args:
        model_dir: a model folder (see :mod:`app.train.export`), a versioned folder or a URI (its
            published version, read once).
        device: where the towers run.
        rated: the items left out per user: ``"model"`` (the folder's :data:`RATED_FILE`),
            a :class:`UserItems`, or None (nothing left out but given histories).
        items: the item embeddings (num_items, D), when already computed.
        faiss_index: a serialized FAISS index (:func:`build_faiss`) to search instead of
            exact top-K.
        ef_search: the index's search breadth.
        version: what responses name as the model's version (default: the first 12 hex
            digits of the weights' sha256, so a label always means one set of weights).
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", *,
                 rated: Any = "model", items: Optional[np.ndarray] = None,
                 faiss_index: Optional[bytes] = None, ef_search: int = 128,
                 version: Optional[str] = None) -> None:
        self.model_dir = model_dir = local_dir(model_dir)  # one version, however long we serve
        self.device = torch.device(device)
        self.model = load_exported(model_dir, map_location=self.device)
        self.info = info = read_model_json(model_dir)
        self.version = version or (info.weights_sha256 or "unsealed")[:12]
        self.calibration = info.calibration
        vocab = load_vocab(model_dir)  # every id once, or a one-line error
        self.user_ids = vocab["users"]["id"].to_pandas()
        self.item_ids = vocab["items"]["id"].to_pandas()
        self.item_id_text = np.asarray(vocab_index(vocab["items"]["id"]), dtype=object)
        # each item's title (an Arrow array: taken for a list's rows without a copy per row)
        self.titles = (vocab["items"]["title"].combine_chunks()
                       if "title" in vocab["items"].column_names else None)
        self._user_index = vocab_index(vocab["users"]["id"])
        self._item_index = vocab_index(vocab["items"]["id"])
        self.popularity = item_popularity(model_dir).astype(np.float32)
        self.popular = np.argsort(-self.popularity[1:], kind="stable") + 1
        self.rated: Optional[UserItems] = read_rated_items(model_dir) if rated == "model" \
            else rated
        if items is None:
            with torch.no_grad():
                n = self.model.spec.num_items
                self.item_embeddings = torch.cat([
                    self.model.item_embeddings(torch.arange(s, min(n, s + 65536),
                                                            device=self.device))
                    for s in range(0, n, 65536)])                              # (num_items, D)
        else:  # the object store's arrays are read-only: a copy, on the device
            self.item_embeddings = torch.tensor(items, device=self.device)
        self.num_items = len(self.item_embeddings)
        self._catalog: Optional[Product] = None  # the items transposed and padded (batches)
        self._products = threading.local()          # each thread's block of scores (batches)
        self.faiss = None
        if faiss_index is not None:
            import faiss

            self.faiss = faiss.deserialize_index(faiss_index)
            self.faiss.hnsw.efSearch = ef_search
        # score this many users at once: (users, items) floats kept to ~64 MB
        self.chunk = max(1, min(4096, (1 << 24) // max(self.num_items, 1)))
        self.unknown_history_items = 0

    # ids --------------------------------------------------------------------------------------

    def user_indices(self, user_ids: Any) -> np.ndarray:
        """Raw user ids (any type; matched by exact text) -> indices, 0 for unknown ids."""
        return lookup(self._user_index, id_keys(user_ids))

    def item_indices(self, item_ids: Any) -> np.ndarray:
        """Raw item ids (any type; matched by exact text) -> indices, 0 for unknown ids."""
        return lookup(self._item_index, id_keys(item_ids))

    def history_rows(self, lists: Sequence[Any]) -> tuple[list, np.ndarray]:
        """Lists of raw item ids (or None) -> per row, the known items' indices, or None where
        no list was given or none of its items is known (a history of unknown items says
        nothing about the user: the stored profile, or popularity, answers); and per row the
        number of unknown item ids ignored (U,)."""
        out, unknown = [], np.zeros(len(lists), np.int64)
        for row, ids in enumerate(lists):
            if ids is None or (not isinstance(ids, (list, tuple, np.ndarray))
                               and pd.isna(ids)):
                out.append(None)
                continue
            idx = self.item_indices(list(ids)) if len(ids) else np.empty(0, np.int64)
            unknown[row] = int((idx == 0).sum())
            known = idx[idx > 0]
            out.append(known if len(known) else None)
        return out, unknown

    def histories(self, lists: Sequence[Any]) -> tuple[list, int]:
        """:meth:`history_rows` with the unknown item ids counted over all rows."""
        out, unknown = self.history_rows(lists)
        return out, int(unknown.sum())

    # ranking ----------------------------------------------------------------------------------

    def _queries(self, users: np.ndarray, given: Optional[list]) -> torch.Tensor:
        """Query embeddings (U, D); rows with a given history read it instead of the stored."""
        u = torch.from_numpy(users).to(self.device)
        if given is not None and any(g is not None for g in given):
            return self.model.user_embeddings_given(u, given)
        return self.model.user_embeddings(u)

    def _excluded(self, users: np.ndarray, given: Optional[list],
                  exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) pairs left out: the rated items of each known user and the items of
        any given history, on the rows whose ``exclude`` is True."""
        rows, items = (self.rated.rows_and_items(np.where(exclude, users, 0))
                       if self.rated is not None and exclude.any()
                       else (np.empty(0, np.int64), np.empty(0, np.int64)))
        extra = [(r, g) for r, g in enumerate(given or []) if g is not None and len(g)
                 and exclude[r]]
        if extra:
            rows = np.concatenate([rows] + [np.full(len(g), r) for r, g in extra])
            items = np.concatenate([items] + [np.asarray(g, np.int64) for _, g in extra])
        return rows, items

    def _exact(self, users: np.ndarray, given: Optional[list], exclude: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
        q = self._queries(users, given)
        rows, items = self._excluded(users, given, exclude)
        values = np.empty((len(users), k), np.float32)
        indices = np.empty((len(users), k), np.int64)
        step = score_rows(self.num_items, cap=len(users))
        product = self._product(len(users))
        for s in range(0, len(users), step):  # the queries in one call, scores in cache-sized parts
            e = min(len(users), s + step)
            scores = product(q[s:e])                                        # (rows, num_items)
            scores[:, 0] = float("-inf")  # the unknown-item row is never recommended
            mine = (rows >= s) & (rows < e) if step < len(users) else slice(None)
            if len(rows):
                scores[torch.from_numpy(rows[mine] - s).to(self.device),
                       torch.from_numpy(items[mine]).to(self.device)] = float("-inf")
            top_values, top_indices = top_k(scores, k)
            values[s:e], indices[s:e] = top_values.cpu().numpy(), top_indices.cpu().numpy()
        return values, indices

    def _product(self, n_users: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Queries (u, D) -> scores of every item (u, num_items) for a call of ``n_users``.

        From :data:`BATCH_ROWS` users on (batch inference), one
        :class:`~app.train.metrics.Product` per thread, kept across calls: the catalog is
        transposed and padded to 64-byte rows once (an odd width runs the product at half
        speed) and the scores go into one reused block (a new 64 MB block per call pays its
        page faults): the top 100 of 4,096 users at 50,000 items, 64 dimensions, on one
        thread, in 0.7 s against 1.4 s. A smaller call (a real-time request) multiplies by
        the item embeddings as they are, so a replica that only answers requests holds no
        copy of the catalog.
        """
        if n_users < BATCH_ROWS:
            return lambda part: part @ self.item_embeddings.T
        if self._catalog is None:
            self._catalog = Product(self.item_embeddings)
        if not hasattr(self._products, "product"):
            self._products.product = Product(share=self._catalog)
        return self._products.product

    def _approximate(self, users: np.ndarray, given: Optional[list], exclude: np.ndarray,
                     k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._queries(users, given).cpu().numpy()
        ex_rows, ex_items = self._excluded(users, given, exclude)
        order = np.argsort(ex_rows, kind="stable")  # each row's excluded items
        per_row = np.split(ex_items[order],
                           np.searchsorted(ex_rows[order], np.arange(1, len(users))))
        extra = max((len(r) for r in per_row), default=0)
        want = min(k + extra, self.num_items - 1)
        padded = np.hstack([q, np.zeros((len(q), 1), q.dtype)]).astype(np.float32)
        _, found = self.faiss.search(padded, want)
        found = np.where(found >= 0, found + 1, 0)  # faiss row i is item index i + 1
        items = self.item_embeddings.cpu().numpy()
        out_s = np.full((len(users), k), -np.inf, np.float32)
        out_i = np.zeros((len(users), k), np.int64)
        for row in range(len(users)):  # drop left-out items, keep the first k
            keep = (found[row] > 0) & ~np.isin(found[row], per_row[row])
            i = found[row][keep][:k]
            s = items[i] @ q[row]  # the model's own dot products, in descending order
            order = np.argsort(-s, kind="stable")
            out_s[row, : len(i)], out_i[row, : len(i)] = s[order], i[order]
        return out_s, out_i

    @torch.no_grad()
    def top_k(self, users: np.ndarray, k: int, given: Optional[list] = None,
              exclude_rated: Any = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (U, k), item indices (U, k), source (U,)) for user indices.

        Rows with a ``given`` history (item indices) are queried with it (an empty one counts
        as none); rows neither known nor with a history get the most popular items (scores =
        training positives). Left-out
        items may leave a row short: its tail has score -inf and item 0.

        Args:
            users: user indices (0: unknown).
            k: list length (at most the catalog).
            given: per row, item indices of a history or None.
            exclude_rated: True/False, or a bool per row.
        """
        users = np.asarray(users, np.int64)
        n = len(users)
        exclude = np.broadcast_to(np.asarray(exclude_rated, bool), (n,))
        k = min(k, self.num_items - 1)
        if given is not None:  # an empty history (no known item) is no history
            given = [g if g is not None and len(g) else None for g in given]
        has_history = (np.array([g is not None for g in given], bool) if given is not None
                       else np.zeros(n, bool))
        if not self.model.spec.history_length:
            has_history[:] = False  # a model without the feature: histories do not apply
            given = None
        modelled = (users > 0) | has_history
        scores = np.zeros((n, k), np.float32)
        items = np.zeros((n, k), np.int64)
        rows = np.flatnonzero(modelled)
        rank = self._approximate if self.faiss is not None else self._exact
        for start in range(0, len(rows), self.chunk):
            part = rows[start:start + self.chunk]
            g = [given[r] for r in part] if given is not None else None
            scores[part], items[part] = rank(users[part], g, exclude[part], k)
        if (~modelled).any():  # neither known nor a history: the most popular items, flagged
            items[~modelled] = self.popular[:k]
            scores[~modelled] = self.popularity[self.popular[:k]]
        source = np.where(has_history, "history", np.where(modelled, "model", "popularity"))
        return scores, items, source

    def recommend(self, user_ids: Any, k: int = 10, histories: Optional[Sequence[Any]] = None,
                  exclude_rated: bool = True, *, given: Optional[list] = None
                  ) -> pd.DataFrame:
        """Top-k items per user: columns userId (as given), rank, movieId, score, fallback,
        source (+ title).

        Args:
            user_ids: raw user ids.
            k: items per user.
            histories: per user, a list of raw item ids it interacted with recently (oldest
                first) or None. A user with one is recommended from it (``source``
                "history"); unknown item ids are ignored (counted in
                ``self.unknown_history_items``), and a history with no known item is no
                history (the stored profile of a known user, popularity for a new one).
            exclude_rated: leave out each user's rated items and its history's items.
            given: histories already as item indices (instead of ``histories``).

        Users neither known nor with a history get the k most popular items (``fallback``
        True, ``source`` "popularity", score = the item's training positives). A user who
        rated almost the whole catalog gets a shorter list.
        """
        ids = _column(user_ids)
        users = self.user_indices(ids)
        if histories is not None:
            given, self.unknown_history_items = self.histories(histories)
        scores, items, source = self.top_k(users, k, given, exclude_rated)
        k = scores.shape[1]
        flat = items.ravel()
        row = np.maximum(flat - 1, 0)
        # text columns are taken from Arrow arrays of their values: a numpy array of 100,000
        # strings costs pandas 15 ms to convert, Arrow's take 0.6
        code = np.searchsorted(SOURCES, source)
        out = pd.DataFrame({
            "userId": np.repeat(np.asarray(ids), k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            "movieId": self.item_ids.to_numpy()[row],
            "score": scores.ravel(),
            "fallback": np.repeat(source == "popularity", k),
            "source": _SOURCE_TEXT.take(np.repeat(code, k)).to_pandas()})
        if self.titles is not None:
            out["title"] = self.titles.take(row).to_pandas()
        keep = np.isfinite(scores.ravel()) & (flat > 0)
        return out if keep.all() else out[keep].reset_index(drop=True)

    @torch.no_grad()
    def score_pairs(self, user_ids: Any, item_ids: Any) -> pd.DataFrame:
        """Scores of (user, item) pairs: userId, movieId (as given), score (the towers' dot
        product), prediction_prob (calibrated, see ``model.json``), predicted_class,
        known_user, known_item. Pairs with an unknown id keep their row with NaN scores."""
        users, items = _column(user_ids), _column(item_ids)
        u, i = self.user_indices(users), self.item_indices(items)
        known = (u > 0) & (i > 0)
        score = np.full(len(u), np.nan, np.float32)
        if known.any():
            s = self.model.score(torch.from_numpy(u[known]).to(self.device),
                                 torch.from_numpy(i[known]).to(self.device))
            score[known] = s.cpu().numpy()
        prob, cls = pair_probabilities(score, known, self.calibration)
        return pd.DataFrame({"userId": np.asarray(users), "movieId": np.asarray(items),
                             "score": score, "prediction_prob": prob, "predicted_class": cls,
                             "known_user": u > 0, "known_item": i > 0})
