"""Reading training checkpoints without running code from storage.

A ``torch.distributed.checkpoint`` (DCP) folder holds ``.metadata`` (a pickle) and ``*.distcp``
shards (tensors, plus ``torch.save`` blobs for non-tensor values). PyTorch's reader unpickles
``.metadata`` with plain ``pickle`` and its planner loads the blobs with
``torch.load(weights_only=False)``: whoever can write to the checkpoint storage (a shared
folder, a bucket) could run code on the driver and every worker. Here ``.metadata`` goes
through an unpickler that resolves only the globals DCP's metadata uses, and the blobs through
``torch.load(weights_only=True)``; a file holding anything else is refused with
:class:`CheckpointError` naming it, before any of its objects is built.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)

from app.core.contracts import Contract
from app.core.errors import CheckpointError  # noqa: F401  (raised here, importable from here)
from app.core.storage import Location, resolve

# the globals a DCP .metadata pickle refers to; nothing else is resolved
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
        "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _AllowListUnpickler(pickle.Unpickler):
    """Python's "restricting globals" unpickler: a global outside the allow-list (and torch's
    dtype / layout / memory-format constants) is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which checkpoint "
                                     f"metadata never does")


def safe_load(stream: Any, name: str) -> Any:
    """Unpickle checkpoint metadata from ``stream``, resolving only the globals DCP's metadata
    uses.

    Raises:
        CheckpointError: the stream refers to any other global (a ``__reduce__`` payload, a
            class, a function) or is not a pickle; nothing of it ran.
    """
    try:
        return _AllowListUnpickler(stream).load()
    except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, EOFError,
            IndexError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{name}: refused to load: not checkpoint metadata that loads "
                              f"without running code ({reason[:200]})") from None


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through :func:`safe_load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = safe_load(f, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_blob(value: io.BytesIO, fqn: str) -> Any:
    try:
        return torch.load(value, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint entry {fqn}: refused to load: not plain data "
                              f"({str(e).strip().splitlines()[0][:200]})") from None


def _safe_load_bytes(planner: Any, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    obj = _load_blob(value, fqn)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[fqn], obj)
    else:
        planner.state_dict[fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor values load with ``weights_only=True``."""

    load_bytes = _safe_load_bytes


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
    """The planner of a whole-checkpoint load (no target state dict), made safe likewise."""

    load_bytes = _safe_load_bytes


def is_complete(checkpoint_dir: Any) -> bool:
    """True when every shard file the checkpoint's metadata names is there, whole (every
    rank's upload finished: a run stopped mid-report can leave a folder with some ranks'
    files only). ``checkpoint_dir``: a path, URI or :class:`~app.core.storage.Location`."""
    from app.core.storage import resolve

    root = resolve(checkpoint_dir)
    try:
        metadata = safe_load(io.BytesIO(root.join(".metadata").read_bytes()),
                             f"{root}/.metadata")
    except (OSError, CheckpointError):
        return False
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        need[name] = max(need.get(name, 0), int(info.offset) + int(info.length))
    sizes = dict(root.files())
    return all(sizes.get(name, -1) >= size for name, size in need.items())


def check_metadata(checkpoint_dir: str | Path) -> None:
    """Read a checkpoint's metadata safely first, so that a refusal surfaces as one
    :class:`CheckpointError` (DCP would wrap it in a multi-rank traceback)."""
    SafeReader(str(checkpoint_dir)).read_metadata()


def load_sharded(state_dict: dict[str, Any], checkpoint_dir: str | Path) -> None:
    """``dcp.load`` into ``state_dict`` (in place, collectively), safely."""
    import torch.distributed.checkpoint as dcp

    check_metadata(checkpoint_dir)
    dcp.load(state_dict, storage_reader=SafeReader(str(checkpoint_dir)),
             planner=SafeLoadPlanner())


def load_full(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Every tensor and value of a sharded checkpoint, whole, in this one process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    check_metadata(checkpoint_dir)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeReader(str(checkpoint_dir)),
                     planner=_SafeEmptyPlanner(), no_dist=True)
    return state


# ---------------------------------------------------------------- the training state

STATE_FILE = "state.json"


@dataclass
class CheckpointState(Contract):
    """``state.json`` of a training checkpoint (rank 0 writes it beside the shards): where the
    run is and what it has seen. A resumed run continues from it."""

    FILE = STATE_FILE
    SCHEMA_VERSION = 1
    Error = CheckpointError
    REDO = "; train again without --resume"

    schema_version: int = 1
    epoch: int = 0                                # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    resumed_at_epochs: list[int] = field(default_factory=list)   # epochs a restart resumed at
    best_epoch: int = 0                           # the epoch to export
    best_value: Optional[float] = None            # its validation metric (early stopping)
    stopped_early: bool = False

    def improved(self, value: float, min_improvement: float = 0.0) -> bool:
        """True when ``value`` beats the best validation value so far by more than
        ``min_improvement`` times it."""
        return self.best_value is None or value > self.best_value * (1 + min_improvement)


def epoch_of(checkpoint: Any) -> int:
    """The epoch a checkpoint (a folder or a Ray Train ``Checkpoint``) was written after."""
    if isinstance(checkpoint, Location):
        return CheckpointState.read(checkpoint).epoch
    with checkpoint.as_directory() as d:
        return CheckpointState.read(d).epoch


def complete_checkpoints(run_dir: Any) -> dict[int, Location]:
    """Epoch -> checkpoint folder, for the complete ones under a Ray Train run folder (a path
    or URI): rank 0's state file and every shard file the metadata names."""
    root = resolve(run_dir)
    found = {}
    for name in root.children():
        folder = root.join(name)
        if not name.startswith("checkpoint_") or not folder.is_dir() \
                or not is_complete(folder):
            continue
        if not CheckpointState.path(folder).is_file():
            continue  # rank 0's files not there: incomplete
        found[CheckpointState.read(folder).epoch] = folder
    return found


def checkpoint_of_epoch(run_dir: Any, epoch: int) -> Optional[Location]:
    """The complete checkpoint written after ``epoch`` under a Ray Train run folder, or None."""
    return complete_checkpoints(run_dir).get(epoch)


def latest_checkpoint(run_dir: Any) -> Optional[Location]:
    """The complete checkpoint with the most epochs under a Ray Train run folder, or None."""
    found = complete_checkpoints(run_dir)
    return found[max(found)] if found else None
