"""No impossible number is ever marked ok: whatever an engine or a server returns is checked before a row is
written (finite, <= 0, the batch's shape, top-k ids in the vocabulary); a valid row whose perplexity exceeds
the largest float is scored (inf) instead of killing the run. The engines below are real Engine subclasses
run through the CLI; the server is the repository's TF Serving stand-in behind a proxy that rewrites its
answers after the start-up checks pass."""
from __future__ import annotations

import json
import math
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import read_outputs

from mlm_scorer.cli import main
from mlm_scorer.engines.base import BatchResult, register_engine
from mlm_scorer.engines.fake import FakeEngine

ROWS = "id\ttext\nr1\tthe cat sat on the mat\nr2\ta dog ran\nr3\tbig house\nr4\tthe good book\n"


class _Poisoned(FakeEngine):
    """The fake engine's numbers with one kind of damage (``kind``) in every copy."""

    kind = "nan"

    def score_batch(self, batch):
        res = super().score_batch(batch)
        lp = res.log_probs
        used = batch.masked_lm_positions > 0
        if self.kind in ("nan", "inf", "-inf", "plus3"):
            lp[used] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "plus3": 3.0}[self.kind]
        elif self.kind == "strings":
            res.log_probs = np.array([["x"] * lp.shape[1]] * lp.shape[0])
        elif self.kind == "ragged":
            res.log_probs = [list(r) for r in lp[:-1]] + [list(lp[-1][:1]) + [0.0, 0.0, 0.0]]
        elif self.kind == "short":
            res.log_probs = lp[:-1]
        elif self.kind == "top_k_out_of_range":
            res.top_k_ids = res.top_k_ids + 10_000
        return res


def _poisoned(kind):
    return type(f"Poisoned_{kind}", (_Poisoned,), {"kind": kind})


KINDS = ["nan", "inf", "-inf", "plus3", "strings", "ragged", "short", "top_k_out_of_range"]
TEST_ENGINES = {}  # name -> "module:Class", registered for this module's tests only (see _test_engines)
for _k in KINDS:
    globals()[f"Poisoned_{_k}"] = _poisoned(_k)
    TEST_ENGINES[f"poisoned_{_k}"] = f"test_impossible_scores:Poisoned_{_k}"


class LongRowsNaN(FakeEngine):
    """NaN for copies longer than 12 tokens, as an export with NaN in its later position embeddings gives."""

    def score_batch(self, batch):
        res = super().score_batch(batch)
        long = batch.input_mask.sum(1) > 12
        res.log_probs[long] = np.nan
        return res


class VeryUnlikely(FakeEngine):
    """Possible but tiny probabilities: -720 per piece, so exp(-PLL / words) exceeds the largest float."""

    def score_batch(self, batch):
        res = super().score_batch(batch)
        res.log_probs[batch.masked_lm_positions > 0] = -720.0
        return res


TEST_ENGINES["long_rows_nan"] = "test_impossible_scores:LongRowsNaN"
TEST_ENGINES["very_unlikely"] = "test_impossible_scores:VeryUnlikely"


@pytest.fixture(autouse=True, scope="module")
def _test_engines():
    """The poisoned engines, in the registry while this module's tests run and out of it afterwards (other
    tests check the registry's list of known engines)."""
    from mlm_scorer.engines import base

    for name, target in TEST_ENGINES.items():
        register_engine(name, target)
    yield
    for name in TEST_ENGINES:
        base._ENGINES.pop(name, None)


