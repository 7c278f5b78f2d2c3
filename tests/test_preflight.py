"""Every location a stage touches is checked before Ray starts: a missing bucket, an endpoint
that refuses or never answers, or absent credentials is one line naming the location, exit
code 2, within about ``--storage-timeout`` seconds, and no Ray. Against a real S3 API server
(moto), a closed port and a socket that never answers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from app.core.config import load_config
from app.core.errors import StorageError
from app.core.preflight import (
    Use,
    check,
    check_infer,
    check_serve,
    check_train,
)
from app.core.storage import resolve
from tests.conftest import ROOT, short_tmp, user_shell_env


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """This process without AWS credentials: no keys, no profile, empty credential files, no
    instance metadata (a CI machine on EC2 would otherwise find its role)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, env in _no_credentials_env(tmp_path).items():
        monkeypatch.setenv(name, env)


def _no_credentials_env(tmp_path: Path) -> dict[str, str]:
    return {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_EC2_METADATA_DISABLED": "true"}


def _raises(uses: list[Use], timeout: float = 5) -> str:
    with pytest.raises(StorageError) as e:
        check(uses, timeout=timeout)
    text = str(e.value)
    assert "\n" not in text
    return text


# --- in process ---------------------------------------------------------------------------


def test_usable_locations_pass_silently(s3, tmp_path, capsys):
    resolve(f"{s3}/raw/ratings.csv").write_bytes(b"userId,movieId\n1,2\n")
    resolve(f"{s3}/data/CURRENT").write_text("v-000001\n")
    check([Use(f"{s3}/raw/ratings.csv", "--input", read=True),
           Use(f"{s3}/raw/*.csv", "--input", read=True),  # a glob: its folder exists
           Use(f"{s3}/data", "--data", read=True),          # a folder: objects under it
           Use(f"{s3}/model", "--output"),                  # written: the bucket suffices
           Use(str(tmp_path / "absent"), "--users", read=True)],  # local: the stage's own check
          timeout=5)
    assert capsys.readouterr() == ("", "")


def test_a_missing_bucket_is_named(s3):
    text = _raises([Use(f"{s3}/data", "--data", read=True),
                    Use("s3://no-such-bucket/model", "--output")])
    assert text == "s3://no-such-bucket/model: bucket no-such-bucket does not exist (--output)"


def test_a_missing_input_is_named(s3):
    resolve(f"{s3}/raw/ratings.csv").write_bytes(b"x")
    assert _raises([Use(f"{s3}/raw/rating", "--input", read=True)]) == \
        f"{s3}/raw/rating: does not exist (--input)"  # a prefix of a key is not the key
    assert _raises([Use(f"{s3}/data", "--data", read=True)]) == \
        f"{s3}/data: does not exist (--data)"
    assert _raises([Use(f"{s3}/other/*.csv", "--input", read=True)]).startswith(
        f"{s3}/other/*.csv: does not exist")


def test_an_endpoint_that_refuses_is_named(monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    text = _raises([Use("s3://bkt/x", "--output"), Use("s3://other/y", "--data", read=True)])
    assert text == (f"s3://bkt/x: the S3 endpoint {endpoint} refused the connection (--output); "
                    f"1 other location(s) fail too (s3://other/y)")


def test_an_endpoint_that_never_answers_costs_one_timeout(silent_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    t0 = time.perf_counter()
    text = _raises([Use(f"s3://bkt-{i}/x", "--output") for i in range(4)], timeout=1)
    seconds = time.perf_counter() - t0
    assert text.startswith(f"s3://bkt-0/x: the S3 endpoint {silent_endpoint} did not answer "
                           f"within 1 s (--output)")
    assert 1 <= seconds < 2.5, f"{seconds:.1f}s for 4 buckets: probed one after another?"


def test_absent_credentials_are_named(s3_server, no_credentials):
    text = _raises([Use("s3://bkt/data", "--data", read=True)])
    assert text.startswith("s3://bkt/data: no credentials: set AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")


def test_local_paths_make_no_request(tmp_path, monkeypatch, no_credentials):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    cluster = load_config(overrides={"workdir": str(tmp_path / "work")}).cluster
    t0 = time.perf_counter()
    check_train(cluster, str(tmp_path / "data"), f"file://{tmp_path}/model")
    check_infer(cluster, "models:/two-tower@champion", str(tmp_path / "data"),
                str(tmp_path / "recs"), str(tmp_path / "users.csv"))
    assert time.perf_counter() - t0 < 0.5


def test_each_stage_checks_what_it_writes_besides_its_output(s3):
    """The workdir's checkpoints and MLflow artifacts (training), a users file (batch
    inference), MLflow's artifacts for a registered model (serving)."""
    resolve(f"{s3}/data/CURRENT").write_text("v-000001\n")
    lost = load_config(overrides={"workdir": "s3://lost-bucket/run"}).cluster
    with pytest.raises(StorageError, match=r"^s3://lost-bucket/run/checkpoints: bucket "
                                          r"lost-bucket does not exist \(--workdir"):
        check_train(lost, f"{s3}/data", f"{s3}/model")
    lost.storage_path = f"{s3}/checkpoints"
    with pytest.raises(StorageError, match=r"^s3://lost-bucket/run/mlartifacts: bucket "):
        check_train(lost, f"{s3}/data", f"{s3}/model")
    with pytest.raises(StorageError, match=r"^s3://lost-bucket/run/mlartifacts: bucket "):
        check_serve(lost, "models:/two-tower@champion")
    here = load_config(overrides={"workdir": f"{s3}/run"}).cluster
    check_train(here, f"{s3}/data", f"{s3}/model")
    with pytest.raises(StorageError, match=r"/users.csv: does not exist \(--users\)$"):
        check_infer(here, f"{s3}/data", f"{s3}/data", f"{s3}/recs", f"{s3}/users.csv")


# --- entry points, as users run them -----------------------------------------------------


@pytest.fixture
def child_env(s3_server, tmp_path):
    """A user's shell pointed at the S3 server, with a private RAY_TMPDIR (checked empty of
    Ray sessions afterwards) and a local workdir; yields (env, RAY_TMPDIR)."""
    rt = Path(short_tmp("pf-"))
    env = user_shell_env(**s3_server.env, RAY_TMPDIR=str(rt),
                         TWOTOWER_WORKDIR=str(tmp_path / "work"),
                         TWOTOWER_CACHE_DIR=str(tmp_path / "cache"))
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "RAY_ADDRESS", "S3_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(name, None)
    yield env, rt
    shutil.rmtree(rt, ignore_errors=True)


def _fails_before_ray(args: list[str], env: dict[str, str], rt: Path, expected: str) -> str:
    """Run ``python -m args``: exit code 2 within 35 s, one stderr line that starts with
    ``error: expected``, and no Ray session was started. Returns the line."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, timeout=120,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), out.stderr[-3000:]
    assert seconds < 35, f"{args[0]} took {seconds:.0f}s"
    assert not list(rt.rglob("session_*")), f"{args[0]} started Ray before failing"
    return lines[0]


def test_prepare_into_a_missing_bucket(s3, child_env):
    env, rt = child_env
    resolve(f"{s3}/raw/ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n")
    _fails_before_ray(["pipelines.prepare_data", "--dataset", "csv", "--input",
                       f"{s3}/raw/ratings.csv", "--output", "s3://missing-bucket/data"], env, rt,
                      "s3://missing-bucket/data: bucket missing-bucket does not exist")


def test_train_against_an_endpoint_that_is_down(child_env):
    env, rt = child_env
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_closed_port()}"
    _fails_before_ray(["pipelines.train", "--data", "s3://bkt/data", "--output",
                       "s3://bkt/model"], env, rt,
                      f"s3://bkt/data: the S3 endpoint {env['AWS_ENDPOINT_URL']} refused the "
                      f"connection (--data)")


def test_full_run_against_an_endpoint_that_never_answers(child_env, silent_endpoint):
    env, rt = child_env
    env["AWS_ENDPOINT_URL"] = silent_endpoint
    _fails_before_ray(["pipelines.full_run", "--workdir", "s3://bkt/run", "--storage-path",
                       "s3://ckpt/run", "--storage-timeout", "3"], env, rt,
                      f"s3://bkt/run: the S3 endpoint {silent_endpoint} did not answer within "
                      f"3 s (--workdir)")


def test_batch_inference_without_credentials(s3, child_env, tmp_path):
    env, rt = child_env
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    env.update(_no_credentials_env(tmp_path))
    _fails_before_ray(["pipelines.batch_inference", "--model", f"{s3}/model", "--data",
                       f"{s3}/data", "--output", f"{s3}/recs"], env, rt,
                      f"{s3}/model: no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
