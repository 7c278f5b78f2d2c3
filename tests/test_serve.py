"""The Ray Serve app, over real HTTP on the session's local Ray: the same answers as batch
inference and the serving core, bad requests refused with reasons, a model swapped under load,
and ``python -m pipelines.serve`` from a plain shell."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch

from app.core.cluster import _free_port
from app.core.config import load_config
from app.core.publish import current
from app.serve.core import Recommender
from app.train.model_folder import MODEL_JSON, WEIGHTS, sha256_of
from tests.conftest import ROOT, short_tmp, user_shell_env

pytestmark = pytest.mark.slow  # the Ray Serve app on a trained model

NAME = "two-tower-test"  # registered by the `trained` fixture


def serve_config(trained, **overrides):
    return load_config(overrides={"workdir": str(trained["work"]), "registered_model_name": NAME,
                                  "port": _free_port(), "max_k": 100, "max_pairs": 50,
                                  "reload_interval": 0.5, **overrides})


@pytest.fixture(scope="module")
def app_url(trained):
    """The app on the session's Ray, following models:/two-tower-test@champion."""
    from ray import serve

    from app.core import tracking
    from app.serve.http import run

    cfg = serve_config(trained)
    version = json.loads((trained["model_dir"] / "mlflow.json").read_text())["version"]
    tracking.configure(cfg.cluster)  # the fixture's store
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", str(version))
    os.chdir(ROOT)
    url = run(cfg, f"models:/{NAME}@champion", block=False, say=lambda msg: None)
    yield {"url": url, "cfg": cfg, "version": f"{NAME}/{version}"}
    serve.shutdown()  # this module started Serve on the session's Ray


def test_replicas_that_do_not_fit_fail_at_once(trained):
    from app.serve.http import run
    from app.train.placement import ResourceError

    t0 = time.perf_counter()
    with pytest.raises(ResourceError, match=r"--replicas 1 x \(1 CPU, 1 GPU\) do not fit"):
        run(serve_config(trained, replica_gpus=1), str(trained["model_dir"]), block=False,
            say=lambda msg: None)
    assert time.perf_counter() - t0 < 30


def post(url: str, path: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json"},
                         timeout=30, **kw)


def test_recommendations_equal_the_batch_table_and_the_core(app_url, trained, movielens_dir,
                                                            tmp_path):
    from app.serve.batch import batch_inference

    core = Recommender(trained["model_dir"])
    users = core.user_ids.iloc[[0, 7, 42, 300]].tolist()
    pd.DataFrame({"userId": users + [99999999]}).to_csv(tmp_path / "users.csv", index=False)
    cfg = load_config(overrides={"workdir": str(trained["work"]), "top_k": 20})
    batch_inference(cfg, str(trained["model_dir"]), str(movielens_dir), str(tmp_path / "recs"),
                    users=str(tmp_path / "users.csv"), verbose=False)
    table = pd.read_parquet(current(tmp_path / "recs"))
    for user in users + [99999999]:
        got = post(app_url["url"], "/recommend", {"user_id": str(user), "k": 20})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["model_version"] == app_url["version"]
        want = table[table["userId"] == str(user)].sort_values("rank")
        assert [i["item_id"] for i in body["items"]] == want["movieId"].astype(str).tolist()
        assert np.allclose([i["score"] for i in body["items"]], want["score"], atol=1e-4)
        assert body["source"] == want["source"].iloc[0]
        assert [i["title"] for i in body["items"]] == want["title"].tolist()
        assert body["user_known"] == (user != 99999999)
        mine = core.recommend([user], k=20)
        assert mine["movieId"].tolist() == want["movieId"].astype(int).tolist()
    # the rated items are left out unless asked not to
    rated = set(core.rated.items[core.rated.offsets[1]:core.rated.offsets[2]].tolist())
    user = str(core.user_ids.iloc[0])
    kept = post(app_url["url"], "/recommend",
                {"user_id": user, "k": 100, "exclude_rated": False}).json()["items"]
    left = post(app_url["url"], "/recommend", {"user_id": user, "k": 100}).json()["items"]
    ids = lambda items: {int(i["item_id"]) for i in items}  # noqa: E731
    rated_ids = set(core.item_ids.iloc[[i - 1 for i in rated]].tolist())
    assert ids(kept) & rated_ids and not ids(left) & rated_ids


