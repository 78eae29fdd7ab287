"""TensorFlow Serving over REST (``requests``; needs neither TensorFlow nor gRPC).

Follows https://www.tensorflow.org/tfx/serving/api_rest:

* status   ``GET  {server}/v1/models/{name}`` -> ``{"model_version_status": [...]}`` (every version)
* metadata ``GET  {server}/v1/models/{name}/versions/{v}/metadata`` -> GetModelMetadataResponse as JSON
* predict  ``POST {server}/v1/models/{name}/versions/{v}:predict`` with the columnar format
  ``{"signature_name": "serving_default", "inputs": {name: nested list}}`` -> ``{"outputs": {name: ...}}``
  (``-Infinity`` appears in ``top_k_log_probs`` for unused slots; Python's ``json`` reads it).
  ``v`` is the version the start-up checks verified: no call after them reaches another version.
* errors   ``{"error": "<message>"}`` with the HTTP status TF Serving maps from its status code
  (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504...).

Every attempt has one wall-clock deadline (``timeout``) for the whole exchange, the body included: a
watchdog shuts the connection down when it passes, so a body that never ends or arrives a byte at a
time cannot hold a request. A predict answer may be at most ``response_limit`` bytes for its request
(about 32 bytes per value it can hold); a larger one is refused while it arrives. Bodies are asked for
uncompressed (``Accept-Encoding: identity``), so no compressed body can expand past that limit.

Retried: connection errors, timeouts, 429 and 5xx other than 501. Failing at once: other 4xx and 501, and
an answer that cannot be used (not JSON, over its size limit, a malformed or impossible tensor).
"""
from __future__ import annotations

import json
import socket
import threading
from typing import Any

import numpy as np
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ..errors import ModelError
from ._remote import (LOG_PROBS, OUTPUT_DTYPES, TF_DTYPES, BadResponseError, FatalError, NotFoundError, OutputSpec,
                      RemoteEngine, RetryableError, TensorInfo, http_session, response_limit, short_reason)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: JSON bytes one number of an answer may take (TF Serving writes at most ~15; separators, brackets).
JSON_BYTES_PER_VALUE = 32
#: the most bytes a status, metadata or error body may take
SMALL_BODY = 16 << 20
ALL_OUTPUTS = (LOG_PROBS, "top_k_ids", "top_k_log_probs")  # REST has no output filter: every output comes


# ------------------------------------------------------------------------------------ deadline per attempt

_active = threading.local()


class _Watch:
    """One attempt's wall-clock deadline. When it passes, the connection the attempt uses is shut down,
    which ends any read blocked on it at once (a socket timeout alone bounds each read, not the sum)."""

    def __init__(self, seconds: float):
        self.conn: HTTPConnection | None = None
        self.fired = False
        self._done = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Watch":
        _active.watch = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()
        _active.watch = None

    def disarm(self) -> None:
        """The answer is complete: the deadline no longer applies."""
        with self._lock:
            self._done = True
            self._timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            sock = getattr(self.conn, "sock", None)
            if sock is None:  # still connecting (connect_timeout bounds that): look again shortly
                self._timer = threading.Timer(0.05, self._fire)
                self._timer.daemon = True
                self._timer.start()
                return
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, under TLS too
        except OSError:
            pass


