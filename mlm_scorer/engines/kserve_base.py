"""What the KServe v2 clients (HTTP ``kserve_http``, gRPC ``kserve_grpc``) share: the start-up steps KServe
v2 has beyond TF Serving's, the reading of its responses, and protocol detection.

KServe v2 (the Open Inference Protocol) is what NVIDIA Triton Inference Server speaks; docs/triton.md
describes the server side. ``KServeEngine`` is a ``RemoteEngine``: options, bearer token, TLS, retries
within a budget, ``concurrency`` requests in flight with results in input order, the probes through the
model, the verification row in every request, the checks of every answer and the one scoring path are
``_remote``'s, the same as the TF Serving clients'. The two transports implement one attempt of each call
(the ``_`` hooks below); this module adds what KServe v2 says more about:

1. the server is live (``/v2/health/live``, gRPC ``ServerLive``), and the model's metadata names a version
   that is ready (``/v2/models/NAME[/versions/V]``, ``.../ready``), waited for while it loads, refused at
   once when the repository index shows it UNAVAILABLE; that version is *pinned* (``pin_version``): every
   request goes to ``/v2/models/NAME/versions/V/infer`` (gRPC ``model_version`` V);
2. its inputs and outputs have the names, datatypes and ranks of the local export's signature, and a fixed
   top-k width equal to the export's k (``check_metadata``);
3. the model configuration (``/v2/models/NAME/versions/V/config``, where the server offers it) caps the
   request size at its ``max_batch_size``, and the export identity it carries in ``parameters``
   (``mlm_scorer.model_checksum``, ``vocab_sha256``, ``vocab_size``, ``top_k``; written by
   ``mlm_export.triton_repo`` and ``scripts/serve_triton.py``) must be the local export's;
4. every response names the model, the pinned version and its request's id, and each output has the
   datatype string, the exact shape (Triton pads nothing: ``PADDED_SLOTS`` is off) and exactly the binary
   data size that shape needs (``output_array``), before ``_remote.check_output`` checks its values.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ModelError, UsageError
from ..model_dir import ModelDir
from .base import _transport, resolve_engine
from ._remote import (OPTION_SPEC, RAW_BYTES_PER_VALUE, TOP_K_OUTPUTS, BadResponseError, FatalError, OutputSpec, RemoteEngine,
                      RemoteOptions, RetryableError, TensorInfo, check_signature, response_limit, with_retries)

log = logging.getLogger("mlm_scorer.engines.kserve")

#: KServe v2 tensor datatypes -> numpy dtype names (the signature check compares these).
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64", "BF16": "bfloat16", "BYTES": "string"}
#: numpy dtype name -> the KServe v2 datatype of an output of that dtype (``_remote.OUTPUT_DTYPES``).
KSERVE_DATATYPE = {"float32": "FP32", "int32": "INT32"}
#: The configuration ``parameters`` naming the export (as ``mlm_export.triton_repo`` writes them).
PARAM_PREFIX = "mlm_scorer."
#: Options the KServe engines take beyond ``_remote.OPTION_SPEC``.
HEADER_OPTIONS = ("headers", "headers_file")
#: Repository-index states in which a model will not become ready by waiting.
FINAL_STATES = frozenset({"UNAVAILABLE"})


class ModelNotReady(RetryableError):
    """The model (version) exists but is not ready: loading, or being reloaded after a restart."""


@dataclass
class Reply:
    """One decoded inference response: who answered and the tensors (datatype, declared shape, flat array)."""

    model_name: str
    model_version: str
    id: str
    outputs: dict[str, tuple[str, tuple[int, ...], np.ndarray]]


def read_headers(headers: Any, headers_file: Any, *, engine: str) -> dict[str, str]:
    """Extra request headers from ``headers`` ("Name: value; Name2: value2") and/or ``headers_file`` (one
    "Name: value" a line; # comments). Values may be secrets: no message quotes them."""
    items: list[tuple[str, str]] = []

    def parse(line: str, where: str) -> None:
        line = line.strip()
        if not line or line.startswith("#"):
            return
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name):
            raise UsageError(f"engine {engine!r}: {where}: expected 'Name: value', got a line without a header "
                             f"name and colon")
        if name.lower() in ("content-type", "content-length", "inference-header-content-length", "host"):
            raise UsageError(f"engine {engine!r}: {where}: header {name} is set by the client itself")
        items.append((name, value.strip()))

    if headers:
        for part in str(headers).split(";"):
            parse(part, "headers")
    if headers_file:
        try:
            text = open(str(headers_file), encoding="utf-8").read()
        except OSError as exc:
            raise UsageError(f"engine {engine!r}: headers_file: cannot read {headers_file} ({exc.strerror})") from None
        for i, line in enumerate(text.splitlines(), 1):
            parse(line, f"{headers_file}:{i}")
    return dict(items)


