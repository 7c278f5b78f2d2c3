"""The two-tower retrieval model, split by role.

- :class:`TwoTower`: the towers. A query tower (user id and the bag of the user's recent
  positive items) and a candidate tower (item id, genres, release year), each a TorchRec
  ``EmbeddingBagCollection`` followed by an MLP and a linear projection, optionally
  L2-normalised; a pair is scored by the dot product of the two tower outputs.
- :class:`TwoTowerTrainTask`: the towers plus the training objective (``bce``, or a softmax
  whose negatives are the whole catalog, in-batch positives, or a fixed mix of in-batch and
  uniformly sampled items); its ``forward(batch) -> (loss, output)`` is what TorchRec's train
  pipelines expect.
- The export (:mod:`app.train.export`): the same towers in plain PyTorch, loadable in one process
  without TorchRec's distributed runtime; :func:`app.train.export.export_state_dict` converts
  between the two.

TorchRec is imported inside functions, so a driver process (which may have no GPU, or no
fbgemm kernels that match it) can import this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.data.dataset import ItemFeatures

# Feature (KeyedJaggedTensor key) -> embedding table name.
TABLES = {"user_id": "t_user_id", "user_history": "t_user_history", "item_id": "t_item_id",
          "item_genres": "t_item_genres", "item_year": "t_item_year"}
MEAN_POOLED = ("user_history",)  # a history's length should not scale its embedding
NEGATIVES = ("catalog", "mixed", "in_batch")


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and choices that fix the model's function; saved with every model.

    ``num_users`` / ``num_items`` / ``num_genres`` / ``num_years`` are table rows, index 0
    included (unknown); a feature with 0 rows is not used. ``history_length`` is the number of
    recent positives in the query tower's history bag (0: no history feature).
    """

    num_users: int
    num_items: int
    num_genres: int
    embedding_dim: int
    tower_layers: tuple[int, ...]
    objective: str = "softmax"
    temperature: float = 0.05
    num_years: int = 0
    history_length: int = 0
    use_user_id: bool = True
    normalize: bool = False
    negatives: str = "in_batch"
    in_batch_negatives: int = 0    # mixed: at most this many of the batch's positives
    sampled_negatives: int = 0     # mixed: uniformly sampled catalog items per batch

    @property
    def output_dim(self) -> int:
        return int(self.tower_layers[-1])

    def query_features(self) -> tuple[str, ...]:
        return (("user_id",) if self.use_user_id else ()) + \
            (("user_history",) if self.history_length else ())

    def candidate_features(self) -> tuple[str, ...]:
        return ("item_id",) + (("item_genres",) if self.num_genres else ()) + \
            (("item_year",) if self.num_years else ())

    def table_rows(self) -> dict[str, int]:
        """Feature name -> rows of its table, for the features this model uses."""
        rows = {"user_id": self.num_users, "user_history": self.num_items,
                "item_id": self.num_items, "item_genres": self.num_genres,
                "item_year": self.num_years}
        return {f: rows[f] for f in self.query_features() + self.candidate_features()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tower_layers": list(self.tower_layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known},
                      "tower_layers": tuple(int(x) for x in d["tower_layers"])})


def _tables(spec: ModelSpec, features: tuple[str, ...]) -> list[Any]:
    from torchrec import EmbeddingBagConfig, PoolingType

    rows = spec.table_rows()
    return [EmbeddingBagConfig(name=TABLES[f], feature_names=[f], num_embeddings=rows[f],
                               embedding_dim=spec.embedding_dim,
                               pooling=PoolingType.MEAN if f in MEAN_POOLED else PoolingType.SUM)
            for f in features]


class Tower(nn.Module):
    """Pooled embeddings of the tower's features, concatenated -> MLP -> linear [-> L2 norm].

    The last layer is linear (no ReLU), so tower outputs can take any sign and dot products
    can rank both ways; normalised outputs make the dot product a cosine.
    """

    def __init__(self, tables: list[Any], layers: tuple[int, ...], *, normalize: bool,
                 table_device: torch.device, device: torch.device) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection
        from torchrec.modules.mlp import MLP

        self.ebc = EmbeddingBagCollection(tables=tables, device=table_device)
        self.features = [t.feature_names[0] for t in tables]
        width = sum(t.embedding_dim for t in tables)
        hidden = [int(x) for x in layers[:-1]]
        self.mlp: nn.Module = MLP(width, hidden, device=device) if hidden else nn.Identity()
        self.proj = nn.Linear(hidden[-1] if hidden else width, int(layers[-1]), device=device)
        self.normalize = normalize

    def forward(self, kjt: Any) -> torch.Tensor:
        """KeyedJaggedTensor of B rows -> (B, output_dim)."""
        pooled = self.ebc(kjt).to_dict()
        # by name: a sharded collection orders its output by sharding type, not table order
        out = self.proj(self.mlp(torch.cat([pooled[f] for f in self.features], dim=1)))
        return F.normalize(out, dim=-1) if self.normalize else out


