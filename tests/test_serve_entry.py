"""``python -m pipelines.serve`` started as users start it (a plain shell, its own embedded Ray):
a refused model version is said once on the console and in ``/version`` while the old one
keeps answering, and a signal at any point stops every Ray process it started within 10 s."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest
import requests

from app.core.cluster import _free_port
from app.train.model_folder import WEIGHTS
from tests.conftest import ROOT, short_tmp, user_shell_env

pytestmark = pytest.mark.slow  # the serving app's own embedded Ray


class ServeProcess:
    """``python -m pipelines.serve --model MODEL --port PORT ...`` in a new session, its
    console collected line by line; :meth:`close` kills what is left."""

    def __init__(self, model: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmpdir = short_tmp()
        env = user_shell_env(RAY_TMPDIR=self.tmpdir)
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", "--model", str(model), "--port",
             str(self.port), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                        daemon=True)
        self._reader.start()
        self.tree: dict[int, psutil.Process] = {}

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, test: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.remember_tree()
            if test():
                return
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.out}"
            time.sleep(0.25)
        raise AssertionError(f"no {what} within {timeout:g}s:\n{self.out[-4000:]}")

    def wait_line(self, text: str, timeout: float = 240) -> None:
        self.wait_for(lambda: text in self.out, timeout, repr(text))

    def remember_tree(self) -> list[psutil.Process]:
        """Every process of the app seen so far (the entry point and its descendants)."""
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.tree.setdefault(p.pid, p)
        except psutil.Error:
            pass
        return list(self.tree.values())

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.tree.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.alive():  # what a failed run left behind
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _publish(out: Path, source: Path, name: str, corrupt: bool) -> Path:
    """A copy of ``source`` published as version ``name`` of ``out`` (its CURRENT moved);
    ``corrupt`` flips one byte of its weights, which model.json's sha256 then refuses."""
    version = out / name
    shutil.copytree(source, version)
    if corrupt:
        data = bytearray((version / WEIGHTS).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (version / WEIGHTS).write_bytes(bytes(data))
    (out / "CURRENT.tmp").write_text(name)
    os.replace(out / "CURRENT.tmp", out / "CURRENT")
    return version


def _get(url: str) -> dict:
    r = requests.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_refused_version_is_said_once_and_the_old_one_serves_until_it_is_fixed(trained,
                                                                              tmp_path):
    first = trained["model_dir"]
    out = tmp_path / "model"
    out.mkdir()
    _publish(out, first, first.name, corrupt=False)
    app = ServeProcess(out, "--reload-interval", "1")
    try:
        app.wait_line("[serve] serving until")
        before = _get(app.url + "/version")
        assert before["model_version"] == first.name and before["pending"] is None
        bad = "v-000099-20990101T000000Z"
        version = _publish(out, first, bad, corrupt=True)
        app.wait_for(lambda: _get(app.url + "/version")["pending"] is not None, 60,
                     "pending version in /version")
        pending = _get(app.url + "/version")["pending"]
        assert pending["version"] == bad and WEIGHTS in pending["error"], pending
        app.wait_line(" refused: ", timeout=30)
        time.sleep(5)  # five more reload intervals: neither retried nor said again
        refused = [line for line in app.lines if " refused: " in line]
        assert len(refused) == 1, refused
        assert refused[0].startswith("[serve] model version " + bad), refused
        assert WEIGHTS in refused[0] and first.name in refused[0], refused  # reason, served
        body = requests.post(app.url + "/recommend", json={"user_id": "1", "k": 3},
                             timeout=30).json()
        assert body["model_version"] == first.name and len(body["items"]) == 3
        # fixed in place (new files, new modification times): loaded and swapped in
        (version / WEIGHTS).write_bytes((first / WEIGHTS).read_bytes())
        app.wait_for(lambda: _get(app.url + "/version")["model_version"] == bad, 60,
                     "the fixed version served")
        after = _get(app.url + "/version")
        assert after["pending"] is None and after["swaps"] == 1
        assert len([line for line in app.lines if " refused: " in line]) == 1
    finally:
        app.close()


@pytest.mark.parametrize("when, sig", [("start-up", signal.SIGINT),
                                       ("serving", signal.SIGTERM)])
def test_a_signal_stops_every_ray_process_within_10s(trained, when, sig):
    """Interrupted while Ray's agents are up but the app is not yet deployed, or while it
    serves: no process of the app outlives the entry point by more than 10 s."""
    app = ServeProcess(trained["model_dir"].parent)
    try:
        if when == "start-up":
            # the raylet's agents are up: the state a Ctrl-C during deployment meets
            app.wait_for(lambda: {"dashboard_agent", "runtime_env_agent"} <= _names(app), 240,
                         "Ray's agents")
        else:
            app.wait_line("[serve] serving until")
        procs = app.remember_tree()
        assert len(procs) > 3, _names(app)
        t0 = time.time()
        app.proc.send_signal(sig)
        app.proc.wait(timeout=60)
        deadline = t0 + 10
        while time.time() < deadline and app.alive():
            time.sleep(0.2)
        left = [f"{p.pid} {_name(p)}" for p in app.alive()]
        assert not left, f"still running {time.time() - t0:.0f}s after {sig.name}: {left}\n" \
                         f"{app.out[-3000:]}"
        expected = 0 if when == "serving" else 128 + sig
        assert app.proc.returncode == expected, app.out
        assert "Traceback" not in app.out, app.out
    finally:
        app.close()


def _name(p: psutil.Process) -> Optional[str]:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return None
    for part, known in (("dashboard/agent.py", "dashboard_agent"),
                        ("runtime_env/agent/main.py", "runtime_env_agent"),
                        ("raylet", "raylet"), ("gcs_server", "gcs_server")):
        if part in cmd:
            return known
    return p.name() if p.is_running() else None


def _names(app: ServeProcess) -> set[Optional[str]]:
    return {_name(p) for p in app.remember_tree()}
