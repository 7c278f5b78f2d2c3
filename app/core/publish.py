"""Publishing outputs: one writer at a time, and readers see one whole version or another.

Every output folder a stage writes (the prepared dataset, a model folder, recommendations)
has this layout::

    <out>/
      CURRENT                      the name of the published version (switched atomically)
      v-000002-20261130T051200Z/   one complete version, numbered (the previous one is kept)
      .lease                       while a writer holds the output: who, where, heartbeat

A writer first takes the output's lease (:func:`writer`): the lease file is created with
``O_EXCL``, so of two writers exactly one gets it; the other fails at once with an error
naming the holder. The holder refreshes the file's modification time every few seconds (its
heartbeat); a lease whose heartbeat stopped for ``timeout`` seconds, or whose process is gone
(same host), is taken over with a printed note. Under the lease, :meth:`Lease.staged` yields a
staging folder; when the block succeeds the folder becomes a new version and ``CURRENT`` is
replaced in one rename. On any error or interrupt the staging folder is removed and the
published version stays as it was.

Readers resolve the version once (:func:`current`) and read every file from that folder, so a
reader never mixes files of two versions. A folder without ``CURRENT`` is read as it is.

On an object store (``s3://``; see :mod:`app.core.storage`) there is no rename and no ``O_EXCL``:
the lease is an object created with a conditional put (``If-None-Match: *``), refreshed and
taken over with ``If-Match`` on its ETag, and its age is its ``Last-Modified``. A version is
uploaded file by file, then its ``_SUCCESS`` object (the list of its files and sizes) is written
last, then ``CURRENT`` (one PUT: readers see the old name or the new one). Readers refuse a
version without ``_SUCCESS``, or whose files do not match it, naming what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from app.core.errors import OutputError  # noqa: F401  (raised here, importable from here)
from app.core.storage import Location, is_remote, local_copy, resolve, s3_endpoint

POINTER = "CURRENT"
SUCCESS = "_SUCCESS"  # on object stores: written last in a version, listing its files
LEASE = ".lease"
_TAKEOVER = ".lease.takeover"
VERSION_PREFIX = "v-"
KEEP_VERSIONS = 2  # the current one and the one before it (a reader may still be on it)




def _complete(version: Location) -> Location:
    """``version`` when its ``_SUCCESS`` lists exactly the files it holds."""
    try:
        listed = json.loads(version.join(SUCCESS).read_text())["files"]
    except FileNotFoundError:
        raise OutputError(f"{version}: has no {SUCCESS}, so it was not completely written "
                          f"(its writer stopped); write the output again") from None
    except (ValueError, KeyError, TypeError):
        raise OutputError(f"{version}/{SUCCESS}: not a file list; write the output "
                          f"again") from None
    held = dict(version.files())
    missing = sorted(f for f, size in listed.items() if held.get(f) != size)
    if missing:
        raise OutputError(f"{version}: {len(missing)} file(s) listed in {SUCCESS} are missing "
                          f"or of another size ({', '.join(missing[:3])}); write the output "
                          f"again")
    return version


def _current_remote(out: Location) -> Location:
    try:
        name = out.join(POINTER).read_text().strip()
    except FileNotFoundError:
        if out.join(SUCCESS).is_file():  # a version folder named directly
            return _complete(out)
        raise OutputError(f"{out}: no {POINTER} (nothing published there, or a writer has not "
                          f"finished); check the path, or write the output first") from None
    if not name.startswith(VERSION_PREFIX) or "/" in name:
        raise OutputError(f"{out}/{POINTER}: names {name!r}, which is not a version of {out}")
    return _complete(out.join(name))


def _remote(out: Union[str, os.PathLike, Location]) -> bool:
    return out.remote if isinstance(out, Location) else is_remote(out)


def _local(out: Union[str, os.PathLike, Location]) -> Path:
    return out.local_path() if isinstance(out, Location) else Path(out)


def current(out: Union[str, os.PathLike, Location]) -> Any:
    """The folder of the published version of ``out`` (``out`` itself when it is not
    versioned, e.g. a version folder, or a folder written by hand): a :class:`Path`, or a
    checked :class:`~app.core.storage.Location` on an object store."""
    if _remote(out):
        return _current_remote(resolve(out))
    out = _local(out)
    pointer = out / POINTER
    try:
        name = pointer.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return out
    if not name.startswith(VERSION_PREFIX) or "/" in name or not (out / name).is_dir():
        raise OutputError(f"{pointer}: names {name!r}, which is not a version folder of {out}; "
                          f"write the name of one of its v-* folders into it, or remove {out}")
    return out / name


def local_dir(out: Union[str, os.PathLike, Location]) -> Path:
    """A local folder holding the published version of ``out``: the version folder itself,
    or on an object store its checked copy in this node's cache (:func:`app.core.storage.local_copy`)."""
    folder = current(out)
    if not isinstance(folder, Location):
        return folder
    listed = json.loads(folder.join(SUCCESS).read_text())["files"]
    return local_copy(folder, {f: n for f, n in listed.items() if f != SUCCESS})