class TwoTower(nn.Module):
    """Query tower over user features, candidate tower over item features.

    Args:
        spec: table sizes, features and layer widths.
        table_device: where embedding tables are built; ``meta`` for training, so that
            ``DistributedModelParallel`` materialises only each rank's shards.
        device: where the dense layers live.
    """

    def __init__(self, spec: ModelSpec, *, table_device: torch.device = torch.device("meta"),
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.spec = spec
        self.query = Tower(_tables(spec, spec.query_features()), spec.tower_layers,
                           normalize=spec.normalize, table_device=table_device, device=device)
        self.candidate = Tower(_tables(spec, spec.candidate_features()), spec.tower_layers,
                               normalize=spec.normalize, table_device=table_device,
                               device=device)

    def forward(self, query_kjt: Any, candidate_kjt: Any) -> torch.Tensor:
        """Dot-product score of each (query row, candidate row) pair: (B,)."""
        return (self.query(query_kjt) * self.candidate(candidate_kjt)).sum(-1)


@dataclass
class TwoTowerBatch:
    """One training batch: query features, candidate features, labels, item indices.

    ``candidate`` holds the rows' items followed by ``extra_items`` (sampled negatives), or,
    when the task's negatives are the whole catalog, every item index 0..N-1 and nothing else.

    Implements the ``Pipelineable`` protocol (``to``, ``record_stream``, ``pin_memory``) that
    TorchRec's sparse-dist train pipeline uses to copy batches to the GPU ahead of time.
    """

    query: Any        # KeyedJaggedTensor (user_id, user_history)
    candidate: Any    # KeyedJaggedTensor (item_id[, item_genres][, item_year])
    labels: torch.Tensor  # (B,) float 0/1
    items: torch.Tensor   # (B,) int64, for log-Q correction and accidental-hit masking
    extra_items: torch.Tensor  # (M,) int64 candidates after the rows' (sampled negatives)

    def _map(self, fn: Any) -> "TwoTowerBatch":
        return TwoTowerBatch(*(fn(getattr(self, f.name)) for f in fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False) -> "TwoTowerBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: Any) -> None:
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> "TwoTowerBatch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return len(self.labels)


def _kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64)))


def query_kjt(users: np.ndarray, history: Optional[tuple[np.ndarray, np.ndarray]] = None, *,
              use_user_id: bool = True) -> Any:
    """User indices (B,) and, when the model reads histories, each row's history bag
    (``(lengths (B,), item indices)``) -> the query tower's KeyedJaggedTensor."""
    users = np.ascontiguousarray(users, dtype=np.int64)
    keys, values, lengths = [], [], []
    if use_user_id:
        keys.append("user_id")
        values.append(users)
        lengths.append(np.ones(len(users), np.int64))
    if history is not None:
        keys.append("user_history")
        lengths.append(history[0])
        values.append(history[1])
    return _kjt(keys, values, lengths)


def candidate_kjt(items: np.ndarray, features: Sequence[ItemFeatures] = ()) -> Any:
    """Item indices (B,) -> KeyedJaggedTensor: ``item_id`` (one per row) and a bag per item
    feature (genres, year), in the given order. Built with array operations only."""
    items = np.ascontiguousarray(items, dtype=np.int64)
    keys, values, lengths = ["item_id"], [items], [np.ones(len(items), np.int64)]
    for feature in features:
        lens, vals = feature.lookup(items)
        keys.append(feature.name)
        values.append(vals)
        lengths.append(lens)
    return _kjt(keys, values, lengths)


