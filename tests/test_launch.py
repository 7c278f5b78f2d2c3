"""Launch paths: the cluster launcher config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(config)
    types = config["available_node_types"]
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["resources"]["GPU"] >= 1 for t in gpu)
    assert any("setup_env.sh" in c for c in config["setup_commands"])


def test_schema_check_catches_a_typo():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        _validate(config)
