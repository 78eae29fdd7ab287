"""What the model-server engines share: options, secrets, retries, ordering, start-up checks, and the
checks of every answer.

A remote engine only has to say how to do *one attempt* of its calls (TF Serving: ``_fetch_status``,
``_fetch_signature``, ``_predict_once``; the KServe v2 engines replace the first two with their own
start-up steps, ``kserve_base``) and how to classify its transport's failures; everything else lives
here, once, for TF Serving and KServe v2 (Triton) alike:

* option parsing (values may arrive as strings from ``--engine-option key=value``) -> ``RemoteOptions``;
* the bearer token, read from an environment variable or a file and never put in a message or ``repr``;
* ``with_retries``: exponential backoff with full jitter inside a bounded time budget per request;
* ``RemoteEngine.map``: up to ``concurrency`` requests in flight, results yielded in input order;
* the start-up checks: the model version is AVAILABLE, the served signature has the inputs, outputs and
  dtypes this client sends and reads, and the served model is the local export's (``check_vocabulary``:
  a plain request answered, the vocabulary's size, the top-k width, the identity probe);
* one model per run: every call after the start-up checks names the version they verified, a response
  that names another model or version is refused (``check_response_model``), and every predict request
  carries a *verification row* whose answer must equal the one the server gave at start-up
  (``RemoteEngine.check_verification_row``): a server restarted or reloaded with other weights under the
  same name and version is caught on its first answer, before any of its rows is used;
* every output tensor checked before use: ``OutputSpec`` (what the request allows: dtype, rank, exact
  rows, slots, top-k width; checked by the decoders before they allocate anything), one value per
  element, a body no larger than the request can need (``response_limit``), and ``check_output``
  (values: log-probs finite and <= 0, top-k ids in the vocabulary).

docs/tf-serving.md ("One model per output", "Every answer checked") describes these guarantees for users
of both; docs/triton.md refers to it.

Arrays crossing the engine boundary are those of ``Batch`` / ``BatchResult``: int32 inputs
``[B, T]`` / ``[B, P]`` in, float32 ``[B, P]`` log-probs (and int32/float32 ``[B, P, k]`` top-k) out.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import random
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlsplit

import numpy as np

from ..errors import EngineError, ModelError, UsageError
from ..model_dir import ModelDir
from .base import (IDENTITY_TOLERANCE, INPUT_NAMES, Batch, BatchResult, Engine, ordered_map, probe_diff,
                   read_identity_probe)

log = logging.getLogger("mlm_scorer.engines.remote")

T = TypeVar("T")

DEFAULT_MODEL_NAME = "bert"
SIGNATURE_NAME = "serving_default"
LOG_PROBS = "masked_lm_log_probs"
TOP_K_OUTPUTS = ("top_k_ids", "top_k_log_probs")


class RetryableError(Exception):
    """One attempt failed in a way that may pass on a later attempt (server down, busy, slow)."""


class FatalError(Exception):
    """One attempt failed in a way that a retry cannot fix (a 4xx, INVALID_ARGUMENT): the server's message."""


class NotFoundError(FatalError):
    """The server does not serve the model or version asked for (HTTP 404, gRPC NOT_FOUND)."""


class ServerAnswered(RetryableError):
    """The server answered with an error a retry may pass (Triton: HTTP 500, gRPC INTERNAL, a model
    execution error): retried during a run, but to a start-up probe it is an answer (the model could not
    run that input)."""


class BadResponseError(Exception):
    """The server answered, but the answer cannot be used: a malformed or impossible tensor, a body past
    its size limit, another model or version. Never retried; the run stops with an EngineError (exit 5)
    naming the server and what was wrong."""


class ModelChangedError(BadResponseError):
    """The answer comes from another model or version than the one the start-up checks verified."""


class ShapeError(BadResponseError):
    """An output's shape is not one the request allows (``spec``: what it allows; ``shape``: what came)."""

    def __init__(self, message: str, spec: "OutputSpec", shape: tuple[int, ...]):
        super().__init__(message)
        self.spec, self.shape = spec, shape


# --------------------------------------------------------------------------------------------- options

def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _opt_int(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "latest")):
        return None
    return int(value)


#: option name -> (converter, default). The same list for both engines; see docs/tf-serving.md.
OPTION_SPEC: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "server": (str, None),                 # http(s)://host:port for REST, grpc(s)://host:port for gRPC
    "model_name": (str, DEFAULT_MODEL_NAME),
    "model_version": (_opt_int, None),     # None: the server's latest AVAILABLE version
    "concurrency": (int, 4),               # requests in flight
    "max_batch_size": (_opt_int, 64),      # copies per request; match the server's batching max_batch_size
    "timeout": (float, 30.0),              # seconds per request attempt, the whole answer included (a deadline)
    "connect_timeout": (float, 5.0),       # seconds to open a connection (REST)
    "retry_budget": (float, 60.0),         # seconds of retrying one request before giving up
    "backoff_initial": (float, 0.1),       # first backoff ceiling, doubled each attempt ...
    "backoff_max": (float, 5.0),           # ... up to this ceiling; the sleep is uniform in [0, ceiling]
    "auth_token_env": (str, None),         # name of an env var holding a bearer token
    "auth_token_file": (str, None),        # path of a file holding a bearer token
    "tls_ca_file": (str, None),            # PEM CA bundle to verify the server (https / grpcs)
    "tls_cert_file": (str, None),          # client certificate (mutual TLS), PEM
    "tls_key_file": (str, None),           # its private key, PEM
    "tls_server_name": (str, None),        # gRPC: expected name in the server certificate
    "tls_verify": (_as_bool, True),        # REST: False disables certificate checks (testing only)
    "check_model": (_as_bool, True),       # run the vocabulary/identity probe at start
    "padding_row": (_as_bool, True),       # prepend an all-zero row (server runs pad_variable_length_inputs)
    "verify_responses": (_as_bool, True),  # append the verification row to every request and check its answer
}


