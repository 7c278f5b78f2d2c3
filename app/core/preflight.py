"""Every location a stage will read or write, checked before Ray starts.

A stage that meets a missing bucket, a dead endpoint or absent credentials only when it first
reads or writes has often spent 15-30 s starting Ray, and fails with a traceback. Each stage
therefore calls one ``check_*`` function of this module first: for every ``s3://`` location it
will touch (inputs, outputs, the workdir, checkpoint storage, MLflow's artifacts) it checks that
credentials are present, that the endpoint answers within ``--storage-timeout`` seconds and
that the bucket exists; an input must also exist. A failure raises one line naming the location
and the cause (exit code 2 at an entry point); nothing is printed when all is well.

Local paths and ``file://`` are not checked here (each stage checks them as it always did, at
no cost); ``gs://`` and ``abfss://`` are checked by the stage when it first uses them. The
checks use boto3, the client of the writer leases (:mod:`app.core.lease`), pointed at the same
endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) and addressed path-style as
pyarrow's filesystem addresses it: its exception classes and error codes tell a refused
connection, a timeout, a missing bucket and missing credentials apart (pyarrow has one OSError
with a curl code for all of them). Buckets are probed concurrently, so a dead endpoint costs
about one timeout however many locations a stage has.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from app.core.cluster import mlflow_defaults
from app.core.config import ClusterConfig, Config, DataConfig
from app.core.errors import StorageError
from app.core.storage import is_remote, is_uri, s3_endpoint

NO_CREDENTIALS = ("no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                  "(a profile in ~/.aws), or run where an instance role provides them")
MISSING = "does not exist"


@dataclass(frozen=True)
class Use:
    """One location a stage touches: the URI, the setting that named it, and whether the
    stage reads it (then it must exist) or only writes under it (its bucket must exist)."""

    uri: str
    setting: str
    read: bool = False

    @property
    def bucket(self) -> str:
        return self.uri.split("://", 1)[1].split("/", 1)[0]

    @property
    def key(self) -> str:
        """The object key or prefix, without a trailing slash ("" for the bucket itself)."""
        rest = self.uri.split("://", 1)[1]
        return rest.split("/", 1)[1].rstrip("/") if "/" in rest else ""


# --- what each stage touches -------------------------------------------------------------


def check_prepare(data: DataConfig, output: str, cluster: ClusterConfig) -> None:
    """``pipelines.prepare_data``: the raw input (``--input``), the base dataset (``--base``)
    and the dataset folder."""
    check([*_raw_input(data), *_base(data), Use(output, "--output")],
          timeout=cluster.storage_timeout)


def check_train(cluster: ClusterConfig, data_dir: str, output: str) -> None:
    """``pipelines.train`` (and each training run of a full run): the dataset, the model
    folder, Ray Train's checkpoint storage and MLflow's artifacts."""
    check([Use(data_dir, "--data", read=True), Use(output, "--output"),
           _checkpoints(cluster), *_mlflow_artifacts(cluster)], timeout=cluster.storage_timeout)


def check_tune(cluster: ClusterConfig, data_dir: str, output: str) -> None:
    """``pipelines.tune``: the dataset, the sweep folder (the trials' checkpoints live in it)
    and MLflow's artifacts."""
    check([Use(data_dir, "--data", read=True), Use(output, "--output"),
           *_mlflow_artifacts(cluster)], timeout=cluster.storage_timeout)


def check_infer(cluster: ClusterConfig, model: str, data_dir: str, output: str,
                users: Optional[str] = "all", pairs: Optional[str] = None,
                history: Optional[str] = None) -> None:
    """``pipelines.batch_inference``: the model, the dataset, the users / pairs / history files
    and the output folder."""
    files = [Use(path, flag, read=True) for path, flag in
             ((users if users != "all" else None, "--users"), (pairs, "--pairs"),
              (history, "--history")) if path]
    check([*_model(cluster, model), Use(data_dir, "--data", read=True), *files,
           Use(output, "--output")], timeout=cluster.storage_timeout)


def check_serve(cluster: ClusterConfig, model: str) -> None:
    """``pipelines.serve``: the model folder (or MLflow's artifacts for a registered model)."""
    check(_model(cluster, model), timeout=cluster.storage_timeout)


def check_run(cfg: Config, stages: Iterable[str] = ("prepare", "train", "infer")) -> None:
    """``pipelines.full_run``: the raw input, the workdir (every output lives under it unless
    ``--output`` puts the dataset elsewhere), checkpoint storage and MLflow's artifacts."""
    c = cfg.cluster
    data_dir = cfg.data.output or _under(c.workdir, "data")
    training = "train" in stages
    check([*_raw_input(cfg.data), *_base(cfg.data),
           Use(c.workdir, "--workdir"), Use(data_dir, "--output"),
           *([_checkpoints(c), *_mlflow_artifacts(c)] if training else [])],
          timeout=c.storage_timeout)


def _raw_input(data: DataConfig) -> list[Use]:
    """``--input`` where the dataset reads it (lfs without it downloads; the others ignore it)."""
    if data.input and data.dataset in ("lfs", "csv", "parquet"):
        return [Use(data.input, "--input", read=True)]
    return []


def _base(data: DataConfig) -> list[Use]:
    """``--base``: the prepared dataset whose vocabularies the new one extends."""
    return [Use(data.base, "--base", read=True)] if data.base else []


def _checkpoints(cluster: ClusterConfig) -> Use:
    if cluster.storage_path:
        return Use(cluster.storage_path, "--storage-path")
    return Use(_under(cluster.workdir, "checkpoints"), "--workdir (checkpoints)")


def _mlflow_artifacts(cluster: ClusterConfig) -> list[Use]:
    """MLflow's artifact store when this project chooses it (the local tracking store keeps
    artifacts under the workdir, see :func:`app.core.tracking.configure`); a tracking server
    or Databricks chooses its own."""
    if mlflow_defaults(cluster)[0] is not None:
        return []
    return [Use(_under(cluster.workdir, "mlartifacts"), "--workdir (MLflow artifacts)")]


def _under(workdir: str, name: str) -> str:
    return f"{str(workdir).rstrip('/')}/{name}"


def _model(cluster: ClusterConfig, model: str) -> list[Use]:
    """A model folder is read; a registered model (``models:/``, ``runs:/``) lives in MLflow's
    artifact store, whose bucket must be reachable."""
    if ":/" in model and not is_uri(model):
        return _mlflow_artifacts(cluster)
    return [Use(model, "--model", read=True)]


# --- the check ---------------------------------------------------------------------------


def check(uses: Iterable[Use], *, timeout: float) -> None:
    """Check every ``s3://`` location of ``uses``; nothing happens (no import, no request) when
    none is remote.

    Args:
        uses: the locations, in the order a failure report prefers (the first failing one is
            named).
        timeout: seconds the endpoint has to answer each request (connect and read).

    Raises:
        StorageError: one line, ``<uri>: <cause> (<setting>)``, plus the other locations
            that failed (an entry point prints it and exits with code 2).
    """
    s3 = [u for u in _dedupe(uses) if is_remote(u.uri) and u.uri.lower().startswith("s3://")]
    if not s3:
        return
    client, endpoint = _client(s3[0], timeout)
    probe = _Probe(client, endpoint, timeout)
    first: dict[str, Use] = {}
    for u in s3:  # one request per bucket, named after the first location in it
        first.setdefault(u.bucket, u)
    _report(_run(probe.bucket, list(first.values()), probe))
    _report(_run(probe.exists, [u for u in s3 if u.read and u.key], probe))


def _dedupe(uses: Iterable[Use]) -> list[Use]:
    """Each (location, read) once; a location given as a path object becomes its text."""
    seen: set[tuple[str, bool]] = set()
    out = []
    for u in uses:
        uri = str(u.uri)
        if (uri, u.read) not in seen:
            seen.add((uri, u.read))
            out.append(Use(uri, u.setting, u.read))
    return out


def _client(first: Use, timeout: float) -> tuple[Any, str]:
    """A boto3 S3 client that tries once and waits ``timeout`` seconds at most per connect and
    per read, after checking that credentials are present (botocore would otherwise find out
    only when signing, once per request)."""
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError

    endpoint = s3_endpoint()
    try:
        session = boto3.session.Session()
        credentials = session.get_credentials()
    except BotoCoreError as e:  # a profile that does not exist, a broken credential_process
        raise StorageError(f"{first.uri}: could not load AWS credentials ({e}) "
                          f"({first.setting})") from None
    if credentials is None:
        raise StorageError(f"{first.uri}: {NO_CREDENTIALS} ({first.setting})")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = BotoConfig(connect_timeout=timeout, read_timeout=timeout,
                        retries={"total_max_attempts": 1},
                        s3={"addressing_style": "path"} if endpoint else {})
    client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
    return client, client.meta.endpoint_url


Failure = Optional[str]


def _run(fn: Callable[[Use], Failure], uses: list[Use], probe: "_Probe"
         ) -> list[tuple[Use, str]]:
    """``fn`` over ``uses`` at once; the failures, in the order of ``uses``. A request still
    running a little after the timeout (an endpoint that answers a byte at a time) counts as
    unanswered."""
    if not uses:
        return []
    pool = ThreadPoolExecutor(max_workers=min(16, len(uses)))
    futures = [pool.submit(fn, u) for u in uses]
    wait(futures, timeout=probe.timeout + 2)
    pool.shutdown(wait=False, cancel_futures=True)
    failed = []
    for u, f in zip(uses, futures):
        cause = f.result() if f.done() else probe.silent
        if cause:
            failed.append((u, cause))
    return failed


def _report(failed: list[tuple[Use, str]]) -> None:
    if not failed:
        return
    u, cause = failed[0]
    others = [o.uri for o, _ in failed[1:]]
    more = (f"; {len(others)} other location(s) fail too ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''})" if others else "")
    raise StorageError(f"{u.uri}: {cause} ({u.setting}){more}")


class _Probe:
    """The requests: each returns None when the location is usable, else the cause."""

    def __init__(self, client: Any, endpoint: str, timeout: float) -> None:
        self.client, self.endpoint, self.timeout = client, endpoint, timeout
        self.silent = f"the S3 endpoint {endpoint} did not answer within {timeout:g} s"

    def bucket(self, use: Use) -> Failure:
        """The endpoint answers, accepts the credentials, and lists the bucket (every stage
        lists its output to find versions and leases)."""
        return self._ask(use, lambda: self.client.list_objects_v2(Bucket=use.bucket,
                                                                  MaxKeys=1))

    def exists(self, use: Use) -> Failure:
        """An object with the key, or a folder: at least one object under ``key/`` (for a
        glob, under the folder that holds its first wildcard)."""
        key = use.key
        wildcard = min((key.index(c) for c in "*?[" if c in key), default=None)
        if wildcard is None:
            found = self._ask(use, lambda: self.client.head_object(Bucket=use.bucket, Key=key))
            if found != MISSING:
                return found  # the object, or no answer
            prefix = key + "/"
        else:
            prefix = key[:key.rfind("/", 0, wildcard) + 1]
        listed: dict[str, Any] = {}
        failed = self._ask(use, lambda: listed.update(self.client.list_objects_v2(
            Bucket=use.bucket, Prefix=prefix, MaxKeys=1)))
        if failed:
            return failed
        return None if listed.get("KeyCount") else MISSING

    def _ask(self, use: Use, request: Callable[[], Any]) -> Failure:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            request()
        except ClientError as e:
            return self._refused(use, e)
        except BotoCoreError as e:
            return self._unreachable(e)
        return None

    def _refused(self, use: Use, e: Any) -> str:
        """The cause of an error answer (a HEAD's answer has no body: only its status)."""
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            return f"bucket {use.bucket} does not exist"
        if code in ("404", "NoSuchKey", "NotFound"):
            return MISSING  # (a HEAD of an input's key, in a bucket that exists)
        if code == "InvalidAccessKeyId":
            return (f"the S3 endpoint {self.endpoint} does not know the access key "
                    f"(AWS_ACCESS_KEY_ID or the profile's)")
        if code == "SignatureDoesNotMatch":
            return (f"the S3 endpoint {self.endpoint} rejected the secret key "
                    f"(AWS_SECRET_ACCESS_KEY or the profile's)")
        if code in ("ExpiredToken", "TokenRefreshRequired", "RequestExpired"):
            return "the AWS credentials have expired"
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return f"access denied to bucket {use.bucket} with the credentials in use"
        return f"the S3 endpoint {self.endpoint} answered {code or 'an error'}"

    def _unreachable(self, e: Exception) -> str:
        """The cause of a request that got no answer."""
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"the S3 endpoint {self.endpoint}"
        if isinstance(e, NoCredentialsError):
            return NO_CREDENTIALS
        if isinstance(e, (ConnectTimeoutError, ReadTimeoutError)):
            return self.silent
        if isinstance(e, ConnectionClosedError):
            return f"{where} closed the connection without answering"
        if isinstance(e, EndpointConnectionError):
            cause = str(getattr(e, "kwargs", {}).get("error", ""))
            if "refused" in cause.lower():
                return f"{where} refused the connection"
            if "resolve" in cause.lower() or "name or service" in cause.lower():
                return f"{where} is not a known host name"
            return f"{where} could not be reached"
        return f"{where} could not be reached ({type(e).__name__})"
