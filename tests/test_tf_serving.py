"""The TF Serving engines (REST, gRPC) against a stand-in server process serving the real export.

The stand-in (tests/tfserving_standin) follows TF Serving's documented routes, protos, status codes and
error bodies; the real ``tensorflow_model_server`` cannot run on these machines.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("requests")
tf = pytest.importorskip("tensorflow")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import committed, wait_for_chunks  # noqa: E402
from tfserving_standin import StandIn  # noqa: E402
from tiny_models import make_hf_bert  # noqa: E402

from mlm_scorer.engines._remote import (  # noqa: E402
    BadResponseError,
    FatalError,
    RemoteOptions,
    RetryableError,
    ordered_map,
    probe_batch,
    with_retries,
)
from mlm_scorer.engines.base import Batch  # noqa: E402
from mlm_scorer.errors import EngineError, ModelError, UsageError  # noqa: E402
from mlm_scorer.model_dir import ModelDir  # noqa: E402

SENTENCES = [
    "the quick brown fox jumps over the lazy dog .",
    "a man walks into a bar and orders a drink",
    "she sells sea shells by the sea shore",
    "it was the best of times , it was the worst of times",
    "to be or not to be that is the question",
    "hello world",
    "this is a longer sentence with several words that will need several masked copies in every mode",
    "unbelievably , the tokenizer splits uncommon words into pieces",
]
MODES = ("whole-word", "word-l2r", "token")
TOL = 1e-5


def _fake_mlm(base: Path, *, vocab: int, k: int = 5, int64_ids: bool = False, drop: str | None = None) -> Path:
    """A SavedModel whose serving_default looks like ours but differs: another vocabulary size, int64
    input_ids, or a missing input. The served log-probs are log_softmax over ``vocab`` constant logits."""
    id_dtype = tf.int64 if int64_ids else tf.int32
    names = ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids"]
    specs = {n: tf.TensorSpec([None, None], id_dtype if n == "input_ids" else tf.int32, name=n) for n in names
             if n != drop}

    class M(tf.Module):
        @tf.function(input_signature=[specs])
        def serve(self, inputs):
            pos = inputs["masked_lm_positions"]
            B, P = tf.shape(pos)[0], tf.shape(pos)[1]
            logits = tf.tile(tf.reshape(tf.range(vocab, dtype=tf.float32) / vocab, [1, 1, vocab]), [B, P, 1])
            lp = tf.nn.log_softmax(logits, axis=-1)
            tgt = inputs.get("masked_lm_ids", tf.zeros_like(pos))
            top_lp, top_ids = tf.math.top_k(lp, k=k)
            return {"masked_lm_log_probs": tf.gather(lp, tgt, batch_dims=2), "top_k_ids": top_ids,
                    "top_k_log_probs": top_lp}

    m = M()
    fn = m.serve.get_concrete_function()
    out = base / "1"

    @tf.function(input_signature=list(specs.values()))
    def serving_default(*args):
        return fn(dict(zip(specs, args)))

    m.sd = serving_default
    tf.saved_model.save(m, str(out), signatures={"serving_default": serving_default.get_concrete_function()})
    return base


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from mlm_export import export

    root = tmp_path_factory.mktemp("tfs")
    make_hf_bert(root / "hf")
    export(root / "hf", root / "bert", log=lambda *_: None)
    return root / "bert"


@pytest.fixture(scope="module")
def model(export_dir) -> ModelDir:
    return ModelDir.open(export_dir)


@pytest.fixture(scope="module")
def other_export(tmp_path_factory) -> Path:
    """An export of the same shape, vocabulary and k as ``export_dir``, with other weights (version 1)."""
    from mlm_export import export

    root = tmp_path_factory.mktemp("other")
    make_hf_bert(root / "other_hf", seed=7)
    export(root / "other_hf", root / "other", log=lambda *_: None)
    return root / "other"


@pytest.fixture(scope="module")
def server(export_dir, other_export, model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fakes")
    V = model.manifest["vocab_size"]
    models = {
        "otherweights": other_export,
        "bert": export_dir,
        "wrongsig": _fake_mlm(root / "wrongsig", vocab=V, int64_ids=True, drop="masked_lm_ids"),
        "bigvocab": _fake_mlm(root / "bigvocab", vocab=V + 7),
        "smallvocab": _fake_mlm(root / "smallvocab", vocab=V - 7),
        "topk7": _fake_mlm(root / "topk7", vocab=V, k=7),
    }
    s = StandIn(models, tmp_path_factory.mktemp("logs")).start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _clean_faults(request):
    if "server" in request.fixturenames:
        s = request.getfixturevalue("server")
        if s.proc is None:
            s.start()
        s.reset()
    yield


@pytest.fixture(scope="module")
def reference(model):
    from mlm_scorer.engines.tf_saved_model import SavedModelEngine

    eng = SavedModelEngine(model, top_k=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def batches(model):
    """{mode: [Batch]} built by the real scorer from real sentences."""
    from mlm_scorer.engines.fake import FakeEngine
    from mlm_scorer.scorer import Scorer

    out = {}
    for mode in MODES:
        sc = Scorer(model, FakeEngine(model), mode=mode)
        out[mode] = list(sc.prepare(SENTENCES).built)
    return out


def _engine(kind: str, model: ModelDir, server: StandIn, **opts):
    if kind == "rest":
        from mlm_scorer.engines.tf_serving_rest import RestEngine as cls

        url = server.rest_url
    else:
        pytest.importorskip("tensorflow_serving")
        from mlm_scorer.engines.tf_serving_grpc import GrpcEngine as cls

        url = server.grpc_url
    opts.setdefault("retry_budget", 30)
    opts.setdefault("backoff_max", 0.5)
    return cls(model, server=url, **opts)


def _assert_same(results, expected):
    assert len(results) == len(expected)
    for r, e in zip(results, expected):
        assert r.log_probs.shape == e.log_probs.shape
        np.testing.assert_allclose(r.log_probs, e.log_probs, atol=TOL, rtol=0)
        if e.top_k_ids is not None:
            np.testing.assert_array_equal(r.top_k_ids, e.top_k_ids)
            np.testing.assert_allclose(r.top_k_log_probs, e.top_k_log_probs, atol=TOL, rtol=0)


ENGINES = ("rest", "grpc")


# ------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_equals_in_process_engine(kind, mode, model, server, reference, batches):
    expected = [reference.run(b) for b in batches[mode]]
    pad = mode == "token"  # the padding_row option (for server-side batching) must not change results
    with _engine(kind, model, server, top_k=True, concurrency=3, max_batch_size=5, padding_row=pad) as eng:
        got = list(eng.map(batches[mode]))
    _assert_same(got, expected)
    sizes = server.stats()["batch_sizes"]
    assert sizes and max(sizes) <= 5  # the engine cut batches to max_batch_size


@pytest.mark.parametrize("kind", ENGINES)
def test_requests_in_flight_and_results_in_order(kind, model, server, reference, batches):
    bs = batches["token"][:8]
    expected = [reference.run(b) for b in bs]
    server.faults(delay_next=-1, delay_s=0.1)
    with _engine(kind, model, server, concurrency=4, max_batch_size=3) as eng:
        got = list(eng.map(bs))
    _assert_same([type(g)(g.log_probs) for g in got], [type(e)(e.log_probs) for e in expected])
    assert server.stats()["max_in_flight"] >= 2


def test_rest_row_format_and_errors_follow_the_docs(server, model):
    import requests

    b = probe_batch(model, 9)
    rows = [{k: v[0].tolist() for k, v in b.as_dict().items()}]
    r = requests.post(f"{server.rest_url}/v1/models/bert:predict", json={"instances": rows})
    assert r.status_code == 200 and set(r.json()["predictions"][0]) == {"masked_lm_log_probs", "top_k_ids",
                                                                         "top_k_log_probs"}
    r = requests.post(f"{server.rest_url}/v1/models/half:predict", json={"instances": rows})
    assert r.status_code == 404 and r.json() == {"error": "Servable not found for request: Latest(half)"}
    r = requests.get(f"{server.rest_url}/v1/models/bert/versions/1")
    assert r.json()["model_version_status"][0]["state"] == "AVAILABLE"


# ------------------------------------------------------------------------------------ start-up checks

@pytest.mark.parametrize("kind", ENGINES)
def test_wrong_model_name(kind, model, server):
    with pytest.raises(ModelError, match=r"nope.*(404|NOT_FOUND).*Could not find any versions of model nope"):
        _engine(kind, model, server, model_name="nope")


@pytest.mark.parametrize("kind", ENGINES)
def test_missing_version(kind, model, server):
    with pytest.raises(ModelError, match=r"version 7 is not served; served: 1 AVAILABLE"):
        _engine(kind, model, server, model_version=7)
    with _engine(kind, model, server, model_version="1") as eng:  # a string, as from --engine-option
        assert eng.served_version == 1


@pytest.mark.parametrize("kind", ENGINES)
def test_wrong_signature(kind, model, server):
    with pytest.raises(ModelError) as ei:
        _engine(kind, model, server, model_name="wrongsig")
    msg = str(ei.value)
    assert "input 'masked_lm_ids' is missing" in msg and "'input_ids' has dtype int64, expected int32" in msg


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("name,word", [("bigvocab", "larger"), ("smallvocab", "smaller")])
def test_vocabulary_mismatch(kind, name, word, model, server):
    with pytest.raises(ModelError, match=f"vocabulary.*{word}|{word}.*vocabulary"):
        _engine(kind, model, server, model_name=name)
    with _engine(kind, model, server, model_name=name, check_model="false"):
        pass  # the probe can be turned off


@pytest.mark.parametrize("kind", ENGINES)
def test_another_top_k_width_is_refused(kind, model, server):
    with pytest.raises(ModelError, match=r"the server returns top-7, the local export says top_k=5: a different "
                                         r"export is being served"):
        _engine(kind, model, server, model_name="topk7")


@pytest.mark.parametrize("kind", ENGINES)
def test_same_shape_other_weights_is_refused(kind, model, server):
    """The export records an identity probe (fixed inputs and its answers): a server serving another
    model of the very same shape and vocabulary is caught at start-up."""
    assert "identity_probe" in model.manifest
    with pytest.raises(ModelError, match="different weights are being served"):
        _engine(kind, model, server, model_name="otherweights")


# ------------------------------------------------------------------------------------ faults

@pytest.mark.parametrize("kind", ENGINES)
def test_injected_unavailable_is_retried(kind, model, server, reference, batches):
    bs = batches["whole-word"]
    expected = [reference.run(b) for b in bs]
    with _engine(kind, model, server, backoff_initial=0.01) as eng:
        server.faults(fail_next=4)
        got = list(eng.map(bs))
    _assert_same([type(g)(g.log_probs) for g in got], [type(e)(e.log_probs) for e in expected])
    assert server.stats()["failed"] == 4


@pytest.mark.parametrize("kind", ENGINES)
def test_invalid_argument_fails_at_once(kind, model, server):
    V = model.manifest["vocab_size"]
    with _engine(kind, model, server, retry_budget=60) as eng:
        server.reset()  # forget the start-up probes
        t = time.monotonic()
        with pytest.raises(EngineError, match=rf"(?s)(400|INVALID_ARGUMENT).*{V + 3}.*not in \[0, {V}\)"):
            eng.score_batch(probe_batch(model, V + 3))
        assert time.monotonic() - t < 5
        assert server.stats()["predict_calls"] == 1


@pytest.mark.parametrize("kind", ENGINES)
def test_slow_responses_past_the_deadline(kind, model, server, reference, batches):
    b = batches["token"][0]
    with _engine(kind, model, server, timeout=0.25, backoff_initial=0.01) as eng:
        server.faults(delay_next=2, delay_s=0.6)  # two attempts time out, the third is served
        _assert_same([eng.run(b)], [type(r)(r.log_probs) for r in [reference.run(b)]])
        server.faults(delay_next=-1, delay_s=0.6)  # all slow: give up within the budget
        eng.opts.retry_budget = 1.0
        t = time.monotonic()
        with pytest.raises(EngineError, match="gave up after .* attempt.*(timed out|DEADLINE_EXCEEDED)"):
            eng.run(b)
        assert time.monotonic() - t < 4


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ENGINES)
def test_server_down_for_good(kind, model, server, batches):
    # Nothing listening at start: the engine stops within its retry budget, naming the address.
    dead = StandIn({}, Path("."))
    dead.rest_port = dead.grpc_port = _free_port()
    t = time.monotonic()
    with pytest.raises(EngineError, match=r"127\.0\.0\.1:\d+.*model status: gave up after \d+ attempt.*"
                                          r"retry budget 1s.*(Connection refused|UNAVAILABLE)"):
        _engine(kind, model, dead, retry_budget=1.0)
    assert time.monotonic() - t < 3
    # Unavailable for good in the middle of a run: the run stops with the last error.
    with _engine(kind, model, server, retry_budget=1.0, backoff_initial=0.05) as eng:
        server.faults(fail_next=10**6)
        with pytest.raises(EngineError, match=r"predict on \d+ copies: gave up after \d+ attempt.*"
                                              r"(503|UNAVAILABLE).*injected fault"):
            list(eng.map(batches["token"]))


@pytest.mark.parametrize("kind", ENGINES)
def test_server_killed_and_restarted_mid_run(kind, model, server, reference, batches):
    """kill -9 with requests in flight, restart on the same ports: same results as an undisturbed run."""
    bs = batches["word-l2r"] * 2
    expected = [reference.run(b) for b in bs]
    restarted = threading.Event()

    def feed():
        for i, b in enumerate(bs):
            if i == 3:
                server.kill()
                threading.Thread(target=lambda: (server.start(), restarted.set()), daemon=True).start()
            yield b

    with _engine(kind, model, server, concurrency=2, retry_budget=60, top_k=True) as eng:
        got = list(eng.map(feed()))
    assert restarted.wait(60)
    _assert_same(got, expected)


# ------------------------------------------------------------------------------------ malformed answers

@pytest.fixture(scope="module")
def tamper(server, model):
    """A proxy in front of the stand-in that damages predict answers once its ``mode`` is set."""
    pytest.importorskip("tensorflow_serving")
    from tfserving_standin.tamper import TamperProxy

    p = TamperProxy(server, vocab=model.manifest["vocab_size"]).start()
    yield p
    p.stop()


V_PLUS_3 = "{V3}"  # replaced by the vocabulary size + 3
REST_ANSWERS = {
    "strings": r"output 'masked_lm_log_probs' holds strings where numbers belong",
    "ragged": r"output 'masked_lm_log_probs' is not a rectangular array of numbers",
    "extra_row": r"output 'masked_lm_log_probs' has shape \[7, \d+\]; this request allows float32 \[6, ",
    "missing_row": r"output 'masked_lm_log_probs' has shape \[5, \d+\]; this request allows float32 \[6, ",
    "top_k_oob": r"top_k_ids\[5, 0, 0\] = {V3}: a top-k id must be a token of the vocabulary",
    "top_k_float": r"output 'top_k_ids' holds fractional numbers where integer ids belong",
    "nan": r"masked_lm_log_probs\[5, 0\] = nan: a log-probability must be finite and <= 0",
    "positive": r"masked_lm_log_probs\[5, 0\] = 3\.0: a log-probability must be finite and <= 0",
    "true": r"output 'masked_lm_log_probs' holds true, false or null where numbers belong",
    "null": r"output 'masked_lm_log_probs' holds true, false or null where numbers belong",
    "huge_int": r"output 'top_k_ids' holds values that are not one kind of number",
    "rank3": r"output 'masked_lm_log_probs' has shape \[6, \d+, 1\]; this request allows float32 \[6, ",
    "scalar": r"output 'masked_lm_log_probs' has shape \[\]",
    "no_outputs": r"predict response has no 'outputs' key",
    "not_json": r"HTTP 200 with a body that is not JSON \(31 bytes: '<html>gateway says hello</html>'\)",
    "deep": r"HTTP 200 with a body nested too deeply to be an answer",
    "huge_declared": r"the answer is 1,000,000,000,000 bytes \(Content-Length\), more than the [\d,]+ its request",
    "huge_chunked": r"the answer is more than the [\d,]+ bytes its request can need; refused while it was arriving",
}
GRPC_ANSWERS = {
    "extra_row": r"output 'masked_lm_log_probs' has shape \[7, \d+\]; this request allows float32 \[6, ",
    "broadcast": r"output 'masked_lm_log_probs' has 1 value\(s\) in float_val for shape \[6, \d+\] \(\d+ elements\)",
    "huge_shape": r"output 'masked_lm_log_probs' has shape \[64, 4194304\]; this request allows float32 \[6, ",
    "wide": r"output 'masked_lm_log_probs' has shape \[6, 536870912\]",
    "rank3": r"output 'masked_lm_log_probs' has shape \[6, \d+, 1\]",
    "negative_dim": r"output 'masked_lm_log_probs' has shape \[-1, \d+\]",
    "overflow_dims": r"output 'masked_lm_log_probs' has shape \[4611686018427387904, 4611686018427387904\]",
    "short_content": r"output 'masked_lm_log_probs' has \d+ bytes of tensor_content for shape \[6, \d+\]",
    "content_and_val": r"output 'masked_lm_log_probs' has both tensor_content and float_val",
    "double": r"output 'masked_lm_log_probs' has dtype DT_DOUBLE, expected float32",
    "unknown_rank": r"output 'masked_lm_log_probs' has no shape \(unknown rank\)",
    "nan": r"masked_lm_log_probs\[5, 0\] = nan: a log-probability must be finite and <= 0",
    "positive": r"masked_lm_log_probs\[5, 0\] = 3\.0: a log-probability must be finite and <= 0",
    "top_k_oob": r"top_k_ids\[5, 0, 0\] = {V3}: a top-k id must be a token of the vocabulary",
    "version2": r"the response is from version 2 of 'bert', but this run verified version 1 at start-up",
    "other_name": r"the response is from model 'someothermodel', not 'bert'",
    "big_message": r"the answer is larger than the [\d,]+ bytes the largest request can need \(.*larger than max",
}


def _four_copies(model) -> Batch:
    """Four copies (with the padding and verification rows: a request of 6 rows)."""
    b = probe_batch(model, 9).as_dict()
    return Batch(**{k: np.concatenate([v] * 4) for k, v in b.items()})


@pytest.mark.parametrize("kind,mode", [("rest", m) for m in REST_ANSWERS] + [("grpc", m) for m in GRPC_ANSWERS])
def test_a_malformed_answer_is_an_engine_error_naming_the_server(kind, mode, tamper, model):
    """Every damaged answer stops the run at once (EngineError, exit 5), naming the server and what was
    wrong; none is retried, none becomes an internal error, none is allocated at its declared size."""
    import tracemalloc

    V = model.manifest["vocab_size"]
    want = (REST_ANSWERS if kind == "rest" else GRPC_ANSWERS)[mode].replace(V_PLUS_3, str(V + 3))
    url = tamper.rest_url if kind == "rest" else tamper.grpc_url
    with _engine(kind, model, tamper, top_k=True, max_batch_size=16) as eng:
        tamper.mode, tamper.tampered = mode, 0
        tracemalloc.start()
        try:
            with pytest.raises(EngineError) as ei:
                eng.run(_four_copies(model))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            tamper.mode = None
    msg = str(ei.value)
    assert msg.startswith(f"{kind} engine, model 'bert' version 1 at {url}, predict on 4 copies: "), msg
    assert re.search(want, msg), msg
    assert tamper.tampered == 1  # refused at once, not retried
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated for a refused answer"


@pytest.mark.parametrize("mode", ["chunked_forever", "drip"])
def test_rest_a_body_that_never_ends_is_cut_at_the_deadline(mode, tamper, model):
    """A chunked body that never ends, a body a byte at a time: each attempt ends at its wall-clock
    deadline (``timeout``), and the request gives up within its retry budget."""
    with _engine("rest", model, tamper, timeout=1.0, retry_budget=2.5, backoff_initial=0.05) as eng:
        tamper.mode = mode
        t = time.monotonic()
        try:
            with pytest.raises(EngineError, match=r"predict on 4 copies: gave up after \d+ attempt.*timed out: no "
                                                  r"complete answer within the 1s deadline"):
                eng.run(_four_copies(model))
        finally:
            tamper.mode = None
        assert time.monotonic() - t < 6


def test_mlm_score_exits_5_on_a_malformed_answer(tamper, export_dir, tmp_path):
    """The CLI: a server answering strings ends the run with exit 5 and the engine's message, not an
    internal error; nothing is written."""
    src = tmp_path / "in.tsv"
    src.write_text("id\ttext\n" + "".join(f"r{i}\t{s}\n" for i, s in enumerate(SENTENCES)), encoding="utf-8")
    tamper.mode, tamper.skip = "strings", 4  # the start-up probes and the verification row pass untouched
    try:
        p = subprocess.run([sys.executable, "-m", "mlm_scorer", str(src), "-o", str(tmp_path / "o.parquet"),
                            "--model", str(export_dir), "--server", tamper.rest_url, "--model-name", "bert",
                            "--id-column", "id"], capture_output=True, text=True, timeout=300)
    finally:
        tamper.mode, tamper.skip = None, 0
    assert p.returncode == 5, p.stderr
    assert "holds strings where numbers belong" in p.stderr and "internal error" not in p.stderr, p.stderr
    assert not (tmp_path / "o.parquet").exists()


# ------------------------------------------------------------------------------------ one model per run

@pytest.fixture
def lone_server(export_dir, tmp_path):
    """A stand-in of its own (serving ``bert`` = the export), to be restarted on other weights."""
    s = StandIn({"bert": export_dir}, tmp_path).start()
    yield s
    s.stop()


def _versioned(base: Path, dest: Path, version: int) -> Path:
    """``base``'s version 1 as version ``version`` of a new base directory."""
    shutil.copytree(base / "1", dest / str(version))
    return dest


