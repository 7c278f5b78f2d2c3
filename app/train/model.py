"""The two-tower retrieval model, split by role.

- :class:`TwoTower`: the towers. A query tower (user id and the bag of the user's recent
  positive items) and a candidate tower (item id, genres, release year), each a TorchRec
  ``EmbeddingBagCollection`` followed by an MLP and a linear projection, optionally
  L2-normalised; a pair is scored by the dot product of the two tower outputs.
- :class:`~app.train.objectives.TwoTowerTrainTask`: the towers plus the training objective (``bce``, or a softmax
  whose negatives are the whole catalog, in-batch positives, or a fixed mix of in-batch and
  uniformly sampled items); its ``forward(batch) -> (loss, output)`` is what TorchRec's train
  pipelines expect.
- :class:`~app.train.batches.BatchMaker`: training and evaluation batches as TorchRec
  ``KeyedJaggedTensor`` s.
- The export (:mod:`app.train.export`): the same towers in plain PyTorch, loadable in one process
  without TorchRec's distributed runtime; :func:`app.train.export.export_state_dict` converts
  between the two.

TorchRec is imported inside functions, so a driver process (which may have no GPU, or no
fbgemm kernels that match it) can import this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
