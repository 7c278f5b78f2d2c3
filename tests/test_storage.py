"""The storage layer and publishing on an object store, against a real S3 API server."""

from __future__ import annotations

import hashlib
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
    local_dir,
    read_success,
    version_of,
    writer,
)
from app.core.storage import (
    CACHE_ENV,
    FileSum,
    StorageError,
    component_env,
    is_remote,
    local_copy,
    resolve,
)


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


def _flip_one_byte(s3_server, obj: "Location", at: int = -20) -> None:  # noqa: F821
    """Change one byte of an object in place, keeping its size, as a bad copy or a stray
    write would: a PUT of the changed bytes through boto3 (not through the project's code)."""
    import boto3

    data = bytearray(obj.read_bytes())
    data[at] ^= 0xFF
    bucket, key = obj.path.split("/", 1)
    boto3.client("s3", endpoint_url=s3_server.endpoint).put_object(
        Bucket=bucket, Key=key, Body=bytes(data))
    assert obj.info().size == len(data)


def _cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_same_size_byte_flip_is_refused_when_copied_into_the_cache(s3_server, s3, tmp_path,
                                                                     monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    out = f"{s3}/dataset"
    _publish(out, "rows " * 1000)
    version = current(out)
    _flip_one_byte(s3_server, version / "data" / "rows.txt")
    current(out)  # sizes still match: the version looks complete
    with pytest.raises(StorageError) as e:
        local_dir(out)
    msg = str(e.value)
    assert msg == (f"{version}: data/rows.txt: sha256 differs from the version's _SUCCESS "
                   f"(changed or corrupted after publishing); republish it")
    assert "\n" not in msg
    assert _cache_entries(cache) == []  # no partial copy left behind

    _publish(out, "rows again")  # a new version reads
    assert (local_dir(out) / "data" / "rows.txt").read_text() == "rows again"


def test_a_copy_holds_only_the_listed_files_each_checked(s3, tmp_path, monkeypatch):
    """The copy is of what _SUCCESS lists (nothing unchecked); a listed file gone or of
    another size is refused naming it, before anything lands in the cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = f"{s3}/listed"
    _publish(out, "complete")
    version = current(out)
    (version / "extra.txt").write_text("added after publishing")
    copy = local_dir(out)
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        ".complete", "data/rows.txt", "manifest.json"]
    listed = read_success(version)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "fresh"))  # not the complete copy above
    with pytest.raises(StorageError, match=r": data/rows.txt: 8 bytes where the version's "
                                           r"_SUCCESS lists 9 \(changed or truncated"):
        local_copy(version, {**listed, "data/rows.txt": FileSum(9, None)})
    with pytest.raises(StorageError, match=r": gone.txt: missing, though the version's "
                                           r"_SUCCESS lists it; republish it"):
        local_copy(version, {**listed, "gone.txt": FileSum(1, "0" * 64)})
    assert _cache_entries(tmp_path / "fresh") == []


def test_a_version_with_an_old_sizes_only_success_still_reads(s3, tmp_path, monkeypatch):
    """Outputs published before hashes were listed keep working: their sizes are checked."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = f"{s3}/old"
    _publish(out, "written long ago")
    version = current(out)
    sizes = {f: s.size for f, s in read_success(version).items()}
    (version / SUCCESS).write_text(json.dumps({"files": sizes, "written": "then",
                                               "stage": "test"}))
    assert all(s.sha256 is None for s in read_success(version).values())
    assert (local_dir(out) / "data" / "rows.txt").read_text() == "written long ago"


def test_a_storage_error_is_one_line_and_exit_code_2(capsys):
    from app.core.cli import EXIT_ERROR, main, parser

    def body(args):
        raise StorageError("s3://b/data/v-1: vocab/users.parquet: sha256 differs")

    assert main(parser("prog", None, []), body, []) == EXIT_ERROR == 2
    err = capsys.readouterr().err
    assert err == "error: s3://b/data/v-1: vocab/users.parquet: sha256 differs\n"


@pytest.mark.slow
def test_a_prepared_dataset_changed_in_the_bucket_is_refused_by_its_readers(
        ray_local, s3_server, s3, tmp_path, monkeypatch, capsys):
    """A real dataset prepared into the bucket (by the entry point, which names the bucket's
    folder as it is) lists every file's true sha256 (hashed by
    the tasks and the driver as they wrote); one byte of vocab/users.parquet flipped in
    place, keeping its size, is refused as training and inference open it (a fresh node
    cache), one line naming the file, and nothing is left in the cache."""
    from app.data.dataset import read_manifest
    from pipelines import prepare_data
    from tests.conftest import write_lfs_csv

    src = tmp_path / "ratings.csv"
    write_lfs_csv(src, rows=5000)
    with src.open("a") as f:
        f.write("u1,2,99.0,2020-01-01 00:00:00\n")  # a rating out of range: a task's rejects
        f.write("u1,2,3.0,2020-01-01 00:00:00,extra\n")  # unreadable: the driver's rejects
    out = f"{s3}/data"
    assert prepare_data.main(["--dataset", "csv", "--input", str(src), "--output", out]) == 0
    said = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("prepared dataset:")]
    assert len(said) == 1 and said[0].startswith(f"prepared dataset: {out} ("), said
    version = current(out)
    listed = read_success(version)
    assert {"manifest.json", "vocab/users.parquet", "train/index.json",
            "rejects/malformed-lines.parquet"} <= set(listed)
    assert any(f.startswith("train/part-") and f.endswith(".mds") for f in listed)
    assert any(f.startswith("rejects/part-") for f in listed)
    for rel, want in listed.items():  # the sums taken while writing are those of the bytes
        body = (version / rel).read_bytes()
        assert want == FileSum(len(body), hashlib.sha256(body).hexdigest()), rel

    _flip_one_byte(s3_server, version / "vocab" / "users.parquet", at=100)
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    with pytest.raises(StorageError) as e:
        read_manifest(out)  # what training and batch inference open first
    assert str(e.value) == (f"{version}: vocab/users.parquet: sha256 differs from the "
                            f"version's _SUCCESS (changed or corrupted after publishing); "
                            f"republish it")
    assert _cache_entries(cache) == []
