"""The KServe v2 client's wire format and checks, without a server: the hand-built gRPC messages against
Triton's own generated descriptors (tritonclient, in .venv-triton), the HTTP binary request against
tritonclient's, response validation (the KServe engines' ``_predict_once`` and the checks every remote
engine shares), header options, and the HTTP deadline and size bound against a local socket that
misbehaves on purpose."""
from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import requests
from triton_fixtures import run_in_triton_venv, triton_python

from mlm_scorer.engines._remote import (RAW_BYTES_PER_VALUE, BadResponseError, ModelChangedError, RemoteOptions,
                                        RetryableError, expected_outputs, response_limit)
from mlm_scorer.engines.kserve_base import KServeEngine, Reply, read_headers
from mlm_scorer.engines.kserve_http import call, decode_response, encode_request
from mlm_scorer.errors import UsageError

# ------------------------------------------------------------------------------------------ gRPC messages

_DUMP = r"""
import json, sys
from tritonclient.grpc import service_pb2, model_config_pb2
names = json.loads(sys.argv[1])
out = {}
for full in names:
    short = full.split(".", 1)[1]
    top, _, rest = short.partition(".")
    mod = service_pb2 if top in service_pb2.DESCRIPTOR.message_types_by_name else model_config_pb2
    d = mod.DESCRIPTOR.message_types_by_name[top]
    for part in rest.split(".") if rest else []:
        d = d.nested_types_by_name[part]
    out[full] = {f.name: [f.number, f.type, f.label, f.message_type.full_name if f.message_type else ""]
                 for f in d.fields}
print(json.dumps(out))
"""


def test_grpc_messages_are_a_subset_of_tritons_own():
    """Every field of every hand-built message has the official name, number, type, label and message type
    (tritonclient 2.51's service_pb2 / model_config_pb2, generated from Triton's .proto files)."""
    from mlm_scorer.engines.kserve_proto import METHOD_PATH, descriptor_fields

    py = triton_python()
    mine = descriptor_fields()
    official = json.loads(run_in_triton_venv(py, _DUMP, json.dumps(sorted(mine))))
    assert set(official) == set(mine)
    for msg, fields in mine.items():
        for name, spec in fields.items():
            assert name in official[msg], f"{msg}.{name} is not in Triton's {msg}"
            assert list(spec) == official[msg][name], f"{msg}.{name}: {spec} vs Triton's {official[msg][name]}"
    assert METHOD_PATH["ModelInfer"] == "/inference.GRPCInferenceService/ModelInfer"


def test_grpc_request_bytes_decode_with_tritons_messages():
    """A ModelInferRequest built here, parsed by tritonclient's generated class, says the same."""
    from mlm_scorer.engines.kserve_proto import pb

    req = pb["ModelInferRequest"](model_name="bert", model_version="3", id="r-1")
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    req.inputs.add(name="input_ids", datatype="INT32", shape=[2, 3])
    req.raw_input_contents.append(a.astype("<i4").tobytes())
    req.outputs.add(name="masked_lm_log_probs")
    code = ("import sys, json\nfrom tritonclient.grpc import service_pb2 as s\nimport numpy as np\n"
            "r = s.ModelInferRequest.FromString(bytes.fromhex(sys.argv[1]))\n"
            "print(json.dumps([r.model_name, r.model_version, r.id, r.inputs[0].name, r.inputs[0].datatype,"
            " list(r.inputs[0].shape), np.frombuffer(r.raw_input_contents[0], '<i4').tolist(), r.outputs[0].name]))")
    got = json.loads(run_in_triton_venv(triton_python(), code, req.SerializeToString().hex()))
    assert got == ["bert", "3", "r-1", "input_ids", "INT32", [2, 3], list(range(6)), "masked_lm_log_probs"]


# ------------------------------------------------------------------------------------------ HTTP binary

