"""Outputs have one writer at a time and readers see whole versions (app.core.publish): leases
taken atomically and over when stale, on a local folder and on a bucket alike; versions
switched by one rename (one PUT on a bucket); and a training run that does not publish over a
dataset replaced under it."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from app.core.publish import (
    LEASE,
    SUCCESS,
    OutputError,
    current,
    local_dir,
    read_success,
    version_of,
    version_uri,
    write_success,
    writer,
)
from app.core.storage import FileSum, resolve
from app.data.dataset import SPLITS, read_manifest
from tests.conftest import ROOT, data_config, short_tmp, user_shell_env


@pytest.fixture(params=["folder", "bucket"])
def where(request, tmp_path) -> str:
    """A place for outputs on each lease store: a local folder, and a fresh bucket of the
    session's S3 server (conditional puts)."""
    return str(tmp_path) if request.param == "folder" else request.getfixturevalue("s3")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_lease(out: str, *, host: str, pid: int) -> None:
    """A lease record as another writer leaves it (its heartbeat now)."""
    resolve(out).join(LEASE).write_text(json.dumps({
        "stage": "train", "host": host, "pid": pid, "started": "2026-01-01T00:00:00Z",
        "token": "t"}))


def _names(out: str) -> list[str]:
    """What lies at the top of an output, versions left out."""
    return [n for n in resolve(out).children() if not n.startswith("v-")]


def _publish(out: str, text: str, **kwargs) -> None:
    with writer(out, "test", say=kwargs.pop("say", print), **kwargs) as lease, \
            lease.staged() as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "b.txt").write_text(text)


def test_versions_switch_whole_and_the_previous_one_is_kept(where):
    out = f"{where}/out"
    _publish(out, "one")
    first = version_of(out)
    assert first.startswith("v-000001-") and (current(out) / "a.txt").read_text() == "one"
    _publish(out, "two")
    _publish(out, "three")
    assert (current(out) / "b.txt").read_text() == "three"
    versions = [n for n in resolve(out).children() if n.startswith("v-")]
    assert len(versions) == 2 and first not in versions  # the last two are kept
    assert _names(out) == ["CURRENT"]
    # a failing writer publishes nothing and leaves no staging folder or lease
    with pytest.raises(RuntimeError, match="boom"):
        with writer(out, "test") as lease, lease.staged() as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (current(out) / "a.txt").read_text() == "three"
    assert _names(out) == ["CURRENT"]
    assert [n for n in resolve(out).children() if n.startswith("v-")] == versions


def test_a_live_lease_is_refused_naming_its_holder(where):
    out = f"{where}/out"
    _plant_lease(out, host="other-host", pid=4242)
    t0 = time.monotonic()
    with pytest.raises(OutputError, match=r"being written by train \(pid 4242 on other-host, "
                                          r"since 2026-01-01T00:00:00Z, last heartbeat \d+s ago"):
        _publish(out, "mine")
    assert time.monotonic() - t0 < 5
    assert _names(out) == [LEASE]  # nothing published
    assert json.loads(resolve(out).join(LEASE).read_text())["pid"] == 4242  # not touched


def test_a_stale_lease_is_taken_over_with_a_note(where):
    notes: list[str] = []
    # a process of this host that is gone
    gone = f"{where}/gone"
    _plant_lease(gone, host=socket.gethostname(), pid=_dead_pid())
    _publish(gone, "mine", say=notes.append)
    assert (current(gone) / "a.txt").read_text() == "mine"
    assert "its process is gone" in notes[-1] and str(resolve(gone)) in notes[-1]
    # another host's writer whose heartbeat stopped
    silent = f"{where}/silent"
    _plant_lease(silent, host="other-host", pid=4242)
    time.sleep(1.5)
    _publish(silent, "mine", say=notes.append, timeout=1)
    assert re.search(r"took over the lease on .*silent from train \(pid 4242 on other-host.*: "
                     r"no heartbeat for \d+s$", notes[-1]), notes[-1]
    assert (current(silent) / "a.txt").read_text() == "mine"
    assert _names(silent) == ["CURRENT"]  # released after publishing


def test_a_heartbeat_keeps_a_lease_held(where):
    out = f"{where}/out"
    with writer(out, "long", timeout=3):
        time.sleep(4.5)  # past the timeout: only the heartbeat keeps the lease fresh
        with pytest.raises(OutputError, match=r"being written by long \(pid "):
            _publish(out, "second", timeout=3)
    _publish(out, "after", timeout=3)
    assert (current(out) / "a.txt").read_text() == "after"


def test_a_writer_that_lost_its_lease_publishes_nothing(where):
    out = f"{where}/out"
    _publish(out, "before")
    notes: list[str] = []
    with writer(out, "slow", timeout=0.5) as slow:
        slow._stop.set()  # its heartbeat stops, as in a process frozen for too long
        time.sleep(1.2)
        _publish(out, "taker", timeout=0.5, say=notes.append)  # takes over and publishes
        with pytest.raises(OutputError, match="slow lost its lease"):
            with slow.staged() as tmp:
                (tmp / "a.txt").write_text("slow")
    assert "took over the lease" in notes[0] and "from slow" in notes[0]
    assert (current(out) / "a.txt").read_text() == "taker"
    assert _names(out) == ["CURRENT"]  # no staging folder, and the taker's lease released
    assert len([n for n in resolve(out).children() if n.startswith("v-")]) == 2


