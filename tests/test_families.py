"""Families beyond BERT: RoBERTa, CamemBERT, XLM-RoBERTa, DistilBERT, the ELECTRA generator, ESM-2 (and
ESM-1b's variant of ESM: absolute positions, LayerNorm after the embeddings).

Each is built with random weights (range 0.3) and a tokenizer trained here (tests/tiny_families.py),
exported (SavedModel + ONNX), and every word log-prob, in all three modes, is compared with transformers'
AutoModelForMaskedLM on the same directory (<= 1e-4) for the SavedModel engine (through ``score_file``),
ONNX Runtime, torch, and the TF Serving REST and gRPC clients through the stand-in server. Then: words per
tokenizer, the manifest, refusals, windows, the score cache and Ray for a non-BERT family.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_outputs, write_tsv
from tiny_families import FAMILIES, FamilyReference, make_family

from mlm_scorer.engines import get_engine
from mlm_scorer.errors import ModelError
from mlm_scorer.model_dir import ModelDir
from mlm_scorer.scorer import Scorer
from mlm_scorer.segment import WordTokenizer

TOL = 1e-4
MODES = ("whole-word", "word-l2r", "token")
SENTENCES = [
    "Who should Derek hug after shocking Richard?",
    "The cat's  jacksonville émigré 中文 😀!",  # two spaces, accents, CJK, an emoji
    "Many  people were not fleeing from Kyle. ",  # and a trailing space
    "ab",
]
PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "M K T A", "GAVLIPFYWCHDEKRNQSTXBUZO"]

_BUILT: dict[str, dict] = {}
_REFERENCE: dict[tuple[str, str], list[list[float]]] = {}


def texts_for(family: str) -> list[str]:
    return PROTEINS if family.startswith("esm") else SENTENCES


def built(family: str, tmp_path_factory) -> dict:
    """{hf, export, ref} for ``family``, built once per session: the checkpoint, its export (SavedModel and
    model.onnx), and the transformers reference."""
    if family not in _BUILT:
        from mlm_export import export, load_checkpoint
        from mlm_export.to_onnx import write_onnx

        root = tmp_path_factory.mktemp(f"family-{family}")
        hf = make_family(family, root / "hf", seed=FAMILIES.index(family))
        base = root / "export"
        vdir = export(hf, base, log=lambda m: None)
        write_onnx(vdir, load_checkpoint(hf), log=lambda m: None)
        _BUILT[family] = {"hf": hf, "export": base, "ref": FamilyReference(hf)}
    return _BUILT[family]


def reference(family: str, mode: str, tmp_path_factory) -> list[list[float]]:
    if (family, mode) not in _REFERENCE:
        ref = built(family, tmp_path_factory)["ref"]
        _REFERENCE[family, mode] = [ref.word_log_probs(t, mode) for t in texts_for(family)]
    return _REFERENCE[family, mode]


def _check_words(family, mode, texts, got_words, tmp_path_factory):
    """got_words: per text, [(word, char_start, char_end, n_pieces, log_prob)]."""
    ref = built(family, tmp_path_factory)["ref"]
    expected = reference(family, mode, tmp_path_factory)
    worst = 0.0
    for text, words, want in zip(texts, got_words, expected):
        _, ref_words = ref.words(text)
        assert [w[3] for w in words] == [len(p) for p in ref_words], f"{family}: word split differs for {text!r}"
        for word, a, b, _, _ in words:  # cut from the text, without the space or ▁ the first piece carries
            assert text[a:b] == word and word and word == word.strip()
        worst = max(worst, float(np.max(np.abs(np.array([w[4] for w in words]) - np.array(want)))))
    assert worst <= TOL, f"{family} {mode}: max |Δ log-prob| {worst:.2e} > {TOL}"


# ------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_score_file_matches_transformers(family, tmp_path, tmp_path_factory):
    from mlm_scorer import score_file

    b = built(family, tmp_path_factory)
    texts = texts_for(family)
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), t] for i, t in enumerate(texts)])
    for mode in MODES:
        out = tmp_path / f"{mode}.parquet"
        summary = score_file(tsv, out, model=b["export"], engine="saved_model", mode=mode, id_column="id")
        assert summary.scored == len(texts) and summary.skipped == 0
        words, sents = read_outputs(out)
        per_text = [[(w["word"], w["char_start"], w["char_end"], w["n_pieces"], w["log_prob"])
                     for w in words if w["row"] == i] for i in range(len(texts))]
        _check_words(family, mode, texts, per_text, tmp_path_factory)
        for s, want in zip(sents, reference(family, mode, tmp_path_factory)):
            assert s["pll"] == pytest.approx(sum(want), abs=TOL * len(want))


def _scored(model: ModelDir, engine, mode: str, texts: list[str]):
    out = []
    for text, r in zip(texts, Scorer(model, engine, mode=mode).score(texts)):
        s, lps = r.sentence, r.word_log_probs()
        out.append([(text[a:b], int(a), int(b), int(s.word_starts[i + 1] - s.word_starts[i]), float(lps[i]))
                    for i, (a, b) in enumerate(s.char_spans)])
    return out


@pytest.mark.parametrize("engine", ["onnx", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_in_process_engines_match_transformers(family, engine, tmp_path_factory):
    b = built(family, tmp_path_factory)
    model = ModelDir.open(b["export"])
    with get_engine(engine, model=model, **({"threads": 1} if engine == "torch" else {})) as eng:
        for mode in MODES:
            _check_words(family, mode, texts_for(family), _scored(model, eng, mode, texts_for(family)),
                         tmp_path_factory)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The TF Serving stand-in serving every family's export (model name = the family)."""
    pytest.importorskip("requests")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tfserving_standin import StandIn

    s = StandIn({f: built(f, tmp_path_factory)["export"] for f in FAMILIES}, tmp_path_factory.mktemp("logs")).start()
    yield s
    s.stop()