@dataclasses.dataclass
class RemoteOptions:
    server: str
    model_name: str = DEFAULT_MODEL_NAME
    model_version: int | None = None
    concurrency: int = 4
    max_batch_size: int | None = 64
    timeout: float = 30.0
    connect_timeout: float = 5.0
    retry_budget: float = 60.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    auth_token_env: str | None = None
    auth_token_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    tls_verify: bool = True
    check_model: bool = True
    padding_row: bool = True
    verify_responses: bool = True
    # derived from ``server``
    scheme: str = ""
    host: str = ""
    port: int = 0
    base_path: str = ""

    @classmethod
    def parse(cls, engine: str, options: dict[str, Any], *, schemes: dict[str, int]) -> "RemoteOptions":
        """Validate and coerce ``options``; ``schemes`` maps each accepted URL scheme to its default port."""
        unknown = sorted(set(options) - set(OPTION_SPEC))
        if unknown:
            raise UsageError(f"engine {engine!r} does not take option(s): {', '.join(unknown)}; "
                             f"it takes: {', '.join(OPTION_SPEC)}")
        values: dict[str, Any] = {}
        for name, (convert, default) in OPTION_SPEC.items():
            raw = options.get(name, default)
            try:
                values[name] = None if raw is None else convert(raw)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"engine {engine!r}: option {name}={raw!r} is invalid ({exc})") from None
        if not values["server"]:
            example = next(iter(schemes))
            raise UsageError(f"engine {engine!r} needs a server address, e.g. --server "
                             f"{example}://localhost:{schemes[example]}")
        for name in ("concurrency",):
            if values[name] < 1:
                raise UsageError(f"engine {engine!r}: {name} must be at least 1, got {values[name]}")
        if values["max_batch_size"] is not None and values["max_batch_size"] < 1:
            raise UsageError(f"engine {engine!r}: max_batch_size must be at least 1")
        for name in ("timeout", "connect_timeout", "backoff_initial", "backoff_max"):
            if values[name] <= 0:
                raise UsageError(f"engine {engine!r}: {name} must be positive, got {values[name]}")
        if values["retry_budget"] < 0:
            raise UsageError(f"engine {engine!r}: retry_budget must be >= 0 (0: no retries)")
        if values["auth_token_env"] and values["auth_token_file"]:
            raise UsageError(f"engine {engine!r}: give auth_token_env or auth_token_file, not both")
        if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
            raise UsageError(f"engine {engine!r}: tls_cert_file and tls_key_file go together")
        opts = cls(**values)
        url = values["server"] if "://" in values["server"] else f"{next(iter(schemes))}://{values['server']}"
        parts = urlsplit(url)
        if parts.scheme not in schemes:
            raise UsageError(f"engine {engine!r}: server {values['server']!r} has scheme {parts.scheme!r}; "
                             f"expected one of {', '.join(s + '://' for s in schemes)}")
        if parts.username or parts.password:
            raise UsageError(f"engine {engine!r}: do not put credentials in the server URL; "
                             f"use auth_token_env or auth_token_file")
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"engine {engine!r}: server {values['server']!r} has a bad port") from None
        if not parts.hostname:
            raise UsageError(f"engine {engine!r}: server {values['server']!r} has no host")
        opts.scheme, opts.host = parts.scheme, parts.hostname
        opts.port = port or schemes[parts.scheme]
        opts.base_path = parts.path.rstrip("/")
        return opts

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "grpcs")

    def describe(self) -> str:
        """For logs and error messages: address, model and version; never the token."""
        version = f" version {self.model_version}" if self.model_version is not None else ""
        return f"model {self.model_name!r}{version} at {self.scheme}://{self.host}:{self.port}{self.base_path}"

    def __repr__(self) -> str:  # the token itself is never stored here, only where it comes from
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"RemoteOptions({fields})"


def read_bearer_token(opts: RemoteOptions) -> str | None:
    """The bearer token from ``auth_token_env`` or ``auth_token_file`` (stripped), or None.

    Error messages name the variable or file, never any of its content.
    """
    if opts.auth_token_env:
        token = os.environ.get(opts.auth_token_env)
        if token is None or not token.strip():
            raise UsageError(f"auth_token_env: environment variable {opts.auth_token_env} is not set or empty")
        return token.strip()
    if opts.auth_token_file:
        try:
            token = open(opts.auth_token_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise UsageError(f"auth_token_file: cannot read {opts.auth_token_file} ({exc.strerror})") from None
        if not token:
            raise UsageError(f"auth_token_file: {opts.auth_token_file} is empty")
        return token
    return None


def read_file_bytes(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"{what}: cannot read {path} ({exc.strerror})") from None


# --------------------------------------------------------------------------------------------- transports

def http_session(o: RemoteOptions, token: str | None, *, engine: str, headers: dict[str, str] | None = None,
                 adapter: type | None = None) -> Any:
    """A ``requests`` session to ``o``'s server: one pool of ``concurrency`` connections (of ``adapter``, an
    ``HTTPAdapter`` class), no retries of urllib3's own (``with_retries`` decides), no proxy or .netrc from
    the environment (the server is given explicitly), bodies asked for uncompressed (a compressed one could
    expand past its size limit, and float tensors barely compress), the bearer token, ``headers``, and TLS as
    ``o`` says. UsageError for TLS options that do not fit an http(s):// URL."""
    import requests
    from requests.adapters import HTTPAdapter

    if o.tls_server_name:
        raise UsageError(f"engine {engine!r}: tls_server_name is a gRPC option; for https put the certificate's "
                         f"host name in the server URL")
    if not o.tls and (o.tls_ca_file or o.tls_cert_file):
        raise UsageError(f"engine {engine!r}: TLS files were given but the server URL is http://; use https://")
    s = requests.Session()
    pool = (adapter or HTTPAdapter)(pool_connections=1, pool_maxsize=o.concurrency, max_retries=0)
    s.mount("http://", pool)
    s.mount("https://", pool)
    s.trust_env = False
    s.headers["Accept-Encoding"] = "identity"
    s.headers.update(headers or {})
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    if o.tls:
        s.verify = o.tls_ca_file or o.tls_verify
        if o.tls_cert_file:
            s.cert = (o.tls_cert_file, o.tls_key_file)
    return s


def grpc_channel(o: RemoteOptions, *, engine: str, max_receive: int = -1) -> Any:
    """A gRPC channel to ``o``'s server: TLS for grpcs:// (CA bundle, client certificate, the expected server
    name), answers of at most ``max_receive`` bytes (-1: any), no limit on requests, and quick reconnects
    after a server restart (``with_retries`` decides how long to keep trying). UsageError for a path or TLS
    options that do not fit the URL."""
    import grpc

    if o.base_path:
        raise UsageError(f"engine {engine!r}: server address takes no path ({o.base_path!r})")
    if not o.tls and (o.tls_ca_file or o.tls_cert_file or o.tls_server_name):
        raise UsageError(f"engine {engine!r}: TLS options were given but the server is grpc://; use grpcs://")
    if not o.tls_verify:
        raise UsageError(f"engine {engine!r}: tls_verify=false is not supported; give tls_ca_file instead")
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", -1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    target = f"{o.host}:{o.port}"
    if not o.tls:
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=read_file_bytes(o.tls_ca_file, "tls_ca_file"),
                                         private_key=read_file_bytes(o.tls_key_file, "tls_key_file"),
                                         certificate_chain=read_file_bytes(o.tls_cert_file, "tls_cert_file"))
    if o.tls_server_name:
        options.append(("grpc.ssl_target_name_override", o.tls_server_name))
    return grpc.secure_channel(target, creds, options=options)


