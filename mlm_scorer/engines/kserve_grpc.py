"""KServe v2 over gRPC (``--engine kserve_grpc``; grpcio and protobuf only: no TensorFlow, no tritonclient).

Service ``inference.GRPCInferenceService`` (Triton's ``grpc_service.proto``), unary calls with messages
built from a hand-written descriptor (``kserve_proto``):

* ``ServerLive`` -> live; ``ModelMetadata(name, version)`` -> versions, platform, inputs, outputs;
* ``ModelReady(name, version)`` -> ready; ``ModelConfig(name, version)`` -> Triton's ModelConfig
  (max_batch_size, parameters); ``RepositoryIndex`` -> state and reason of a model that is not ready;
* ``ModelInfer(model_name, model_version, id, inputs, outputs, raw_input_contents)``: each input INT32 with
  its shape and its little-endian bytes in ``raw_input_contents``; outputs come back in
  ``raw_output_contents`` (or typed ``contents``), in the order of ``outputs``.

Every call has a deadline (``timeout``), which covers the whole response. Responses larger than what the
largest request allows (``max_batch_size`` copies of ``max_seq_length`` slots, ``RemoteEngine.largest_answer``)
are refused by the channel, and each answer's tensors past what its own request allows by
``decode_response`` (BadResponseError, as a malformed answer is). Status codes retried: UNAVAILABLE,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, INTERNAL (a model execution error), and during a run NOT_FOUND for
a model being loaded again; others fail at once.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc
import numpy as np

from ._remote import (OUTPUT_DTYPES, RETRY_CODE_NAMES, BadResponseError, FatalError, RemoteOptions, RetryableError,
                      ServerAnswered, grpc_channel, read_bearer_token, rpc_failure)
from .kserve_base import KServeEngine, ModelNotReady, Reply
from .kserve_proto import METHOD_PATH, METHODS, pb

_NP = {"INT32": "<i4", "FP32": "<f4", "INT64": "<i8", "FP64": "<f8"}
_CONTENTS = {"INT32": "int_contents", "FP32": "fp32_contents"}


def _triton_failure(code: str, detail: str, text: str, in_run: bool) -> Exception | None:
    """How Triton's codes differ from ``_remote.rpc_failure``'s reading: its access restriction answers
    UNAVAILABLE (not worth retrying: say which header it wants), INTERNAL is a model execution error (retried;
    an answer to a probe), and NOT_FOUND during a run is a model being loaded again (retried)."""
    if "is restricted, expecting header" in detail:
        return FatalError(text + " (give it with --engine-option headers='NAME: VALUE'; over gRPC Triton expects "
                                 "the key of --grpc-restricted-protocol prefixed with triton-grpc-protocol-)")
    if code == "INTERNAL":
        return ServerAnswered(text)
    if in_run and code == "NOT_FOUND":
        return RetryableError(text + " (the model is being loaded again?)")
    return None


def _stubs(ch: grpc.Channel) -> dict[str, Callable]:
    return {m: ch.unary_unary(METHOD_PATH[m], request_serializer=lambda msg: msg.SerializeToString(),
                              response_deserializer=pb[resp].FromString)
            for m, (_, resp) in METHODS.items()}


def _metadata_pairs(token: str | None, headers: dict[str, str]) -> tuple[tuple[str, str], ...] | None:
    pairs = [(k.lower(), v) for k, v in headers.items()]
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    return tuple(pairs) or None


class KServeGrpcEngine(KServeEngine):
    """KServe v2 gRPC client. Options: ``_remote.OPTION_SPEC`` + headers, headers_file (sent as metadata)."""

    name = "kserve_grpc"
    SCHEMES = {"grpc": 8001, "grpcs": 8001}

    def _connect(self) -> None:
        self._channel = self.open_channel()
        self._stub = _stubs(self._channel)
        self._md = _metadata_pairs(self._token, self.headers)

    def _call(self, method: str, request: Any, *, in_run: bool = False) -> Any:
        try:
            return self._stub[method](request, timeout=self.opts.timeout, metadata=self._md)
        except grpc.RpcError as exc:
            raise rpc_failure(exc, method, timeout=self.opts.timeout, receive_limit=self.receive_limit,
                              special=lambda code, detail, text: _triton_failure(code, detail, text, in_run)) from None

    def _live(self) -> bool:
        return bool(self._call("ServerLive", pb["ServerLiveRequest"]()).live)

    def _metadata(self, version: str) -> dict[str, Any]:
        try:
            r = self._call("ModelMetadata", pb["ModelMetadataRequest"](name=self.opts.model_name, version=version))
        except FatalError as exc:
            if "no available versions" in str(exc) or "not at ready state" in str(exc):
                raise ModelNotReady(str(exc)) from None
            raise
        return {"name": r.name, "versions": list(r.versions), "platform": r.platform,
                "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in r.inputs],
                "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in r.outputs]}

    def _ready(self, version: str) -> bool:
        try:
            return bool(self._call("ModelReady", pb["ModelReadyRequest"](name=self.opts.model_name,
                                                                         version=version)).ready)
        except FatalError:
            return False

    def _config(self, version: str) -> dict[str, Any] | None:
        try:
            r = self._call("ModelConfig", pb["ModelConfigRequest"](name=self.opts.model_name, version=version))
        except FatalError:  # UNIMPLEMENTED on KServe servers other than Triton, or refused
            return None
        return {"max_batch_size": int(r.config.max_batch_size),
                "parameters": {k: v.string_value for k, v in r.config.parameters.items()}}

    def _index(self) -> list[dict[str, str]] | None:
        try:
            r = self._call("RepositoryIndex", pb["RepositoryIndexRequest"]())
        except FatalError:
            return None
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in r.models]

    def _infer(self, inputs: dict[str, np.ndarray], outputs: list[str], version: str, request_id: str,
               limit: int) -> Reply:
        req = pb["ModelInferRequest"](model_name=self.opts.model_name, model_version=version, id=request_id)
        for name, arr in inputs.items():
            req.inputs.add(name=name, datatype="INT32", shape=list(arr.shape))
            req.raw_input_contents.append(np.ascontiguousarray(arr, dtype="<i4").tobytes())
        for name in outputs:
            req.outputs.add(name=name)
        resp = self._call("ModelInfer", req, in_run=True)
        return decode_response(resp, limit)


def decode_response(resp: Any, limit: int) -> Reply:
    """ModelInferResponse -> Reply (raw_output_contents in output order, or typed contents); BadResponseError if
    the tensors are malformed or larger than ``limit`` bytes (a tensor of another datatype is kept empty, for
    ``kserve_base.output_array`` to refuse by name)."""
    raw = list(resp.raw_output_contents)
    if raw and len(raw) != len(resp.outputs):
        raise BadResponseError(f"the response has {len(resp.outputs)} outputs but {len(raw)} raw_output_contents")
    if sum(len(r) for r in raw) > limit:
        raise BadResponseError(f"the response's tensors exceed the {limit} bytes the request allows")
    outs: dict[str, tuple[str, tuple[int, ...], np.ndarray]] = {}
    for i, t in enumerate(resp.outputs):
        if t.name in outs:
            raise BadResponseError(f"output {t.name!r} appears twice in the response")
        shape = tuple(int(d) for d in t.shape)
        dtype = _NP.get(t.datatype)
        if dtype is None:
            outs[t.name] = (t.datatype, shape, np.zeros(0, np.uint8))  # refused by output_array
            continue
        if raw:
            if len(raw[i]) % np.dtype(dtype).itemsize:
                raise BadResponseError(f"output {t.name!r} has {len(raw[i])} bytes, not a whole number of {t.datatype}")
            flat = np.frombuffer(raw[i], dtype=dtype)
        elif t.datatype in _CONTENTS:
            flat = np.asarray(getattr(t.contents, _CONTENTS[t.datatype]), dtype=dtype)
        else:
            flat = np.zeros(0, dtype)
        want = np.dtype(OUTPUT_DTYPES[t.name]) if t.name in OUTPUT_DTYPES else flat.dtype
        outs[t.name] = (t.datatype, shape, flat.astype(want, copy=False))
    return Reply(model_name=resp.model_name, model_version=resp.model_version, id=resp.id, outputs=outs)


def detect(o: RemoteOptions, headers: dict[str, str]) -> Callable[[], str]:
    """One detection attempt: "kserve" if ``inference.GRPCInferenceService/ServerLive`` answers, "tfserving"
    if the server does not implement it (TF Serving's gRPC API has no such service)."""
    md = _metadata_pairs(read_bearer_token(o), headers)

    def attempt() -> str:
        ch = grpc_channel(o, engine="kserve_grpc")
        try:
            _stubs(ch)["ServerLive"](pb["ServerLiveRequest"](), timeout=o.timeout, metadata=md)
            return "kserve"
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return "tfserving"
            text = f"ServerLive: {code.name}: {exc.details() if hasattr(exc, 'details') else exc}"
            if code.name in RETRY_CODE_NAMES:
                raise RetryableError(text) from None
            raise FatalError(f"{o.host}:{o.port} answers neither KServe v2 nor TF Serving ({text}); pass "
                             f"--protocol kserve or tfserving") from None
        finally:
            ch.close()

    return attempt
