import pyarrow as pa

from app.validate import Columns, validate_table


def run(rows):
    t = pa.table({k: pa.array([r[i] for r in rows], pa.string())
                  for i, k in enumerate(["userId", "movieId", "rating", "timestamp"])})
    return validate_table(t, columns=Columns(), rating_min=0.5, rating_max=5.0).to_pylist()


def test_each_bad_value_gets_its_reason():
    out = run([
        ("u1", "10", "4.5", "1260759144"),
        ("", "10", "4.5", "1260759144"),
        ("u1", None, "4.5", "1260759144"),
        ("u1", "10", "", "1260759144"),
        ("u1", "10", "great", "1260759144"),
        ("u1", "10", "nan", "1260759144"),
        ("u1", "10", "7", "1260759144"),
        ("u1", "10", "4", ""),
        ("u1", "10", "4", "yesterday"),
        (" u2 ", "11", "0.5", "2019-03-01 12:00:00"),
        ("u3", "12", "1", "2019-03-01T12:00:00.250"),
        ("", "", "", ""),
    ])
    reasons = [r["reason"] for r in out]
    assert reasons == [None, "missing userId", "missing movieId", "missing rating",
                       "unparsable rating", "unparsable rating", "rating outside [0.5, 5]",
                       "missing timestamp", "unparsable timestamp", None, None, "empty row"]
    assert out[0]["rating"] == 4.5 and out[0]["timestamp"] == 1260759144
    assert out[9]["user"] == "u2" and out[9]["timestamp"] == 1551441600
    assert out[10]["timestamp"] == 1551441600
    # rejected rows keep their original text for the quarantine file
    assert out[4]["rating_raw"] == "great" and out[8]["timestamp_raw"] == "yesterday"
    assert out[0]["rating_raw"] is None


def test_typed_columns_with_nan_and_nulls():
    t = pa.table({"userId": pa.array([1, 2, None], pa.int64()),
                  "movieId": pa.array([5, 6, 7], pa.int64()),
                  "rating": pa.array([3.0, float("nan"), 4.0]),
                  "timestamp": pa.array([1, 2, 3], pa.int64())})
    out = validate_table(t, columns=Columns(), rating_min=0.5, rating_max=5.0).to_pylist()
    assert [r["reason"] for r in out] == [None, "unparsable rating", "missing userId"]
    assert out[0]["user"] == "1"


def test_globs_list_from_the_wildcards_folder_and_keep_depth(tmp_path, monkeypatch):
    from app.sources import DataError, resolve_files

    (tmp_path / "sub").mkdir()
    for name in ("a.csv", "b.csv", "sub/c.csv", "x.txt"):
        (tmp_path / name).write_text("")
    monkeypatch.chdir(tmp_path)
    top = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    assert resolve_files(str(tmp_path / "*.csv"), (".csv",))[0] == top
    assert resolve_files("*.csv", (".csv",))[0] == top
    assert resolve_files(str(tmp_path / "s*" / "*.csv"), (".csv",))[0] == [
        str(tmp_path / "sub" / "c.csv")]
    assert len(resolve_files(str(tmp_path), (".csv",))[0]) == 3
    try:
        resolve_files(str(tmp_path / "*.parquet"), (".csv",))
        raise AssertionError("expected DataError")
    except DataError as e:
        assert "no files match" in str(e)
