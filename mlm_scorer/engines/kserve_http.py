"""KServe v2 over HTTP/REST (``--engine kserve_http``; ``requests`` only: no TensorFlow, no tritonclient).

Calls (the KServe v2 REST protocol as Triton documents it):

* ``GET  /v2/health/live``                        200 when the server is up
* ``GET  /v2/models/NAME[/versions/V]``           model metadata: versions, platform, inputs, outputs
* ``GET  /v2/models/NAME/versions/V/ready``       200 when that version is ready
* ``GET  /v2/models/NAME/versions/V/config``      Triton's model configuration (max_batch_size, parameters)
* ``POST /v2/repository/index``                   Triton's repository index (state and reason of a model
                                                  that is not ready; often access-restricted: optional)
* ``POST /v2/models/NAME/versions/V/infer``       inference, with the *binary tensor data extension*: the
  body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw little-endian
  int32 inputs (``parameters.binary_data_size`` on each input); each requested output asks for
  ``binary_data: true`` and comes back the same way after the response's JSON header.

Errors are ``{"error": "..."}`` with Triton's status mapping. Retried: connection failures, timeouts, 429,
500, 502, 503, 504, and during a run an "unknown model" / "not ready" answer (a restarting server loads its
models after it starts listening). Failing at once: other 4xx.

Each response is read with a wall-clock deadline (``timeout`` seconds from sending the request to the
last byte, not per socket read: a server trickling bytes is cut off) and a size bound computed from the
request (``_remote.response_limit``): a larger answer is refused (BadResponseError) before it is read
whole. A malformed answer is a BadResponseError too; its outputs are checked by ``kserve_base`` and
``_remote``.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable

import numpy as np
import requests

from ._remote import (OUTPUT_DTYPES, RESPONSE_OVERHEAD, BadResponseError, FatalError, RemoteOptions, RetryableError,
                      ServerAnswered, http_session, read_bearer_token, short_reason)
from .kserve_base import KServeEngine, ModelNotReady, Reply

RETRY_STATUS = frozenset({429, 502, 503, 504})
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Largest answer to a control call (health, metadata, config, index).
CONTROL_LIMIT = 4 << 20
_NP = {"INT32": "<i4", "FP32": "<f4", "INT64": "<i8", "FP64": "<f8"}


def _abort(resp: requests.Response) -> None:
    """Cut a response off mid-read (its deadline passed): shut the socket so a blocked read returns."""
    conn = getattr(resp.raw, "connection", None) or getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def call(session: requests.Session, method: str, url: str, *, timeout: float, connect_timeout: float, limit: int,
         body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange: (status, headers, body), the body read whole within ``timeout`` seconds of sending
    and refused past ``limit`` bytes. Transport failures raise RetryableError, TLS errors FatalError, an
    oversized answer BadResponseError."""
    deadline = time.monotonic() + timeout
    try:
        resp = session.request(method, url, data=body, headers=headers, timeout=(connect_timeout, timeout),
                               stream=True)
    except requests.exceptions.SSLError as exc:
        raise FatalError(f"TLS error talking to {url}: {exc}") from None
    except requests.exceptions.Timeout as exc:
        raise RetryableError(f"timed out ({type(exc).__name__}, timeout {timeout:g}s)") from None
    except requests.exceptions.ConnectionError as exc:
        raise RetryableError(f"connection failed ({short_reason(exc)})") from None
    except requests.exceptions.RequestException as exc:
        raise RetryableError(f"{type(exc).__name__}: {short_reason(exc)}") from None
    expired = threading.Event()

    def fire() -> None:
        expired.set()
        _abort(resp)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
    timer.daemon = True
    timer.start()
    try:
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadResponseError(f"HTTP {resp.status_code} answer of {int(declared)} bytes from {method} {url} is "
                                   f"larger than the {limit} bytes the request allows")
        parts, size = [], 0
        for chunk in resp.iter_content(1 << 16):
            size += len(chunk)
            if size > limit:
                raise BadResponseError(f"the answer to {method} {url} exceeds the {limit} bytes the request allows")
            parts.append(chunk)
        data = b"".join(parts)
    except requests.exceptions.RequestException as exc:
        if expired.is_set():
            raise RetryableError(f"timed out: the answer was not complete within {timeout:g}s") from None
        raise RetryableError(f"{type(exc).__name__} while reading the answer: {short_reason(exc)}") from None
    except OSError as exc:  # a socket error surfacing raw from the aborted read
        if expired.is_set():
            raise RetryableError(f"timed out: the answer was not complete within {timeout:g}s") from None
        raise RetryableError(f"{type(exc).__name__} while reading the answer: {exc}") from None
    finally:
        timer.cancel()
        resp.close()
    if expired.is_set():
        raise RetryableError(f"timed out: the answer was not complete within {timeout:g}s")
    return resp.status_code, dict(resp.headers), data


