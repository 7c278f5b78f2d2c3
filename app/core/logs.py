"""Console output, set up in one place for the driver and every Ray worker.

Three levels, chosen by the entry points' ``--quiet`` / ``--verbose``:

- ``quiet``: errors and the final report only;
- ``normal`` (default): the project's own lines (``[prepare]``, ``[train]``, ``[refit]``,
  ``[tune]``, ``[infer]`` ...) and the report; Ray Data shows a progress bar per dataset on a
  terminal and nothing on a pipe;
- ``verbose``: everything Ray, Ray Data, Ray Train, TorchRec and MLflow print.

Workers run :func:`worker_setup` (Ray's ``worker_process_setup_hook``, see
:func:`runtime_env`). What the default level hides is not lost: every Ray worker's output,
Ray Data's and Ray Train's logs stay in the session's log folder
(``<ray temp dir>/session_latest/logs``, printed by :func:`log_dir`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import warnings
from typing import Any, Iterator, Literal

from app.core.redact import redact

Level = Literal["quiet", "normal", "verbose"]
LEVEL_ENV = "TWOTOWER_LOG_LEVEL"
# a worker line that is the project's: "[train] epoch 3: ..."
PROJECT_LINE = re.compile(r"^\[(prepare|train|refit|tune|infer|sweep)[\] ]")

# third-party loggers that speak at INFO/WARNING about their own internals
_NOISY_LOGGERS = ("mlflow", "alembic", "torchrec", "torch.fx", "torch.distributed",
                  "fbgemm_gpu", "streaming", "ray.train", "ray.tune", "ray.data", "filelock",
                  "urllib3", "py.warnings",
                  # "token authentication is enabled": Ray's default, stated in the README
                  "ray._private.authentication")


def level() -> Level:
    value = os.environ.get(LEVEL_ENV, "normal")
    return value if value in ("quiet", "normal", "verbose") else "normal"  # type: ignore


def say(stage: str, message: str) -> None:
    """Print one of the project's progress lines, ``[stage] message`` (not at ``quiet``)."""
    if level() != "quiet":
        print(f"[{stage}] {redact(message)}", flush=True)


def _filter_warnings() -> None:
    """Warnings of the stack about its own deprecations and internals, by category and
    module (the project's own code is not filtered)."""
    for category, module in ((FutureWarning, r"torchrec\."), (UserWarning, r"torchrec\."),
                             (DeprecationWarning, r"torchrec\."), (UserWarning, r"fbgemm_gpu"),
                             (UserWarning, r"torch\.autograd"), (FutureWarning, r"torch\."),
                             (UserWarning, r"torch\.distributed"), (UserWarning, r"mlflow"),
                             (FutureWarning, r"mlflow"), (DeprecationWarning, r"mlflow"),
                             (UserWarning, r"streaming"), (DeprecationWarning, r"streaming"),
                             (UserWarning, r"pydantic"), (DeprecationWarning, r"ray\."),
                             (FutureWarning, r"ray\."), (RuntimeWarning, r"ray\."),
                             (UserWarning, r"ray\."), (DeprecationWarning, r"pkg_resources"),
                             (UserWarning, r"optuna"), (FutureWarning, r"optuna"),
                             (UserWarning, r"pandas"), (FutureWarning, r"pandas")):
        warnings.filterwarnings("ignore", category=category, module=module)
    # emitted from torch's C++ side, attributed to whatever Python line called in
    warnings.filterwarnings("ignore", message=r".*autograd kernel was not registered",
                            category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated")
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated")


def quiet_third_party(lvl: Level) -> None:
    """Filter third-party warnings and INFO chatter in this process (not at ``verbose``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if lvl == "verbose":
        return
    # MLflow sets its loggers' level on every import from this variable (INFO when unset): a
    # process that imports it later (a Ray worker, the Serve replica) stays quiet too
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    _filter_warnings()
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch's own "W" lines (e.g. torch.fx's is_fx_tracing notice) go through its logging
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: the same filters in every worker process."""
    quiet_third_party(level())


def runtime_env(lvl: Level) -> dict[str, Any]:
    """The job-level runtime environment every Ray worker of this process starts with.

    The hook runs before a worker can import the project (Ray puts the driver's code paths
    on a worker's ``sys.path`` later), so it travels by value: this module needs nothing but
    the standard library."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = {LEVEL_ENV: lvl, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if lvl != "verbose":
        env["MLFLOW_LOGGING_LEVEL"] = os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING")
    return {"worker_process_setup_hook": worker_setup, "env_vars": env}


def setup(lvl: Level) -> None:
    """Set up the driver's output (call before Ray starts); workers follow through
    :func:`runtime_env`."""
    os.environ[LEVEL_ENV] = lvl
    quiet_third_party(lvl)


def after_ray_init() -> None:
    """Once connected: Ray Data progress bars only on a terminal, and worker output
    filtered down to the project's lines (all of it stays in Ray's log files)."""
    import ray

    lvl = level()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = lvl != "quiet" and sys.stderr.isatty()
    if lvl == "verbose":
        return
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False  # one bar per dataset
    data_logger = logging.getLogger("ray.data")
    for handler in data_logger.handlers:
        if not hasattr(handler, "_get_log_directory"):  # the console, not the session file
            handler.setLevel(logging.ERROR)
    _filter_worker_output()


def _filter_worker_output() -> None:
    """Replace Ray's printer of worker stdout/stderr on the driver by one that passes the
    project's lines only (``[train] epoch ...``), without Ray's ``(pid=...)`` prefix."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: keep its default printer
        return
    quiet = level() == "quiet"

    def project_lines(data: dict[str, Any]) -> None:
        if data.get("is_err") or quiet:
            return
        for line in data.get("lines", ()):
            if PROJECT_LINE.match(line):
                print(line, flush=True)

    try:
        dispatcher.remove_handler("ray_print_logs")
    except (KeyError, ValueError):
        return  # log_to_driver=False: nothing is printed anyway
    dispatcher.add_handler("ray_print_logs", project_lines)


