"""The default engine ("auto"): ONNX Runtime on the export's model.onnx where it can run, else the SavedModel;
the precision asked for picks the engine that has it. mlm-export writes model.onnx by default, so a
default export runs on ONNX Runtime, with the SavedModel's numbers (both equal transformers within 1e-4:
test_fast_engines.py)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import read_outputs, write_tsv

from mlm_scorer.engines import base
from mlm_scorer.engines.base import choose_engine
from mlm_scorer.model_dir import ModelDir

SENTENCES = ["The cat sat on the mat.", "Running dogs walked; people read books?", "ab"]


def _model(tmp_path: Path, onnx_file: bool):
    d = tmp_path / ("with" if onnx_file else "without")
    d.mkdir()
    if onnx_file:
        (d / "model.onnx").write_bytes(b"")
    return SimpleNamespace(path=d)


def test_choose_engine(tmp_path, monkeypatch):
    with_onnx, without = _model(tmp_path, True), _model(tmp_path, False)
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    assert choose_engine("torch", with_onnx, {"threads": 2}) == ("torch", {"threads": 2})  # not auto: as given
    assert choose_engine("auto", with_onnx, {}) == ("onnx" if have_ort else "saved_model", {})
    assert choose_engine("auto", without, {}) == ("saved_model", {})
    assert choose_engine("auto", without, {"threads": "2", "streams": "1"}) == \
        ("saved_model", {"intra_op_threads": "2", "streams": "1"})
    assert choose_engine("auto", without, {"precision": "fp32", "device": "cpu"}) == ("saved_model", {})
    assert choose_engine("auto", with_onnx, {"intra_op_threads": "1"})[0] == "saved_model"  # its own option
    assert choose_engine("auto", without, {"precision": "int8"}) == ("onnx", {"precision": "int8"})
    assert choose_engine("auto", without, {"precision": "bf16"})[0] == "torch"
    assert choose_engine("auto", with_onnx, {"device": "cuda:1"})[0] == "torch"
    assert choose_engine("auto", without, {"engine_file": "m.plan"})[0] == "tensorrt"
    real = importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))
    assert choose_engine("auto", with_onnx, {}) == ("saved_model", {})  # onnxruntime not installed


@pytest.fixture(scope="module")
def cli_export(tiny_hf, tmp_path_factory) -> Path:
    """``mlm-export`` with its defaults: the SavedModel and model.onnx."""
    pytest.importorskip("onnxruntime")
    from mlm_export.cli import main

    out = tmp_path_factory.mktemp("cli_export") / "export"
    assert main([str(tiny_hf), str(out), "-q"]) == 0
    assert (out / "1" / "model.onnx").is_file() and not (out / "1" / "model.int8.onnx").exists()
    return out


def test_mlm_export_writes_model_onnx_unless_told_not_to(cli_export, tiny_hf, tmp_path):
    from mlm_export.cli import main

    m = json.loads((cli_export / "1" / "mlm_scorer.json").read_text())
    assert m["onnx"]["verification"]["max_abs_diff"] <= 1e-4 and m["onnx"]["writer"].startswith("onnx.helper")
    assert main([str(tiny_hf), str(tmp_path / "plain"), "--no-onnx", "-q"]) == 0
    assert not (tmp_path / "plain" / "1" / "model.onnx").exists()


def test_a_default_run_uses_onnx_runtime_with_the_saved_models_numbers(cli_export, tmp_path):
    from mlm_scorer.pipeline import score_file

    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), s] for i, s in enumerate(SENTENCES)])
    auto = score_file(tsv, tmp_path / "auto.parquet", model=cli_export, id_column="id", mode="token")
    assert auto.engine == "onnx" and auto.scored == len(SENTENCES)
    sm = score_file(tsv, tmp_path / "sm.parquet", model=cli_export, engine="saved_model", id_column="id", mode="token")
    assert sm.engine == "saved_model"
    a, b = read_outputs(tmp_path / "auto.parquet")[0], read_outputs(tmp_path / "sm.parquet")[0]
    assert [w["word"] for w in a] == [w["word"] for w in b]
    assert np.abs(np.array([w["log_prob"] for w in a]) - np.array([w["log_prob"] for w in b])).max() <= 1e-4
    # an export without model.onnx: the SavedModel
    plain = tmp_path / "plain"
    shutil.copytree(cli_export, plain, ignore=shutil.ignore_patterns("*.onnx"))
    assert score_file(tsv, tmp_path / "p.parquet", model=plain, id_column="id").engine == "saved_model"


def test_precision_int8_without_an_engine_runs_onnx_int8(cli_export, tiny_hf, tmp_path, capsys):
    """--precision int8 alone: the engine that has it (onnx), on the int8 file built into the export."""
    from mlm_export import load_checkpoint
    from mlm_export.to_onnx import write_onnx

    from mlm_scorer.cli import main

    exp = shutil.copytree(cli_export, tmp_path / "export")
    write_onnx(exp / "1", load_checkpoint(tiny_hf), quantize="int8", log=lambda m: None)
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), s] for i, s in enumerate(SENTENCES)])
    summary = tmp_path / "s.json"
    rc = main([str(tsv), "-o", str(tmp_path / "o.parquet"), "--model", str(exp), "--id-column", "id",
               "--precision", "int8", "--summary-json", str(summary)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads(summary.read_text())
    assert s["engine"] == "onnx"
    import pyarrow.parquet as pq

    assert json.loads(pq.read_schema(tmp_path / "o.parquet").metadata[b"mlm_scorer"])["numerics"].startswith("onnx-int8-")
    assert ModelDir.open(exp).manifest["reduced_precision"]["onnx-int8"]["config"]["activations"] == "row"
