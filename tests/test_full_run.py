"""The main job's entry point on a small synthetic dataset, through its own CLI parsing (the
whole pipeline from a plain shell: tests/test_first_hour.py)."""

import json

from app.core.publish import current
from app.data.dataset import Manifest
from pipelines import full_run


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
    manifest = Manifest.read(current(tmp_path / "wd" / "data"))
    assert manifest.split.rule == "temporal"


def test_full_run_reports_bad_flags(capsys):
    assert full_run.main(["--val-fraction", "2"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err


def test_full_run_rejects_unknown_stages(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:  # at parse time, before anything starts
        full_run.main(["--stages", "prepare,serve"])
    assert e.value.code == 2
    assert "argument --stages: unknown stage(s) serve" in capsys.readouterr().err


def test_a_refresh_is_a_flag_and_refuses_a_sweep(tmp_path, capsys):
    assert "--refresh MODEL" in full_run.build_parser().format_help()
    assert full_run.main(["--refresh", "models:/two-tower@champion", "--tune",
                          "--workdir", str(tmp_path)]) == 2
    assert "--refresh keeps the refreshed model's settings" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_a_refresh_of_a_model_that_is_not_there_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert full_run.main(["--refresh", str(missing), "--workdir", str(tmp_path / "wd"),
                          "--stages", "prepare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-model: no such folder" in err[0], err


def test_ray_train_notices_a_runs_end_within_half_a_second(ray_local):
    """Ray Train's controller polls its workers every 2 s by default: a run's end waited for
    the next poll. The embedded Ray's processes get 0.5 s (a value set by the user wins)."""
    import os

    import ray

    from app.core.cluster import TRAIN_POLL_ENV, TRAIN_POLL_S

    @ray.remote(num_cpus=0)
    def seen() -> str:
        return os.environ.get(TRAIN_POLL_ENV, "")

    want = os.environ.get(TRAIN_POLL_ENV)
    assert ray.get(seen.remote()) == want and float(want) <= float(TRAIN_POLL_S)