def test_a_new_user_with_a_history_gets_history_based_items(app_url, trained):
    core = Recommender(trained["model_dir"])
    history = [str(i) for i in core.item_ids.iloc[[3, 30, 300, 3000]].tolist()]
    body = post(app_url["url"], "/recommend",
                {"user_id": "someone-new", "k": 10, "history": history + ["no-such-item"]}
                ).json()
    assert body["source"] == "history" and body["user_known"] is False
    got = [i["item_id"] for i in body["items"]]
    assert not set(got) & set(history) and len(got) == 10
    want = core.recommend(["someone-new"], k=10, histories=[history])
    assert got == want["movieId"].astype(str).tolist()
    popular = post(app_url["url"], "/recommend", {"user_id": "someone-new", "k": 10}).json()
    assert popular["source"] == "popularity" and [i["item_id"] for i in popular["items"]] != got


def test_bad_requests_get_4xx_with_a_reason_and_unknown_ids_are_flagged(app_url):
    url = app_url["url"]
    cases = {
        '{"user_id": "1", "k": 5': "malformed JSON",
        json.dumps({"k": 5}): "user_id",
        json.dumps({"user_id": "1", "k": "ten"}): "k",
        json.dumps({"user_id": ["1"], "k": 5}): "user_id",
        json.dumps({"user_id": "1", "k": 0}): "k: must be in 1..100",
        json.dumps({"user_id": "1", "k": 101}): "k: must be in 1..100",
        json.dumps({"user_id": "1", "k": 5, "colour": "red"}): "colour",
        json.dumps({"user_id": "1", "history": "1,2"}): "history",
    }
    for body, reason in cases.items():
        got = post(url, "/recommend", body)
        assert 400 <= got.status_code < 500, (body, got.status_code, got.text)
        error = got.json()["error"]
        assert reason in error and "\n" not in error, (body, error)
    too_many = {"pairs": [{"user_id": "1", "item_id": "1"}] * 51}
    got = post(url, "/score", too_many)
    assert got.status_code == 422 and "at most 50" in got.json()["error"]
    assert post(url, "/score", {"pairs": []}).status_code == 422
    assert post(url, "/score", {"pair": []}).status_code == 422

    core_user = requests.get(url + "/version", timeout=30).json()
    assert core_user["model_version"] == app_url["version"] and core_user["items"] > 1000
    scored = post(url, "/score", {"pairs": [{"user_id": 1, "item_id": 1},
                                            {"user_id": "1", "item_id": "no-such-item"},
                                            {"user_id": "nobody", "item_id": "1"}]}).json()
    rows = scored["pairs"]
    assert rows[0]["known_user"] and rows[0]["known_item"] and 0 < rows[0]["probability"] < 1
    assert rows[1]["known_item"] is False and rows[1]["score"] is None
    assert rows[2]["known_user"] is False and rows[2]["probability"] is None
    assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ready"
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    assert {"/recommend", "/score", "/healthz", "/version"} <= set(spec["paths"])
    assert requests.get(url + "/docs", timeout=30).status_code == 200


