"""Nothing loaded from storage runs code: a pickle payload planted in a training checkpoint's
``.metadata`` or in a model folder's ``weights.pt`` is refused with one line naming the file,
and the payload never runs (it would create a file). What is served is what was trained: a
changed byte in a sealed file of a model folder fails the load in one line. The registered
MLflow model is code, not a pickle. A credential in a URI is used, and never printed or saved."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from app.data.dataset import Manifest

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _checkpoint_of(trained) -> Path:
    return Path(trained["summary"].checkpoint)


def test_a_planted_metadata_payload_is_refused_and_never_runs(trained, tmp_path):
    from app.train.checkpoint import CheckpointError, load_full, load_sharded
    from app.train.driver import consolidate

    ckpt = tmp_path / "ckpt"
    shutil.copytree(_checkpoint_of(trained), ckpt)
    assert set(consolidate(ckpt)) == set(consolidate(_checkpoint_of(trained)))  # reads fine
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    # the payload works with a plain unpickler: this is what torch's own reader would run
    with open(ckpt / ".metadata", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load.*pathlib.*touch"):
        load_full(ckpt)  # the export path (consolidation on the driver)
    with pytest.raises(Exception, match=r"\.metadata: refused to load"):
        load_sharded({"model": {}}, ckpt)  # the resume path (every worker)
    assert not marker.exists()


def test_a_planted_weights_payload_or_a_damaged_file_fails_in_one_line(trained, tmp_path):
    from app.train.model_folder import ModelError, load_exported

    model_dir = tmp_path / "model"
    shutil.copytree(trained["model_dir"], model_dir)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, model_dir / "weights.pt")
    # whoever can write weights.pt can rewrite model.json's checksum too
    info = json.loads((model_dir / "model.json").read_text())
    info["sha256"]["weights.pt"] = hashlib.sha256(
        (model_dir / "weights.pt").read_bytes()).hexdigest()
    (model_dir / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match=r"weights\.pt: refused to load") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value) and not marker.exists()
    good = (trained["model_dir"] / "weights.pt").read_bytes()
    (model_dir / "weights.pt").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ModelError, match=r"weights\.pt: sha256 .* differs") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value)


def test_a_changed_byte_in_the_weights_fails_the_load_in_one_line(trained, tmp_path):
    from app.train.model_folder import ModelError, load_exported, read_model_json

    model_dir = tmp_path / "model"
    shutil.copytree(trained["model_dir"], model_dir)
    sealed = read_model_json(model_dir).sha256
    assert {"weights.pt", "user_history.npz", "item_popularity.npy"} <= set(sealed)
    assert any(name.startswith("vocab/") for name in sealed)
    load_exported(model_dir)  # intact: loads
    data = bytearray((model_dir / "weights.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte inside a tensor
    (model_dir / "weights.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"weights\.pt: sha256 .* differs .* after export") as e:
        load_exported(model_dir)
    assert "\n" not in str(e.value)
    shutil.copy(trained["model_dir"] / "weights.pt", model_dir / "weights.pt")
    (model_dir / "vocab" / "items.parquet").write_bytes(b"")
    with pytest.raises(ModelError, match=r"items\.parquet: sha256"):
        load_exported(model_dir)


def test_the_registered_model_is_code_not_a_pickle(trained):
    """The pyfunc model is logged as code (MLflow's models-from-code): its MLmodel names the
    code file, no pickled Python model is stored, and ``app/`` travels as its code."""
    import mlflow
    import yaml

    info = json.loads((trained["model_dir"] / "mlflow.json").read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])  # models:/ URIs resolve in this store
    local = Path(mlflow.artifacts.download_artifacts(info["model_uri"]))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    code = Path(flavor["model_code_path"]).name
    assert (local / code).read_text() == (ROOT / "app" / "serve" / "pyfunc_model.py").read_text()
    assert (local / "code" / "app" / "serve" / "core.py").is_file()
    assert (local / flavor["artifacts"]["model_dir"]["path"] / "weights.pt").is_file()
    pickles = [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert not pickles


# ---- credentials in URIs: used, never shown or saved ----------------------------------------

@pytest.mark.parametrize("given, shown", [
    ("https://ann:pw1@host/f.zip?token=t1&v=2", "https://ann:***@host/f.zip?token=***&v=2"),
    ("http://tok1@host:5000", "http://***@host:5000"),
    ("s3://AKID:pw@1@bucket/p?endpoint_override=localhost:9000",
     "s3://AKID:***@bucket/p?endpoint_override=localhost:9000"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=c&X-Amz-Signature=s&X-Amz-Date=d",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=d"),
    ("https://h/p?sig=1&api_key=2&access_token=3&key=4&password=5&secret=6&page=7",
     "https://h/p?sig=***&api_key=***&access_token=***&key=***&password=***&secret=***&page=7"),
    ("could not download https://u:p@h/x.zip (timed out); pass --input",
     "could not download https://u:***@h/x.zip (timed out); pass --input"),
    ("sqlite:////tmp/w/mlflow.db", "sqlite:////tmp/w/mlflow.db"),
    ("databricks", "databricks"),
])
def test_redact_masks_uri_credentials_and_keeps_the_rest(given, shown):
    from app.core.redact import redact, redact_values

    assert redact(given) == shown
    assert redact_values({"a": [given, 3], "b": (given,)}) == {"a": [shown, 3], "b": (shown,)}

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server (its own process group) with its store under ``root``;
    returns the process and its address. Not waited for: see :func:`_wait_for`."""
    port = _free_port()
    root.mkdir(parents=True)
    log = open(root.parent / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the server holds its own copy
    return proc, f"127.0.0.1:{port}"


def _wait_for(proc: subprocess.Popen, address: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the MLflow server exited"
        try:
            urllib.request.urlopen(f"http://{address}/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no MLflow server on {address} after {timeout}s")


def _serve_with_credentials(directory: Path, user: str, password: str, token: str):
    """An HTTP server of ``directory`` that answers only requests with basic auth
    ``user:password`` and ``token=<token>`` in the query; returns (server, paths served)."""
    import base64
    import functools
    import http.server

    want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    served: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != want or f"token={token}" not in self.path:
                self.send_error(401)
                return
            served.append(self.path.split("?")[0])
            super().do_GET()

        def log_message(self, *args) -> None:  # the default prints the query to stderr
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, served


def _files_holding(needle: bytes, *roots: Path) -> list[str]:
    return [str(p) for root in roots for p in Path(root).rglob("*")
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_a_saved_config_holds_no_credential_and_loads_back_with_them(tmp_path):
    from app.core.config import load_config

    cfg = load_config(overrides={"mlflow_tracking_uri": "http://ann:pw1@h:5000",
                                 "download_url": "https://h/x.zip?sig=pw1&v=2",
                                 "address": "ray://ann:pw1@h:10001", "workdir": "w"})
    cfg.dump_yaml(tmp_path / "c.yaml")
    assert "pw1" not in (tmp_path / "c.yaml").read_text()
    assert "pw1" not in cfg.describe() and "pw1" not in cfg.describe(everything=True)
    assert cfg.credentials() == {"download_url": "https://h/x.zip?sig=pw1&v=2",
                                 "address": "ray://ann:pw1@h:10001",
                                 "mlflow_tracking_uri": "http://ann:pw1@h:5000"}
    assert load_config(str(tmp_path / "c.yaml"), cfg.credentials()) == cfg


@pytest.mark.slow  # a full run against an MLflow server
def test_credentials_in_uris_are_used_but_never_printed_or_saved(ray_local, tmp_path, capfd):
    """A download URL with ``user:secret@`` and secret query parameters, a tracking URI of a
    real MLflow server with ``user:secret@`` and a Ray address with one: the download and
    MLflow use them, and the secret is in no output line, no file of the workdir (config,
    manifest, model folder, mlflow.json, summary), nor anywhere in the MLflow store."""
    import mlflow

    from pipelines import full_run
    from tests.conftest import write_lfs_csv

    secret = "pw" + secrets.token_hex(8)  # in no source file: a hit is a leak
    proc, address = _start_mlflow_server(tmp_path / "mlflow-server")
    try:
        write_lfs_csv(tmp_path / "www" / "lfs" / "item_ratings.csv", rows=6000)
        http, served = _serve_with_credentials(tmp_path / "www", "ann", secret, secret)
        url = (f"http://ann:{secret}@127.0.0.1:{http.server_port}/lfs/item_ratings.csv"
               f"?token={secret}&X-Amz-Signature={secret}&v=2")
        tracking = f"http://ann:{secret}@{address}"
        wd = tmp_path / "wd"
        argv = ["--dataset", "lfs", "--download-url", url, "--workdir", str(wd),
                "--stages", "prepare,train", "--no-refit", "--epochs", "1",
                "--tune", "--num-samples", "1",  # Tune saves its trials' configs too
                "--num-workers", "1", "--mlflow-tracking-uri", tracking,
                "--address", f"ray://ann:{secret}@127.0.0.1:10001",
                "--registered-model-name", "two-tower-redacted"]
        _wait_for(proc, address)
        try:
            assert full_run.main(argv) == 0
        finally:
            http.shutdown()
        out, err = capfd.readouterr()

        # the credentials were used: the download authenticated, the run is on the server
        assert served == ["/lfs/item_ratings.csv"]
        summary = json.loads((wd / "summary.json").read_text())
        assert summary["stages"]["prepare"]["counts"]["accepted"] == 6000
        assert (wd / "sweep" / "best_config.yaml").is_file()
        assert summary["tracking_uri"] == f"http://ann:***@{address}"
        run_id = summary["stages"]["train"]["mlflow"]["run_id"]
        run = mlflow.MlflowClient(tracking).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["data.download_url"].startswith("http://ann:***@127.0.0.1:")
        assert "token=***&X-Amz-Signature=***&v=2" in run.data.params["data.download_url"]
        assert "train_loss" in run.data.metrics  # logged by the training worker
        manifest = Manifest.read(next(wd.glob("data/**/manifest.json")).parent)
        assert "ann:***@" in manifest.config["download_url"]
        assert "ann:***@" in manifest.source["input"]
        assert "mlflow_tracking_uri: http://ann:***@" in (wd / "config.yaml").read_text()
        assert "ann:***@" in out  # the printed config and the download line, masked

        assert [line for line in (out + err).splitlines() if secret in line] == []
        needle = secret.encode()
        assert _files_holding(needle, wd) == []
        assert _files_holding(needle, tmp_path / "mlflow-server") == []
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
