"""The shape of batch inference's actor pool: device, size and resources per actor from the
cluster's resources and the config."""

from __future__ import annotations

import pytest

from app.core.config import load_config
from app.serve.batch import ACTOR_BASE_BYTES, pool_shape
from app.train.model_folder import ModelError

GB = 1 << 30


def inference(**overrides):
    return load_config(overrides=overrides).inference


def test_one_cpu_actor_per_cpu_and_one_cpu_left_to_reading_tasks():
    cluster = {"CPU": 8.0, "memory": 64.0 * GB}
    assert pool_shape(cluster, inference(), 10 << 20) == ("cpu", 8, {"num_cpus": 1})
    # a pairs file is read by tasks while the pool scores: they need a CPU of their own
    assert pool_shape(cluster, inference(), 10 << 20, reads=True)[1] == 7
    assert pool_shape({"CPU": 1.0}, inference(), 10 << 20, reads=True)[1] == 1


def test_the_default_pool_is_kept_to_what_memory_holds():
    model = 2 * GB  # a user table of 8M users x 64 dimensions
    per_actor = ACTOR_BASE_BYTES + model
    cluster = {"CPU": 64.0, "memory": 10.5 * per_actor}
    assert pool_shape(cluster, inference(), model)[1] == 10
    # less memory than one actor takes still runs one actor
    assert pool_shape({"CPU": 4.0, "memory": 1.0 * GB}, inference(), model)[1] == 1
    # a size given is the user's: neither CPUs nor memory change it
    assert pool_shape(cluster, inference(inference_actors=40), model)[1] == 40


def test_gpus_take_one_actor_each_unless_told_otherwise():
    cluster = {"CPU": 16.0, "GPU": 2.0, "memory": 64.0 * GB}
    assert pool_shape(cluster, inference(), GB) == ("cuda", 2, {"num_gpus": 1})
    assert pool_shape(cluster, inference(inference_device="cpu"), GB) == \
        ("cpu", 16, {"num_cpus": 1})
    with pytest.raises(ModelError, match="--inference-device gpu: the cluster has no GPUs"):
        pool_shape({"CPU": 4.0}, inference(inference_device="gpu"), GB)