def test_http_binary_request_equals_tritonclients():
    """The binary-extension body: the JSON header's inputs/outputs and the raw bytes equal what tritonclient's
    InferInput.set_data_from_numpy(binary_data=True) / InferRequestedOutput(binary_data=True) produce."""
    rng = np.random.default_rng(0)
    inputs = {"input_ids": rng.integers(0, 300, (3, 7)).astype(np.int32),
              "masked_lm_positions": rng.integers(1, 6, (3, 2)).astype(np.int32)}
    body, hlen = encode_request(inputs, ["masked_lm_log_probs", "top_k_ids"], "req-9")
    code = r"""
import json, sys
import numpy as np
import tritonclient.http as th
from tritonclient.http._utils import _get_inference_request
spec = json.loads(sys.argv[1])
ins = []
for name, rows in spec.items():
    a = np.asarray(rows, np.int32)
    i = th.InferInput(name, list(a.shape), "INT32"); i.set_data_from_numpy(a, binary_data=True); ins.append(i)
outs = [th.InferRequestedOutput(n, binary_data=True) for n in ("masked_lm_log_probs", "top_k_ids")]
body, hlen = _get_inference_request(inputs=ins, request_id="req-9", outputs=outs, sequence_id=0, sequence_start=False,
                                    sequence_end=False, priority=0, timeout=None, custom_parameters=None)
body = body if isinstance(body, bytes) else body.encode()
hlen = hlen if hlen is not None else len(body)
print(json.dumps({"header": json.loads(body[:hlen]), "raw": body[hlen:].hex()}))
"""
    theirs = json.loads(run_in_triton_venv(triton_python(), code, json.dumps({k: v.tolist() for k, v in inputs.items()})))
    assert json.loads(body[:hlen]) == theirs["header"]
    assert body[hlen:].hex() == theirs["raw"]


def _reply(**over) -> tuple[Reply, np.ndarray]:
    B, P, k = 2, 3, 4
    pos = np.array([[1, 2, 0], [3, 0, 0]], np.int32)
    lp = np.array([[-1.5, -0.25, 0.0], [-3.0, 0.0, 0.0]], np.float32)
    ids = np.tile(np.arange(k, dtype=np.int32), (B, P, 1))
    ids[pos == 0] = -1
    tlp = np.full((B, P, k), -2.0, np.float32)
    tlp[pos == 0] = -np.inf
    outs = {"masked_lm_log_probs": ("FP32", (B, P), lp.reshape(-1)), "top_k_ids": ("INT32", (B, P, k), ids.reshape(-1)),
            "top_k_log_probs": ("FP32", (B, P, k), tlp.reshape(-1))}
    outs.update(over.pop("outputs", {}))
    fields = dict(model_name="bert", model_version="1", id="r1", outputs=outs)
    fields.update(over)
    return Reply(**fields), pos


class _Answers(KServeEngine):
    """A KServe engine, without a server or its start-up checks, whose every inference request (id "r1", for
    model 'bert' version 1, top-k 4, a 10-token vocabulary) is answered with ``reply``."""

    name = "kserve_http"
    SCHEMES = {"http": 8000}

    def __init__(self, reply: Reply):  # not RemoteEngine.__init__: no connection, no start-up checks
        self.opts = RemoteOptions.parse(self.name, {"server": "http://127.0.0.1:1", "model_name": "bert",
                                                    "model_version": 1, "padding_row": False},
                                        schemes=self.SCHEMES)
        self.vocab_size, self.top_k_width, self.max_slots = 10, 4, 8
        self._verify = None
        self.reply = reply

    def _request_id(self) -> str:
        return "r1"

    def _infer(self, inputs, outputs, version, request_id, limit):
        assert (version, request_id) == ("1", "r1")
        return self.reply


def _check(reply, pos):
    """The outputs of ``reply`` as the engine would use them (every check passed), for a request of 2 copies x 3
    slots with masked_lm_positions ``pos``."""
    return _Answers(reply).predict_checked({"masked_lm_positions": pos},
                                           ["masked_lm_log_probs", "top_k_ids", "top_k_log_probs"])


def test_a_well_formed_reply_passes_with_padding_slots():
    reply, pos = _reply()
    got = _check(reply, pos)
    assert got["top_k_ids"].shape == (2, 3, 4) and got["masked_lm_log_probs"][0, 1] == np.float32(-0.25)