@pytest.mark.parametrize("planted", ["free", "stale"])
def test_of_writers_racing_for_an_output_exactly_one_wins(where, planted):
    """Four writers at once, for a free output or one whose holder's process is gone: one
    creates (or takes over) the lease, the others are refused naming it."""
    out = f"{where}/race"
    if planted == "stale":
        _plant_lease(out, host=socket.gethostname(), pid=_dead_pid())
    results: list[str] = []
    notes: list[str] = []
    start = threading.Barrier(4)

    def run(i: int) -> None:
        start.wait()
        try:
            with writer(out, f"w{i}", timeout=30, say=notes.append):
                time.sleep(1.5)
            results.append("won")
        except OutputError as e:
            assert "is being written by w" in str(e), e
            results.append("refused")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 3 + ["won"]
    assert len(notes) == (1 if planted == "stale" else 0), notes
    assert _names(out) == []  # the winner released its lease


def test_a_folder_published_in_place_reads_through_the_same_readers(where):
    """A folder written in place (a sweep's results) with the one _SUCCESS format reads
    through current() as it is; another format is refused naming the file."""
    out = resolve(f"{where}/results")
    out.join("results.txt").write_text("best\n")
    out.join("sub").join("plot.png").write_bytes(b"\x89PNG")
    sums = {"results.txt": FileSum.of(b"best\n"), "sub/plot.png": FileSum.of(b"\x89PNG")}
    write_success(out, sums, stage="tune")
    folder = current(out.uri)
    assert version_of(out.uri) is None and version_uri(out.uri) == str(folder)
    assert read_success(resolve(folder)) == sums
    assert (local_dir(out.uri) / "sub" / "plot.png").read_bytes() == b"\x89PNG"
    if out.remote:  # there readers check every listed file
        out.join("results.txt").write_text("other\n!")
        with pytest.raises(OutputError, match=r"missing or of another size \(results.txt\)"):
            current(out.uri)
    out.join(SUCCESS).write_text(json.dumps({"files": ["results.txt"]}))  # a list of names
    with pytest.raises(OutputError, match=f"{SUCCESS}: not a file list"):
        read_success(out)
    if out.remote:
        with pytest.raises(OutputError, match=f"{SUCCESS}: not a file list"):
            current(out.uri)


def test_success_lists_each_files_size_and_sha256_and_reads_the_sizes_only_format(where):
    """write_success records size and sha256 per file; read_success returns them, and
    still reads a record of the older format (sizes only: no sha256 to check)."""
    out = resolve(f"{where}/done")
    data = {"a.bin": b"\x00" * 10, "sub/b.txt": b"hello"}
    for name, body in data.items():
        out.join(name).write_bytes(body)
    write_success(out, {n: FileSum.of(b) for n, b in data.items()}, stage="test")
    record = json.loads(out.join(SUCCESS).read_text())
    assert record["files"] == {"a.bin": 10, "sub/b.txt": 5}  # the sizes, where they were
    assert record["sha256"] == {n: hashlib.sha256(b).hexdigest() for n, b in data.items()}
    assert read_success(out) == {n: FileSum(len(b), hashlib.sha256(b).hexdigest())
                                 for n, b in data.items()}

    out.join(SUCCESS).write_text(json.dumps({"files": {"a.bin": 10, "sub/b.txt": 5}}))
    assert read_success(out) == {"a.bin": FileSum(10), "sub/b.txt": FileSum(5)}

    out.join(SUCCESS).write_text(json.dumps({"files": {"a.bin": 10, "sub/b.txt": 5},
                                             "sha256": {"a.bin": "00"}}))
    with pytest.raises(OutputError, match=f"{SUCCESS}: no sha256 for sub/b.txt"):
        read_success(out)
    with pytest.raises(ValueError, match="no sha256 for a.bin"):
        write_success(out, {"a.bin": FileSum(10)}, stage="test")


def test_a_version_lists_the_sha256_of_staged_recorded_and_unrecorded_files(s3):
    """Publishing on a bucket lists every file's sha256, whoever wrote it: the driver's
    staged files (hashed before upload), files written straight into the version and
    recorded with their sums, and a file nobody recorded (read back)."""
    out = f"{s3}/mixed"
    with writer(out, "test") as lease, lease.staged() as tmp:
        (tmp / "staged.txt").write_text("from the driver")
        recorded = b"from a task" * 100
        lease.target.join("part", "task.bin").write_bytes(recorded)
        lease.record({"part/task.bin": FileSum.of(recorded)})
        lease.target.join("library.bin").write_bytes(b"by a library")
        name = lease.version.name
    version = current(out)
    assert version.name == name  # the name known while writing is the one published
    listed = read_success(version)
    assert set(listed) == {"staged.txt", "part/task.bin", "library.bin"}
    for rel, want in listed.items():
        body = version.join(rel).read_bytes()
        assert want == FileSum(len(body), hashlib.sha256(body).hexdigest()), rel


