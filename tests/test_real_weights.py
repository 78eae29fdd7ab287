"""Real pretrained weights: AntiBERTy (the antiberty==0.1.3 wheel, MIT), a BERT masked LM trained on 558
million antibody sequences: 8 layers, hidden 512, a 25-token vocabulary (5 specials, 20 residues, upper case).

Its directory is copied from the wheel as a user would (vocab.txt, config.json, pytorch_model.bin; no
tokenizer_config.json; the weights also carry a pooler and species/chain/graft heads) and exported untouched.
The texts are variable domains of therapeutic antibodies (tests/data/antibodies.tsv), residues separated
by spaces (a residue is a word of one piece), and variants of them made here (shuffled, substituted).

* parity: every engine, end to end through ``score_file`` (SavedModel, ONNX fp32, torch fp32, and the TF
  Serving REST and gRPC clients through the stand-in server), equals transformers' ``BertForMaskedLM`` on the
  same weights within 1e-4 per residue, over the whole distribution (top-k = the 25-token vocabulary);
* reduced precision measured on these weights (ONNX int8; torch bf16 where the CPU has it) within the
  tolerances stated below, which come from the measurements in docs/real-weights.md;
* AntiBERTy's own ``AntiBERTyRunner.pseudo_log_likelihood`` (its package, in .venv-peers: transformers < 5)
  equals mlm-score's token-mode log-probs renormalised over the 20 residues and averaged per sequence.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import antiberty_eval  # noqa: E402

TOL = 1e-4
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Drift of reduced precision on AntiBERTy's real weights, |Δ log-prob| in nats against fp32.
# Measured on the texts below against the float64 reference (251 residues, 4 sequences):
#   ONNX int8:  per residue mean 0.021, max 0.50; per sequence mean |Δ| per residue 0.003
#   torch bf16: per residue mean 0.0056, max 0.060; per sequence mean |Δ| per residue 0.0025
# and over 84 sequences (9534 residues) against ONNX fp32 (scripts/bench_int8.py, scripts/antiberty_eval.py;
# docs/real-weights.md):
#   ONNX int8:  per residue mean 0.013, max 0.42; Spearman of sequence PLLs 0.9998
#   torch bf16: per residue mean 0.0043, max 0.090; Spearman 0.9999
# The gates are about twice the larger measurement, so a regression (a wrong scale, a layer left in the
# wrong precision) fails while noise does not. With four sequences of distinct PLLs, Spearman >= 0.99
# means their order is kept.
INT8_TOL = {"token_mean": 0.04, "token_max": 1.0, "seq_mean_per_residue": 0.016, "spearman": 0.99}
BF16_TOL = {"token_mean": 0.012, "token_max": 0.18, "seq_mean_per_residue": 0.005, "spearman": 0.99}

PEERS = Path(os.environ.get("MLM_PEERS_VENV", ROOT / ".venv-peers"))
if not PEERS.is_absolute():
    PEERS = ROOT / PEERS


# ------------------------------------------------------------------------------------------- texts

def _texts() -> dict[str, str]:
    """{name: sequence}: a whole natural light chain, and a natural heavy-chain fragment with two variants
    of it (its residues shuffled; its first conserved cysteine substituted). Made deterministically."""
    abs_ = {a.label: a for a in antiberty_eval.load_antibodies()}
    vl = abs_["trastuzumab VL"].sequence
    vh = abs_["trastuzumab VH"].sequence
    frag = vh[:48]
    c22 = antiberty_eval.conserved_sites(vh)["cys1"]
    assert frag[c22] == "C"
    return {"trastuzumab VL": vl, "trastuzumab VH 1-48": frag,
            "trastuzumab VH 1-48 shuffled": antiberty_eval.shuffled(frag, "test_real_weights"),
            "trastuzumab VH 1-48 C22S": frag[:c22] + "S" + frag[c22 + 1:]}


TEXTS = _texts()


class ResidueReference:
    """Log-probabilities computed independently: transformers' BertForMaskedLM loaded from the same directory,
    one masked copy per residue, the full-vocabulary log_softmax in float64. Token ids come straight from
    vocab.txt (transformers' tokenizer, given no tokenizer_config.json, lower-cases: every residue would
    be [UNK]; with do_lower_case=False it gives the same ids, checked)."""

    def __init__(self, hf_dir: Path):
        from transformers import BertForMaskedLM, BertTokenizerFast

        self.model, info = BertForMaskedLM.from_pretrained(str(hf_dir), output_loading_info=True)
        self.model.eval()
        assert not info["missing_keys"], f"the reference did not load {info['missing_keys']}"
        self.vocab = (hf_dir / "vocab.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        tok = BertTokenizerFast.from_pretrained(str(hf_dir), do_lower_case=False)
        assert len(tok) == len(self.vocab) == 25
        probe = "E V Q L C W Y"
        assert tok(probe, add_special_tokens=False)["input_ids"] == [self.ids[r] for r in probe.split()]

    def distributions(self, seq: str):
        """float64 [len(seq), 25]: log-probabilities over the vocabulary at each residue, masked in turn."""
        import torch

        n = len(seq)
        row = [self.ids["[CLS]"]] + [self.ids[r] for r in seq] + [self.ids["[SEP]"]]
        rows = torch.tensor([row] * n)
        rows[torch.arange(n), 1 + torch.arange(n)] = self.ids["[MASK]"]
        with torch.no_grad():
            logits = self.model(input_ids=rows).logits
        return torch.log_softmax(logits.double(), -1)[torch.arange(n), 1 + torch.arange(n)].numpy()


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def real(antiberty_hf, tmp_path_factory):
    """The export of the untouched directory with top-k = the whole vocabulary, plus ONNX fp32; and
    everything the exporter printed."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mlm-scorer[onnx]')")
    from mlm_export import export, load_checkpoint
    from mlm_export.to_onnx import write_onnx

    base = tmp_path_factory.mktemp("antiberty_real")
    msgs: list[str] = []
    vdir = export(antiberty_hf, base, top_k=25, log=msgs.append)
    write_onnx(vdir, load_checkpoint(antiberty_hf), log=msgs.append)
    return {"base": base, "vdir": vdir, "log": msgs}


