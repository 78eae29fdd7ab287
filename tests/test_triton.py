"""mlm-score against a real Triton Inference Server (PyTriton's tritonserver 2.51, .venv-triton), over
KServe v2 HTTP (binary tensors) and gRPC.

Two servers per module: ``scripts/serve_triton.py`` serving the export as a user starts it (parity,
kill/restart/--resume, two clients, protocol detection), and tests/triton_server.py serving other exports
and a spare model behind an access-token header, with gRPC over TLS (refusals, a model that is not ready,
headers, TLS, dynamic batching). A test that changes the weights behind the model's name and version (a
restart on other weights, or a switch in place) has a tests/triton_server.py of its own (``lone``).
Numbers come from transformers' PyTorch model on the same weights.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import committed, read_outputs, wait_for_chunks, write_tsv
from tiny_models import SMALL_VOCAB, make_hf_bert
from triton_fixtures import export_with_onnx, serve_triton_process, test_server_process, triton_python

from mlm_scorer import score_file
from mlm_scorer.engines.base import get_engine
from mlm_scorer.errors import EngineError, ModelError
from mlm_scorer.model_dir import ModelDir

TOL = 1e-4
MODES = ["whole-word", "word-l2r", "token"]
KINDS = ["kserve_http", "kserve_grpc"]
SENTENCES = [
    "The cat sat on the mat.",
    "The quick brown fox jumps over the lazy dog!",
    "Running dogs walked; people read books?",
    "jacksonville émigré 中文 😀 \"quoted\"",
    "ab",
    "unbelievably, the tokenizer splits uncommon words into pieces",
]


def _sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 3 to 14 words drawn from the tiny vocabulary's whole words."""
    words = [w for w in SMALL_VOCAB.read_text(encoding="utf-8").split("\n") if w.isalpha() and len(w) > 1]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)]


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def triton_py() -> Path:
    return triton_python()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton")


@pytest.fixture(scope="module")
def bert_export(tiny_hf, tiny_export, root) -> Path:
    return export_with_onnx(tiny_hf, root / "bert", copy_of=tiny_export)


@pytest.fixture(scope="module")
def other_export(root) -> Path:
    """Other weights and another (smaller) vocabulary."""
    lines = SMALL_VOCAB.read_text(encoding="utf-8").rstrip("\n").split("\n")
    vocab = root / "other_vocab.txt"
    vocab.write_text("\n".join(lines[:-20]) + "\n", encoding="utf-8")
    return export_with_onnx(make_hf_bert(root / "other_hf", vocab=vocab, seed=7), root / "other")


@pytest.fixture(scope="module")
def sameshape_export(root) -> Path:
    """The same vocabulary and shape as bert_export, other weights."""
    return export_with_onnx(make_hf_bert(root / "sameshape_hf", seed=11), root / "sameshape")


@pytest.fixture(scope="module")
def server(triton_py, bert_export, root):
    """scripts/serve_triton.py EXPORT, as a user starts it."""
    srv = serve_triton_process(triton_py, bert_export, root, name="bert").start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _server_up(request):
    """A test that killed the server and failed before restarting it does not take the next ones along."""
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        if srv.proc is None:
            srv.start()


@pytest.fixture(scope="module")
def certs(root) -> Path | None:
    if shutil.which("openssl") is None:
        return None
    d = root / "tls"
    d.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def zoo(triton_py, bert_export, other_export, sameshape_export, root, certs):
    """Other exports (with and without their identity in the configuration), a spare copy of bert to make
    not ready, inference behind Triton's access-token header, gRPC over TLS where openssl made a certificate,
    and a long batching window so that concurrent requests are merged."""
    extra = ["--restrict-inference", "--max-queue-delay-us", "50000"]
    if certs is not None:
        extra += ["--grpc-tls-cert", str(certs / "cert.pem"), "--grpc-tls-key", str(certs / "key.pem")]
    srv = test_server_process(triton_py, root, root / "zoo", models={"other": other_export, "spare": bert_export,
                                                                      "bert": bert_export},
                              bare={"other_bare": other_export, "sameshape_bare": sameshape_export}, extra=tuple(extra))
    srv.start()
    srv.tls = certs is not None
    yield srv
    srv.stop()


