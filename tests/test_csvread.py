"""Delimited files read in byte ranges: the same rows as one pyarrow read, in order, whatever
the cut; malformed lines numbered as in the file; files that cannot be cut read whole."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pytest
import ray

from app.data.csvread import CsvRanges, inspect_file
from app.data.sources import MalformedLines

COLUMNS = ["userId", "movieId", "rating", "timestamp"]


def _read(path, malformed, *, range_bytes, delimiter=","):
    fs = pafs.LocalFileSystem()
    source = CsvRanges([inspect_file(str(path), fs, delimiter)], fs, columns=COLUMNS,
                       delimiter=delimiter, range_bytes=range_bytes,
                       on_malformed=MalformedLines(str(malformed)).task)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as prepare
    ds = ray.data.read_datasource(source, override_num_blocks=len(source.ranges()))
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables) if tables else None
    return source, table


def _recorded(folder):
    return sorted((r["line"], r["text"]) for f in folder.glob("*.jsonl")
                  for r in map(json.loads, f.read_text().splitlines()))


def _whole(path):
    return pacsv.read_csv(str(path), convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in COLUMNS}, include_columns=COLUMNS,
        strings_can_be_null=False), parse_options=pacsv.ParseOptions(
        ignore_empty_lines=False, invalid_row_handler=lambda row: "skip"))


@pytest.mark.parametrize("range_bytes", [97, 1000, 1 << 20])
def test_ranges_read_every_row_once_in_order(ray_local, tmp_path, range_bytes):
    lines = [f"{u},{u * 7 % 13},{(u % 9 + 1) / 2},{1_600_000_000 + u}" for u in range(500)]
    lines[10], lines[250] = "", "3,4"  # a blank line (an empty row) and a malformed one
    path = tmp_path / "r.csv"
    path.write_text("userId,movieId,rating,timestamp\r\n"
                    + "\r\n".join(lines) + "\r\n")  # CRLF: each range ends after its "\n"
    source, table = _read(path, tmp_path / "bad", range_bytes=range_bytes)
    assert len(source.ranges()) > 1 or range_bytes == 1 << 20
    assert table.equals(_whole(path))
    assert table.num_rows == 499 and table["userId"][10].as_py() == ""
    # line 1 is the header, so the 251st line of data is line 252 of the file
    assert _recorded(tmp_path / "bad") == [(252, "3,4")]


def test_a_file_without_data_rows_reads_nothing(ray_local, tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("userId,movieId,rating,timestamp\n")
    _, table = _read(path, tmp_path / "bad", range_bytes=4)
    assert table is None or table.num_rows == 0


def test_byte_order_mark_and_extra_columns(ray_local, tmp_path):
    path = tmp_path / "bom.csv"
    body = "".join(f"{i},x,{i},2.5,{1_600_000_000 + i}\n" for i in range(40))
    path.write_bytes("\ufeffuserId,title,movieId,rating,timestamp\n".encode() + body.encode())
    source, table = _read(path, tmp_path / "bad", range_bytes=50)
    assert len(source.ranges()) > 5
    assert table.column_names == COLUMNS and table.num_rows == 40
    assert table["movieId"].to_pylist() == [str(i) for i in range(40)]


def test_compressed_and_carriage_return_files_are_read_whole(ray_local, tmp_path):
    text = "userId,movieId,rating,timestamp\n" + "".join(
        f"{i},{i},4.0,{1_600_000_000 + i}\n" for i in range(100)) + "1,2\n"
    gz = tmp_path / "r.csv.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    cr = tmp_path / "cr.csv"
    cr.write_text(text.replace("\n", "\r"))
    for path, folder in ((gz, tmp_path / "bad-gz"), (cr, tmp_path / "bad-cr")):
        source, table = _read(path, folder, range_bytes=16)
        assert len(source.ranges()) == 1, path
        assert table.num_rows == 100 and table["userId"][99].as_py() == "99"
        assert _recorded(folder) == [(102, "1,2")]


def test_tab_separated_ranges(ray_local, tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("userId\tmovieId\trating\ttimestamp\n" + "".join(
        f"u{i}\t{i}\t3.5\t{1_600_000_000 + i}\n" for i in range(60)))
    _, table = _read(path, tmp_path / "bad", range_bytes=40, delimiter="\t")
    assert table["userId"].to_pylist() == [f"u{i}" for i in range(60)]
