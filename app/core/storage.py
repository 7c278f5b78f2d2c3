"""One storage layer for every path setting: a local path or a URI.

``s3://bucket/key``, ``gs://bucket/key``, ``abfss://container@account.dfs.core.windows.net/key``
and ``file:///path`` go through pyarrow's filesystems; a local path (a Unity Catalog volume
``/Volumes/<catalog>/<schema>/<volume>/...`` is one, mounted on every Databricks node) stays a
local path. :func:`resolve` does this once; the :class:`Location` it returns carries the
filesystem and reads, writes, lists and copies the same way everywhere.

Credentials come from the environment and each provider's usual chain (AWS variables and
profiles, ``GOOGLE_APPLICATION_CREDENTIALS``, Azure's default credential), never from flags,
and are never printed. An S3-compatible endpoint (MinIO, moto, R2) comes from
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``). pyarrow does not read that variable, nor do
mosaicml-streaming (``S3_ENDPOINT_URL``) or MLflow's artifact store (``MLFLOW_S3_ENDPOINT_URL``):
:func:`component_env` gives each of them the same endpoint.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from app.core.errors import StorageError  # noqa: F401  (raised here, importable from here)

REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")
CACHE_ENV = "TWOTOWER_CACHE_DIR"
_CHUNK = 8 << 20  # bytes per read when hashing or copying a file as a stream


@dataclass(frozen=True)
class FileSum:
    """A file's size and the sha256 (hex) of its bytes, as a version's ``_SUCCESS`` lists
    them (:mod:`app.core.publish`). ``sha256`` is None only in a ``_SUCCESS`` of the older,
    sizes-only format."""

    size: int
    sha256: Optional[str] = None

    @classmethod
    def of(cls, data: bytes) -> "FileSum":
        """The sum of bytes about to be written (hashed once, where they are made)."""
        return cls(len(data), hashlib.sha256(data).hexdigest())

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> "FileSum":
        """The sum of a local file, read once as a stream."""
        with open(path, "rb") as f:
            return _stream_sum(f)


def _stream_sum(src: Any, copy: Any = None) -> FileSum:
    """Read ``src`` to its end in chunks, hashing it (and writing each chunk to ``copy``)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if copy is not None:
            copy.write(chunk)
    return FileSum(size, digest.hexdigest())