def output_array(reply: Reply, spec: OutputSpec) -> np.ndarray:
    """Output ``spec.name`` of ``reply`` as an array of ``spec.dtype``, or BadResponseError: the response
    carries it with the KServe datatype of that dtype (``FP32``, ``INT32``), a declared shape the request
    allows (``spec.check_shape``: exact rows, slots and top-k width) and exactly one value per element (its
    binary data the size of that shape). Its values are ``check_output``'s to check."""
    if spec.name not in reply.outputs:
        raise BadResponseError(f"the response lacks output {spec.name!r}; it has {sorted(reply.outputs) or 'none'}")
    datatype, shape, flat = reply.outputs[spec.name]
    want = KSERVE_DATATYPE[spec.dtype]
    if datatype != want:
        raise BadResponseError(f"output {spec.name!r} has datatype {datatype}, expected {want}")
    shape = spec.check_shape(shape)
    n = int(np.prod(shape, dtype=np.int64))
    if flat.size != n or flat.dtype != np.dtype(spec.dtype):
        raise BadResponseError(f"output {spec.name!r} holds {flat.size} {flat.dtype} values for shape {list(shape)} "
                               f"({n} expected)")
    return flat.reshape(shape)


#: What a KServe v2 client takes: the TF Serving clients' options (``_remote.OPTION_SPEC``) and extra request
#: headers (``headers``: "Name: value; ...", ``headers_file``: one "Name: value" a line).
KSERVE_OPTIONS: dict[str, Any] = {**OPTION_SPEC, "headers": "extra request headers", "headers_file": "a file of them"}


