"""Typed contracts: the small JSON files one stage writes and the next reads.

Each contract is a dataclass with a schema version, :meth:`Contract.read` and
:meth:`Contract.write` on a folder given as a path or URI (:mod:`app.core.storage`), and one error
naming the file and what is wrong. The contracts live with their owners:

- :class:`app.data.dataset.Manifest` (``manifest.json`` of a prepared dataset, written last by
  ``prepare``);
- :class:`app.train.export.ModelInfo` (``model.json`` of a model folder);
- :class:`app.serve.batch.RecommendationsSummary` (``_summary.json`` of batch inference's output).

A reader gets attributes (``manifest.vocab["users"]``) instead of string keys, a file of
another schema version is refused with what to do, and a writer cannot leave out a field.
"""

import dataclasses
import json
import os
from typing import Any, ClassVar, TypeVar, Union

from app.core.storage import Location, resolve

C = TypeVar("C", bound="Contract")


class Contract:
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
            Error: not an object, another schema version, or required fields missing.
        """
        where = where or cls.FILE
        if not isinstance(data, dict):
            raise cls.Error(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != cls.SCHEMA_VERSION:
            raise cls.Error(f"{where}: schema version {version}, this code reads version "
                            f"{cls.SCHEMA_VERSION}{cls.REDO}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        if missing:
            raise cls.Error(f"{where}: lacks {', '.join(missing)}")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

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