@pytest.mark.parametrize("kind", ["rest", "grpc"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tf_serving_clients_match_transformers(family, kind, server, tmp_path_factory):
    if kind == "grpc":
        pytest.importorskip("tensorflow_serving", reason="tensorflow-serving-api is not installed")
        from mlm_scorer.engines.tf_serving_grpc import GrpcEngine as cls
    else:
        from mlm_scorer.engines.tf_serving_rest import RestEngine as cls
    model = ModelDir.open(built(family, tmp_path_factory)["export"])
    url = server.rest_url if kind == "rest" else server.grpc_url
    with cls(model, server=url, model_name=family, concurrency=2) as eng:  # start-up checks the identity probe
        for mode in MODES:
            _check_words(family, mode, texts_for(family), _scored(model, eng, mode, texts_for(family)),
                         tmp_path_factory)


def test_predictions_are_not_uniform(tmp_path_factory):
    """Guard for the guard: with range 0.3 every family's predictions are peaked enough that a position
    off by one (RoBERTa's offset, ESM's rotation) would show."""
    for family in FAMILIES:
        lps = [x for row in reference(family, "token", tmp_path_factory) for x in row]
        assert np.ptp(lps) > 1.0, family


# ------------------------------------------------------------------------------------ words, manifest

def test_words_follow_each_tokenizer(tmp_path_factory):
    def words(family, text):
        tok = WordTokenizer(ModelDir.open(built(family, tmp_path_factory)["export"]))
        s = tok.tokenize([text])[0]
        assert s.word_starts[0] == 0 and s.word_starts[-1] == s.n_pieces  # every piece is in a word
        return [text[a:b] for a, b in s.char_spans], np.diff(s.word_starts).tolist()

    # byte-level BPE: its regex's units; the whitespace-only unit of "  " joins the word after it
    w, n = words("roberta", "Hello,  world!")
    assert w == ["Hello", ",", "world", "!"]
    w2, n2 = words("roberta", "Hello, world!")
    assert n[2] == n2[2] + 1
    # SentencePiece: whitespace-separated units, punctuation included, without the ▁
    assert words("xlm-roberta", "Hello,  world!")[0] == ["Hello,", "world!"]
    # WordPiece families split as BERT does; ESM: one residue per word, spaces or not
    assert words("distilbert", "The cat's toy")[0] == ["The", "cat", "'", "s", "toy"]
    assert words("esm", "MKT A")[0] == ["M", "K", "T", "A"]
    assert words("roberta", "   ")[0] == [] and words("roberta", "   ")[1] == []


def test_manifest_records_family_and_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer

    from mlm_scorer.model_dir import sha256_file

    m = ModelDir.open(built("roberta", tmp_path_factory)["export"])
    man = m.manifest
    assert man["family"] == "roberta" and man["format_version"] == 2 and m.family == "roberta"
    assert man["special_tokens"] == {"cls": "<s>", "sep": "</s>", "mask": "<mask>", "pad": "<pad>", "unk": "<unk>"}
    tok = Tokenizer.from_file(str(m.tokenizer_json))
    assert man["special_token_ids"] == {k: tok.token_to_id(v) for k, v in man["special_tokens"].items()}
    assert man["special_token_ids"]["pad"] == 1 and man["config"]["position_offset"] == 2
    assert man["max_seq_length"] == man["config"]["max_position_embeddings"] - 2 == 64
    assert man["do_lower_case"] is False and man["tokenizer_sha256"] == sha256_file(m.tokenizer_json)
    assert m.vocab_path.read_text(encoding="utf-8").split("\n")[:3] == ["<s>", "<pad>", "</s>"]
    for family, kind in (("distilbert", 0), ("esm", 0), ("electra", 2)):
        cfg = ModelDir.open(built(family, tmp_path_factory)["export"]).manifest["config"]
        assert cfg["type_vocab_size"] == kind
    esm = ModelDir.open(built("esm", tmp_path_factory)["export"]).manifest
    assert esm["special_tokens"]["cls"] == "<cls>" and esm["special_tokens"]["sep"] == "<eos>"
    assert esm["config"]["position_embedding_type"] == "rotary" and esm["config"]["token_dropout"] is True
    # casing from the tokenizer itself, and the export's pieces checked against transformers' AutoTokenizer
    for m in (man, esm):
        assert m["casing"]["do_lower_case"] is False and m["casing"]["pieces_check"]["equal"] is True
    assert "normalizer does not lower-case" in man["casing"]["decided_by"]


def test_bert_exports_stay_format_1(tiny_export, fake_export):
    """A BERT export stays format 1 (readable by scorers older than the families); without `family`: BERT."""
    man = ModelDir.open(tiny_export).manifest
    assert man["format_version"] == 1 and man["family"] == "bert"
    assert "family" not in ModelDir.open(fake_export).manifest and ModelDir.open(fake_export).family == "bert"


@pytest.mark.parametrize("family", ["distilbert", "esm"])
def test_segment_ids_accepted_and_ignored_without_token_types(family, tmp_path_factory):
    import onnxruntime as ort
    import tensorflow as tf

    vdir = ModelDir.open(built(family, tmp_path_factory)["export"]).path
    feed = {"input_ids": [[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]], "input_mask": [[1] * 5, [1, 1, 1, 1, 0]],
            "masked_lm_positions": [[1, 3], [2, 0]], "masked_lm_ids": [[5, 7], [9, 0]]}
    sd = tf.saved_model.load(str(vdir)).signatures["serving_default"]
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    outs = []
    for seg in ([[0] * 5] * 2, [[0, 1, 1, 0, 1], [1, 0, 1, 1, 0]]):
        f = {k: np.asarray(v, np.int32) for k, v in {**feed, "segment_ids": seg}.items()}
        outs.append(sd(**{k: tf.constant(v) for k, v in f.items()})["masked_lm_log_probs"].numpy())
        outs.append(sess.run(["masked_lm_log_probs"], f)[0])
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)


def test_changed_tokenizer_is_refused(tmp_path_factory, tmp_path):
    import shutil

    src = ModelDir.open(built("roberta", tmp_path_factory)["export"]).path
    shutil.copytree(src, tmp_path / "1")
    tj = tmp_path / "1" / "tokenizer" / "tokenizer.json"
    spec = json.loads(tj.read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Lowercase"}
    tj.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ModelError, match="tokenizer_sha256"):
        ModelDir.open(tmp_path)


# ------------------------------------------------------------------------------------------ refusals

def test_unsupported_family_names_the_supported_ones(tmp_path, capsys):
    from mlm_export import CheckpointError, load_checkpoint
    from mlm_export.cli import main

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                               "vocab_size": 50257}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d)
    msg = str(err.value)
    assert "'gpt2'" in msg and "GPT2LMHeadModel" in msg
    for t in ("'bert'", "'roberta'", "'camembert'", "'xlm-roberta'", "'distilbert'", "'electra'", "'esm'"):
        assert t in msg
    assert main([str(d), str(tmp_path / "out")]) == 1
    err_out = capsys.readouterr().err
    assert "not a masked-LM family" in err_out and "'xlm-roberta'" in err_out and "Traceback" not in err_out


