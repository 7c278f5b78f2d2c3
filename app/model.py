"""The two-tower retrieval model, split by role.

- :class:`TwoTower`: the towers. A query tower (user features) and a candidate tower (item
  features), each a TorchRec ``EmbeddingBagCollection`` followed by an MLP and a linear
  projection; a pair is scored by the dot product of the two tower outputs.
- :class:`TwoTowerTrainTask`: the towers plus the training objective (``bce`` or in-batch
  sampled ``softmax``); its ``forward(batch) -> (loss, output)`` is what TorchRec's train
  pipelines expect.
- The export (:mod:`app.export`): the same towers in plain PyTorch, loadable in one process
  without TorchRec's distributed runtime; :func:`app.export.export_state_dict` converts
  between the two.

TorchRec is imported inside functions, so a driver process (which may have no GPU, or no
fbgemm kernels that match it) can import this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.dataset import ItemFeatures

# Feature (KeyedJaggedTensor key) -> embedding table name.
TABLES = {"user_id": "t_user_id", "item_id": "t_item_id", "item_genres": "t_item_genres"}
QUERY_FEATURES = ("user_id",)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes that fix the model's shape; saved with every model.

    ``num_users`` / ``num_items`` / ``num_genres`` are table rows, index 0 included (unknown);
    ``num_genres`` is 0 when the candidate tower has no genre feature.
    """

    num_users: int
    num_items: int
    num_genres: int
    embedding_dim: int
    tower_layers: tuple[int, ...]
    objective: str = "softmax"
    temperature: float = 0.05

    @property
    def output_dim(self) -> int:
        return int(self.tower_layers[-1])

    def candidate_features(self) -> tuple[str, ...]:
        return ("item_id", "item_genres") if self.num_genres else ("item_id",)

    def table_rows(self) -> dict[str, int]:
        """Feature name -> rows of its table."""
        rows = {"user_id": self.num_users, "item_id": self.num_items}
        if self.num_genres:
            rows["item_genres"] = self.num_genres
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tower_layers": list(self.tower_layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**{**d, "tower_layers": tuple(int(x) for x in d["tower_layers"])})


def _tables(spec: ModelSpec, features: tuple[str, ...]) -> list[Any]:
    from torchrec import EmbeddingBagConfig

    rows = spec.table_rows()
    return [EmbeddingBagConfig(name=TABLES[f], feature_names=[f], num_embeddings=rows[f],
                               embedding_dim=spec.embedding_dim) for f in features]


class Tower(nn.Module):
    """Sum-pooled embeddings of the tower's features, concatenated -> MLP -> linear.

    The last layer is linear (no ReLU), so tower outputs can take any sign and dot products
    can rank both ways.
    """

    def __init__(self, tables: list[Any], layers: tuple[int, ...], *,
                 table_device: torch.device, device: torch.device) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection
        from torchrec.modules.mlp import MLP

        self.ebc = EmbeddingBagCollection(tables=tables, device=table_device)
        width = sum(t.embedding_dim for t in tables)
        hidden = [int(x) for x in layers[:-1]]
        self.mlp: nn.Module = MLP(width, hidden, device=device) if hidden else nn.Identity()
        self.proj = nn.Linear(hidden[-1] if hidden else width, int(layers[-1]), device=device)

    def forward(self, kjt: Any) -> torch.Tensor:
        """KeyedJaggedTensor of B rows -> (B, output_dim)."""
        return self.proj(self.mlp(self.ebc(kjt).values()))


