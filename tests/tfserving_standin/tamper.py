"""A tampering proxy in front of the stand-in, for tests: it forwards every call (REST and gRPC) and, once a
``mode`` is set, damages the predict answers the way a broken or hostile server would.

    proxy = TamperProxy(standin).start()
    engine = RestEngine(model, server=proxy.rest_url)   # the start-up checks pass through untouched
    proxy.mode = "extra_row"                            # from now on every predict answer is damaged
    proxy.skip = 4                                      # ... but the next 4
    ...
    proxy.stop()

Modes (``REST_MODES``, ``GRPC_MODES``): each names what the answer gets wrong; ``tests/test_tf_serving.py``
lists what the client must say about each. The proxy runs in the test process (threads), so it is cheap.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

LP, IDS, TLP = "masked_lm_log_probs", "top_k_ids", "top_k_log_probs"


# ---------------------------------------------------------------------------------------------- REST

def _rest_mutate(mode: str, doc: dict, vocab: int) -> dict:
    outs = doc["outputs"]
    lp = outs[LP]
    if mode == "strings":
        outs[LP] = [[str(v) for v in row] for row in lp]
    elif mode == "ragged":
        outs[LP] = [row[:-1] if i == 1 else row for i, row in enumerate(lp)] if len(lp[0]) > 1 else \
            [row + [-1.0] if i == 1 else row for i, row in enumerate(lp)]
    elif mode == "extra_row":
        outs[LP] = lp + [lp[-1]]
    elif mode == "missing_row":
        outs[LP] = lp[:-1]
    elif mode == "top_k_oob":
        outs[IDS][-1][0][0] = vocab + 3
    elif mode == "top_k_float":
        outs[IDS][0][0][0] = 1.5
    elif mode == "nan":
        outs[LP][-1][0] = float("nan")
    elif mode == "positive":
        outs[LP][-1][0] = 3.0
    elif mode == "true":
        outs[LP][-1][0] = True
    elif mode == "null":
        outs[LP][-1][0] = None
    elif mode == "huge_int":
        outs[IDS][0][0][0] = 10 ** 30
    elif mode == "rank3":
        outs[LP] = [[[v] for v in row] for row in lp]
    elif mode == "scalar":
        outs[LP] = -1.0
    elif mode == "no_outputs":
        return {"predictions": lp}
    else:
        raise ValueError(mode)
    return doc


REST_MODES = ("strings", "ragged", "extra_row", "missing_row", "top_k_oob", "top_k_float", "nan", "positive",
              "true", "null", "huge_int", "rank3", "scalar", "no_outputs", "not_json", "deep", "huge_declared",
              "huge_chunked", "chunked_forever", "drip")


def _rest_handler(proxy: "TamperProxy"):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _forward(self, method: str, body: bytes | None) -> tuple[int, bytes]:
            req = urllib.request.Request(f"http://127.0.0.1:{proxy.upstream.rest_port}{self.path}", data=body,
                                         method=method, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self._send(*self._forward("GET", None))

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, data = self._forward("POST", body)
            mode = proxy.take()
            if not mode or status != 200 or not self.path.endswith(":predict"):
                return self._send(status, data)
            proxy.tampered += 1
            if mode in ("chunked_forever", "huge_chunked", "drip", "huge_declared"):
                return self._stream(mode)
            if mode == "not_json":
                return self._send(200, b"<html>gateway says hello</html>")
            if mode == "deep":
                return self._send(200, b'{"outputs": {"masked_lm_log_probs": ' + b"[" * 100_000 + b"]" * 100_000
                                  + b"}}")
            self._send(200, json.dumps(_rest_mutate(mode, json.loads(data), proxy.vocab)).encode())

        def _stream(self, mode: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            try:
                if mode == "drip":  # a valid start, then one byte every drip_s: never done in time
                    self.send_header("Content-Length", "50000")  # within the size limit
                    self.end_headers()
                    while not proxy.stopping.is_set():
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(proxy.drip_s)
                    return
                if mode == "huge_declared":
                    self.send_header("Content-Length", str(10 ** 12))
                    self.end_headers()
                    self.wfile.write(b'{"outputs": ')
                    self.wfile.flush()
                    proxy.stopping.wait(30)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b'{"outputs": {"masked_lm_log_probs": ['
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                piece = b"-1.0," * (20000 if mode == "huge_chunked" else 2)
                while not proxy.stopping.is_set():  # never ends (chunked_forever: slowly; huge: fast)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    proxy.sent_bytes += len(piece)
                    if mode == "chunked_forever":
                        time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError, OSError):
                return  # the client hung up: what it should do

    return Handler


# ---------------------------------------------------------------------------------------------- gRPC

def _proto(a: np.ndarray) -> tensor_pb2.TensorProto:
    import tensorflow as tf

    return tf.make_tensor_proto(a)


def _grpc_mutate(mode: str, resp: predict_pb2.PredictResponse, vocab: int) -> None:
    import tensorflow as tf

    lp = tf.make_ndarray(resp.outputs[LP])
    t = resp.outputs[LP]
    if mode == "extra_row":  # one row too many: every later row would be shifted onto the wrong copy
        t.CopyFrom(_proto(np.concatenate([lp[:1], lp])))
    elif mode == "broadcast":  # one value, full shape: TensorFlow would repeat it over every element
        t.Clear()
        t.dtype = types_pb2.DT_FLOAT
        for d in lp.shape:
            t.tensor_shape.dim.add(size=d)
        t.float_val.append(-1.0)
    elif mode == "huge_shape":  # a 40-byte message declaring [64, 2**22]
        t.Clear()
        t.dtype = types_pb2.DT_FLOAT
        t.tensor_shape.dim.add(size=64)
        t.tensor_shape.dim.add(size=2 ** 22)
        t.float_val.append(-1.0)
    elif mode == "wide":
        t.Clear()
        t.dtype = types_pb2.DT_FLOAT
        t.tensor_shape.dim.add(size=lp.shape[0])
        t.tensor_shape.dim.add(size=2 ** 29)
        t.float_val.append(-1.0)
    elif mode == "rank3":
        t.CopyFrom(_proto(lp[..., None]))
    elif mode == "negative_dim":
        t.tensor_shape.dim[0].size = -1
    elif mode == "overflow_dims":
        t.tensor_shape.dim[0].size = 2 ** 62
        t.tensor_shape.dim[1].size = 2 ** 62
    elif mode == "short_content":
        t.tensor_content = t.tensor_content[:-4]
    elif mode == "content_and_val":
        t.float_val.append(-1.0)
    elif mode == "double":
        t.CopyFrom(_proto(lp.astype(np.float64)))
    elif mode == "unknown_rank":
        t.tensor_shape.Clear()
        t.tensor_shape.unknown_rank = True
    elif mode == "nan":
        lp = lp.copy()
        lp[-1, 0] = np.nan
        t.CopyFrom(_proto(lp))
    elif mode == "positive":
        lp = lp.copy()
        lp[-1, 0] = 3.0
        t.CopyFrom(_proto(lp))
    elif mode == "top_k_oob":
        ids = tf.make_ndarray(resp.outputs[IDS]).copy()
        ids[-1, 0, 0] = vocab + 3
        resp.outputs[IDS].CopyFrom(_proto(ids))
    elif mode == "version2":
        resp.model_spec.version.value = 2
    elif mode == "other_name":
        resp.model_spec.name = "someothermodel"
    elif mode == "big_message":  # megabytes more than any answer to the request can need
        resp.outputs["junk"].CopyFrom(_proto(np.zeros(4 << 20, np.float32)))
    else:
        raise ValueError(mode)


GRPC_MODES = ("extra_row", "broadcast", "huge_shape", "wide", "rank3", "negative_dim", "overflow_dims",
              "short_content", "content_and_val", "double", "unknown_rank", "nan", "positive", "top_k_oob",
              "version2", "other_name", "big_message")


class _Predict(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, proxy: "TamperProxy"):
        self.proxy = proxy

    def _call(self, name, request, context):
        try:
            return getattr(self.proxy.predict_stub, name)(request, timeout=60)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def Predict(self, request, context):  # noqa: N802
        resp = self._call("Predict", request, context)
        mode = self.proxy.take()
        if mode:
            self.proxy.tampered += 1
            _grpc_mutate(mode, resp, self.proxy.vocab)
        return resp

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._call("GetModelMetadata", request, context)


class _Model(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, proxy: "TamperProxy"):
        self.proxy = proxy

    def GetModelStatus(self, request, context):  # noqa: N802
        try:
            return self.proxy.model_stub.GetModelStatus(request, timeout=60)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())


# ---------------------------------------------------------------------------------------------- proxy

class TamperProxy:
    """REST and gRPC in front of ``upstream`` (a started ``StandIn``), on 127.0.0.1, in this process."""

    def __init__(self, upstream, *, vocab: int):
        self.upstream, self.vocab = upstream, vocab
        self.mode: str | None = None
        self.skip = 0  # predict answers still to pass untouched before the mode applies
        self.tampered = 0
        self._lock = threading.Lock()
        self.sent_bytes = 0
        self.drip_s = 0.5
        self.stopping = threading.Event()

    def take(self) -> str | None:
        """The mode for the predict answer now passing (None: untouched)."""
        with self._lock:
            if self.mode and self.skip > 0:
                self.skip -= 1
                return None
            return self.mode

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self._grpc_port}"

    def start(self) -> "TamperProxy":
        opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.upstream.grpc_port}", options=opts)
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=opts)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Predict(self), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_Model(self), self._grpc)
        self._grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._grpc.stop(0)
        self._channel.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
