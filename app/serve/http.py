"""Real-time recommendations: a Ray Serve app over the serving core.

The app answers HTTP JSON requests with :class:`app.serve.core.Recommender`, the same core as batch
inference and the MLflow pyfunc (same ids, exclusions, fallbacks and scores):

- ``POST /recommend`` ``{"user_id", "k", "history"?, "exclude_rated"?}``: top-k items. Requests
  that arrive together are answered by one matrix product (``@serve.batch``).
- ``POST /score`` ``{"pairs": [{"user_id", "item_id"}, ...]}``: pair scores and calibrated
  probabilities, unknown ids flagged.
- ``GET /healthz``, ``GET /version``; the OpenAPI page at ``/docs``.

Every response names the model version it came from. The app follows its model: the alias of
``models:/name@alias`` (``full_run`` moves ``champion``), or the ``CURRENT`` version of a model
folder. A new version is loaded and warmed in the background, then swapped in by one
assignment; a batch reads the model once, so no response mixes versions and no request waits
for a load. Bad requests get a 4xx with a one-line ``error``.

``build_app`` is the application builder of ``serve_config.yaml`` (``serve run`` / ``serve
deploy``); :func:`run` is ``python -m pipelines.serve``.
"""

# (no `from __future__ import annotations`: FastAPI reads the request models from the
# signatures of the ingress methods, which Ray Serve wraps)
import logging
import os
import socket
import threading
import time
from typing import Any, Optional, Union

from fastapi import HTTPException
from pydantic import StrictInt, StrictStr
from ray import serve

from app.core.config import Config, ServeConfig, load_config
from app.serve.api import (
    Health,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    VersionInfo,
    api,
)
from app.serve import loopback
from app.serve.source import ModelSource, recommend_many, score_many

APP_NAME = "two-tower"
Id = Union[StrictStr, StrictInt]


def _reason(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ---------------------------------------------------------------- the deployment
# (what its methods call is defined above it: Ray Serve serializes the class when it is
# decorated)

@serve.deployment
@serve.ingress(api)
class RecommenderServer:
    """One replica: the current serving core, a follower thread that swaps in new versions."""

    def __init__(self, model: str, cfg: Config) -> None:
        loopback.require_pinned()  # before Serve binds the replica's gRPC server
        self.cfg, s = cfg, cfg.serve
        self.device = "cuda" if s.replica_gpus > 0 else "cpu"
        self.source = ModelSource(model, cfg)
        label = self.source.version()
        self.current = self.source.load(label, self.device)  # swapped by one assignment
        self.loaded_unix, self.swaps = time.time(), 0
        # a newer version refused: {"version", "error"} (None when none), and the
        # fingerprint of its files (ModelSource.fingerprint), not tried again until it changes
        self.pending: Optional[dict[str, Any]] = None
        self._refused: Optional[str] = None
        self._recommend_batch.set_max_batch_size(s.max_batch_size)
        self._recommend_batch.set_batch_wait_timeout_s(s.batch_wait_ms / 1000.0)
        self._stop = threading.Event()
        if self.source.follows and s.reload_interval > 0:
            threading.Thread(target=self._follow, name="model-follower", daemon=True).start()

    def _follow(self) -> None:
        while not self._stop.wait(self.cfg.serve.reload_interval):
            self.follow_once()

    def follow_once(self) -> None:
        """Load the version to serve now if it is new, then swap it in by one assignment. A
        version that fails to load (a corrupt file, a missing one) is recorded as pending
        with its reason, and not tried again until its files change; the loaded version
        keeps serving."""
        log = logging.getLogger("ray.serve")
        try:
            label = self.source.version()
        except Exception as e:  # noqa: BLE001 (keep serving the loaded version)
            self.pending = {"version": None, "error": _reason(e)}
            return
        if label == self.current.version:
            self.pending, self._refused = None, None
            return
        try:
            key = self.source.fingerprint(label)
            if key == self._refused:
                return
            log.warning("loading model version %s (serving %s)", label, self.current.version)
            fresh = self.source.load(label, self.device)  # loaded and warmed aside
        except Exception as e:  # noqa: BLE001 (keep serving the loaded version)
            self.pending, self._refused = {"version": label, "error": _reason(e)}, key
            log.warning("model version %s refused: %s (still serving %s)", label,
                        self.pending["error"], self.current.version)
            return
        self.current, self.loaded_unix = fresh, time.time()
        self.swaps += 1
        self.pending, self._refused = None, None
        log.warning("now serving model version %s", label)

    def pending_reload(self) -> Optional[dict[str, Any]]:
        """The newer version this replica refused, why, and the version it serves instead;
        None when nothing is pending (for the console)."""
        pending = self.pending
        return None if pending is None else {**pending, "serving": self.current.version}

    def __del__(self) -> None:
        self._stop.set()

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        if self.current is None:
            raise HTTPException(503, "no model loaded")
        return {"status": "ready", "model_version": self.current.version}

    @api.get("/version", response_model=VersionInfo)
    async def version(self) -> dict[str, Any]:
        core = self.current  # (its model.json was read once, when it was loaded)
        return {"model_version": core.version, "model": self.source.model,
                "weights_sha256": core.info.weights_sha256,
                "users": len(core.user_ids), "items": len(core.item_ids),
                "loaded_unix": self.loaded_unix, "swaps": self.swaps, "pending": self.pending}

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, request: RecommendRequest) -> dict[str, Any]:
        s = self.cfg.serve
        if not 0 < request.k <= s.max_k:
            raise HTTPException(422, f"k: must be in 1..{s.max_k}, got {request.k}")
        if request.history is not None and len(request.history) > s.max_history:
            raise HTTPException(422, f"history: at most {s.max_history} items, got "
                                     f"{len(request.history)}")
        return await self._recommend_batch(request)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _recommend_batch(self, requests: list[RecommendRequest]) -> list[dict[str, Any]]:
        return recommend_many(self.current, requests)

    @api.post("/score", response_model=ScoreResponse)
    async def score(self, request: ScoreRequest) -> dict[str, Any]:
        s = self.cfg.serve
        if len(request.pairs) > s.max_pairs:
            raise HTTPException(422, f"pairs: at most {s.max_pairs} per request, got "
                                     f"{len(request.pairs)}")
        return score_many(self.current, request.pairs)


