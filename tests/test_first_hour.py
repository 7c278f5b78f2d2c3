"""The entry points as a newcomer meets them: run from a plain shell (a subprocess with the
environment the tests started with, nothing this process's Ray exported), each with a private
Ray temp dir. They never attach to a cluster by accident, fail fast on an unreachable one,
stop cleanly on Ctrl-C, print only the project's lines, and list and check their choices."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from app.core.publish import current
from app.data.dataset import Manifest
from tests.conftest import ROOT, short_tmp, user_shell_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir():
    """A private RAY_TMPDIR holding a stale address file, as a head node stopped with a
    signal leaves behind; yields (dir, the dead address)."""
    rt = Path(short_tmp())
    dead = f"127.0.0.1:{_free_port()}"
    (rt / "ray").mkdir()
    (rt / "ray" / "ray_current_cluster").write_text(dead)
    yield rt, dead
    shutil.rmtree(rt, ignore_errors=True)


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.mark.slow  # a head node or a full run in a plain shell
def test_a_stale_address_file_is_not_attached_to(ray_tmpdir, tmp_path):
    rt, dead = ray_tmpdir
    env = user_shell_env(RAY_TMPDIR=str(rt))
    env.pop("RAY_ADDRESS", None)
    # the file is where Ray's own address lookup (a bare ray.init()) goes for its cluster
    probe = subprocess.run([sys.executable, "-c", "from ray._private.utils import "
                            "read_ray_address; print(read_ray_address())"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == dead
    out = _run(["pipelines.prepare_data", "--dataset", "synthetic", "--rows", "5000",
                "--output", str(tmp_path / "data")], env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = Manifest.read(current(tmp_path / "data"))
    assert manifest.counts.accepted == 5000


@pytest.mark.parametrize("how", ["flag", "auto"])
def test_an_unreachable_cluster_fails_within_the_timeout_in_one_line(ray_tmpdir, tmp_path,
                                                                     how):
    import ray

    from tests.conftest import start_local_ray

    rt, dead = ray_tmpdir
    env = user_shell_env(RAY_TMPDIR=str(rt))
    env.pop("RAY_ADDRESS", None)
    address = dead if how == "flag" else "auto"  # auto: the (stale) cluster of this machine
    # auto also finds any Ray running on this machine: the session's, if up, stops meanwhile
    session_ray = how == "auto" and ray.is_initialized()
    if session_ray:
        ray.shutdown()
    t0 = time.monotonic()
    try:
        out = _run(["pipelines.prepare_data", "--dataset", "synthetic", "--rows", "1000",
                    "--output", str(tmp_path / "data"), "--address", address,
                    "--ray-connect-timeout", "3"], env, timeout=120)
    finally:
        if session_ray:
            os.chdir(ROOT)
            start_local_ray()
    assert time.monotonic() - t0 < 60
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    port = dead.rsplit(":", 1)[1]  # auto resolves 127.0.0.1 to this machine's address
    assert re.search(rf"could not reach the Ray cluster at [\d.]+:{port} within 3s", err[0])
    assert "ray status --address" in err[0]
    assert not (tmp_path / "data").exists()


def test_addresses_that_cannot_be_a_cluster_are_named():
    from app.core.cluster import ClusterError, resolve_address

    with pytest.raises(ClusterError, match=r"dashboard \(job API\) address.*ray job submit --address"):
        resolve_address("http://127.0.0.1:8265", timeout=1)
    with pytest.raises(ClusterError, match="--address headnode: expected host:port"):
        resolve_address("headnode", timeout=1)


class _Lines:
    """A child's merged stdout/stderr, read line by line on a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def _until(self, timeout: float, stop=lambda line: False) -> bool:
        """Collect lines until ``stop(line)`` (True), the end of output or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                return False
            self.lines.append(line)
            if stop(line):
                return True
        return False

    def wait_for(self, pattern: str, timeout: float) -> None:
        if not self._until(timeout, lambda line: bool(re.search(pattern, line))):
            raise AssertionError(f"no line matching {pattern!r}; got:\n"
                                 + "\n".join(self.lines))

    def rest(self, timeout: float) -> str:
        self._until(timeout)
        return "\n".join(self.lines)


def _processes_of(rt: Path) -> list[str]:
    """Every process on the machine whose RAY_TMPDIR is ``rt`` (a Ray instance's processes,
    workers too, whatever their process title says)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.Error):
            if p.environ().get("RAY_TMPDIR") == str(rt) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {p.info['name']}")
    return found


