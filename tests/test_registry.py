"""What a registry needs from the logged model: Unity Catalog's naming rule, the workspace
experiment folder, and a signature with inputs and outputs plus an input example."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from app.config import ConfigError, load_config
from app.tracking import check_model_name, experiment_name


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
    from app.tracking import databricks_user

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
    assert {"userId", "movieId", "score", "rank", "source", "prediction_prob", "known"} <= outputs
    assert [p.name for p in sig.params] == ["k"]

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
