"""Every setting of every section is checked when the command line or a config file is parsed:
a bad value ends the entry point with one line naming the flag and the value, and exit code 2,
before anything starts (no Ray, no output).

The numeric settings are enumerated from the config dataclasses, so a new one is covered here
without a new test; the exceptions are listed below with the reason.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from app.core import logs
from app.core.config import FIELDS, Config, ConfigError, config_from_args, load_config
from app.core.sections import flag

ROOT = Path(__file__).resolve().parents[1]

# each entry point, with the flags it requires (values never read: the config fails first)
PIPELINES = {
    "prepare_data": [],
    "train": ["--data", "d", "--output", "o"],
    "tune": ["--data", "d", "--output", "o"],
    "batch_inference": ["--model", "m", "--data", "d", "--output", "o"],
    "serve": ["--model", "m"],
    "full_run": [],
}
BAD = ("nan", "inf", "true", "-1")  # as flags; in YAML: .nan, .inf, true, -1
YAML_BAD = {"nan": ".nan", "inf": ".inf", "true": "true", "-1": "-1"}
# settings where a negative value is legal, and why
NEGATIVE_OK = {
    "rating_min": "ratings may be on a signed scale (e.g. -10..10)",
    "max_failures": "-1 means restart without limit (-2 is refused)",
}
# numeric settings with no upper bound, and why nothing grows with them
UNBOUNDED = {
    "rating_max": "a rating scale: ratings above it are quarantined, nothing is allocated",
    "temperature": "divides the logits; no size or wait grows with it",
    "embedding_lr": "a step size; a diverging loss shows in the first progress line",
    "dense_lr": "a step size; a diverging loss shows in the first progress line",
    "log_every": "fewer progress lines, nothing more",
    "reduction_factor": "ASHA keeps fewer trials per rung; nothing grows",
    "ease_lambdas": "L2 penalties; nothing grows with them",
}


def _base(tp: typing.Any) -> typing.Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _kind(name: str) -> typing.Any:
    section, f = FIELDS[name]
    return _base(typing.get_type_hints(type(getattr(Config(), section)))[name])


def _is_numeric(name: str) -> bool:
    kind = _kind(name)
    if kind is list:  # a list of numbers (eval_k, tower_layers, ease_lambdas)
        default = getattr(getattr(Config(), FIELDS[name][0]), name)
        return all(isinstance(x, (int, float)) for x in default)
    return kind in (int, float)


NUMERIC = [name for name in FIELDS if _is_numeric(name)]
CASES = [(name, bad) for name in NUMERIC for bad in BAD
         if not (bad == "-1" and name in NEGATIVE_OK)]


def _entry_point(name: str) -> tuple[types.ModuleType, list[str]]:
    """The first entry point that has the setting's flag, with its required flags."""
    for module_name, required in PIPELINES.items():
        module = importlib.import_module(f"pipelines.{module_name}")
        if name in module.build_parser().get_default("_config_fields"):
            return module, required
    raise AssertionError(f"{flag(name)} is a flag of no entry point")


@pytest.fixture
def isolated(monkeypatch):
    """An entry point's main() run in this process sets the output level and the signal
    handlers: put them back afterwards."""
    monkeypatch.setenv(logs.LEVEL_ENV, "normal")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _refused(module: types.ModuleType, argv: list[str], capsys) -> str:
    """Run ``module.main(argv)``; assert exit code 2, nothing started, one line on stderr;
    return that line."""
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # (the suite's)
    code = module.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert out == "", f"work began before the refusal: {out!r}"  # the config is printed first
    if not ray_before:  # the command did not start Ray
        assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_the_walk_covers_every_section():
    sections = {FIELDS[name][0] for name in NUMERIC}
    assert sections == {"data", "model", "train", "tune", "inference", "serve", "cluster"}
    assert {"batch_wait_ms", "label_threshold", "eval_k", "spark_gpus_per_node"} <= set(NUMERIC)
    assert set(NEGATIVE_OK) <= set(NUMERIC) and set(UNBOUNDED) <= set(NUMERIC)


@pytest.mark.parametrize("name, bad", CASES)
def test_every_numeric_flag_refuses_nan_inf_bools_and_negatives(name, bad, capsys, isolated):
    module, required = _entry_point(name)
    line = _refused(module, required + [f"{flag(name)}={bad}"], capsys)
    assert flag(name) in line and bad in line.lower(), line


