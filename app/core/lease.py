"""The writer lease of an output: one writer at a time, and a writer that stopped is taken over.

The lease is one record beside the output (``<out>/.lease``) naming its holder: stage, host,
pid, start time and a random token. :class:`WriterLease` holds the logic, written once:

- acquire: create the record if absent; of two writers exactly one does, the other fails at
  once with an error naming the holder;
- heartbeat: a thread renews the record every ``timeout / 6`` seconds;
- takeover: a record whose heartbeat stopped for ``timeout`` seconds, or whose process is gone
  (same host), is replaced, with a printed note, only if it is unchanged since it was judged
  stale, so of several contenders one wins;
- check / release: a writer whose record was replaced must not publish; releasing deletes
  the record only while it is still this writer's.

Two small stores do the storage primitives (create-if-absent, read, renew, replace-if-unchanged,
delete-if-unchanged), each record carrying a tag that changes whenever it is renewed or
replaced: :class:`FileStore` for a local or mounted folder (``O_EXCL`` create, the file's
modification time as heartbeat, an ``O_EXCL`` marker serialising takeovers) and
:class:`ObjectStore` for S3 (conditional puts on the ETag, ``Last-Modified`` as heartbeat).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

from app.core.errors import OutputError
from app.core.storage import Location, s3_endpoint

LEASE = ".lease"
TAKEOVER = ".lease.takeover"  # FileStore's marker: one contender at a time replaces a record


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Record:
    """A lease record as a store holds it."""

    body: bytes
    age: float  # seconds since its last heartbeat
    tag: str  # changes whenever the record is renewed or replaced


class LeaseStore(Protocol):
    """Where a lease record lives; only storage primitives, no lease logic."""

    kind: str  # "file" or "object", in messages
    where: str  # the record's path or URI, in messages

    def create(self, body: bytes) -> Optional[str]:
        """Create the record if there is none: its tag, or None when one exists."""

    def read(self) -> Optional[Record]:
        """The record, or None when there is none."""

    def renew(self, tag: str, body: bytes) -> Optional[str]:
        """Refresh the record's heartbeat if its tag is still ``tag``: the new tag, or None."""

    def replace(self, tag: str, body: bytes) -> Optional[str]:
        """Replace the record by ``body`` if its tag is still ``tag``: the new tag, or None."""

    def delete(self, tag: str) -> None:
        """Delete the record if its tag is still ``tag``."""


class FileStore:
    """The record as a file; its modification time is the heartbeat."""

    kind = "file"

    def __init__(self, folder: Path, stale_after: float):
        self.path = folder / LEASE
        self.marker = folder / TAKEOVER
        self.stale_after = stale_after  # a marker this old was left by a crashed contender

    @property
    def where(self) -> str:
        return str(self.path)

    def create(self, body: bytes) -> Optional[str]:
        """Write the record aside, then hard-link it into place: the link fails when a record
        exists, and a reader never sees a record without its content."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_name(f"{LEASE}.{uuid.uuid4().hex}")
        try:
            with open(aside, "wb") as f:
                f.write(body)
                f.flush()
                tag = _file_tag(body, os.fstat(f.fileno()))
            os.link(aside, self.path)
        except FileExistsError:
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()
        return tag

    def read(self) -> Optional[Record]:
        # one open file for content and times, so the tag describes one file
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return None
        with f:
            body = f.read()
            st = os.fstat(f.fileno())
        return Record(body, time.time() - st.st_mtime, _file_tag(body, st))

    def renew(self, tag: str, body: bytes) -> Optional[str]:
        """Touch the file (its content stays as created; ``body`` is for object stores)."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return None
        with f:
            held = f.read()
            if _file_tag(held, os.fstat(f.fileno())) != tag:
                return None
            os.utime(f.fileno())
            return _file_tag(held, os.fstat(f.fileno()))

    def replace(self, tag: str, body: bytes) -> Optional[str]:
        """Write ``body`` into the ``O_EXCL`` marker, then rename it over the record: of
        several contenders only the marker's creator replaces it, and there is no moment
        without a record in which a new writer could create one."""
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # left by a crashed contender
                if time.time() - self.marker.stat().st_mtime > self.stale_after:
                    self.marker.unlink()
            return None
        renamed = False
        try:
            with os.fdopen(fd, "wb") as f:
                held = self.read()
                if held is None or held.tag != tag:
                    return None
                f.write(body)
                f.flush()
                new = _file_tag(body, os.fstat(fd))  # a rename keeps the file's times
            os.replace(self.marker, self.path)
            renamed = True
            return new
        finally:
            if not renamed:  # (once renamed, a marker there is another contender's)
                with contextlib.suppress(FileNotFoundError):
                    self.marker.unlink()

    def delete(self, tag: str) -> None:
        held = self.read()
        if held is not None and held.tag == tag:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _file_tag(body: bytes, st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{hashlib.sha1(body).hexdigest()[:16]}"


class ObjectStore:
    """The record as an S3 object, written with conditional puts (``If-None-Match: *``,
    ``If-Match`` on its ETag); its ``Last-Modified`` is the heartbeat."""

    kind = "object"

    def __init__(self, out: Location):
        if not out.uri.startswith("s3://"):
            raise OutputError(f"{out}: outputs on {out.uri.split(':', 1)[0]}:// cannot be "
                              f"locked yet (leases need S3's conditional writes); write to "
                              f"s3:// or a shared path")
        self.where = f"{out}/{LEASE}"
        self._client = _s3_client()
        self._bucket, _, prefix = out.path.partition("/")
        self._key = f"{prefix}/{LEASE}" if prefix else LEASE

    def _put(self, body: bytes, **condition: str) -> Optional[str]:
        try:
            r = self._client.put_object(Bucket=self._bucket, Key=self._key, Body=body,
                                        **condition)
        except Exception as e:
            if _error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict",
                                  "409"):
                return None
            raise
        return r["ETag"]

    def create(self, body: bytes) -> Optional[str]:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> Optional[Record]:
        try:
            r = self._client.get_object(Bucket=self._bucket, Key=self._key)
        except Exception as e:
            if _error_code(e) in ("NoSuchKey", "404"):
                return None
            raise
        return Record(r["Body"].read(), time.time() - r["LastModified"].timestamp(), r["ETag"])

    def renew(self, tag: str, body: bytes) -> Optional[str]:
        return self._put(body, IfMatch=tag)

    def replace(self, tag: str, body: bytes) -> Optional[str]:
        return self._put(body, IfMatch=tag)  # of several contenders, one replaces this ETag

    def delete(self, tag: str) -> None:
        with contextlib.suppress(Exception):  # already taken over, or gone
            self._client.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=tag)


