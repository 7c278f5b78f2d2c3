"""Training-side reader of a prepared split: ``StreamingDataset`` partitioning, numpy decoding.

:class:`InteractionStream` is a ``StreamingDataset`` (so it partitions samples across ranks and
shuffles like one) that yields whole batches decoded with numpy instead of one sample at a
time; :mod:`app.train.model` turns such batches into ``KeyedJaggedTensor`` inputs of the towers.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from filelock import FileLock

from app.data.dataset import ItemFeatures, shard_records  # noqa: F401  (ItemFeatures re-exported)
from app.data.mds import INTERACTION_COLUMNS, record_dtype


def _lazy_package(name: str) -> None:
    """Register the package ``name`` without running its ``__init__`` yet: its submodules
    import as usual (the package has its path; ``from package import submodule`` too), and
    the first access to any other of its names runs the ``__init__`` then, on the same module
    object."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        importlib.import_module(name)  # not a plain package: imported as it is
        return
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str) -> Any:  # PEP 562: only names the module does not have
        if attr.startswith("__"):
            raise AttributeError(attr)
        if importlib.util.find_spec(f"{name}.{attr}") is not None:  # a submodule: itself
            return importlib.import_module(f"{name}.{attr}")
        del module.__dict__["__getattr__"]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, attr)

    module.__dict__["__getattr__"] = __getattr__
    sys.modules[name] = module


def streaming_classes() -> tuple[type, type]:
    """mosaicml-streaming's ``StreamingDataset`` and ``Stream``, imported from their own
    modules without the ``__init__`` of ``streaming`` and ``streaming.base``: those import the
    text, vision and multimodal datasets and the data loader, and through them
    ``transformers`` (2.5 s in every process that reads a split: each training worker, the
    driver) for code this project never runs. ``from streaming import MDSWriter`` and the like
    still work afterwards: the first such name runs the package's own ``__init__``."""
    _lazy_package("streaming")
    _lazy_package("streaming.base")
    from streaming.base.dataset import StreamingDataset
    from streaming.base.stream import Stream

    return StreamingDataset, Stream


StreamingDataset, Stream = streaming_classes()


def _streaming_parts(obj: Any, kind: type, depth: int = 0) -> list[Any]:
    """Instances of ``kind`` among ``obj``'s attributes and their streaming-owned attributes
    (a SharedArray's block, a SharedScalar's array, a SharedBarrier's array), 3 levels deep."""
    found: list[Any] = []
    for value in vars(obj).values():
        if isinstance(value, kind):
            found.append(value)
        elif depth < 3 and type(value).__module__.startswith("streaming.") \
                and hasattr(value, "__dict__"):
            found += _streaming_parts(value, kind, depth + 1)
    return found


class InteractionStream(StreamingDataset):
    """A ``StreamingDataset`` over one split that yields decoded batches of this rank's rows.

    Inside Ray Train workers RANK / WORLD_SIZE / LOCAL_RANK are set, so each rank gets its own
    partition; every call of :meth:`iter_batches` is one epoch (shuffled per epoch when
    ``shuffle`` is on, reproducibly from ``shuffle_seed``).
    """

    def __init__(self, split_dir: Optional[str] = None, *, batch_size: int,
                 shuffle: bool = False, shuffle_seed: int = 9176, **kwargs: Any) -> None:
        """One split folder (``split_dir``), or several through ``streams=[Stream(...)]``."""
        super().__init__(local=split_dir, batch_size=batch_size, shuffle=shuffle,
                         shuffle_seed=shuffle_seed, **kwargs)
        self._record = record_dtype(INTERACTION_COLUMNS)
        self._maps: dict[int, np.ndarray] = {}
        self._columns: dict[tuple[int, str], np.ndarray] = {}

    def release(self) -> None:
        """Remove the names of the shared memory blocks and file locks this process created
        for the stream, once every rank is done with it.

        streaming removes them at a normal interpreter exit only; Ray's workers are stopped
        without one, so every run would leave its blocks in /dev/shm and its locks in the
        temp folder (and later runs scan past them for a free prefix). Mappings already open,
        in this process or another rank's, stay valid; only a new open by name would fail.
        """
        from streaming.base.shared.memory import SharedMemory

        created = []
        for block in _streaming_parts(self, SharedMemory):
            created += block.created_shms
            block.created_shms = []  # streaming's own exit handler has nothing left to do
        for shm in created:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        if created:  # this process made the prefix: its locks are its own too
            for path in (self._shared_barrier.filelock_path, self._cache_filelock_path):
                Path(path).unlink(missing_ok=True)

    def _shard_array(self, shard_id: int) -> np.ndarray:
        if shard_id not in self._maps:
            self.prepare_shard(shard_id)  # downloads/decompresses a remote shard if needed
            shard = self.shards[shard_id]
            path = os.path.join(shard.dirname, shard.split, shard.raw_data.basename)
            self._maps[shard_id] = shard_records(path, list(shard.column_names),
                                                 list(shard.column_encodings))
        return self._maps[shard_id]

    def epoch_sample_ids(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's sample ids of an epoch, in iteration order.

        Args:
            epoch: which epoch (its shuffle is a function of the seed and the epoch, so a
                resumed run sees the same order); None: the next one, advancing the counter.
        """
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        if epoch is None:
            epoch, sample_in_epoch = self._resume_incr_epoch()
        else:
            # streaming's own start-of-epoch path without its shared-memory epoch counter:
            # fixes num_canonical_nodes (physical nodes) and the shuffle block size
            if not hasattr(self._shared_barrier, "lock"):
                self._shared_barrier.lock = FileLock(self._shared_barrier.filelock_path)
            epoch, sample_in_epoch = self._resume(self._parallel_worker_world, epoch)
        ids = self._get_work(epoch, sample_in_epoch)
        return ids[ids >= 0]

    def _shard_column(self, shard_id: int, name: str) -> np.ndarray:
        """One column of a shard as a contiguous array (decoded once, then kept)."""
        key = (shard_id, name)
        if key not in self._columns:
            self._columns[key] = np.ascontiguousarray(self._shard_array(shard_id)[name])
        return self._columns[key]

    def gather(self, sample_ids: np.ndarray,
               columns: Optional[tuple[str, ...]] = None) -> dict[str, np.ndarray]:
        """Decode the given global sample ids (any order, any shards) as numpy columns.

        Args:
            sample_ids: global sample ids.
            columns: which columns (default: all). Each is kept contiguous per shard, so a
                batch reads only the bytes of the columns asked for.
        """
        names = columns or self._record.names
        shard_of = np.searchsorted(self.sample_offset_per_shard, sample_ids, side="right") - 1
        local = sample_ids - self.sample_offset_per_shard[shard_of]
        out = {n: np.empty(len(sample_ids), self._record[n]) for n in names}
        shards = np.unique(shard_of)
        for shard_id in shards:
            where = None if len(shards) == 1 else np.flatnonzero(shard_of == shard_id)
            rows = local if where is None else local[where]
            for n in names:
                col = self._shard_column(int(shard_id), n)
                if where is None:
                    out[n] = col[rows]
                else:
                    out[n][where] = col[rows]
        return out

    def iter_batches(self, batch_size: Optional[int] = None, *,
                     drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of this rank's rows in batches of numpy columns.

        Args:
            batch_size: rows per batch (default: the dataset's ``batch_size``).
            drop_last: drop a final batch smaller than ``batch_size``.
        """
        size = batch_size or self.batch_size
        ids = self.epoch_sample_ids()
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            if drop_last and len(chunk) < size:
                break
            yield self.gather(chunk)
