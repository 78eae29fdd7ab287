"""Quiet by default and start-up only for what must be scored: a plain run's stderr holds no TensorFlow
line (mlm-score and mlm-export; -v shows them), and a run the score cache answers whole, or an empty
input, never imports TensorFlow or another engine runtime."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_outputs, write_tsv

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.tsv"
RUNTIMES = ("tensorflow", "onnxruntime", "torch", "transformers")
TF_MARKS = ("port.cc", "absl::InitializeLog", "cpu_feature_guard", "oneDNN")  # what TensorFlow 2.21 prints


def _env() -> dict:
    """This environment without TF_CPP_MIN_LOG_LEVEL (conftest sets it; a user's plain shell has none)."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env or _env(), timeout=300)


def tensorflow_startup_lines(env=None) -> list[str]:
    """What TensorFlow itself prints on stderr when it starts and runs one op in a plain shell, on this
    machine. It depends on the CPU: "oneDNN custom operations are on" only where TensorFlow enables oneDNN
    by default (CPUs with AVX512-VNNI, AVX512-BF16 or AMX), the cpu_feature_guard note only where the CPU has
    instructions the wheel was not built for. Stable parts only (no timestamps or thread ids)."""
    p = _run("-c", "import tensorflow as tf; tf.constant(1.0) + 1.0", env=env)
    assert p.returncode == 0, p.stderr
    return [line.split("] ", 1)[1] if "] " in line else line for line in p.stderr.splitlines() if line.strip()]


def test_plain_run_has_no_tensorflow_lines_on_stderr(tiny_export, tiny_hf, tmp_path):
    p = _run("-m", "mlm_scorer", str(SAMPLE), "-o", str(tmp_path / "a.parquet"), "--model", str(tiny_export))
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    # only our own lines (off a terminal: the final progress line and the summary)
    assert [line.split(":")[0].split(" ")[0] for line in lines] == ["progress", "scored"], p.stderr
    assert "with saved_model" in p.stderr, p.stderr  # no model.onnx in this export: the SavedModel ran
    # mlm-export: only its own notes (casing evidence, verification); the path on stdout
    e = _run("-m", "mlm_export.cli", str(tiny_hf), str(tmp_path / "export"))
    assert e.returncode == 0, e.stderr
    assert e.stdout.strip() == str(tmp_path / "export" / "1")
    assert "verified " in e.stderr and not any(m in e.stderr for m in TF_MARKS), e.stderr
    # mlm-score --model CHECKPOINT exports it into the cache first: the same notes, still no TensorFlow line
    i = _run("-m", "mlm_scorer", str(SAMPLE), "-o", str(tmp_path / "i.parquet"), "--model", str(tiny_hf),
             "--cache-dir", str(tmp_path / "cache"))
    assert i.returncode == 0, i.stderr
    assert "with onnx" in i.stderr, i.stderr  # the default engine on the cached export, model.onnx written into it
    assert "exporting " in i.stderr and "verified " in i.stderr and not any(m in i.stderr for m in TF_MARKS), i.stderr


def test_verbose_run_shows_what_tensorflow_prints(tiny_export, tmp_path):
    """-v shows TensorFlow's own lines, so the filter of a plain run (above) is what hid them; and a user who
    sets TF_CPP_MIN_LOG_LEVEL decides what TensorFlow shows. What TensorFlow prints depends on the CPU, so
    it is read first from a bare TensorFlow process on this machine."""
    raw = tensorflow_startup_lines()
    if not raw:
        pytest.skip("TensorFlow prints no start-up line on this CPU: there is nothing for -v to show (the plain "
                    "runs are checked in test_plain_run_has_no_tensorflow_lines_on_stderr)")
    v = _run("-m", "mlm_scorer", str(SAMPLE), "-o", str(tmp_path / "b.parquet"), "--model", str(tiny_export), "-v")
    assert v.returncode == 0 and all(line in v.stderr for line in raw), (raw, v.stderr)
    user_env = {**_env(), "TF_CPP_MIN_LOG_LEVEL": "0"}
    shown = tensorflow_startup_lines(user_env)
    u = _run("-m", "mlm_scorer", str(SAMPLE), "-o", str(tmp_path / "c.parquet"), "--model", str(tiny_export), "-q",
             env=user_env)
    assert u.returncode == 0 and shown and all(line in u.stderr for line in shown), (shown, u.stderr)


_PROBE = """
import json, sys
from mlm_scorer import score_file
s = score_file(sys.argv[1], sys.argv[2], model=sys.argv[3], id_column=sys.argv[4] or None,
               score_cache=sys.argv[5] or None)
print(json.dumps({"loaded": sorted({m.split(".")[0] for m in sys.modules} & set(%r)), "rows": s.rows,
                  "hits": s.cache_hits, "copies": s.copies, "load_seconds": s.load_seconds}))
""" % (RUNTIMES,)


def _probe(*args: str) -> dict:
    p = _run("-c", _PROBE, *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_a_full_cache_hit_or_an_empty_input_imports_no_engine(tiny_export, tmp_path):
    cache = tmp_path / "cache"
    first = _probe(str(SAMPLE), str(tmp_path / "a.parquet"), str(tiny_export), "id", str(cache))
    assert first["loaded"] == ["tensorflow"] and first["copies"] > 0  # the SavedModel engine ran
    again = _probe(str(SAMPLE), str(tmp_path / "b.parquet"), str(tiny_export), "id", str(cache))
    assert again["loaded"] == [] and again["copies"] == 0 and again["hits"] == 29  # 30 rows, one duplicate
    assert read_outputs(tmp_path / "b.parquet") == read_outputs(tmp_path / "a.parquet")
    empty = write_tsv(tmp_path / "empty.tsv", [])
    none = _probe(str(empty), str(tmp_path / "c.parquet"), str(tiny_export), "id", "")
    assert none["loaded"] == [] and none["rows"] == 0
    assert read_outputs(tmp_path / "c.parquet") == ([], [])