def _s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint(),
                        region_name=os.environ.get("AWS_REGION")
                        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def open_store(out: Union[Path, Location], stale_after: float) -> LeaseStore:
    """The store of ``out``'s lease: an object on an object store, else a file."""
    if isinstance(out, Location) and out.remote:
        return ObjectStore(out)
    return FileStore(out.local_path() if isinstance(out, Location) else out, stale_after)


def alive_here(info: dict[str, Any]) -> bool:
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


def describe_holder(info: dict[str, Any], age: float) -> str:
    return (f"{info.get('stage', 'a writer')} (pid {info.get('pid', '?')} on "
            f"{info.get('host', '?')}, since {info.get('started', '?')}, last heartbeat "
            f"{age:.0f}s ago)")


def _holder(record: Optional[Record]) -> dict[str, Any]:
    """A record's content ({} when there is none, or it is being written or was left empty
    by a crash: then it is judged by its age alone)."""
    try:
        info = json.loads(record.body) if record is not None else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


@dataclass
class WriterLease:
    """An exclusive writer lease on an output (see the module docstring)."""

    out: Union[Path, Location]
    stage: str
    timeout: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: Optional[str] = None
    store: Optional[LeaseStore] = None  # by default the store of `out`
    _tag: Optional[str] = None
    _started: str = field(default_factory=now)
    _beats: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = open_store(self.out, self.timeout)

    @property
    def path(self) -> str:
        return self.store.where

    def _body(self) -> bytes:
        # the beat count changes an object's ETag at every heartbeat
        return (json.dumps({"stage": self.stage, "host": socket.gethostname(),
                            "pid": os.getpid(), "started": self._started, "token": self.token,
                            "timeout": self.timeout, "beat": self._beats}) + "\n").encode()

    def acquire(self, say: Callable[[str], Any]) -> None:
        """Take the lease, taking over a stale one; raises OutputError when it is held."""
        self._started = now()
        for _ in range(20):
            self._tag = self.store.create(self._body())
            if self._tag is not None:
                return self._start_heartbeat()
            held = self.store.read()
            if held is None:  # released meanwhile
                continue
            info = _holder(held)
            if held.age < self.timeout and alive_here(info):
                raise OutputError(
                    f"{self.out} is being written by {describe_holder(info, held.age)}; wait "
                    f"for it to finish or write elsewhere (a lease without a heartbeat for "
                    f"{self.timeout:.0f}s is taken over)")
            if self._take_over(held, info, say):
                return self._start_heartbeat()
            time.sleep(0.2)
        raise OutputError(f"{self.out}: could not take the lease {self.path}: other runs kept "
                          f"taking it; run again once they are done")

    def _take_over(self, stale: Record, info: dict[str, Any],
                   say: Callable[[str], Any]) -> bool:
        """Replace a stale record, if it is still the one judged stale."""
        self._tag = self.store.replace(stale.tag, self._body())
        if self._tag is None:
            return False
        why = ("its process is gone" if not alive_here(info)
               else f"no heartbeat for {stale.age:.0f}s")
        say(f"took over the lease on {self.out} from {describe_holder(info, stale.age)}: {why}")
        return True

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.out.name}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Renew the record until released; stop, noting who, once another writer replaced it."""
        while not self._stop.wait(max(0.5, self.timeout / 6)):
            self._beats += 1
            try:
                tag = self.store.renew(self._tag, self._body())
                held = self.store.read() if tag is None else None
            except Exception:  # a network hiccup: try again at the next beat
                continue
            if tag is None:
                info = _holder(held)
                self.lost = (f"{describe_holder(info, held.age)} took over" if info
                             else f"the lease {self.store.kind} was removed")
                return
            self._tag = tag

    def check(self) -> None:
        """Raise when another writer took the lease over (this writer must not publish)."""
        if self.lost or _holder(self.store.read()).get("token") != self.token:
            raise OutputError(f"{self.out}: this {self.stage} lost its lease "
                              f"({self.lost or 'another writer holds it'}); nothing published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:  # a beat under way finishes first: its tag is the last
            self._thread.join(timeout=30)
        if self._tag is not None:
            self.store.delete(self._tag)