def _cli(capsys, inp, out, model, engine, *extra):
    code = main([str(inp), "-o", str(out), "--model", str(model), "--engine", engine, "--id-column", "id", "-q",
                 *map(str, extra)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_an_engine_returning_impossible_or_malformed_numbers_fails_naming_it(kind, tmp_path, fake_export, capsys):
    inp = tmp_path / "in.tsv"
    inp.write_text(ROWS)
    out = tmp_path / "o.parquet"
    top_k = ["--top-k", "3"] if kind == "top_k_out_of_range" else []
    for skip in ([], ["--on-bad-row", "skip"]):
        code, err = _cli(capsys, inp, out, fake_export, f"poisoned_{kind}", *top_k, *skip)
        assert code == 5, err
        assert f"the poisoned_{kind} engine returned" in err and "internal error" not in err, err
        assert not out.exists() and not (tmp_path / "o.sentences.parquet").exists()


def test_impossible_numbers_for_some_rows_make_them_bad_rows_never_ok(tmp_path, fake_export, capsys):
    inp = tmp_path / "in.tsv"
    long = " ".join(["the cat sat on the mat"] * 3)  # 18 words: copies longer than 12 tokens
    inp.write_text(ROWS + f"r5\t{long}\n")
    out = tmp_path / "o.parquet"
    code, err = _cli(capsys, inp, out, fake_export, "long_rows_nan")
    assert code == 3 and "in.tsv:6" in err and "NaN" in err and "long_rows_nan engine" in err, err
    assert not out.exists()
    code, err = _cli(capsys, inp, out, fake_export, "long_rows_nan", "--on-bad-row", "skip")
    assert code == 0, err
    _, sents = read_outputs(out)
    assert [s["status"] for s in sents] == ["ok"] * 4 + ["skipped"]
    assert "impossible_score" not in sents[4]["error"] and "NaN" in sents[4]["error"]
    assert sents[4]["pll"] is None
    ok = [s for s in sents if s["status"] == "ok"]
    assert all(math.isfinite(s["pll"]) and s["pll"] <= 0 for s in ok)
    # the good rows are those of an undamaged engine
    assert _cli(capsys, inp, tmp_path / "ref.parquet", fake_export, "fake", "--on-bad-row", "skip")[0] == 0
    ref = read_outputs(tmp_path / "ref.parquet")[1]
    assert [s["pll"] for s in ok] == [s["pll"] for s in ref[:4]]


def test_a_perplexity_beyond_the_largest_float_is_inf_not_a_crash(tmp_path, fake_export, capsys):
    inp = tmp_path / "in.tsv"
    inp.write_text("id\ttext\nr1\t" + "xq" * 12 + "\nr2\tthe cat\n")
    out = tmp_path / "o.parquet"
    for extra in ([], ["--flag-above", "pseudo_perplexity=100"], ["--flag-above", "pseudo_perplexity=p50"]):
        code, err = _cli(capsys, inp, out, fake_export, "very_unlikely", *extra)
        assert code == 0, err
        words, sents = read_outputs(out)
        assert [s["status"] for s in sents] == ["ok", "ok"]
        assert sents[0]["pseudo_perplexity"] == math.inf and sents[0]["pll"] < -709
        assert all(w["prob"] >= 0 and math.isfinite(w["log_prob"]) for w in words)
        if extra and extra[1].endswith("100"):
            assert sents[0]["flag"] is True
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    assert main(["check", str(out), "-q"]) in (0, 1)
    capsys.readouterr()


# ------------------------------------------------------------------------------- a server behind a proxy
class _Tamper(BaseHTTPRequestHandler):
    """Forwards to the stand-in; the answers to predict requests that are not the start-up probes (the
    vocabulary probes, one copy predicting at position 1, and the manifest's identity probe) have their
    log-probs replaced by ``value`` (and, with ``all``, every answer after the first ``calls`` ones)."""

    upstream = ""
    value: float = float("nan")
    probe_rows: list = []
    tamper_all_after: int | None = None
    #: leave the rows of three tokens alone (the clients' per-request verification row, [CLS] [MASK] [SEP]):
    #: a server that answers the checks right and the sentences wrong
    spare_short_rows = False
    calls = 0

    def log_message(self, *a):
        pass

    def _forward(self, body: bytes | None):
        req = urllib.request.Request(self.upstream + self.path, data=body, method=self.command,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _is_probe(self, doc) -> bool:
        def strip(r):
            return tuple(r[:max((i + 1 for i, t in enumerate(r) if t), default=0)])

        # the padding row is all zeros; the clients' verification row, [CLS] [MASK] [SEP], rides along
        rows = [strip(r) for r in doc["inputs"]["input_ids"] if any(r)]
        return (all(len(r) == 3 for r in rows)
                or [r for r in rows if len(r) != 3] == [s for s in map(strip, type(self).probe_rows) if len(s) != 3])

    def do_GET(self):
        status, data = self._forward(None)
        self._reply(status, data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status, data = self._forward(body)
        cls = type(self)
        cls.calls += 1
        if status == 200 and self.path.endswith(":predict"):
            doc = json.loads(body)
            late = cls.tamper_all_after is not None and cls.calls > cls.tamper_all_after
            if late or not self._is_probe(doc):
                out = json.loads(data)
                lp = np.asarray(out["outputs"]["masked_lm_log_probs"], dtype=np.float64)
                tampered = np.full(lp.shape, cls.value)
                if cls.spare_short_rows:
                    short = [sum(1 for t in r if t) == 3 for r in doc["inputs"]["input_ids"]]
                    tampered[short] = lp[short]
                out["outputs"]["masked_lm_log_probs"] = tampered.tolist()
                data = json.dumps(out).encode()
        self._reply(status, data)

    def _reply(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def standin(tiny_export, tmp_path_factory):
    from tfserving_standin import StandIn

    s = StandIn({"bert": tiny_export}, tmp_path_factory.mktemp("standin_log")).start()
    yield s
    s.stop()


@pytest.fixture()
def proxy(standin, tiny_export):
    from mlm_scorer.model_dir import ModelDir

    manifest = ModelDir.open(tiny_export).manifest
    handler = type("Tamper", (_Tamper,), {"upstream": standin.rest_url, "calls": 0,
                                          "probe_rows": manifest["identity_probe"]["input_ids"]})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    httpd.shutdown()
    httpd.server_close()


def _rest(capsys, inp, out, model, url, *extra):
    code = main([str(inp), "-o", str(out), "--model", str(model), "--server", url, "--id-column", "id", "-q",
                 "--retry-budget", "0", *map(str, extra)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3.0])
def test_a_server_that_passes_the_probes_then_answers_impossible_numbers_fails_naming_it(value, proxy, tiny_export,
                                                                                          tmp_path, capsys):
    proxy.value = value
    inp = tmp_path / "in.tsv"
    inp.write_text(ROWS)
    out = tmp_path / "o.parquet"
    code, err = _rest(capsys, inp, out, tiny_export, proxy.url, "--on-bad-row", "skip")
    assert code == 5, err
    assert proxy.url.split("//")[1] in err and "internal error" not in err, err
    assert not out.exists()


def test_a_servers_answers_never_answer_an_in_process_run_from_the_cache(proxy, tiny_export, tmp_path, capsys):
    proxy.value = -5.0  # possible numbers, but not the model's
    proxy.spare_short_rows = True  # and the clients' verification row answered right, so the run goes through
    inp = tmp_path / "in.tsv"
    inp.write_text(ROWS)
    cache = tmp_path / "cache"
    code, err = _rest(capsys, inp, tmp_path / "served.parquet", tiny_export, proxy.url, "--cache", cache)
    assert code == 0, err
    served = read_outputs(tmp_path / "served.parquet")[1]
    assert all(s["pll"] == -5.0 * s["n_pieces"] for s in served)  # the proxy's numbers
    code = main([str(inp), "-o", str(tmp_path / "local.parquet"), "--model", str(tiny_export), "--id-column", "id",
                 "--cache", str(cache)])
    err = capsys.readouterr().err
    assert code == 0 and "hit rate 0.0% (0/4)" in err, err
    assert main([str(inp), "-o", str(tmp_path / "ref.parquet"), "--model", str(tiny_export), "--id-column", "id",
                 "-q"]) == 0
    assert read_outputs(tmp_path / "local.parquet") == read_outputs(tmp_path / "ref.parquet")
    import sqlite3

    with sqlite3.connect(cache / "scores.sqlite") as db:
        sources = sorted({r[0] for r in db.execute("SELECT source FROM scores")})
    assert sources == [f"rest {proxy.url} model bert fp32", "saved_model fp32"], sources


def test_a_server_whose_probe_fails_later_is_never_stored_in_the_cache(proxy, tiny_export, tmp_path, capsys):
    proxy.value = -5.0
    proxy.tamper_all_after = 4  # the start-up checks (a plain request, two vocabulary probes, the identity probe) pass
    inp = tmp_path / "in.tsv"
    inp.write_text(ROWS)
    cache = tmp_path / "cache"
    code, err = _rest(capsys, inp, tmp_path / "o.parquet", tiny_export, proxy.url, "--cache", cache)
    assert code == 5 and "no longer answers the identity probe" in err, err
    import sqlite3

    with sqlite3.connect(cache / "scores.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 0
    assert not (tmp_path / "o.parquet").exists()