def error_text(status: int, data: bytes, method: str, url: str) -> str:
    message = ""
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and "error" in doc:
            message = str(doc["error"])
    except ValueError:
        pass
    if not message:
        message = data.decode("utf-8", "replace").strip()[:300] or "(empty body)"
    return f"HTTP {status} from {method} {url}: {message}"


def _unknown_model(text: str) -> bool:
    t = text.lower()
    return "unknown model" in t or "not at ready state" in t or "no available versions" in t


class KServeHttpEngine(KServeEngine):
    """KServe v2 REST client with binary tensors. Options: ``_remote.OPTION_SPEC`` + headers, headers_file."""

    name = "kserve_http"
    SCHEMES = {"http": 8000, "https": 8000}

    def _connect(self) -> None:
        o = self.opts
        self._session = http_session(o, self._token, engine=self.name, headers=self.headers)
        self._base = f"{o.scheme}://{o.host}:{o.port}{o.base_path}"

    def _model_url(self, version: str) -> str:
        url = f"{self._base}/v2/models/{self.opts.model_name}"
        return f"{url}/versions/{version}" if version else url

    def _exchange(self, method: str, url: str, *, limit: int = CONTROL_LIMIT, body: bytes | None = None,
                  headers: dict[str, str] | None = None, in_run: bool = False) -> tuple[int, dict[str, str], bytes]:
        status, hdrs, data = call(self._session, method, url, timeout=self.opts.timeout,
                                  connect_timeout=self.opts.connect_timeout, limit=limit, body=body, headers=headers)
        if status == 200:
            return status, hdrs, data
        text = error_text(status, data, method, url)
        if status in RETRY_STATUS:
            raise RetryableError(text)
        if status == 500:
            raise ServerAnswered(text)
        if in_run and _unknown_model(text):
            raise RetryableError(text + " (the model is being loaded again?)")
        raise FatalError(text)

    def _json(self, method: str, url: str, body: bytes | None = None) -> Any:
        _, _, data = self._exchange(method, url, body=body)
        try:
            return json.loads(data)
        except ValueError:
            raise RetryableError(f"HTTP 200 from {method} {url} with a body that is not JSON ({len(data)} bytes)") from None

    def _live(self) -> bool:
        url = f"{self._base}/v2/health/live"
        status, _, data = call(self._session, "GET", url, timeout=self.opts.timeout,
                               connect_timeout=self.opts.connect_timeout, limit=CONTROL_LIMIT)
        if status in (400, 401, 403, 404, 405):  # a server, but not KServe v2 (or it refuses us): waiting won't help
            raise FatalError(error_text(status, data, "GET", url) + " (is it a KServe v2 server? TF Serving: "
                                                                      "--protocol tfserving)")
        return status == 200

    def _metadata(self, version: str) -> dict[str, Any]:
        url = self._model_url(version)
        try:
            doc = self._json("GET", url)
        except FatalError as exc:
            if "no available versions" in str(exc) or "not at ready state" in str(exc):
                raise ModelNotReady(str(exc)) from None
            raise
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
            raise FatalError(f"GET {url}: not KServe v2 model metadata: {str(doc)[:200]}")
        return doc

    def _ready(self, version: str) -> bool:
        status, _, _ = call(self._session, "GET", self._model_url(version) + "/ready", timeout=self.opts.timeout,
                            connect_timeout=self.opts.connect_timeout, limit=CONTROL_LIMIT)
        return status == 200

    def _config(self, version: str) -> dict[str, Any] | None:
        url = self._model_url(version) + "/config"
        try:
            doc = self._json("GET", url)
        except FatalError:  # no model-configuration extension (KServe servers other than Triton), or refused
            return None
        if not isinstance(doc, dict):
            return None
        params = {k: (v.get("string_value") if isinstance(v, dict) else v)
                  for k, v in (doc.get("parameters") or {}).items()}
        return {"max_batch_size": int(doc.get("max_batch_size") or 0), "parameters": params}

    def _index(self) -> list[dict[str, str]] | None:
        try:
            doc = self._json("POST", f"{self._base}/v2/repository/index", body=b"{}")
        except FatalError:
            return None
        return doc if isinstance(doc, list) else None

    def _infer(self, inputs: dict[str, np.ndarray], outputs: list[str], version: str, request_id: str,
               limit: int) -> Reply:
        url = self._model_url(version) + "/infer"
        body, header_len = encode_request(inputs, outputs, request_id)
        _, hdrs, data = self._exchange("POST", url, limit=limit, body=body, in_run=True,
                                       headers={"Content-Type": "application/octet-stream",
                                                HEADER_LENGTH: str(header_len)})
        return decode_response(data, hdrs)