def version_uri(out: Union[str, os.PathLike, Location]) -> str:
    """The published version of ``out`` as a path or URI any node can read."""
    folder = current(out)
    return folder.uri if isinstance(folder, Location) else str(Path(folder).absolute())


def version_of(out: Union[str, os.PathLike, Location]) -> Optional[str]:
    """The name of ``out``'s published version (None when it is not versioned)."""
    folder = current(out)
    if isinstance(folder, Location):
        return folder.name if folder.uri != resolve(out).uri else None
    return folder.name if folder != _local(out) else None


def is_published(out: Union[str, os.PathLike, Location]) -> bool:
    if _remote(out):
        return resolve(out).join(POINTER).is_file()
    return (_local(out) / POINTER).is_file()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _alive_here(info: dict[str, Any]) -> bool:
    """False when the holder ran on this host and its process is gone."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path: Path) -> tuple[dict[str, Any], float]:
    """(the lease's content, seconds since its last heartbeat)."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return {}, -1.0
    try:
        return json.loads(text), age
    except ValueError:  # being written, or left empty by a crash: judged by its age
        return {}, age


def describe_holder(info: dict[str, Any], age: float) -> str:
    return (f"{info.get('stage', 'a writer')} (pid {info.get('pid', '?')} on "
            f"{info.get('host', '?')}, since {info.get('started', '?')}, last heartbeat "
            f"{age:.0f}s ago)")


@dataclass
class Lease:
    """An exclusive writer lease on an output folder (see the module docstring)."""

    out: Path
    stage: str
    timeout: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: Optional[str] = None
    # inside staged(): where the version being written lies, for writers on other nodes
    target: Optional[Location] = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def path(self) -> Path:
        return self.out / LEASE

    def _info(self) -> dict[str, Any]:
        return {"stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(),
                "started": _now(), "token": self.token, "timeout": self.timeout}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._info()) + "\n")
        return True

    def acquire(self, say: Any) -> None:
        """Take the lease, taking over a stale one; raises OutputError when it is held."""
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            if self._try_create():
                return self._start_heartbeat()
            info, age = _holder(self.path)
            if age < 0:  # released meanwhile
                continue
            if age < self.timeout and _alive_here(info):
                raise OutputError(
                    f"{self.out} is being written by {describe_holder(info, age)}; wait for "
                    f"it to finish or write elsewhere (a lease without a heartbeat for "
                    f"{self.timeout:.0f}s is taken over)")
            if self._take_over(info, age, say):
                return self._start_heartbeat()
            time.sleep(0.2)
        raise OutputError(f"{self.out}: could not take the lease {self.path}: other runs kept "
                          f"taking it; run again once they are done")

    def _take_over(self, stale: dict[str, Any], age: float, say: Any) -> bool:
        """Replace a stale lease; only one of several contenders does it (an O_EXCL marker
        serialises them, and the lease is checked again under it)."""
        marker = self.out / _TAKEOVER
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # left by a crashed contender
                if time.time() - marker.stat().st_mtime > self.timeout:
                    marker.unlink()
            return False
        os.close(fd)
        try:
            info, now_age = _holder(self.path)
            if info.get("token") != stale.get("token") or (
                    now_age < self.timeout and _alive_here(info)):
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            if not self._try_create():
                return False
            why = ("its process is gone" if not _alive_here(stale)
                   else f"no heartbeat for {age:.0f}s")
            say(f"took over the lease on {self.out} from {describe_holder(stale, age)}: {why}")
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()

    def _start_heartbeat(self) -> None:
        interval = max(0.5, self.timeout / 6)

        def beat() -> None:
            while not self._stop.wait(interval):
                info, _ = _holder(self.path)
                if info.get("token") != self.token:
                    self.lost = (f"{describe_holder(info, 0)} took over" if info
                                 else "the lease file was removed")
                    return
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        threading.Thread(target=beat, name=f"lease-{self.out.name}", daemon=True).start()

    def check(self) -> None:
        """Raise when another writer took the lease over (this writer must not publish)."""
        info, _ = _holder(self.path)
        if self.lost or info.get("token") != self.token:
            raise OutputError(f"{self.out}: this {self.stage} lost its lease "
                             f"({self.lost or 'another writer holds it'}); nothing published")

    def release(self) -> None:
        self._stop.set()
        info, _ = _holder(self.path)
        if info.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _next_number(self) -> int:
        """Versions are numbered in publishing order (under the lease, so without races)."""
        numbers = [_number(p.name) for p in self.out.glob(f"{VERSION_PREFIX}*-*")]
        return max((n for n in numbers if n is not None), default=0) + 1

    @contextlib.contextmanager
    def staged(self, keep: int = KEEP_VERSIONS) -> Iterator[Path]:
        """Yield an empty staging folder; when the block succeeds it becomes the published
        version (``CURRENT`` switched in one rename) and versions older than the last
        ``keep`` are removed."""
        for stale in self.out.glob(".partial-*"):  # left by a writer that died (we hold the lease)
            shutil.rmtree(stale, ignore_errors=True)
        version = _version_name(self._next_number())
        tmp = self.out / f".partial-{version}"
        tmp.mkdir()
        self.target = resolve(tmp)
        try:
            yield tmp
            self.check()
            os.replace(tmp, self.out / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer_tmp = self.out / f".{POINTER}.{self.token[:8]}"
        pointer_tmp.write_text(version + "\n")
        os.replace(pointer_tmp, self.out / POINTER)  # readers switch here, all at once
        versions = sorted(p for p in self.out.iterdir()
                          if p.is_dir() and p.name.startswith(VERSION_PREFIX))
        for old in versions[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _version_name(number: int) -> str:
    return f"{VERSION_PREFIX}{number:06d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def _number(name: str) -> Optional[int]:
    parts = name.split("-")
    return int(parts[1]) if name.startswith(VERSION_PREFIX) and len(parts) > 2 \
        and parts[1].isdigit() else None


def _s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint(),
                        region_name=os.environ.get("AWS_REGION")
                        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def _precondition_failed(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


@dataclass
class ObjectLease:
    """:class:`Lease` on an object store (see the module docstring): the same guarantees
    through conditional puts instead of ``O_EXCL`` and rename."""

    out: Location
    stage: str
    timeout: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: Optional[str] = None
    target: Optional[Location] = None
    _etag: Optional[str] = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _client: Any = None

    def __post_init__(self) -> None:
        if not self.out.uri.startswith("s3://"):
            raise OutputError(f"{self.out}: outputs on {self.out.uri.split(':', 1)[0]}:// "
                              f"cannot be locked yet (leases need S3's conditional writes); "
                              f"write to s3:// or a shared path")
        self._client = _s3_client()
        self._bucket, _, prefix = self.out.path.partition("/")
        self._key = f"{prefix}/{LEASE}" if prefix else LEASE

    @property
    def path(self) -> str:
        return f"{self.out}/{LEASE}"

    def _body(self) -> bytes:
        return json.dumps({"stage": self.stage, "host": socket.gethostname(),
                           "pid": os.getpid(), "started": _now(), "token": self.token,
                           "timeout": self.timeout}).encode()

    def _put(self, **condition: str) -> bool:
        try:
            r = self._client.put_object(Bucket=self._bucket, Key=self._key, Body=self._body(),
                                        **condition)
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise
        self._etag = r["ETag"]
        return True

    def _holder(self) -> tuple[dict[str, Any], float, Optional[str]]:
        """(the lease's content, seconds since its last heartbeat, its ETag)."""
        try:
            r = self._client.get_object(Bucket=self._bucket, Key=self._key)
        except Exception as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return {}, -1.0, None
            raise
        age = time.time() - r["LastModified"].timestamp()
        try:
            return json.loads(r["Body"].read()), age, r["ETag"]
        except ValueError:
            return {}, age, r["ETag"]

    def acquire(self, say: Any) -> None:
        for _ in range(20):
            if self._put(IfNoneMatch="*"):
                return self._start_heartbeat()
            info, age, etag = self._holder()
            if etag is None:  # released meanwhile
                continue
            if age < self.timeout and _alive_here(info):
                raise OutputError(
                    f"{self.out} is being written by {describe_holder(info, age)}; wait for "
                    f"it to finish or write elsewhere (a lease without a heartbeat for "
                    f"{self.timeout:.0f}s is taken over)")
            if self._put(IfMatch=etag):  # of several contenders, one replaces this ETag
                why = ("its process is gone" if not _alive_here(info)
                       else f"no heartbeat for {age:.0f}s")
                say(f"took over the lease on {self.out} from {describe_holder(info, age)}: "
                    f"{why}")
                return self._start_heartbeat()
        raise OutputError(f"{self.out}: could not take the lease {self.path}: other runs kept "
                          f"taking it; run again once they are done")

    def _start_heartbeat(self) -> None:
        interval = max(0.5, self.timeout / 6)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self._put(IfMatch=self._etag):
                        info, age, _ = self._holder()
                        self.lost = (f"{describe_holder(info, age)} took over" if info
                                     else "the lease object was removed")
                        return
                except Exception:  # a network hiccup: try again at the next beat
                    continue

        threading.Thread(target=beat, name="lease-" + self.out.name, daemon=True).start()

    def check(self) -> None:
        info, _, _ = self._holder()
        if self.lost or info.get("token") != self.token:
            raise OutputError(f"{self.out}: this {self.stage} lost its lease "
                              f"({self.lost or 'another writer holds it'}); nothing published")

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):  # already taken over, or gone
            self._client.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=self._etag)

    @contextlib.contextmanager
    def staged(self, keep: int = KEEP_VERSIONS) -> Iterator[Path]:
        """Yield an empty local staging folder for the driver's files; tasks on any node write
        theirs under :attr:`target` (the version's prefix). When the block succeeds the local
        files are uploaded there, then ``_SUCCESS`` (every file of the version), then
        ``CURRENT`` names the version."""
        import tempfile

        from app.core.storage import cache_root

        names = self.out.children()
        version = _version_name(max((n for n in map(_number, names) if n is not None),
                                    default=0) + 1)
        target = self.target = self.out.join(version)
        cache_root().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".stage-{version}-", dir=cache_root()))
        try:
            yield tmp
            self.check()
            target.upload(tmp)
            files = dict(target.files())
            target.join(SUCCESS).write_text(json.dumps({"files": files, "written": _now(),
                                                        "stage": self.stage}))
            self.check()
        except BaseException:
            with contextlib.suppress(Exception):
                target.delete()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.out.join(POINTER).write_text(version + "\n")  # readers switch here
        versions = sorted(n for n in self.out.children() if _number(n) is not None)
        for old in versions[:-keep]:
            with contextlib.suppress(Exception):
                self.out.join(old).delete()


