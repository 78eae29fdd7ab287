"""Checkpoints as users have them: weight layouts (safetensors, shards with their index, pytorch_model.bin,
bf16, wrapper prefixes), tensors that are ignored and listed, what is refused and how it is said, and the
lower-casing decision (evidence, contradictions, the check against transformers' tokenizer)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_models import SMALL_VOCAB, UNCASED_VOCAB, make_hf_bert

from mlm_export import CheckpointError, export, load_checkpoint
from mlm_export.casing import (CASED_VOCAB_SHARE, check_pieces, checkpoint_name, name_evidence,
                               vocab_evidence)
from mlm_export.errors import CasingError
from mlm_export.verify import VerificationError
from mlm_scorer.cli import main


def _state(hf: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(hf / "model.safetensors"))


def _with_weights(src: Path, dst: Path, state: dict, *, fmt: str = "safetensors") -> Path:
    """A copy of ``src`` whose weights are ``state`` (torch tensors), as model.safetensors or pytorch_model.bin."""
    import torch
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(dst / "model.safetensors"))
    else:
        torch.save(state, dst / "pytorch_model.bin")
    return dst


def _same_weights(a, b) -> None:
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k], err_msg=k)


# ------------------------------------------------------------------------------- weight layouts


def test_task_heads_are_ignored_listed_and_recorded(tiny_hf, tmp_path):
    """A BERT MLM checkpoint that also carries a pooler, an NSP head and classifier heads (architectures
    naming a class of its own) exports as the same model: the heads are listed at export and in the manifest."""
    import torch

    state = _state(tiny_hf)
    g = torch.Generator().manual_seed(5)
    extra = {"bert.pooler.dense.weight": (32, 32), "bert.pooler.dense.bias": (32,),
             "cls.seq_relationship.weight": (2, 32), "cls.seq_relationship.bias": (2,),
             "cls.species.weight": (6, 32), "cls.species.bias": (6,), "classifier.weight": (3, 32)}
    for name, shape in extra.items():
        state[name] = torch.randn(shape, generator=g)
    d = _with_weights(tiny_hf, tmp_path / "heads", state)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["AntibodyBertWithHeads"]
    (d / "config.json").write_text(json.dumps(cfg))

    ckpt = load_checkpoint(d)
    assert ckpt.ignored == sorted(extra)
    _same_weights(ckpt, load_checkpoint(tiny_hf))
    lines = []
    vdir = export(d, tmp_path / "out", log=lines.append)
    listed = [line for line in lines if line.startswith("ignoring 7 tensors")]
    assert listed and all(name in listed[0] for name in extra), lines
    manifest = json.loads((vdir / "mlm_scorer.json").read_text())
    assert manifest["ignored_tensors"] == sorted(extra)
    assert manifest["verification"]["max_abs_diff"] <= 1e-4


def test_sharded_safetensors_need_every_shard_of_their_index(tiny_hf, tmp_path):
    from transformers import BertForMaskedLM

    d = tmp_path / "sharded"
    shutil.copytree(tiny_hf, d)
    (d / "model.safetensors").unlink()
    BertForMaskedLM.from_pretrained(str(tiny_hf)).save_pretrained(str(d), max_shard_size="40KB")
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (d / "model.safetensors.index.json").is_file()
    _same_weights(load_checkpoint(d), load_checkpoint(tiny_hf))

    # without the index, a complete numbered set still loads; an incomplete one is refused by name
    no_index = tmp_path / "no_index"
    shutil.copytree(d, no_index)
    (no_index / "model.safetensors.index.json").unlink()
    _same_weights(load_checkpoint(no_index), load_checkpoint(tiny_hf))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"names {len(shards)} shard\(s\), but 1 are missing .*"
                                              rf"{shards[1].name}\. Download the missing shard"):
        load_checkpoint(d)
    (no_index / shards[1].name).unlink()
    with pytest.raises(CheckpointError, match=rf"has {len(shards) - 1} of {len(shards)} weight shards and no "
                                              rf"model.safetensors.index.json; missing: {shards[1].name}"):
        load_checkpoint(no_index)


def test_sharded_pytorch_bin_with_index(tiny_hf, tmp_path):
    import torch

    state = _state(tiny_hf)
    d = tmp_path / "bin_shards"
    shutil.copytree(tiny_hf, d)
    (d / "model.safetensors").unlink()
    names = sorted(state)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        f = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, d / f)
        weight_map.update({k: f for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _same_weights(load_checkpoint(d), load_checkpoint(tiny_hf))
    # an index that names a tensor its shard does not hold: incomplete, refused
    weight_map["cls.predictions.extra_tensor"] = "pytorch_model-00001-of-00002.bin"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"names tensors its shards do not hold.*cls.predictions.extra_tensor"):
        load_checkpoint(d)


def test_bf16_and_fp16_weights_are_widened_exactly(tiny_hf, tmp_path):
    import torch

    state = _state(tiny_hf)
    for dtype in (torch.bfloat16, torch.float16):
        d = _with_weights(tiny_hf, tmp_path / str(dtype), {k: v.to(dtype) for k, v in state.items()})
        ckpt = load_checkpoint(d)
        for hf_name, google in (("bert.embeddings.word_embeddings.weight", "bert/embeddings/word_embeddings"),
                                ("cls.predictions.bias", "cls/predictions/output_bias")):
            want = state[hf_name].to(dtype).float().numpy()
            np.testing.assert_array_equal(ckpt.weights[google], want)
            assert ckpt.weights[google].dtype == np.float32


@pytest.mark.parametrize("layout", ["module.", "model.", "bare"])
def test_wrapper_prefixes_and_names_without_bert(tiny_hf, tmp_path, layout):
    """DataParallel's 'module.', a training framework's 'model.', or a model saved without the 'bert.' prefix
    (embeddings/encoder next to cls.predictions): the same weights. The pooler is listed under its own name."""
    import torch

    state = _state(tiny_hf)
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    if layout == "bare":
        renamed = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
        pooler = "pooler.dense.weight"
    else:
        renamed = {layout + k: v for k, v in state.items()}
        pooler = layout + "bert.pooler.dense.weight"
    d = _with_weights(tiny_hf, tmp_path / "wrapped", renamed, fmt="bin")
    ckpt = load_checkpoint(d)
    _same_weights(ckpt, load_checkpoint(tiny_hf))
    assert ckpt.ignored == [pooler]


def test_two_models_in_one_file_are_refused(tiny_hf, tmp_path):
    state = _state(tiny_hf)
    both = {**{"teacher." + k: v for k, v in state.items()},
            **{"student." + k: v.clone() for k, v in state.items()}}
    d = _with_weights(tiny_hf, tmp_path / "two", both)
    with pytest.raises(CheckpointError, match="several word-embedding tensors.*ambiguous"):
        load_checkpoint(d)


# ----------------------------------------------------------------------------------- refusals


def test_refusals_name_the_tensor_and_the_expected_shape(tiny_hf, tmp_path):
    import torch

    state = _state(tiny_hf)
    missing = dict(state)
    del missing["bert.encoder.layer.1.attention.self.query.weight"]
    with pytest.raises(CheckpointError, match=r"1 needed weight\(s\) missing: bert\.encoder\.layer\.1\.attention\."
                                              r"self\.query\.weight \(expected shape \[32, 32\]\)"):
        load_checkpoint(_with_weights(tiny_hf, tmp_path / "missing", missing))

    shaped = dict(state)
    shaped["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(48, 32)
    with pytest.raises(CheckpointError, match=r"mis-shaped for the config: bert\.encoder\.layer\.0\.intermediate\."
                                              r"dense\.weight has shape \[48, 32\], expected \[64, 32\]"):
        load_checkpoint(_with_weights(tiny_hf, tmp_path / "shaped", shaped))

    d = shutil.copytree(tiny_hf, tmp_path / "fewer_layers")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"beyond the config \(num_hidden_layers=1\): bert\.encoder\.layer\.1\."):
        load_checkpoint(d)

    odd = dict(state)
    odd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(4)
    with pytest.raises(CheckpointError, match=r"encoder or MLM-head weights that cannot be mapped to BERT: "
                                              r"\['bert\.encoder\.layer\.0\.attention\.self\.rotary\.weight'\]"):
        load_checkpoint(_with_weights(tiny_hf, tmp_path / "odd", odd))


def test_untied_decoder_is_refused(tiny_hf, tmp_path):
    state = _state(tiny_hf)
    emb = state["bert.embeddings.word_embeddings.weight"]
    tied = {**state, "cls.predictions.decoder.weight": emb.clone(), "cls.predictions.decoder.bias":
            state["cls.predictions.bias"].clone()}
    _same_weights(load_checkpoint(_with_weights(tiny_hf, tmp_path / "tied", tied)), load_checkpoint(tiny_hf))
    untied = {**tied, "cls.predictions.decoder.weight": emb + 0.5}
    with pytest.raises(CheckpointError, match=r"decoder \(cls.predictions.decoder.weight\) is not tied"):
        load_checkpoint(_with_weights(tiny_hf, tmp_path / "untied", untied))
    untied_bias = {**tied, "cls.predictions.decoder.bias": state["cls.predictions.bias"] + 1.0}
    with pytest.raises(CheckpointError, match=r"decoder's bias .* differs from cls.predictions.bias"):
        load_checkpoint(_with_weights(tiny_hf, tmp_path / "untied_bias", untied_bias))


def test_antiberty_as_copied_from_the_wheel(antiberty_hf):
    """The real checkpoint: architectures ["AntiBERTy"], no tokenizer_config.json, three task heads. It loads;
    its heads are ignored by name; its upper-case residue vocabulary makes it cased, and says so."""
    ckpt = load_checkpoint(antiberty_hf)
    assert ckpt.ignored == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "cls.chain.bias", "cls.chain.weight",
                            "cls.graft.bias", "cls.graft.weight", "cls.species.bias", "cls.species.weight"]
    assert ckpt.do_lower_case is False
    assert ckpt.casing.line() == ("no lower-casing (cased): vocab.txt: 20 of its 20 tokens with ASCII letters have "
                                  "upper-case ones ('A', 'C', 'D', …)")


# ------------------------------------------------------------------------------------- casing


def test_name_rule_as_google_research_bert():
    assert name_evidence("uncased_L-12_H-768_A-12").lower is True
    assert name_evidence("multilingual_L-12_H-768_A-12").lower is True
    assert name_evidence("chinese_L-12_H-768_A-12").lower is True
    assert name_evidence("multi_cased_L-12_H-768_A-12").lower is False
    assert name_evidence("cased_L-24_H-1024_A-16").lower is False
    assert name_evidence("bert-base-uncased").lower is True
    assert name_evidence("wwm_uncased_L-24_H-1024_A-16").lower is True
    assert name_evidence("bert-large-cased-whole-word-masking").lower is False
    for neutral in ("my-bert", "bert-base-chinese", "encased", "cased-vs-uncased", ""):
        assert name_evidence(neutral) is None, neutral
    snap = Path("/c/hub/models--google-bert--bert-base-cased/snapshots/0123abc")
    assert checkpoint_name(snap) == "bert-base-cased"
    assert checkpoint_name(Path("/x/y"), hub_id="google-bert/bert-base-uncased") == "bert-base-uncased"


def test_vocab_rule_reads_ascii_letters_only():
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    uncased = UNCASED_VOCAB.read_text(encoding="utf-8").splitlines()
    assert "ℝ" in uncased and "ℝ".isupper()  # the letter that made the old rule call this vocabulary cased
    e = vocab_evidence(uncased, special)
    assert e.lower is True and "none of its 26,640 tokens with ASCII letters" in e.text
    words = [f"w{i}" for i in range(1000)]
    assert vocab_evidence(words + ["Paris"], special).lower is None  # a stray capital: undecided
    n_upper = int(CASED_VOCAB_SHARE * 1000) + 1
    assert vocab_evidence(words + [f"Name{i}" for i in range(n_upper)], special).lower is False
    assert vocab_evidence(["[PAD]", "東", "京", "ℝ"], special) is None  # no ASCII letters at all


def _uncased_without_tokenizer_config(tmp_path: Path, name: str = "my-bert") -> Path:
    d = make_hf_bert(tmp_path / name, vocab=UNCASED_VOCAB, hidden=16, layers=1, heads=2, intermediate=16,
                     max_pos=64, seed=3)
    (d / "tokenizer_config.json").unlink()
    return d


SENTENCES = ["The Edinburgh Photosynthesis experiment", "Élodie's café in São Paulo, 東京!",
             "HELLO World — (x≥1) naïve résumé"]


def test_real_uncased_vocab_without_tokenizer_config_is_lower_cased(tmp_path):
    """The real bert-base-uncased vocabulary, no tokenizer files, a neutral name: lower-cased because no ASCII
    token has a capital, said so, recorded, and the export's pieces equal transformers' uncased tokenizer."""
    from transformers import BertTokenizerFast

    from mlm_scorer.model_dir import ModelDir
    from mlm_scorer.segment import WordTokenizer

    d = _uncased_without_tokenizer_config(tmp_path)
    lines = []
    vdir = export(d, tmp_path / "out", log=lines.append)
    assert ("lower-casing: vocab.txt: none of its 26,640 tokens with ASCII letters has an upper-case one" in lines)
    assert any(line.startswith("tokenizer: the same pieces as transformers'") for line in lines), lines
    manifest = json.loads((vdir / "mlm_scorer.json").read_text())
    assert manifest["do_lower_case"] is True
    assert manifest["casing"]["decided_by"].startswith("vocab.txt: none of its")
    assert manifest["casing"]["pieces_check"]["equal"] is True

    ref_dir = tmp_path / "uncased_tokenizer"
    ref_dir.mkdir()
    shutil.copyfile(UNCASED_VOCAB, ref_dir / "vocab.txt")
    (ref_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    ref = BertTokenizerFast.from_pretrained(str(ref_dir))
    assert len(ref) == 30522
    ours = WordTokenizer(ModelDir.open(vdir))._tok
    for text in SENTENCES:
        want = ref.tokenize(text)
        assert ours.encode(text, add_special_tokens=False).tokens == want
        assert "[UNK]" not in want[:3]
    assert ref.tokenize("The Edinburgh Photosynthesis")[:2] == ["the", "edinburgh"]


def test_contradictory_evidence_is_refused_naming_the_flags(tmp_path):
    d = _uncased_without_tokenizer_config(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(CasingError) as info:
        load_checkpoint(d)
    msg = str(info.value)
    assert "tokenizer_config.json do_lower_case=false (cased)" in msg and "vocab.txt: none of its" in msg
    assert "--do-lower-case or --no-lower-case" in msg and "do_lower_case=True or False" in msg
    # the command line says the same, exits 1, writes nothing
    r = subprocess.run([sys.executable, "-m", "mlm_export.cli", str(d), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "mlm-export --do-lower-case or --no-lower-case" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    # the choice, given, wins; the evidence it overrides is printed beside it
    ckpt = load_checkpoint(d, do_lower_case=True)
    assert ckpt.do_lower_case is True
    assert ckpt.casing.line().startswith("lower-casing: given (--do-lower-case / do_lower_case=True); overriding "
                                         "the checkpoint's evidence: tokenizer_config.json do_lower_case=false")

    # the name against the tokenizer files, and tokenizer.json against tokenizer_config.json
    tiny = make_hf_bert(tmp_path / "tiny")
    assert load_checkpoint(tiny).do_lower_case is True
    named = shutil.copytree(tiny, tmp_path / "bert-base-cased")
    with pytest.raises(CasingError, match=r"the name 'bert-base-cased' \(cased\)"):
        load_checkpoint(named)
    both = shutil.copytree(tiny, tmp_path / "both")
    from tokenizers import BertWordPieceTokenizer

    BertWordPieceTokenizer(str(both / "vocab.txt"), lowercase=False).save(str(both / "tokenizer.json"))
    with pytest.raises(CasingError, match=r"tokenizer_config.json do_lower_case=true \(lower-case\); tokenizer.json "
                                          r"normalizer BertNormalizer lowercase=false \(cased\)"):
        load_checkpoint(both)


def test_no_evidence_takes_berts_default_and_says_so(tmp_path):
    d = make_hf_bert(tmp_path / "plain", vocab=_vocab_without_ascii_letters(tmp_path))
    (d / "tokenizer_config.json").unlink()
    ckpt = load_checkpoint(d)
    assert ckpt.do_lower_case is True
    assert ckpt.casing.line().startswith("lower-casing: no evidence (no tokenizer files, no 'cased'/'uncased' in "
                                         "the name, no decisive ASCII letters in vocab.txt)")


def _vocab_without_ascii_letters(tmp_path: Path) -> Path:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(0x4E00, 0x4E00 + 200)]
    v = tmp_path / "cjk_vocab.txt"
    v.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return v


def test_pieces_check_fails_when_the_tokenizers_differ(tmp_path):
    """The check compares with transformers' tokenizer of the source: a tokenizer.json written with the other
    casing than the one decided is caught."""
    from tokenizers import BertWordPieceTokenizer

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(UNCASED_VOCAB, src / "vocab.txt")
    tokens = UNCASED_VOCAB.read_text(encoding="utf-8").splitlines()
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    BertWordPieceTokenizer(str(src / "vocab.txt"), lowercase=True).save(str(good))
    BertWordPieceTokenizer(str(src / "vocab.txt"), lowercase=False).save(str(bad))
    kw = dict(do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True, vocab_tokens=tokens,
              special=special)
    assert check_pieces(good, src, **kw)["equal"] is True
    with pytest.raises(VerificationError, match=r"split 'The Quick Brown Fox.*' differently: ours \[\('\[UNK\]'"):
        check_pieces(bad, src, **kw)
    small = tmp_path / "small"
    small.mkdir()
    shutil.copyfile(SMALL_VOCAB, small / "vocab.txt")
    with pytest.raises(VerificationError, match="differently"):  # same casing, another vocabulary: the ids differ
        check_pieces(good, small, **kw)


# ------------------------------------------------------------------------------------------ the checksum
def _variant(src: Path, dst: Path, **config) -> Path:
    """A copy of the checkpoint ``src`` with the same weights and ``config`` changed in config.json."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_the_checksum_covers_the_config_and_the_special_tokens(tiny_hf, tmp_path):
    from mlm_export.checkpoint import CHECKSUM_SCHEME, load_checkpoint

    base = load_checkpoint(tiny_hf)
    relu = load_checkpoint(_variant(tiny_hf, tmp_path / "relu", hidden_act="relu"))
    eps = load_checkpoint(_variant(tiny_hf, tmp_path / "eps", layer_norm_eps=1.0))
    unk = load_checkpoint(tiny_hf)
    unk.special_tokens = {**unk.special_tokens, "unk": "[unused0]"}
    sums = [c.checksum() for c in (base, relu, eps, unk)]
    assert CHECKSUM_SCHEME == 2 and len(set(sums)) == 4, "same weights, other config: other checksums"
    # the earlier scheme (still readable in old manifests) did not tell them apart
    assert len({c.checksum(scheme=1) for c in (base, relu, eps, unk)}) == 1
    assert load_checkpoint(tiny_hf).checksum() == sums[0], "deterministic"


