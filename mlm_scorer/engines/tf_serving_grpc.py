"""TensorFlow Serving over gRPC, on the official ``tensorflow-serving-api`` stubs (extra ``grpc``).

Calls (tensorflow_serving/apis/prediction_service.proto and model_service.proto):

* ``ModelService.GetModelStatus(GetModelStatusRequest{model_spec{name}})`` -> ``model_version_status``
  of every version, with ``state`` AVAILABLE for the version used;
* ``PredictionService.GetModelMetadata(model_spec, metadata_field=["signature_def"])`` -> ``metadata``
  ``["signature_def"]``, an ``Any`` holding a ``SignatureDefMap``;
* ``PredictionService.Predict(PredictRequest{model_spec{name, version, signature_name}, inputs, output_filter})``
  with each input a ``TensorProto`` (DT_INT32, shape, ``tensor_content`` = little-endian bytes) and
  ``output_filter`` naming only the outputs read. Each call has a deadline (``timeout``). After the
  start-up checks every call names the version they verified, and a response whose ``model_spec`` names
  another model or version is refused.

Answers are decoded strictly (``from_tensor_proto``): the dtype the signature declares, the shape the
request allows (checked before anything is allocated), exactly one value per element (TensorFlow would
repeat the last value of a short ``float_val`` over the shape; a server never needs that, so it is
refused). The channel refuses messages larger than the largest request can need
(``max_receive_message_length``, from ``max_batch_size``, the export's ``max_seq_length`` and top-k).

Status codes retried: UNAVAILABLE, RESOURCE_EXHAUSTED (from the server), DEADLINE_EXCEEDED; all others
(INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ...) fail at once with the server's message.

Note: the stubs import ``tensorflow.core.framework`` protos, so this engine imports TensorFlow's Python
package (not its runtime use) — install ``tensorflow-cpu`` alongside (see the ``grpc`` extra).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..logs import import_tensorflow

import_tensorflow()  # the stubs import TensorFlow's protos: import it without its C++ start-up lines (unless -v)

import grpc  # noqa: E402
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from ..errors import ModelError  # noqa: E402
from ._remote import (OUTPUT_DTYPES, TF_DTYPES, BadResponseError, FatalError, OutputSpec,  # noqa: E402
                      RemoteEngine, TensorInfo, rpc_failure)

_NP = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64,
       types_pb2.DT_DOUBLE: np.float64}
_VAL_FIELD = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val",
              types_pb2.DT_DOUBLE: "double_val"}
_DT = {"float32": types_pb2.DT_FLOAT, "int32": types_pb2.DT_INT32}
_STATE = {v: k for k, v in get_model_status_pb2.ModelVersionStatus.State.items()}


def to_tensor_proto(a: np.ndarray) -> tensor_pb2.TensorProto:
    """int32 ndarray -> TensorProto(DT_INT32, shape, tensor_content=little-endian bytes)."""
    a = np.ascontiguousarray(a, dtype="<i4")
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_INT32,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                            for d in a.shape]),
        tensor_content=a.tobytes())


def from_tensor_proto(t: tensor_pb2.TensorProto, spec: OutputSpec | None = None) -> np.ndarray:
    """TensorProto -> ndarray, or BadResponseError; nothing is allocated before the shape is checked.

    ``spec``: the output this request allows (dtype and shape, ``OutputSpec.check_shape``); without it,
    any DT_FLOAT/INT32/INT64/DOUBLE tensor of non-negative dims. The values come from ``tensor_content``
    (exactly one per element) or from the typed ``*_val`` field (exactly one per element: TensorFlow's
    reading, where fewer values mean "repeat the last", is refused), never from both.
    """
    name = spec.name if spec is not None else "tensor"
    if spec is not None and t.dtype != _DT[OUTPUT_DTYPES[spec.name]]:
        got = types_pb2.DataType.Name(t.dtype) if t.dtype in types_pb2.DataType.values() else t.dtype
        raise BadResponseError(f"output {name!r} has dtype {got}, expected {spec.dtype}")
    if t.dtype not in _NP:
        raise BadResponseError(f"output {name!r} has unexpected dtype {t.dtype}")
    if t.tensor_shape.unknown_rank:
        raise BadResponseError(f"output {name!r} has no shape (unknown rank)")
    shape = tuple(int(d.size) for d in t.tensor_shape.dim)
    if spec is not None:
        spec.check_shape(shape)
    elif any(d < 0 for d in shape):
        raise BadResponseError(f"output {name!r} has a negative dimension: {list(shape)}")
    n = 1
    for d in shape:
        n *= d
    dtype = np.dtype(_NP[t.dtype]).newbyteorder("<")
    vals = getattr(t, _VAL_FIELD[t.dtype])
    if t.tensor_content:
        if len(vals):
            raise BadResponseError(f"output {name!r} has both tensor_content and {_VAL_FIELD[t.dtype]}")
        if len(t.tensor_content) != n * dtype.itemsize:
            raise BadResponseError(f"output {name!r} has {len(t.tensor_content)} bytes of tensor_content for "
                                   f"shape {list(shape)} ({n * dtype.itemsize} expected)")
        arr = np.frombuffer(t.tensor_content, dtype=dtype)
    else:
        if len(vals) != n:
            raise BadResponseError(f"output {name!r} has {len(vals)} value(s) in {_VAL_FIELD[t.dtype]} for shape "
                                   f"{list(shape)} ({n} elements); a short list, which TensorFlow would repeat "
                                   f"over the shape, is not an answer")
        arr = np.asarray(vals, dtype=dtype)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


class GrpcEngine(RemoteEngine):
    """TF Serving gRPC client. Options: see ``mlm_scorer.engines._remote.OPTION_SPEC``."""

    name = "grpc"
    SCHEMES = {"grpc": 8500, "grpcs": 8500}

    def _connect(self) -> None:
        self._channel = self.open_channel()
        # The token goes in call metadata (works on plain channels behind a TLS-terminating gateway too).
        self._metadata = (("authorization", f"Bearer {self._token}"),) if self._token else None
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _spec(self, msg: Any, signature: bool = True, version: bool = True) -> None:
        msg.model_spec.name = self.opts.model_name
        if version and self.opts.model_version is not None:
            msg.model_spec.version.value = self.opts.model_version
        if signature:
            msg.model_spec.signature_name = "serving_default"

    def _invoke(self, method: Any, request: Any, what: str) -> Any:
        try:
            return method(request, timeout=self.opts.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_failure(exc, what, timeout=self.opts.timeout, receive_limit=self.receive_limit) from None

    def _fetch_status(self) -> list[tuple[int, str, str]]:
        req = get_model_status_pb2.GetModelStatusRequest()
        self._spec(req, signature=False, version=False)  # every version, whichever is pinned
        resp = self._invoke(self._model_stub.GetModelStatus, req, "GetModelStatus")
        return [(int(s.version), _STATE.get(s.state, str(s.state)), s.status.error_message)
                for s in resp.model_version_status]

    def _fetch_signature(self) -> dict[str, dict[str, TensorInfo]]:
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(req, signature=False)
        resp = self._invoke(self._predict_stub.GetModelMetadata, req, "GetModelMetadata")
        sigs = get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" not in resp.metadata or not resp.metadata["signature_def"].Unpack(sigs):
            raise FatalError("GetModelMetadata response has no signature_def SignatureDefMap")
        if "serving_default" not in sigs.signature_def:
            raise ModelError(f"{self.opts.describe()}: the served model has no 'serving_default' signature; "
                             f"it has: {', '.join(sorted(sigs.signature_def)) or 'none'}")
        sig = sigs.signature_def["serving_default"]

        def info(t: Any) -> TensorInfo:
            name = types_pb2.DataType.Name(t.dtype)
            rank = None if t.tensor_shape.unknown_rank else len(t.tensor_shape.dim)
            return TensorInfo(TF_DTYPES.get(name, name), rank)

        return {"inputs": {k: info(v) for k, v in sig.inputs.items()},
                "outputs": {k: info(v) for k, v in sig.outputs.items()}}

    def _predict_once(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        req = predict_pb2.PredictRequest(output_filter=outputs)
        self._spec(req)
        for name, arr in inputs.items():
            req.inputs[name].CopyFrom(to_tensor_proto(arr))
        resp = self._invoke(self._predict_stub.Predict, req, "Predict")
        if resp.HasField("model_spec"):
            spec = resp.model_spec
            self.check_response_model(spec.name, spec.version.value if spec.HasField("version") else None)
        missing = [n for n in outputs if n not in resp.outputs]
        if missing:
            raise BadResponseError(f"Predict response lacks output(s) {missing}; it has "
                                   f"{sorted(resp.outputs)[:10]}")
        specs = self.expect(inputs, outputs)
        return {n: from_tensor_proto(resp.outputs[n], specs[n]) for n in outputs}
