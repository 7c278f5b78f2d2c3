"""The mnmg placement on a 2-node Ray cluster (two raylets on this machine, CPU workers
standing in for GPUs), trained with the pointwise (bce) objective."""

from __future__ import annotations

import json

import ray
from ray.cluster_utils import Cluster

from app.config import load_config
from app.publish import current
from tests.conftest import start_local_ray


def test_mnmg_spreads_one_worker_per_node(ray_local, movielens_dir, tmp_path):
    from app.train import train

    ray.shutdown()  # this test needs its own cluster; the session's local Ray comes back after
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": True})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = load_config(overrides={"topology": "mnmg", "accelerator": "cpu",
                                     "num_workers": 2, "epochs": 1, "objective": "bce",
                                     "workdir": str(tmp_path),
                                     "registered_model_name": "two-tower-mnmg"})
        summary = train(cfg, str(movielens_dir), str(tmp_path / "model"), verbose=False)
        plan = json.loads((current(tmp_path / "model") / "sharding_plan.json").read_text())
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(set(plan["rank_nodes"])) == 2 and set(plan["rank_nodes"]) <= nodes
        assert {r for t in plan["tables"] if t["sharding_type"] != "data_parallel"
                for r in t["ranks"]} == {0, 1}
        assert summary["metrics"]["epochs"] == 1
        assert "SPREAD" in summary["placement"]
        # the pointwise objective reports AUROC; one epoch already separates the labels
        assert 0.55 < summary["history"][-1]["val_auroc"] <= 1.0
    finally:
        ray.shutdown()
        cluster.shutdown()
        start_local_ray()
