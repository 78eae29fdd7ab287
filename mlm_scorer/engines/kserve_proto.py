"""The messages of the KServe v2 gRPC service (``inference.GRPCInferenceService``) this client uses.

Built at import from a hand-written descriptor in a private descriptor pool: no generated ``_pb2`` file,
no ``protoc``, no TensorFlow and no ``tritonclient`` (whose pins, numpy<2 and protobuf<5, do not fit an
environment with numpy 2). Each message is a *subset* of the official one in Triton's
``grpc_service.proto`` / ``model_config.proto`` (triton-inference-server/common): the same field names,
numbers, types and labels, fewer fields. On the wire only numbers and types count, and protobuf skips the
fields a subset leaves out, so requests are what the official stubs send and responses decode the same.
tests/test_triton_protocol.py compares every field here with tritonclient's generated descriptors.

Methods (unary): ServerLive, ServerReady, ModelReady, ModelMetadata, ModelConfig, RepositoryIndex,
ModelInfer; ``METHOD_PATH`` gives their gRPC paths.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool

SERVICE = "inference.GRPCInferenceService"
PACKAGE = "inference"

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _BOOL, _INT64, _INT32, _BYTES, _FLOAT, _MSG = (_F.TYPE_STRING, _F.TYPE_BOOL, _F.TYPE_INT64, _F.TYPE_INT32,
                                                        _F.TYPE_BYTES, _F.TYPE_FLOAT, _F.TYPE_MESSAGE)
_ONE, _MANY = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

#: message name -> [(field, number, type, label, message type or "")], nested messages as "Outer.Inner".
MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, _BOOL, _ONE, "")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, _BOOL, _ONE, "")],
    "ModelReadyRequest": [("name", 1, _STRING, _ONE, ""), ("version", 2, _STRING, _ONE, "")],
    "ModelReadyResponse": [("ready", 1, _BOOL, _ONE, "")],
    "ModelMetadataRequest": [("name", 1, _STRING, _ONE, ""), ("version", 2, _STRING, _ONE, "")],
    "ModelMetadataResponse": [("name", 1, _STRING, _ONE, ""), ("versions", 2, _STRING, _MANY, ""),
                              ("platform", 3, _STRING, _ONE, ""),
                              ("inputs", 4, _MSG, _MANY, "ModelMetadataResponse.TensorMetadata"),
                              ("outputs", 5, _MSG, _MANY, "ModelMetadataResponse.TensorMetadata")],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, _STRING, _ONE, ""), ("datatype", 2, _STRING, _ONE, ""),
                                             ("shape", 3, _INT64, _MANY, "")],
    "InferTensorContents": [("int_contents", 2, _INT32, _MANY, ""), ("fp32_contents", 6, _FLOAT, _MANY, "")],
    "ModelInferRequest": [("model_name", 1, _STRING, _ONE, ""), ("model_version", 2, _STRING, _ONE, ""),
                          ("id", 3, _STRING, _ONE, ""),
                          ("inputs", 5, _MSG, _MANY, "ModelInferRequest.InferInputTensor"),
                          ("outputs", 6, _MSG, _MANY, "ModelInferRequest.InferRequestedOutputTensor"),
                          ("raw_input_contents", 7, _BYTES, _MANY, "")],
    "ModelInferRequest.InferInputTensor": [("name", 1, _STRING, _ONE, ""), ("datatype", 2, _STRING, _ONE, ""),
                                           ("shape", 3, _INT64, _MANY, ""),
                                           ("contents", 5, _MSG, _ONE, "InferTensorContents")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, _STRING, _ONE, "")],
    "ModelInferResponse": [("model_name", 1, _STRING, _ONE, ""), ("model_version", 2, _STRING, _ONE, ""),
                           ("id", 3, _STRING, _ONE, ""),
                           ("outputs", 5, _MSG, _MANY, "ModelInferResponse.InferOutputTensor"),
                           ("raw_output_contents", 6, _BYTES, _MANY, "")],
    "ModelInferResponse.InferOutputTensor": [("name", 1, _STRING, _ONE, ""), ("datatype", 2, _STRING, _ONE, ""),
                                             ("shape", 3, _INT64, _MANY, ""),
                                             ("contents", 5, _MSG, _ONE, "InferTensorContents")],
    "ModelConfigRequest": [("name", 1, _STRING, _ONE, ""), ("version", 2, _STRING, _ONE, "")],
    "ModelConfigResponse": [("config", 1, _MSG, _ONE, "ModelConfig")],
    # model_config.proto
    "ModelConfig": [("name", 1, _STRING, _ONE, ""), ("platform", 2, _STRING, _ONE, ""),
                    ("max_batch_size", 4, _INT32, _ONE, ""),
                    ("parameters", 14, _MSG, _MANY, "ModelConfig.ParametersEntry"),
                    ("backend", 17, _STRING, _ONE, "")],
    "ModelConfig.ParametersEntry": [("key", 1, _STRING, _ONE, ""), ("value", 2, _MSG, _ONE, "ModelParameter")],
    "ModelParameter": [("string_value", 1, _STRING, _ONE, "")],
    "RepositoryIndexRequest": [("repository_name", 1, _STRING, _ONE, ""), ("ready", 2, _BOOL, _ONE, "")],
    "RepositoryIndexResponse": [("models", 1, _MSG, _MANY, "RepositoryIndexResponse.ModelIndex")],
    "RepositoryIndexResponse.ModelIndex": [("name", 1, _STRING, _ONE, ""), ("version", 2, _STRING, _ONE, ""),
                                           ("state", 3, _STRING, _ONE, ""), ("reason", 4, _STRING, _ONE, "")],
}
#: Map-entry messages (``map<string, ModelParameter>``): protobuf needs the option to treat them as maps.
_MAP_ENTRIES = {"ModelConfig.ParametersEntry"}

#: method -> (request message, response message)
METHODS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse"),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}
METHOD_PATH = {m: f"/{SERVICE}/{m}" for m in METHODS}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name="mlm_scorer/kserve_v2_subset.proto", package=PACKAGE,
                                             syntax="proto3")
    made: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full in sorted(MESSAGES, key=lambda n: n.count(".")):  # outer messages before nested ones
        outer, _, inner = full.rpartition(".")
        msg = made[outer].nested_type.add(name=inner) if outer else fdp.message_type.add(name=full)
        if full in _MAP_ENTRIES:
            msg.options.map_entry = True
        made[full] = msg
        for name, number, ftype, label, type_name in MESSAGES[full]:
            field = msg.field.add(name=name, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".{PACKAGE}.{type_name}"
    return fdp


_POOL = descriptor_pool.DescriptorPool()  # private: no clash with tritonclient's generated "inference" package
_POOL.Add(_file_descriptor())


def _message_class(name: str):
    desc = _POOL.FindMessageTypeByName(f"{PACKAGE}.{name}")
    try:
        from google.protobuf.message_factory import GetMessageClass  # protobuf >= 4.22
    except ImportError:  # pragma: no cover - older protobuf
        from google.protobuf.message_factory import MessageFactory

        return MessageFactory(_POOL).GetPrototype(desc)
    return GetMessageClass(desc)


#: message name (outer messages only) -> class, e.g. ``pb["ModelInferRequest"]()``.
pb = {name: _message_class(name) for name in MESSAGES if "." not in name}


def descriptor_fields() -> dict[str, dict[str, tuple[int, int, int, str]]]:
    """{message full name: {field: (number, type, label, message type full name)}} of this subset, for the
    comparison with the official descriptors."""
    out: dict[str, dict[str, tuple[int, int, int, str]]] = {}
    for full, fields in MESSAGES.items():
        out[f"{PACKAGE}.{full}"] = {n: (num, t, lab, f"{PACKAGE}.{tn}" if tn else "")
                                    for n, num, t, lab, tn in fields}
    return out