class _Tracked:
    """Tells the current attempt's ``_Watch`` which connection carries it."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        watch = getattr(_active, "watch", None)
        if watch is not None:
            watch.conn = self
        return super().request(*args, **kwargs)


class _HTTPConnection(_Tracked, HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


# ------------------------------------------------------------------------------------------------ engine

class RestEngine(RemoteEngine):
    """TF Serving REST client. Options: see ``mlm_scorer.engines._remote.OPTION_SPEC``."""

    name = "rest"
    SCHEMES = {"http": 8501, "https": 8501}

    def _connect(self) -> None:
        o = self.opts
        self._session = http_session(o, self._token, engine=self.name, adapter=_Adapter,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        self._model_root = f"{o.scheme}://{o.host}:{o.port}{o.base_path}/v1/models/{o.model_name}"
        self._timeouts = (o.connect_timeout, o.timeout)

    @property
    def _root(self) -> str:
        """The model's URL, with the version once it is known (pinned by the start-up checks)."""
        v = self.opts.model_version
        return self._model_root + (f"/versions/{v}" if v is not None else "")

    # one attempt of an HTTP call --------------------------------------------------------------
    def _call(self, method: str, url: str, body: bytes | None = None, *, limit: int = SMALL_BODY) -> bytes:
        """One exchange within the ``timeout`` deadline; the body of a 200 (at most ``limit`` bytes)."""
        t = self.opts.timeout
        with _Watch(t) as watch:
            try:
                r = self._session.request(method, url, data=body, timeout=self._timeouts, stream=True)
                try:
                    status = r.status_code
                    data = _read(r, limit if status == 200 else 1 << 16, status == 200)
                    watch.disarm()  # complete (a cut body raises): whatever the watchdog did, it is whole
                finally:
                    r.close()
            except requests.exceptions.SSLError as exc:
                if watch.fired:
                    raise RetryableError(f"timed out: no complete answer within the {t:g}s deadline") from None
                raise FatalError(f"TLS error talking to {url}: {exc}") from None
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
                # (reading the body with raw.stream raises urllib3's own errors)
                if watch.fired:  # the watchdog cut the connection
                    raise RetryableError(f"timed out: no complete answer within the {t:g}s deadline (the "
                                         f"timeout covers reading the body)") from None
                if isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
                    raise RetryableError(f"timed out ({type(exc).__name__}, timeout {t:g}s)") from None
                if isinstance(exc, requests.exceptions.ConnectionError):
                    raise RetryableError(f"connection failed ({short_reason(exc)})") from None
                raise RetryableError(f"{type(exc).__name__}: {short_reason(exc)}") from None  # e.g. a dropped stream
        if status == 200:
            return data
        text = f"HTTP {status} from {method} {url}: {_error_message(data, r.reason)}"
        if status in RETRY_STATUS:
            raise RetryableError(text)
        if status == 404:
            raise NotFoundError(text)
        raise FatalError(text)

    def _get_json(self, url: str) -> Any:
        return _parse_json(self._call("GET", url))

    def _fetch_status(self) -> list[tuple[int, str, str]]:
        doc = self._get_json(self._model_root)  # every version, whichever is pinned
        try:
            return [(int(v["version"]), str(v.get("state", "UNKNOWN")),
                     str(v.get("status", {}).get("error_message", ""))) for v in doc["model_version_status"]]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise FatalError(f"unexpected model status response from {self._model_root}: {str(doc)[:200]}") from None

    def _fetch_signature(self) -> dict[str, dict[str, TensorInfo]]:
        doc = self._get_json(self._root + "/metadata")
        try:
            sigs = doc["metadata"]["signature_def"]["signature_def"]
            sig = sigs.get("serving_default")
        except (KeyError, TypeError, AttributeError):
            raise FatalError(f"unexpected metadata response from {self._root}/metadata: {str(doc)[:200]}") from None
        if sig is None:
            raise ModelError(f"{self.opts.describe()}: the served model has no 'serving_default' signature; "
                             f"it has: {', '.join(sorted(sigs)) or 'none'}")
        try:
            return {kind: {name: _tensor_info(t) for name, t in sig.get(kind, {}).items()}
                    for kind in ("inputs", "outputs")}
        except (TypeError, AttributeError):
            raise FatalError(f"unexpected metadata response from {self._root}/metadata: {str(doc)[:200]}") from None

    def _predict_once(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        # Columnar ("inputs") format. REST has no output filter: the server returns every output, so the
        # size limit allows for all three.
        specs = self.expect(inputs, ALL_OUTPUTS)
        body = json.dumps({"signature_name": "serving_default",
                           "inputs": {k: v.tolist() for k, v in inputs.items()}}, separators=(",", ":"))
        data = self._call("POST", self._root + ":predict", body.encode(),
                          limit=response_limit(specs.values(), JSON_BYTES_PER_VALUE))
        doc = _parse_json(data)
        outs = doc.get("outputs") if isinstance(doc, dict) else None
        if outs is None:
            raise BadResponseError(f"predict response has no 'outputs' key: {str(doc)[:200]}")
        if not isinstance(outs, dict):  # a single-output signature: "outputs" is the tensor itself
            outs = {outputs[0]: outs}
        missing = [n for n in outputs if n not in outs]
        if missing:
            raise BadResponseError(f"predict response lacks output(s) {missing}; it has {sorted(outs)[:10]}")
        # true/false/null never appear in a well-formed answer; NumPy would read true as 1
        literals = any(w in data for w in (b"true", b"false", b"null"))
        return {n: json_tensor(outs[n], specs[n], check_literals=literals) for n in outputs}


# ------------------------------------------------------------------------------------------------ bodies

def _read(r: "requests.Response", limit: int, refuse: bool) -> bytes:
    """At most ``limit`` bytes of ``r``'s body: BadResponseError past it when ``refuse`` (a predict
    answer), else the first ``limit`` bytes (an error body, for its message)."""
    declared = r.headers.get("Content-Length", "")
    if refuse and declared.isdigit() and int(declared) > limit:
        raise BadResponseError(f"the answer is {int(declared):,} bytes (Content-Length), more than the "
                               f"{limit:,} its request can need")
    buf = bytearray()
    for chunk in r.raw.stream(1 << 16, decode_content=False):
        buf += chunk
        if len(buf) > limit:
            if refuse:
                raise BadResponseError(f"the answer is more than the {limit:,} bytes its request can need; "
                                       f"refused while it was arriving")
            del buf[limit:]
            break
    return bytes(buf)


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise BadResponseError(f"HTTP 200 with a body nested too deeply to be an answer ({len(data)} bytes)") from None
    except ValueError:
        raise BadResponseError(f"HTTP 200 with a body that is not JSON ({len(data)} bytes: "
                               f"{data[:80].decode('utf-8', 'replace')!r})") from None


_KINDS = {"U": "strings", "S": "strings", "O": "values that are not one kind of number (mixed types, or integers "
          "too large)", "b": "true/false", "f": "fractional numbers", "c": "complex numbers"}


def json_tensor(value: Any, spec: OutputSpec, *, check_literals: bool = True) -> np.ndarray:
    """A JSON output (nested lists) as an array of ``spec.dtype``, or BadResponseError: not a rectangular
    array of numbers (strings, ragged rows, true/false/null, an integer past int32), or a shape the request
    does not allow. ``check_literals``: look for true/false/null, which NumPy would take for 1/0."""
    want = OUTPUT_DTYPES[spec.name]
    try:
        a = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadResponseError(f"output {spec.name!r} is not a rectangular array of numbers "
                               f"({str(exc).splitlines()[0][:120]})") from None
    ok = "iu" + ("f" if want == "float32" else "")
    if a.dtype.kind not in ok:
        if check_literals and _has_literal(value):
            raise BadResponseError(f"output {spec.name!r} holds true, false or null where numbers belong")
        raise BadResponseError(f"output {spec.name!r} holds {_KINDS.get(a.dtype.kind, str(a.dtype))} where "
                               f"{'numbers' if want == 'float32' else 'integer ids'} belong")
    spec.check_shape(a.shape)
    if check_literals and _has_literal(value):
        raise BadResponseError(f"output {spec.name!r} holds true, false or null where numbers belong")
    if want == "int32":
        if a.size and (int(a.min()) < -(2 ** 31) or int(a.max()) >= 2 ** 31):
            raise BadResponseError(f"output {spec.name!r} holds integers outside int32")
        return a.astype(np.int32)
    with np.errstate(over="ignore"):
        return a.astype(np.float32)


def _has_literal(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif v is None or isinstance(v, bool):
            return True
    return False


def _tensor_info(t: dict) -> TensorInfo:
    shape = t.get("tensor_shape", {})
    rank = None if shape.get("unknown_rank") else len(shape.get("dim", []))
    return TensorInfo(TF_DTYPES.get(t.get("dtype", ""), str(t.get("dtype"))), rank)


def _error_message(data: bytes, reason: str | None) -> str:
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])[:2000]
    except (ValueError, RecursionError):
        pass
    text = data.decode("utf-8", "replace").strip()
    return text[:300] if text else reason or "(empty body)"
