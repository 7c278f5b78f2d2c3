"""Delimited text files read by Ray Data in byte ranges, so one large file is parsed by many
tasks at once.

``ray.data.read_csv`` parses each file in one task: a single 250 MB CSV is then read and
validated by one core, however many the cluster has. :class:`CsvRanges` cuts every
uncompressed file into ranges of about ``range_bytes`` at line boundaries; each read task
finds its own boundaries (a range holds the lines that *start* inside it), reads those bytes
and parses them with pyarrow under the header's column names. Compressed files cannot be cut
and are read whole, one task each, as are files whose lines end in a bare carriage return.

The cut assumes no newline inside a quoted value, as pyarrow's own parallel reader does
(``ParseOptions.newlines_in_values`` is off): such a value reads as malformed lines either
way, and malformed lines are recorded with their line number in the file, counted from the
header (:class:`app.data.sources.MalformedLines`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

_SCAN = 1 << 16  # bytes read at a time while looking for a line's end


@dataclass(frozen=True)
class CsvFile:
    """What the read tasks need to know of one file, found by the driver from its head."""

    path: str
    size: int
    names: list[str]       # the header's column names
    data_start: int        # byte offset of the first line after the header
    splittable: bool       # uncompressed, lines ending in "\n": can be read in ranges


def inspect_file(path: str, fs: pafs.FileSystem, delimiter: str) -> CsvFile:
    """The header's names and where the data starts; raises ValueError for an empty file."""
    with fs.open_input_stream(path) as f:  # decompressed as the extension says
        head = f.read(1 << 16)
    if not head.strip():
        raise ValueError(f"{path}: file is empty")
    ends = [i for i in (head.find(b"\r"), head.find(b"\n")) if i >= 0]
    header = head[:min(ends)] if ends else head
    names = pacsv.read_csv(io.BytesIO(header + b"\n"), parse_options=pacsv.ParseOptions(
        delimiter=delimiter)).schema.names
    size = fs.get_file_info(path).size or 0
    compressed = _compression(path) is not None
    end = head.find(b"\n")
    # lines ending in a bare "\r" are pyarrow's to find, not ours to cut at
    bare_cr = end < 0 or head[len(header):end] not in (b"", b"\r")
    splittable = not compressed and not bare_cr
    return CsvFile(path=path, size=size, names=names, data_start=end + 1 if end >= 0 else size,
                   splittable=splittable)


def _compression(path: str) -> Optional[str]:
    try:
        return pa.Codec.detect(path).name
    except (ValueError, TypeError):  # TypeError: no compression is known by that extension
        return None


def _line_start(f: Any, offset: int, file: CsvFile) -> int:
    """The offset of the first line that starts at or after ``offset``."""
    if offset <= file.data_start:
        return file.data_start
    pos = offset - 1  # a line starts at ``offset`` when the byte before it ends a line
    while pos < file.size:
        chunk = f.read_at(min(_SCAN, file.size - pos), pos)
        found = chunk.find(b"\n")
        if found >= 0:
            return pos + found + 1
        pos += len(chunk)
    return file.size


def _lines_before(f: Any, offset: int) -> int:
    """Lines that end before ``offset`` (read only when a malformed line needs numbering)."""
    count, pos = 0, 0
    while pos < offset:
        chunk = f.read_at(min(1 << 24, offset - pos), pos)
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


class CsvRanges(Datasource):
    """A Ray Data datasource of delimited text files read in byte ranges.

    Args:
        files: the files (:func:`inspect_file` of each).
        fs: their filesystem.
        columns: the columns to keep, read as text (``strings_can_be_null`` off: an empty
            field is an empty string, for validation to name).
        delimiter: the field separator.
        range_bytes: about how many bytes each read task parses.
        on_malformed: makes the ``invalid_row_handler`` of one task, given a function that
            turns the parser's line number into the line number in the file (its result is
            returned to pyarrow: ``"skip"`` records and skips the line).
    """

    def __init__(self, files: list[CsvFile], fs: pafs.FileSystem, *, columns: list[str],
                 delimiter: str, range_bytes: int,
                 on_malformed: Callable[[Callable[[int], int]], Callable[[Any], str]]) -> None:
        super().__init__()
        self.files, self.fs, self.columns = files, fs, columns
        self.delimiter, self.range_bytes, self.on_malformed = delimiter, range_bytes, on_malformed

    def get_name(self) -> str:
        return "CSVRanges"

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(f.size for f in self.files)

    def ranges(self) -> list[tuple[CsvFile, int, int]]:
        """(file, nominal start, nominal end) of each read task, in file order."""
        out = []
        for file in self.files:
            if not file.splittable or file.size - file.data_start <= self.range_bytes:
                out.append((file, 0, file.size))
                continue
            cuts = range(file.data_start, file.size, self.range_bytes)
            out += [(file, s, min(s + self.range_bytes, file.size)) for s in cuts]
        return out

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for file, start, end in self.ranges():
            meta = BlockMetadata(num_rows=None, size_bytes=end - start, exec_stats=None,
                                 input_files=(file.path,))
            tasks.append(ReadTask(self._reader(file, start, end), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks

    def _reader(self, file: CsvFile, start: int, end: int) -> Callable[[], Iterator[pa.Table]]:
        fs, columns, delimiter, on_malformed = self.fs, self.columns, self.delimiter, \
            self.on_malformed

        def convert() -> pacsv.ConvertOptions:
            return pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                        include_columns=columns, strings_can_be_null=False)

        def read() -> Iterator[pa.Table]:
            if not file.splittable:
                yield from _read_whole(file, fs, delimiter, convert(), on_malformed)
                return
            with fs.open_input_file(file.path) as f:
                first, last = _line_start(f, start, file), _line_start(f, end, file)
                if last <= first:
                    return
                data = pa.py_buffer(f.read_at(last - first, first))
                base: list[int] = []

                def line_in_file(number: int) -> int:
                    if not base:
                        with fs.open_input_file(file.path) as g:
                            base.append(_lines_before(g, first))
                    return base[0] + number

                parse = pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False,
                                           invalid_row_handler=on_malformed(line_in_file))
                yield pacsv.read_csv(
                    pa.BufferReader(data),
                    read_options=pacsv.ReadOptions(column_names=file.names, use_threads=False,
                                                   block_size=max(1 << 20, data.size + 1)),
                    parse_options=parse, convert_options=convert())

        return read


def _read_whole(file: CsvFile, fs: pafs.FileSystem, delimiter: str,
                convert: pacsv.ConvertOptions,
                on_malformed: Callable[[Callable[[int], int]], Callable[[Any], str]]
                ) -> Iterator[pa.Table]:
    """A file that cannot be cut, parsed in one task (header included), batch by batch."""
    parse = pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False,
                               invalid_row_handler=on_malformed(lambda number: number))
    with fs.open_input_stream(file.path) as f:
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(use_threads=False,
                                                                  block_size=16 << 20),
                                parse_options=parse, convert_options=convert)
        for batch in reader:
            yield pa.Table.from_batches([batch])