@contextlib.contextmanager
def writer(out: str | os.PathLike, stage: str, *, timeout: float = 60.0,
           say: Any = print) -> Iterator[Lease]:
    """Hold the exclusive writer lease of ``out`` for the block.

    Args:
        out: the output folder (created if missing).
        stage: who writes (named to a second writer).
        timeout: seconds without a heartbeat after which the lease may be taken over.
        say: where the note of a take-over goes.

    Raises:
        OutputError: another live writer holds ``out``.
    """
    if _remote(out):
        remote = ObjectLease(resolve(out), stage, timeout)
        remote.acquire(say)
        try:
            yield remote  # type: ignore[misc]
        finally:
            remote.release()
        return
    lease = Lease(_local(out).absolute(), stage, timeout)
    created = not lease.out.exists()
    lease.acquire(say)
    try:
        yield lease
    finally:
        lease.release()
        if created:  # a writer that published nothing leaves nothing behind
            with contextlib.suppress(OSError):
                lease.out.rmdir()


def check_writable(out: Union[Path, str, Location], kind: str, marker: str) -> None:
    """``out`` may receive versions: missing, empty, or already a versioned output. A folder
    holding something else (or an output of an older layout: ``marker`` at its top) is
    refused rather than mixed with."""
    if _remote(out):
        loc = resolve(out)
        names = [n for n in loc.children() if n != LEASE]
        if names and POINTER not in names:
            raise OutputError(f"{loc}: holds something other than a {kind} (no {POINTER}); "
                              f"choose another output location or remove it")
        return
    out = _local(out)
    if not out.exists() or is_published(out):
        return
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    entries = [p for p in out.iterdir() if p.name not in (LEASE, _TAKEOVER)
               and not p.name.startswith(".partial-")]
    if not entries:
        return
    what = f"a {kind} of an older layout" if (out / marker).exists() else \
        f"something other than a {kind}"
    raise OutputError(f"{out}: holds {what} (no {POINTER} file); choose another output folder "
                     f"or remove it")