def test_electra_discriminator_is_refused(tmp_path_factory, tmp_path):
    import shutil

    from mlm_export import CheckpointError, load_checkpoint

    d = tmp_path / "disc"
    shutil.copytree(built("electra", tmp_path_factory)["hf"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["ElectraForPreTraining"]}))
    with pytest.raises(CheckpointError, match="discriminator.*generator"):
        load_checkpoint(d)


def test_missing_or_misshapen_weight_is_refused(tmp_path_factory, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlm_export import CheckpointError, load_checkpoint

    d = tmp_path / "distil"
    shutil.copytree(built("distilbert", tmp_path_factory)["hf"], d)
    weights = load_file(str(d / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "distilbert.transformer.layer.1.ffn.lin2.bias"},
              str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: distilbert\.transformer\.layer\.1\.ffn\.lin2\.bias"):
        load_checkpoint(d)
    weights["distilbert.embeddings.position_embeddings.weight"] = weights[
        "distilbert.embeddings.position_embeddings.weight"][:10]
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"position_embeddings\.weight has shape \[10, 32\], expected \[64, 32\]"):
        load_checkpoint(d)


def test_contradicting_casing_flag_is_refused(tmp_path_factory):
    from mlm_export import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="contradicts the checkpoint's tokenizer"):
        load_checkpoint(built("roberta", tmp_path_factory)["hf"], do_lower_case=True)