@pytest.mark.parametrize("name, bad", CASES)
def test_every_numeric_setting_in_yaml_refuses_nan_inf_bools_and_negatives(name, bad, tmp_path):
    value = f"[{YAML_BAD[bad]}]" if _kind(name) is list else YAML_BAD[bad]
    f = tmp_path / "c.yaml"
    f.write_text(f"{FIELDS[name][0]}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert flag(name) in str(e.value) and bad in str(e.value).lower(), e.value


@pytest.mark.parametrize("name", sorted(NEGATIVE_OK))
def test_the_negative_exceptions_are_real(name):
    module, required = _entry_point(name)
    cfg = config_from_args(module.build_parser().parse_args(required + [f"{flag(name)}=-1"]))
    assert getattr(getattr(cfg, FIELDS[name][0]), name) == -1


def test_below_the_floor_of_an_exception_is_refused():
    with pytest.raises(ConfigError, match=r"--max-failures must be in \[-1, 1000\].*-2"):
        load_config(overrides={"max_failures": -2})


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_setting_has_an_upper_bound_or_a_reason(name, capsys, isolated):
    module, required = _entry_point(name)
    argv = required + [f"{flag(name)}=1e12"]
    if name in UNBOUNDED:  # accepted: the list above stays true
        config_from_args(module.build_parser().parse_args(argv))
        return
    line = _refused(module, argv, capsys)
    assert flag(name) in line, line


@pytest.mark.parametrize("value", ["1e9", "inf", "1001"])
def test_a_batch_wait_that_would_hang_every_request_is_refused(value, capsys, isolated):
    from pipelines import serve

    line = _refused(serve, ["--model", "m", "--batch-wait-ms", value], capsys)
    assert "--batch-wait-ms" in line and ("1,000" in line or "finite" in line), line


def test_a_nan_label_threshold_is_refused_before_any_data_is_prepared(tmp_path, capsys,
                                                                     isolated):
    from pipelines import prepare_data

    out = tmp_path / "data"
    line = _refused(prepare_data, ["--dataset", "synthetic", "--rows", "100", "--output",
                                   str(out), "--label-threshold", "nan"], capsys)
    assert line == "error: --label-threshold must be a finite number, got 'nan'"
    assert not out.exists()
    line = _refused(prepare_data, ["--label-threshold", "6"], capsys)  # no rating is positive
    assert "--label-threshold must be within [--rating-min, --rating-max]" in line


def test_numbers_are_never_booleans_or_fractions_of_integers():
    for overrides, message in [({"epochs": True}, "--epochs expects int, got True"),
                               ({"epochs": "1e-3"}, "--epochs expects int, got '1e-3'"),
                               ({"epochs": "1e400"}, "--epochs must be a finite number"),
                               ({"temperature": False}, "--temperature expects float"),
                               ({"eval_k": [10, True]}, "--eval-k must hold finite numbers"),
                               ({"tower_layers": [64.5]}, "--tower-layers must be a non-empty"),
                               ({"host": True}, "--host expects str, got True")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(overrides=overrides)
    assert load_config(overrides={"epochs": "1e3"}).train.epochs == 1000


def test_a_config_set_in_code_is_checked_the_same_way():
    cfg = load_config()
    cfg.serve.batch_wait_ms = float("nan")
    with pytest.raises(ConfigError, match="--batch-wait-ms must be a finite number, got nan"):
        cfg.validate()
    cfg = load_config()
    cfg.train.epochs = True
    with pytest.raises(ConfigError, match="--epochs expects int, got True"):
        cfg.validate()


@pytest.mark.parametrize("space, message", [
    ('{"history_dropout": {"grid": [0.1, NaN]}}', "--history-dropout must be a finite number"),
    ('{"embedding_lr": {"loguniform": [0.01, Infinity]}}', "loguniform takes two floats"),
    ('{"embedding_lr": {"loguniform": [0, 0.1]}}', "loguniform needs low < high and low > 0"),
    ('{"embedding_dim": {"randint": [true, 64]}}', "randint takes two ints"),
    ('{"embedding_dim": {"randint": [8, 100000]}}', r"--embedding-dim must be in \[1, 8192\]"),
    ('{"embedding_dim": {"uniform": [8, 64]}}', "uniform draws floats"),
    ('{"epochs": {"choice": [10, -1]}}', "--epochs must be positive, got -1"),
])
def test_every_value_a_sweep_may_try_is_checked(space, message):
    with pytest.raises(ConfigError, match=r"--search-space entry \w+: .*" + message):
        load_config(overrides={"search_space": space, "search_alg": "random"})


def test_unknown_settings_given_by_name_are_refused():
    # serve_config.yaml's args reach load_config this way: a typo must not vanish
    with pytest.raises(ConfigError, match="unknown setting 'max_kk'"):
        load_config(overrides={"max_kk": 10})


# --- config files -------------------------------------------------------------------------

def _file(tmp_path: Path, text: str | bytes) -> Path:
    f = tmp_path / "c.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


@pytest.mark.parametrize("text, message", [
    ("train: [1, 2]\n", "section train must be a mapping of settings (name: value), got a "
                        "list: [1, 2]"),
    ("serve: 3\n", "section serve must be a mapping of settings"),
    ("- data\n- train\n", "expected a mapping of sections (data:, train:, ...), got a list"),
    ("", "the file holds no settings (empty, or only comments)"),
    ("# nothing but a comment\n\n", "the file holds no settings"),
    ("train:\n  epochs: [1,\n", "line 3: not valid YAML"),
    ("train: {epochs: 2}\n---\ntrain: {epochs: 3}\n", "line 2: not valid YAML: expected a "
                                                      "single document"),
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
    ("x" * ((1 << 20) + 1), "too large for a config file"),
])
def test_a_bad_config_file_is_one_line_naming_it(text, message, tmp_path, capsys, isolated):
    from pipelines import train

    f = _file(tmp_path, text)
    line = _refused(train, PIPELINES["train"] + ["--config", str(f)], capsys)
    assert line == f"error: --config {f}: {message}" or \
        line.startswith(f"error: --config {f}") and message in line, line


def test_a_value_that_aliases_blow_up_is_refused_in_a_short_line(tmp_path):
    # YAML aliases nest 10 items into 10^9 in a few hundred bytes; its full repr would not end
    laughs = "[&a0 [1,1,1,1,1,1,1,1,1,1], " + ", ".join(
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)) + "]"
    for text in (f"train:\n  eval_k: {laughs}\n", f"tune:\n  search_space: {{x: {laughs}}}\n"):
        with pytest.raises(ConfigError, match="--eval-k must hold finite|--search-space names") \
                as e:
            load_config(str(_file(tmp_path, text)))
        assert len(str(e.value)) < 300 and "\n" not in str(e.value)


def test_an_unsafe_yaml_tag_is_refused_and_nothing_runs(tmp_path, capsys, isolated):
    from pipelines import train

    marker = tmp_path / "ran"
    f = _file(tmp_path, "train:\n  epochs: 2\n  log_every: !!python/object/apply:os.system "
                        f"['touch {marker}']\n")
    line = _refused(train, PIPELINES["train"] + ["--config", str(f)], capsys)
    assert line == (f"error: --config {f} line 3: YAML tag !!python/object/apply:os.system "
                    "refused (a config holds only mappings, lists, text and numbers; nothing "
                    "was run)")
    assert not marker.exists()


@pytest.mark.parametrize("target, message", [
    ("folder", "is a folder, not a YAML file"),
    ("/dev/null", "not a regular file (a device, pipe or socket)"),
    ("missing.yaml", "no such file"),
    ("c.yaml/inside", "no such file"),
])
def test_a_config_path_that_is_not_a_yaml_file_is_named(target, message, tmp_path, capsys,
                                                        isolated):
    from pipelines import serve

    (tmp_path / "folder").mkdir()
    _file(tmp_path, "serve: {port: 8001}\n")
    path = target if target.startswith("/") else str(tmp_path / target)
    line = _refused(serve, ["--model", "m", "--config", path], capsys)
    assert line == f"error: --config {path}: {message}", line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_config_file_is_named(tmp_path):
    f = _file(tmp_path, "train: {epochs: 2}\n")
    f.chmod(0)
    with pytest.raises(ConfigError, match=r"--config .*c\.yaml: cannot be read \(permission "
                                          r"denied\)"):
        load_config(str(f))


def test_an_explicit_empty_mapping_or_section_sets_nothing(tmp_path):
    # `{}` or `train:` with every key commented out is written on purpose: the defaults
    assert load_config(str(_file(tmp_path, "{}\n"))) == load_config()
    assert load_config(str(_file(tmp_path, "train:\n  # epochs: 3\n"))) == load_config()


def test_a_saved_configuration_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match="a saved configuration: expected a mapping"):
        Config.from_dict(["data"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="section model must be a mapping"):
        Config.from_dict({"model": "big"})


def test_a_bad_choice_on_the_command_line_is_one_line_too(capsys):
    from pipelines import train

    with pytest.raises(SystemExit) as e:
        train.main(PIPELINES["train"] + ["--topology", "gpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: argument --topology: invalid choice: 'gpu'")


def test_a_bad_flag_from_a_shell_is_one_line_and_exit_code_2():
    # the real process: python -m, stderr, the exit code; nothing else is imported or started
    proc = subprocess.run([sys.executable, "-m", "pipelines.serve", "--model", "m",
                           "--batch-wait-ms", "1e9"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr == "error: --batch-wait-ms must be in [0, 1,000] ms, got 1000000000.0\n"
