"""Every word log-prob from export + scorer equals transformers' PyTorch BertForMaskedLM (≤ 1e-4),
in all three modes, for Hugging Face and TF-1 sources."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TorchReference, read_outputs, write_tsv

from mlm_scorer import score_file

TOL = 1e-4
MODES = ["whole-word", "word-l2r", "token"]

SMALL_SENTENCES = [
    "The cat sat on the mat.",
    "The quick brown fox jumps over the lazy dog!",
    "Running dogs walked; people read books?",
    "jacksonville émigré 中文 😀 \"quoted\"",
    "ab",
]
REAL_SENTENCES = [
    "The antidisestablishmentarianism of Jacksonville's mayor was unbelievably controversial.",
    "She said: \"I'll be there at 10:30, don't worry\" — and left.",
    "Naïve café owners in Zürich serve crème brûlée.",
    "BERT scores pseudo-log-likelihoods, 3.14159 times faster!",
    "日本語のテキストと emoji 🎉 mixed",
]


def _check(export_dir: Path, reference: TorchReference, sentences: list[str], mode: str, tmp_path: Path):
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), s] for i, s in enumerate(sentences)])
    out = tmp_path / f"out-{mode}.parquet"
    summary = score_file(tsv, out, model=export_dir, mode=mode, id_column="id")
    words, sents = read_outputs(out)
    assert summary.scored == len(sentences) and summary.skipped == 0
    max_diff = 0.0
    for i, text in enumerate(sentences):
        ref = reference.word_log_probs(text, mode)
        got = [w for w in words if w["row"] == i]
        assert [w["word_index"] for w in got] == list(range(len(ref))), f"word count differs for {text!r}"
        ref_ids, ref_words = reference.words(text)
        assert [w["n_pieces"] for w in got] == [len(p) for p in ref_words]
        diffs = np.abs(np.array([w["log_prob"] for w in got]) - np.array(ref))
        max_diff = max(max_diff, float(diffs.max()))
        # sentence scores are sums/means of the same word log-probs
        s = sents[i]
        assert s["status"] == "ok" and s["n_words"] == len(ref)
        assert s["pll"] == pytest.approx(sum(ref), abs=TOL * len(ref))
        assert s["pseudo_perplexity"] == pytest.approx(np.exp(-sum(ref) / len(ref)), rel=1e-3)
        assert s["min_word_log_prob"] == pytest.approx(min(ref), abs=TOL)
        for w in got:  # words cut from the original text by their offsets
            assert text[w["char_start"]:w["char_end"]] == w["word"]
            assert w["prob"] == pytest.approx(np.exp(w["log_prob"]))
    assert max_diff <= TOL, f"max |Δ log-prob| {max_diff:.2e} > {TOL} in mode {mode}"
    return max_diff


@pytest.mark.parametrize("mode", MODES)
def test_hf_small_vocab_matches_pytorch(tiny_export, tiny_reference, mode, tmp_path):
    _check(tiny_export, tiny_reference, SMALL_SENTENCES, mode, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_hf_real_vocab_matches_pytorch(realvocab_export, realvocab_reference, mode, tmp_path):
    _check(realvocab_export, realvocab_reference, REAL_SENTENCES, mode, tmp_path)


def test_predictions_are_not_uniform(tiny_export, tiny_reference):
    """Guard for the guard: with init range 0.3 the model is confident enough that a misaligned
    position or target would show (near-uniform predictions would hide it)."""
    lps = tiny_reference.word_log_probs("The cat sat on the mat.", "token")
    assert np.ptp(lps) > 1.0


def _write_tf1_checkpoint(hf_dir: Path, out: Path) -> Path:
    """Write the HF weights as an original Google TF-1 checkpoint (names as google-research/bert)."""
    import tensorflow as tf
    from safetensors.numpy import load_file

    sd = {k: v.astype(np.float32) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    cfg = json.loads((hf_dir / "config.json").read_text())
    tf1 = {
        "bert/embeddings/word_embeddings": sd["bert.embeddings.word_embeddings.weight"],
        "bert/embeddings/position_embeddings": sd["bert.embeddings.position_embeddings.weight"],
        "bert/embeddings/token_type_embeddings": sd["bert.embeddings.token_type_embeddings.weight"],
        "bert/embeddings/LayerNorm/gamma": sd["bert.embeddings.LayerNorm.weight"],
        "bert/embeddings/LayerNorm/beta": sd["bert.embeddings.LayerNorm.bias"],
        "cls/predictions/transform/dense/kernel": sd["cls.predictions.transform.dense.weight"].T,
        "cls/predictions/transform/dense/bias": sd["cls.predictions.transform.dense.bias"],
        "cls/predictions/transform/LayerNorm/gamma": sd["cls.predictions.transform.LayerNorm.weight"],
        "cls/predictions/transform/LayerNorm/beta": sd["cls.predictions.transform.LayerNorm.bias"],
        "cls/predictions/output_bias": sd["cls.predictions.bias"],
        # present in real Google checkpoints, unused by the MLM graph
        "bert/pooler/dense/kernel": np.zeros((cfg["hidden_size"],) * 2, np.float32),
        "global_step": np.array(1000, np.int64),
    }
    for i in range(cfg["num_hidden_layers"]):
        h, g = f"bert.encoder.layer.{i}.", f"bert/encoder/layer_{i}/"
        for a, b in [("attention.self.query", "attention/self/query"), ("attention.self.key", "attention/self/key"),
                     ("attention.self.value", "attention/self/value"), ("attention.output.dense", "attention/output/dense"),
                     ("intermediate.dense", "intermediate/dense"), ("output.dense", "output/dense")]:
            tf1[g + b + "/kernel"] = sd[h + a + ".weight"].T
            tf1[g + b + "/bias"] = sd[h + a + ".bias"]
        for a, b in [("attention.output.LayerNorm", "attention/output/LayerNorm"), ("output.LayerNorm", "output/LayerNorm")]:
            tf1[g + b + "/gamma"] = sd[h + a + ".weight"]
            tf1[g + b + "/beta"] = sd[h + a + ".bias"]
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(tf1)
    tf.raw_ops.SaveV2(prefix=str(out / "bert_model.ckpt"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tf1[n]) for n in names])
    bert_cfg = {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size")}
    bert_cfg["hidden_dropout_prob"] = 0.1
    (out / "bert_config.json").write_text(json.dumps(bert_cfg))
    shutil.copyfile(hf_dir / "vocab.txt", out / "vocab.txt")
    return out


@pytest.fixture(scope="module")
def tf1_export(tiny_hf, tmp_path_factory):
    from mlm_export import export

    ckpt_dir = _write_tf1_checkpoint(tiny_hf, tmp_path_factory.mktemp("uncased_L-2_H-32_A-4"))
    assert (ckpt_dir / "bert_model.ckpt.index").is_file()
    base = tmp_path_factory.mktemp("tf1_export")
    export(ckpt_dir, base, log=lambda m: None)
    return base


@pytest.mark.parametrize("mode", MODES)
def test_tf1_checkpoint_matches_pytorch(tf1_export, tiny_reference, mode, tmp_path):
    manifest = json.loads((tf1_export / "1" / "mlm_scorer.json").read_text())
    assert manifest["source"]["kind"] == "tf1"
    assert manifest["do_lower_case"] is True  # from the directory name, as google-research/bert does
    _check(tf1_export, tiny_reference, SMALL_SENTENCES, mode, tmp_path)