@pytest.mark.parametrize("kind", ENGINES)
def test_a_restart_on_other_weights_is_caught_on_the_first_answer(kind, model, lone_server, other_export, batches):
    """The server behind the address is restarted with other weights under the same name and version:
    the verification row in every request catches it on the first answer (no result of the other
    model is returned); a version that is no longer served is named with what is served instead."""
    b = batches["whole-word"][0]
    with _engine(kind, model, lone_server, retry_budget=60) as eng:
        first = eng.run(b)
        lone_server.models = {"bert": other_export}
        lone_server.restart()
        with pytest.raises(EngineError, match=r"predict on \d+ copies: the server's answer to the verification row "
                                              r"differs from its answer at start-up by [\d.e-]+ \(allowed 0.001\): the "
                                              r"model served as 'bert' version 1 is no longer the one verified"):
            eng.run(b)
        lone_server.models = {"bert": _versioned(other_export, other_export.parent / f"v2-{kind}", 2)}
        lone_server.restart()
        with pytest.raises(EngineError, match=r"version 1 of model 'bert', verified at start-up, is no longer "
                                              r"served \(the server now has: 2 AVAILABLE; it said: .*(404|NOT_FOUND)"):
            eng.run(b)
    assert np.isfinite(first.log_probs).all()


def _rows_tsv(path: Path, n: int) -> Path:
    words = "the quick brown fox jumps over lazy dog a man walks into bar and orders drink she sells sea".split()
    rng = random.Random(0)
    path.write_text("id\ttext\n" + "".join(f"r{i}\t{' '.join(rng.choice(words) for _ in range(rng.randint(3, 9)))}\n"
                                           for i in range(n)), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ENGINES)