def test_roberta_from_vocab_json_and_merges(tmp_path_factory, tmp_path):
    """A RoBERTa checkpoint without tokenizer.json (vocab.json + merges.txt) tokenizes as transformers does."""
    from tokenizers import Tokenizer

    from mlm_export import load_checkpoint

    hf = make_family("roberta", tmp_path / "hf", tokenizer_files="vocab.json+merges.txt")
    assert not (hf / "tokenizer.json").exists()
    tok = Tokenizer.from_str(load_checkpoint(hf).tokenizer_json)
    ref = built("roberta", tmp_path_factory)["ref"]
    for text in SENTENCES:
        assert tok.encode(text, add_special_tokens=False).ids == ref.tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------- minicons

PEERS_PY = Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python"


def test_roberta_matches_minicons(tmp_path_factory, tmp_path):
    """minicons' MaskedLMScorer (its own venv: transformers < 5) on the same RoBERTa checkpoint: its
    per-token scores, summed per word, equal ours -- token mode vs its original PLL, word-l2r vs its
    within_word_l2r -- and it predicts the same pieces."""
    import subprocess

    if not PEERS_PY.is_file():
        msg = f"{PEERS_PY} is missing: bash scripts/peers_env.sh builds it (make test does)"
        if os.environ.get("MLM_REQUIRE_PEERS") == "1":
            pytest.fail(f"MLM_REQUIRE_PEERS=1 but {msg}")
        pytest.skip(msg)
    b = built("roberta", tmp_path_factory)
    # minicons' within_word_l2r makes the whitespace-only unit of "  " a word of its own; ours joins the next word
    texts = [t for t in SENTENCES if "  " not in t]
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), t] for i, t in enumerate(texts)])
    worker = Path(__file__).resolve().parents[1] / "scripts" / "peers_minicons_worker.py"
    subprocess.run([str(PEERS_PY), str(worker), "--model", str(b["hf"]), "--tsv", str(tsv), "--threads", "1",
                    "--metrics", "original,within_word_l2r", "--out", str(tmp_path / "mini.json")], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    mini = json.loads((tmp_path / "mini.json").read_text(encoding="utf-8"))
    model = ModelDir.open(b["export"])
    with get_engine("onnx", model=model) as eng:
        for mode, metric in (("token", "original"), ("word-l2r", "within_word_l2r")):
            results = Scorer(model, eng, mode=mode).score(texts)
            for r, ids, scores in zip(results, mini["token_ids"], mini["metrics"][metric]["scores"]):
                assert r.sentence.ids.tolist() == ids
                np.testing.assert_allclose(r.piece_log_probs, scores, atol=TOL, rtol=0)


# ------------------------------------------------------------------- windows, cache, Ray

@pytest.mark.parametrize("mode", ["whole-word", "token"])
def test_roberta_long_sentence_in_windows(mode, tmp_path_factory, tmp_path):
    from mlm_export import export
    from test_windows import LONG, policy_window

    from mlm_scorer import score_file

    root = tmp_path_factory.getbasetemp() / "roberta-short"
    if not (root / "export").exists():
        make_family("roberta", root / "hf", max_pos=16, seed=3)
        export(root / "hf", root / "export", log=lambda m: None)
    ref = FamilyReference(root / "hf")
    assert ref.max_len == 16
    ids, words = ref.words(LONG)
    assert len(ids) > 2 * 14
    out = tmp_path / "out.parquet"
    score_file(write_tsv(tmp_path / "in.tsv", [["1", LONG]]), out, model=root / "export", mode=mode, id_column="id")
    got, sents = read_outputs(out)
    assert len(got) == len(words) == sents[0]["n_words"]
    want = ref.word_log_probs(LONG, mode, window_fn=policy_window(16))
    assert np.max(np.abs(np.array([w["log_prob"] for w in got]) - np.array(want))) <= TOL


def test_score_cache_key_includes_the_family(tmp_path_factory, tmp_path):
    model = ModelDir.open(built("xlm-roberta", tmp_path_factory)["export"])
    with get_engine("onnx", model=model) as eng:
        first = Scorer(model, eng, store_dir=str(tmp_path / "cache"))
        assert first.store.namespace.startswith(f"xlm-roberta|{model.checksum}|")
        a = first.score(SENTENCES)
        again = Scorer(model, eng, store_dir=str(tmp_path / "cache"))
        b = again.score(SENTENCES)
    assert again.store.hits == len(SENTENCES) and again.stats.unique_scored == 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.piece_log_probs, y.piece_log_probs)


@pytest.mark.ray
def test_ray_scores_a_roberta_export_as_score_file(tmp_path_factory, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from mlm_scorer.pipeline import score_file
    from mlm_scorer.ray_data import score_dataset

    export_dir = str(built("roberta", tmp_path_factory)["export"])
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), t] for i, t in enumerate(SENTENCES * 3)])
    score_file(tsv, tmp_path / "ref.parquet", model=export_dir, engine="saved_model", id_column="id")
    ref_words, ref_sents = read_outputs(tmp_path / "ref.parquet")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        score_dataset([str(tsv)], tmp_path / "ray", model=export_dir, id_column="id", num_actors=1,
                      num_cpus_per_actor=1, engine_options={"intra_op_threads": 1})
    finally:
        ray.shutdown()
    import pyarrow.parquet as pq

    words = pq.read_table(tmp_path / "ray" / "words").to_pylist()
    assert [(w["row"], w["word"]) for w in words] == [(w["row"], w["word"]) for w in ref_words]
    np.testing.assert_allclose([w["log_prob"] for w in words], [w["log_prob"] for w in ref_words], rtol=1e-6,
                               atol=1e-6)
    assert len(pq.read_table(tmp_path / "ray" / "sentences")) == len(ref_sents)