@pytest.fixture(scope="module")
def real_int8(real, antiberty_hf):
    """The same export with model.int8.onnx too (only the int8 test asks for it); what the exporter printed."""
    from mlm_export import load_checkpoint
    from mlm_export.to_onnx import write_onnx

    msgs: list[str] = []
    write_onnx(real["vdir"], load_checkpoint(antiberty_hf), quantize="int8", log=msgs.append)
    return {**real, "log": msgs}


@pytest.fixture(scope="module")
def reference(antiberty_hf):
    ref = ResidueReference(antiberty_hf)
    return {seq: ref.distributions(seq) for seq in TEXTS.values()}, ref.vocab


@pytest.fixture(scope="module")
def tsv(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("antiberty_in") / "antibodies.tsv"
    p.write_text("id\ttext\n" + "".join(f"{k}\t{antiberty_eval.residues(s)}\n" for k, s in TEXTS.items()),
                 encoding="utf-8")
    return p


def _score(tsv: Path, out: Path, model: Path, engine: str, **kw):
    from helpers import read_outputs
    from mlm_scorer.pipeline import score_file

    kw.setdefault("top_k", 25)
    score_file(tsv, out, model=model, engine=engine, id_column="id", **kw)
    return read_outputs(out)


def _check_parity(words, sents, reference) -> float:
    """Every residue's log-prob and its whole top-25 against the reference; returns the max |Δ| seen."""
    dists, vocab = reference
    worst = 0.0
    assert [s["id"] for s in sents] == list(TEXTS)
    for s in sents:
        seq = TEXTS[s["id"]]
        ref = dists[seq]
        ws = sorted((w for w in words if w["id"] == s["id"]), key=lambda w: w["word_index"])
        assert "".join(w["word"] for w in ws) == seq and all(w["n_pieces"] == 1 for w in ws)
        got = np.array([w["log_prob"] for w in ws])
        want = ref[np.arange(len(seq)), [vocab.index(r) for r in seq]]
        d = np.abs(got - want)
        assert d.max() <= TOL, f"{s['id']}: residue {d.argmax()} differs by {d.max():.2e}"
        worst = max(worst, float(d.max()))
        for i, w in enumerate(ws):
            assert len(w["top_k"]) == 25
            top = np.array([t["log_prob"] for t in w["top_k"]])
            assert np.all(np.diff(top) <= 1e-6), "top-k must be sorted"
            d_top = np.abs(top - ref[i, [vocab.index(t["token"]) for t in w["top_k"]]])
            assert d_top.max() <= TOL, f"{s['id']} residue {i}: top-k log-probs differ by {d_top.max():.2e}"
        assert abs(s["pll"] - want.sum()) <= TOL * len(seq)
    return worst


# --------------------------------------------------------------------------------------------- tests

def test_export_of_the_untouched_directory_lists_the_ignored_heads(real, antiberty_hf):
    assert sorted(p.name for p in antiberty_hf.iterdir()) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    heads = ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "cls.chain.bias", "cls.chain.weight",
             "cls.graft.bias", "cls.graft.weight", "cls.species.bias", "cls.species.weight"]
    line = next(m for m in real["log"] if m.startswith("ignoring"))
    assert all(h in line for h in heads), line
    manifest = json.loads((real["vdir"] / "mlm_scorer.json").read_text())
    assert sorted(manifest["ignored_tensors"]) == heads
    assert manifest["vocab_size"] == 25 and manifest["top_k"] == 25
    # verified at export, against the float64 NumPy forward pass over the source weights
    assert any(m.startswith("verified") and "model.onnx" in m for m in real["log"])