def _zoo_engine(kind, zoo, certs, model: ModelDir, name: str, *, header: bool = True, **kw):
    opts = {"server": zoo.http_url if kind == "kserve_http" else zoo.grpc_url.replace("grpc://", "grpcs://" if zoo.tls
                                                                                     else "grpc://"),
            "model_name": name, "retry_budget": 5, "backoff_max": 0.5}
    if kind == "kserve_grpc" and zoo.tls:
        opts["tls_ca_file"] = str(certs / "cert.pem")
    if header:  # over gRPC, Triton expects a restricted protocol's key prefixed with triton-grpc-protocol-
        prefix = "triton-grpc-protocol-" if kind == "kserve_grpc" else ""
        opts["headers"] = f"{prefix}triton-access-token: {zoo.token}"
    opts.update(kw)
    return get_engine(kind, model=model, **{k: v for k, v in opts.items() if v is not None})


def _url(server, kind: str) -> str:
    return server.http_url if kind == "kserve_http" else server.grpc_url


# ------------------------------------------------------------------------------------------ parity

def _check_against_reference(out: Path, reference, sentences: list[str], mode: str) -> float:
    words, sents = read_outputs(out)
    max_diff = 0.0
    for i, text in enumerate(sentences):
        ref = reference.word_log_probs(text, mode)
        got = [w for w in words if w["row"] == i]
        assert [w["word_index"] for w in got] == list(range(len(ref))), f"word count differs for {text!r}"
        max_diff = max(max_diff, float(np.max(np.abs(np.array([w["log_prob"] for w in got]) - np.array(ref)))))
        assert sents[i]["status"] == "ok" and sents[i]["pll"] == pytest.approx(sum(ref), abs=TOL * len(ref))
    return max_diff


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_word_log_probs_equal_transformers(kind, mode, server, bert_export, tiny_reference, tmp_path):
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), s] for i, s in enumerate(SENTENCES)])
    out = tmp_path / "out.parquet"
    summary = score_file(tsv, out, model=bert_export, engine=kind, mode=mode, id_column="id", top_k=3,
                         engine_options={"server": _url(server, kind), "model_name": "bert", "max_batch_size": 5})
    assert summary.scored == len(SENTENCES) and summary.engine == kind
    diff = _check_against_reference(out, tiny_reference, SENTENCES, mode)
    assert diff <= TOL, f"max |Δ log-prob| {diff:.2e} over {kind} in mode {mode}"


def _mlm_score(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlm_scorer", *args], capture_output=True, text=True, timeout=timeout)


def _same_outputs(a: Path, b: Path, *, ignore=("engine", "seconds")) -> None:
    import pyarrow.parquet as pq

    from mlm_scorer.writer import sentences_path

    for x, y in ((a, b), (sentences_path(a), sentences_path(b))):
        ta, tb = pq.read_table(x), pq.read_table(y)
        assert ta.column_names == tb.column_names and ta.num_rows == tb.num_rows > 0
        for col in ta.column_names:
            if col in ignore:
                continue
            va, vb = ta.column(col).to_pylist(), tb.column(col).to_pylist()
            if ta.schema.field(col).type in (_pa().float32(), _pa().float64()):
                np.testing.assert_allclose(np.array(vb, float), np.array(va, float), atol=1e-5, rtol=1e-5, err_msg=col)
            elif col == "top_k":  # [{token, log_prob}] per word: tokens equal, log-probs within 1e-5
                assert [[d["token"] for d in x or []] for x in va] == [[d["token"] for d in x or []] for x in vb]
                np.testing.assert_allclose([d["log_prob"] for x in vb for d in x or []],
                                           [d["log_prob"] for x in va for d in x or []], atol=1e-5, rtol=0)
            else:
                assert va == vb, col


def _pa():
    import pyarrow

    return pyarrow


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_plain_mlm_score_detects_triton_and_equals_the_in_process_engine(scheme, server, bert_export, tmp_path):
    """`mlm-score IN -o OUT --model EXPORT --server URL --model-name NAME`, no engine named: the server is
    asked which protocol it speaks; every column equals the in-process ONNX Runtime run's."""
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), s] for i, s in enumerate(SENTENCES + _sentences(20))])
    ref = tmp_path / "ref.parquet"
    r = _mlm_score(str(tsv), "-o", str(ref), "--model", str(bert_export), "--engine", "onnx", "--id-column", "id",
                   "--top-k", "3")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "srv.parquet"
    url = server.http_url if scheme == "http" else server.grpc_url
    r = _mlm_score(str(tsv), "-o", str(out), "--model", str(bert_export), "--server", url, "--model-name", "bert",
                   "--id-column", "id", "--top-k", "3", "--summary-json", str(tmp_path / "summary.json"))
    assert r.returncode == 0, r.stderr
    assert "speaks KServe v2" in r.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["engine"] == f"kserve_{scheme}"
    _same_outputs(ref, out)


