"""What the KServe v2 clients (HTTP ``kserve_http``, gRPC ``kserve_grpc``) share: start-up checks, version
pinning, response validation, the model-identity checks and protocol detection.

KServe v2 (the Open Inference Protocol) is what NVIDIA Triton Inference Server speaks; docs/triton.md
describes the server side. The two transports implement one attempt of each call (the ``_`` hooks below);
everything else is here, on top of the TF Serving clients' ``RemoteEngine`` (options, bearer token, TLS,
retries within a budget, ``concurrency`` requests in flight with results in input order).

Start-up (``check_server``), each step retried within ``retry_budget`` while the server is unreachable or
the model is loading:

1. the server is live (``/v2/health/live``, gRPC ``ServerLive``);
2. the model's metadata names a version that is ready (``/v2/models/NAME[/versions/V]``, ``.../ready``);
   that version is then *pinned*: every request goes to ``/v2/models/NAME/versions/V/infer`` (gRPC
   ``model_version`` V), and every response must name model NAME and version V;
3. its inputs and outputs have the names, datatypes and ranks of the local export's signature, and a fixed
   top-k width equal to the export's k;
4. the model configuration (``/v2/models/NAME/versions/V/config``, where the server offers it) caps the
   request size at its ``max_batch_size``, and the export identity it carries in ``parameters``
   (``mlm_scorer.model_checksum``, ``vocab_sha256``, ``vocab_size``, ``top_k``; written by
   ``mlm_export.triton_repo`` and ``scripts/serve_triton.py``) must be the local export's;
5. probes through the model itself (``check_model``): a copy any vocabulary scores (target id 0) is
   answered (else the error is the server's, e.g. a missing access header, not the vocabulary's), target
   id V-1 scores, target id V does not, the top-k width and ids fit the local vocabulary, and the export's
   identity probe gives the recorded log-probs within ``IDENTITY_TOLERANCE``.

Every response is validated before its numbers are used (``validate_outputs``): the requested outputs,
each once, with the expected datatype, exact shape ([B,P] / [B,P,k]) and byte count; log-probs finite and
<= 0; top-k ids inside the vocabulary at every used slot. A response that fails is an EngineError, never
a score. After the connection was lost (a restart), the identity probe runs again before the next
answer is used: a server that came back serving something else is refused.
"""
from __future__ import annotations

import itertools
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ModelError, UsageError
from ..model_dir import ModelDir
from ._remote import (LOG_PROBS, TOP_K_OUTPUTS, FatalError, RemoteEngine, RemoteOptions, RetryableError,
                      TensorInfo, check_signature, probe_batch, with_retries)
from .base import IDENTITY_TOLERANCE, Batch, BatchResult, probe_diff, read_identity_probe

log = logging.getLogger("mlm_scorer.engines.kserve")

#: KServe v2 tensor datatypes -> numpy dtype names (the signature check compares these).
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64", "BF16": "bfloat16", "BYTES": "string"}
#: What this client reads: output -> (KServe datatype, numpy dtype, rank).
OUTPUT_TYPES = {LOG_PROBS: ("FP32", np.float32, 2), "top_k_ids": ("INT32", np.int32, 3),
                "top_k_log_probs": ("FP32", np.float32, 3)}
#: The configuration ``parameters`` naming the export (as ``mlm_export.triton_repo`` writes them).
PARAM_PREFIX = "mlm_scorer."
#: Options the KServe engines take beyond ``_remote.OPTION_SPEC``.
HEADER_OPTIONS = ("headers", "headers_file")
#: Repository-index states in which a model will not become ready by waiting.
FINAL_STATES = frozenset({"UNAVAILABLE"})
#: Largest response header / JSON part accepted beyond the tensors themselves (bytes).
RESPONSE_OVERHEAD = 1 << 16


class ModelNotReady(RetryableError):
    """The model (version) exists but is not ready: loading, or being reloaded after a restart."""


class ServerAnswered(RetryableError):
    """The server answered with an error worth retrying (HTTP 500, gRPC INTERNAL): a retry may pass, but for a
    probe it is an answer (the model could not run that input)."""


class Disconnected(RetryableError):
    """The connection failed or the model vanished mid-run (a restart): retried, and the model is verified
    again before the next answer is used."""


@dataclass
class Reply:
    """One decoded inference response: who answered and the tensors (datatype, shape, flat array)."""

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


def response_limit(B: int, P: int, k: int) -> int:
    """Most bytes an answer to a request of B copies x P slots may take: the three outputs plus a header."""
    return RESPONSE_OVERHEAD + 4 * B * P * (1 + 2 * max(k, 1))


