"""Every benchmark runs: ``bench/X.py --smoke`` exits 0 and ends with its JSON line.

Each benchmark's smoke (tiny sizes, the same code as a full run) runs in a fresh interpreter,
with its own temp dir (``TMPDIR``); the selected ones start together, and each test checks
its own closing JSON line: the keys a
full run prints, figures that are sane (positive throughputs, ratios that match the figures
they are made of, rows and users counted as asked), and that the run removed everything it
wrote there. A benchmark broken by a change of the library fails its test here.
Also, without Ray or a GPU: the GPU check (scripts/gpu_check.sh) parses and, where nvidia-smi
is missing or fails, stops at once with one line and exit code 2; bench/inference.py offers
``--gpu``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]


BENCHES = ("scale", "refresh", "train", "quality", "serve", "inference", "prepare")  # longest first
TIMEOUT = 600.0  # seconds for one smoke, from its start
AT_ONCE = 4  # smokes running together: on 2 cores more only queue for the CPUs, and a Ray
# Serve proxy that cannot start within Serve's 60 s is killed


@dataclass
class Smoke:
    """One ``bench/<name>.py --smoke`` running in a fresh interpreter, with a temp dir of its
    own (a short one: Ray's Unix sockets live under it, ~107 characters)."""

    name: str
    tmp: str
    proc: subprocess.Popen
    started: float

    @classmethod
    def start(cls, name: str) -> "Smoke":
        tmp = tempfile.mkdtemp(prefix="tb", dir="/tmp" if os.path.isdir("/tmp") else None)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never a running Ray
        env["TMPDIR"] = tmp
        # output to files, not pipes: a smoke nobody reads yet must never block on a full pipe
        with open(Path(tmp).with_suffix(".out"), "w") as out, \
                open(Path(tmp).with_suffix(".err"), "w") as err:
            proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / f"{name}.py"),
                                     "--smoke"], cwd=ROOT, env=env, stdout=out, stderr=err)
        return cls(name, tmp, proc, time.monotonic())

    def _read(self, suffix: str) -> str:
        path = Path(self.tmp).with_suffix(suffix)
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
        for suffix in (".out", ".err"):
            Path(self.tmp).with_suffix(suffix).unlink(missing_ok=True)

    def result(self) -> tuple[dict[str, Any], str]:
        """Wait for the smoke; (its closing JSON line, parsed; its stdout)."""
        name = self.name
        try:
            self.proc.wait(timeout=max(1.0, TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"bench/{name}.py --smoke ran past {TIMEOUT:.0f}s; stdout tail:\n"
                        f"{self._read('.out')[-3000:]}")
        stdout = self._read(".out")
        tail = f"stdout tail:\n{stdout[-3000:]}\nstderr tail:\n{self._read('.err')[-5000:]}"
        assert self.proc.returncode == 0, \
            f"bench/{name}.py --smoke exited {self.proc.returncode}\n{tail}"
        lines = [line for line in stdout.splitlines() if line.strip()]
        assert lines, f"bench/{name}.py --smoke printed nothing\n{tail}"
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            pytest.fail(f"the last line of bench/{name}.py --smoke is not JSON: "
                        f"{lines[-1][:500]!r}\n{tail}")
        assert isinstance(result, dict), lines[-1]
        left = sorted(os.listdir(self.tmp))
        assert not left, f"bench/{name}.py --smoke left files in its temp dir: {left}"
        return result, stdout


class SmokePool:
    """The selected smokes, at most :data:`AT_ONCE` running, the longest first: most of a
    smoke's time is waiting (Ray's start, worker groups, actor pools), so together they take
    little more than the longest ones. ``pool[name].result()`` waits for one (and starts
    queued ones as others end)."""

    def __init__(self, names: set[str]) -> None:
        self.queue = [n for n in BENCHES if n in names]
        self.started: dict[str, Smoke] = {}
        self.fill()

    def fill(self) -> None:
        while self.queue and sum(s.proc.poll() is None
                                 for s in self.started.values()) < AT_ONCE:
            name = self.queue.pop(0)
            self.started[name] = Smoke.start(name)

    def __getitem__(self, name: str) -> "SmokePool._Handle":
        return SmokePool._Handle(self, name)

    @dataclass
    class _Handle:
        pool: "SmokePool"
        name: str

        def result(self) -> tuple[dict[str, Any], str]:
            pool = self.pool
            while True:  # start the queued ones as others end, until this one has ended
                pool.fill()
                smoke = pool.started.get(self.name)
                if smoke is not None and (smoke.proc.poll() is not None or
                                          time.monotonic() - smoke.started > TIMEOUT):
                    return smoke.result()
                time.sleep(0.5)

    def stop(self) -> None:
        self.queue.clear()
        for smoke in self.started.values():
            smoke.stop()


@pytest.fixture(scope="module")
def smokes(request: pytest.FixtureRequest) -> Iterator[SmokePool]:
    """Every selected benchmark's smoke (:class:`SmokePool`); each test checks its own."""
    wanted = {item.name.removeprefix("test_").removesuffix("_smoke")
              for item in request.session.items if item.module is request.module}
    pool = SmokePool({name for name in BENCHES if name in wanted})
    try:
        yield pool
    finally:
        pool.stop()


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


def test_prepare_smoke(smokes):
    result, out = smokes["prepare"].result()
    keys_present(result, {"rows", "pipeline_rows_per_s", "floor_rows_per_s",
                          "time_ratio_vs_floor"})
    assert result["rows"] == 20_000
    positive(result, "pipeline_rows_per_s", "floor_rows_per_s", "time_ratio_vs_floor")
    ratio(result, "time_ratio_vs_floor", "floor_rows_per_s", "pipeline_rows_per_s")
    assert "run 1: floor" in out


@pytest.mark.slow  # training runs: two worker groups, five jobs
def test_train_smoke(smokes):
    result, out = smokes["train"].result()
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


def test_inference_smoke(smokes):
    result, _ = smokes["inference"].result()
    # --smoke runs one pool size (--actors 1): the keys per pool size are its own
    per_pool = {f"pipeline_1_actors_{what}" for what in ("users_per_s", "vs_ceiling")}
    keys_present(result, {"users", "items", "dim", "k", "ceiling_users_per_s",
                          "pipeline_users_per_s", "pipeline_vs_ceiling", "pipeline_actors",
                          "pipeline_batch_size", "lists_agree_with_ceiling",
                          "pipeline_exclude_all_users_per_s", "stage_ms_per_1000_users",
                          "actor_start_s", "seconds_total", "pipeline_startup_s",
                          "pipeline_batches_vs_ceiling", *per_pool})
    assert (result["users"], result["items"], result["dim"], result["k"]) == (2000, 1000, 16, 10)
    assert not [key for key in result if key.startswith("pipeline_2_actors")], sorted(result)
    positive(result, "ceiling_users_per_s", "pipeline_users_per_s",
             "pipeline_1_actors_users_per_s", "pipeline_exclude_all_users_per_s",
             "actor_start_s", "seconds_total", "pipeline_startup_s",
             "pipeline_batches_vs_ceiling")
    # at these sizes the pipeline's fixed costs dwarf the ceiling's milliseconds: its share
    # may round to 0.000, but it is the share of the figures beside it
    for a in ("", "_1_actors"):
        ratio(result, f"pipeline{a}_vs_ceiling", f"pipeline{a}_users_per_s",
              "ceiling_users_per_s")
    # the reported pipeline is the fastest pool size: the only one
    assert result["pipeline_actors"] == 1
    assert result["pipeline_users_per_s"] == result["pipeline_1_actors_users_per_s"]
    assert result["pipeline_batch_size"] == 256
    # the pipeline's lists are the ceiling's top-k (the same model, no exclusion); the bench
    # itself fails when the pipeline writes other than users x k rows
    assert result["lists_agree_with_ceiling"] >= 0.99
    stages = result["stage_ms_per_1000_users"]
    assert set(stages) == {"topk", "recommend_rest", "arrow", "parquet"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in stages.values()), stages
    assert stages["topk"] > 0


@pytest.mark.slow  # a training run with early stopping
def test_quality_smoke(smokes):
    result, _ = smokes["quality"].result()
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


def test_serve_smoke(smokes):
    result, _ = smokes["serve"].result()
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


@pytest.mark.slow  # two whole full runs (Ray, training, refit, inference): minutes
def test_scale_smoke(smokes):
    result, out = smokes["scale"].result()
    keys_present(result, {"sizes", "growth_exponent", "dominant_stage"})
    stages = ("prepare", "baselines", "train", "eval", "refit", "infer")
    sizes = result["sizes"]
    assert [s["rows"] for s in sizes] == [20_000, 40_000]
    for size in sizes:
        assert set(size) == {"rows", "users", "items", "seconds", "epochs", "samples_per_s",
                             "peak_rss_gb", "disk_gb", "baselines_share", "test_recall@20"
                             }, sorted(size)
        # synthetic sizes: rows / 50 users, rows / 200 items (at least 100)
        assert (size["users"], size["items"]) == (size["rows"] // 50,
                                                  max(100, size["rows"] // 200)), size
        sec = size["seconds"]
        assert set(sec) == {*stages, "total"}, sorted(sec)
        positive(sec, "prepare", "train", "eval", "refit", "infer", "total")
        assert sec["baselines"] >= 0, sec
        assert 0 <= size["baselines_share"] < 1, size  # a part of the training stage
        # the stages are parts of the run's wall time (the rest: Ray's start, worker groups)
        assert sum(sec[k] for k in stages) < sec["total"], sec
        assert size["epochs"] == 1, size  # --smoke's --epochs 1
        positive(size, "samples_per_s", "disk_gb")
        assert set(size["peak_rss_gb"]) == {"driver", "train_worker", "data_worker"}
        positive(size["peak_rss_gb"], "driver", "train_worker", "data_worker")
        assert all(v < 64 for v in size["peak_rss_gb"].values()), size["peak_rss_gb"]
        recall = size["test_recall@20"]
        assert {"model", "popularity", "ease"} <= set(recall), recall
        assert all(0 < v <= 1 for v in recall.values()), recall
    growth = result["growth_exponent"]
    assert set(growth) == {*stages, "total"}, sorted(growth)
    small, large = sizes[0]["seconds"], sizes[1]["seconds"]
    expected = math.log(large["infer"] / small["infer"]) / math.log(2)  # 40k / 20k rows
    assert growth["infer"] == pytest.approx(expected, abs=0.02), growth
    assert result["dominant_stage"] == max(stages, key=lambda k: large[k])
    assert "dominant stage at 40,000 rows" in out
    # eval counts the exported epoch's ranking of every test user, read from the run's log
    assert len(re.findall(r"every test user ranked once: [0-9.]+s", out)) == 2, out


@pytest.mark.slow  # three training runs (day 1, warm, scratch)
def test_refresh_smoke(smokes):
    result, out = smokes["refresh"].result()
    keys_present(result, {"warm_test_recall@20", "scratch_test_recall@20", "warm_vs_scratch",
                          "warm_seconds", "scratch_seconds", "time_ratio", "new_users",
                          "new_items"})
    positive(result, "warm_test_recall@20", "scratch_test_recall@20", "warm_seconds",
             "scratch_seconds")
    ratio(result, "warm_vs_scratch", "warm_test_recall@20", "scratch_test_recall@20")
    ratio(result, "time_ratio", "warm_seconds", "scratch_seconds")
    assert result["dataset"] == "synthetic" and result["new_users"] >= 0
    # the day-1 model is a real start: after the same 2 epochs the warm run is ahead
    assert result["warm_test_recall@20"] > result["scratch_test_recall@20"], result
    assert result["warm_test_recall@20"] > result["popularity_test_recall@20"], result
    assert "warm / scratch: quality" in out


# ---------------------------------------------------------------- the GPU check, without a GPU

GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses_and_is_executable():
    done = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, f"bash -n {GPU_CHECK.name}:\n{done.stderr}"
    assert os.access(GPU_CHECK, os.X_OK), f"{GPU_CHECK} is not executable"


@pytest.mark.parametrize("nvidia_smi", ["not found", "fails"])
def test_gpu_check_stops_at_once_without_a_gpu(nvidia_smi, tmp_path):
    """A PATH with nothing but ``dirname`` (the script's first command) and, for "fails", an
    ``nvidia-smi`` that exits 9 as a driverless machine's does: one line, exit code 2, no log,
    no step run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    if nvidia_smi == "fails":
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        fake.chmod(0o755)
    logs = ROOT / ".bench" / "gpu"
    before = sorted(os.listdir(logs)) if logs.is_dir() else []
    t0 = time.monotonic()
    done = subprocess.run([shutil.which("bash"), str(GPU_CHECK)], cwd=tmp_path,
                          env={**os.environ, "PATH": str(bin_dir)}, capture_output=True,
                          text=True, timeout=60)
    took = time.monotonic() - t0
    assert done.returncode == 2, \
        f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"gpu_check: no NVIDIA GPU here (nvidia-smi {nvidia_smi}): nothing to check"]
    assert took < 10, f"took {took:.1f}s: it should stop before any step"
    assert (sorted(os.listdir(logs)) if logs.is_dir() else []) == before, "it wrote a log"


def test_inference_bench_offers_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "inference.py"), "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # an option line of argparse's help, not the docstring's usage line
    assert re.search(r"^\s+--gpu\s", done.stdout, re.MULTILINE), done.stdout[-3000:]