@pytest.fixture(scope="module")
def tf_serving(bert_export, root):
    """The TF Serving stand-in (tests/tfserving_standin) serving the same export."""
    from tfserving_standin import StandIn

    tfs = StandIn({"bert": bert_export}, root).start()
    yield tfs
    tfs.stop()


def test_protocol_detection(server, tf_serving):
    """Triton answers as a KServe v2 server over HTTP and gRPC; the TF Serving stand-in as TF Serving, so a
    plain --server URL keeps reaching TF Serving through its own clients."""
    from mlm_scorer.engines.kserve_base import detect_protocol, server_engine

    assert detect_protocol(server.http_url, {"model_name": "bert"}) == "kserve"
    assert detect_protocol(server.grpc_url, {}) == "kserve"
    assert detect_protocol(tf_serving.rest_url, {"model_name": "bert"}) == "tfserving"
    assert server_engine(tf_serving.rest_url, "auto", {"model_name": "bert"}) == "rest"
    assert server_engine(tf_serving.grpc_url, "auto", {"model_name": "bert"}) == "grpc"


def test_kserve_engine_against_tf_serving_says_so(bert_export, tf_serving):
    md = ModelDir.open(bert_export)
    t = time.monotonic()
    with pytest.raises(ModelError, match=r"/v2/health/live.*is it a KServe v2 server"):
        get_engine("kserve_http", model=md, server=tf_serving.rest_url, model_name="bert", retry_budget=30)
    with pytest.raises(ModelError, match="ServerLive: UNIMPLEMENTED"):
        get_engine("kserve_grpc", model=md, server=tf_serving.grpc_url, model_name="bert", retry_budget=30)
    assert time.monotonic() - t < 10


def test_protocol_flag(server, bert_export, tmp_path):
    tsv = write_tsv(tmp_path / "in.tsv", [["0", "The cat sat on the mat."]])
    r = _mlm_score(str(tsv), "-o", str(tmp_path / "a.parquet"), "--model", str(bert_export), "--server",
                   server.http_url, "--model-name", "bert", "--protocol", "kserve", "--id-column", "id")
    assert r.returncode == 0, r.stderr
    assert "speaks" not in r.stderr  # no detection when the protocol is given
    r = _mlm_score(str(tsv), "-o", str(tmp_path / "b.parquet"), "--model", str(bert_export), "--server",
                   server.http_url, "--model-name", "bert", "--protocol", "tfserving", "--id-column", "id",
                   "--retry-budget", "2")
    assert r.returncode == 4, r.stderr  # TF Serving's /v1/models/bert is not there
    assert "/v1/models/bert" in r.stderr and "Traceback" not in r.stderr
    r = _mlm_score(str(tsv), "-o", str(tmp_path / "c.parquet"), "--model", str(bert_export), "--server",
                   server.http_url, "--engine", "rest", "--protocol", "kserve")
    assert r.returncode == 2 and "--protocol kserve" in r.stderr


# ------------------------------------------------------------------------------------------ kill, restart