def check_structure(reply: Reply, *, outputs: list[str], model_name: str, version: str, request_id: str,
                    B: int, P: int, k: int | None) -> dict[str, np.ndarray]:
    """Who answered and the outputs' datatypes, exact shapes and element counts; raise FatalError.

    ``k``: the expected top-k width (None: not known yet, any width). Returns {name: array [B,P] / [B,P,k]}.
    """
    if reply.model_name != model_name:
        raise FatalError(f"the response comes from model {reply.model_name!r}, not {model_name!r}")
    if reply.model_version and reply.model_version != version:
        raise FatalError(f"the response comes from version {reply.model_version!r} of {model_name!r}, not the "
                         f"verified version {version}")
    if reply.id and reply.id != request_id:
        raise FatalError(f"the response answers request {reply.id!r}, not {request_id!r}")
    got: dict[str, np.ndarray] = {}
    for name in outputs:
        if name not in reply.outputs:
            raise FatalError(f"the response lacks output {name!r}; it has {sorted(reply.outputs) or 'none'}")
        datatype, shape, flat = reply.outputs[name]
        want_type, dtype, rank = OUTPUT_TYPES[name]
        if datatype != want_type:
            raise FatalError(f"output {name!r} has datatype {datatype}, expected {want_type}")
        want_shape = (B, P) if rank == 2 else (B, P, k if k is not None else (shape[2] if len(shape) == 3 else -1))
        if tuple(shape) != want_shape:
            raise FatalError(f"output {name!r} has shape {list(shape)}, expected {list(want_shape)} for a request of "
                             f"{B} copies x {P} slots")
        n = int(np.prod(want_shape, dtype=np.int64))
        if flat.size != n or flat.dtype != np.dtype(dtype):
            raise FatalError(f"output {name!r} holds {flat.size} {flat.dtype} values for shape {list(shape)}")
        got[name] = flat.reshape(want_shape)
    return got


def check_values(got: dict[str, np.ndarray], positions: np.ndarray, vocab_size: int) -> None:
    """No impossible number: log-probs finite and <= 0 (0.0 in unused slots); top-k log-probs not NaN, <= 0,
    finite at used slots; top-k ids in [0, vocab_size) at used slots (-1 allowed at unused ones). Used slots
    are those with ``masked_lm_positions`` > 0 (0 marks an unused slot). Raises FatalError."""
    used = np.asarray(positions) > 0
    lp = got.get(LOG_PROBS)
    if lp is not None:
        bad = ~(np.isfinite(lp) & (lp <= 0))
        if bad.any():
            i = tuple(int(x) for x in np.argwhere(bad)[0])
            raise FatalError(f"masked_lm_log_probs{list(i)} = {lp[i]!r}: not a log-probability (finite, <= 0); "
                             f"{int(bad.sum())} such value(s)")
    tlp = got.get("top_k_log_probs")
    if tlp is not None:
        bad = np.isnan(tlp) | (tlp > 0) | (used[..., None] & ~np.isfinite(tlp))
        if bad.any():
            i = tuple(int(x) for x in np.argwhere(bad)[0])
            raise FatalError(f"top_k_log_probs{list(i)} = {tlp[i]!r}: not a log-probability")
    ids = got.get("top_k_ids")
    if ids is not None:
        bad = (ids >= vocab_size) | (ids < -1) | (used[..., None] & (ids < 0))
        if bad.any():
            i = tuple(int(x) for x in np.argwhere(bad)[0])
            raise FatalError(f"top_k_ids{list(i)} = {int(ids[i])}: not a token id of the {vocab_size}-token "
                             f"vocabulary")


