"""Typed configuration: one dataclass per concern, one source of defaults.

A YAML file (``--config FILE``) and command-line flags override the defaults, in that order.
Every field is reachable as a flag named after it (``label_threshold`` -> ``--label-threshold``),
so field names are unique across sections. Invalid values raise :class:`ConfigError` naming the
flag, e.g. ``--val-fraction must be in [0, 1), got 1.5``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from app.core.errors import ConfigError  # noqa: F401  (raised here, importable from here)
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
        for section in _sections(self):
            getattr(self, section).validate()
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


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the flag."""
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
                                  f"got {value!r}")
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
            return [int(x) if str(x).strip().lstrip("-").isdigit() else float(x) for x in items]
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() \
                else int(value)
        if base is float:
            return float(value)
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(name)} expects {getattr(base, '__name__', base)}, "
                          f"got {value!r}") from None


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
    hints = {s: typing.get_type_hints(type(getattr(Config(), s))) for s in _sections(Config())}
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
        help_text = f"{f.metadata.get('help', '')} (default: {_default(f)!r})"
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
        if value is not None and name in FIELDS:
            _apply(cfg, name, value, "the command line")
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


def _read_yaml(config_file: str) -> dict[str, Any]:
    from app.core.storage import resolve  # a path or a URI (a sweep's best_config.yaml)

    path = resolve(config_file)
    if not path.is_file():
        raise ConfigError(f"--config {config_file}: no such file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {config_file}: expected a mapping of sections")
    return raw


def _apply_sections(cfg: Config, raw: dict[str, Any], origin: str) -> None:
    """Set every ``section: {name: value}`` of ``raw`` on ``cfg``, refusing unknown ones."""
    hints = {s: typing.get_type_hints(type(getattr(cfg, s))) for s in _sections(cfg)}
    for section, values in raw.items():
        if section not in hints:
            raise ConfigError(f"{origin}: unknown section {section!r} "
                              f"(sections: {', '.join(hints)})")
        for name, value in (values or {}).items():
            if name not in hints[section]:
                renamed = RENAMED.get((section, name))
                raise ConfigError(f"{origin}: unknown setting {section}.{name}"
                                  + (f" (renamed {section}.{renamed})" if renamed else ""))
            _apply(cfg, name, value, origin)


def _apply(cfg: Config, name: str, value: Any, origin: str) -> None:
    if name not in FIELDS:
        raise ConfigError(f"unknown setting {name!r} in {origin}")
    section, _ = FIELDS[name]
    hint = typing.get_type_hints(type(getattr(cfg, section)))[name]
    setattr(getattr(cfg, section), name, _coerce(name, hint, value))


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the config from parsed arguments: the flags :func:`add_arguments` added (an entry
    point's own flags, e.g. ``train --output``, are not settings)."""
    fields = getattr(args, "_config_fields", None)
    given = vars(args)
    overrides = {k: v for k, v in given.items() if fields is None or k in fields}
    return load_config(getattr(args, "config", None), overrides)
