"""Typed configuration: one dataclass per concern, one source of defaults.

A YAML file (``--config FILE``) and command-line flags override the defaults, in that order.
Every field is reachable as a flag named after it (``label_threshold`` -> ``--label-threshold``),
so field names are unique across sections. Invalid values raise :class:`ConfigError` naming the
flag, e.g. ``--val-fraction must be in [0, 1), got 1.5``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from app.core.errors import ConfigError  # noqa: F401  (raised here, importable from here)
from app.core.errors import StorageError
from app.core.sections import (  # noqa: F401  (the sections are importable from here)
    DATASETS,
    DEFAULT_SEARCH_SPACE,
    LFS_URL,
    SAMPLERS,
    WORKDIR_ENV,
    ClusterConfig,
    DataConfig,
    InferenceConfig,
    ModelConfig,
    ServeConfig,
    TrainConfig,
    TuneConfig,
    _check,
    _epoch_seconds,
    brief,
    flag,
)


@dataclass
class Config:
    """The whole configuration; each section is one concern."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> "Config":
        """Every value of its field's type (a value set in code never met :func:`_coerce`),
        then each section's checks, then the values a sweep may try; returns ``self``."""
        for section in _sections(self):
            values = getattr(self, section)
            for name, hint in _hints(type(values)).items():
                _coerce(name, hint, getattr(values, name))
            values.validate()
        _check_search_space(self)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any],
                  overrides: Optional[dict[str, Any]] = None) -> "Config":
        """The inverse of :meth:`to_dict` (section -> field -> value), then ``overrides``
        (field name -> value); checked and validated."""
        return config_from_dict(data, overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def shown(self) -> dict[str, Any]:
        """:meth:`to_dict` with URI credentials masked (see :mod:`app.core.redact`): what is printed
        or saved, never what the process uses."""
        from app.core.redact import redact_values

        return redact_values(self.to_dict())

    def credentials(self) -> dict[str, str]:
        """Field name -> value of the settings that hold a URI credential (masked by
        :meth:`shown`): what a config loaded back from a saved file must be given again."""
        from app.core.redact import redact

        return {name: value for values in self.to_dict().values()
                for name, value in values.items()
                if isinstance(value, str) and redact(value) != value}

    def dump_yaml(self, path: Any) -> None:
        """Save the config (credentials masked: they come from the environment, see
        :meth:`shown`) to a path or URI (:mod:`app.core.storage`); :func:`load_config` reads it
        back."""
        from app.core.storage import resolve

        resolve(path).write_text(yaml.safe_dump(self.shown(), sort_keys=False))

    def describe(self, everything: bool = False) -> str:
        """The settings that differ from the defaults, ``section.field = value`` several to a
        line (``everything``: every setting, one per line); credentials masked."""
        defaults = Config().shown()
        items = [f"{section}.{name} = {json.dumps(value)}"
                 for section, values in self.shown().items() for name, value in values.items()
                 if everything or value != defaults[section][name]]
        if everything:
            return "\n".join(["config:"] + [f"  {item}" for item in items])
        if not items:
            return "config: the defaults"
        lines, line = [], "config (differences from the defaults):"
        for item in items:
            if len(line) + len(item) > 100:
                lines.append(line.rstrip(","))
                line = " "
            line += f" {item},"
        return "\n".join(lines + [line.rstrip(",")])


def _sections(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Field name -> (section, field), checking that names are unique across sections."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            if f.name in index:
                raise RuntimeError(f"config field {f.name} is defined in two sections")
            index[f.name] = (section.name, f)
    return index


FIELDS = _field_index()
# settings a tuning trial may vary



def _base_type(tp: Any) -> Any:
    """Strip Optional[...] from a field type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


@functools.lru_cache(maxsize=None)
def _hints(section_type: type) -> dict[str, Any]:
    """Field name -> type of a section (resolved once: validation runs per trial too)."""
    return typing.get_type_hints(section_type)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the flag.

    Numbers are finite and never booleans (YAML ``true`` is not 1, ``nan`` compares false with
    every bound); a text setting is never a YAML list, mapping or boolean (``host: yes``).
    """
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    base = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none")):
        if optional:
            return None
        raise ConfigError(f"{flag(name)} must not be empty")
    try:
        if typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}, "
                                  f"got {brief(value)}")
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is dict:
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, dict):
                raise ValueError(value)
            return parsed
        if base is list:
            items = value if isinstance(value, list) else str(value).split(",")
            try:
                return [_number(name, int if _integral(x) else float, x) for x in items]
            except (TypeError, ValueError, OverflowError):  # ConfigError too
                raise ConfigError(f"{flag(name)} must hold finite numbers, "
                                  f"got {brief(value)}") from None
        if base in (int, float):
            return _number(name, base, value)
        if isinstance(value, (bool, list, dict)):
            raise ValueError(value)
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{flag(name)} expects {getattr(base, '__name__', base)}, "
                          f"got {brief(value)}") from None


