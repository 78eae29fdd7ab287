"""TensorFlow Serving over REST (``requests``; needs neither TensorFlow nor gRPC).

Follows https://www.tensorflow.org/tfx/serving/api_rest:

* status   ``GET  {server}/v1/models/{name}[/versions/{v}]`` -> ``{"model_version_status": [...]}``
* metadata ``GET  {server}/v1/models/{name}[/versions/{v}]/metadata`` -> GetModelMetadataResponse as JSON
* predict  ``POST {server}/v1/models/{name}[/versions/{v}]:predict`` with the columnar format
  ``{"signature_name": "serving_default", "inputs": {name: nested list}}`` -> ``{"outputs": {name: ...}}``
  (``-Infinity`` appears in ``top_k_log_probs`` for unused slots; Python's ``json`` reads it).
* errors   ``{"error": "<message>"}`` with the HTTP status TF Serving maps from its status code
  (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504...).

Retried: connection errors, timeouts, 429 and 5xx other than 501. Failing at once: other 4xx and 501.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import requests
from requests.adapters import HTTPAdapter

from ..errors import ModelError, UsageError
from ._remote import TF_DTYPES, FatalError, RemoteEngine, RetryableError, TensorInfo

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RestEngine(RemoteEngine):
    """TF Serving REST client. Options: see ``mlm_scorer.engines._remote.OPTION_SPEC``."""

    name = "rest"
    SCHEMES = {"http": 8501, "https": 8501}

    def _connect(self) -> None:
        o = self.opts
        if o.tls_server_name:
            raise UsageError("engine 'rest': tls_server_name is a gRPC option; for https put the certificate's "
                             "host name in the server URL")
        if not o.tls and (o.tls_ca_file or o.tls_cert_file):
            raise UsageError("engine 'rest': TLS files were given but the server URL is http://; use https://")
        self._root = f"{o.scheme}://{o.host}:{o.port}{o.base_path}/v1/models/{o.model_name}"
        if o.model_version is not None:
            self._root += f"/versions/{o.model_version}"
        s = requests.Session()
        # One pool to one host, as many connections as requests in flight; retries are ours, not urllib3's.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=o.concurrency, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.trust_env = False  # no proxy or .netrc surprises: the server is given explicitly
        s.headers.update({"Content-Type": "application/json", "Accept": "application/json"})
        if self._token:
            s.headers["Authorization"] = f"Bearer {self._token}"
        if o.tls:
            s.verify = o.tls_ca_file or o.tls_verify
            if o.tls_cert_file:
                s.cert = (o.tls_cert_file, o.tls_key_file)
        self._session = s
        self._timeouts = (o.connect_timeout, o.timeout)

    def _close_transport(self) -> None:
        s = getattr(self, "_session", None)
        if s is not None:
            s.close()

    # one attempt of an HTTP call --------------------------------------------------------------
    def _call(self, method: str, url: str, body: bytes | None = None) -> Any:
        try:
            r = self._session.request(method, url, data=body, timeout=self._timeouts)
        except requests.exceptions.SSLError as exc:
            raise FatalError(f"TLS error talking to {url}: {exc}") from None
        except requests.exceptions.Timeout as exc:
            raise RetryableError(f"timed out ({type(exc).__name__}, timeout {self.opts.timeout:g}s)") from None
        except requests.exceptions.ConnectionError as exc:
            raise RetryableError(f"connection failed ({_short(exc)})") from None
        except requests.exceptions.RequestException as exc:  # ChunkedEncodingError etc.: a dropped stream
            raise RetryableError(f"{type(exc).__name__}: {_short(exc)}") from None
        if r.status_code == 200:
            try:
                return json.loads(r.content)
            except ValueError:
                raise RetryableError(f"HTTP 200 with a body that is not JSON ({len(r.content)} bytes)") from None
        message = _error_message(r)
        text = f"HTTP {r.status_code} from {method} {url}: {message}"
        if r.status_code in RETRY_STATUS:
            raise RetryableError(text)
        raise FatalError(text)

    def _fetch_status(self) -> list[tuple[int, str, str]]:
        doc = self._call("GET", self._root)
        try:
            return [(int(v["version"]), str(v.get("state", "UNKNOWN")),
                     str(v.get("status", {}).get("error_message", ""))) for v in doc["model_version_status"]]
        except (KeyError, TypeError, ValueError):
            raise FatalError(f"unexpected model status response from {self._root}: {str(doc)[:200]}") from None

    def _fetch_signature(self) -> dict[str, dict[str, TensorInfo]]:
        doc = self._call("GET", self._root + "/metadata")
        try:
            sigs = doc["metadata"]["signature_def"]["signature_def"]
        except (KeyError, TypeError):
            raise FatalError(f"unexpected metadata response from {self._root}/metadata: {str(doc)[:200]}") from None
        sig = sigs.get("serving_default")
        if sig is None:
            raise ModelError(f"{self.opts.describe()}: the served model has no 'serving_default' signature; "
                             f"it has: {', '.join(sorted(sigs)) or 'none'}")
        return {kind: {name: _tensor_info(t) for name, t in sig.get(kind, {}).items()}
                for kind in ("inputs", "outputs")}

    def _predict_once(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        # Columnar ("inputs") format. REST has no output filter: the server returns every output.
        body = json.dumps({"signature_name": "serving_default",
                           "inputs": {k: v.tolist() for k, v in inputs.items()}}, separators=(",", ":"))
        doc = self._call("POST", self._root + ":predict", body.encode())
        outs = doc.get("outputs") if isinstance(doc, dict) else None
        if outs is None:
            raise FatalError(f"predict response has no 'outputs' key: {str(doc)[:200]}")
        if not isinstance(outs, dict):  # a single-output signature: "outputs" is the tensor itself
            outs = {outputs[0]: outs}
        missing = [n for n in outputs if n not in outs]
        if missing:
            raise FatalError(f"predict response lacks output(s) {missing}; it has {sorted(outs)}")
        return {n: np.asarray(outs[n], dtype=np.int32 if n == "top_k_ids" else np.float32) for n in outputs}


def _tensor_info(t: dict) -> TensorInfo:
    shape = t.get("tensor_shape", {})
    rank = None if shape.get("unknown_rank") else len(shape.get("dim", []))
    return TensorInfo(TF_DTYPES.get(t.get("dtype", ""), str(t.get("dtype"))), rank)


def _error_message(r: "requests.Response") -> str:
    try:
        doc = r.json()
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    except ValueError:
        pass
    text = r.text.strip()
    return text[:300] if text else r.reason or "(empty body)"


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, without the long URL-and-pool preamble."""
    msg = str(exc)
    for marker in ("Connection refused", "Connection reset", "Connection aborted", "Name or service not known",
                   "RemoteDisconnected", "Remote end closed", "timed out"):
        if marker in msg:
            return marker
    return msg[:200]
