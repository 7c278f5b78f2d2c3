"""What a registry needs from the logged model: Unity Catalog's naming rule, the workspace
experiment folder, and a signature with inputs and outputs plus an input example."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from app.core.config import ConfigError, load_config
from app.core.tracking import check_model_name, experiment_name


@pytest.mark.parametrize("name", ["main.recsys.two_tower", "Cat_1.s2.M3"])
def test_unity_catalog_names_are_three_parts(name):
    check_model_name(name, "databricks-uc")


@pytest.mark.parametrize("name", ["two-tower", "recsys.two_tower", "main.recsys.two-tower",
                                  "a.b.c.d", "main..m", "main.recsys.two tower"])
def test_a_name_unity_catalog_refuses_fails_before_training(name):
    with pytest.raises(ConfigError, match=r"<catalog>\.<schema>\.<model>") as e:
        check_model_name(name, "databricks-uc")
    assert repr(name) in str(e.value)
    check_model_name(name, "databricks")  # the workspace registry takes any name
    check_model_name(name, None)


def test_on_databricks_a_bare_experiment_name_lives_in_the_users_folder():
    cluster = load_config(overrides={"mlflow_experiment": "two-tower"}).cluster
    assert experiment_name(cluster, "databricks", user=lambda: "ann@example.com") == \
        "/Users/ann@example.com/two-tower"
    given = load_config(overrides={"mlflow_experiment": "/Shared/recsys"}).cluster
    assert experiment_name(given, "databricks", user=lambda: 1 / 0) == "/Shared/recsys"
    assert experiment_name(cluster, "sqlite:///x.db", user=lambda: 1 / 0) == "two-tower"


def test_without_credentials_the_user_lookup_says_what_to_pass(monkeypatch):
    from app.core.tracking import databricks_user

    for var in ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CONFIG_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", "/nonexistent/databrickscfg")
    with pytest.raises(ConfigError, match="--mlflow-experiment /Users/<you>/two-tower"):
        databricks_user()


def test_the_logged_model_has_inputs_outputs_and_an_example(trained):
    from mlflow.models import Model

    info = json.loads((trained["model_dir"] / "mlflow.json").read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])
    model_info = mlflow.models.get_model_info(info["registered_uri"])
    sig = model_info.signature
    assert sig.inputs.input_names() == ["userId", "movieId", "history"]
    outputs = set(sig.outputs.input_names())
    assert {"userId", "movieId", "score", "rank", "source", "prediction_prob", "known_user",
            "known_item"} <= outputs
    assert [p.name for p in sig.params] == ["k", "exclude_rated"]

    local = mlflow.artifacts.download_artifacts(info["registered_uri"])
    example = Model.load(local).load_input_example(local)
    assert isinstance(example, pd.DataFrame) and list(example.columns) == ["userId"]
    model = mlflow.pyfunc.load_model(info["registered_uri"])
    top = model.predict(example, params={"k": 3})
    assert len(top) == 3 and set(top.columns) <= outputs
    required = {c.name for c in sig.outputs.inputs if c.required}
    assert required <= set(top.columns)
    pairs = model.predict(pd.DataFrame({"userId": [example["userId"][0]] * 2,
                                        "movieId": top["movieId"].tolist()[:2]}))
    assert set(pairs.columns) <= outputs and required <= set(pairs.columns)


def test_the_champion_alias_moves_only_to_a_better_model_on_the_same_dataset(tmp_path):
    """The promotion gate on a real MLflow store: the first model is promoted, a worse one on
    the same dataset is not, a better one is, another dataset's is not comparable; ``always``
    and ``never`` do what they say. Each version keeps its metric and dataset as tags."""
    from app.core.tracking import configure, promote

    cfg = load_config(overrides={"workdir": str(tmp_path), "registered_model_name": "gate"})
    configure(cfg.cluster)
    client = mlflow.MlflowClient()
    client.create_registered_model("gate")
    versions = [client.create_model_version("gate", str(tmp_path), run_id=None).version
                for _ in range(6)]

    def gate(version, metric, dataset, mode="if-better"):
        cfg.serve.promote = mode
        return promote(cfg, version, metric, dataset)

    first = gate(versions[0], 0.20, "data/v-1")
    assert first["promoted"] and first["champion"] is None and "first" in first["reason"]
    worse = gate(versions[1], 0.19, "data/v-1")
    assert not worse["promoted"] and "does not beat" in worse["reason"]
    better = gate(versions[2], 0.21, "data/v-1")
    assert better["promoted"] and better["champion"] == versions[0]
    other = gate(versions[3], 0.50, "data/v-2")
    assert not other["promoted"] and "not comparable" in other["reason"]
    assert client.get_model_version_by_alias("gate", "champion").version == versions[2]
    assert not gate(versions[4], 0.90, "data/v-1", "never")["promoted"]
    assert gate(versions[5], 0.01, "data/v-3", "always")["promoted"]
    champion = client.get_model_version_by_alias("gate", "champion")
    assert champion.version == versions[5]
    assert champion.tags == {"test_recall_at_20": "0.010000", "dataset": "data/v-3"}
