"""Training objectives of the two-tower model, and the train task TorchRec's pipelines run.

``bce`` (pointwise), and softmax losses whose negatives are the whole catalog, in-batch
positives, uniformly sampled items or a fixed mix, each corrected for how often a negative is
drawn (log-Q). :class:`TwoTowerTrainTask` is the towers plus the configured objective; its
``forward(batch) -> (loss, output)`` is what TorchRec's train pipelines expect.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.train.batches import TwoTowerBatch
from app.train.model import TwoTower


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
    q, c, it = query[pos] / temperature, candidate[pos], items[pos]   # (P, D), (P, D), (P,)
    logits = torch.addmm(-log_q[it], q, c.T)                          # (P, P)
    rows, cols = equal_pairs(it, it)
    off = rows != cols                                                # the diagonal stays
    logits = logits.index_put((rows[off], cols[off]), logits.new_tensor(float("-inf")))
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
    logits = (query[pos] / temperature) @ catalog.T                   # (P, N)
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
    # the temperature divides the (P, D) queries, not the (P, M') logits
    q, c, it = query[pos] / temperature, candidate[pos], items[pos]  # (P, D)
    m_in = min(int(in_batch), len(it))
    neg = torch.cat([c[:m_in], sampled])                              # (M', D)
    neg_items = torch.cat([it[:m_in], sampled_items])                 # (M',)
    uniform = len(sampled_items) / max(len(item_prob) - 1, 1)

    def log_expected(i: torch.Tensor) -> torch.Tensor:
        return torch.log(m_in * item_prob[i] + uniform + 1e-12)

    pos_logit = (q * c).sum(-1) - log_expected(it)                    # (P,)
    # one pass over the (P, M') logits: the product and the correction in one addmm
    neg_logits = torch.addmm(-log_expected(neg_items), q, neg.T)      # (P, M')
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], dim=1)   # (P, 1 + M')
    rows, cols = equal_pairs(it, neg_items)
    logits[rows, cols + 1] = float("-inf")  # in place: cat's backward does not need it
    target = torch.zeros(len(it), dtype=torch.int64, device=it.device)
    loss = F.cross_entropy(logits, target, reduction="sum") / pos.sum().clamp(min=1)
    return loss, (query * candidate).sum(-1)


def equal_pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (i, j) with ``a[i] == b[j]``, found by sorting ``b`` (O((|a| + |b|) log |b|)),
    not by comparing every pair: the accidental hits of a sampled softmax are few."""
    order = torch.argsort(b)
    sorted_b = b[order]
    lo = torch.searchsorted(sorted_b, a)
    counts = torch.searchsorted(sorted_b, a, right=True) - lo         # matches of each a[i]
    rows = torch.repeat_interleave(torch.arange(len(a), device=a.device), counts)
    first = torch.repeat_interleave(lo, counts)
    within = torch.arange(len(rows), device=a.device) \
        - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return rows, order[first + within]


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