def _wait_for_parts(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    parts = Path(str(out) + ".parts")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if parts.is_dir() and any(parts.glob("words-*.parquet")):
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("no chunk was committed in time")


def test_killed_server_then_resume_equals_a_clean_run(server, bert_export, tmp_path):
    """kill -9 of the whole server (tritonserver included) mid-run: the run stops within its retry budget
    with committed chunks (exit 5); the server restarts on the same ports; --resume finishes the run, and
    its outputs equal an undisturbed run's."""
    rows = [[str(i), s] for i, s in enumerate(_sentences(240, seed=3))]
    tsv = write_tsv(tmp_path / "in.tsv", rows)
    common = ["--model", str(bert_export), "--server", server.http_url, "--model-name", "bert", "--id-column", "id",
              "--protocol", "kserve", "--chunk-rows", "16", "--top-k", "2"]
    clean = tmp_path / "clean.parquet"
    r = _mlm_score(str(tsv), "-o", str(clean), *common)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(out), *common, "--retry-budget",
                             "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_parts(out, proc)
    server.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert "gave up after" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists()
    server.start()
    r = _mlm_score(str(tsv), "-o", str(out), *common, "--resume")
    assert r.returncode == 0, r.stderr
    _same_outputs(clean, out)


def test_run_rides_through_a_restart_on_the_same_model(server, bert_export, tiny_reference, tmp_path):
    """The server is killed while gRPC requests are in flight and restarted on the same ports and the same
    export: the client retries within its budget, the verification row of every answer after the restart still
    equals the start-up answer (the same weights are not taken for others), and the run finishes with every
    number equal to transformers'."""
    sentences = _sentences(80, seed=5)
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), s] for i, s in enumerate(sentences)])
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(out), "--model", str(bert_export),
                             "--server", server.grpc_url, "--model-name", "bert", "--id-column", "id", "--chunk-rows",
                             "16", "--retry-budget", "240", "--concurrency", "3", "--mode", "token",
                             "--engine-option", "backoff_max=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_parts(out, proc)
    server.kill()
    time.sleep(1.0)
    server.start()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "retrying in" in err  # the restart was seen
    diff = _check_against_reference(out, tiny_reference, sentences, "token")
    assert diff <= TOL


# ------------------------------------------------------------------------------------------ one model per run

@pytest.fixture
def lone(triton_py, bert_export, sameshape_export, tmp_path):
    """A server of its own serving ``bert`` = bert_export (tests/triton_server.py, the identity in its
    configuration), to be given other weights of the same shape under the same name and version
    (``_other_weights``): restarted on sameshape_export, or switched to it in place (``--swap``, SIGUSR1)."""
    models = {"bert": bert_export}
    srv = test_server_process(triton_py, tmp_path, tmp_path / "lone", models=models,
                              extra=("--swap", f"bert={sameshape_export}"))
    srv.models = models
    srv.start()
    yield srv
    srv.stop()