class TwoTower(nn.Module):
    """Query tower over user features, candidate tower over item features.

    Args:
        spec: table sizes and layer widths.
        table_device: where embedding tables are built; ``meta`` for training, so that
            ``DistributedModelParallel`` materialises only each rank's shards.
        device: where the dense layers live.
    """

    def __init__(self, spec: ModelSpec, *, table_device: torch.device = torch.device("meta"),
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.spec = spec
        self.query = Tower(_tables(spec, QUERY_FEATURES), spec.tower_layers,
                           table_device=table_device, device=device)
        self.candidate = Tower(_tables(spec, spec.candidate_features()), spec.tower_layers,
                               table_device=table_device, device=device)

    def forward(self, query_kjt: Any, candidate_kjt: Any) -> torch.Tensor:
        """Dot-product score of each (query row, candidate row) pair: (B,)."""
        return (self.query(query_kjt) * self.candidate(candidate_kjt)).sum(-1)


@dataclass
class TwoTowerBatch:
    """One training batch: query features, candidate features, labels, item indices.

    Implements the ``Pipelineable`` protocol (``to``, ``record_stream``, ``pin_memory``) that
    TorchRec's sparse-dist train pipeline uses to copy batches to the GPU ahead of time.
    """

    query: Any        # KeyedJaggedTensor (user_id)
    candidate: Any    # KeyedJaggedTensor (item_id[, item_genres])
    labels: torch.Tensor  # (B,) float 0/1
    items: torch.Tensor   # (B,) int64, for log-Q correction and accidental-hit masking

    def to(self, device: torch.device, non_blocking: bool = False) -> "TwoTowerBatch":
        return TwoTowerBatch(self.query.to(device, non_blocking=non_blocking),
                             self.candidate.to(device, non_blocking=non_blocking),
                             self.labels.to(device, non_blocking=non_blocking),
                             self.items.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: Any) -> None:
        self.query.record_stream(stream)
        self.candidate.record_stream(stream)
        self.labels.record_stream(stream)
        self.items.record_stream(stream)

    def pin_memory(self) -> "TwoTowerBatch":
        return TwoTowerBatch(self.query.pin_memory(), self.candidate.pin_memory(),
                             self.labels.pin_memory(), self.items.pin_memory())

    def __len__(self) -> int:
        return len(self.labels)


def query_kjt(users: np.ndarray) -> Any:
    """User indices (B,) -> KeyedJaggedTensor with one ``user_id`` value per row."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id"], values=values, lengths=torch.ones(len(values), dtype=torch.int64))


def candidate_kjt(items: np.ndarray, genres: Optional[ItemFeatures] = None) -> Any:
    """Item indices (B,) -> KeyedJaggedTensor: ``item_id`` (one per row) and, when given,
    ``item_genres`` (a bag of the item's genres per row). Built with array operations only."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    items = np.ascontiguousarray(items, dtype=np.int64)
    keys, values, lengths = ["item_id"], [items], [np.ones(len(items), np.int64)]
    if genres is not None:
        lens, vals = genres.lookup(items)
        keys.append("item_genres")
        values.append(vals)
        lengths.append(lens)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths)))


def make_batch(rows: dict[str, np.ndarray], genres: Optional[ItemFeatures] = None
               ) -> TwoTowerBatch:
    """Decoded rows (``user``, ``item``, ``label`` columns) -> a :class:`TwoTowerBatch`."""
    return TwoTowerBatch(query=query_kjt(rows["user"]),
                         candidate=candidate_kjt(rows["item"], genres),
                         labels=torch.from_numpy(rows["label"].astype(np.float32)),
                         items=torch.from_numpy(rows["item"].astype(np.int64)))


def bce_loss(query: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise objective: logit = dot product, binary cross-entropy against the label.

    Args:
        query, candidate: (B, D) tower outputs of the same rows.
        labels: (B,) 0/1.

    Returns:
        (mean loss, logits (B,)).
    """
    logits = (query * candidate).sum(-1)
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
        self.objective = model.spec.objective
        self.temperature = model.spec.temperature
        if log_q is None:
            log_q = torch.zeros(model.spec.num_items)
        self.register_buffer("log_q", log_q, persistent=False)

    def forward(self, batch: TwoTowerBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        q = self.model.query(batch.query)
        c = self.model.candidate(batch.candidate)
        if self.objective == "bce":
            loss, scores = bce_loss(q, c, batch.labels)
        else:
            loss, scores = sampled_softmax_loss(q, c, batch.labels, batch.items, self.log_q,
                                                self.temperature)
        return loss, (loss.detach(), scores.detach(), batch.labels)