@pytest.mark.parametrize("change,message", [
    ({"model_name": "other"}, "is from model 'other', not 'bert'"),
    ({"model_name": ""}, "is from model '', not 'bert'"),
    ({"model_version": "2"}, "is from version 2 of 'bert', but this run verified version 1"),
    ({"id": "r2"}, "answers request 'r2', not 'r1'"),
    ({"outputs": {"top_k_ids": ("INT64", (2, 3, 4), np.zeros(24, np.int64))}}, "datatype INT64, expected INT32"),
    ({"outputs": {"masked_lm_log_probs": ("FP32", (2, 4), np.zeros(8, np.float32))}},
     r"shape \[2, 4\]; this request allows float32 \[2, 3\]"),
    ({"outputs": {"masked_lm_log_probs": ("FP32", (3, 3), np.zeros(9, np.float32))}},
     r"shape \[3, 3\]; this request allows float32 \[2, 3\]"),
    ({"outputs": {"masked_lm_log_probs": ("FP32", (2, 3), np.zeros(5, np.float32))}},
     r"holds 5 float32 values for shape \[2, 3\] \(6 expected\)"),
    ({"outputs": {"top_k_log_probs": ("FP32", (2, 3, 5), np.zeros(30, np.float32))}},
     r"this request allows float32 \[2, 3, 4\]"),
])
def test_structure_is_refused(change, message):
    reply, pos = _reply(**change)
    with pytest.raises(BadResponseError, match=message) as ei:
        _check(reply, pos)
    assert isinstance(ei.value, ModelChangedError) == ("model_name" in change or "model_version" in change)


def test_missing_output_is_refused():
    reply, pos = _reply()
    del reply.outputs["top_k_ids"]
    with pytest.raises(BadResponseError, match="lacks output 'top_k_ids'"):
        _check(reply, pos)


@pytest.mark.parametrize("name,index,value,message", [
    ("masked_lm_log_probs", 0, np.nan, r"\[0, 0\] = nan: a log-probability must be finite and <= 0"),
    ("masked_lm_log_probs", 1, 0.5, r"\[0, 1\] = 0.5: a log-probability must be finite and <= 0"),
    ("masked_lm_log_probs", 0, -np.inf, "a log-probability must be finite"),
    ("top_k_log_probs", 0, -np.inf, r"top_k_log_probs\[0, 0, 0\] = -inf: .* finite in a slot that was asked for"),
    ("top_k_log_probs", 0, 0.1, r"top_k_log_probs\[0, 0, 0\] = 0.1\d*: a top-k log-probability must be <= 0"),
    ("top_k_ids", 0, 10, r"top_k_ids\[0, 0, 0\] = 10: a top-k id must be a token of the vocabulary \(10 tokens"),
    ("top_k_ids", 0, -1, r"top_k_ids\[0, 0, 0\] = -1: .*-1 only in an unused slot"),  # -1 at a used slot
])
def test_impossible_numbers_are_refused(name, index, value, message):
    reply, pos = _reply()
    datatype, shape, flat = reply.outputs[name]
    flat = flat.copy()
    flat[index] = value
    reply.outputs[name] = (datatype, shape, flat)
    with pytest.raises(BadResponseError, match=message):
        _check(reply, pos)


