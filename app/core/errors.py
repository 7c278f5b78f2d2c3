"""Every error the project raises on purpose, in one module that imports nothing heavy.

Each prints as one line and exit code 2 at an entry point (:func:`app.core.cli.main`), never as
a traceback. This module imports neither torch nor Ray, so the command line can catch these
without loading the stack.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


class StorageError(RuntimeError):
    """A location could not be resolved or read; the message names it."""


class OutputError(RuntimeError):
    """An output folder cannot be written: another writer holds it, or it holds something
    other than versions of this output."""


class ClusterError(RuntimeError):
    """The Ray cluster could not be reached or joined; the message names the address."""


class DataError(ValueError):
    """The input cannot be prepared; the message says which input and why."""


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete, or not what the reader expects."""


class ResourceError(RuntimeError):
    """The cluster cannot place the requested workers."""


class CheckpointError(RuntimeError):
    """A checkpoint file holds something other than checkpoint data; the message names it."""


class TrainError(RuntimeError):
    """Training could not run or did not finish."""


class ModelError(ValueError):
    """A model folder is missing, incomplete, or does not match what the caller expects."""


# what an entry point reports as one line
KNOWN = (ConfigError, DataError, DatasetError, ModelError, ResourceError, TrainError,
         ClusterError, CheckpointError, OutputError, StorageError)