def encode_request(inputs: dict[str, np.ndarray], outputs: list[str], request_id: str) -> tuple[bytes, int]:
    """(body, JSON header length): the JSON inference request, then each int32 input's little-endian bytes."""
    raw = [np.ascontiguousarray(a, dtype="<i4").tobytes() for a in inputs.values()]
    header = {"id": request_id,
              "inputs": [{"name": n, "shape": list(a.shape), "datatype": "INT32",
                          "parameters": {"binary_data_size": len(b)}}
                         for (n, a), b in zip(inputs.items(), raw)],
              "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs]}
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b"".join(raw), len(head)


def decode_response(data: bytes, headers: dict[str, str]) -> Reply:
    """A KServe v2 inference response (JSON, or JSON + binary tensors) -> Reply; BadResponseError if malformed
    (a tensor of a datatype other than INT32/FP32/INT64/FP64, or of binary data not a whole number of
    values, is kept empty, for ``kserve_base.output_array`` to refuse by name)."""
    hlen = headers.get(HEADER_LENGTH) or headers.get(HEADER_LENGTH.lower())
    try:
        n = int(hlen) if hlen is not None else len(data)
    except ValueError:
        raise BadResponseError(f"response header {HEADER_LENGTH} is not a number: {hlen[:40]!r}") from None
    if not 0 < n <= min(len(data), RESPONSE_OVERHEAD):
        raise BadResponseError(f"response JSON header of {n} bytes does not fit the {len(data)}-byte answer")
    try:
        doc = json.loads(data[:n])
    except ValueError:
        raise BadResponseError(f"the response's JSON header is not JSON ({n} bytes)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise BadResponseError(f"not a KServe v2 inference response: {str(doc)[:200]}")
    offset, outs = n, {}
    for t in doc["outputs"]:
        try:
            name, datatype, shape = str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise BadResponseError(f"malformed output entry in the response: {str(t)[:200]}") from None
        if name in outs:
            raise BadResponseError(f"output {name!r} appears twice in the response")
        size = (t.get("parameters") or {}).get("binary_data_size")
        dtype = _NP.get(datatype)
        if size is not None:
            size = int(size)
            if size < 0 or offset + size > len(data):
                raise BadResponseError(f"output {name!r} declares {size} bytes of binary data; the answer has "
                                 f"{len(data) - offset} left")
            chunk = data[offset:offset + size]
            offset += size
            if dtype is None or size % np.dtype(dtype).itemsize:
                outs[name] = (datatype, shape, np.zeros(0, np.uint8))  # refused by output_array
                continue
            flat = np.frombuffer(chunk, dtype=dtype)
        elif "data" in t:  # JSON tensor data (a server ignoring binary_data)
            if dtype is None:
                outs[name] = (datatype, shape, np.zeros(0, np.uint8))
                continue
            try:
                flat = np.asarray(t["data"], dtype=dtype).reshape(-1)
            except (TypeError, ValueError):
                raise BadResponseError(f"output {name!r} has data that is not {datatype}") from None
        else:
            raise BadResponseError(f"output {name!r} has neither binary_data_size nor data")
        want = np.dtype(OUTPUT_DTYPES[name]) if name in OUTPUT_DTYPES else flat.dtype.newbyteorder("=")
        outs[name] = (datatype, shape, flat.astype(want, copy=False) if flat.dtype == want else flat)
    if offset != len(data):
        raise BadResponseError(f"the response carries {len(data) - offset} bytes beyond its declared tensors")
    return Reply(model_name=str(doc.get("model_name", "")), model_version=str(doc.get("model_version", "") or ""),
                 id=str(doc.get("id", "") or ""), outputs=outs)


def detect(o: RemoteOptions, headers: dict[str, str]) -> Callable[[], str]:
    """One detection attempt for ``kserve_base.detect_protocol``: "kserve" when ``/v2/health/live`` answers
    200 (or ``/v2`` returns KServe server metadata), "tfserving" when ``/v1/models/NAME`` answers TF Serving's
    JSON, FatalError otherwise."""
    base = f"{o.scheme}://{o.host}:{o.port}{o.base_path}"

    def attempt() -> str:
        with http_session(o, read_bearer_token(o), engine="kserve_http", headers=headers) as s:
            kw = dict(timeout=o.timeout, connect_timeout=o.connect_timeout, limit=CONTROL_LIMIT)
            status, _, data = call(s, "GET", f"{base}/v2/health/live", **kw)
            if status == 200:
                return "kserve"
            status2, _, data2 = call(s, "GET", f"{base}/v2", **kw)
            doc = _maybe_json(data2)
            if status2 == 200 and isinstance(doc, dict) and "extensions" in doc:
                return "kserve"
            status3, _, data3 = call(s, "GET", f"{base}/v1/models/{o.model_name}", **kw)
            doc = _maybe_json(data3)
            if isinstance(doc, dict) and ("model_version_status" in doc or "error" in doc):
                return "tfserving"
            if status3 in RETRY_STATUS or status in RETRY_STATUS:
                raise RetryableError(f"HTTP {status} from /v2/health/live, {status3} from /v1/models/{o.model_name}")
            raise FatalError(f"{base} answers neither KServe v2 (GET /v2/health/live: HTTP {status}) nor TF Serving "
                             f"(GET /v1/models/{o.model_name}: HTTP {status3}); pass --protocol kserve or tfserving")

    return attempt


def _maybe_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