def _http_body(reply_json: dict, tensors: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(reply_json).encode()
    return head + b"".join(tensors), {"Inference-Header-Content-Length": str(len(head))}


def test_decode_binary_response():
    lp = np.array([[-1.0, -2.0]], np.float32)
    ids = np.array([[[1, 2], [3, 4]]], np.int32)
    body, hdrs = _http_body({"model_name": "bert", "model_version": "1", "id": "x", "outputs": [
        {"name": "masked_lm_log_probs", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
        {"name": "top_k_ids", "datatype": "INT32", "shape": [1, 2, 2], "parameters": {"binary_data_size": 16}}]},
        [lp.tobytes(), ids.tobytes()])
    r = decode_response(body, hdrs)
    assert (r.model_name, r.model_version, r.id) == ("bert", "1", "x")
    np.testing.assert_array_equal(r.outputs["top_k_ids"][2], ids.reshape(-1))
    np.testing.assert_array_equal(r.outputs["masked_lm_log_probs"][2], lp.reshape(-1))


@pytest.mark.parametrize("mutate,message", [
    (lambda b, h: (b + b"\0\0\0\0", h), "4 bytes beyond its declared tensors"),
    (lambda b, h: (b[:-4], h), "declares 8 bytes of binary data; the answer has 4 left"),
    (lambda b, h: (b, {"Inference-Header-Content-Length": str(len(b) + 1)}), "does not fit"),
    (lambda b, h: (b, {"Inference-Header-Content-Length": "x"}), "is not a number"),
])
def test_malformed_binary_response_is_refused(mutate, message):
    body, hdrs = _http_body({"model_name": "bert", "outputs": [
        {"name": "masked_lm_log_probs", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}]},
        [np.zeros(2, np.float32).tobytes()])
    with pytest.raises(BadResponseError, match=message):
        decode_response(*mutate(body, hdrs))


def test_response_limit_grows_with_the_request():
    """Raw float32/int32 tensors: 4 bytes a value, for the outputs asked for (B x P log-probs, B x P x k of
    each top-k output), plus 64 KiB for the JSON header."""
    ins = {n: {"masked_lm_positions": np.zeros((b, 8), np.int32)} for n, b in (("64", 64), ("32", 32))}
    outs = ["masked_lm_log_probs", "top_k_ids", "top_k_log_probs"]
    limit = {n: response_limit(expected_outputs(i, outs, k=5, max_slots=0).values(), RAW_BYTES_PER_VALUE)
             for n, i in ins.items()}
    assert limit["64"] - limit["32"] == 4 * 32 * 8 * 11
    assert limit["32"] == (1 << 16) + 4 * 32 * 8 * 11


# ------------------------------------------------------------------------------------------ options

def test_headers_option_and_file(tmp_path):
    f = tmp_path / "h.txt"
    f.write_text("# gateway\nX-Api-Key: s3cret\n\ntriton-access-token: abc\n")
    assert read_headers("X-A: 1; X-B: two words", str(f), engine="kserve_http") == {
        "X-A": "1", "X-B": "two words", "X-Api-Key": "s3cret", "triton-access-token": "abc"}
    f.write_text("X-Api-Key s3cret-value\n")
    with pytest.raises(UsageError, match=r"h.txt:1: expected 'Name: value'") as ei:
        read_headers(None, str(f), engine="kserve_http")
    assert "s3cret" not in str(ei.value)
    with pytest.raises(UsageError, match="set by the client itself"):
        read_headers("Content-Type: text/plain", None, engine="kserve_http")
    with pytest.raises(UsageError, match="cannot read"):
        read_headers(None, str(tmp_path / "missing"), engine="kserve_http")


# ------------------------------------------------------------------------------------------ deadline, size

class _BadServer:
    """A socket that answers every HTTP request with ``head`` and then ``body`` bytes, one chunk per ``pause``."""

    def __init__(self, head: bytes, body: bytes, *, chunk: int = 1, pause: float = 0.05):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v2/models/bert/versions/1/infer"
        self.head, self.body, self.chunk, self.pause = head, body, chunk, pause
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._read_request(conn)
                    conn.sendall(self.head)
                    for i in range(0, len(self.body), self.chunk):
                        if self.stop.is_set():
                            return
                        conn.sendall(self.body[i:i + self.chunk])
                        time.sleep(self.pause)
                    conn.shutdown(socket.SHUT_WR)  # then wait for the client to close: no reset of unread data
                    conn.settimeout(5)
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    @staticmethod
    def _read_request(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                raise OSError("the client closed before its request was complete")
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            more = conn.recv(65536)
            if not more:
                raise OSError("the client closed before its request was complete")
            body += more

    def close(self):
        self.stop.set()
        self.sock.close()


def test_deadline_covers_the_whole_body():
    """A server that sends one byte every 50 ms keeps every socket read short of the timeout; the client
    still gives up when ``timeout`` has passed since the request was sent."""
    body = b"x" * 400
    srv = _BadServer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body)
    try:
        with requests.Session() as s:
            t = time.monotonic()
            with pytest.raises(RetryableError, match=r"not complete within 1s"):
                call(s, "POST", srv.url, timeout=1.0, connect_timeout=1.0, limit=10_000, body=b"{}")
            assert time.monotonic() - t < 2.5
    finally:
        srv.close()


@pytest.mark.parametrize("declared", [True, False])
def test_an_answer_larger_than_the_request_allows_is_refused(declared):
    body = b"y" * 50_000
    head = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) if declared
            else b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    srv = _BadServer(head, body, chunk=4096, pause=0.0)
    try:
        with requests.Session() as s:
            with pytest.raises(BadResponseError, match="than the 10000 bytes|exceeds the 10000 bytes"):
                call(s, "POST", srv.url, timeout=10.0, connect_timeout=1.0, limit=10_000, body=b"{}")
    finally:
        srv.close()


# ------------------------------------------------------------------------------------------ light path

def test_the_kserve_clients_import_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys; import mlm_scorer.engines.kserve_http, mlm_scorer.engines.kserve_grpc, mlm_scorer.cli; "
            "print(sorted(m for m in ('tensorflow', 'torch', 'onnxruntime', 'tritonclient') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ command line

@pytest.mark.parametrize("argv,message", [
    (["--protocol", "kserve"], "--protocol applies to --server"),
    (["--server", "grpc://h:8001", "--engine", "kserve_http"], "is a grpc URL but --engine is kserve_http"),
    (["--server", "http://h:8000", "--engine", "rest", "--protocol", "kserve"],
     "--engine rest speaks tfserving, not --protocol kserve"),
    (["--engine", "kserve_grpc"], "--engine kserve_grpc needs --server URL"),
    (["--server", "http://h:8000"], "needs --model pointing at a local copy of the export"),
    (["--server", "http://h:8000", "--protocol", "triton"], "invalid choice: 'triton'"),
])
def test_protocol_flag_usage_errors(argv, message, capsys, tmp_path):
    from mlm_scorer.cli import main

    with pytest.raises(SystemExit) as ei:
        main([str(tmp_path / "in.tsv"), "-o", str(tmp_path / "o.parquet"), *argv])
    assert ei.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,engine", [
    (["--server", "http://h:8000", "--protocol", "kserve"], "kserve_http"),
    (["--server", "grpcs://h:8001", "--protocol", "kserve"], "kserve_grpc"),
    (["--server", "http://h:8501", "--protocol", "tfserving"], "rest"),
    (["--server", "grpc://h:8500"], "auto"),
    (["--server", "grpc://h:8001", "--engine", "kserve_grpc"], "kserve_grpc"),
    (["--server", "http://h:8501", "--engine", "rest", "--protocol", "auto"], "rest"),
])
def test_protocol_flag_picks_the_engine(argv, engine, tmp_path):
    from mlm_scorer.cli import build_parser
    from mlm_scorer.engines.base import resolve_engine
    from mlm_scorer.settings import ScoreSettings

    ap = build_parser()
    s = ScoreSettings.from_cli_args(ap.parse_args([str(tmp_path / "in.tsv"), "-o", str(tmp_path / "o.parquet"), *argv]))
    assert resolve_engine(s.engine, s.server, s.protocol) == engine


# ------------------------------------------------------------------------------------------ detection

def test_detection_refuses_a_server_that_speaks_neither_protocol(tmp_path):
    import functools
    import http.server

    from mlm_scorer.engines.kserve_base import detect_protocol

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(UsageError, match=r"answers neither KServe v2 .*HTTP 404.* nor TF Serving .*pass --protocol"):
            detect_protocol(url, {"model_name": "bert", "retry_budget": 1})
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_detection_of_a_server_that_is_down_stops_within_the_budget(scheme):
    from triton_fixtures import free_ports

    from mlm_scorer.engines.kserve_base import detect_protocol
    from mlm_scorer.errors import EngineError

    port = free_ports(1)[0]
    t = time.monotonic()
    with pytest.raises(EngineError, match=rf"detecting the protocol of {scheme}://127.0.0.1:{port}: gave up after"):
        detect_protocol(f"{scheme}://127.0.0.1:{port}", {"retry_budget": 1, "backoff_max": 0.2})
    assert time.monotonic() - t < 5