def test_mlm_score_never_commits_rows_of_two_models(kind, export_dir, other_export, lone_server, tmp_path):
    """kill -9 the server mid-run and restart it on other weights (same name, same version) while the
    client retries: the run stops with exit 5 before a row of the second model is committed; the chunks
    committed before are the first model's, and --resume refuses the other model at start-up."""
    import pyarrow.parquet as pq

    from mlm_scorer.pipeline import score_file

    src = _rows_tsv(tmp_path / "in.tsv", 1200)
    out = tmp_path / "out.parquet"
    url = lone_server.rest_url if kind == "rest" else lone_server.grpc_url
    lone_server.faults(delay_next=-1, delay_s=0.05)  # slow enough to restart it mid-run
    cmd = [sys.executable, "-m", "mlm_scorer", str(src), "-o", str(out), "--model", str(export_dir), "--server", url,
           "--model-name", "bert", "--id-column", "id", "--chunk-rows", "100", "--retry-budget", "120",
           "--engine-option", "max_batch_size=16", "--no-progress"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    wait_for_chunks(out, p, 2)
    lone_server.models = {"bert": other_export}
    lone_server.restart()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 5, err
    assert "no longer the one verified at start-up" in err and "internal error" not in err, err
    assert not out.exists()
    parts, got = committed(out)
    assert 200 <= len(got) < 1200
    # the committed rows are the first model's, not the second's
    first_rows = tmp_path / "first.tsv"
    first_rows.write_text("".join(src.read_text().splitlines(keepends=True)[: len(got) + 1]))
    refs = {}
    for name, m in (("first", export_dir), ("second", other_export)):
        score_file(first_rows, tmp_path / f"{name}.parquet", model=m, engine="saved_model", id_column="id",
                   text_column="text")
        refs[name] = pq.read_table(tmp_path / f"{name}.sentences.parquet", columns=["pll"]).column("pll").to_pylist()
    np.testing.assert_allclose(got, refs["first"], atol=1e-3, rtol=0)
    assert np.max(np.abs(np.array(got) - refs["second"])) > 0.1
    # --resume: the start-up checks refuse the other model (exit 4) and leave the committed chunks
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 4 and "different weights are being served" in r.stderr, r.stderr
    assert committed(out)[0] == parts


# ------------------------------------------------------------------------------------ auth and TLS

@pytest.fixture(scope="module")
def secure_server(export_dir, tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True)
    (d / "token").write_text("s3cret-token\n")
    s = StandIn({"bert": export_dir}, d, extra_args=("--token-file", str(d / "token"), "--tls-cert",
                                                      str(d / "cert.pem"), "--tls-key", str(d / "key.pem"))).start()
    s.dir = d
    yield s
    s.stop()


@pytest.mark.parametrize("kind", ENGINES)
def test_tls_and_bearer_token(kind, model, secure_server, monkeypatch, reference, batches):
    d = secure_server.dir
    monkeypatch.setenv("TFS_TOKEN", "s3cret-token")
    b = batches["token"][0]
    with _engine(kind, model, secure_server, tls_ca_file=str(d / "cert.pem"), auth_token_env="TFS_TOKEN") as eng:
        _assert_same([eng.run(b)], [type(r)(r.log_probs) for r in [reference.run(b)]])
    (d / "bad").write_text("wrong-token")
    with pytest.raises(ModelError, match="(401|UNAUTHENTICATED).*invalid bearer token") as ei:
        _engine(kind, model, secure_server, tls_ca_file=str(d / "cert.pem"), auth_token_file=str(d / "bad"))
    assert "wrong-token" not in str(ei.value) and "s3cret" not in str(ei.value)
    with pytest.raises((ModelError, EngineError)):  # the server's self-signed certificate is not trusted
        _engine(kind, model, secure_server, auth_token_env="TFS_TOKEN", retry_budget=0.5)


# ------------------------------------------------------------------------------------ end to end

_REF_DIRS: dict[str, Path] = {}


def _pipeline():
    return pytest.importorskip("mlm_scorer.pipeline")


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_score_file_matches_in_process(kind, mode, export_dir, server, tmp_path):
    import pyarrow.parquet as pq

    pipeline = _pipeline()
    if kind == "grpc":
        pytest.importorskip("tensorflow_serving")
    src = tmp_path / "in.tsv"
    src.write_text("id\ttext\n" + "".join(f"r{i}\t{s}\n" for i, s in enumerate(SENTENCES * 2)), encoding="utf-8")
    url = server.rest_url if kind == "rest" else server.grpc_url
    ref = _REF_DIRS.get(mode)
    if ref is None:  # the in-process run, once per mode
        ref = _REF_DIRS[mode] = tmp_path
        pipeline.score_file(src, tmp_path / "ref.parquet", model=export_dir, engine="saved_model", mode=mode,
                            text_column="text", id_column="id", top_k=3)
    server.faults(fail_next=2)  # and a couple of faults on the way
    pipeline.score_file(src, tmp_path / "srv.parquet", model=export_dir, engine=kind, mode=mode,
                        text_column="text", id_column="id", top_k=3,
                        engine_options={"server": url, "concurrency": "3", "max_batch_size": "4",
                                        "backoff_initial": "0.01"})
    for name in ("ref.parquet", "ref.sentences.parquet"):
        a = pq.read_table(ref / name)
        b = pq.read_table(tmp_path / name.replace("ref", "srv"))
        assert a.column_names == b.column_names and a.num_rows == b.num_rows > 0
        for col in a.column_names:
            x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
            if a.schema.field(col).type in (pa_float32(), pa_float64()):
                np.testing.assert_allclose(np.array(y, dtype=float), np.array(x, dtype=float), atol=1e-4,
                                           rtol=1e-5, err_msg=f"{name}:{col}")
            elif col not in ("engine", "seconds"):
                _assert_nested_close(x, y, f"{name}:{col}")


def pa_float32():
    import pyarrow as pa

    return pa.float32()


def pa_float64():
    import pyarrow as pa

    return pa.float64()


def _assert_nested_close(x, y, where):
    if isinstance(x, float) or isinstance(y, float):
        assert x is not None and y is not None, where
        np.testing.assert_allclose(y, x, atol=1e-4, rtol=1e-5, err_msg=where)
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), where
        for a, b in zip(x, y):
            _assert_nested_close(a, b, where)
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            _assert_nested_close(x[k], y[k], f"{where}.{k}")
    else:
        assert x == y, where