@pytest.fixture(scope="module")
def onnx_token(real, tsv, tmp_path_factory):
    """ONNX fp32 in token mode (what the AntiBERTy mapping below reads), run once."""
    return _score(tsv, tmp_path_factory.mktemp("onnx_token") / "out.parquet", real["base"], "onnx", mode="token")


@pytest.mark.parametrize("engine", ["saved_model", "onnx", "torch"])
def test_engine_matches_transformers_on_real_weights(engine, real, reference, tsv, tmp_path, request):
    # the default mode (whole-word), and token mode for ONNX: one piece per word, so the same copies
    if engine == "onnx":
        words, sents = request.getfixturevalue("onnx_token")
    else:
        words, sents = _score(tsv, tmp_path / "out.parquet", real["base"], engine)
    worst = _check_parity(words, sents, reference)
    assert worst > 0.0  # float32 engines against a float64 reference: identical numbers would be suspicious


@pytest.fixture(scope="module")
def standin(real, tmp_path_factory):
    pytest.importorskip("requests")
    from tfserving_standin import StandIn

    s = StandIn({"antiberty": real["base"]}, tmp_path_factory.mktemp("standin_logs")).start()
    yield s
    s.stop()


@pytest.mark.parametrize("kind", ["rest", "grpc"])
def test_tf_serving_clients_match_transformers_on_real_weights(kind, real, reference, tsv, standin, tmp_path):
    if kind == "grpc":
        pytest.importorskip("tensorflow_serving", reason="tensorflow-serving-api is not installed")
    url = standin.rest_url if kind == "rest" else standin.grpc_url
    words, sents = _score(tsv, tmp_path / "out.parquet", real["base"], kind,
                          engine_options={"server": url, "model_name": "antiberty", "max_batch_size": "32"})
    _check_parity(words, sents, reference)


def _drift(words, reference) -> dict:
    dists, vocab = reference
    got, ref = {}, {}
    for name, seq in TEXTS.items():
        ws = sorted((w for w in words if w["id"] == name), key=lambda w: w["word_index"])
        got[seq] = np.array([w["log_prob"] for w in ws])
        ref[seq] = dists[seq][np.arange(len(seq)), [vocab.index(r) for r in seq]]
    return antiberty_eval.drift(ref, got)


def _assert_drift(d: dict, tol: dict, name: str) -> None:
    print(f"\n{name} drift on AntiBERTy: {json.dumps(d)}")
    assert d["token_mean_abs"] <= tol["token_mean"], d
    assert d["token_max_abs"] <= tol["token_max"], d
    assert d["seq_mean_abs_per_residue"] <= tol["seq_mean_per_residue"], d
    assert d["spearman_all"] >= tol["spearman"], d