@dataclass
class BatchMaker:
    """Turns decoded rows into :class:`TwoTowerBatch` es for one model.

    Args:
        spec: the model (which features, which negatives).
        item_features: the candidate tower's item features, in the spec's order.
        history: the users' positives in time order (:class:`app.data.history.UserHistory`); a row's
            history bag holds positives strictly before the row's timestamp only.
        seed: seed of the sampled negatives and of history dropout.
        history_dropout: share of history items dropped at random from training batches
            (denoising, as in Mult-DAE: the towers cannot memorise a user's exact bag).
        user_id_dropout: share of training rows whose user id is replaced by 0 (unknown) and
            whose history is kept whole, so the query tower also learns to recommend from a
            history alone (new users).
    """

    spec: ModelSpec
    item_features: Sequence[ItemFeatures] = ()
    history: Any = None
    seed: int = 0
    history_dropout: float = 0.0
    user_id_dropout: float = 0.0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._catalog = None

    def reseed(self, seed: int) -> None:
        """Restart the negatives' random stream (per epoch, so a resumed run samples alike)."""
        self._rng = np.random.default_rng(seed)

    def query(self, users: np.ndarray, history: Optional[tuple[np.ndarray, np.ndarray]] = None
              ) -> Any:
        """Query KJT of users; their latest history unless a jagged history is given."""
        if self.spec.history_length and history is None:
            history = self.history.latest(users, self.spec.history_length)
        return query_kjt(users, history if self.spec.history_length else None,
                         use_user_id=self.spec.use_user_id)

    def candidate(self, items: np.ndarray) -> Any:
        return candidate_kjt(items, self.item_features)

    def __call__(self, rows: dict[str, np.ndarray], *, train: bool = False) -> TwoTowerBatch:
        """Decoded rows (``user``, ``item``, ``label``[, ``timestamp``]) -> a batch; ``train``
        applies history dropout."""
        spec = self.spec
        users = rows["user"]
        hidden = np.zeros(len(users), bool)  # rows that play a new user: id hidden
        if train and self.user_id_dropout > 0 and spec.use_user_id:
            hidden = self._rng.random(len(users)) < self.user_id_dropout
            users = np.where(hidden, 0, users)
        history = None
        if spec.history_length:
            history = self.history.before(rows["user"], rows["timestamp"], rows["item"],
                                          spec.history_length)
            if train and self.history_dropout > 0:
                # a row whose id is hidden keeps its whole history, as a new user brings it
                lengths, values = history
                rows_of = np.repeat(np.arange(len(lengths)), lengths)
                keep = (self._rng.random(len(values)) >= self.history_dropout) | hidden[rows_of]
                history = (np.bincount(rows_of[keep], minlength=len(lengths)), values[keep])
        extra = np.empty(0, np.int64)
        if spec.objective == "softmax" and spec.negatives == "catalog":
            if self._catalog is None:  # the same every batch: built once
                self._catalog = self.candidate(np.arange(spec.num_items))
            candidate = self._catalog
        else:
            if spec.objective == "softmax" and spec.negatives == "mixed":
                extra = self._rng.integers(1, spec.num_items, spec.sampled_negatives)
            candidate = self.candidate(np.concatenate([rows["item"].astype(np.int64), extra]))
        return TwoTowerBatch(query=query_kjt(users, history, use_user_id=spec.use_user_id),
                             candidate=candidate,
                             labels=torch.from_numpy(rows["label"].astype(np.float32)),
                             items=torch.from_numpy(rows["item"].astype(np.int64)),
                             extra_items=torch.from_numpy(extra.astype(np.int64)))