def _none_left(rt: Path, within: float) -> None:
    """No process of the Ray instance started under ``rt`` is left ``within`` seconds."""
    deadline = time.monotonic() + within
    while (left := _processes_of(rt)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"still running {within:.0f}s after the command ended: {left}"


@pytest.mark.slow  # a head node or a full run in a plain shell
def test_ctrl_c_during_training_stops_cleanly_and_says_how_to_continue(ray_tmpdir, tmp_path):
    rt, _ = ray_tmpdir
    wd = tmp_path / "wd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.full_run", "--dataset", "synthetic", "--rows",
         "20000", "--epochs", "50", "--patience", "50", "--workdir", str(wd)],
        cwd=ROOT, env=user_shell_env(RAY_TMPDIR=str(rt)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = _Lines(proc)
        lines.wait_for(r"^\[train\] epoch 1:", timeout=400)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        text = lines.rest(timeout=10)
        _none_left(rt, within=10)  # the workers, the raylet's agents: every Ray process of ours
    finally:
        if proc.poll() is None:
            proc.kill()
    said = [line for line in text.splitlines() if line.startswith("interrupted")]
    assert said == ["interrupted by SIGINT during train: the workers were stopped and no model "
                    "folder was published; run the same command with --resume to continue "
                    "from the last epoch checkpoint"], text[-3000:]
    assert "Traceback" not in text
    # nothing that looks complete; the prepared dataset (a finished stage) stays
    assert not (wd / "model-heldout").exists() and not (wd / "model").exists()
    assert not (wd / "summary.json").exists() and not list(wd.rglob(".partial-*"))
    assert (current(wd / "data") / "manifest.json").is_file()
    with sqlite3.connect(wd / "mlflow.db") as db:
        runs = db.execute("select name, status from runs").fetchall()
    assert len(runs) == 1 and runs[0][1] == "KILLED"
    assert runs[0][0].startswith("train synthetic softmax ")


FOREIGN = re.compile(r"^\(\w+ pid=|^\d{4}[-/]\d\d[-/]\d\d[ T]|^\[\d{4}-\d\d-\d\d |\x1b\[|"
                     r"(Future|User|Deprecation|Runtime)Warning|^Traceback")


@pytest.mark.slow  # a head node or a full run in a plain shell
def test_default_full_run_prints_only_the_projects_lines(ray_tmpdir, tmp_path):
    rt, _ = ray_tmpdir
    wd = tmp_path / "wd"
    out = _run(["pipelines.full_run", "--dataset", "synthetic", "--rows", "20000", "--epochs",
                "1", "--workdir", str(wd)], user_shell_env(RAY_TMPDIR=str(rt)), timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    lines = text.splitlines()
    assert len(lines) <= 60, text
    assert [line for line in lines if FOREIGN.search(line)] == [], text
    assert "[train] epoch 1:" in text and "verdict: the model" in text and "EASE" in text
    assert "example recommendations:" in text and "models:/two-tower/" in text

    # what it wrote: every stage, the refit served, the champion alias moved to it
    summary = json.loads((wd / "summary.json").read_text())
    assert list(summary["stages"]) == ["prepare", "train", "refit", "infer"]
    train, refit = summary["stages"]["train"], summary["stages"]["refit"]
    assert (current(wd / "model") / "weights.pt").is_file()
    assert train["metrics"]["epochs"] == 1 and train["mlflow"]["version"] >= 1
    counts = summary["stages"]["prepare"]["counts"]
    # every written row (repeated (user, item) rows are merged by --duplicates first)
    assert refit["training_rows"] == sum(counts["splits"].values()) and refit["epochs"] == 1
    assert json.loads((current(wd / "model") / "metrics.json").read_text())["refit"] is True
    assert "ease" in json.loads((current(wd / "model-heldout") / "metrics.json").read_text())
    assert refit["mlflow"]["version"] == train["mlflow"]["version"] + 1
    promotion = summary["promotion"]
    assert promotion["promoted"] and promotion["version"] == str(refit["mlflow"]["version"])
    assert "alias @champion" in text and "promoted: the first model" in text
    recs = pd.read_parquet(current(wd / "recommendations"))
    assert summary["stages"]["infer"]["summary"]["rows"] == len(recs) > 0
    assert (wd / "val_metrics.png").read_bytes()[:4] == b"\x89PNG"
    # --quiet: errors and the report only
    quiet = _run(["pipelines.full_run", "--dataset", "synthetic", "--rows", "20000",
                  "--workdir", str(wd), "--stages", "prepare", "--quiet"],
                 user_shell_env(RAY_TMPDIR=str(rt)), timeout=300)
    assert quiet.returncode == 0 and "[prepare]" not in quiet.stdout + quiet.stderr
    assert "stage" in quiet.stdout  # the report's table


ENTRY_POINTS = ["prepare_data", "train", "tune", "batch_inference", "full_run"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_lists_its_choices_and_checks_them_at_parse_time(name, capsys):
    import importlib

    module = importlib.import_module(f"pipelines.{name}")
    text = module.build_parser().format_help()
    flags = {"prepare_data": ("--dataset", "{movielens-small,lfs,csv,parquet,synthetic}"),
             "train": ("--topology", "{cpu,snsg,snmg,mnmg}"),
             "tune": ("--search-alg", "{random,optuna}"),
             "batch_inference": ("--index", "{exact,faiss}"),
             "full_run": ("--objective", "{bce,softmax}")}
    flag, choices = flags[name]
    assert f"{flag} {choices}" in text
    assert "--quiet" in text and "--verbose" in text
    required = {"train": ["--data", "d", "--output", "o"], "tune": ["--data", "d", "--output", "o"],
                "batch_inference": ["--model", "m", "--data", "d", "--output", "o"]}
    with pytest.raises(SystemExit) as e:
        module.main(required.get(name, []) + [flag, "nonsense"])
    assert e.value.code == 2
    assert f"argument {flag}: invalid choice: 'nonsense'" in capsys.readouterr().err


def test_flags_keep_one_meaning_and_stay_in_their_section():
    from app.core.config import config_from_args
    from pipelines import batch_inference, full_run, train

    cfg = config_from_args(train.build_parser().parse_args(
        ["--data", "d", "--output", "model-out", "--eval-k", "5,10"]))
    assert cfg.data.output is None  # train's --output is its model folder, not a setting
    assert cfg.train.eval_k == [5, 10]
    cfg = config_from_args(batch_inference.build_parser().parse_args(
        ["--model", "m", "--data", "d", "--output", "o", "--top-k", "7"]))
    assert cfg.inference.top_k == 7
    cfg = config_from_args(full_run.build_parser().parse_args(["--top-k", "7"]))
    assert cfg.inference.top_k == 7 and cfg.train.eval_k == [10, 20, 50]
    help_text = full_run.build_parser().format_help()
    for title in ("data preparation [data]", "training [train]", "batch inference [inference]",
                  "Ray and MLflow [cluster]", "output:", "stages:"):
        assert title in help_text


@pytest.mark.slow  # a trained model, batch inference in a plain shell
@pytest.mark.parametrize("sig, after", [(signal.SIGTERM, "starting"), (signal.SIGINT, "scoring")])
def test_a_signal_during_batch_inference_leaves_no_ray_process(trained, movielens_dir, tmp_path,
                                                               sig, after):
    """SIGTERM while Ray starts, or SIGINT while the actor pool scores (the driver alone gets
    it, as from ``kill``): the command ends with the signal's exit code and one line, and
    within 10 s no process of its Ray is left (the raylet's agents used to linger a minute)."""
    rt = Path(short_tmp())
    out = tmp_path / "recs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.batch_inference", "--model",
         str(trained["model_dir"]), "--data", str(movielens_dir), "--output", str(out)],
        cwd=ROOT, env=user_shell_env(RAY_TMPDIR=str(rt)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = _Lines(proc)
        if after == "starting":  # the first line is printed before Ray starts
            lines.wait_for(r"^config", timeout=120)
        else:
            deadline = time.monotonic() + 120
            while not any("MapWorker" in title for title in _ray_titles(rt)):
                assert time.monotonic() < deadline and proc.poll() is None, lines.rest(1)
                time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig, lines.rest(timeout=5)
        text = lines.rest(timeout=5)
        _none_left(rt, within=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(rt, ignore_errors=True)
    assert "Traceback" not in text, text[-3000:]
    assert not (out.exists() and any(out.iterdir())), sorted(out.iterdir())


def _ray_titles(rt: Path) -> list[str]:
    """The process titles (``ray::MapWorker(...)``, ``ray::IDLE``) of the instance under rt."""
    import psutil

    titles = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.environ().get("RAY_TMPDIR") == str(rt):
                titles.append(" ".join(p.info["cmdline"] or []))
    return titles


@pytest.mark.parametrize("where, said", [
    ("inside", "interrupted by SIGINT during prepare: nothing was published (a prepared "
               "dataset appears only when complete); run the same command again"),
    ("between", "interrupted by SIGINT after prepare: what the finished stages published is "
                "kept; run the same command again to go on from there"),
    ("before", "interrupted by SIGINT during start-up: nothing was published; run the same "
               "command again"),
])
def test_an_interrupt_says_where_it_came_and_how_to_go_on(capsys, where, said):
    """Between two stages of a full run (a finished prepare, the training not begun) the
    line says the finished stages are kept, not that nothing was published."""
    import argparse

    from app.core import cli, logs

    def body(args: argparse.Namespace) -> None:
        if where != "before":
            with logs.stage("prepare"):
                if where == "inside":
                    raise KeyboardInterrupt
        raise KeyboardInterrupt

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = cli.main(cli.parser("prog", None, []), body, [])
    finally:
        for sig, handler in saved.items():  # cli.main set its own, then the defaults
            signal.signal(sig, handler)
    assert code == 130
    assert capsys.readouterr().err.strip() == said