def test_onnx_int8_drift_on_real_weights(real_int8, reference, tsv, tmp_path):
    assert any(m.startswith("drift onnx-int8") for m in real_int8["log"]), real_int8["log"]
    words, _ = _score(tsv, tmp_path / "out.parquet", real_int8["base"], "onnx", engine_options={"precision": "int8"})
    d = _drift(words, reference)
    _assert_drift(d, INT8_TOL, "onnx int8")
    assert d["token_max_abs"] > 1e-3, "int8 gave fp32 numbers: model.int8.onnx is not in use"


def test_torch_bf16_drift_on_real_weights(real, reference, tsv, tmp_path):
    from mlm_scorer.engines.torch_engine import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no avx512_bf16/amx_bf16: torch bf16 is refused here, its drift not measurable")
    words, _ = _score(tsv, tmp_path / "out.parquet", real["base"], "torch", engine_options={"precision": "bf16"})
    d = _drift(words, reference)
    _assert_drift(d, BF16_TOL, "torch bf16")
    assert d["token_max_abs"] > 1e-3, "bf16 gave fp32 numbers: the bf16 cast is not in effect"


# ---------------------------------------------------------------- AntiBERTy's own pseudo-log-likelihood

def renormalised_mean(words: list[dict]) -> float:
    """AntiBERTy's PLL from mlm-score's output: each residue's log-prob renormalised over the non-special
    tokens (its top-k = the whole vocabulary gives the normaliser), averaged over the residues."""
    vals = []
    for w in words:
        residue_lps = [t["log_prob"] for t in w["top_k"] if t["token"] not in SPECIALS]
        assert len(residue_lps) == 20, "needs top-k over the whole vocabulary (mlm-export --top-k 25)"
        vals.append(w["log_prob"] - float(np.logaddexp.reduce(residue_lps)))
    return float(np.mean(vals))


@pytest.fixture(scope="module")
def peers_python() -> Path:
    """.venv-peers' python with antiberty importable; skipped without it, failed under MLM_REQUIRE_PEERS=1
    (make test builds the venv and sets it). Checked before the export, so a skip costs nothing."""
    py = PEERS / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", "import antiberty"], capture_output=True).returncode == 0
    if not ok:
        msg = f"no antiberty in {PEERS} (bash scripts/peers_env.sh builds it; make test does)"
        if os.environ.get("MLM_REQUIRE_PEERS") == "1":
            pytest.fail(f"MLM_REQUIRE_PEERS=1 but {msg}")
        pytest.skip(msg)
    return py


def test_antiberty_runner_pll_equals_renormalised_mean(peers_python, onnx_token, tmp_path, antiberty_hf):
    """mlm-score (token mode, top-k 25) against AntiBERTyRunner.pseudo_log_likelihood, run by its own package
    in .venv-peers (transformers < 5), on the same texts: equal within 1e-5 per sequence once the runner's
    definitions are applied (renormalise over the 20 residues, average per residue)."""
    py = peers_python
    seqs = tmp_path / "seqs.txt"
    seqs.write_text("".join(s + "\n" for s in TEXTS.values()), encoding="utf-8")
    out = tmp_path / "runner.json"
    subprocess.run([str(py), str(ROOT / "scripts" / "antiberty_runner_worker.py"), "--sequences", str(seqs),
                    "--out", str(out)], check=True, capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    runner = json.loads(out.read_text())
    from mlm_scorer.model_dir import sha256_file

    assert runner["weights_sha256"] == sha256_file(antiberty_hf / "pytorch_model.bin"), "not the same weights"
    assert runner["sequences"] == list(TEXTS.values())

    words, sents = onnx_token
    for name, theirs in zip(TEXTS, runner["pll"]):
        ws = [w for w in words if w["id"] == name]
        ours = renormalised_mean(ws)
        plain = next(s for s in sents if s["id"] == name)["pll"] / len(ws)  # no renormalisation
        assert abs(ours - theirs) <= 1e-5, (name, ours, theirs)
        # Renormalising moves the mean by -mean(log(1 - special mass)): tiny for these weights (they were
        # trained never to predict a special token), but it is part of the definition.
        assert ours >= plain - 1e-7
