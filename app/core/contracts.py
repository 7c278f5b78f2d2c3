"""Typed contracts: the small JSON files one stage writes and the next reads.

Each contract is a dataclass with a schema version, :meth:`Contract.read` and
:meth:`Contract.write` on a folder given as a path or URI (:mod:`app.core.storage`), and one error
naming the file and what is wrong. The contracts live with their owners:

- :class:`app.data.dataset.Manifest` (``manifest.json`` of a prepared dataset, written last by
  ``prepare``);
- :class:`app.train.model_folder.ModelInfo` (``model.json`` of a model folder);
- :class:`app.serve.batch.RecommendationsSummary` (``_summary.json`` of batch inference's output).

A contract's nested objects are :class:`Part` dataclasses (``Manifest.counts``, a
:class:`app.data.dataset.Counts`), parsed by their type hints: a reader gets attributes
(``manifest.counts.splits["train"]``, ``manifest.vocab.users``) instead of string keys, a file
of another schema version is refused with what to do, and a writer cannot leave out a field at
any depth. The JSON is the same as the dicts the parts replace: their fields in order.
"""

import dataclasses
import functools
import json
import os
import typing
from typing import Any, ClassVar, TypeVar, Union

from app.core.storage import Location, resolve

C = TypeVar("C", bound="Contract")
P = TypeVar("P", bound="Part")


class Part:
    """Base of the dataclasses nested in a contract: one JSON object each, its fields in order."""

    def to_dict(self) -> dict[str, Any]:
        """The part as plain JSON values (nested parts as dicts), fields in declaration order."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@functools.cache
def _part_fields(cls: type) -> dict[str, type]:
    """The fields of a dataclass whose type is itself a :class:`Part`, by name (read from
    the type hints, which ``from __future__ import annotations`` leaves as text)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is None  # not dict[...], Optional[...]
            and isinstance(hints[f.name], type) and issubclass(hints[f.name], Part)}


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _missing(cls: type, data: dict[str, Any], prefix: str = "") -> list[str]:
    """Required fields ``data`` lacks at any depth, as dotted names (``counts.splits``)."""
    missing = [prefix + f.name for f in dataclasses.fields(cls)
               if f.name not in data and _required(f)]
    for name, part in _part_fields(cls).items():
        if isinstance(data.get(name), dict):
            missing += _missing(part, data[name], f"{prefix}{name}.")
    return missing


def _build(cls: type[P], data: dict[str, Any], where: str, error: type[Exception],
           prefix: str = "") -> P:
    """An instance of the dataclass ``cls`` from a checked JSON object: nested parts built
    from theirs, keys the class does not know dropped."""
    parts = _part_fields(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name in parts:
            if not isinstance(value, dict):
                raise error(f"{where}: {prefix}{f.name}: expected a JSON object, got "
                            f"{type(value).__name__}")
            value = _build(parts[f.name], value, where, error, f"{prefix}{f.name}.")
        values[f.name] = value
    return cls(**values)


class Contract(Part):
    """Base of the contract dataclasses (each declares ``schema_version`` first)."""

    FILE: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int]
    Error: ClassVar[type[Exception]] = ValueError
    # what to do about a file of another schema version
    REDO: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[C], data: Any, where: str = "") -> C:
        """The contract of parsed JSON, checked.

        Raises:
            Error: not an object, another schema version, or required fields missing (named
                with their path: ``counts.splits``).
        """
        where = where or cls.FILE
        if not isinstance(data, dict):
            raise cls.Error(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != cls.SCHEMA_VERSION:
            raise cls.Error(f"{where}: schema version {version}, this code reads version "
                            f"{cls.SCHEMA_VERSION}{cls.REDO}")
        missing = _missing(cls, data)
        if missing:
            raise cls.Error(f"{where}: lacks {', '.join(missing)}")
        return _build(cls, data, where, cls.Error)

    @classmethod
    def path(cls, folder: Union[str, os.PathLike, Location]) -> Location:
        return (folder if isinstance(folder, Location) else resolve(folder)).join(cls.FILE)

    @classmethod
    def read(cls: type[C], folder: Union[str, os.PathLike, Location]) -> C:
        """The contract file of ``folder`` (a path or URI), parsed and checked.

        Raises:
            Error: the file is missing, is not JSON, or breaks the contract.
        """
        loc = cls.path(folder)
        if not loc.is_file():
            raise cls.Error(cls.missing(str(folder)))
        try:
            data = json.loads(loc.read_text())
        except json.JSONDecodeError as e:
            raise cls.Error(f"{loc}: not JSON ({e})") from None
        return cls.from_dict(data, str(loc))

    @classmethod
    def missing(cls, folder: str) -> str:
        """The message for a folder without the file."""
        return f"{folder}: no {cls.FILE}"

    def write(self, folder: Union[str, os.PathLike, Location]) -> None:
        """Write the file into ``folder`` (a path or URI); local writes are atomic."""
        self.path(folder).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