def is_uri(target: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (a remote store or ``file://``), False for a plain path."""
    return "://" in str(target)


def is_remote(target: str | os.PathLike) -> bool:
    """True when ``target`` lives on an object store (not a local or mounted path)."""
    return str(target).split("://", 1)[0].lower() in REMOTE_SCHEMES if is_uri(target) \
        else False


def s3_endpoint(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The S3-compatible endpoint the environment names (None: AWS itself)."""
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def component_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables that point mosaicml-streaming and MLflow's artifact store at the same S3
    endpoint as pyarrow and boto3 (only those the environment leaves unset)."""
    endpoint = s3_endpoint(env)
    if not endpoint:
        return {}
    wanted = {"S3_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    return {k: v for k, v in wanted.items() if not env.get(k)}


def worker_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What every Ray worker needs to reach the same stores as this process: the endpoints
    (never credentials, which each node takes from its own chain; nor the cache folder,
    which is each node's own)."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
             "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
    found = {k: env[k] for k in names if env.get(k)}
    return {**found, **component_env(env)}


def _s3(env: Mapping[str, str]) -> pafs.S3FileSystem:
    endpoint = s3_endpoint(env)
    kwargs: dict[str, Any] = {
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parts.netloc + parts.path.rstrip("/"),
                      scheme=parts.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A folder or file on some filesystem: ``uri`` as the user gave it (normalised), the
    pyarrow filesystem, and the path inside it."""

    uri: str
    fs: pafs.FileSystem
    path: str

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> "Location":
        return self.join(name)

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def join(self, *names: str) -> "Location":
        rel = posixpath.join(*names)
        if rel.startswith("/") or ".." in rel.split("/"):
            raise StorageError(f"{rel!r}: not a name inside {self.uri}")
        return Location(f"{self.uri.rstrip('/')}/{rel}", self.fs,
                        posixpath.join(self.path, rel))

    def local_path(self) -> Path:
        """The local path (only for a location that is not remote)."""
        if self.remote:
            raise StorageError(f"{self.uri} is not a local path")
        return Path(self.path)

    # --- reading -----------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder; on an object store, a prefix with at least one object under it."""
        return self.info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            text = str(e).lower()
            if any(w in text for w in ("not found", "nosuchkey", "not a directory",
                                       "does not exist")):
                raise FileNotFoundError(self.uri) from None
            raise StorageError(f"{self.uri}: could not read ({e})") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_sum(self) -> FileSum:
        """The size and sha256 of this file, read back as a stream (for files a library
        wrote for us, whose bytes we never held)."""
        with self.fs.open_input_stream(self.path) as f:
            return _stream_sum(f)

    def copy_to(self, dest: str | os.PathLike) -> FileSum:
        """Copy this file to a local path in one pass, hashing the bytes as they arrive (the
        copy is checked without reading it a second time).

        Raises:
            FileNotFoundError: this file does not exist.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            src = self.fs.open_input_stream(self.path)
        except OSError as e:
            if isinstance(e, FileNotFoundError) or "not found" in str(e).lower():
                raise FileNotFoundError(self.uri) from None
            raise
        with src, dest.open("wb") as out:
            return _stream_sum(src, out)

    def files(self) -> Iterator[tuple[str, int]]:
        """(path relative to this folder, size) of every file under it, sorted."""
        base = self.path.rstrip("/") + "/"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True,
                                                            allow_not_found=True))
        except NotADirectoryError:
            return iter(())
        return iter(sorted((i.path[len(base):], i.size) for i in infos
                           if i.type == pafs.FileType.File and i.path.startswith(base)))

    def children(self) -> list[str]:
        """Names directly under this folder (files and folders)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in infos)

    # --- writing -----------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Write a whole file: one PUT on an object store (readers see all of it or none);
        locally a temporary file renamed over the target."""
        if self.remote:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        """Remove this file or folder (everything under it); nothing when it is missing."""
        kind = self.info().type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def upload(self, local_dir: str | os.PathLike, *, last: tuple[str, ...] = ()) -> None:
        """Copy a local folder here, file by file; the files named in ``last`` are written
        after all others (a completion marker)."""
        root = Path(local_dir)
        rels = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        for rel in sorted(rels, key=lambda r: r in last):
            if not self.remote:
                self.join(rel).local_path().parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(str(root / rel), self.join(rel).path,
                            source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)

    def download(self, local_dir: str | os.PathLike) -> Path:
        """Copy this folder into a local folder; returns it."""
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for rel, _ in self.files():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(self.join(rel).path, str(dest / rel), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        return dest


def resolve(target: str | os.PathLike | Location,
            env: Mapping[str, str] = os.environ) -> Location:
    """The :class:`Location` of a local path or URI (see the module docstring).

    Raises:
        StorageError: an unknown scheme, or a URI without a bucket, naming it.
    """
    if isinstance(target, Location):
        return target
    text = str(target)
    if not is_uri(text):
        path = str(Path(text).expanduser().absolute())
        return Location(path, pafs.LocalFileSystem(), path)
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        path = str(Path(rest or "/").absolute())
        return Location(f"file://{path}", pafs.LocalFileSystem(), path)
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{text}: unknown storage scheme {scheme!r}; use a local path, "
                           f"file://, s3://, gs:// or abfss://")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{text}: no bucket")
    norm = f"{scheme}://{rest.rstrip('/')}"
    if scheme == "s3":
        return Location(norm, _s3(env), rest.rstrip("/"))
    try:
        fs, path = pafs.FileSystem.from_uri(norm)
    except Exception as e:
        raise StorageError(f"{text}: could not open its filesystem ({e})") from None
    return Location(norm, fs, path)


def cache_root() -> Path:
    """The node-local cache of published versions read from object stores: the folder
    ``TWOTOWER_CACHE_DIR`` names, else ``<temp dir>/twotower-cache``. The only local files a
    stage writes when its inputs and outputs are remote."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir(), "twotower-cache"))


def local_copy(version: Location, expected: Optional[Mapping[str, FileSum]] = None) -> Path:
    """A local folder holding the files of an immutable published version: the folder itself
    when it is local, else its copy in this node's cache (downloaded once; several processes
    of a node may ask at once: the first complete copy wins).

    Args:
        version: a published version (never rewritten in place: its name changes when the
            output is written again).
        expected: file -> size and sha256 (the version's ``_SUCCESS``): only these files are
            copied, each checked as it arrives; a sizes-only record checks sizes.

    Raises:
        StorageError: one line naming the first listed file that is missing, or whose size or
            sha256 differs; nothing is left in the cache then.
    """
    if not version.remote:
        return version.local_path()
    key = hashlib.sha256(version.uri.encode()).hexdigest()[:16]
    dest = cache_root() / f"{version.name}-{key}"
    if (dest / ".complete").is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if expected is None:
            version.download(tmp)
        else:
            tmp.mkdir(parents=True)
            for rel, want in sorted(expected.items()):
                _checked_copy(version, rel, want, tmp / rel)
        (tmp / ".complete").write_text(version.uri + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process of this node finished first
            if not (dest / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _checked_copy(version: Location, rel: str, want: FileSum, dest: Path) -> None:
    """Copy one listed file of ``version`` to ``dest``; refuse it unless it is what
    ``_SUCCESS`` lists."""
    redo = "; republish it"
    try:
        got = version.join(rel).copy_to(dest)
    except FileNotFoundError:
        raise StorageError(f"{version}: {rel}: missing, though the version's _SUCCESS lists "
                           f"it{redo}") from None
    if got.size != want.size:
        raise StorageError(f"{version}: {rel}: {got.size} bytes where the version's _SUCCESS "
                           f"lists {want.size} (changed or truncated after publishing){redo}")
    if want.sha256 is not None and got.sha256 != want.sha256:
        raise StorageError(f"{version}: {rel}: sha256 differs from the version's _SUCCESS "
                           f"(changed or corrupted after publishing){redo}")


def pack(folder: str | os.PathLike) -> dict[str, bytes]:
    """Every file of a small local folder (a model folder), to send through Ray's object
    store to nodes that do not see this disk (:func:`unpack`)."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def unpack(files: dict[str, bytes]) -> Path:
    """The files of :func:`pack` as a folder in this node's cache (written once per content;
    processes of a node asking at once share the first complete copy)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    dest = cache_root() / f"packed-{digest.hexdigest()[:16]}"
    if (dest / ".complete").is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / ".complete").write_text("")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class NodeFolder:
    """A small folder on one node's disk (a model folder), handed to Ray tasks and actors
    without copying it into the object store up front: a process on that node reads it in
    place; one on another node gets it packed (:func:`pack`) by a task on that node, through
    the object store, and unpacked into its own node's cache. (Putting the packed folder from
    the driver held it three times in the driver's memory at once: the files, their pickle
    and the object store's pages it wrote, 0.6 GB for a 10M-rating model.)"""

    path: str
    node_id: str

    @classmethod
    def here(cls, folder: str | os.PathLike) -> "NodeFolder":
        """The folder on the node of this process (Ray is initialised)."""
        import ray

        return cls(str(folder), ray.get_runtime_context().get_node_id())

    def local(self) -> str:
        """The folder as a path on this process's node."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if ray.get_runtime_context().get_node_id() == self.node_id:
            return self.path
        on_its_node = NodeAffinitySchedulingStrategy(self.node_id, soft=False)
        task = ray.remote(num_cpus=0)(pack).options(scheduling_strategy=on_its_node)
        return str(unpack(ray.get(task.remote(self.path))))


def ray_storage(target: str | os.PathLike) -> tuple[str, Optional[pafs.FileSystem]]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: the same
    filesystem as everywhere else (Ray would not honour ``AWS_ENDPOINT_URL`` by itself)."""
    loc = resolve(target)
    return (loc.path, loc.fs) if loc.remote else (loc.path, None)
