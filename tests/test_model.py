"""Unit tests of the model pieces: losses, the export conversion, metrics, placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.config import load_config
from app.data.dataset import ItemFeatures
from app.data.history import UserHistory
from app.train.batches import BatchMaker, query_kjt
from app.train.export import ExportedTwoTower, ModelError, export_state_dict
from app.train.metrics import UserItems, binary_auroc, finish, ranking_sums
from app.train.model import ModelSpec, TwoTower
from app.train.objectives import (
    TwoTowerTrainTask,
    bce_loss,
    catalog_softmax_loss,
    mixed_softmax_loss,
    sampled_softmax_loss,
)
from app.train.placement import Placement, ResourceError, check_resources, placement

SPEC = ModelSpec(num_users=30, num_items=40, num_genres=5, embedding_dim=8,
                 tower_layers=(16, 6))


def _genres() -> ItemFeatures:
    rng = np.random.default_rng(0)
    lengths = np.concatenate([[0], rng.integers(0, 4, SPEC.num_items - 1)])  # item 0: none
    values = rng.integers(1, SPEC.num_genres, int(lengths.sum()))
    return ItemFeatures("item_genres", np.concatenate([[0], np.cumsum(lengths)]), values,
                        [f"g{i}" for i in range(SPEC.num_genres)])


def _years() -> ItemFeatures:
    lengths = np.array([0] + [1] * (SPEC.num_items - 2) + [0])  # item 0 and the last: unknown
    values = np.arange(SPEC.num_items - 2) % 6 + 1
    return ItemFeatures("item_year", np.concatenate([[0], np.cumsum(lengths)]), values,
                        [str(y) for y in range(1990, 1997)])


def _history(spec: ModelSpec) -> UserHistory:
    rng = np.random.default_rng(3)
    users = rng.integers(1, spec.num_users, 200)
    return UserHistory.build(users, rng.integers(1, spec.num_items, 200),
                             rng.integers(0, 1000, 200), spec.num_users)


@pytest.mark.parametrize("variant", [
    {},
    {"num_years": 7, "history_length": 5, "normalize": True},
    {"num_years": 7, "history_length": 3, "use_user_id": False},
])
def test_export_computes_what_the_towers_compute(variant):
    torch.manual_seed(0)
    spec = ModelSpec(**{**SPEC.to_dict(), "tower_layers": SPEC.tower_layers, **variant})
    features = [_genres()] + ([_years()] if spec.num_years else [])
    history = _history(spec)
    towers = TwoTower(spec, table_device=torch.device("cpu"))
    for p in towers.parameters():  # tables start at zero-ish; make every weight matter
        torch.nn.init.normal_(p)
    exported = ExportedTwoTower(spec, features, history if spec.history_length else None)
    state = export_state_dict(TwoTowerTrainTask(towers).state_dict())
    exported.load_state_dict({**state, **exported.buffers_for()})
    maker = BatchMaker(spec, features, history)
    users = np.array([1, 5, 29, 0])
    items = np.array([0, 1, 7, 39, 12])
    with torch.no_grad():
        assert torch.allclose(towers.query(maker.query(users)),
                              exported.user_embeddings(torch.from_numpy(users)), atol=1e-5)
        assert torch.allclose(towers.candidate(maker.candidate(items)),
                              exported.item_embeddings(torch.from_numpy(items)), atol=1e-5)
        pair_users, pair_items = np.array([3, 4]), np.array([7, 9])
        assert torch.allclose(towers(maker.query(pair_users), maker.candidate(pair_items)),
                              exported.score(torch.from_numpy(pair_users),
                                             torch.from_numpy(pair_items)), atol=1e-5)
        if spec.history_length:  # a given history replaces the stored one
            given = (torch.tensor([3, 4, 4, 9]), torch.tensor([0, 2, 2, 4]))  # 2 rows + empty
            lengths = np.array([2, 0, 2, 0])
            want = towers.query(query_kjt(users, (lengths, given[0].numpy()),
                                          use_user_id=spec.use_user_id))
            assert torch.allclose(want, exported.user_embeddings(
                torch.from_numpy(users), (given[0], torch.tensor([0, 2, 2, 4]))), atol=1e-5)


def test_history_of_a_training_row_holds_only_earlier_positives():
    # user 1's positives in time order: 12 @50, 10 @100, 11 @200, 12 @300, 13 @400
    h = UserHistory.build(np.array([1, 1, 1, 1, 1, 2]), np.array([10, 11, 12, 13, 12, 20]),
                          np.array([100, 200, 300, 400, 50, 100]), num_users=3)
    users = np.array([1, 1, 2, 1, 1])
    stamps = np.array([300, 100, 100, 350, 401])
    targets = np.array([99, 10, 20, 12, 13])
    lengths, values = h.before(users, stamps, targets, n=2)
    rows = [r.tolist() for r in np.split(values, np.cumsum(lengths)[:-1])]
    assert rows == [
        [10, 11],  # before 300: the latest two; the planted future item 13 @400 is not used
        [12],      # before 100: only 12 @50 (the row's own item 10 @100 is not before it)
        [],        # user 2 has nothing before 100
        [11],      # before 350 the latest two are 11, 12: 12 is the target, left out
        [12],      # before 401 the latest two are 12, 13: 13 is the target, left out
    ]
    assert h.latest(np.array([1, 2, 0]), 3)[0].tolist() == [3, 1, 0]
    assert h.latest(np.array([1]), 3)[1].tolist() == [11, 12, 13]
    again = UserHistory.from_bytes(h.to_bytes())
    assert np.array_equal(again.items, h.items) and np.array_equal(again.offsets, h.offsets)


def test_catalog_softmax_is_a_full_softmax_over_known_items():
    torch.manual_seed(2)
    q, catalog = torch.randn(5, 4), torch.randn(9, 4)
    y = torch.tensor([1.0, 0, 1, 1, 0])
    items = torch.tensor([3, 1, 8, 3, 2])
    loss, scores = catalog_softmax_loss(q, catalog, y, items, 0.5)
    want = 0.0
    for i in (0, 2, 3):
        logits = q[i] @ catalog[1:].T / 0.5  # item 0 (unknown) is never a class
        want += float(torch.logsumexp(logits, 0) - logits[items[i] - 1])
    assert loss.item() == pytest.approx(want / 3, rel=1e-5)
    assert torch.allclose(scores, (q * catalog[items]).sum(1))


def test_mixed_negatives_correct_each_logit_by_its_expected_count():
    torch.manual_seed(3)
    q, c = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([1.0, 1, 0, 1, 1, 1])
    items = torch.tensor([2, 4, 5, 2, 6, 7])
    sampled_items = torch.tensor([4, 9, 1])
    sampled = torch.randn(3, 4)
    prob = torch.rand(10) + 0.05
    prob = prob / prob.sum()
    loss, _ = mixed_softmax_loss(q, c, y, items, sampled, sampled_items, prob, 2, 0.5)
    pos = [0, 1, 3, 4, 5]
    neg_rows = [c[0], c[1], *sampled]            # in-batch: the first 2 positives
    neg_items = [2, 4, *sampled_items.tolist()]

    def corrected(v, i):
        return float(q[r] @ v) / 0.5 - np.log(2 * float(prob[i]) + 3 / 9)

    want = 0.0
    for r in pos:
        logits = [corrected(c[r], int(items[r]))]
        logits += [corrected(v, i) for v, i in zip(neg_rows, neg_items) if i != int(items[r])]
        want += -logits[0] + float(torch.logsumexp(torch.tensor(logits), 0))
    assert loss.item() == pytest.approx(want / len(pos), rel=1e-5)


def test_batches_carry_the_negatives_of_their_objective():
    features = [_genres()]
    history = _history(SPEC)
    rows = {"user": np.array([1, 2, 3]), "item": np.array([4, 5, 6]),
            "label": np.array([1, 0, 1], np.uint8), "timestamp": np.array([500, 10, 999])}
    spec = ModelSpec(**{**SPEC.to_dict(), "tower_layers": SPEC.tower_layers,
                        "negatives": "mixed", "sampled_negatives": 7, "history_length": 4})
    batch = BatchMaker(spec, features, history)(rows)
    assert len(batch.extra_items) == 7 and batch.candidate.stride() == 3 + 7
    assert batch.query.keys() == ["user_id", "user_history"]
    catalog = ModelSpec(**{**spec.to_dict(), "tower_layers": SPEC.tower_layers,
                           "negatives": "catalog"})
    batch = BatchMaker(catalog, features, history)(rows)
    assert batch.candidate.stride() == SPEC.num_items and len(batch.extra_items) == 0
    # dropout (history items, user ids) applies to training batches only
    rows = {k: np.tile(v, 100) for k, v in rows.items()}  # 300 rows
    noisy = BatchMaker(spec, features, history, history_dropout=0.6)
    clean = noisy(rows).query.to_dict()
    dropped = noisy(rows, train=True).query.to_dict()
    assert dropped["user_history"].lengths().sum() < 0.6 * clean["user_history"].lengths().sum()
    assert (clean["user_id"].values() > 0).all()
    # a row playing a new user (id hidden) keeps its whole history
    cold = BatchMaker(spec, features, history, history_dropout=0.99, user_id_dropout=0.5)
    got = cold(rows, train=True).query.to_dict()
    hidden = (got["user_id"].values() == 0).numpy()
    assert hidden.mean() == pytest.approx(0.5, abs=0.1)
    full = clean["user_history"].lengths().numpy()
    assert np.array_equal(got["user_history"].lengths().numpy()[hidden], full[hidden])
    assert got["user_history"].lengths().numpy()[~hidden].sum() < 0.1 * full[~hidden].sum()
    for s in (spec, catalog):
        towers = TwoTower(s, table_device=torch.device("cpu"))
        loss, (_, scores, _) = TwoTowerTrainTask(towers)(BatchMaker(s, features, history)(rows))
        loss.backward()
        assert scores.shape == (300,) and torch.isfinite(loss)


def test_export_rejects_foreign_keys():
    with pytest.raises(ModelError, match="unexpected key.*dense_arch"):
        export_state_dict({"dense_arch.weight": torch.zeros(1)})


def test_bce_loss_is_the_pointwise_objective():
    q, c = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([1.0, 0, 1, 0, 0, 1])
    loss, logits = bce_loss(q, c, y)
    assert torch.allclose(logits, (q * c).sum(1))
    manual = -(y * torch.log(torch.sigmoid(logits))
               + (1 - y) * torch.log(1 - torch.sigmoid(logits))).mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def _softmax_reference(q, c, y, items, log_q, t):
    """Row by row: each positive against every other positive that is not the same item."""
    pos = [i for i in range(len(y)) if y[i] > 0]
    total = 0.0
    for i in pos:
        logits = []
        for j in pos:
            if j != i and items[j] == items[i]:
                continue  # an accidental hit is no negative
            logits.append(float(q[i] @ c[j]) / t - float(log_q[items[j]]))
        target = float(q[i] @ c[i]) / t - float(log_q[items[i]])
        total += -target + float(torch.logsumexp(torch.tensor(logits), 0))
    return total / max(len(pos), 1)


def test_sampled_softmax_masks_accidental_hits_and_corrects_for_sampling():
    torch.manual_seed(1)
    q, c = torch.randn(8, 4), torch.randn(8, 4)
    y = torch.tensor([1.0, 1, 0, 1, 1, 0, 1, 1])
    items = torch.tensor([3, 5, 3, 5, 2, 9, 7, 3])  # rows 1/3 and 0/7 repeat an item
    log_q = torch.log(torch.rand(10) + 0.1)
    loss, scores = sampled_softmax_loss(q, c, y, items, log_q, 0.5)
    assert loss.item() == pytest.approx(_softmax_reference(q, c, y, items, log_q, 0.5),
                                        rel=1e-5)
    assert torch.allclose(scores, (q * c).sum(1))
    # without the correction the loss differs: log Q matters
    flat, _ = sampled_softmax_loss(q, c, y, items, torch.zeros(10), 0.5)
    assert abs(flat.item() - loss.item()) > 1e-3


def test_sampled_softmax_without_positives_is_zero_and_differentiable():
    q = torch.randn(4, 3, requires_grad=True)
    loss, _ = sampled_softmax_loss(q, torch.randn(4, 3), torch.zeros(4),
                                   torch.arange(4), torch.zeros(4), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and q.grad is not None


def test_train_task_uses_the_configured_objective():
    towers = TwoTower(SPEC, table_device=torch.device("cpu"))
    rows = {"user": np.array([1, 2, 3]), "item": np.array([4, 5, 6]),
            "label": np.array([1, 0, 1], np.uint8)}
    rows["timestamp"] = np.array([5, 6, 7])
    batch = BatchMaker(SPEC, [_genres()])(rows)
    loss, (_, scores, labels) = TwoTowerTrainTask(towers)(batch)
    assert loss.ndim == 0 and scores.shape == (3,) and torch.equal(labels, batch.labels)
    bce = ModelSpec(**{**SPEC.to_dict(), "tower_layers": (16, 6), "objective": "bce"})
    towers.spec = bce
    loss_bce, _ = TwoTowerTrainTask(towers)(batch)
    assert loss_bce.item() != pytest.approx(loss.item())


def _brute_force(scores, users, exclude, positives, k):
    recall, ndcg, n = 0.0, 0.0, 0
    for row, u in enumerate(users):
        pos = set(positives.get(u, []))
        if not pos:
            continue
        s = scores[row].copy()
        s[0] = -np.inf
        s[list(exclude.get(u, []))] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        hits = [1.0 if i in pos else 0.0 for i in top]
        recall += sum(hits) / len(pos)
        dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
        ndcg += dcg / sum(1 / np.log2(r + 2) for r in range(min(len(pos), k)))
        n += 1
    return recall / n, ndcg / n


def test_ranking_metrics_match_a_brute_force_reading():
    rng = np.random.default_rng(3)
    n_users, n_items = 12, 30
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)  # no ties
    train = {u: list(rng.choice(np.arange(1, n_items), 4, replace=False)) for u in range(n_users)}
    pos = {u: [i for i in rng.choice(np.arange(1, n_items), 3, replace=False)
               if i not in train[u]] for u in range(1, n_users)}
    pairs = [(u, i) for u, its in train.items() for i in its]
    exclude = UserItems.build(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]),
                              n_users)
    ppairs = [(u, i) for u, its in pos.items() for i in its]
    positives = UserItems.build(np.array([p[0] for p in ppairs]),
                                np.array([p[1] for p in ppairs]), n_users)
    users = np.arange(n_users)
    given = torch.from_numpy(scores.copy())
    got = finish(ranking_sums(given, users, exclude=exclude, positives=positives, ks=[5, 10]))
    assert np.array_equal(given.numpy(), scores)  # not handed over: left as it was
    assert got["users"] == sum(1 for u in users if pos.get(u))
    for k in (5, 10):
        recall, ndcg = _brute_force(scores, users, train, pos, k)
        assert got[f"recall@{k}"] == pytest.approx(recall, abs=1e-6)
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-6)
    # a positive listed twice counts once; handed-over (owned) scores give the same figures
    twice = UserItems.build(np.array([p[0] for p in ppairs * 2]),
                            np.array([p[1] for p in ppairs * 2]), n_users)
    again = finish(ranking_sums(torch.from_numpy(scores.copy()), users, exclude=exclude,
                                positives=twice, ks=[5, 10], owned=True))
    assert again == pytest.approx(got)


def test_an_epoch_counts_as_better_only_by_more_than_the_minimum_improvement():
    from app.train.checkpoint import CheckpointState

    state = CheckpointState(best_value=0.25)
    assert state.improved(0.2501) and not state.improved(0.25)
    assert not state.improved(0.2520, 0.01)         # +0.8%: noise at a 1% minimum
    assert state.improved(0.2530, 0.01)             # +1.2%
    assert CheckpointState().improved(0.0, 0.01)    # the first epoch is always the best so far


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.normal(size=300)
    y = (rng.random(300) < 0.4).astype(int)
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
    assert binary_auroc(s, y) == pytest.approx(np.mean(pairs), abs=1e-9)
    assert np.isnan(binary_auroc(s, np.zeros(300)))


@pytest.mark.parametrize("topology,workers,gpu,strategy", [
    ("cpu", 3, False, "PACK"), ("snsg", 1, True, "PACK"), ("snmg", 4, True, "STRICT_PACK"),
    ("mnmg", 8, True, "SPREAD")])
def test_topologies_map_onto_placements(topology, workers, gpu, strategy):
    cfg = load_config(overrides={"topology": topology, "num_workers": workers}).train
    p = placement(cfg)
    assert (p.num_workers, p.use_gpu, p.strategy) == (workers, gpu, strategy)
    assert p.backend == ("nccl" if gpu else "gloo")
    assert ("GPU" in p.resources_per_worker) == gpu
    sc = p.scaling_config()
    assert sc.num_workers == workers and sc.use_gpu == gpu


def test_cpu_accelerator_keeps_the_gpu_topology_placement():
    cfg = load_config(overrides={"topology": "mnmg", "num_workers": 2,
                                 "accelerator": "cpu"}).train
    p = placement(cfg)
    assert (p.use_gpu, p.strategy, p.backend) == (False, "SPREAD", "gloo")


def _p(topology, n, gpu=True):
    res = {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}
    strategy = {"cpu": "PACK", "snsg": "PACK", "snmg": "STRICT_PACK", "mnmg": "SPREAD"}
    return Placement(topology, n, gpu, res, strategy[topology])


def test_resource_check_says_what_is_missing():
    cpu_node = {"CPU": 2.0}
    gpu_node = {"CPU": 16.0, "GPU": 4.0}
    with pytest.raises(ResourceError, match="needs GPUs.*0 GPUs.*--accelerator cpu"):
        check_resources(_p("snsg", 1), [cpu_node])
    with pytest.raises(ResourceError, match="8 workers on one node.*at most 4"):
        check_resources(_p("snmg", 8), [gpu_node, gpu_node])
    with pytest.raises(ResourceError, match="several nodes.*only 1 node"):
        check_resources(_p("mnmg", 4), [gpu_node, cpu_node])
    with pytest.raises(ResourceError, match="needs 3 workers, but only 2 fit"):
        check_resources(_p("cpu", 3, gpu=False), [cpu_node])
    check_resources(_p("mnmg", 8), [gpu_node, gpu_node])
    check_resources(_p("snmg", 4), [gpu_node])
    check_resources(_p("cpu", 2, gpu=False), [cpu_node])


def test_platt_scaling_recovers_a_known_calibration():
    from app.train.metrics import fit_platt

    rng = np.random.default_rng(0)
    scores = rng.normal(0, 3, 50_000)
    labels = rng.random(50_000) < 1 / (1 + np.exp(-(0.5 * scores - 1.0)))
    a, b = fit_platt(scores, labels)
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(-1.0, abs=0.05)


def test_equal_pairs_finds_every_equal_pair_without_comparing_all():
    from app.train.objectives import equal_pairs

    rng = np.random.default_rng(5)
    for n_a, n_b, high in ((50, 30, 10), (7, 0, 3), (0, 9, 3), (200, 64, 1000)):
        a = torch.from_numpy(rng.integers(0, high, n_a))
        b = torch.from_numpy(rng.integers(0, high, n_b))
        rows, cols = equal_pairs(a, b)
        want = {(i, j) for i in range(n_a) for j in range(n_b) if a[i] == b[j]}
        assert set(zip(rows.tolist(), cols.tolist())) == want
        assert len(rows) == len(want)  # no pair twice