def short_reason(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, without the long URL-and-pool preamble."""
    msg = str(exc)
    for marker in ("Connection refused", "Connection reset", "Connection aborted", "Name or service not known",
                   "RemoteDisconnected", "Remote end closed", "timed out"):
        if marker in msg:
            return marker
    return msg[:200]


# --------------------------------------------------------------------------------------------- retries

def with_retries(attempt: Callable[[], T], *, what: str, budget: float, initial: float = 0.1,
                 maximum: float = 5.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 fatal: type[Exception] = EngineError) -> T:
    """Call ``attempt`` until it returns, retrying ``RetryableError`` within ``budget`` seconds.

    Backoff: before retry n (n = 1, 2, ...) sleep ``uniform(0, min(maximum, initial * 2**(n-1)))``
    ("full jitter"), never past the budget. ``FatalError`` is raised at once as ``fatal`` (EngineError;
    ModelError for the start-up checks, where a 404 means a wrong model name or version);
    ``BadResponseError`` at once as EngineError; when the budget is spent, ``EngineError`` says how many
    attempts were made over how long and the last error.
    """
    rng = rng or random
    start = clock()
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except FatalError as exc:
            raise fatal(f"{what}: {exc}") from None
        except BadResponseError as exc:
            raise EngineError(f"{what}: {exc}") from None
        except RetryableError as exc:
            elapsed = clock() - start
            ceiling = min(maximum, initial * (2 ** (attempts - 1)))
            pause = rng.uniform(0, ceiling)
            if elapsed + pause >= budget:
                raise EngineError(
                    f"{what}: gave up after {attempts} attempt(s) over {elapsed:.1f}s (retry budget "
                    f"{budget:g}s); last error: {exc}") from None
            log.warning("%s: %s; retrying in %.2fs (attempt %d)", what, exc, pause, attempts + 1)
            sleep(pause)


#: gRPC status codes retried, by name: the server down or restarting, busy, or slow.
RETRY_CODE_NAMES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})


def rpc_failure(exc: Exception, what: str, *, timeout: float, receive_limit: int,
                special: Callable[[str, str, str], Exception | None] | None = None) -> Exception:
    """The exception a failed gRPC call stands for (``exc``: a ``grpc.RpcError``, read without importing
    grpc), its text "WHAT: CODE: details": BadResponseError for an answer past this client's own
    ``receive_limit`` (RESOURCE_EXHAUSTED "larger than max": not a busy server), then what
    ``special(code, details, text)`` returns, if anything; else RetryableError for ``RETRY_CODE_NAMES``,
    NotFoundError for NOT_FOUND and FatalError for the other codes."""
    code = getattr(exc.code(), "name", "UNKNOWN") if hasattr(exc, "code") else "UNKNOWN"
    detail = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    text = f"{what}: {code}: {detail}" + (f" (deadline {timeout:g}s)" if code == "DEADLINE_EXCEEDED" else "")
    if code == "RESOURCE_EXHAUSTED" and "larger than max" in detail:
        return BadResponseError(f"{what}: the answer is larger than the {receive_limit:,} bytes the largest request "
                                f"can need ({detail})")
    chosen = special(code, detail, text) if special is not None else None
    if chosen is not None:
        return chosen
    if code in RETRY_CODE_NAMES:
        return RetryableError(text)
    if code == "NOT_FOUND":
        return NotFoundError(text)
    return FatalError(text)


# --------------------------------------------------------------------------------------------- checks

@dataclasses.dataclass
class TensorInfo:
    """A signature entry in transport-neutral form: numpy dtype name ("int32", ...) and rank (None: unknown)."""

    dtype: str
    rank: int | None


# TF DataType enum names (as in the REST metadata JSON) -> numpy dtype names.
TF_DTYPES = {"DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_INT32": "int32", "DT_INT64": "int64",
             "DT_STRING": "string", "DT_BOOL": "bool", "DT_HALF": "float16", "DT_INT8": "int8",
             "DT_UINT8": "uint8", "DT_INT16": "int16", "DT_BFLOAT16": "bfloat16"}


def check_versions(versions: list[tuple[int, str, str]], opts: RemoteOptions) -> int:
    """Return the version the server will use; raise ModelError unless it is AVAILABLE.

    ``versions``: (version, state, error message) as in GetModelStatusResponse.model_version_status.
    """
    where = opts.describe()
    if not versions:
        raise ModelError(f"{where}: the server reports no versions of the model")
    listing = ", ".join(f"{v} {s}" + (f" ({m})" if m else "") for v, s, m in sorted(versions))
    if opts.model_version is not None:
        match = [v for v in versions if v[0] == opts.model_version]
        if not match:
            raise ModelError(f"{where}: version {opts.model_version} is not served; served: {listing}")
        if match[0][1] != "AVAILABLE":
            raise ModelError(f"{where}: version {opts.model_version} is {match[0][1]}, not AVAILABLE"
                             + (f": {match[0][2]}" if match[0][2] else ""))
        return opts.model_version
    available = [v for v, s, _ in versions if s == "AVAILABLE"]
    if not available:
        raise ModelError(f"{where}: no version is AVAILABLE; versions: {listing}")
    return max(available)


def check_signature(served: dict[str, dict[str, TensorInfo]], model: ModelDir, *, want_top_k: bool,
                    opts: RemoteOptions) -> None:
    """Compare the served ``serving_default`` signature with the local export's manifest; raise ModelError.

    ``served``: {"inputs": {name: TensorInfo}, "outputs": {name: TensorInfo}}. Requirements: every input
    this client sends exists with dtype int32 and rank 2, the server needs no other input, and the
    outputs read (masked_lm_log_probs float32 rank 2; top_k_ids int32 / top_k_log_probs float32 rank 3
    when top-k is asked for) exist.
    """
    expected = model.manifest["signature"].get(SIGNATURE_NAME, {})
    problems: list[str] = []
    want_in = {n: TensorInfo(expected.get("inputs", {}).get(n, {}).get("dtype", "int32"), 2) for n in INPUT_NAMES}
    outs = [LOG_PROBS] + (list(TOP_K_OUTPUTS) if want_top_k else [])
    exp_out = expected.get("outputs", {})
    want_out = {n: TensorInfo(exp_out.get(n, {}).get("dtype", "float32" if "log_probs" in n else "int32"),
                              len(exp_out.get(n, {}).get("shape", [0] * (2 if n == LOG_PROBS else 3))))
                for n in outs}
    for kind, want in (("input", want_in), ("output", want_out)):
        have = served.get(kind + "s", {})
        for name, info in want.items():
            got = have.get(name)
            if got is None:
                problems.append(f"{kind} {name!r} is missing")
            elif got.dtype != info.dtype:
                problems.append(f"{kind} {name!r} has dtype {got.dtype}, expected {info.dtype}")
            elif got.rank is not None and got.rank != info.rank:
                problems.append(f"{kind} {name!r} has rank {got.rank}, expected {info.rank}")
    extra = sorted(set(served.get("inputs", {})) - set(want_in))
    if extra:
        problems.append(f"the server also requires input(s) {', '.join(map(repr, extra))} that this client "
                        f"does not send")
    if problems:
        raise ModelError(f"{opts.describe()}: signature {SIGNATURE_NAME!r} does not match the local export "
                         f"{model.path}: " + "; ".join(problems))


def probe_batch(model: ModelDir, target: int) -> Batch:
    """One copy ``[CLS] [MASK] [SEP]`` predicting ``target`` at position 1 (int32 [1, 3] / [1, 1])."""
    ids = model.manifest.get("special_token_ids") or {}
    cls_id, mask_id, sep_id = (int(ids.get(k, d)) for k, d in (("cls", 0), ("mask", 0), ("sep", 0)))
    return Batch(input_ids=np.array([[cls_id, mask_id, sep_id]], np.int32),
                 input_mask=np.ones((1, 3), np.int32), segment_ids=np.zeros((1, 3), np.int32),
                 masked_lm_positions=np.array([[1]], np.int32), masked_lm_ids=np.array([[target]], np.int32))


# --------------------------------------------------------------------------------------------- answers

OUTPUT_DTYPES = {LOG_PROBS: "float32", "top_k_ids": "int32", "top_k_log_probs": "float32"}
#: Bytes an answer may take beyond its tensors' values (a JSON or protobuf header, names, shapes).
RESPONSE_OVERHEAD = 1 << 16
#: Bytes one value may take: raw little-endian float32/int32 (KServe v2 binary data, ``raw_output_contents``)
RAW_BYTES_PER_VALUE = 4
#: ... protobuf, where a negative int32 takes 10 bytes as a varint (TF Serving's ``int_val``, KServe's
#: ``int_contents``)
PROTO_BYTES_PER_VALUE = 10


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """What one output of a predict response may be, known from the request before the answer arrives.

    ``rows`` is exact: the server's batching splits merged requests on the first dimension only, so any
    other count is a shifted or foreign answer. ``slots`` is the request's P; up to ``max_slots`` are
    accepted, because TF Serving's batching with ``pad_variable_length_inputs`` pads the second dimension
    of merged requests to the widest of them and returns it so (the slots past P are dropped). ``k``: the
    top-k width of a rank-3 output (exact), None for the rank-2 log-probs.
    """

    name: str
    dtype: str
    rows: int
    slots: int
    max_slots: int
    k: int | None = None

    @property
    def rank(self) -> int:
        return 2 if self.k is None else 3

    @property
    def max_values(self) -> int:
        return self.rows * self.max_slots * (self.k or 1)

    def describe(self) -> str:
        slots = str(self.slots) if self.max_slots == self.slots else f"{self.slots}..{self.max_slots}"
        return f"{self.dtype} [{self.rows}, {slots}" + (f", {self.k}]" if self.k is not None else "]")

    def check_shape(self, shape: Iterable[int]) -> tuple[int, ...]:
        """The shape as a tuple; BadResponseError unless it is one this request allows. Decoders call this
        with the *declared* shape before allocating anything, so a small message declaring a huge shape,
        a negative or a missing dimension costs nothing."""
        shape = tuple(int(d) for d in shape)
        if (len(shape) != self.rank or shape[0] != self.rows or not self.slots <= shape[1] <= self.max_slots
                or (self.k is not None and shape[2] != self.k)):
            raise ShapeError(f"output {self.name!r} has shape {list(shape)}; this request allows "
                             f"{self.describe()}", self, shape)
        return shape


def expected_outputs(inputs: dict[str, np.ndarray], names: Iterable[str], *, k: int,
                     max_slots: int) -> dict[str, OutputSpec]:
    """``OutputSpec`` of each of ``names`` for a request of ``inputs`` (int32 [rows, T] / [rows, P])."""
    rows, slots = (int(d) for d in inputs["masked_lm_positions"].shape)
    return {n: OutputSpec(n, OUTPUT_DTYPES[n], rows, slots, max(slots, max_slots), None if n == LOG_PROBS else k)
            for n in names}


def response_limit(specs: Iterable[OutputSpec], bytes_per_value: int, overhead: int = RESPONSE_OVERHEAD) -> int:
    """The most bytes a well-formed answer with these outputs can take (``bytes_per_value`` for the
    encoding: ``RAW_BYTES_PER_VALUE``, ``PROTO_BYTES_PER_VALUE``, about 32 for JSON numbers)."""
    return overhead + bytes_per_value * sum(s.max_values for s in specs)


_WHY = {LOG_PROBS: "a log-probability must be finite and <= 0",
        "top_k_log_probs": "a top-k log-probability must be <= 0, and finite in a slot that was asked for",
        "top_k_ids": "a top-k id must be a token of the vocabulary ({V} tokens; -1 only in an unused slot)"}


def check_output(spec: OutputSpec, a: np.ndarray, *, used: np.ndarray, vocab_size: int) -> np.ndarray:
    """``a`` (a decoded output) if it is what the request asked for; else BadResponseError naming the
    first bad element, its value and how many there are.

    ``used``: bool [rows, P], the request's slots that ask for a prediction (``masked_lm_positions`` > 0).
    Checks: dtype and shape (``spec``); masked_lm_log_probs finite and <= 0 everywhere (unused slots hold
    0.0); top_k_log_probs <= 0 and never NaN, -inf only in unused slots; top_k_ids in [0, V), -1 only in
    unused slots. Slots past P (server-side padding) are held to the unused-slot rules.
    """
    a = np.asarray(a)
    if a.dtype != np.dtype(spec.dtype):
        raise BadResponseError(f"output {spec.name!r} has dtype {a.dtype}, expected {spec.dtype}")
    spec.check_shape(a.shape)
    mask = np.zeros(a.shape[:2], bool)
    mask[:, : used.shape[1]] = used
    if spec.k is not None:
        mask = mask[..., None]
    if spec.name == LOG_PROBS:
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(a) & (a <= 0))
    elif spec.name == "top_k_log_probs":
        with np.errstate(invalid="ignore"):
            bad = np.isnan(a) | (a > 0) | (np.isneginf(a) & mask)
    else:
        bad = (a < -1) | (a >= vocab_size) | ((a < 0) & mask)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        more = int(bad.sum()) - 1
        why = _WHY[spec.name].format(V=vocab_size)
        raise BadResponseError(f"{spec.name}{list(where)} = {a[where].item()!r}: {why}"
                               + (f" (and {more} more such value(s))" if more else ""))
    return a


#: The verification row's targets: slots of one ``[CLS] [MASK] [SEP]`` copy, each asking for another id.
VERIFY_SLOTS = 4


def verification_batch(model: ModelDir) -> Batch:
    """The verification row: ``[CLS] [MASK] [SEP]`` asking, in its VERIFY_SLOTS slots, for the log-probs of
    ids spread over the first 1000 of the vocabulary (ids a server serves even where the vocabulary probe
    is turned off; int32 [1, 3] / [1, VERIFY_SLOTS]). Its answer depends on every weight on the path from
    the embeddings to the output layer, so another model answers it otherwise."""
    low = min(int(model.manifest["vocab_size"]), 1000)  # ids any vocabulary this size serves, however checked
    b = probe_batch(model, 0)
    targets = [(5 + j * (low // VERIFY_SLOTS)) % low for j in range(VERIFY_SLOTS)]
    return Batch(input_ids=b.input_ids, input_mask=b.input_mask, segment_ids=b.segment_ids,
                 masked_lm_positions=np.ones((1, VERIFY_SLOTS), np.int32),
                 masked_lm_ids=np.array([targets], np.int32))


def _pad_to(a: np.ndarray, width: int) -> np.ndarray:
    """``a`` [rows, w] padded with zeros (the padding convention) to [rows, width]."""
    if a.shape[1] >= width:
        return a
    return np.concatenate([a, np.zeros((a.shape[0], width - a.shape[1]), a.dtype)], axis=1)


# --------------------------------------------------------------------------------------------- engine

class RemoteEngine(Engine):
    """Base of the model-server engines. Subclasses set ``name``/``SCHEMES`` and implement the ``_`` hooks.

    Hooks (one attempt each; raise ``RetryableError`` (``ServerAnswered`` for an error answer a retry may
    pass), ``FatalError`` (``NotFoundError`` for a model or version the server does not serve) or
    ``BadResponseError`` on failure):
      ``_fetch_status() -> list[(version, state, message)]``: every version of the model, not only the
        pinned one (a vanished version is then reported with what is served instead);
      ``_fetch_signature() -> {"inputs": {name: TensorInfo}, "outputs": {...}}`` for serving_default
        (these two serve ``pin_version`` and ``check_metadata``; an engine whose protocol tells more, as
        KServe v2 does, overrides those two instead);
      ``_predict_once(inputs: dict[str, int32 ndarray], outputs: list[str]) -> dict[str, ndarray]``:
        decode each output asked for (one missing is a BadResponseError) to an array of
        ``OUTPUT_DTYPES[name]``, checking its declared shape against ``self.expect(inputs, outputs)``
        before allocating it and that it holds exactly one value per element, and pass a response's model
        name and version (where the protocol has them) to ``check_response_model``. Values are checked by
        ``predict_checked``.
    After ``pin_version``, ``opts.model_version`` holds the verified version: every later call must name
    it (gRPC ``model_spec.version``, REST and KServe v2 ``.../versions/V``).
    """

    SCHEMES: dict[str, int] = {}
    #: The options it takes (``engines.base.check_engine_options``): ``OPTION_SPEC``'s.
    OPTIONS = OPTION_SPEC
    #: Whether the server's batching may widen the slot dimension of an answer (TF Serving's
    #: ``pad_variable_length_inputs``): then up to ``max_seq_length`` slots are accepted, else exactly P.
    PADDED_SLOTS = True
    #: What an inference call is called in messages ("predict on 63 copies: ...").
    CALL = "predict"

    def __init__(self, model: ModelDir, *, top_k: bool = False, **options: Any):
        self.model = model
        self.want_top_k = bool(top_k)
        self.opts = RemoteOptions.parse(self.name, options, schemes=self.SCHEMES)
        self.vocab_size = int(model.manifest["vocab_size"])
        self.top_k_width = int(model.top_k)
        self.max_slots = int(model.manifest["max_seq_length"])
        # max_batch_size is the request size the server takes; the padding and verification rows count
        # against it.
        self.max_batch_size = self.copies_per_request(self.opts.max_batch_size, "max_batch_size must be")
        self._token = read_bearer_token(self.opts)
        self._executor: cf.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._outputs = [LOG_PROBS] + (list(TOP_K_OUTPUTS) if self.want_top_k else [])
        self._verify: Batch | None = None
        self._verify_answer: dict[str, np.ndarray] = {}
        self._connect()
        try:
            self.served_version = self.check_server()
        except BaseException:
            self.close()
            raise

    # hooks --------------------------------------------------------------------------------------
    def _connect(self) -> None:
        raise NotImplementedError

    def _fetch_status(self) -> list[tuple[int, str, str]]:
        raise NotImplementedError

    def _fetch_signature(self) -> dict[str, dict[str, TensorInfo]]:
        raise NotImplementedError

    def _predict_once(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close_transport(self) -> None:
        """Close the ``_session`` (HTTP) or ``_channel`` (gRPC) the transport keeps."""
        for name in ("_session", "_channel"):
            transport = getattr(self, name, None)
            if transport is not None:
                transport.close()

    # shared -------------------------------------------------------------------------------------
    @property
    def _where(self) -> str:
        """The engine, model, version and address, for messages."""
        return f"{self.name} engine, {self.opts.describe()}"

    def _retry(self, attempt: Callable[[], T], what: str, fatal: type[Exception] = EngineError) -> T:
        o = self.opts
        return with_retries(attempt, what=f"{self._where}, {what}", budget=o.retry_budget, initial=o.backoff_initial,
                            maximum=o.backoff_max, fatal=fatal)

    def copies_per_request(self, rows: int | None, what: str, *, fix: str = "",
                           error: type[Exception] = UsageError) -> int | None:
        """The copies of a batch that fit a request of ``rows`` rows (None: no limit) beside the padding
        and verification rows; ``error`` when none fit (``what``: the subject of its message, ``fix``:
        what to do)."""
        extra = [w for w, on in (("the padding row", self.opts.padding_row),
                                 ("the verification row", self.opts.verify_responses)) if on]
        if rows is None or not extra:
            return rows
        if rows <= len(extra):
            raise error(f"engine {self.name!r}: {what} at least {len(extra) + 1} (each request also carries "
                        + " and ".join(extra) + ")" + (f"; {fix}" if fix else ""))
        return rows - len(extra)

    def largest_answer(self, bytes_per_value: int) -> int:
        """The largest answer any request of this engine can need, for a transport with one limit for all
        its calls (a gRPC channel's ``max_receive_message_length``): the request's rows (``max_batch_size``,
        or the scorer's largest batch plus the padding and verification rows) x the export's
        ``max_seq_length`` slots x (1 + 2 top-k) values, at ``bytes_per_value``."""
        from ..batching import BatchPolicy

        rows = self.opts.max_batch_size or BatchPolicy.max_batch_size + 2
        specs = [OutputSpec(n, OUTPUT_DTYPES[n], rows, self.max_slots, self.max_slots,
                            None if n == LOG_PROBS else self.top_k_width) for n in OUTPUT_DTYPES]
        return response_limit(specs, bytes_per_value)

    def open_channel(self) -> Any:
        """A gRPC channel to the server (``grpc_channel``) refusing answers larger than any request of this
        engine can need: ``receive_limit``, ``largest_answer`` at protobuf's widest encoding."""
        self.receive_limit = self.largest_answer(PROTO_BYTES_PER_VALUE)
        return grpc_channel(self.opts, engine=self.name, max_receive=self.receive_limit)

    def expect(self, inputs: dict[str, np.ndarray], outputs: Iterable[str]) -> dict[str, OutputSpec]:
        """The ``OutputSpec`` of each output for a request of ``inputs`` (for decoders, before allocating)."""
        return expected_outputs(inputs, outputs, k=self.top_k_width,
                                max_slots=self.max_slots if self.PADDED_SLOTS else 0)

    def check_response_model(self, name: str | None, version: int | str | None) -> None:
        """Raise ModelChangedError when a response names another model, or another version than the one
        verified at start-up. For transports whose responses carry them (gRPC ``model_spec``, KServe v2
        ``model_name``/``model_version``): ``name`` None where the response does not carry it (any other
        value, "" included, must be the model's name); ``version`` None or "": not given."""
        if name is not None and name != self.opts.model_name:
            raise ModelChangedError(f"the response is from model {name!r}, not {self.opts.model_name!r}")
        pinned = self.opts.model_version
        if version not in (None, "") and pinned is not None and str(version) != str(pinned):
            raise ModelChangedError(f"the response is from version {version} of {self.opts.model_name!r}, but this "
                                    f"run verified version {pinned} at start-up and asked for it; the run "
                                    f"stops so that one output holds one model's scores")

    def predict_checked(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One attempt of ``_predict_once`` with every output checked (``check_output``); a version that
        is no longer served is reported with the versions served now (ModelChangedError)."""
        try:
            out = self._predict_once(inputs, outputs)
        except NotFoundError as exc:
            if self._verify is None:  # still starting: a wrong name or version, said by the start-up checks
                raise
            raise ModelChangedError(self._gone(exc)) from None
        missing = [n for n in outputs if n not in out]
        if missing:
            raise BadResponseError(f"the answer lacks output(s) {missing}")
        specs = self.expect(inputs, outputs)
        used = inputs["masked_lm_positions"] != 0
        return {n: check_output(specs[n], out[n], used=used, vocab_size=self.vocab_size) for n in outputs}

    def _gone(self, exc: Exception) -> str:
        pinned = self.opts.model_version
        try:
            served = ", ".join(f"{v} {s}" for v, s, _ in sorted(self._fetch_status())) or "no version"
        except Exception as err:  # noqa: BLE001 - only for the message
            served = f"unknown ({type(err).__name__}: {err})"
        return (f"version {pinned} of model {self.opts.model_name!r}, verified at start-up, is no longer served "
                f"(the server now has: {served}; it said: {exc}); the run stops so that one output holds one "
                f"model's scores")

    # start-up -----------------------------------------------------------------------------------
    def check_server(self) -> int:
        """The start-up checks, in order: ``pin_version`` (the version to use, named by every later call),
        ``check_metadata`` (the signature), ``check_vocabulary`` (probes through the model, unless
        ``check_model`` is off), and the answer to the verification row is recorded
        (``record_verification``). Returns the served version number."""
        version = self.pin_version()
        self.check_metadata()
        if self.opts.check_model:
            self.check_vocabulary()
        self.record_verification()
        log.info("%s: ready, signature ok%s", self._where, self.ready_note())
        return version

    def pin_version(self) -> int:
        """The version to use (the one asked for, else the latest), which must be AVAILABLE; pinned in
        ``opts.model_version``, so every later call and message names it."""
        version = check_versions(self._retry(self._fetch_status, "model status", ModelError), self.opts)
        self.opts.model_version = version
        return version

    def check_metadata(self) -> None:
        """The served signature against the local export's (``check_signature``)."""
        check_signature(self._retry(self._fetch_signature, "model metadata", ModelError), self.model,
                        want_top_k=self.want_top_k, opts=self.opts)

    def ready_note(self) -> str:
        """What the start-up log line adds about the served model."""
        return ""

    def check_vocabulary(self) -> None:
        """Check, through the model itself, that the server serves the local export; ModelError names what
        differs. V is the local ``vocab_size``:

        1. a copy any vocabulary scores (target id 0) is answered: an error here is the server's (a
           missing access header, a broken model) and is said as such, not read as a smaller vocabulary;
        2. target id V-1 scores (a finite negative log-prob; a smaller vocabulary rejects the id, or
           answers NaN), the top-k width is the export's ``top_k``, and the top-k ids are inside V;
        3. target id V does not score: rejected (TF's gather raises INVALID_ARGUMENT on CPU, Triton's
           backends an error) or answered non-negative/non-finite (GPU kernels return zeros for
           out-of-range ids); a real log-prob for id V means a larger vocabulary;
        4. the manifest's ``identity_probe`` (``check_identity_probe``) identifies the weights as well.

        The sizes are probed through the model because a signature says -1 for them (TF Serving's
        metadata shows nothing else). Limits: two models with equal V, equal k and no recorded probe
        cannot be told apart this way.
        """
        V = self.vocab_size
        where = f"{self.opts.describe()} vs local export {self.model.path}"

        def probe(target: int, outputs: list[str]) -> dict[str, np.ndarray] | Exception:
            def attempt() -> dict[str, np.ndarray] | Exception:
                try:
                    return self._predict_once(probe_batch(self.model, target).as_dict(), outputs)
                except NotFoundError:
                    raise
                except (FatalError, ServerAnswered) as exc:  # a rejection is an answer here, not a failure
                    return exc
                except ShapeError as exc:
                    s = exc.spec
                    if s.k is not None and len(exc.shape) == 3 and exc.shape[:2] == (1, 1) and exc.shape[2] != s.k:
                        raise ModelError(f"{where}: the server returns top-{exc.shape[2]}, the local export says "
                                         f"top_k={s.k}: a different export is being served") from None
                    raise

            return self._retry(attempt, "vocabulary probe")  # a malformed answer: EngineError

        first = probe(0, [LOG_PROBS])
        if isinstance(first, Exception):
            raise ModelError(f"{self._where}: the server does not answer a plain inference request: {first}")
        got = probe(V - 1, [LOG_PROBS, "top_k_ids"])
        if isinstance(got, Exception):
            raise ModelError(f"{where}: the server rejects target id {V - 1} (the local vocabulary has {V} tokens): "
                             f"the served vocabulary is smaller. Server said: {got}")
        lp = float(got[LOG_PROBS].reshape(-1)[0])
        if not (np.isfinite(lp) and lp < 0):
            raise ModelError(f"{where}: log-prob of target id {V - 1} is {lp}, not a finite negative number: "
                             f"the served vocabulary is smaller than the local one ({V})")
        top = int(got["top_k_ids"].max())
        if top >= V:
            raise ModelError(f"{where}: the server predicts token id {top}, beyond the local vocabulary of {V} "
                             f"tokens: the served vocabulary is larger")
        over = probe(V, [LOG_PROBS])
        if not isinstance(over, Exception):  # a rejection is expected: "indices[...] = V is not in [0, V)"
            lp = float(over[LOG_PROBS].reshape(-1)[0])
            if np.isfinite(lp) and lp < 0:
                raise ModelError(f"{where}: the server scores target id {V} (log-prob {lp:.4f}) but the local "
                                 f"vocabulary has only {V} tokens: the served vocabulary is larger")
        self.check_identity_probe(where)

    def check_identity_probe(self, where: str) -> None:
        """The manifest's ``identity_probe`` (fixed inputs and the log-probs the exported weights gave them)
        must come back within ``IDENTITY_TOLERANCE`` (1e-3, as ``check_identity`` holds the in-process
        engines); an answer that is not log-probs, or other numbers, mean other weights (ModelError)."""
        probe = read_identity_probe(self.model)
        if probe is None:
            log.warning("%s: the export records no identity probe; only its vocabulary size was compared", where)
            return
        batch, expected = probe

        def attempt() -> dict[str, np.ndarray] | Exception:
            try:
                return self._predict_once(batch.as_dict(), [LOG_PROBS])
            except NotFoundError:
                raise
            except (FatalError, ServerAnswered) as exc:  # an answer, but not log-probs: another model
                return exc

        got = self._retry(attempt, "identity probe")  # unreachable past the budget: EngineError, as any request
        if isinstance(got, Exception):
            raise ModelError(f"{where}: the served model cannot score the export's identity probe ({got}): "
                             f"another model is being served")
        diff = probe_diff(got[LOG_PROBS], expected)
        if not diff <= IDENTITY_TOLERANCE:
            raise ModelError(f"{where}: the served model's log-probs differ from those recorded in the export by "
                             f"up to {diff:.3g} (allowed {IDENTITY_TOLERANCE:g}): different weights are being served")

    def record_verification(self) -> None:
        """Ask the verification row (``verification_batch``) and keep the answer: from here on every request
        carries the row (``request``) and its answer must equal this one (``check_verification_row``)."""
        verify = verification_batch(self.model)
        if self.opts.verify_responses:
            answer = self._retry(lambda: self.predict_checked(verify.as_dict(), self._outputs), "verification row")
            self._verify_answer = {n: answer[n][0, :VERIFY_SLOTS] for n in self._outputs if n != "top_k_ids"}
        self._verify = verify

    # scoring ------------------------------------------------------------------------------------
    def request(self, batch: Batch) -> tuple[dict[str, np.ndarray], int, int | None]:
        """The request for ``batch``: (int32 inputs, rows before the batch's, row of the verification row).

        With ``padding_row``, row 0 is all zeros. TF Serving's batching, with ``pad_variable_length_inputs:
        true``, pads each merged tensor with its *first element* (batching_util.cc: ``pad_value =
        input.flat<T>()(0)``); an all-zero first row makes that value 0, which is exactly this model's padding
        convention (input_mask 0, unused slot at position 0). With ``verify_responses``, the last row is the
        verification row (``verification_batch``), padded to the batch's T and cut or padded to its P.
        """
        inputs = {n: np.ascontiguousarray(a, dtype=np.int32) for n, a in batch.as_dict().items()}
        parts = [inputs]
        skip = 0
        if self.opts.padding_row:
            parts.insert(0, {n: np.zeros((1,) + a.shape[1:], np.int32) for n, a in inputs.items()})
            skip = 1
        row = None
        if self.opts.verify_responses:
            P = inputs["masked_lm_positions"].shape[1]
            v = self._verify.as_dict()
            v = {n: (a[:, :P] if n.startswith("masked_lm") else a) for n, a in v.items()}
            parts.append(v)
            row = skip + len(batch)
        if len(parts) == 1:
            return inputs, skip, row
        out = {}
        for n in inputs:
            width = max(p[n].shape[1] for p in parts)
            out[n] = np.concatenate([_pad_to(p[n], width) for p in parts])
        return out, skip, row

    def check_verification_row(self, out: dict[str, np.ndarray], row: int) -> None:
        """Raise ModelChangedError unless the verification row's answer in ``out`` equals the start-up
        answer within ``IDENTITY_TOLERANCE`` (the same model gives the same numbers whatever the batch)."""
        diffs = []
        for n, ref in self._verify_answer.items():
            got = out[n][row, : min(ref.shape[0], out[n].shape[1])]
            ref = ref[: got.shape[0]]
            if n == "top_k_log_probs":
                got, ref = np.sort(got, axis=-1), np.sort(ref, axis=-1)
            diffs.append(float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0)
        diff = max(diffs, default=0.0)
        if not diff <= IDENTITY_TOLERANCE:
            raise ModelChangedError(
                f"the server's answer to the verification row differs from its answer at start-up by {diff:.3g} "
                f"(allowed {IDENTITY_TOLERANCE:g}): the model served as {self.opts.model_name!r} version "
                f"{self.opts.model_version} is no longer the one verified at start-up (restarted or reloaded "
                f"with other weights); the run stops so that one output holds one model's scores")

    def score_batch(self, batch: Batch) -> BatchResult:
        """One request: int32 [B,T]/[B,P] inputs -> float32 [B,P] log-probs (+ [B,P,k] top-k).

        The request carries the padding and verification rows (``request``); every output is checked
        (``predict_checked``), the verification row's answer too (``check_verification_row``), and the
        answer is cut back to [B, P]: the rows and slots this batch asked for.
        """
        inputs, skip, row = self.request(batch)
        B, P = batch.masked_lm_positions.shape

        def attempt() -> dict[str, np.ndarray]:
            out = self.predict_checked(inputs, self._outputs)
            if row is not None:
                self.check_verification_row(out, row)
            return out

        out = self._retry(attempt, f"{self.CALL} on {B} copies")
        res = BatchResult(log_probs=_cut(out[LOG_PROBS], skip, B, P))
        if self.want_top_k:
            res.top_k_ids = _cut(out["top_k_ids"], skip, B, P)
            res.top_k_log_probs = _cut(out["top_k_log_probs"], skip, B, P)
        return res

    def _pool(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = cf.ThreadPoolExecutor(self.opts.concurrency,
                                                       thread_name_prefix=f"mlm-{self.name}")
            return self._executor

    def map(self, batches: Iterable[Batch]) -> Iterator[BatchResult]:
        """Score batches with up to ``concurrency`` requests in flight; results in input order.

        Each batch is cut into requests of at most ``max_batch_size`` copies; the pieces of one batch are
        concatenated back before it is yielded.
        """
        limit = self.max_batch_size

        def pieces() -> Iterator[tuple[int, int, Batch]]:
            for i, batch in enumerate(batches):
                n = len(batch)
                step = limit or max(n, 1)
                starts = list(range(0, n, step)) or [0]
                for j, s in enumerate(starts):
                    yield i, len(starts) - j - 1, (batch.slice(s, s + step) if len(starts) > 1 else batch)

        parts: list[BatchResult] = []
        results = ordered_map(lambda p: (p[1], self.score_batch(p[2])), pieces(),
                              concurrency=self.opts.concurrency, executor=self._pool())
        for remaining, res in results:
            parts.append(res)
            if remaining == 0:
                yield BatchResult.concat(parts)
                parts = []

    def close(self) -> None:
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
        self._close_transport()


def _cut(a: np.ndarray, skip: int, B: int, P: int) -> np.ndarray:
    """Rows ``skip:skip+B`` and the first ``P`` slots of a checked output [B', P', ...] (P' >= P)."""
    return np.ascontiguousarray(a[skip:skip + B, :P])