class KServeEngine(RemoteEngine):
    """Base of the KServe v2 engines. Options: ``_remote.OPTION_SPEC`` plus ``headers`` / ``headers_file``
    (extra request headers, e.g. an API gateway's key); ``padding_row`` does not apply (Triton pads nothing).

    Transport hooks (one attempt each; RetryableError / FatalError as in ``RemoteEngine``):
      ``_live() -> bool``; ``_metadata(version) -> dict`` (KServe model metadata: name, versions,
      platform, inputs/outputs as [{name, datatype, shape}]); ``_ready(version) -> bool``;
      ``_config(version) -> dict | None`` ({"max_batch_size": int, "parameters": {key: str}}; None where
      the server has no model-configuration API); ``_index() -> list[dict] | None`` (repository index:
      [{name, version, state, reason}]; None where refused); ``_infer(inputs, outputs, version, request_id,
      limit) -> Reply``.
    """

    def __init__(self, model: ModelDir, *, top_k: bool = False, **options: Any):
        options = dict(options)
        if str(options.get("padding_row", "false")).strip().lower() in ("1", "true", "yes", "on"):
            raise UsageError(f"engine {self.name!r}: padding_row is for TF Serving's batching; Triton's dynamic "
                             f"batcher merges only requests of equal shape and pads nothing (leave it out)")
        options["padding_row"] = False
        self.headers = read_headers(options.pop("headers", None), options.pop("headers_file", None), engine=self.name)
        self.pinned_version: int | None = None
        self.server_max_batch_size: int | None = None
        self.platform = ""
        self._k = int(model.manifest["top_k"])
        self._vocab = int(model.manifest["vocab_size"])
        self._suspect = False
        self._recheck_lock = threading.Lock()
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

    # RemoteEngine's hooks, in KServe terms -----------------------------------------------------------
    def _fetch_status(self) -> list[tuple[int, str, str]]:
        want = "" if self.opts.model_version is None else str(self.opts.model_version)
        meta = self._metadata(want)
        versions = sorted({int(v) for v in meta.get("versions") or [] if str(v).isdigit()})
        if want and int(want) not in versions:
            versions.append(int(want))
        return [(v, "AVAILABLE" if self._ready(str(v)) else "NOT_READY", "") for v in versions]

    def _fetch_signature(self) -> dict[str, dict[str, TensorInfo]]:
        return signature_of(self._metadata(str(self.pinned_version or self.opts.model_version or "")))

    # start-up -----------------------------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return f"{self.name} engine, {self.opts.describe()}"

    def check_server(self) -> int:
        """The start-up checks of the module docstring; returns the pinned version."""
        o = self.opts

        def live() -> None:
            if not self._live():
                raise RetryableError("the server is not live yet")

        self._retry(live, "server liveness", ModelError)
        version = self._retry(self._resolve_version, "model readiness", ModelError)
        self.pinned_version = o.model_version = version  # every later call names it (and so do the messages)
        meta = self._retry(lambda: self._metadata(str(version)), "model metadata", ModelError)
        self.platform = str(meta.get("platform") or "")
        check_signature(signature_of(meta), self.model, want_top_k=self.want_top_k, opts=o)
        for t in meta.get("outputs") or []:
            shape = list(t.get("shape") or [])
            if t.get("name") in TOP_K_OUTPUTS and len(shape) == 3 and shape[2] >= 0 and shape[2] != self._k:
                raise ModelError(f"{self._where}: output {t['name']!r} has top-k width {shape[2]}, the local export "
                                 f"{self.model.path} says top_k={self._k}: a different export is being served")
        cfg = self._retry(lambda: self._config(str(version)), "model configuration", ModelError)
        if cfg is not None:
            self._check_config(cfg)
        if o.check_model:
            self.check_model()
        self._suspect = False  # a connection lost during these checks: the checks themselves ran after it
        log.info("%s engine: %s, version %d ready (%s), signature ok%s", self.name, o.describe(), version,
                 self.platform or "platform unknown",
                 f", max_batch_size {self.server_max_batch_size}" if self.server_max_batch_size else "")
        return version

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
            if self.max_batch_size is None or self.max_batch_size > mbs:
                if self.max_batch_size is not None:
                    log.info("%s: requests capped at the model's max_batch_size %d (asked for %d)", self._where, mbs,
                             self.max_batch_size)
                self.max_batch_size = mbs
        params = cfg.get("parameters") or {}
        local = {"model_checksum": self.model.checksum, "vocab_sha256": self.model.manifest.get("vocab_sha256"),
                 "vocab_size": self._vocab, "top_k": self._k}
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

    # model identity ------------------------------------------------------------------------------------
    def _raw(self, batch: Batch, outputs: list[str]) -> dict[str, np.ndarray] | Exception:
        """One probe through the model, retried while the server is unreachable: the outputs checked for
        structure only, or the server's error answer (a rejection is an answer to a probe)."""
        inputs = {n: np.ascontiguousarray(a, np.int32) for n, a in batch.as_dict().items()}
        B, P = inputs["masked_lm_positions"].shape

        def attempt() -> dict[str, np.ndarray] | Exception:
            rid = self._request_id()
            try:
                reply = self._infer(inputs, outputs, str(self.pinned_version), rid, response_limit(B, P, self._k))
                return check_structure(reply, outputs=outputs, model_name=self.opts.model_name,
                                       version=str(self.pinned_version), request_id=rid, B=B, P=P, k=None)
            except (FatalError, ServerAnswered) as exc:
                return exc

        return self._retry(attempt, "vocabulary probe")

    def check_model(self) -> None:
        """Probe that the served model is the local export: its vocabulary size (target ids V-1 and V), its
        top-k width, and the export's identity probe (raises ModelError naming what differs)."""
        V, where = self._vocab, f"{self._where} vs local export {self.model.path}"
        # First a copy any vocabulary can score (target id 0): an error here is not about the vocabulary (a
        # missing access header, a broken model), and says so instead of being read as a smaller vocabulary.
        first = self._raw(probe_batch(self.model, 0), [LOG_PROBS])
        if isinstance(first, Exception):
            raise ModelError(f"{self._where}: the server does not answer a plain inference request: {first}")
        got = self._raw(probe_batch(self.model, V - 1), [LOG_PROBS, "top_k_ids"])
        if isinstance(got, Exception):
            raise ModelError(f"{where}: the server cannot score target id {V - 1} (the local vocabulary has {V} "
                             f"tokens), so its vocabulary is smaller. Server said: {got}")
        lp = float(got[LOG_PROBS].reshape(-1)[0])
        if not (np.isfinite(lp) and lp < 0):
            raise ModelError(f"{where}: log-prob of target id {V - 1} is {lp}, not a finite negative number: the "
                             f"served vocabulary is smaller than the local one ({V})")
        k = int(got["top_k_ids"].shape[-1])
        if k != self._k:
            raise ModelError(f"{where}: the server returns top-{k}, the local export says top_k={self._k}: a "
                             f"different export is being served")
        top = int(got["top_k_ids"].max())
        if top >= V:
            raise ModelError(f"{where}: the server predicts token id {top}, beyond the local vocabulary of {V} "
                             f"tokens: the served vocabulary is larger")
        over = self._raw(probe_batch(self.model, V), [LOG_PROBS])
        if not isinstance(over, Exception):
            lp = float(over[LOG_PROBS].reshape(-1)[0])
            if np.isfinite(lp) and lp < 0:
                raise ModelError(f"{where}: the server scores target id {V} (log-prob {lp:.4f}) but the local "
                                 f"vocabulary has only {V} tokens: the served vocabulary is larger")
        self._identity(where)

    def _identity(self, where: str) -> None:
        probe = read_identity_probe(self.model)
        if probe is None:
            log.warning("%s: the export records no identity probe; only its vocabulary size was compared", where)
            return
        batch, expected = probe
        inputs = {n: np.ascontiguousarray(a, np.int32) for n, a in batch.as_dict().items()}

        def attempt() -> dict[str, np.ndarray] | Exception:
            try:
                return self._predict_once(inputs, [LOG_PROBS])
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

    def _recheck(self) -> None:
        """After a lost connection: the identity probe again (once, whichever thread gets here first)."""
        with self._recheck_lock:
            if not self._suspect:
                return
            log.warning("%s: the connection was lost; checking that the server still serves the local export",
                        self._where)
            self._suspect = False  # a failure during the probe sets it again
            try:
                self._identity(f"{self._where} after reconnecting")
            except BaseException:
                self._suspect = True
                raise

    # scoring ------------------------------------------------------------------------------------------
    def _request_id(self) -> str:
        return f"mlm-{self._run_id}-{next(self._ids)}"

    def _predict_once(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One validated inference on the pinned version: {output: array} with impossible values refused."""
        B, P = inputs["masked_lm_positions"].shape
        rid = self._request_id()
        version = str(self.pinned_version)
        try:
            reply = self._infer(inputs, outputs, version, rid, response_limit(B, P, self._k))
        except Disconnected:
            self._suspect = True
            raise
        got = check_structure(reply, outputs=outputs, model_name=self.opts.model_name, version=version,
                              request_id=rid, B=B, P=P, k=self._k)
        check_values(got, inputs["masked_lm_positions"], self._vocab)
        return got

    def score_batch(self, batch: Batch) -> BatchResult:
        """One request: int32 [B,T]/[B,P] inputs -> float32 [B,P] log-probs (+ int32/float32 [B,P,k] top-k)."""
        inputs = {n: np.ascontiguousarray(a, dtype=np.int32) for n, a in batch.as_dict().items()}
        B = inputs["masked_lm_positions"].shape[0]
        out = self._retry(lambda: self._predict_once(inputs, self._outputs), f"inference on {B} copies")
        if self._suspect:
            self._recheck()
        res = BatchResult(log_probs=out[LOG_PROBS])
        if self.want_top_k:
            res.top_k_ids, res.top_k_log_probs = out["top_k_ids"], out["top_k_log_probs"]
        return res


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
    scheme = server.split("://", 1)[0].lower() if "://" in server else "http"
    engine = "kserve_grpc" if scheme in ("grpc", "grpcs") else "kserve_http"
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
    kserve_http/kserve_grpc; ``auto`` asks the server (``detect_protocol``)."""
    scheme = server.split("://", 1)[0].lower() if "://" in server else ""
    grpc = scheme in ("grpc", "grpcs")
    if protocol == "auto":
        protocol = detect_protocol(server, options)
        if log_fn:
            log_fn(f"{server} speaks {'KServe v2' if protocol == 'kserve' else 'the TF Serving API'}")
    if protocol == "kserve":
        return "kserve_grpc" if grpc else "kserve_http"
    if protocol == "tfserving":
        return "grpc" if grpc else "rest"
    raise UsageError(f"--protocol must be auto, kserve or tfserving, not {protocol!r}")
