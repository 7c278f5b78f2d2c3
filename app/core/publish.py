"""Publishing outputs: one writer at a time, and readers see one whole version or another.

Every output folder a stage writes (the prepared dataset, a model folder, recommendations)
has this layout::

    <out>/
      CURRENT                      the name of the published version (switched atomically)
      v-000002-20261130T051200Z/   one complete version, numbered (the previous one is kept)
      .lease                       while a writer holds the output: who, where, heartbeat

A writer first takes the output's lease (:func:`writer`; :mod:`app.core.lease`): of two
writers exactly one gets it, the other fails at once with an error naming the holder; a lease
whose heartbeat stopped for ``timeout`` seconds, or whose process is gone (same host), is
taken over with a printed note. Under the lease, :meth:`Lease.staged` yields a staging folder;
when the block succeeds the folder becomes a new version and ``CURRENT`` names it, in one
rename locally, in one PUT on an object store. On any error or interrupt the staging folder
is removed and the published version stays as it was.

Readers resolve the version once (:func:`current`) and read every file from that folder, so a
reader never mixes files of two versions. A folder without ``CURRENT`` is read as it is.

On an object store (``s3://``; see :mod:`app.core.storage`) there is no rename: a version is
uploaded file by file, then its ``_SUCCESS`` object (:func:`write_success`: every file, its
size and its sha256) is written last, then ``CURRENT``. Readers refuse a version without
``_SUCCESS``, or whose files do not match it, naming what is missing; the copy a node makes of
a version (:func:`local_dir`) checks every file's sha256 as it arrives, so bytes changed after
publishing are refused, never read. Every folder that writes a ``_SUCCESS`` (the sweep's
results folder too) writes it through :func:`write_success`.

The hashes are taken where the bytes are: the driver's staged files before upload, files that
tasks write straight into the version by those tasks (handed over with :meth:`Lease.record`);
only a file nobody recorded (one a library wrote for us, such as Ray Data's
``write_parquet``) is read back to hash it. A local version gets no ``_SUCCESS``: the rename
publishes it whole, and readers read it in place, with no copy at which to check it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from app.core.errors import OutputError  # noqa: F401  (raised here, importable from here)
from app.core.lease import LEASE, TAKEOVER, WriterLease, describe_holder  # noqa: F401
from app.core.lease import now as _now
from app.core.storage import FileSum, Location, cache_root, is_remote, local_copy, resolve

POINTER = "CURRENT"
SUCCESS = "_SUCCESS"  # written last in a folder, listing its files, their sizes and sha256
VERSION_PREFIX = "v-"
KEEP_VERSIONS = 2  # the current one and the one before it (a reader may still be on it)


def write_success(folder: Location, files: Mapping[str, FileSum], *, stage: str) -> None:
    """Write ``folder``'s completion record, last: ``{"files": {name: size}, "sha256": {name:
    hex}, "written": ..., "stage": ...}``, the one ``_SUCCESS`` format that :func:`current`
    and :func:`local_dir` check. (Sizes keep their own map so that readers of the older,
    sizes-only format still read it.)

    Args:
        folder: a version being published, or a folder published in place (a sweep's).
        files: path relative to ``folder`` -> size and sha256, for every file a reader needs.
        stage: who wrote it.

    Raises:
        ValueError: a file without its sha256 (every record written now carries them).
    """
    unhashed = sorted(name for name, s in files.items() if not s.sha256)
    if unhashed:
        raise ValueError(f"{folder}: no sha256 for {', '.join(unhashed[:3])}")
    folder.join(SUCCESS).write_text(json.dumps({
        "files": {name: s.size for name, s in files.items()},
        "sha256": {name: s.sha256 for name, s in files.items()},
        "written": _now(), "stage": stage}))


def read_success(folder: Location) -> dict[str, FileSum]:
    """The files ``folder``'s ``_SUCCESS`` lists, with their size and sha256 (None for each
    file of a record in the older, sizes-only format).

    Raises:
        FileNotFoundError: ``folder`` has no ``_SUCCESS``.
        OutputError: it holds something other than :func:`write_success`'s format.
    """
    text = folder.join(SUCCESS).read_text()
    try:
        record = json.loads(text)
        sizes, hashes = record["files"], record.get("sha256", {})
    except (ValueError, KeyError, TypeError, AttributeError):
        sizes = hashes = None
    if not (isinstance(sizes, dict) and all(isinstance(n, int) for n in sizes.values())
            and isinstance(hashes, dict) and set(hashes) <= set(sizes)
            and all(isinstance(h, str) for h in hashes.values())):
        raise OutputError(f"{folder}/{SUCCESS}: not a file list; write the output again")
    if hashes and set(hashes) != set(sizes):
        missing = sorted(set(sizes) - set(hashes))
        raise OutputError(f"{folder}/{SUCCESS}: no sha256 for {', '.join(missing[:3])}; "
                          f"write the output again")
    return {name: FileSum(size, hashes.get(name)) for name, size in sizes.items()}


def _complete(version: Location) -> Location:
    """``version`` when its ``_SUCCESS`` lists exactly the files it holds."""
    try:
        listed = read_success(version)
    except FileNotFoundError:
        raise OutputError(f"{version}: has no {SUCCESS}, so it was not completely written "
                          f"(its writer stopped); write the output again") from None
    held = dict(version.files())
    missing = sorted(f for f, want in listed.items() if held.get(f) != want.size)
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
    or on an object store its copy in this node's cache, every file checked against the
    version's ``_SUCCESS`` (:func:`app.core.storage.local_copy`).

    Raises:
        StorageError: a listed file is missing or differs (size, or sha256 when listed).
    """
    folder = current(out)
    if not isinstance(folder, Location):
        return folder
    listed = read_success(folder)
    return local_copy(folder, {f: s for f, s in listed.items() if f != SUCCESS})


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