def test_a_local_version_has_no_success_record(tmp_path):
    """Locally one rename publishes a version and readers read it in place: no _SUCCESS."""
    out = tmp_path / "out"
    with writer(out, "test") as lease, lease.staged() as tmp:
        (tmp / "a.txt").write_text("a")
        assert lease.version.uri == str(out / lease.version.name)
    assert sorted(p.name for p in current(out).iterdir()) == ["a.txt"]


def test_readers_never_see_a_mix_of_versions_during_overwrites(ray_local, tmp_path):
    from app.data.prepare import prepare_dataset

    out = tmp_path / "data"
    prepare_dataset(data_config(dataset="synthetic", rows=20_000), str(out), verbose=False)
    seen: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:  # as a reader does: resolve the version once, read every file there
        while not done.is_set():
            try:
                folder = current(out)
                manifest = read_manifest(folder)
                rows = {s: sum(sh["samples"] for sh in json.loads(
                    (folder / s / "index.json").read_text())["shards"]) for s in SPLITS}
                seen.append((folder.name, rows == manifest.counts.splits))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for rows in (21_000, 22_000, 23_000, 24_000):  # each version has other split sizes
            prepare_dataset(data_config(dataset="synthetic", rows=rows, overwrite=True),
                            str(out), verbose=False)
    finally:
        done.set()
        reader.join(timeout=30)
    assert not errors, errors[:3]
    assert len({name for name, _ in seen}) >= 3, "the reader did not run across versions"
    assert all(consistent for _, consistent in seen), \
        [name for name, ok in seen if not ok][:5]
    assert read_manifest(out).counts.accepted == 24_000


@pytest.mark.slow  # training runs
def test_training_does_not_publish_over_a_replaced_dataset(ray_local, tmp_path):
    from app.core.config import load_config
    from app.data.prepare import prepare_dataset
    from app.train.driver import TrainError, train

    data = tmp_path / "data"
    prepare_dataset(data_config(dataset="synthetic", rows=20_000), str(data), verbose=False)
    before = version_of(data)
    cfg = load_config(overrides={"dataset": "synthetic", "rows": 20_000, "epochs": 8,
                                 "patience": 8, "num_workers": 2, "workdir": str(tmp_path),
                                 "registered_model_name": "two-tower-replaced"})
    replaced: list[subprocess.CompletedProcess] = []
    rt = short_tmp()

    def replace_once_training_started() -> None:
        # the run has taken its lease and resolved its dataset version; its workers start.
        # Another job (its own Ray: this one's CPUs are the training workers') replaces it.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (tmp_path / "model" / LEASE).exists():
            time.sleep(0.1)
        replaced.append(subprocess.run(
            [sys.executable, "-m", "pipelines.prepare_data", "--dataset", "synthetic",
             "--rows", "21000", "--output", str(data), "--overwrite", "--quiet"],
            cwd=ROOT, env=user_shell_env(RAY_TMPDIR=rt), capture_output=True, text=True,
            timeout=600))

    thread = threading.Thread(target=replace_once_training_started, daemon=True)
    thread.start()
    try:
        with pytest.raises(TrainError, match=r"data was replaced while training \(version "
                                             rf"{before} -> v-.*the model was not published"):
            train(cfg, str(data), str(tmp_path / "model"), verbose=False)
        thread.join(timeout=600)
    finally:
        subprocess.run(["rm", "-rf", rt])
    assert replaced and replaced[0].returncode == 0, replaced[0].stderr[-2000:]
    assert version_of(data) != before
    assert not (tmp_path / "model").exists()  # no version, no partial folder, no lease


@pytest.mark.slow  # training runs
def test_a_second_full_run_on_the_same_workdir_fails_at_once(tmp_path):
    """Two jobs on one workdir: the second stops at once naming the first, which completes."""
    wd, rt1, rt2 = tmp_path / "wd", short_tmp(), short_tmp()
    cmd = [sys.executable, "-m", "pipelines.full_run", "--dataset", "synthetic", "--rows",
           "20000", "--epochs", "1", "--no-refit", "--stages", "prepare,train",
           "--workdir", str(wd)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=user_shell_env(RAY_TMPDIR=rt1),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (wd / "model" / LEASE).exists() and first.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (wd / "model" / LEASE).exists(), "the first run never started training"
        t0 = time.monotonic()
        second = subprocess.run(cmd, cwd=ROOT, env=user_shell_env(RAY_TMPDIR=rt2),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert time.monotonic() - t0 < 60
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"is being written by full_run (pid {first.pid} on " \
            f"{socket.gethostname()}" in err[0], second.stderr
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        for rt in (rt1, rt2):
            subprocess.run(["rm", "-rf", rt])
    assert (current(wd / "model") / "weights.pt").is_file()
    assert not (wd / LEASE).exists() and not (wd / "model" / LEASE).exists()
