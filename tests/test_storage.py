"""The storage layer and publishing on an object store, against a real S3 API server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from app.core.publish import (
    POINTER,
    SUCCESS,
    OutputError,
    check_writable,
    current,
    is_published,
    version_of,
    writer,
)
from app.core.storage import StorageError, component_env, is_remote, resolve


def test_paths_and_uris_resolve_to_one_kind_of_location(tmp_path, monkeypatch):
    local = resolve(tmp_path / "a")
    assert not local.remote and local.local_path() == tmp_path / "a"
    assert resolve(f"file://{tmp_path}/a").local_path() == tmp_path / "a"
    assert resolve("/Volumes/main/recsys/vol/run").local_path() == \
        Path("/Volumes/main/recsys/vol/run")  # a Unity Catalog volume is a mounted path
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = resolve("s3://bucket/run/")
    assert s3.remote and s3.uri == "s3://bucket/run" and s3.path == "bucket/run"
    assert (s3 / "model" / "model.json").uri == "s3://bucket/run/model/model.json"
    assert is_remote("gs://b/x") and not is_remote("/tmp/x") and not is_remote("file:///x")
    with pytest.raises(StorageError, match="unknown storage scheme 'ftp'"):
        resolve("ftp://host/x")
    with pytest.raises(StorageError, match="no bucket"):
        resolve("s3:///x")
    with pytest.raises(StorageError, match="not a name inside"):
        s3.join("../other")


def test_one_endpoint_variable_reaches_every_component(monkeypatch):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert component_env(env) == {"S3_ENDPOINT_URL": "http://127.0.0.1:9000",
                                  "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert component_env({**env, "S3_ENDPOINT_URL": "http://mine"}) == {
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert component_env({}) == {}


def test_a_bucket_reads_writes_lists_and_copies(s3, tmp_path):
    root = resolve(f"{s3}/run")
    assert not root.exists()
    (root / "a.txt").write_text("hello")
    assert (root / "a.txt").read_text() == "hello" and root.is_dir()
    with pytest.raises(FileNotFoundError):
        (root / "missing").read_bytes()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "b.bin").write_bytes(b"\0" * 1000)
    (src / "marker").write_text("done")
    (root / "copy").upload(src, last=("marker",))
    assert list((root / "copy").files()) == [("marker", 4), ("sub/b.bin", 1000)]
    assert root.children() == ["a.txt", "copy"]
    back = (root / "copy").download(tmp_path / "back")
    assert (back / "sub" / "b.bin").read_bytes() == b"\0" * 1000
    (root / "copy").delete()
    assert root.children() == ["a.txt"]


def _publish(out, text: str, stage: str = "test", **kw) -> None:
    with writer(out, stage, **kw) as lease, lease.staged() as tmp:
        (tmp / "data").mkdir()
        (tmp / "data" / "rows.txt").write_text(text)
        (tmp / "manifest.json").write_text(json.dumps({"text": text}))


def test_versions_on_a_bucket_switch_with_one_put_and_keep_two(s3):
    out = f"{s3}/dataset"
    check_writable(out, "dataset", "manifest.json")
    for i in range(3):
        _publish(out, f"v{i}")
        version = current(out)
        assert (version / "data" / "rows.txt").read_text() == f"v{i}"
        assert json.loads((version / SUCCESS).read_text())["files"] == {
            "data/rows.txt": 2, "manifest.json": len(json.dumps({"text": f"v{i}"}))}
    assert is_published(out) and version_of(out).startswith("v-000003-")
    names = resolve(out).children()
    assert [n[:8] for n in names] == [POINTER, "v-000002", "v-000003"]  # no lease left


def test_readers_refuse_a_half_written_version(s3):
    out = f"{s3}/model"
    _publish(out, "complete")
    version = current(out)
    (version / "data" / "rows.txt").delete()
    with pytest.raises(OutputError, match=r"missing or of another size \(data/rows.txt\)"):
        current(out)
    (version / SUCCESS).delete()
    with pytest.raises(OutputError, match=f"has no {SUCCESS}, so it was not completely"):
        current(out)
    with pytest.raises(OutputError, match=f"no {POINTER}"):
        current(f"{s3}/never-written")


def test_a_second_writer_on_a_bucket_fails_at_once_naming_the_holder(s3):
    out = f"{s3}/recs"
    with writer(out, "batch_inference", timeout=30):
        t0 = time.monotonic()
        with pytest.raises(OutputError, match=r"being written by batch_inference \(pid \d+"):
            _publish(out, "second")
        assert time.monotonic() - t0 < 10
    _publish(out, "after")  # released: the next writer gets it
    assert (current(out) / "data" / "rows.txt").read_text() == "after"


def test_a_lease_without_heartbeat_is_taken_over_and_its_writer_publishes_nothing(s3):
    out = f"{s3}/stale"
    notes: list[str] = []
    first = writer(out, "train", timeout=2)
    lease = first.__enter__()
    lease._stop.set()  # its heartbeat stops, as when its machine is lost
    time.sleep(2.5)
    _publish(out, "taker", timeout=2, say=notes.append)
    assert notes and "took over the lease" in notes[0] and "no heartbeat" in notes[0]
    with pytest.raises(OutputError, match="lost its lease"):
        with lease.staged() as tmp:
            (tmp / "x").write_text("late")
    first.__exit__(None, None, None)
    assert (current(out) / "data" / "rows.txt").read_text() == "taker"
    assert len([n for n in resolve(out).children() if n.startswith("v-")]) == 1


def test_of_two_writers_racing_for_a_bucket_exactly_one_wins(s3):
    out = f"{s3}/race"
    results: list[str] = []

    def run(i: int) -> None:
        try:
            with writer(out, f"w{i}", timeout=30):
                time.sleep(1.5)
            results.append("won")
        except OutputError:
            results.append("refused")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 3 + ["won"]


def test_a_bucket_prefix_holding_other_things_is_refused(s3):
    (resolve(f"{s3}/mixed") / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds something other than a dataset"):
        check_writable(f"{s3}/mixed", "dataset", "manifest.json")