def _other_weights(srv, how: str, other: Path) -> None:
    """``restart``: kill -9 the server and start it on ``other`` (same ports, name and version); ``reload``:
    switch its model to ``other``'s weights in place, with no restart and no dropped connection."""
    if how == "restart":
        srv.kill()
        srv.models["bert"] = other
        srv.start()
        return
    seen = srv.log_path.read_text(errors="replace").count("SWAPPED")
    os.kill(srv.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while srv.log_path.read_text(errors="replace").count("SWAPPED") == seen:
        assert time.monotonic() < deadline, "the server did not switch its weights"
        time.sleep(0.05)


def _answered(srv) -> int:
    """Inference requests the server's model ``bert`` version 1 answered successfully (Triton's statistics)."""
    r = requests.get(f"{srv.http_url}/v2/models/bert/versions/1/stats", headers={"triton-access-token": srv.token},
                     timeout=10)
    assert r.status_code == 200, r.text
    return int(r.json()["model_stats"][0]["inference_stats"]["success"]["count"])


def _answered_since(srv, before: int, expected: int) -> int:
    """Requests answered since ``before``, read once the statistics show ``expected`` of them (or after 10 s), and
    again after a settling pause: Triton records a request's statistics after its response has left, so a read
    made at once can miss the request just answered."""
    deadline = time.monotonic() + 10
    while _answered(srv) - before < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return _answered(srv) - before


@pytest.mark.parametrize("how", ["restart", "reload"])
@pytest.mark.parametrize("kind", KINDS)
def test_other_weights_are_caught_on_the_first_answer(kind, how, lone, bert_export, sameshape_export):
    """The model behind the address changes to other weights of the same shape under the same name and version
    -- the server restarted on them, or the model reloaded in place with no dropped connection: the
    verification row in every request catches it on the first answer of the other weights (no result of them
    is returned, and no other request is sent)."""
    from mlm_scorer.engines.fake import FakeEngine
    from mlm_scorer.scorer import Scorer

    md = ModelDir.open(bert_export)
    batch = next(iter(Scorer(md, FakeEngine(md), mode="whole-word").prepare(SENTENCES).built))
    with get_engine(kind, model=md, server=_url(lone, kind), model_name="bert", retry_budget=120,
                    backoff_max=1) as eng:
        first = eng.run(batch)
        _other_weights(lone, how, sameshape_export)
        before = _answered(lone)
        with pytest.raises(EngineError, match=r"inference on \d+ copies: the server's answer to the verification row "
                                              r"differs from its answer at start-up by [\d.e-]+ \(allowed 0.001\): "
                                              r"the model served as 'bert' version 1 is no longer the one verified"):
            eng.run(batch)
        assert _answered_since(lone, before, 1) == 1
    assert np.isfinite(first.log_probs).all() and (first.log_probs < 0).all()


def _sentences_pll(tsv: Path, export: Path, out: Path) -> list[float]:
    import pyarrow.parquet as pq

    from mlm_scorer.writer import sentences_path

    score_file(tsv, out, model=export, engine="onnx", id_column="id")
    return pq.read_table(sentences_path(out), columns=["pll"]).column("pll").to_pylist()


@pytest.mark.parametrize("how", ["restart", "reload"])
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_mlm_score_never_commits_rows_of_two_models(scheme, how, lone, bert_export, sameshape_export, tmp_path):
    """Mid-run, with chunks committed, the server gets other weights under the same name and version (kill -9
    and a restart on them while the client retries, or a reload in place): the run stops with exit code 5
    before a row of the other weights is committed; every committed row is the first model's; --resume is
    refused at start-up and leaves the committed chunks alone."""
    rows = [[f"r{i}", s] for i, s in enumerate(_sentences(3000, seed=13))]
    tsv = write_tsv(tmp_path / "in.tsv", rows)
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(out), "--model", str(bert_export), "--server",
           lone.http_url if scheme == "http" else lone.grpc_url, "--model-name", "bert", "--protocol", "kserve",
           "--id-column", "id", "--chunk-rows", "100", "--retry-budget", "120", "--engine-option", "backoff_max=1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_chunks(out, proc, 2)
    _other_weights(lone, how, sameshape_export)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 5, err
    assert "no longer the one verified at start-up" in err and "Traceback" not in err, err
    assert not out.exists()
    parts, got = committed(out)
    assert 200 <= len(got) < len(rows)
    head = write_tsv(tmp_path / "head.tsv", rows[:len(got)])
    first = _sentences_pll(head, bert_export, tmp_path / "first.parquet")
    second = _sentences_pll(head, sameshape_export, tmp_path / "second.parquet")
    np.testing.assert_allclose(got, first, atol=1e-3, rtol=0)
    assert np.max(np.abs(np.array(got) - second)) > 0.1
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 4, r.stderr
    assert re.search(r"not the local export .*configuration records model_checksum|different weights are being "
                     r"served", r.stderr) and "Traceback" not in r.stderr, r.stderr
    assert committed(out)[0] == parts


# ------------------------------------------------------------------------------------------ two clients

def test_two_clients_at_once(server, bert_export, tiny_reference, tmp_path):
    """Two runs against one server at the same time, one per protocol, different inputs and modes: each
    equals transformers."""
    jobs = [("kserve_http", "whole-word", _sentences(24, seed=8)), ("kserve_grpc", "word-l2r", _sentences(24, seed=9))]
    errors: list[BaseException] = []

    def run(i, kind, mode, sentences):
        try:
            tsv = write_tsv(tmp_path / f"in{i}.tsv", [[str(j), s] for j, s in enumerate(sentences)])
            score_file(tsv, tmp_path / f"out{i}.parquet", model=bert_export, engine=kind, mode=mode, id_column="id",
                       engine_options={"server": _url(server, kind), "model_name": "bert", "concurrency": 3})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i, (_, mode, sentences) in enumerate(jobs):
        assert _check_against_reference(tmp_path / f"out{i}.parquet", tiny_reference, sentences, mode) <= TOL


def test_dynamic_batching_merges_concurrent_requests(zoo, certs, bert_export):
    """Equal-shape requests from several threads are merged by Triton's dynamic batcher (its statistics show
    fewer executions than requests), and every merged answer is still each request's own."""
    md = ModelDir.open(bert_export)
    from mlm_scorer.engines._remote import probe_batch

    with _zoo_engine("kserve_http", zoo, certs, md, "bert", concurrency=8) as eng:
        batches = [probe_batch(md, t) for t in range(10, 42)]
        expected = [eng.run(b).log_probs for b in batches]  # one at a time
        stats_url = f"{zoo.http_url}/v2/models/bert/versions/1/stats"
        hdr = {"triton-access-token": zoo.token}
        before = requests.get(stats_url, headers=hdr, timeout=10).json()["model_stats"][0]
        got = list(eng.map(batches))
        after = requests.get(stats_url, headers=hdr, timeout=10).json()["model_stats"][0]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.log_probs, e)
    requests_ = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests_ == len(batches) and executions < requests_, (requests_, executions)
    # each request: its copy and the verification row
    assert after["inference_count"] - before["inference_count"] == 2 * len(batches)


