"""TensorFlow Serving over gRPC, on the official ``tensorflow-serving-api`` stubs (extra ``grpc``).

Calls (tensorflow_serving/apis/prediction_service.proto and model_service.proto):

* ``ModelService.GetModelStatus(GetModelStatusRequest{model_spec})`` -> ``model_version_status`` with
  ``state`` AVAILABLE for the version used;
* ``PredictionService.GetModelMetadata(model_spec, metadata_field=["signature_def"])`` -> ``metadata``
  ``["signature_def"]``, an ``Any`` holding a ``SignatureDefMap``;
* ``PredictionService.Predict(PredictRequest{model_spec{name, version?, signature_name}, inputs, output_filter})``
  with each input a ``TensorProto`` (DT_INT32, shape, ``tensor_content`` = little-endian bytes) and
  ``output_filter`` naming only the outputs read. Each call has a deadline (``timeout``).

Status codes retried: UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED; all others (INVALID_ARGUMENT,
NOT_FOUND, UNAUTHENTICATED, ...) fail at once with the server's message.

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

from ..errors import ModelError, UsageError  # noqa: E402
from ._remote import TF_DTYPES, FatalError, RemoteEngine, RetryableError, TensorInfo, read_file_bytes  # noqa: E402

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.DEADLINE_EXCEEDED})

_NP = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64,
       types_pb2.DT_DOUBLE: np.float64}
_VAL_FIELD = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val",
              types_pb2.DT_DOUBLE: "double_val"}
_STATE = {v: k for k, v in get_model_status_pb2.ModelVersionStatus.State.items()}


def to_tensor_proto(a: np.ndarray) -> tensor_pb2.TensorProto:
    """int32 ndarray -> TensorProto(DT_INT32, shape, tensor_content=little-endian bytes)."""
    a = np.ascontiguousarray(a, dtype="<i4")
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_INT32,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                            for d in a.shape]),
        tensor_content=a.tobytes())


def from_tensor_proto(t: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto (DT_FLOAT/INT32/INT64/DOUBLE) -> ndarray, from ``tensor_content`` or the typed ``*_val``
    field (where fewer values than elements mean: repeat the last one, as TensorFlow reads it)."""
    if t.dtype not in _NP:
        raise FatalError(f"unexpected output dtype {types_pb2.DataType.Name(t.dtype)}")
    dtype = np.dtype(_NP[t.dtype]).newbyteorder("<")
    shape = tuple(d.size for d in t.tensor_shape.dim)
    n = int(np.prod(shape, dtype=np.int64))
    if t.tensor_content:
        arr = np.frombuffer(t.tensor_content, dtype=dtype)
    else:
        vals = np.asarray(getattr(t, _VAL_FIELD[t.dtype]), dtype=dtype)
        if vals.size < n:
            fill = vals[-1] if vals.size else dtype.type(0)
            vals = np.concatenate([vals, np.full(n - vals.size, fill, dtype)])
        arr = vals
    if arr.size != n:
        raise FatalError(f"output tensor has {arr.size} values for shape {list(shape)}")
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


class GrpcEngine(RemoteEngine):
    """TF Serving gRPC client. Options: see ``mlm_scorer.engines._remote.OPTION_SPEC``."""

    name = "grpc"
    SCHEMES = {"grpc": 8500, "grpcs": 8500}

    def _connect(self) -> None:
        o = self.opts
        if o.base_path:
            raise UsageError(f"engine 'grpc': server address takes no path ({o.base_path!r})")
        if not o.tls and (o.tls_ca_file or o.tls_cert_file or o.tls_server_name):
            raise UsageError("engine 'grpc': TLS options were given but the server is grpc://; use grpcs://")
        if not o.tls_verify:
            raise UsageError("engine 'grpc': tls_verify=false is not supported; give tls_ca_file instead")
        target = f"{o.host}:{o.port}"
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            # Reconnect quickly after a server restart: our own backoff decides how long to keep trying.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if o.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=read_file_bytes(o.tls_ca_file, "tls_ca_file"),
                private_key=read_file_bytes(o.tls_key_file, "tls_key_file"),
                certificate_chain=read_file_bytes(o.tls_cert_file, "tls_cert_file"))
            if o.tls_server_name:
                options.append(("grpc.ssl_target_name_override", o.tls_server_name))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        # The token goes in call metadata (works on plain channels behind a TLS-terminating gateway too).
        self._metadata = (("authorization", f"Bearer {self._token}"),) if self._token else None
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _close_transport(self) -> None:
        ch = getattr(self, "_channel", None)
        if ch is not None:
            ch.close()

    def _spec(self, msg: Any, signature: bool = True) -> None:
        msg.model_spec.name = self.opts.model_name
        if self.opts.model_version is not None:
            msg.model_spec.version.value = self.opts.model_version
        if signature:
            msg.model_spec.signature_name = "serving_default"

    def _invoke(self, method: Any, request: Any, what: str) -> Any:
        try:
            return method(request, timeout=self.opts.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            text = f"{what}: {code.name}: {detail}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                text += f" (deadline {self.opts.timeout:g}s)"
            if code in RETRY_CODES:
                raise RetryableError(text) from None
            raise FatalError(text) from None

    def _fetch_status(self) -> list[tuple[int, str, str]]:
        req = get_model_status_pb2.GetModelStatusRequest()
        self._spec(req, signature=False)
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
        missing = [n for n in outputs if n not in resp.outputs]
        if missing:
            raise FatalError(f"Predict response lacks output(s) {missing}; it has {sorted(resp.outputs)}")
        return {n: from_tensor_proto(resp.outputs[n]) for n in outputs}
