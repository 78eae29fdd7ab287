"""The exporter: what it accepts, what it refuses (with what was found and what is needed), what it
writes (signatures, manifest, tokenizer) and that it verifies itself."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_hf_bert

from mlm_export import CheckpointError, export, load_checkpoint
from mlm_scorer.errors import ModelError
from mlm_scorer.model_dir import ModelDir


def test_signatures_manifest_and_tokenizer(tiny_export):
    import tensorflow as tf

    vdir = tiny_export / "1"
    m = json.loads((vdir / "mlm_scorer.json").read_text())
    assert m["verification"]["max_abs_diff"] <= 1e-4 and m["top_k"] == 5
    assert m["versions"]["tensorflow-cpu"] and m["source"]["kind"] == "huggingface"
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (vdir / "tokenizer").iterdir()}
    loaded = tf.saved_model.load(str(vdir))
    sig = loaded.signatures["serving_default"]
    inputs = sig.structured_input_signature[1]
    assert set(inputs) == {"input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids"}
    assert all(s.dtype == tf.int32 and s.shape.as_list() == [None, None] for s in inputs.values())
    outs = sig.structured_outputs
    assert outs["masked_lm_log_probs"].shape.as_list() == [None, None]
    assert outs["top_k_ids"].dtype == tf.int32 and outs["top_k_log_probs"].shape.as_list() == [None, None, 5]
    assert set(loaded.signatures["top_k"].structured_outputs) == {"top_k_ids", "top_k_log_probs"}
    assert m["graph_revision"] >= 2 and set(m["signature"]) == {"serving_default", "top_k", "log_prob"}
    # log_prob (the scorer's path without top-k) answers what serving_default answers, unused slots included
    feed = {"input_ids": [[2, 7, 8, 9, 3], [2, 10, 3, 0, 0]], "input_mask": [[1] * 5, [1, 1, 1, 0, 0]],
            "segment_ids": [[0] * 5] * 2, "masked_lm_positions": [[1, 3], [2, 0]], "masked_lm_ids": [[7, 9], [10, 0]]}
    feed = {k: tf.constant(v, tf.int32) for k, v in feed.items()}
    lp = loaded.signatures["log_prob"](**feed)
    assert set(lp) == {"masked_lm_log_probs"}
    want = sig(**feed)["masked_lm_log_probs"].numpy()
    np.testing.assert_allclose(lp["masked_lm_log_probs"].numpy(), want, atol=1e-5)
    assert want[1, 1] == 0.0 and (want[:, 0] < 0).all()
    # and a transformers tokenizer loads from the copy (a remote client can tokenize from it)
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(vdir / "tokenizer"))
    assert len(tok) == m["vocab_size"]


def test_saved_model_cli_shows_the_signature(tiny_export):
    cli = shutil.which("saved_model_cli") or str(Path(sys.executable).parent / "saved_model_cli")
    r = subprocess.run([cli, "show", "--dir", str(tiny_export / "1"), "--all"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "signature_def['serving_default']" in r.stdout and "masked_lm_positions" in r.stdout
    assert "top_k_log_probs" in r.stdout


def test_pytorch_bin_source_loads_without_pickled_code(tiny_hf, tmp_path):
    import torch

    src = tmp_path / "bin_model"
    make_hf_bert(src, safetensors=False)
    assert (src / "pytorch_model.bin").is_file() and not (src / "model.safetensors").exists()
    a = load_checkpoint(src)
    b = load_checkpoint(tiny_hf)
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:  # same seed, same weights, whichever file format
        assert (a.weights[k] == b.weights[k]).all(), k
    # a pickle that would run code is refused by the restricted unpickler
    evil = tmp_path / "evil"
    shutil.copytree(src, evil)

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": Boom()}, evil / "pytorch_model.bin",
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_refuses_other_architectures(tiny_hf, tmp_path):
    d = _copy(tiny_hf, tmp_path / "roberta")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "roberta"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'roberta', but the weights are not a roberta model's"):
        load_checkpoint(d)
    cfg["model_type"] = "gpt2"  # a family mlm-scorer does not export (test_families: the full message)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'.*Supported: BERT"):
        load_checkpoint(d)


def test_refuses_missing_mlm_head(tmp_path):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bare"
    BertModel(BertConfig(vocab_size=343, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(str(d))
    shutil.copyfile(Path(__file__).parent / "data" / "small_vocab.txt", d / "vocab.txt")
    with pytest.raises(CheckpointError, match=r"no masked-LM head weights \(cls.predictions"):
        load_checkpoint(d)


def test_refuses_vocab_mismatch(tiny_hf, tmp_path):
    d = _copy(tiny_hf, tmp_path / "badvocab")
    (d / "vocab.txt").write_text((d / "vocab.txt").read_text() + "extra1\nextra2\n")
    with pytest.raises(CheckpointError, match="vocab.txt has 345 tokens but the model's vocab_size is 343"):
        load_checkpoint(d)


def test_refuses_unknown_directories_and_missing_weights(tiny_hf, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face BERT directory"):
        load_checkpoint(tmp_path / "empty")
    d = _copy(tiny_hf, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights: needs model.safetensors or pytorch_model.bin"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint("./no/such/dir")


def test_hub_id_without_network_says_how_to_go_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="point --model at a local checkpoint"):
        load_checkpoint("some-org/some-bert", cache_dir=tmp_path)


def test_verification_fails_a_wrong_export(tiny_hf, tmp_path, monkeypatch):
    """The self-check compares against the source weights: a graph that disagrees must fail the export."""
    from mlm_export import verify

    ckpt = load_checkpoint(tiny_hf)
    orig = verify.reference_log_probs

    def skewed(*a, **k):
        return orig(*a, **k) + 1e-3
    monkeypatch.setattr(verify, "reference_log_probs", skewed)
    from mlm_export.saved_model import export_checkpoint

    with pytest.raises(verify.VerificationError, match="max |Δ log-prob|"):
        export_checkpoint(ckpt, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out" / "1").exists(), "a failed export leaves no version directory"


def test_export_refuses_to_overwrite_and_versions(tiny_export, tiny_hf):
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(tiny_hf, tiny_export, version=1, log=lambda m: None)


def test_model_dir_validates_manifest(tiny_export, tmp_path):
    d = _copy(tiny_export, tmp_path / "m")
    man = d / "1" / "mlm_scorer.json"
    m = json.loads(man.read_text())
    m["top_k"] = "five"
    man.write_text(json.dumps(m))
    with pytest.raises(ModelError, match="key 'top_k' should be int"):
        ModelDir.open(d)
    man.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelDir.open(d)
    d2 = _copy(tiny_export, tmp_path / "m2")
    (d2 / "1" / "tokenizer" / "vocab.txt").write_text("tampered\n")
    with pytest.raises(ModelError, match="does not match the manifest's vocab_sha256"):
        ModelDir.open(d2)
    with pytest.raises(ModelError, match="not an mlm-scorer export"):
        ModelDir.open(tmp_path)


def test_checkpoint_model_is_exported_once_into_cache(tiny_hf, tmp_path, capsys):
    from mlm_scorer.cli import main

    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nThe cat sat.\n")
    args = [str(tsv), "-o", str(tmp_path / "o.parquet"), "--model", str(tiny_hf), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    assert "exporting" in capsys.readouterr().err
    assert main(args) == 0
    assert "exporting" not in capsys.readouterr().err
    assert len(list((tmp_path / "c" / "exports").glob("*/1/mlm_scorer.json"))) == 1


def _graph_op_types(concrete_fn) -> set[str]:
    gd = concrete_fn.graph.as_graph_def()
    return {n.op for n in gd.node} | {n.op for f in gd.library.function for n in f.node_def}


def test_layer_norm_forms_compute_the_same_function(tiny_hf, tiny_export, tmp_path):
    """The default (fused) LayerNorm and --layer-norm plain: the same log-probs and top-k, each recorded in its
    manifest; the default graph holds the FusedBatchNormV3 form that oneDNN's rewrite runs as one op."""
    import tensorflow as tf

    plain = export(tiny_hf, tmp_path / "plain", layer_norm="plain", log=lambda m: None)
    fused = tiny_export / "1"
    assert json.loads((fused / "mlm_scorer.json").read_text())["layer_norm"] == "fused"
    assert json.loads((plain / "mlm_scorer.json").read_text())["layer_norm"] == "plain"
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 60, size=(4, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # padding in one row
    ids[1, 6:] = 0
    feed = {"input_ids": ids, "input_mask": mask, "segment_ids": np.zeros_like(ids),
            "masked_lm_positions": np.array([[1, 4], [2, 5], [3, 0], [7, 8]], np.int32),
            "masked_lm_ids": np.array([[11, 12], [13, 14], [15, 0], [16, 17]], np.int32)}
    feed = {k: tf.constant(v) for k, v in feed.items()}
    sig_f = tf.saved_model.load(str(fused)).signatures["serving_default"]
    sig_p = tf.saved_model.load(str(plain)).signatures["serving_default"]
    out_f, out_p = sig_f(**feed), sig_p(**feed)
    np.testing.assert_allclose(out_f["masked_lm_log_probs"].numpy(), out_p["masked_lm_log_probs"].numpy(), atol=1e-5)
    np.testing.assert_allclose(out_f["top_k_log_probs"].numpy(), out_p["top_k_log_probs"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(out_f["top_k_ids"].numpy(), out_p["top_k_ids"].numpy())
    assert "FusedBatchNormV3" in _graph_op_types(sig_f)
    assert "FusedBatchNormV3" not in _graph_op_types(sig_p)
    with pytest.raises(ValueError, match="layer_norm must be one of"):
        export(tiny_hf, tmp_path / "bad", layer_norm="nope", log=lambda m: None)
    assert not any((tmp_path / "bad").glob("1*"))  # nothing half-written


# ------------------------------------------------------------------------ versions, permissions, positions
def test_an_existing_version_is_refused_before_the_checkpoint_is_loaded(tiny_export, tiny_hf, tmp_path, capsys,
                                                                         monkeypatch):
    import mlm_export.checkpoint as checkpoint
    from mlm_export.cli import main as export_main

    def never(*a, **k):
        raise AssertionError("the checkpoint was loaded before the refusal")

    monkeypatch.setattr(checkpoint, "load_checkpoint", never)
    assert export_main([str(tiny_hf), str(tiny_export)]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_export / '1'} already exists" in err and "--overwrite" in err and "--onnx" in err, err
    with pytest.raises(FileExistsError, match="already exists"):
        export(tiny_hf, tiny_export, log=lambda m: None)
    # --overwrite replaces only an export this program wrote
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.tex").write_text("x")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "1").symlink_to(tmp_path / "victim")
    assert export_main([str(tiny_hf), str(tmp_path / "base"), "--overwrite"]) == 2
    assert "not an export made by mlm-export" in capsys.readouterr().err
    assert (tmp_path / "victim" / "thesis.tex").read_text() == "x"


def test_export_directories_are_readable_by_other_users(tiny_hf, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        v = export(tiny_hf, tmp_path / "m", log=lambda m: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(v.stat().st_mode) == 0o755, oct(v.stat().st_mode)
    for p in v.rglob("*"):
        assert p.stat().st_mode & 0o004, f"{p} is not readable by others"


def test_onnx_is_added_to_an_existing_version_not_copied_into_a_new_one(tiny_export, tiny_hf, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    base = _copy(tiny_export, tmp_path / "m")
    pb = (base / "1" / "saved_model.pb").stat()
    code = "import sys; from mlm_export.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code, str(tiny_hf), str(base), "--onnx", "--top-k", "9"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "was exported with --top-k 5" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-c", code + "\nassert 'tensorflow' not in sys.modules", str(tiny_hf),
                        str(base), "--onnx"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(base / "1") and "adding model.onnx to it" in p.stderr
    assert sorted(x.name for x in base.iterdir() if x.name.isdigit()) == ["1"], "no new version"
    assert (base / "1" / "model.onnx").is_file() and (base / "1" / "saved_model.pb").stat().st_ino == pb.st_ino
    assert json.loads((base / "1" / "mlm_scorer.json").read_text())["onnx"]["verification"]["max_abs_diff"] <= 1e-4


def test_int8_config_accurate_writes_that_configuration_into_an_existing_version(tiny_export, tiny_hf, tmp_path):
    """--int8-config accurate implies --quantize int8; the manifest names the configuration the file has, and
    the onnx engine opens it (its probe replayed); --int8-config outside the choices is a usage error."""
    pytest.importorskip("onnxruntime")
    from mlm_export.cli import main

    from mlm_scorer.engines import get_engine
    from mlm_scorer.model_dir import ModelDir

    base = _copy(tiny_export, tmp_path / "m")
    assert main([str(tiny_hf), str(base), "--int8-config", "accurate", "-q"]) == 0
    m = json.loads((base / "1" / "mlm_scorer.json").read_text())
    cfg = m["reduced_precision"]["onnx-int8"]["config"]
    assert cfg["activation_split"] is True and cfg["weight_rounding"] == "gptq" and cfg["saturation_free"] is True
    assert m["onnx"]["int8"]["config"] == cfg
    eng = get_engine("onnx", model=ModelDir.open(base), precision="int8", threads=1)
    assert eng.int8_check["mean_abs_diff"] <= eng.int8_check["bound"]
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_hf), str(base), "--int8-config", "exact"])
    assert exc.value.code == 2


def _nan_positions(src: Path, dst: Path, first: int) -> Path:
    """A copy of the checkpoint ``src`` whose position embeddings are NaN from row ``first`` on."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    key = next(k for k in state if k.endswith("position_embeddings.weight"))
    state[key][first:] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    assert torch.isnan(state[key]).any()
    return dst


def test_verification_covers_every_position_up_to_max_seq_length(tiny_hf, tmp_path):
    """NaN in position embeddings 40-63 (of 64): the short probe inputs never reach them, the full-length copy
    does, and the export is refused naming the damaged rows; an export that stops before them is fine."""
    from mlm_export.verify import VerificationError

    hf = _nan_positions(tiny_hf, tmp_path / "hf", 40)
    with pytest.raises(VerificationError, match=r"position_embeddings \(\d+ values; rows 40-63\)"):
        export(hf, tmp_path / "m", log=lambda m: None)
    assert not (tmp_path / "m" / "1").exists()
    v = export(hf, tmp_path / "short", max_seq_length=40, log=lambda m: None)
    assert json.loads((v / "mlm_scorer.json").read_text())["verification"]["positions_checked"] == 40