# ---------------------------------------------------------------- building and running the app

def application(model: str, cfg: Config) -> Any:
    """The Serve application for ``model`` with the settings of ``cfg.serve``. On the
    embedded Ray (a loopback node address) its replicas keep their gRPC server on loopback
    (:mod:`app.serve.loopback`).

    Raises:
        LoopbackError: on the embedded Ray, when this Ray's replica code cannot be kept on
            loopback.
    """
    s = cfg.serve
    actor: dict[str, Any] = {"num_cpus": s.replica_cpus, "num_gpus": s.replica_gpus}
    if loopback.embedded_cluster():
        actor["runtime_env"] = loopback.runtime_env(actor.get("runtime_env"))
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        # enough requests in flight per replica to fill a batch while one is computed
        "max_ongoing_requests": max(4 * s.max_batch_size, 16),
        "health_check_period_s": 10,
    }
    if s.max_replicas:
        options["autoscaling_config"] = {"min_replicas": s.replicas,
                                         "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": s.max_batch_size}
    else:
        options["num_replicas"] = s.replicas
    return RecommenderServer.options(**options).bind(model, cfg)


def build_app(args: dict[str, Any]) -> Any:
    """The application builder of ``serve_config.yaml``: ``args`` holds ``model`` and any
    settings (``config``: a YAML file; other keys: settings by name, e.g. ``max_k``)."""
    args = dict(args or {})
    if "model" not in args:
        raise ValueError("serve_config.yaml: the application's args need a model "
                         "(a model folder or URI, or models:/name@alias)")
    model = str(args.pop("model"))
    cfg = load_config(args.pop("config", None), args)
    return application(model, cfg)