def bce_loss(query: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor,
             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise objective: logit = dot product * scale, binary cross-entropy against the label.

    Args:
        query, candidate: (B, D) tower outputs of the same rows.
        labels: (B,) 0/1.
        scale: 1 / temperature for normalised towers (a cosine alone cannot reach a
            confident logit), else 1.

    Returns:
        (mean loss, logits (B,)).
    """
    logits = (query * candidate).sum(-1) * scale
    return F.binary_cross_entropy_with_logits(logits, labels), logits


def sampled_softmax_loss(query: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor,
                         items: torch.Tensor, log_q: torch.Tensor, temperature: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch sampled softmax over the batch's positives.

    Every positive pair's query is scored against every positive candidate of the batch
    (P x P logits / temperature). The other candidates are the negatives; since they were
    sampled in proportion to their frequency among positives, each logit is corrected by
    subtracting log Q(item) (Yi et al., 2019). Another row of the batch with the same item is
    not a negative (an accidental hit): it is masked out.

    Args:
        query, candidate: (B, D) tower outputs of the same rows.
        labels: (B,) 0/1; only rows with label 1 take part.
        items: (B,) item index of each row.
        log_q: (num_items,) log sampling probability of each item.
        temperature: divides the logits.

    Returns:
        (mean loss over positives, or 0 when the batch has none; per-row dot products (B,)).
    """
    pos = labels > 0
    q, c, it = query[pos], candidate[pos], items[pos]                 # (P, D), (P, D), (P,)
    logits = q @ c.T / temperature - log_q[it].unsqueeze(0)           # (P, P)
    same_item = it.unsqueeze(0) == it.unsqueeze(1)
    diagonal = torch.eye(len(it), dtype=torch.bool, device=it.device)
    logits = logits.masked_fill(same_item & ~diagonal, float("-inf"))
    target = torch.arange(len(it), device=it.device)
    loss = F.cross_entropy(logits, target, reduction="sum") / pos.sum().clamp(min=1)
    return loss, (query * candidate).sum(-1)


def catalog_softmax_loss(query: torch.Tensor, catalog: torch.Tensor, labels: torch.Tensor,
                         items: torch.Tensor, temperature: float) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """Full softmax: each positive's query against every item of the catalog.

    Args:
        query: (B, D) query tower outputs.
        catalog: (N, D) candidate tower outputs of item indices 0..N-1 (0, unknown, is never
            a class).
        labels: (B,) 0/1; only rows with label 1 take part.
        items: (B,) item index of each row.
        temperature: divides the logits.

    Returns:
        (mean loss over positives, or 0 when the batch has none; per-row dot products (B,)).
    """
    pos = labels > 0
    logits = query[pos] @ catalog.T / temperature                     # (P, N)
    logits[:, 0] = float("-inf")
    loss = F.cross_entropy(logits, items[pos], reduction="sum") / pos.sum().clamp(min=1)
    return loss, (query * catalog[items]).sum(-1)


def mixed_softmax_loss(query: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor,
                       items: torch.Tensor, sampled: torch.Tensor, sampled_items: torch.Tensor,
                       item_prob: torch.Tensor, in_batch: int, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over a fixed number of negatives: up to ``in_batch`` of the batch's positive
    candidates plus M uniformly sampled catalog items (mixed negative sampling, Yang et al.,
    2020), so the cost per sample does not grow with the batch or the catalog.

    Sampled-softmax correction: every logit (the positive's too) is reduced by the log of the
    item's expected count among the negatives, ``m_in * P(item) + M / (N - 1)`` (P: frequency
    among training positives, the in-batch source; 1 / (N - 1): the uniform source). A
    negative equal to the row's own item (an accidental hit) is masked out.

    Args:
        query, candidate: (B, D) tower outputs of the same rows.
        labels: (B,) 0/1; only rows with label 1 take part.
        items: (B,) item index of each row.
        sampled: (M, D) candidate tower outputs of ``sampled_items`` (M,).
        item_prob: (num_items,) each item's frequency among training positives.
        in_batch: at most this many in-batch negatives.
        temperature: divides the logits.

    Returns:
        (mean loss over positives, or 0 when the batch has none; per-row dot products (B,)).
    """
    pos = labels > 0
    q, c, it = query[pos], candidate[pos], items[pos]                 # (P, D)
    m_in = min(int(in_batch), len(it))
    neg = torch.cat([c[:m_in], sampled])                              # (M', D)
    neg_items = torch.cat([it[:m_in], sampled_items])                 # (M',)
    uniform = len(sampled_items) / max(len(item_prob) - 1, 1)

    def log_expected(i: torch.Tensor) -> torch.Tensor:
        return torch.log(m_in * item_prob[i] + uniform + 1e-12)

    pos_logit = (q * c).sum(-1) / temperature - log_expected(it)      # (P,)
    neg_logits = q @ neg.T / temperature - log_expected(neg_items)    # (P, M')
    neg_logits = neg_logits.masked_fill(it.unsqueeze(1) == neg_items.unsqueeze(0),
                                        float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], dim=1)
    target = torch.zeros(len(it), dtype=torch.int64, device=it.device)
    loss = F.cross_entropy(logits, target, reduction="sum") / pos.sum().clamp(min=1)
    return loss, (query * candidate).sum(-1)


def log_sampling_probability(positive_counts: np.ndarray) -> torch.Tensor:
    """log Q(item) from each item's count among training positives (unseen items count 1)."""
    counts = np.maximum(positive_counts.astype(np.float64), 1.0)
    return torch.from_numpy(np.log(counts / counts.sum())).float()


class TwoTowerTrainTask(nn.Module):
    """The towers plus the training objective.

    ``forward(batch)`` returns ``(loss, (loss, scores, labels))`` (detached outputs), the
    contract of TorchRec's train pipelines.
    """

    def __init__(self, model: TwoTower, *, log_q: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.model = model
        self.spec = model.spec
        if log_q is None:
            log_q = torch.zeros(model.spec.num_items)
        self.register_buffer("log_q", log_q, persistent=False)

    def forward(self, batch: TwoTowerBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        spec = self.spec
        q = self.model.query(batch.query)                                 # (B, D)
        c_all = self.model.candidate(batch.candidate)                     # (B + M, D) or (N, D)
        if spec.objective == "bce":
            loss, scores = bce_loss(q, c_all, batch.labels,
                                    1.0 / spec.temperature if spec.normalize else 1.0)
        elif spec.negatives == "catalog":
            loss, scores = catalog_softmax_loss(q, c_all, batch.labels, batch.items,
                                                spec.temperature)
        elif spec.negatives == "mixed":
            n = len(batch.labels)
            loss, scores = mixed_softmax_loss(q, c_all[:n], batch.labels, batch.items,
                                              c_all[n:], batch.extra_items, self.log_q.exp(),
                                              spec.in_batch_negatives, spec.temperature)
        else:
            loss, scores = sampled_softmax_loss(q, c_all, batch.labels, batch.items,
                                                self.log_q, spec.temperature)
        return loss, (loss.detach(), scores.detach(), batch.labels)
