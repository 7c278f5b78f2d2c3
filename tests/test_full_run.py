"""The main job's entry point on a small synthetic dataset, through its own CLI parsing."""

import json

from pipelines import full_run

from app.publish import current


def test_full_run_prepares_into_the_workdir_and_reuses_it(ray_local, tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--rows", "20000", "--workdir", str(tmp_path / "wd"),
            "--stages", "prepare"]
    assert full_run.main(argv) == 0
    summary = json.loads((tmp_path / "wd" / "summary.json").read_text())
    assert summary["stages"]["prepare"]["counts"]["accepted"] == 20_000
    assert (current(tmp_path / "wd" / "data") / "manifest.json").exists()
    assert "data:" in (tmp_path / "wd" / "config.yaml").read_text()
    assert full_run.main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    # a changed data setting prepares again
    assert full_run.main(argv + ["--split", "temporal"]) == 0
    manifest = json.loads((current(tmp_path / "wd" / "data") / "manifest.json").read_text())
    assert manifest["split"]["rule"] == "temporal"


def test_full_run_reports_bad_flags(capsys):
    assert full_run.main(["--val-fraction", "2"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err


def test_full_run_prepares_trains_and_recommends(ray_local, tmp_path, capsys):
    wd = tmp_path / "wd"
    argv = ["--dataset", "synthetic", "--rows", "30000", "--workdir", str(wd), "--epochs", "1",
            "--registered-model-name", "two-tower-full-run"]
    assert full_run.main(argv) == 0
    summary = json.loads((wd / "summary.json").read_text())
    assert list(summary["stages"]) == ["prepare", "train", "refit", "infer"]
    train, refit = summary["stages"]["train"], summary["stages"]["refit"]
    assert (current(wd / "model") / "weights.pt").is_file()
    assert train["metrics"]["epochs"] == 1 and train["mlflow"]["version"] >= 1
    # the served model is the refit on every split; the held-out run keeps its metrics
    counts = summary["stages"]["prepare"]["counts"]
    # every written row (repeated (user, item) rows are merged by --duplicates first)
    assert refit["training_rows"] == sum(counts["splits"].values()) and refit["epochs"] == 1
    assert json.loads((current(wd / "model") / "metrics.json").read_text())["refit"] is True
    assert "ease" in json.loads((current(wd / "model-heldout") / "metrics.json").read_text())
    assert refit["mlflow"]["version"] == train["mlflow"]["version"] + 1
    import pandas as pd

    recs = pd.read_parquet(current(wd / "recommendations"))
    assert summary["stages"]["infer"]["summary"]["rows"] == len(recs) > 0
    out = capsys.readouterr().out
    assert "models:/two-tower-full-run/" in out and "example recommendations:" in out
    assert "recall@20" in out and "verdict: the model" in out and "EASE" in out
    assert (wd / "val_metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_full_run_rejects_unknown_stages(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:  # at parse time, before anything starts
        full_run.main(["--stages", "prepare,serve"])
    assert e.value.code == 2
    assert "argument --stages: unknown stage(s) serve" in capsys.readouterr().err