# ------------------------------------------------------------------------------------ units

def test_options_are_coerced_and_checked():
    o = RemoteOptions.parse("rest", {"server": "localhost", "concurrency": "8", "timeout": "2.5",
                                     "model_version": "3", "tls_verify": "no"}, schemes={"http": 8501, "https": 8501})
    assert (o.scheme, o.host, o.port, o.concurrency, o.timeout, o.model_version, o.tls_verify) == \
        ("http", "localhost", 8501, 8, 2.5, 3, False)
    with pytest.raises(UsageError, match="does not take option.*bogus"):
        RemoteOptions.parse("rest", {"server": "http://h:1", "bogus": 1}, schemes={"http": 8501})
    with pytest.raises(UsageError, match="scheme 'grpc'"):
        RemoteOptions.parse("rest", {"server": "grpc://h:1"}, schemes={"http": 8501, "https": 8501})
    with pytest.raises(UsageError, match="needs a server"):
        RemoteOptions.parse("grpc", {}, schemes={"grpc": 8500})
    with pytest.raises(UsageError, match="credentials"):
        RemoteOptions.parse("rest", {"server": "http://u:pw@h:1"}, schemes={"http": 8501})


def test_backoff_is_bounded_and_jittered():
    now = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    def attempt():
        now[0] += 0.01
        raise RetryableError("HTTP 503: busy")

    with pytest.raises(EngineError, match=r"gave up after (\d+) attempt.*budget 10s.*HTTP 503: busy"):
        with_retries(attempt, what="x", budget=10, initial=0.1, maximum=2, sleep=sleep, clock=lambda: now[0],
                     rng=random.Random(0))
    assert now[0] < 10 and all(0 <= s <= 2 for s in sleeps) and len(sleeps) >= 5
    assert len(set(sleeps)) == len(sleeps)  # jittered
    calls = []
    with pytest.raises(EngineError, match="HTTP 400: bad"):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(FatalError("HTTP 400: bad")), what="x",
                     budget=10, sleep=sleep)
    assert calls == [1]


