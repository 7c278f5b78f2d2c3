"""Every benchmark runs: ``bench/X.py --smoke`` exits 0 and ends with its JSON line.

Each test runs one benchmark's smoke (tiny sizes, the same code as a full run) in a fresh
interpreter, with its own temp dir (``TMPDIR``), and checks the closing JSON line: the keys a
full run prints, figures that are sane (positive throughputs, ratios that match the figures
they are made of, rows and users counted as asked), and that the run removed everything it
wrote there. A benchmark broken by a change of the library fails its test here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def smoke(name: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run ``bench/<name>.py --smoke``; (its closing JSON line, parsed; its stdout)."""
    # a short temp dir of the test's own (Ray's Unix sockets live under it, ~107 characters)
    tmp = tempfile.mkdtemp(prefix="tb", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never a running Ray
    env["TMPDIR"] = tmp
    try:
        try:
            done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke"],
                                  cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            pytest.fail(f"bench/{name}.py --smoke ran past {timeout:.0f}s; stdout tail:\n"
                        f"{out[-3000:]}")
        tail = f"stdout tail:\n{done.stdout[-3000:]}\nstderr tail:\n{done.stderr[-5000:]}"
        assert done.returncode == 0, f"bench/{name}.py --smoke exited {done.returncode}\n{tail}"
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        assert lines, f"bench/{name}.py --smoke printed nothing\n{tail}"
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            pytest.fail(f"the last line of bench/{name}.py --smoke is not JSON: "
                        f"{lines[-1][:500]!r}\n{tail}")
        assert isinstance(result, dict), lines[-1]
        left = sorted(os.listdir(tmp))
        assert not left, f"bench/{name}.py --smoke left files in its temp dir: {left}"
        return result, done.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def keys_present(result: dict[str, Any], keys: set[str]) -> None:
    missing = keys - set(result)
    assert not missing, f"missing from the JSON line: {sorted(missing)}; got {sorted(result)}"


def positive(result: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, \
            f"{key} = {value!r}: expected a positive number"


def ratio(result: dict[str, Any], key: str, num: str, den: str) -> None:
    """``result[key]`` is ``num / den`` of the same line (within their rounding)."""
    assert result[key] == pytest.approx(result[num] / result[den], rel=0.02, abs=0.002), \
        f"{key} = {result[key]} but {num} / {den} = {result[num] / result[den]:.4f}"


def test_prepare_smoke():
    result, out = smoke("prepare", timeout=300)
    keys_present(result, {"rows", "pipeline_rows_per_s", "floor_rows_per_s",
                          "time_ratio_vs_floor"})
    assert result["rows"] == 20_000
    positive(result, "pipeline_rows_per_s", "floor_rows_per_s", "time_ratio_vs_floor")
    ratio(result, "time_ratio_vs_floor", "floor_rows_per_s", "pipeline_rows_per_s")
    assert "run 1: floor" in out


def test_train_smoke():
    result, out = smoke("train", timeout=600)
    throughputs = ("ceiling_samples_per_s", "pipeline_samples_per_s", "seed_samples_per_s",
                   "pipeline_2_workers_samples_per_s", "default_objective_samples_per_s",
                   "bce_same_model_samples_per_s")
    keys_present(result, {"rows", "pipeline_vs_ceiling", "pipeline_vs_seed", "default_vs_bce",
                          *throughputs})
    assert result["rows"] == 20_000
    positive(result, *throughputs, "pipeline_vs_ceiling", "pipeline_vs_seed", "default_vs_bce")
    ratio(result, "pipeline_vs_ceiling", "pipeline_samples_per_s", "ceiling_samples_per_s")
    ratio(result, "pipeline_vs_seed", "pipeline_samples_per_s", "seed_samples_per_s")
    ratio(result, "default_vs_bce", "default_objective_samples_per_s",
          "bce_same_model_samples_per_s")
    # the smoke's default objective runs as the full run's does: mixed negatives
    assert "mixed negatives" in out


def test_inference_smoke():
    result, _ = smoke("inference", timeout=600)
    per_pool = {f"pipeline_{a}_actors_{what}" for a in (1, 2)
                for what in ("users_per_s", "vs_ceiling")}
    keys_present(result, {"users", "items", "dim", "k", "ceiling_users_per_s",
                          "pipeline_users_per_s", "pipeline_vs_ceiling", "pipeline_actors",
                          "pipeline_batch_size", "lists_agree_with_ceiling",
                          "pipeline_exclude_all_users_per_s", "stage_ms_per_1000_users",
                          "actor_start_s", "seconds_total", *per_pool})
    assert (result["users"], result["items"], result["dim"], result["k"]) == (2000, 1000, 16, 10)
    positive(result, "ceiling_users_per_s", "pipeline_users_per_s",
             "pipeline_1_actors_users_per_s", "pipeline_2_actors_users_per_s",
             "pipeline_exclude_all_users_per_s", "actor_start_s", "seconds_total")
    # at these sizes the pipeline's fixed costs dwarf the ceiling's milliseconds: its share
    # may round to 0.000, but it is the share of the figures beside it
    for a in ("", "_1_actors", "_2_actors"):
        ratio(result, f"pipeline{a}_vs_ceiling", f"pipeline{a}_users_per_s",
              "ceiling_users_per_s")
    # the reported pipeline is the fastest pool size
    assert result["pipeline_actors"] in (1, 2)
    assert result["pipeline_users_per_s"] == max(result["pipeline_1_actors_users_per_s"],
                                                 result["pipeline_2_actors_users_per_s"])
    assert result["pipeline_batch_size"] == 256
    # the pipeline's lists are the ceiling's top-k (the same model, no exclusion); the bench
    # itself fails when the pipeline writes other than users x k rows
    assert result["lists_agree_with_ceiling"] >= 0.99
    stages = result["stage_ms_per_1000_users"]
    assert set(stages) == {"topk", "recommend_rest", "arrow", "parquet"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in stages.values()), stages
    assert stages["topk"] > 0


def test_quality_smoke():
    result, _ = smoke("quality", timeout=600)
    keys_present(result, {"dataset", "rungs", "popularity_test_recall@20",
                          "popularity_test_ndcg@20", "ease_test_recall@20",
                          "ease_test_ndcg@20", "model_vs_ease", "model_vs_popularity"})
    assert result["dataset"] == "synthetic"
    names = [r["name"] for r in result["rungs"]]
    # --smoke trains the last rung (the defaults) alone: no refit (--no-refit)
    assert names == ["+ linear towers (defaults)"], names
    model, = result["rungs"]
    for key in ("test_recall@20", "test_ndcg@20", "val_recall@20"):
        assert 0 < model[key] <= 1, (key, model)
    assert model["seconds"] > 0 and model["samples_per_s"] > 0, model
    assert 1 <= model["best_epoch"] <= model["epochs"] <= 2, model  # --smoke's --max-epochs
    for key in ("popularity_test_recall@20", "popularity_test_ndcg@20",
                "ease_test_recall@20", "ease_test_ndcg@20"):
        assert 0 < result[key] <= 1, (key, result[key])
    recall = model["test_recall@20"]
    assert result["model_vs_popularity"] == pytest.approx(
        recall / result["popularity_test_recall@20"], rel=0.01)
    assert result["model_vs_ease"] == pytest.approx(recall / result["ease_test_recall@20"],
                                                    rel=0.01)


def test_serve_smoke():
    result, _ = smoke("serve", timeout=600)
    keys_present(result, {"concurrency", "p50_ms_c16", "p99_ms_c16", "qps_c64", "floor_qps_c64",
                          "qps_vs_floor_c64", "core_one_user_ms", "core_sixteen_users_ms"})
    assert set(result["concurrency"]) == {"1", "16", "64"}
    for c, level in result["concurrency"].items():
        keys_present(level, {"p50_ms", "p99_ms", "qps", "floor_p50_ms", "floor_p99_ms",
                             "floor_qps"})
        positive(level, *level)
        assert level["p99_ms"] >= level["p50_ms"], (c, level)
        assert level["floor_p99_ms"] >= level["floor_p50_ms"], (c, level)
    positive(result, "p50_ms_c16", "p99_ms_c16", "qps_c64", "floor_qps_c64", "qps_vs_floor_c64",
             "core_one_user_ms", "core_sixteen_users_ms")
    assert result["p50_ms_c16"] == result["concurrency"]["16"]["p50_ms"]
    assert result["qps_c64"] == result["concurrency"]["64"]["qps"]
    ratio(result, "qps_vs_floor_c64", "qps_c64", "floor_qps_c64")
