"""A stand-in for ``tensorflow_model_server`` that serves real SavedModels with TensorFlow, for tests.

The real binary (and Docker) cannot run on the test machines, so this process follows TF Serving's
documented behaviour as closely as a test needs:

REST (https://www.tensorflow.org/tfx/serving/api_rest), on ``--rest-port``:
  GET  /v1/models/NAME[/versions/N]            -> GetModelStatusResponse as JSON
  GET  /v1/models/NAME[/versions/N]/metadata   -> GetModelMetadataResponse as JSON (signature_def map)
  POST /v1/models/NAME[/versions/N]:predict    row ("instances") or columnar ("inputs") format ->
       {"predictions": ...} / {"outputs": ...}; errors are {"error": "..."} with the HTTP status TF
       Serving's http_server.cc maps from the status code (400 INVALID_ARGUMENT/FAILED_PRECONDITION,
       404 NOT_FOUND, 401 UNAUTHENTICATED, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED).
gRPC (official tensorflow-serving-api protos), on ``--grpc-port``:
  PredictionService.Predict (inputs, output_filter), PredictionService.GetModelMetadata (signature_def),
  ModelService.GetModelStatus, with TF Serving's status codes and messages for the common errors.

Models: ``--model NAME=BASE_DIR`` (repeatable). As TF Serving's default version policy (latest: 1), only
the highest numeric version under BASE_DIR is loaded, unless ``--all-versions``.

Not TF Serving, for tests only:
  * fault injection, set with ``POST /standin/faults`` (JSON, see ``Faults``) and read with
    ``GET /standin/stats``: the next N predicts fail with UNAVAILABLE (503), or are delayed;
  * ``--token-file``: require ``authorization: Bearer <token>`` (what a gateway in front would do);
  * ``--tls-cert/--tls-key``: serve https and grpcs (TF Serving has its own SSL config for gRPC);
  * ``--val-fields``: answer gRPC with ``float_val``/``int_val`` instead of ``tensor_content``.

Prints ``STANDIN READY rest=PORT grpc=PORT`` on stdout once both servers accept connections.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

# TF Serving's ToHTTPStatusCode (tensorflow_serving/model_servers/http_server.cc).
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}

# TF error classes -> canonical code names.
_TF_CODES = {tf.errors.InvalidArgumentError: "INVALID_ARGUMENT", tf.errors.ResourceExhaustedError: "RESOURCE_EXHAUSTED",
             tf.errors.FailedPreconditionError: "FAILED_PRECONDITION", tf.errors.OutOfRangeError: "OUT_OF_RANGE",
             tf.errors.UnimplementedError: "UNIMPLEMENTED", tf.errors.InternalError: "INTERNAL"}


class ServingError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Servable:
    name: str
    version: int
    path: Path
    loaded: object
    signature_defs: object  # tensorflow.core.protobuf.meta_graph_pb2 SignatureDef map (from saved_model.pb)


@dataclass
class Faults:
    """Injected faults (predict calls only). Changed at run time with POST /standin/faults."""

    fail_next: int = 0              # this many predicts fail ...
    fail_code: str = "UNAVAILABLE"  # ... with this code (REST: its HTTP status)
    delay_next: int = 0             # this many predicts are delayed by delay_s (-1: all)
    delay_s: float = 0.0
    # counters
    predict_calls: int = 0
    failed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    batch_sizes: list = field(default_factory=list)


class Core:
    """What both front ends share: the servables, predict, status, metadata and the fault state."""

    def __init__(self, models: dict[str, Path], all_versions: bool, token: str | None):
        self.servables: dict[str, dict[int, Servable]] = {}
        self.token = token
        self.faults = Faults()
        self.lock = threading.Lock()
        for name, base in models.items():
            versions = sorted(int(p.name) for p in base.iterdir()
                              if p.name.isdigit() and (p / "saved_model.pb").is_file())
            if not versions:
                raise SystemExit(f"no versions with saved_model.pb under {base}")
            chosen = versions if all_versions else versions[-1:]
            self.servables[name] = {}
            for v in chosen:
                sm = saved_model_pb2.SavedModel()
                sm.ParseFromString((base / str(v) / "saved_model.pb").read_bytes())
                self.servables[name][v] = Servable(name, v, base / str(v), tf.saved_model.load(str(base / str(v))),
                                                   sm.meta_graphs[0].signature_def)

    # ----------------------------------------------------------------------------------- lookups
    def servable(self, name: str, version: int | None) -> Servable:
        versions = self.servables.get(name, {})
        if version is None:
            if not versions:
                raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
            return versions[max(versions)]
        if version not in versions:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})")
        return versions[version]

    def status(self, name: str, version: int | None) -> get_model_status_pb2.GetModelStatusResponse:
        versions = self.servables.get(name)
        if not versions:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        if version is not None and version not in versions:
            raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v in sorted(versions, reverse=True):
            if version is None or v == version:
                s = resp.model_version_status.add(version=v, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE)
                s.status.error_code = 0
                s.status.error_message = ""
        return resp

    def metadata(self, name: str, version: int | None, fields: list[str]
                 ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not fields:
            raise ServingError("INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field")
        for f in fields:
            if f != "signature_def":
                raise ServingError("INVALID_ARGUMENT", f"Metadata field {f} is not supported")
        sv = self.servable(name, version)
        resp = get_model_metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.name = name
        resp.model_spec.version.value = sv.version
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        for k, v in sv.signature_defs.items():
            sigmap.signature_def[k].CopyFrom(v)
        resp.metadata["signature_def"].Pack(sigmap)
        return resp

    def check_token(self, header: str | None) -> None:
        if self.token is None:
            return
        if header is None:
            raise ServingError("UNAUTHENTICATED", "missing bearer token")
        if header != f"Bearer {self.token}":
            raise ServingError("UNAUTHENTICATED", "invalid bearer token")

    # ----------------------------------------------------------------------------------- predict
    def predict(self, name: str, version: int | None, signature_name: str, inputs: dict[str, np.ndarray],
                output_filter: list[str] | None) -> tuple[Servable, dict[str, np.ndarray]]:
        f = self.faults
        with self.lock:
            f.predict_calls += 1
            f.in_flight += 1
            f.max_in_flight = max(f.max_in_flight, f.in_flight)
            fail = f.fail_next > 0
            if fail:
                f.fail_next -= 1
                f.failed += 1
            delay = f.delay_s if (f.delay_next != 0) else 0.0
            if f.delay_next > 0:
                f.delay_next -= 1
        try:
            if delay:
                time.sleep(delay)
            if fail:
                raise ServingError(f.fail_code, "injected fault: server unavailable (stand-in)")
            return self._predict(name, version, signature_name, inputs, output_filter)
        finally:
            with self.lock:
                f.in_flight -= 1

    def _predict(self, name, version, signature_name, inputs, output_filter):
        sv = self.servable(name, version)
        signature_name = signature_name or "serving_default"
        if signature_name not in sv.signature_defs or signature_name.startswith("__"):
            raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{signature_name}" not found.')
        sigdef = sv.signature_defs[signature_name]
        fn = sv.loaded.signatures[signature_name]
        want, sent = set(sigdef.inputs), set(inputs)
        if want != sent:
            raise ServingError("INVALID_ARGUMENT", (
                f"input size does not match signature: {len(sent)}!={len(want)} len({{{','.join(sorted(sent))}}}) "
                f"!= len({{{','.join(sorted(want))}}}). Sent extra: {{{','.join(sorted(sent - want))}}}. "
                f"Missing but required: {{{','.join(sorted(want - sent))}}}."))
        args = {}
        for i, (k, arr) in enumerate(sorted(inputs.items())):
            expected = tf.dtypes.as_dtype(sigdef.inputs[k].dtype)
            if arr.dtype != expected.as_numpy_dtype:
                raise ServingError("INVALID_ARGUMENT", f"Expects arg[{i}] to be {expected.name} but "
                                                       f"{tf.dtypes.as_dtype(arr.dtype).name} is provided")
            args[k] = tf.constant(arr)
        outputs = list(sigdef.outputs)
        for o in output_filter or []:
            if o not in sigdef.outputs:
                raise ServingError("INVALID_ARGUMENT", f"output tensor alias not found in signature: {o} Outputs "
                                                       f"expected to be in the set {{{','.join(sorted(outputs))}}}.")
        try:
            out = fn(**args)
        except tf.errors.OpError as exc:
            raise ServingError(_TF_CODES.get(type(exc), "INTERNAL"), exc.message) from None
        keep = output_filter or outputs
        with self.lock:
            self.faults.batch_sizes.append(int(next(iter(inputs.values())).shape[0]))
        return sv, {k: out[k].numpy() for k in keep}


# =============================================================================================== REST

_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?(?::(predict|classify|regress))?"
                   r"(/metadata)?$")


def make_rest_handler(core: Core):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's libevent server

        def log_message(self, *args):  # quiet
            pass

        def _reply(self, status: int, doc) -> None:
            body = json.dumps(doc, indent=None).encode()  # allow_nan: NaN/Infinity as TF Serving writes them
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, err: ServingError) -> None:
            self._reply(HTTP_STATUS[err.code], {"error": err.message})

        def _read_body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_GET(self):  # noqa: N802
            if self.path == "/standin/stats":
                with core.lock:
                    f = core.faults
                    return self._reply(200, {k: getattr(f, k) for k in f.__dataclass_fields__})
            try:
                core.check_token(self.headers.get("Authorization"))
                m = _PATH.match(self.path)
                if not m or m.group(4) or m.group(3):
                    raise ServingError("INVALID_ARGUMENT", f"Malformed request: GET {self.path}")
                name, version = m.group(1), int(m.group(2)) if m.group(2) else None
                if m.group(5):
                    resp = core.metadata(name, version, ["signature_def"])
                    sigmap = get_model_metadata_pb2.SignatureDefMap()
                    resp.metadata["signature_def"].Unpack(sigmap)
                    doc = {"model_spec": {"name": name, "signature_name": "",
                                          "version": str(resp.model_spec.version.value)},
                           "metadata": {"signature_def": _to_json(sigmap)}}
                else:
                    doc = _to_json(core.status(name, version))
                self._reply(200, doc)
            except ServingError as err:
                self._error(err)

        def do_POST(self):  # noqa: N802
            body = self._read_body()
            if self.path == "/standin/faults":
                changes = json.loads(body or b"{}")
                with core.lock:
                    for k, v in changes.items():
                        setattr(core.faults, k, v)
                return self._reply(200, {"ok": True})
            try:
                core.check_token(self.headers.get("Authorization"))
                m = _PATH.match(self.path)
                if not m or m.group(5) or not m.group(4):
                    raise ServingError("INVALID_ARGUMENT", f"Malformed request: POST {self.path}")
                if m.group(4) != "predict":
                    raise ServingError("UNIMPLEMENTED", f"{m.group(4)} is not supported by the stand-in")
                name, version = m.group(1), int(m.group(2)) if m.group(2) else None
                try:
                    req = json.loads(body)
                except ValueError as exc:
                    raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {exc}") from None
                if not isinstance(req, dict):
                    raise ServingError("INVALID_ARGUMENT", "JSON Value: not an object Is not object")
                sig = req.get("signature_name", "serving_default")
                sv = core.servable(name, version)
                sigdef = sv.signature_defs[sig] if sig in sv.signature_defs and not sig.startswith("__") else None
                if sigdef is None:
                    raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{sig}" not found.')
                dtypes = {k: tf.dtypes.as_dtype(v.dtype).as_numpy_dtype for k, v in sigdef.inputs.items()}
                if ("inputs" in req) == ("instances" in req):
                    raise ServingError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key"
                                       if "inputs" not in req else "Both 'inputs' and 'instances' keys are set")
                if "inputs" in req:
                    cols = req["inputs"]
                    if not isinstance(cols, dict):
                        if len(dtypes) != 1:
                            raise ServingError("INVALID_ARGUMENT", "inputs is not a map of named inputs")
                        cols = {next(iter(dtypes)): cols}
                    inputs = {k: _array(v, dtypes.get(k), k) for k, v in cols.items()}
                else:
                    rows = req["instances"]
                    if not isinstance(rows, list) or not rows:
                        raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
                    if isinstance(rows[0], dict):
                        keys = set(rows[0])
                        if any(not isinstance(r, dict) or set(r) != keys for r in rows):
                            raise ServingError("INVALID_ARGUMENT", "Expecting object with the same keys in all "
                                                                   "instances")
                        inputs = {k: _array([r[k] for r in rows], dtypes.get(k), k) for k in keys}
                    else:
                        inputs = {next(iter(dtypes)): _array(rows, next(iter(dtypes.values())), "instances")}
                _, out = core.predict(name, version, sig, inputs, None)
                if "inputs" in req:
                    doc = {"outputs": (next(iter(out.values())).tolist() if len(out) == 1
                                       else {k: v.tolist() for k, v in out.items()})}
                else:
                    n = len(next(iter(out.values())))
                    if len(out) == 1:
                        doc = {"predictions": next(iter(out.values())).tolist()}
                    else:
                        doc = {"predictions": [{k: v[i].tolist() for k, v in out.items()} for i in range(n)]}
                self._reply(200, doc)
            except ServingError as err:
                self._error(err)

    return Handler


def _array(value, dtype, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if dtype is not None and arr.dtype.kind in "iuf" and np.dtype(dtype).kind in "iu":
            if arr.dtype.kind == "f":
                raise ServingError("INVALID_ARGUMENT", f"JSON Value: {value!r:.40} Is not int for input {name}")
            arr = arr.astype(dtype)
        elif dtype is not None:
            arr = arr.astype(dtype)
    except ValueError as exc:
        raise ServingError("INVALID_ARGUMENT", f"Failed to process element: {name}: {exc}") from None
    if arr.dtype == object:
        raise ServingError("INVALID_ARGUMENT", f"Failed to process element: {name}: ragged or mixed values")
    return arr


def _to_json(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


# =============================================================================================== gRPC

class _Auth:
    def _auth(self, context) -> None:
        md = dict(context.invocation_metadata())
        try:
            self.core.check_token(md.get("authorization"))
        except ServingError as err:
            context.abort(grpc.StatusCode[err.code], err.message)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer, _Auth):
    def __init__(self, core: Core, val_fields: bool):
        self.core, self.val_fields = core, val_fields

    def Predict(self, request, context):  # noqa: N802
        self._auth(context)
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        try:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            sv, out = self.core.predict(spec.name, version, spec.signature_name, inputs,
                                        list(request.output_filter) or None)
        except ServingError as err:
            context.abort(grpc.StatusCode[err.code], err.message)
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = spec.name
        resp.model_spec.version.value = sv.version
        resp.model_spec.signature_name = spec.signature_name or "serving_default"
        for k, v in out.items():
            if self.val_fields:  # the typed repeated fields instead of tensor_content
                proto = resp.outputs[k]
                proto.dtype = tf.dtypes.as_dtype(v.dtype).as_datatype_enum
                proto.tensor_shape.CopyFrom(tf.TensorShape(v.shape).as_proto())
                getattr(proto, "float_val" if v.dtype == np.float32 else "int_val").extend(v.reshape(-1).tolist())
            else:
                resp.outputs[k].CopyFrom(tf.make_tensor_proto(v))
        return resp

    def GetModelMetadata(self, request, context):  # noqa: N802
        self._auth(context)
        spec = request.model_spec
        try:
            return self.core.metadata(spec.name, spec.version.value if spec.HasField("version") else None,
                                      list(request.metadata_field))
        except ServingError as err:
            context.abort(grpc.StatusCode[err.code], err.message)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer, _Auth):
    def __init__(self, core: Core):
        self.core = core

    def GetModelStatus(self, request, context):  # noqa: N802
        self._auth(context)
        spec = request.model_spec
        try:
            return self.core.status(spec.name, spec.version.value if spec.HasField("version") else None)
        except ServingError as err:
            context.abort(grpc.StatusCode[err.code], err.message)


# =============================================================================================== main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=BASE_DIR (repeatable)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--rest-port", type=int, default=0)
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--all-versions", action="store_true")
    ap.add_argument("--token-file")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--val-fields", action="store_true")
    ap.add_argument("--threads", type=int, default=16)
    a = ap.parse_args(argv)
    models = {}
    for m in a.model:
        name, _, base = m.partition("=")
        models[name] = Path(base)
    token = Path(a.token_file).read_text().strip() if a.token_file else None
    core = Core(models, a.all_versions, token)

    gserver = grpc.server(futures.ThreadPoolExecutor(max_workers=a.threads))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(core, a.val_fields), gserver)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), gserver)
    if a.tls_cert:
        creds = grpc.ssl_server_credentials([(Path(a.tls_key).read_bytes(), Path(a.tls_cert).read_bytes())])
        grpc_port = gserver.add_secure_port(f"{a.host}:{a.grpc_port}", creds)
    else:
        grpc_port = gserver.add_insecure_port(f"{a.host}:{a.grpc_port}")
    gserver.start()

    httpd = ThreadingHTTPServer((a.host, a.rest_port), make_rest_handler(core))
    httpd.daemon_threads = True
    if a.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    print(f"STANDIN READY rest={httpd.server_address[1]} grpc={grpc_port}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        gserver.stop(0)


if __name__ == "__main__":
    main(sys.argv[1:])