def test_a_history_of_unknown_items_is_no_history_and_is_counted(app_url, trained):
    url = app_url["url"]
    core = Recommender(trained["model_dir"])
    known_user = str(core.user_ids.iloc[7])
    popular = post(url, "/recommend", {"user_id": "new", "k": 10}).json()
    stored = post(url, "/recommend", {"user_id": known_user, "k": 10}).json()
    for user, want in (("new", popular), (known_user, stored)):
        body = post(url, "/recommend", {"user_id": user, "k": 10,
                                        "history": ["nope", "no-such-item"]}).json()
        assert body["source"] == want["source"] and body["items"] == want["items"], body
        assert body["unknown_history_items"] == 2
        assert want["unknown_history_items"] == 0
    assert popular["source"] == "popularity" and stored["source"] == "model"
    item = str(core.item_ids.iloc[3])
    some = post(url, "/recommend", {"user_id": "new", "k": 10,
                                    "history": [item, "nope"]}).json()
    assert some["source"] == "history" and some["unknown_history_items"] == 1
    # the core behind batch inference and the pyfunc answers the same
    mine = core.recommend(["new", known_user], k=10, histories=[["nope"], ["nope"]])
    assert list(mine.groupby("userId", sort=False)["source"].first()) == ["popularity", "model"]
    assert core.unknown_history_items == 2
    assert mine[mine["userId"] == known_user]["movieId"].astype(str).tolist() == \
        [i["item_id"] for i in stored["items"]]


def test_every_refusal_over_http_has_the_one_error_shape(app_url):
    url = app_url["url"]

    def refused(r: requests.Response, status: int, reason: str) -> None:
        assert r.status_code == status, (r.status_code, r.text[:300])
        assert r.headers["content-type"] == "application/json", r.headers
        body = r.json()
        assert set(body) == {"error"} and reason in body["error"], body

    refused(post(url, "/recommend", {"user_id": "", "k": 5}), 422, "user_id: must not be empty")
    refused(post(url, "/recommend", {"user_id": " ", "k": 5}), 422, "user_id: must not be empty")
    refused(post(url, "/recommend", '{"user_id": "\\ud800", "k": 5}'), 422,
            "user_id: contains a lone surrogate (U+D800)")
    refused(post(url, "/recommend", '{"user_id": "1", "history": ["\\ud800"]}'), 422,
            "history.0: contains a lone surrogate")
    refused(post(url, "/score", '{"pairs": [{"user_id": "1", "item_id": "\\udc00"}]}'), 422,
            "pairs.0.item_id: contains a lone surrogate")
    refused(post(url, "/recommend", "[" * 100_000 + "]" * 100_000), 422,
            "malformed JSON: nested too deeply")
    refused(requests.get(url + "/recommend", timeout=30), 405, "GET /recommend")
    refused(requests.put(url + "/healthz", timeout=30), 405, "PUT /healthz")
    refused(requests.get(url + "/no/such/path", timeout=30), 404, "/no/such/path")
    for path in ("/healthz", "/version", "/docs", "/openapi.json"):
        head, get = requests.head(url + path, timeout=30), requests.get(url + path, timeout=30)
        assert head.status_code == get.status_code == 200 and head.content == b"", path
    assert requests.get(url + "/version", timeout=30).json()["pending"] is None


def _second_version(trained, tmp_path) -> tuple[Path, str]:
    """A different model (item rows permuted) registered as a new version of NAME."""
    from app.core import tracking

    folder = tmp_path / "v2"
    shutil.copytree(trained["model_dir"], folder)
    state = torch.load(folder / WEIGHTS, weights_only=True)
    for key, value in state.items():
        if "item" in key and value.dim() == 2 and value.shape[0] > 1000:
            state[key] = value[torch.randperm(value.shape[0], generator=torch.Generator()
                                              .manual_seed(0))]
    torch.save(state, folder / WEIGHTS)
    info = json.loads((folder / MODEL_JSON).read_text())
    info["sha256"][WEIGHTS] = sha256_of(folder / WEIGHTS)
    (folder / MODEL_JSON).write_text(json.dumps(info))
    cfg = serve_config(trained)
    run_id = tracking.start_run(cfg, run_name="second version")
    from app.train import registry

    registered = registry.log_trained_model(cfg.cluster, run_id, folder, info["dataset"]["vocab"])
    tracking.end_run(cfg.cluster, run_id)
    return folder, f"{NAME}/{registered.version}"