# a notice of Ray's C++ core in this process: "[2026-11-30 01:55:23,476 E 2949 2949] x.cc:12: "
_NATIVE_NOTICE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWE] \d+ \d+\] "
                            rb"[\w./-]+\.(cc|h):\d+: ")


@contextlib.contextmanager
def native_notices_filtered() -> Iterator[None]:
    """While the block runs, drop the notices Ray's C++ core writes straight to this process's
    stderr (e.g. that an actor has constructor arguments in the object store, on every Ray
    Data actor pool); they stay in Ray's log files. Every other byte of stderr passes through.
    Nothing is filtered at ``verbose``."""
    if level() == "verbose":
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    real = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not _NATIVE_NOTICE.match(line):
                    os.write(real, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer is gone: the pump drains it and ends
        thread.join(timeout=10)
        os.close(real)


def log_dir() -> str:
    """Where this session's Ray logs are (worker output, Ray Data, Ray Train)."""
    try:
        import ray

        node = ray._private.worker._global_node
        if node is not None:
            return os.path.join(node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 (only a hint in a message)
        pass
    return "<ray temp dir>/session_latest/logs"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread so that every stage unwinds
    (workers stopped, partial outputs removed, the MLflow run marked killed). A
    ``KeyboardInterrupt``, which is what Ray's blocking calls expect (they re-raise a plain
    one: :func:`received_signal` says which signal it was)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def received_signal() -> int:
    """The first SIGINT / SIGTERM this process received (SIGINT when none was recorded: a
    KeyboardInterrupt from elsewhere)."""
    return _received[0] if _received else int(signal.SIGINT)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (Ray's driver setup
    replaces SIGTERM's handler with a bare exit: call again after ``ray.init``)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)


_stages: list[str] = []
_unwound: list[str] = []  # the innermost stage an exception left
_finished: list[str] = []  # stages that ended normally, in order


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage running now (for the line an interrupt prints)."""
    _stages.append(name)
    try:
        yield
    except BaseException:
        if not _unwound:
            _unwound.append(name)
        raise
    finally:
        _stages.pop()
    _finished.append(name)


def reset_stages() -> None:
    """Forget earlier stages (a new command in the same process)."""
    _stages.clear(), _unwound.clear(), _finished.clear()


def current_stage() -> str:
    """The stage running now, or the one the exception being handled came out of; between
    two stages ``"after <the last finished one>"``; ``"start-up"`` before any."""
    if _stages:
        return _stages[-1]
    if _unwound:
        return _unwound[0]
    return f"after {_finished[-1]}" if _finished else "start-up"