def test_ordered_map_keeps_order_and_limits_in_flight():
    import concurrent.futures as cf

    live, peak, lock = [0], [0], threading.Lock()

    def fn(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(random.random() * 0.02)
        with lock:
            live[0] -= 1
        return i * i

    with cf.ThreadPoolExecutor(8) as ex:
        assert list(ordered_map(fn, range(50), concurrency=3, executor=ex)) == [i * i for i in range(50)]
    assert 1 < peak[0] <= 3


def test_grpc_decodes_val_fields_and_tensor_content():
    pytest.importorskip("tensorflow_serving")
    from tensorflow.core.framework import tensor_pb2, types_pb2

    from mlm_scorer.engines.tf_serving_grpc import from_tensor_proto, to_tensor_proto

    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(from_tensor_proto(to_tensor_proto(a)), a)
    np.testing.assert_array_equal(tf.make_ndarray(to_tensor_proto(a)), a)
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.5, -np.inf, 0.0, -2.0])
    t.tensor_shape.dim.add(size=2)
    t.tensor_shape.dim.add(size=2)
    np.testing.assert_array_equal(from_tensor_proto(t), np.array([[1.5, -np.inf], [0.0, -2.0]], np.float32))
    # fewer values than elements: TensorFlow repeats the last one over the shape; an answer never does that
    del t.float_val[1:]
    with pytest.raises(BadResponseError, match=r"1 value\(s\) in float_val for shape \[2, 2\] \(4 elements\)"):
        from_tensor_proto(t)
    f = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    np.testing.assert_array_equal(from_tensor_proto(tf.make_tensor_proto(f)), f)