def check_model(model: str, cfg: Config) -> str:
    """Fail before deploying when the model cannot be served; returns its version now.

    Raises:
        ModelError: naming what is missing.
    """
    from app.train.model_folder import ModelError, read_model_json

    source = ModelSource(model, cfg)
    label = source.version()
    if not source.mlflow:
        from app.core.publish import local_dir

        read_model_json(local_dir(model))
    elif source.ref.registered and source.alias is None:
        import mlflow

        from app.core import tracking

        tracking.connect(cfg.cluster)
        name, version = source.ref.name, source.ref.version
        try:
            mlflow.MlflowClient().get_model_version(name, version)
        except Exception:  # noqa: BLE001
            raise ModelError(f"--model {model}: the registry has no version {version} of "
                             f"{name!r}") from None
    return label


def check_fits(s: ServeConfig) -> None:
    """The replicas' CPUs and GPUs must fit the cluster, or deploying would wait for ever.

    Raises:
        ResourceError: naming what is asked and what the cluster has.
    """
    import ray

    from app.core.errors import ResourceError

    have = ray.cluster_resources()
    n = max(s.replicas, 1)
    cpus, gpus = s.replica_cpus * n, s.replica_gpus * n
    if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
        raise ResourceError(f"--replicas {n} x ({s.replica_cpus:g} CPU, {s.replica_gpus:g} "
                            f"GPU) do not fit the cluster ({have.get('CPU', 0):g} CPUs, "
                            f"{have.get('GPU', 0):g} GPUs); lower --replicas, --replica-cpus "
                            f"or --replica-gpus")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run(cfg: Config, model: str, *, block: bool = True, say: Any = print) -> str:
    """Deploy the app on the resolved Ray cluster and (``block``) serve until SIGINT or
    SIGTERM, then delete it (and stop the embedded Ray this call started, every process of
    it: :func:`app.core.cluster.stop_embedded`).

    Returns:
        The base URL.

    Raises:
        KeyboardInterrupt: a signal arrived before the app was serving (after the cleanup).
    """
    import ray

    from app.core.cluster import stop_embedded

    started_ray = not ray.is_initialized()
    ours: list[Any] = []  # this call's Ray processes, to stop when it ends
    setup = None
    serving = False
    try:
        setup, url = _deploy(cfg, model, say, ours if started_ray and block else None)
        if not block:
            return url
        serving = True
        say("serving until Ctrl-C (SIGINT) or SIGTERM")
        _serve_forever(cfg.serve, say)
    except KeyboardInterrupt:
        if not serving:
            raise  # the entry point says which stage was interrupted
        say("stopping: deleting the app")
        return f"http://{cfg.serve.host}:{cfg.serve.port}"
    finally:
        if block:
            if ray.is_initialized():
                stop()
            if started_ray and (setup is None or setup.kind == "local"):
                stop_embedded(ours)  # the embedded Ray this call started, Serve's actors too
            if serving:
                say("stopped")


def _deploy(cfg: Config, model: str, say: Any, ours: Optional[list[Any]]) -> tuple[Any, str]:
    """Start or join Ray, check the model and the resources, deploy; returns (the Ray setup,
    the base URL). ``ours``, when given, collects the Ray processes this process starts."""
    from app.core import logs, tracking
    from app.core.cluster import ClusterError, descendants, init_ray

    s = cfg.serve
    setup = init_ray(cfg.cluster)
    if ours is not None:
        ours.extend(descendants())
    from app.train.model_folder import ModelRef

    mlflow_model = ModelRef(model).mlflow
    if mlflow_model and not cfg.cluster.mlflow_tracking_uri:
        # the replicas read the same store, wherever their working directory is
        cfg.cluster.mlflow_tracking_uri = tracking.tracking_uri(cfg.cluster)
    if model and "://" not in model and not mlflow_model:
        model = os.path.abspath(model)
    label = check_model(model, cfg)
    check_fits(cfg.serve)
    url = f"http://{s.host}:{s.port}"
    if setup.kind == "local" and not port_free(s.host, s.port):
        raise ClusterError(f"--port {s.port}: {s.host}:{s.port} is in use by another "
                           f"program; pick another --port")
    if not logs.level() == "verbose":
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    app = application(model, cfg)  # (checks the loopback bind before anything starts)
    started = time.perf_counter()
    start_serve(s)
    if ours is not None:
        ours.extend(descendants())
    say(f"deploying {model} (version {label}) at {url} ...")
    t0 = time.perf_counter()
    try:
        serve.run(app, name=APP_NAME, route_prefix="/",
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
    except RuntimeError as e:  # Serve gave up on the app (its replicas failed to start)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"the app did not deploy: {first[:300]} (the replicas' "
                           f"logs: {logs.log_dir()}/serve)") from None
    wait_for_proxies(PROXY_START_S - (time.perf_counter() - started))
    say(f"ready in {time.perf_counter() - t0:.1f}s: POST {url}/recommend, POST "
        f"{url}/score, GET {url}/healthz, GET {url}/version; API page {url}/docs")
    return setup, url