def test_exports_differing_only_in_config_never_share_scores(tiny_hf, tiny_export, tmp_path, capsys):
    """The same weights with hidden_act=relu score differently; its export gets its own checksum, so a score
    cache filled by one never answers the other and check refuses to compare them."""
    from mlm_export import export

    from mlm_scorer.model_dir import ModelDir

    relu = tmp_path / "relu_export"
    export(_variant(tiny_hf, tmp_path / "relu_hf", hidden_act="relu"), relu, log=lambda m: None, top_k=5)
    a, b = ModelDir.open(tiny_export), ModelDir.open(relu)
    assert a.checksum != b.checksum and b.manifest["checksum_scheme"] == 2
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat sat on the mat\na dog ran\n")
    cache = tmp_path / "cache"
    assert main([str(tsv), "-o", str(tmp_path / "a.parquet"), "--model", str(tiny_export), "--cache", str(cache),
                 "-q"]) == 0
    assert main([str(tsv), "-o", str(tmp_path / "b.parquet"), "--model", str(relu), "--cache", str(cache)]) == 0
    assert "hit rate 0.0% (0/2)" in capsys.readouterr().err
    pa_, pb = (pq.read_table(tmp_path / f"{x}.sentences.parquet").column("pll").to_pylist() for x in "ab")
    assert all(abs(x - y) > 1e-3 for x, y in zip(pa_, pb)), (pa_, pb)
    assert main(["check", str(tmp_path / "b.parquet"), "--baseline", str(tmp_path / "a.parquet")]) == 2
    assert "scored differently (model checksum" in capsys.readouterr().err