class KServeEngine(RemoteEngine):
    """Base of the KServe v2 engines. Options: ``_remote.OPTION_SPEC`` plus ``headers`` / ``headers_file``
    (extra request headers, e.g. an API gateway's key); ``padding_row`` does not apply (Triton pads nothing).

    Transport hooks (one attempt each; RetryableError / FatalError / BadResponseError as in ``RemoteEngine``):
      ``_live() -> bool``; ``_metadata(version) -> dict`` (KServe model metadata: name, versions,
      platform, inputs/outputs as [{name, datatype, shape}]); ``_ready(version) -> bool``;
      ``_config(version) -> dict | None`` ({"max_batch_size": int, "parameters": {key: str}}; None where
      the server has no model-configuration API); ``_index() -> list[dict] | None`` (repository index:
      [{name, version, state, reason}]; None where refused); ``_infer(inputs, outputs, version, request_id,
      limit) -> Reply`` (the response decoded, at most ``limit`` bytes of tensors).
    """

    PADDED_SLOTS = False  # Triton's dynamic batcher merges only requests of equal shape: exactly P slots
    OPTIONS = KSERVE_OPTIONS
    CALL = "inference"

    def __init__(self, model: ModelDir, *, top_k: bool = False, **options: Any):
        options = dict(options)
        if str(options.get("padding_row", "false")).strip().lower() in ("1", "true", "yes", "on"):
            raise UsageError(f"engine {self.name!r}: padding_row is for TF Serving's batching; Triton's dynamic "
                             f"batcher merges only requests of equal shape and pads nothing (leave it out)")
        options["padding_row"] = False
        self.headers = read_headers(options.pop("headers", None), options.pop("headers_file", None), engine=self.name)
        self.server_max_batch_size: int | None = None
        self.platform = ""
        self._ids = itertools.count()
        self._run_id = uuid.uuid4().hex[:12]
        super().__init__(model, top_k=top_k, **options)

    # hooks ----------------------------------------------------------------------------------------
    def _live(self) -> bool:
        raise NotImplementedError

    def _metadata(self, version: str) -> dict[str, Any]:
        raise NotImplementedError

    def _ready(self, version: str) -> bool:
        raise NotImplementedError

    def _config(self, version: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def _index(self) -> list[dict[str, str]] | None:
        raise NotImplementedError

    def _infer(self, inputs: dict[str, np.ndarray], outputs: list[str], version: str, request_id: str,
               limit: int) -> Reply:
        raise NotImplementedError

    # start-up: RemoteEngine's steps, in KServe terms --------------------------------------------------
    def pin_version(self) -> int:
        """The server is live and the model has a ready version (the one asked for, else the highest), waited
        for within the retry budget while it loads; pinned in ``opts.model_version`` (every later call and
        message names it)."""
        def live() -> None:
            if not self._live():
                raise RetryableError("the server is not live yet")

        self._retry(live, "server liveness", ModelError)
        version = self._retry(self._resolve_version, "model readiness", ModelError)
        self.opts.model_version = version
        return version

    def check_metadata(self) -> None:
        """The model's metadata against the local export (signature, datatypes, ranks, a fixed top-k width),
        then its configuration where the server offers one (``_check_config``)."""
        version = str(self.opts.model_version)
        meta = self._retry(lambda: self._metadata(version), "model metadata", ModelError)
        self.platform = str(meta.get("platform") or "")
        check_signature(signature_of(meta), self.model, want_top_k=self.want_top_k, opts=self.opts)
        k = self.top_k_width
        for t in meta.get("outputs") or []:
            shape = list(t.get("shape") or [])
            if t.get("name") in TOP_K_OUTPUTS and len(shape) == 3 and shape[2] >= 0 and shape[2] != k:
                raise ModelError(f"{self._where}: output {t['name']!r} has top-k width {shape[2]}, the local export "
                                 f"{self.model.path} says top_k={k}: a different export is being served")
        cfg = self._retry(lambda: self._config(version), "model configuration", ModelError)
        if cfg is not None:
            self._check_config(cfg)

    def ready_note(self) -> str:
        return f" ({self.platform or 'platform unknown'}" + (
            f", max_batch_size {self.server_max_batch_size})" if self.server_max_batch_size else ")")

    def _resolve_version(self) -> int:
        want = "" if self.opts.model_version is None else str(self.opts.model_version)
        try:
            meta = self._metadata(want)
        except ModelNotReady as exc:  # no version is ready: loading, or failed/unloaded (the index may say)
            self._not_ready(int(want) if want else None, str(exc))
            raise
        versions = sorted({int(v) for v in meta.get("versions") or [] if str(v).isdigit()})
        if want:
            version = int(want)
        elif versions:
            version = versions[-1]
        else:
            self._not_ready(None, "it lists no versions")
            raise ModelNotReady(f"model {self.opts.model_name!r} lists no versions")
        if not self._ready(str(version)):
            self._not_ready(version, "")
            raise ModelNotReady(f"model {self.opts.model_name!r} version {version} is not ready")
        return version

    def _not_ready(self, version: int | None, said: str) -> None:
        """Raise FatalError when the repository index shows the model in a state it will not leave by itself
        (failed to load, unloaded), with the server's reason; return otherwise (loading: worth waiting)."""
        state, reason, seen = self._state(version)
        if state in FINAL_STATES:
            what = f"model {self.opts.model_name!r}" + (f" version {seen}" if seen else "")
            raise FatalError(f"{what} is not ready (state {state}{': ' + reason if reason else ''}); it will not "
                             f"become ready by waiting: load it on the server" + (f". Server said: {said}" if said
                                                                                    else ""))

    def _state(self, version: int | None) -> tuple[str, str, str]:
        """(state, reason, version) of the model in the repository index (the given version, else the
        highest listed), or empty strings where the server does not say."""
        try:
            index = self._index()
        except (RetryableError, FatalError):
            return "", "", ""
        rows = [e for e in index or [] if e.get("name") == self.opts.model_name
                and (version is None or str(e.get("version") or "") in ("", str(version)))]
        rows.sort(key=lambda e: int(e["version"]) if str(e.get("version") or "").isdigit() else -1)
        if not rows:
            return "", "", ""
        e = rows[-1]
        return str(e.get("state") or ""), str(e.get("reason") or ""), str(e.get("version") or "")

    def _check_config(self, cfg: dict[str, Any]) -> None:
        """Cap requests at the model's max_batch_size; compare the export identity in its parameters."""
        mbs = int(cfg.get("max_batch_size") or 0)
        if mbs > 0:
            self.server_max_batch_size = mbs
            room = self.copies_per_request(mbs, f"the model's max_batch_size on the server is {mbs}; it must be",
                                           fix="raise it there, or give --engine-option verify_responses=false",
                                           error=ModelError)
            if self.max_batch_size is None or self.max_batch_size > room:
                if self.opts.max_batch_size is not None:
                    log.info("%s: requests capped at the model's max_batch_size %d (asked for %d)", self._where, mbs,
                             self.opts.max_batch_size)
                self.max_batch_size = room
        params = cfg.get("parameters") or {}
        local = {"model_checksum": self.model.checksum, "vocab_sha256": self.model.manifest.get("vocab_sha256"),
                 "vocab_size": self.vocab_size, "top_k": self.top_k_width}
        problems = []
        for key, mine in local.items():
            theirs = params.get(PARAM_PREFIX + key)
            if theirs is not None and mine is not None and str(theirs) != str(mine):
                problems.append(f"{key} {_short(theirs)} (local: {_short(mine)})")
        if problems:
            raise ModelError(f"{self._where}: the served model is not the local export {self.model.path}: its "
                             f"configuration records " + ", ".join(problems) + ". Point --model at the export the "
                             f"server was built from (a Triton repository's REPO/NAME directory is one)")
        if params.get(PARAM_PREFIX + "model_checksum"):
            log.info("%s: the server's configuration names this export (model_checksum %s)", self._where,
                     _short(self.model.checksum))

    # scoring ------------------------------------------------------------------------------------------
    def _request_id(self) -> str:
        return f"mlm-{self._run_id}-{next(self._ids)}"

    def _predict_once(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One inference on the pinned version: the response must name the model, that version
        (``check_response_model``) and this request's id; each output is read by ``output_array``. Values
        are checked by ``predict_checked``."""
        specs = self.expect(inputs, outputs)
        rid = self._request_id()
        reply = self._infer(inputs, outputs, str(self.opts.model_version), rid,
                            response_limit(specs.values(), RAW_BYTES_PER_VALUE))
        self.check_response_model(reply.model_name, reply.model_version)
        if reply.id and reply.id != rid:
            raise BadResponseError(f"the response answers request {reply.id!r}, not {rid!r}")
        return {n: output_array(reply, specs[n]) for n in outputs}


def signature_of(meta: dict[str, Any]) -> dict[str, dict[str, TensorInfo]]:
    """KServe model metadata -> {"inputs"/"outputs": {name: TensorInfo(numpy dtype name, rank)}}, the form
    ``_remote.check_signature`` compares (the rank counts the batch dimension, as the metadata's shape does)."""
    return {kind: {t["name"]: TensorInfo(DATATYPES.get(t.get("datatype", ""), str(t.get("datatype"))),
                                         len(t.get("shape") or []))
                   for t in meta.get(kind) or [] if isinstance(t, dict) and "name" in t}
            for kind in ("inputs", "outputs")}


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


# ------------------------------------------------------------------------------------------ detection

def detect_protocol(server: str, options: dict[str, Any], *, sleep: Callable[[float], None] | None = None) -> str:
    """"kserve" or "tfserving": what the server at ``server`` speaks (HTTP: ``/v2/health/live`` answers 200
    on a KServe v2 server, TF Serving answers ``/v1/models/NAME``; gRPC: KServe's ``ServerLive`` is
    implemented or not). Retried within the options' retry budget while the server is unreachable; raises
    UsageError when the server answers neither way (pass --protocol), EngineError when it stays down."""
    opts_in = {k: v for k, v in options.items() if k in _OPTION_NAMES}
    opts_in["server"] = server
    engine = "kserve_grpc" if _transport(server) == "grpc" else "kserve_http"
    try:
        if engine == "kserve_grpc":
            from .kserve_grpc import detect as attempt_factory
        else:
            from .kserve_http import detect as attempt_factory
    except ImportError as exc:
        from ..errors import MissingDependencyError

        extra = "kserve" if engine == "kserve_grpc" else "serving"
        raise MissingDependencyError(f"talking to {server} needs {exc.name or exc}: pip install "
                                     f"'mlm-scorer[{extra}]'") from None
    schemes = {"grpc": 8001, "grpcs": 8001} if engine == "kserve_grpc" else {"http": 8000, "https": 8000}
    o = RemoteOptions.parse(engine, {k: v for k, v in opts_in.items() if k not in HEADER_OPTIONS}, schemes=schemes)
    headers = read_headers(opts_in.get("headers"), opts_in.get("headers_file"), engine=engine)
    attempt = attempt_factory(o, headers)
    kwargs = {"sleep": sleep} if sleep else {}
    return with_retries(attempt, what=f"detecting the protocol of {server}", budget=o.retry_budget,
                        initial=o.backoff_initial, maximum=o.backoff_max, fatal=UsageError, **kwargs)


def _option_names() -> set[str]:
    from ._remote import OPTION_SPEC

    return set(OPTION_SPEC) | set(HEADER_OPTIONS)


_OPTION_NAMES = _option_names()


def server_engine(server: str, protocol: str, options: dict[str, Any], log_fn: Callable[[str], None] | None = None) -> str:
    """The engine for ``--server URL`` and ``--protocol auto|kserve|tfserving``: rest/grpc (TF Serving) or
    kserve_http/kserve_grpc, as the engine registry names them (``base.resolve_engine``); ``auto`` asks the
    server (``detect_protocol``)."""
    if protocol == "auto":
        protocol = detect_protocol(server, options)
        if log_fn:
            log_fn(f"{server} speaks {'KServe v2' if protocol == 'kserve' else 'the TF Serving API'}")
    return resolve_engine("auto", server, protocol)
