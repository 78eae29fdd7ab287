"""Opening an export verifies that its weights are the manifest's: ``variables/`` (or ``model.onnx``) copied
from another export of the same shape is refused by every in-process engine, so its scores are never
labelled with the other model's checksum nor mixed into that model's score cache. A manifest whose
max_seq_length exceeds the model's positions is refused at open, with the reason."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import make_hf_bert

from mlm_scorer.cli import main
from mlm_scorer.engines.base import get_engine
from mlm_scorer.errors import ModelError
from mlm_scorer.model_dir import MANIFEST_NAME, ModelDir


@pytest.fixture(scope="module")
def other_export(tmp_path_factory) -> Path:
    """An export of the same shape as ``tiny_export`` (same config, vocabulary) with other weights."""
    from mlm_export import export

    hf = make_hf_bert(tmp_path_factory.mktemp("other_hf"), seed=11)
    base = tmp_path_factory.mktemp("other_export")
    export(hf, base, log=lambda m: None, top_k=5)
    return base


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _swap_variables(export: Path, donor: Path) -> None:
    shutil.rmtree(export / "1" / "variables")
    shutil.copytree(donor / "1" / "variables", export / "1" / "variables")


def _edit_manifest(export: Path, **changes) -> None:
    path = export / "1" / MANIFEST_NAME
    m = json.loads(path.read_text())
    for key, value in changes.items():
        target = m
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(json.dumps(m))


def test_swapped_variables_are_refused_and_never_mix_with_the_cache(tiny_export, other_export, tmp_path, capsys):
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat sat on the mat\na dog ran\n")
    swapped = _copy(tiny_export, tmp_path / "swapped")
    _swap_variables(swapped, other_export)
    cache = tmp_path / "cache"
    base = ["-q", "--cache", str(cache)]
    assert main([str(tsv), "-o", str(tmp_path / "a.parquet"), "--model", str(tiny_export), *base]) == 0
    before = (cache / "scores.sqlite").stat().st_mtime_ns
    capsys.readouterr()
    # one sentence the cache does not hold: the engine must open, and its weights are refused before they
    # score anything (a run the cache answers whole opens no engine: its scores were computed by the
    # verified weights when they were cached)
    tsv.write_text("text\nthe cat sat on the mat\na dog ran\na bird sang\n")
    code = main([str(tsv), "-o", str(tmp_path / "b.parquet"), "--model", str(swapped), *base])
    err = capsys.readouterr().err
    assert code == 4, err
    assert f"{swapped / '1' / 'variables'}" in err and "not those of" in err and "Re-export" in err, err
    assert not (tmp_path / "b.parquet").exists()
    assert (cache / "scores.sqlite").stat().st_mtime_ns == before, "nothing was written to the cache"


def test_a_full_cache_hit_notices_swapped_variables_without_scoring(tiny_export, other_export, tmp_path, capsys):
    """A run the cache answers whole opens no engine, so no identity probe runs; the cache's stamp of the
    export's files (size, mtime, inode) as last verified tells it the weights changed, and the engine opens
    to verify them before any entry is used."""
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat sat on the mat\na dog ran\n")
    model = _copy(tiny_export, tmp_path / "model")
    cache = tmp_path / "cache"
    base = ["--model", str(model), "--cache", str(cache)]
    assert main([str(tsv), "-o", str(tmp_path / "a.parquet"), *base]) == 0
    assert main([str(tsv), "-o", str(tmp_path / "b.parquet"), *base, "--summary-json", str(tmp_path / "b.json")]) == 0
    assert "hit rate 100.0% (2/2)" in capsys.readouterr().err  # unchanged export: the stamp matches ...
    assert json.loads((tmp_path / "b.json").read_text())["batch_tokens"] == 0  # ... and no engine was opened
    _swap_variables(model, other_export)
    code = main([str(tsv), "-o", str(tmp_path / "c.parquet"), *base, "-q"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert f"{model / '1' / 'variables'}" in err and "not those of" in err, err
    assert not (tmp_path / "c.parquet").exists()


@pytest.mark.parametrize("engine", ["saved_model", "torch"])
def test_every_in_process_engine_verifies_the_weights(engine, tiny_export, other_export, tmp_path):
    if engine == "torch":
        pytest.importorskip("torch")
    md = ModelDir.open(tiny_export)
    with get_engine(engine, model=md) as eng:  # the genuine export passes, with fp32 agreement
        assert eng.identity_diff < 1e-4
    swapped = _copy(tiny_export, tmp_path / "swapped")
    _swap_variables(swapped, other_export)
    with pytest.raises(ModelError, match="not those of"):
        get_engine(engine, model=ModelDir.open(swapped))


def test_onnx_engine_verifies_model_onnx(tiny_export, tiny_hf, other_export, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from mlm_export import load_checkpoint
    from mlm_export.to_onnx import write_onnx

    good = _copy(tiny_export, tmp_path / "good")
    write_onnx(good / "1", load_checkpoint(tiny_hf), log=lambda m: None)
    with get_engine("onnx", model=ModelDir.open(good)) as eng:
        assert eng.identity_diff < 1e-4
    bad = _copy(good, tmp_path / "bad")
    # the ONNX file of the other export: same graph, other weights
    other = _copy(other_export, tmp_path / "other")
    from mlm_export.to_onnx import write_onnx as w

    w(other / "1", load_checkpoint(make_hf_bert(tmp_path / "other_hf", seed=11)), log=lambda m: None)
    shutil.copyfile(other / "1" / "model.onnx", bad / "1" / "model.onnx")
    with pytest.raises(ModelError, match="model.onnx are not those of"):
        get_engine("onnx", model=ModelDir.open(bad))


def test_an_export_without_identity_probe_is_refused_with_the_fix(tiny_export, tmp_path):
    old = _copy(tiny_export, tmp_path / "old")
    path = old / "1" / MANIFEST_NAME
    m = json.loads(path.read_text())
    del m["identity_probe"]
    path.write_text(json.dumps(m))
    with pytest.raises(ModelError, match="records no identity_probe.*re-export"):
        get_engine("saved_model", model=ModelDir.open(old))


def test_max_seq_length_above_the_positions_is_refused_at_open(tiny_export, tmp_path, capsys):
    # the tiny model has 64 positions
    edited = _copy(tiny_export, tmp_path / "edited")
    _edit_manifest(edited, max_seq_length=128)
    with pytest.raises(ModelError, match="max_seq_length 128 exceeds the 64 positions"):
        ModelDir.open(edited)
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat\n")
    code = main([str(tsv), "-o", str(tmp_path / "o.parquet"), "--model", str(edited), "-q"])
    err = capsys.readouterr().err
    assert code == 4 and "exceeds the 64 positions" in err and "--max-seq-length 64" in err, err
    # the config edited too: the graph itself is read
    both = _copy(tiny_export, tmp_path / "both")
    _edit_manifest(both, max_seq_length=128, **{"config.max_position_embeddings": 128})
    md = ModelDir.open(both)
    for engine in ("saved_model", "torch"):
        with pytest.raises(ModelError, match="exceeds the 64 positions .*position_embeddings"):
            get_engine(engine, model=md)


def test_positions_count_the_familys_offset(fake_export):
    """RoBERTa's table has 2 rows more than it has positions (position_offset 2); rotary ESM has no table."""
    path = fake_export / "1" / MANIFEST_NAME
    m = json.loads(path.read_text())
    for config, ok, bad in (({"max_position_embeddings": 514, "position_offset": 2}, 512, 513),
                            ({"max_position_embeddings": 1026, "position_embedding_type": "rotary",
                              "position_offset": 2}, 1026, 1027)):
        for length, refused in ((ok, False), (bad, True)):
            path.write_text(json.dumps({**m, "config": config, "max_seq_length": length}))
            if refused:
                with pytest.raises(ModelError, match=f"max_seq_length {length} exceeds the {ok} positions"):
                    ModelDir.open(fake_export)
            else:
                assert ModelDir.open(fake_export).max_seq_length == length