def test_empty_batch_list(model, server):
    with _engine("rest", model, server) as eng:
        assert list(eng.map([])) == []
        assert isinstance(probe_batch(model, 1), Batch)


# ------------------------------------------------------------------------------------ server-side batching

def _tfs_pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """TF Serving's PadTensor (batching_util.cc): pad every dim but the 0th at the end, with ``a.flat[0]``."""
    out = np.full((a.shape[0],) + tuple(shape[1:]), a.flat[0], a.dtype)
    out[tuple(slice(0, d) for d in a.shape)] = a
    return out


def test_padding_row_makes_server_side_padding_exact(model, reference, batches):
    """Two requests of different T and P merged as TF Serving does with pad_variable_length_inputs: with
    ``padding_row`` the merged run gives each request its own results; without it, it does not."""
    from mlm_scorer.engines._remote import _cut

    b1 = Batch(**{k: np.concatenate([v, v]) for k, v in probe_batch(model, 11).as_dict().items()})  # T=3, P=1
    b2 = batches["whole-word"][0]
    assert b1.input_ids.shape[1] < b2.input_ids.shape[1] and b1.masked_lm_positions.shape[1] < \
        b2.masked_lm_positions.shape[1]
    for padding_row, should_match in ((True, True), (False, False)):
        reqs = []
        for b in (b1, b2):
            d = b.as_dict()
            if padding_row:
                d = {k: np.concatenate([np.zeros((1,) + v.shape[1:], np.int32), v]) for k, v in d.items()}
            reqs.append(d)
        merged = {}
        for k in reqs[0]:
            shape = tuple(max(r[k].shape[i] for r in reqs) for i in range(reqs[0][k].ndim))
            merged[k] = np.concatenate([_tfs_pad(r[k], shape) for r in reqs])
        out = reference.run(Batch(**merged))
        skip = int(padding_row)
        n1 = len(reqs[0]["input_ids"])
        got = [_cut(out.log_probs[:n1], skip, len(b1), b1.masked_lm_positions.shape[1]),
               _cut(out.log_probs[n1:], skip, len(b2), b2.masked_lm_positions.shape[1])]
        want = [reference.run(b1).log_probs, reference.run(b2).log_probs]
        same = all(np.allclose(g, w, atol=TOL, rtol=0) for g, w in zip(got, want))
        assert same is should_match


def test_serving_files(tmp_path):
    from mlm_export.serving_config import write_serving_files

    vdir = tmp_path / "3"
    vdir.mkdir()
    batching, config = write_serving_files(vdir, max_batch_size=32, allowed_batch_sizes=[8, 16, 32])
    text = batching.read_text()
    for line in ("max_batch_size { value: 32 }", "pad_variable_length_inputs: true", "allowed_batch_sizes: 16",
                 "num_batch_threads { value: 2 }", "max_enqueued_batches { value: 64 }",
                 "batch_timeout_micros { value: 2000 }"):
        assert line in text
    with pytest.raises(ValueError, match="must equal max_batch_size"):
        write_serving_files(vdir, max_batch_size=32, allowed_batch_sizes=[8, 16])
    pytest.importorskip("tensorflow_serving")
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    cfg = text_format.Parse(config.read_text(), model_server_config_pb2.ModelServerConfig())
    c = cfg.model_config_list.config[0]
    assert (c.name, c.base_path, list(c.model_version_policy.specific.versions)) == ("bert", "/models/bert", [3])