# ------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("kind", KINDS)
def test_another_export_is_refused_at_start_up(kind, zoo, certs, bert_export):
    md = ModelDir.open(bert_export)
    # its configuration names another export: refused before any inference
    with pytest.raises(ModelError, match=r"not the local export .*configuration records model_checksum .*vocab_sha256"):
        _zoo_engine(kind, zoo, certs, md, "other")
    # the same export without the configuration's identity: the vocabulary probe tells (other vocabulary)
    with pytest.raises(ModelError, match=r"cannot score target id \d+ .*vocabulary is smaller|served vocabulary is "
                                         r"smaller"):
        _zoo_engine(kind, zoo, certs, md, "other_bare")
    # same vocabulary, same shape, other weights, no identity in the configuration: the identity probe tells
    with pytest.raises(ModelError, match="different weights are being served"):
        _zoo_engine(kind, zoo, certs, md, "sameshape_bare")
    with _zoo_engine(kind, zoo, certs, md, "bert") as eng:  # and the right one passes, through the same checks
        # capped at the model's max_batch_size, the verification row included
        assert eng.served_version == 1 and eng.max_batch_size == 15


def test_refusal_through_the_command_line(zoo, bert_export, tmp_path):
    tsv = write_tsv(tmp_path / "in.tsv", [["0", "The cat sat on the mat."]])
    hdr = tmp_path / "headers.txt"
    hdr.write_text(f"triton-access-token: {zoo.token}\n")
    r = _mlm_score(str(tsv), "-o", str(tmp_path / "o.parquet"), "--model", str(bert_export), "--server", zoo.http_url,
                   "--model-name", "sameshape_bare", "--id-column", "id", "--engine-option",
                   f"headers_file={hdr}")
    assert r.returncode == 4, r.stderr
    assert "different weights are being served" in r.stderr and "Traceback" not in r.stderr
    assert zoo.token not in r.stderr
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_missing_access_header_is_reported_as_such(kind, zoo, certs, bert_export):
    md = ModelDir.open(bert_export)
    t = time.monotonic()
    with pytest.raises(ModelError, match=r"does not answer a plain inference request.*restricted.*triton-access-token"):
        _zoo_engine(kind, zoo, certs, md, "bert", header=False, retry_budget=30)
    assert time.monotonic() - t < 10  # not retried: a header does not appear by waiting


def test_grpc_tls(zoo, certs, bert_export):
    if not zoo.tls:
        pytest.skip("openssl is not available to make a test certificate")
    md = ModelDir.open(bert_export)
    with _zoo_engine("kserve_grpc", zoo, certs, md, "bert") as eng:
        assert eng.opts.tls and eng.served_version == 1
    with pytest.raises(EngineError):  # without the CA file the self-signed certificate is not trusted
        _zoo_engine("kserve_grpc", zoo, certs, md, "bert", tls_ca_file=None, retry_budget=1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_that_is_not_ready(kind, zoo, certs, bert_export):
    """The spare model is unloaded through Triton's repository API: the server still knows it, but no version
    is ready; the client waits for it within its retry budget, then stops naming the server's answer."""
    r = requests.post(f"{zoo.http_url}/v2/repository/models/spare/unload",
                      headers={"triton-access-token": zoo.token}, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while requests.get(f"{zoo.http_url}/v2/models/spare/ready", timeout=5).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    md = ModelDir.open(bert_export)
    t = time.monotonic()
    with pytest.raises(EngineError, match=r"model readiness: gave up after \d+ attempt.*retry budget 2s.*"
                                          r"(no available versions|not ready|not at ready state)"):
        _zoo_engine(kind, zoo, certs, md, "spare", retry_budget=2)
    assert time.monotonic() - t < 10

