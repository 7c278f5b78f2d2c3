import pyarrow as pa

from app.data.validate import Columns, validate_table


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
    from app.data.sources import DataError, resolve_files

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


# ---------------------------------------------------------------- exact ids

def validate(table: pa.Table, **kwargs) -> list[dict]:
    return validate_table(table, columns=Columns(), rating_min=0.5, rating_max=5.0,
                          **kwargs).to_pylist()


def rows_with(column: str, values: pa.Array) -> pa.Table:
    """A table of valid rows whose ``column`` holds ``values``."""
    n = len(values)
    cols = {"userId": pa.array(["u"] * n), "movieId": pa.array(["10"] * n),
            "rating": pa.array(["4"] * n), "timestamp": pa.array(["1700000000"] * n)}
    cols[column] = values
    return pa.table(cols)


def test_text_ids_are_kept_exactly_as_written():
    written = ["007", "7", "0007", "+7", "12345678901234567890", " 42 ", "-0"]
    out = validate(rows_with("userId", pa.array(written)))
    assert [r["user"] for r in out] == ["007", "7", "0007", "+7", "12345678901234567890",
                                        "42", "-0"]
    assert all(r["reason"] is None for r in out)


def test_integer_id_columns_become_their_decimal_text():
    out = validate(rows_with("movieId", pa.array([7, -3, 2**63 - 1], pa.int64())))
    assert [r["item"] for r in out] == ["7", "-3", "9223372036854775807"]
    out = validate(rows_with("movieId", pa.array([2**64 - 1], pa.uint64())))
    assert out[0]["item"] == "18446744073709551615"


def test_float_ids_integral_become_integers_others_are_quarantined():
    out = validate(rows_with("userId", pa.array([1.0, 1.5, float("nan"), float("inf"), None,
                                                 -2.0, 1e300])))
    assert [r["user"] for r in out][:2] == ["1", "1.5"] and out[5]["user"] == "-2"
    assert [r["reason"] for r in out] == [
        None, "non-integral float userId", "missing userId", "non-integral float userId",
        "missing userId", None, "non-integral float userId"]
    assert "nan" not in [r["user"] for r in out]
    out = validate(rows_with("movieId", pa.array([3.0, 0.25], pa.float32())))
    assert [(r["item"], r["reason"]) for r in out] == [("3", None),
                                                      ("0.25", "non-integral float movieId")]


def test_first_repeated_names_an_id_seen_twice():
    from app.data.validate import first_repeated

    assert first_repeated(pa.array(["007", "7", "0007"])) is None
    assert first_repeated(pa.array([1, 2, 1])) == "1"


# ---------------------------------------------------------------- timestamps

def epoch(text: str) -> int:
    from datetime import datetime, timezone

    when = datetime.fromisoformat(text)
    return int((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())


def test_iso_timestamps_with_z_offsets_and_fractions_are_utc():
    written = ["2024-01-02T03:04:05Z", "2024-01-02T03:04:05+02:00", "2024-01-02T03:04:05-0530",
               "2024-01-02T03:04:05.987654Z", "2024-01-02 03:04:05.5+01:00",
               "2024-01-02T03:04:05", "2024-01-02", "2024-01-02T03:04"]
    out = validate(rows_with("timestamp", pa.array(written)))
    assert [r["reason"] for r in out] == [None] * len(written)
    assert [r["timestamp"] for r in out] == [
        epoch("2024-01-02T03:04:05+00:00"), epoch("2024-01-02T01:04:05+00:00"),
        epoch("2024-01-02T08:34:05+00:00"), epoch("2024-01-02T03:04:05+00:00"),
        epoch("2024-01-02T02:04:05+00:00"), epoch("2024-01-02T03:04:05"),
        epoch("2024-01-02T00:00:00"), epoch("2024-01-02T03:04:00")]


def test_numeric_timestamp_units_are_read_from_the_digits():
    s = 1_704_164_645  # 2024-01-02T03:04:05Z
    text = [str(s), str(s * 1000 + 999), str(s * 10**6), str(s * 10**9), "+" + str(s),
            f"{s}.75", f"{s * 1000}.5"]
    out = validate(rows_with("timestamp", pa.array(text)))
    assert [r["timestamp"] for r in out] == [s] * len(text)
    for values in (pa.array([s * 1000, s], pa.int64()), pa.array([s * 1000.0, float(s)])):
        out = validate(rows_with("timestamp", values))
        assert [r["timestamp"] for r in out] == [s, s]
    # typed timestamps carry their own unit, whatever the digits
    typed = pa.array([s * 10**9], pa.timestamp("ns", tz="UTC"))
    assert validate(rows_with("timestamp", typed))[0]["timestamp"] == s


def test_timestamp_unit_forced():
    ms = 1_704_164_645_000
    out = validate(rows_with("timestamp", pa.array([str(ms)])), timestamp_unit="ms")
    assert out[0]["timestamp"] == ms // 1000
    # milliseconds read as seconds land in the year 55975: quarantined, not kept
    out = validate(rows_with("timestamp", pa.array([str(ms), "1704164645"])),
                   timestamp_unit="s")
    assert [r["reason"] for r in out] == [
        "timestamp out of range [1970-01-01, 2100-01-01]", None]
    assert out[0]["timestamp_raw"] == str(ms)
    # before 2001-09-09 milliseconds have seconds' digits: auto quarantines them, ms reads them
    early = "946684800000"  # 2000-01-01 in milliseconds
    assert validate(rows_with("timestamp", pa.array([early])))[0]["reason"].startswith(
        "timestamp out of range")
    assert validate(rows_with("timestamp", pa.array([early])),
                    timestamp_unit="ms")[0]["timestamp"] == 946_684_800


def test_implausible_timestamps_are_quarantined():
    written = ["1900-01-01", "9999-12-31T23:59:59Z", "-2208988800", "253402300799",
               "1969-12-31T23:59:59Z", "2100-01-01T00:00:01Z", "1970-01-01", "2100-01-01"]
    out = validate(rows_with("timestamp", pa.array(written)))
    assert [r["reason"] for r in out] == (
        ["timestamp out of range [1970-01-01, 2100-01-01]"] * 6 + [None, None])
    out = validate(rows_with("timestamp", pa.array(["1995-06-01", "2030-01-01"])),
                   timestamp_min=epoch("2000-01-01"), timestamp_max=epoch("2025-06-30T12:00:00"))
    assert [r["reason"] for r in out] == [
        "timestamp out of range [2000-01-01, 2025-06-30T12:00:00Z]"] * 2
    typed = pa.array([epoch("1900-01-01") * 10**6], pa.timestamp("us"))
    assert validate(rows_with("timestamp", typed))[0]["reason"].startswith("timestamp out of")