def _version_name(number: int) -> str:
    return f"{VERSION_PREFIX}{number:06d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def _number(name: str) -> Optional[int]:
    parts = name.split("-")
    return int(parts[1]) if name.startswith(VERSION_PREFIX) and len(parts) > 2 \
        and parts[1].isdigit() else None


def _versions(out: Location) -> list[str]:
    """The version folders of ``out``, oldest first."""
    return sorted(n for n in out.children() if _number(n) is not None)


def _staging(out: Location, version: str) -> tuple[Path, Location]:
    """(the local folder the driver writes, the version's folder tasks on any node write).
    Locally they are one folder, ``.partial-<version>``, renamed into place; on an object
    store a folder in this node's cache, uploaded to the version's prefix."""
    if not out.remote:
        for stale in out.local_path().glob(".partial-*"):  # a dead writer's (we hold the lease)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.local_path() / f".partial-{version}"
        tmp.mkdir()
        return tmp, resolve(tmp)
    cache_root().mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".stage-{version}-", dir=cache_root())), \
        out.join(version)


@dataclass
class Lease(WriterLease):
    """The writer lease of an output folder (:class:`app.core.lease.WriterLease`), under which
    a new version is published (:meth:`staged`)."""

    # inside staged(): where the version being written lies, for writers on other nodes
    target: Optional[Location] = None
    # inside staged(): the version's folder once published (its name is known up front)
    version: Optional[Location] = None
    # files written straight into ``target`` -> their sums as written (:meth:`record`)
    written: dict[str, FileSum] = field(default_factory=dict)

    def record(self, files: Mapping[str, FileSum]) -> None:
        """The size and sha256 of files written straight into :attr:`target` (paths relative
        to it), taken by whoever wrote their bytes: publishing lists them without reading
        them back."""
        self.written.update(files)

    @contextlib.contextmanager
    def staged(self, keep: int = KEEP_VERSIONS) -> Iterator[Path]:
        """Yield an empty local staging folder for the driver's files (tasks on any node write
        theirs under :attr:`target`); when the block succeeds it becomes the published
        version, ``CURRENT`` names it, and versions older than the last ``keep`` are removed.
        Nothing is published when the lease was lost meanwhile."""
        out = resolve(self.out)
        version = _version_name(max(map(_number, _versions(out)), default=0) + 1)
        tmp, self.target = _staging(out, version)
        self.version, self.written = out.join(version), {}
        try:
            yield tmp
            self.check()
            self._commit(tmp, out.join(version))
        except BaseException:
            with contextlib.suppress(Exception):
                self.target.delete()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.join(POINTER).write_text(version + "\n")  # readers switch here, all at once
        for old in _versions(out)[:-keep]:
            with contextlib.suppress(Exception):
                out.join(old).delete()

    def _commit(self, tmp: Path, version: Location) -> None:
        """Make the staged files the complete ``version``: one rename locally; on an object
        store, upload them beside the tasks' files, then ``_SUCCESS`` listing every file with
        its size and sha256."""
        if not version.remote:
            os.replace(tmp, version.local_path())
            return
        staged = {str(p.relative_to(tmp)): FileSum.of_file(p)  # hashed before upload
                  for p in sorted(tmp.rglob("*")) if p.is_file()}
        version.upload(tmp)
        write_success(version, self._sums(version, staged), stage=self.stage)
        self.check()

    def _sums(self, version: Location, staged: Mapping[str, FileSum]) -> dict[str, FileSum]:
        """Every file of the uploaded ``version`` with its sum: the staged files' and the
        recorded ones' as taken when written; any other file (one a library wrote for us,
        e.g. Ray Data's ``write_parquet``, whose bytes we never held) read back to hash it.

        Raises:
            OutputError: a file's size differs from its sum taken when it was written.
        """
        sums = {}
        for rel, size in version.files():
            known = staged.get(rel) or self.written.get(rel)
            if known is None:
                known = version.join(rel).read_sum()  # read back: see the docstring
            if known.size != size:
                raise OutputError(f"{version}: {rel}: {size} bytes after upload, {known.size} "
                                  f"when written; write the output again")
            sums[rel] = known
        return sums


@contextlib.contextmanager
def writer(out: str | os.PathLike | Location, stage: str, *, timeout: float = 60.0,
           say: Any = print) -> Iterator[Lease]:
    """Hold the exclusive writer lease of ``out`` for the block.

    Args:
        out: the output folder (created if missing), a path or a URI.
        stage: who writes (named to a second writer).
        timeout: seconds without a heartbeat after which the lease may be taken over.
        say: where the note of a take-over goes.

    Raises:
        OutputError: another live writer holds ``out``.
    """
    where: Union[Path, Location] = resolve(out) if _remote(out) else _local(out).absolute()
    created = isinstance(where, Path) and not where.exists()
    lease = Lease(where, stage, timeout)
    lease.acquire(say)
    try:
        yield lease
    finally:
        lease.release()
        if created:  # a writer that published nothing leaves nothing behind
            with contextlib.suppress(OSError):
                where.rmdir()


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
    entries = [p for p in out.iterdir() if p.name not in (LEASE, TAKEOVER)
               and not p.name.startswith((".partial-", f"{LEASE}."))]  # (a record being made)
    if not entries:
        return
    what = f"a {kind} of an older layout" if (out / marker).exists() else \
        f"something other than a {kind}"
    raise OutputError(f"{out}: holds {what} (no {POINTER} file); choose another output folder "
                     f"or remove it")