def _integral(value: Any) -> bool:
    """A list item written as an integer (``64``, ``"64"``): kept an int, others are floats."""
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or str(value).strip().lstrip("+-").isdigit()


def _number(name: str, base: type, value: Any) -> int | float:
    """``value`` as an int or float setting: a number or its text, finite, never a boolean.

    Raises:
        ValueError: not a number of that type (the caller names the flag).
        ConfigError: naming the flag, for nan and infinities (``1e400`` is one too).
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(value)
    if isinstance(value, numbers.Integral):  # numpy's too: a sweep's randint draws them
        return int(value) if base is int else float(value)
    if base is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{flag(name)} must be a finite number, got {brief(value)}")
    if base is int:
        if not number.is_integer():  # 1e-3 is not an integer; 1e9 is
            raise ValueError(value)
        return int(number)
    return number


def _check_search_space(cfg: Config) -> None:
    """Every value a sweep may give a setting is valid for it: each choice and grid point, and
    both ends of a range (a trial would otherwise fail only once the sweep runs).

    Raises:
        ConfigError: ``--search-space entry NAME: ...``, with the setting's own message.
    """
    for name, spec in cfg.tune.search_space.items():
        kind, args = next(iter(spec.items()))
        try:
            _check_sweep_values(cfg, name, kind, args)
        except ConfigError as e:
            raise ConfigError(f"{flag('search_space')} entry {name}: {e}") from None


def _check_sweep_values(cfg: Config, name: str, kind: str, args: list) -> None:
    """One entry of the search space (its shape is checked by :meth:`TuneConfig.validate`)."""
    section = getattr(cfg, FIELDS[name][0])
    hint = _hints(type(section))[name]
    if kind in ("uniform", "loguniform", "randint"):
        want = int if kind == "randint" else float
        if _base_type(hint) is not want:
            raise ConfigError(f"{kind} draws {want.__name__}s, but {flag(name)} is not a "
                              f"{want.__name__} setting (use choice)")
        try:
            low, high = (_number(name, want, x) for x in args)
        except (ValueError, OverflowError):
            raise ConfigError(f"{kind} takes two {want.__name__}s [low, high], "
                              f"got {brief(args)}") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"{kind} needs low < high" + (" and low > 0" if kind ==
                              "loguniform" else "") + f", got {brief(args)}")
        args = [low, high - 1 if kind == "randint" else high]  # randint draws from [low, high)
    for value in args:
        trial = dataclasses.replace(section)
        setattr(trial, name, _coerce(name, hint, value))
        trial.validate()


SECTION_TITLES = {"data": "data preparation", "model": "model", "train": "training",
                  "tune": "hyperparameter sweeps", "inference": "batch inference",
                  "serve": "real-time serving", "cluster": "Ray and MLflow"}
# settings that were renamed: (section, old name) -> new name
RENAMED = {("train", "top_k"): "eval_k", ("inference", "recommend_k"): "top_k"}


def add_arguments(parser: argparse.ArgumentParser, sections: Optional[list[str]] = None) -> None:
    """Add ``--config`` and one flag per config field (of the given sections, default all),
    grouped by section; enumerated settings list their choices and are checked at parse time.
    :func:`config_from_args` applies only the flags added here."""
    parser.add_argument("--config", help="YAML file whose values override the defaults")
    hints = {s: _hints(type(getattr(Config(), s))) for s in _sections(Config())}
    groups: dict[str, Any] = {}
    added = []
    for name, (section, f) in FIELDS.items():
        if sections is not None and section not in sections:
            continue
        if section not in groups:
            doc = (type(getattr(Config(), section)).__doc__ or "").strip().splitlines()[0]
            groups[section] = parser.add_argument_group(
                f"{SECTION_TITLES.get(section, section)} [{section}]", doc)
        group = groups[section]
        base = _base_type(hints[section][name])
        # argparse formats help with %: a literal one (a share, "10%") must be doubled
        help_text = f"{f.metadata.get('help', '')} (default: {_default(f)!r})".replace("%", "%%")
        added.append(name)
        if base is bool:
            group.add_argument(flag(name), dest=name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(base) is Literal:
            group.add_argument(flag(name), dest=name, default=None,
                               choices=typing.get_args(base), help=help_text)
        else:
            group.add_argument(flag(name), dest=name, default=None, help=help_text)
    parser.set_defaults(_config_fields=tuple(added))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def load_config(config_file: Optional[str] = None,
                overrides: Optional[dict[str, Any]] = None) -> Config:
    """Defaults, then the YAML file, then the overrides (field name -> value), validated.

    Args:
        config_file: optional YAML file with a mapping per section (``data: {split: temporal}``).
        overrides: field name -> value, as from the command line; None values are ignored.

    Returns:
        The validated configuration.
    """
    cfg = Config()
    if os.environ.get(WORKDIR_ENV):  # a cluster's default (cluster.yaml exports it on its nodes)
        cfg.cluster.workdir = os.environ[WORKDIR_ENV]
    if config_file:
        _apply_sections(cfg, _read_yaml(config_file), f"--config {config_file}")
    for name, value in (overrides or {}).items():
        if value is not None:
            _apply(cfg, name, value, "the overrides")
    return cfg.validate()


def config_from_dict(data: dict[str, Any], overrides: Optional[dict[str, Any]] = None,
                     origin: str = "a saved configuration") -> Config:
    """The configuration of :meth:`Config.to_dict`'s nested form (section -> field -> value)
    over the defaults, checked as a YAML file is, then ``overrides`` (field name -> value, e.g.
    a trial's settings); validated."""
    cfg = Config()
    _apply_sections(cfg, data, origin)
    for name, value in (overrides or {}).items():
        _apply(cfg, name, value, "the overrides")
    return cfg.validate()


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB; anything near this is another file
# a YAML tag in a parse error: 'tag:yaml.org,2002:python/object/apply:os.system' or '!foo'
_TAG = re.compile(r"tag '([^']*)'")


def _read_yaml(config_file: str) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (a path or URI: a sweep's
    best_config.yaml may be on an object store).

    An empty file (or one with only comments) is refused: it is more often the wrong file or a
    truncated copy than a wish for the defaults, which running without ``--config`` gives.

    Raises:
        ConfigError: one line naming the path and what is wrong with it.
    """
    where = f"--config {config_file}"
    raw = _parse_yaml(_read_config_text(config_file, where), where)
    if raw is None:
        raise ConfigError(f"{where}: the file holds no settings (empty, or only comments); "
                          f"leave out --config to run with the defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (data:, train:, ...), "
                          f"got a {type(raw).__name__}: {brief(raw)}")
    return raw


def _read_config_text(config_file: str, where: str) -> str:
    """The text of a config file, refusing what is not a small readable UTF-8 file: a folder,
    a device (``/dev/null``, ``/dev/zero`` would never end) or a pipe, a huge file."""
    from pyarrow.fs import FileType

    from app.core.storage import resolve

    try:
        path = resolve(config_file)
        info = path.info()
        if info.type == FileType.NotFound:
            raise ConfigError(f"{where}: no such file")
        if info.type == FileType.Directory:
            raise ConfigError(f"{where}: is a folder, not a YAML file")
        if info.type != FileType.File:
            raise ConfigError(f"{where}: not a regular file (a device, pipe or socket)")
        if info.size is not None and info.size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: {info.size:,} bytes, too large for a config file "
                              f"(at most {MAX_CONFIG_BYTES:,})")
        return path.read_bytes().decode("utf-8")
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text (a binary file?)") from None
    except (OSError, StorageError) as e:  # permissions, an unreachable object store
        reason = "permission denied" if isinstance(e, PermissionError) or \
            "permission denied" in str(e).lower() else " ".join(str(e).split())[:160]
        raise ConfigError(f"{where}: cannot be read ({reason})") from None


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load``, its errors as one line with the line number. A tag such as
    ``!!python/object/apply`` is refused by the safe loader before anything is built."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        tag = _TAG.search(problem) if isinstance(e, yaml.constructor.ConstructorError) else None
        if tag:
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"{where}{at}: YAML tag {name} refused (a config holds only "
                              f"mappings, lists, text and numbers; nothing was run)") from None
        context = " ".join(str(getattr(e, "context", None) or "").split())
        raise ConfigError(f"{where}{at}: not valid YAML: "
                          + (f"{context}: " if context else "") + problem) from None


def _apply_sections(cfg: Config, raw: Any, origin: str) -> None:
    """Set every ``section: {name: value}`` of ``raw`` on ``cfg``, refusing unknown ones and
    sections that are not mappings (an empty section, ``train:``, sets nothing)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {brief(raw)}")
    hints = {s: _hints(type(getattr(cfg, s))) for s in _sections(cfg)}
    for section, values in raw.items():
        if section not in hints:
            raise ConfigError(f"{origin}: unknown section {section!r} "
                              f"(sections: {', '.join(hints)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section} must be a mapping of settings "
                              f"(name: value), got a {type(values).__name__}: {brief(values)}")
        for name, value in values.items():
            if name not in hints[section]:
                renamed = RENAMED.get((section, name))
                raise ConfigError(f"{origin}: unknown setting {section}.{name}"
                                  + (f" (renamed {section}.{renamed})" if renamed else ""))
            _apply(cfg, name, value, origin)


def _apply(cfg: Config, name: str, value: Any, origin: str) -> None:
    if name not in FIELDS:
        raise ConfigError(f"unknown setting {name!r} in {origin}")
    section, _ = FIELDS[name]
    hint = _hints(type(getattr(cfg, section)))[name]
    setattr(getattr(cfg, section), name, _coerce(name, hint, value))


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the config from parsed arguments: the flags :func:`add_arguments` added (an entry
    point's own flags, e.g. ``train --output``, are not settings)."""
    fields = getattr(args, "_config_fields", None)
    given = vars(args)
    overrides = {k: v for k, v in given.items() if k in (FIELDS if fields is None else fields)}
    return load_config(getattr(args, "config", None), overrides)