PROXY_START_S = 180.0  # for Serve's HTTP proxies to answer, from serve.start


def start_serve(s: ServeConfig) -> None:
    """``serve.start`` on ``s.host:s.port``, proof against a busy machine.

    Serve gives a new HTTP proxy 5 s to start; one that has not (its worker process still
    starting on loaded CPUs) is killed and ``serve.start`` raises, although the controller
    starts another with a longer wait. So a proxy killed at start-up (``ActorDiedError``), or
    not ready in Serve's 60 s (``TimeoutError``), is not an error here: ``serve.start`` joins
    the running controller and :func:`wait_for_proxies` waits for the proxy it restarts.
    """
    import ray

    try:
        serve.start(http_options={"host": s.host, "port": s.port})
    except (ray.exceptions.ActorDiedError, TimeoutError):
        serve.start(http_options={"host": s.host, "port": s.port})


def wait_for_proxies(timeout_s: float) -> None:
    """Return once every Serve HTTP proxy is healthy (so the URL answers when the app is
    called ready).

    Raises:
        ClusterError: a proxy not healthy within ``timeout_s`` (at least 10 s), naming its
            node, its state and where Serve's logs are.
    """
    from app.core import logs
    from app.core.cluster import ClusterError

    deadline = time.monotonic() + max(timeout_s, 10.0)
    while True:
        proxies = {node: str(getattr(state, "value", state))
                   for node, state in serve.status().proxies.items()}
        waiting = {node: state for node, state in proxies.items()
                   if state not in ("HEALTHY", "DRAINING")}
        if proxies and not waiting:
            return
        if time.monotonic() >= deadline:
            node, state = next(iter(waiting.items()), ("(none)", "not started"))
            raise ClusterError(f"Serve's HTTP proxy on node {node[:12]} is {state} after "
                               f"{PROXY_START_S:.0f}s: its node is too busy to start it, "
                               f"or it fails (the proxies' logs: {logs.log_dir()}/serve); "
                               f"free CPUs there, or see the logs, and deploy again")
        time.sleep(0.25)


def _serve_forever(s: ServeConfig, say: Any) -> None:
    """Wait for a signal; meanwhile print each refused model version once (the replicas
    keep serving the loaded one and say why in ``/version``)."""
    handle = serve.get_app_handle(APP_NAME)
    seen: set[tuple[Optional[str], str]] = set()
    every = max(float(s.reload_interval), 1.0)
    next_look = time.monotonic() + every
    while True:
        time.sleep(0.5)
        if s.reload_interval > 0 and time.monotonic() >= next_look:
            next_look = time.monotonic() + every
            report_refused(handle, seen, say)


def report_refused(handle: Any, seen: set[tuple[Optional[str], str]], say: Any) -> None:
    """One console line per refused version and reason (``seen`` holds those printed)."""
    try:
        pending = handle.pending_reload.remote().result(timeout_s=10)
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 (a replica restarting: look again next time)
        return
    if not pending or (pending["version"], pending["error"]) in seen:
        return
    seen.add((pending["version"], pending["error"]))
    what = f"model version {pending['version']}" if pending["version"] else "the model"
    say(f"{what} refused: {pending['error']} (still serving {pending['serving']}; it is "
        f"tried again when its files change)")


def stop() -> None:
    """Delete the app (its replicas finish their requests first)."""
    import contextlib

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