def test_a_new_version_is_swapped_in_under_load_without_a_failed_request(app_url, trained,
                                                                        tmp_path):
    folder, v2 = _second_version(trained, tmp_path)
    user = str(Recommender(trained["model_dir"]).user_ids.iloc[5])
    expected = {app_url["version"]: Recommender(trained["model_dir"]).recommend([user], 10),
                v2: Recommender(folder).recommend([user], 10)}
    expected = {v: df["movieId"].astype(str).tolist() for v, df in expected.items()}
    assert expected[app_url["version"]] != expected[v2]
    seen, failures, stop = [], [], threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    r = session.post(app_url["url"] + "/recommend", timeout=30,
                                     json={"user_id": user, "k": 10})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    body = r.json()
                    seen.append((body["model_version"], [i["item_id"] for i in body["items"]]))
                except requests.RequestException as e:
                    failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", v2.split("/")[1])
        deadline = time.time() + 60
        while time.time() < deadline and not any(v == v2 for v, _ in seen[-5:]):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion",
                                                         app_url["version"].split("/")[1])
    assert not failures, failures[:3]
    versions = [v for v, _ in seen]
    assert versions[0] == app_url["version"] and versions[-1] == v2
    assert set(versions) == {app_url["version"], v2}
    # every response is exactly its own version's answer: no response mixes two models
    assert all(items == expected[v] for v, items in seen)
    info = requests.get(app_url["url"] + "/version", timeout=30).json()
    assert info["swaps"] >= 1


def test_the_serve_entry_point_runs_and_stops_cleanly_from_a_plain_shell(trained, tmp_path):
    """The README's command: serves a model folder until SIGINT, then deletes the app and
    shuts down the embedded Ray it started (exit 0, no Ray process left).

    On a machine too busy for Serve's HTTP proxy to start within Serve's ready check (here:
    a check of 0.05 s), the proxy is killed and restarted; ``ready`` still means the URL
    answers at once."""
    import psutil

    port = _free_port()
    tmpdir = short_tmp()
    env = user_shell_env(RAY_TMPDIR=tmpdir, RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="0.05")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve", "--model",
                             str(trained["model_dir"].parent), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and \
                not any("[serve] serving until" in line for line in lines):
            time.sleep(0.5)
        assert proc.poll() is None, "".join(lines)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        assert any("[serve] ready" in line for line in lines)  # printed before "serving"
        body = post(f"http://127.0.0.1:{port}", "/recommend", {"user_id": "1", "k": 3}).json()
        assert len(body["items"]) == 3
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
        out = "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert proc.returncode == 0, out
    assert "[serve] ready" in out and "[serve] stopped" in out, out
    assert "Traceback" not in out, out
    time.sleep(2)
    assert not [p for p in children if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], out


@pytest.mark.gpu
def test_a_gpu_replica_scores_on_the_gpu_and_agrees_with_the_cpu_core(trained):
    """--replica-gpus 1: the replica's towers and ranking run on CUDA; its lists equal the
    CPU core's (the same model), scores within float tolerance."""
    from ray import serve

    from app.serve.http import run

    cfg = serve_config(trained, replica_gpus=1, reload_interval=0)
    url = run(cfg, str(trained["model_dir"]), block=False, say=lambda msg: None)
    try:
        core = Recommender(trained["model_dir"])
        for user in core.user_ids.iloc[[0, 10, 100]].tolist():
            body = post(url, "/recommend", {"user_id": str(user), "k": 20}).json()
            want = core.recommend([user], 20)
            assert [i["item_id"] for i in body["items"]] == \
                want["movieId"].astype(str).tolist()
            assert np.allclose([i["score"] for i in body["items"]], want["score"], atol=1e-3)
    finally:
        serve.shutdown()
