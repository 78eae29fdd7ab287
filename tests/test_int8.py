"""int8 that is right on the CPU that runs it, or refused with the real cause.

* The export measures the int8 file on its own CPU and refuses (writes nothing) past its limits.
* The onnx engine replays the recorded probe at open: an int8 file whose drift here exceeds what the
  exporter measured is refused, and the message tells a file that was replaced or damaged (its SHA-256
  differs) from one this CPU computes differently (the cause named: e.g. no VNNI).
* On a CPU without VNNI (an AVX2 CPU emulated by ``qemu-x86_64 -cpu Haswell``: ONNX Runtime dispatches on
  the emulated CPUID), a file quantized with 8-bit activations and weights saturates and is refused with
  that cause, while the default configuration (7-bit weights: it cannot saturate) is accepted with
  the same drift as on this machine. Skipped with the reason where qemu-x86_64 is absent
  (``scripts/ci_system_deps.sh`` installs it).
* Activations are quantized per token row: a copy's int8 numbers do not depend on its batch.
* The accurate configuration (``--int8-config accurate``): activations in two 7-bit parts, 8-bit weights
  rounded with GPTQ. Its parts add up to the product they stand for (checked against NumPy), GPTQ lowers
  the output error it minimises, and on AntiBERTy's real weights the export records a mean drift within
  0.005 nats per token, which the scoring run accepts and keeps to on real antibody domains.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlm_scorer.engines import Batch, get_engine
from mlm_scorer.errors import ModelError
from mlm_scorer.model_dir import MANIFEST_NAME, ModelDir

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mlm-scorer[onnx]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mlm-scorer[onnx]')")

ROOT = Path(__file__).resolve().parents[1]
#: 8-bit activations per tensor and 8-bit weights, every dense layer quantized: the arithmetic of
#: ONNX Runtime's quantize_dynamic, which an earlier mlm-export wrote. Its products can saturate on AVX2.
SATURATING = dict(activations="tensor", activation_levels=255, weight_levels=127, keep_fp32=())


def _int8_copy(tiny_export, tiny_hf, dest: Path, **spec) -> Path:
    from mlm_export import load_checkpoint
    from mlm_export.onnx_graph import Int8Spec
    from mlm_export.to_onnx import write_onnx

    shutil.copytree(ModelDir.open(tiny_export).path, dest / "1")
    write_onnx(dest / "1", load_checkpoint(tiny_hf), quantize="int8", int8_spec=Int8Spec(**spec), log=lambda m: None)
    return dest


@pytest.fixture(scope="module")
def default_int8(tiny_export, tiny_hf, tmp_path_factory) -> Path:
    return _int8_copy(tiny_export, tiny_hf, tmp_path_factory.mktemp("int8_default"))


@pytest.fixture(scope="module")
def saturating_int8(tiny_export, tiny_hf, tmp_path_factory) -> Path:
    return _int8_copy(tiny_export, tiny_hf, tmp_path_factory.mktemp("int8_saturating"), **SATURATING)


def _manifest(d: Path) -> dict:
    return json.loads((d / "1" / MANIFEST_NAME).read_text())


def _edit_manifest(d: Path, fn) -> None:
    m = _manifest(d)
    fn(m)
    (d / "1" / MANIFEST_NAME).write_text(json.dumps(m))


def test_the_default_int8_file_cannot_saturate_and_records_its_probe(default_int8):
    rec = _manifest(default_int8)["reduced_precision"]["onnx-int8"]
    assert rec["config"]["saturation_free"] is True and rec["config"]["activations"] == "row"
    probe = rec["probe"]
    assert len(probe["input_ids"]) == 8 and np.shape(probe["fp32"]) == np.shape(probe["masked_lm_positions"])
    assert 0 < probe["mean_abs_diff"] < 0.15 and probe["cpu"] == rec["cpu"]
    eng = get_engine("onnx", model=ModelDir.open(default_int8), precision="int8")
    assert eng.int8_check["mean_abs_diff"] == pytest.approx(probe["mean_abs_diff"], abs=1e-5)


def test_an_int8_file_this_cpu_computes_differently_is_refused_with_that_cause(default_int8, tmp_path, monkeypatch):
    """Simulate a CPU whose int8 arithmetic is worse than the exporter's: the recorded drift is made far
    below what this CPU gives. The file is intact, so the cause is the CPU, and the message says so (and
    names VNNI where this CPU lacks it and the file can saturate)."""
    d = shutil.copytree(default_int8, tmp_path / "export")
    here = _manifest(d)["reduced_precision"]["onnx-int8"]["probe"]["mean_abs_diff"]

    def record_less(m):
        m["reduced_precision"]["onnx-int8"]["probe"]["mean_abs_diff"] = here / 100
        m["reduced_precision"]["onnx-int8"]["probe"]["cpu"] = "AVX512-VNNI"
    _edit_manifest(d, record_less)
    with pytest.raises(ModelError) as exc:
        get_engine("onnx", model=ModelDir.open(d), precision="int8")
    msg = str(exc.value)
    assert "computes this int8 file differently from the CPU that exported it (AVX512-VNNI)" in msg, msg
    assert f"int8 drifts {here:.3g} nats per token here" in msg and "is intact" in msg, msg
    assert "replaced or damaged" not in msg and "--precision fp32" in msg, msg

    # the same, where the CPU lacks VNNI and the file is not saturation-free: the cause is named
    from mlm_scorer.engines import cpu

    monkeypatch.setattr(cpu, "int8_exact", lambda: False)
    monkeypatch.setattr(cpu, "int8_class", lambda: "AVX2")
    _edit_manifest(d, lambda m: m["reduced_precision"]["onnx-int8"]["config"].update(saturation_free=False))
    with pytest.raises(ModelError, match=r"this CPU \(AVX2\) lacks VNNI: .* saturating 16-bit sum .* re-export with "
                                         r"the current mlm-export --quantize int8"):
        get_engine("onnx", model=ModelDir.open(d), precision="int8")


def test_a_damaged_int8_file_is_refused_as_damaged(default_int8, tmp_path):
    """Other weights in model.int8.onnx (the quantized weights scrambled, the file still loads): its drift
    is whole nats, its SHA-256 is not the recorded one: "replaced or damaged", not a CPU."""
    import onnx
    from onnx import numpy_helper

    d = shutil.copytree(default_int8, tmp_path / "export")
    path = d / "1" / "model.int8.onnx"
    m = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in m.graph.initializer:
        if init.name.endswith(".weight"):
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.reshape(-1)).reshape(w.shape), init.name))
    onnx.save(m, str(path))
    with pytest.raises(ModelError) as exc:
        get_engine("onnx", model=ModelDir.open(d), precision="int8")
    msg = str(exc.value)
    assert "differ from the ones recorded at export" in msg and "replaced or damaged" in msg, msg
    assert "lacks VNNI" not in msg and "computes this int8 file differently" not in msg, msg


def test_the_export_refuses_int8_past_its_limits_and_leaves_nothing(tiny_export, tiny_hf, tmp_path, monkeypatch):
    from mlm_export import load_checkpoint, to_onnx
    from mlm_export.verify import VerificationError

    vdir = tmp_path / "export" / "1"
    shutil.copytree(ModelDir.open(tiny_export).path, vdir)
    before = sorted(p.name for p in vdir.iterdir())
    manifest = (vdir / MANIFEST_NAME).read_text()
    monkeypatch.setattr(to_onnx, "INT8_MAX_MEAN_ABS_DIFF", 1e-6)
    with pytest.raises(VerificationError, match=r"int8 quantization drifts too far from fp32 on this CPU \(.*\): "
                                                r"mean \|Δ log-prob\|"):
        to_onnx.write_onnx(vdir, load_checkpoint(tiny_hf), quantize="int8", log=lambda m: None)
    assert sorted(p.name for p in vdir.iterdir()) == before  # no int8 file, no model.onnx, no temporary file
    assert (vdir / MANIFEST_NAME).read_text() == manifest


def test_an_implicit_int8_export_that_is_refused_leaves_nothing_in_the_cache(tiny_hf, tmp_path, monkeypatch):
    """--model CHECKPOINT --precision int8: the cached export gets no int8 file when int8 is refused."""
    from mlm_export import to_onnx

    from mlm_scorer.pipeline import score_file

    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat sat on the mat\n", encoding="utf-8")
    cache = tmp_path / "cache"
    score_file(tsv, tmp_path / "fp32.parquet", model=tiny_hf, cache_dir=cache)  # the export (and model.onnx)
    monkeypatch.setattr(to_onnx, "INT8_MAX_MEAN_ABS_DIFF", 1e-6)
    with pytest.raises(ModelError, match="int8 quantization drifts too far"):
        score_file(tsv, tmp_path / "int8.parquet", model=tiny_hf, cache_dir=cache, engine_options={"precision": "int8"})
    vdirs = list(cache.glob("exports/*/1"))
    assert len(vdirs) == 1 and (vdirs[0] / "model.onnx").is_file()
    assert not list(vdirs[0].glob("*int8*")) and not list(vdirs[0].glob(".*tmp"))
    assert "onnx-int8" not in (json.loads((vdirs[0] / MANIFEST_NAME).read_text()).get("reduced_precision") or {})
    assert not (tmp_path / "int8.parquet").exists()


def test_row_quantization_makes_a_copys_numbers_independent_of_its_batch(default_int8, saturating_int8):
    """Per-row activation scales: a copy scored with others equals the copy scored alone (float rounding
    only). Per-tensor scales (the saturating configuration here) move it: the check can fail."""
    rng = np.random.default_rng(3)
    md = ModelDir.open(default_int8)
    V, T, B = md.manifest["vocab_size"], 12, 6
    ids = rng.integers(5, V, size=(B, T)).astype(np.int32)
    ids[:, 0] = 0
    ids[1:, 1:] *= 7  # the other copies' activations span another range than the first's
    ids %= V
    pos = np.full((B, 1), 3, np.int32)
    batch = Batch(ids, np.ones_like(ids), np.zeros_like(ids), pos, ids[:, 3:4].copy())
    moved = {}
    for name, d in (("row", default_int8), ("tensor", saturating_int8)):
        eng = get_engine("onnx", model=ModelDir.open(d), precision="int8", threads=1)
        together = eng.run(batch).log_probs[0]
        alone = eng.run(batch.slice(0, 1)).log_probs[0]
        moved[name] = float(np.abs(together - alone).max())
    assert moved["row"] <= 1e-5, moved
    assert moved["tensor"] > 1e-4, moved  # the same test on per-tensor scales sees the batch


# ------------------------------------------------------------------------- an AVX2 CPU, emulated

QEMU = shutil.which("qemu-x86_64")
_QEMU_SCRIPT = """
import json, sys
from mlm_scorer.engines import get_engine
from mlm_scorer.engines.cpu import int8_class
from mlm_scorer.errors import ModelError
from mlm_scorer.model_dir import ModelDir
out = {"cpu": int8_class()}
for d in sys.argv[1:]:
    try:
        out[d] = {"ok": get_engine("onnx", model=ModelDir.open(d), precision="int8", threads=1).int8_check}
    except ModelError as exc:
        out[d] = {"refused": str(exc)}
print(json.dumps(out))
"""


def _on_emulated_avx2(*exports: Path) -> dict:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"qemu-x86_64 emulates an x86-64 CPU for x86-64 programs; this machine is {platform.machine()}")
    if QEMU is None:
        pytest.skip("qemu-x86_64 is not installed (scripts/ci_system_deps.sh installs qemu-user): the AVX2 "
                    "stand-in cannot run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path)}
    p = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", _QEMU_SCRIPT, *map(str, exports)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["cpu"] == "AVX2", out  # the emulated CPUID: AVX2 and FMA, no AVX-512, no VNNI
    return out


@pytest.fixture(scope="module")
def accurate_int8(tiny_export, tiny_hf, tmp_path_factory) -> Path:
    from dataclasses import asdict

    from mlm_export.onnx_graph import ACCURATE_INT8

    return _int8_copy(tiny_export, tiny_hf, tmp_path_factory.mktemp("int8_accurate_tiny"), **asdict(ACCURATE_INT8))


@pytest.mark.slow
def test_on_an_avx2_cpu_a_saturating_file_is_refused_and_the_default_accepted(default_int8, saturating_int8,
                                                                              accurate_int8):
    out = _on_emulated_avx2(default_int8, saturating_int8, accurate_int8)
    bad = out[str(saturating_int8)]
    assert "refused" in bad, bad
    assert "this CPU (AVX2) lacks VNNI" in bad["refused"] and "is intact" in bad["refused"], bad
    assert "replaced or damaged" not in bad["refused"], bad
    good = out[str(default_int8)]
    assert "ok" in good, good
    # the same integers as on the exporting CPU: the same drift, to float rounding
    recorded = _manifest(default_int8)["reduced_precision"]["onnx-int8"]["probe"]["mean_abs_diff"]
    assert good["ok"]["mean_abs_diff"] == pytest.approx(recorded, abs=1e-4), (good, recorded)
    # the accurate configuration (split activations, 8-bit weights) cannot saturate either
    acc = out[str(accurate_int8)]
    assert "ok" in acc, acc
    recorded = _manifest(accurate_int8)["reduced_precision"]["onnx-int8"]["probe"]["mean_abs_diff"]
    assert acc["ok"]["mean_abs_diff"] == pytest.approx(recorded, abs=1e-4), (acc, recorded)


def test_two_int8_files_of_the_same_weights_never_share_scores(default_int8, saturating_int8, tmp_path):
    """The score cache keys on the numerics, which name the int8 file: a re-quantized export (same weights,
    same model_checksum, other int8 numbers) is scored afresh, never answered with the other file's scores."""
    from mlm_scorer.pipeline import score_file

    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat sat on the mat\na dog ran home\n", encoding="utf-8")
    cache = tmp_path / "cache"
    assert ModelDir.open(default_int8).checksum == ModelDir.open(saturating_int8).checksum
    a = score_file(tsv, tmp_path / "a.parquet", model=default_int8, engine_options={"precision": "int8"},
                   score_cache=cache)
    b = score_file(tsv, tmp_path / "b.parquet", model=saturating_int8, engine_options={"precision": "int8"},
                   score_cache=cache)
    assert a.cache_hits == 0 and b.cache_hits == 0 and b.copies == a.copies > 0
    again = score_file(tsv, tmp_path / "c.parquet", model=default_int8, engine_options={"precision": "int8"},
                       score_cache=cache)
    assert again.copies == 0 and again.cache_hits == 2


def test_cpu_features_from_cpuid_agree_with_the_kernel():
    """CPUID read through ctypes (engines/cpu.py) names the same basic features as /proc/cpuinfo on a machine
    that is not emulated (the emulated case is the qemu test above)."""
    from mlm_scorer.engines.cpu import _cpuid_reader, cpu_flags

    if platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file():
        pytest.skip(f"CPUID and /proc/cpuinfo are read on x86-64 Linux; this is {platform.machine()}")
    if _cpuid_reader() is None:
        pytest.skip("this system refuses executable memory: the flags come from /proc/cpuinfo itself")
    import re

    kernel = set(re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    for flag in ("avx", "avx2", "fma", "avx512f", "avx512_vnni"):
        assert (flag in cpu_flags()) == (flag in kernel), (flag, sorted(cpu_flags()))


# ------------------------------------------------------------------------- the accurate configuration

def _one_dense(spec, W: np.ndarray, b: np.ndarray, second_moment=None):
    """An ONNX Runtime session of one int8 dense layer ``x W + b`` as ``build_graph`` writes it."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from mlm_export import onnx_graph as og

    g = og._Builder({})
    y = og._int8_dense(g, "x", W, b, spec, "layer", second_moment)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(g.nodes, "dense", [helper.make_tensor_value_info("x", g.TP.FLOAT, ["rows", W.shape[0]])],
                              [helper.make_tensor_value_info("y", g.TP.FLOAT, ["rows", W.shape[1]])],
                              list(g.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", og.OPSET),
                                                    helper.make_opsetid(og.MS_DOMAIN, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_split_activations_and_weights_compute_the_product_they_stand_for():
    """Against NumPy in float64: with activations in two parts the only error left is the weights'
    rounding plus at most half a fine step per activation; with weights in two parts, the activations'
    rounding plus at most half a fine step per weight. One part alone is far coarser (the bounds fail)."""
    from mlm_export.onnx_graph import Int8Spec, quantize_weight, split_weight

    rng = np.random.default_rng(5)
    K, N = 96, 40
    W = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    b = rng.normal(0, 0.1, N).astype(np.float32)
    x = np.concatenate([rng.normal(0, 1, (7, K)), rng.gamma(0.5, 1, (3, K)) - 0.1]).astype(np.float32)
    x[2, 5] = 12.0  # an outlier that sets its row's scale
    x64 = x.astype(np.float64)
    span = np.maximum(x64.max(1), 0) - np.minimum(x64.min(1), 0)  # each row's quantization range

    act = Int8Spec(activation_levels=127, weight_levels=127, activation_split=True)
    assert act.saturation_free and act.to_dict()["activation_split"] is True
    Wq, ws = quantize_weight(W, 127)
    Wd = Wq.astype(np.float64) * ws
    got = _one_dense(act, W, b).run(["y"], {"x": x})[0]
    want = x64 @ Wd + b  # the weights' rounding is the file's: only the activations' error is measured
    bound = (span / 127 / 127 / 2)[:, None] * np.abs(Wd).sum(0)[None, :] + 1e-4
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))
    coarse = _one_dense(Int8Spec(activation_levels=127, weight_levels=127), W, b).run(["y"], {"x": x})[0]
    assert np.max(np.abs(coarse - want) / bound) > 10  # one 7-bit part: the bound is no formality

    wsp = Int8Spec(weight_split=True)
    assert wsp.saturation_free
    Wq2, ws2 = split_weight(W, 63)
    assert Wq2.shape == (K, 2 * N) and np.abs(Wq2).max() <= 63
    W2 = Wq2[:, :N] * ws2[:N].astype(np.float64) + Wq2[:, N:] * ws2[N:].astype(np.float64)
    assert np.all(np.abs(W2 - W) <= ws2[N:] / 2 + 1e-9)  # within half a fine step (1/126 of a coarse one)
    got = _one_dense(wsp, W, b).run(["y"], {"x": x})[0]
    s = span / 255
    z = np.rint(np.maximum(-np.minimum(x64.min(1), 0), 0) / s)
    xd = (np.clip(np.rint(x64 / s[:, None]) + z[:, None], 0, 255) - z[:, None]) * s[:, None]
    want = xd @ W2 + b  # the activations' rounding reproduced in NumPy: only float rounding is left
    assert np.max(np.abs(got - want)) <= 1e-4, float(np.max(np.abs(got - want)))


def test_gptq_rounding_lowers_the_output_error_it_minimises():
    """On correlated inputs, GPTQ's integers give a smaller E|x (W - Q)|^2 than rounding to nearest, with
    the same scales and range; on held-out inputs of the same distribution too."""
    from mlm_export.onnx_graph import gptq_weight, quantize_weight

    rng = np.random.default_rng(11)
    K, N = 128, 64
    mix = rng.normal(0, 1, (K, K)) * (rng.random((K, K)) < 0.1) + np.eye(K)
    calib, held_out = (rng.normal(0, 1, (n, K)) @ mix for n in (2048, 2048))
    W = rng.normal(0, 0.05, (K, N))
    near_q, near_s = quantize_weight(W, 127)
    q, s = gptq_weight(W, calib.T @ calib / len(calib), 127)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127 and np.array_equal(s, near_s)
    err = lambda x, Q: float(np.mean((x @ (W - Q * s.astype(np.float64))) ** 2))  # noqa: E731
    assert err(calib, q) < 0.7 * err(calib, near_q), (err(calib, q), err(calib, near_q))
    assert err(held_out, q) < 0.8 * err(held_out, near_q), (err(held_out, q), err(held_out, near_q))


def test_int8_spec_refuses_what_it_cannot_write():
    from mlm_export.onnx_graph import Int8Spec

    for bad in ({"keep_fp32": ("ffn",)}, {"keep_fp32": ("ffn_out@x",)}, {"keep_fp32": ("head@1",)},
                {"weight_rounding": "mse"}, {"activations": "tensor", "activation_split": True},
                {"weight_split": True, "weight_rounding": "gptq"}):
        with pytest.raises(ValueError):
            Int8Spec(**bad)
    assert Int8Spec(keep_fp32=("head", "ffn_out@7")).keep_fp32 == ("head", "ffn_out@7")


#: At most this mean |Δ log-prob| per token from fp32 when scoring real text (antibody domains).
ACCURATE_MAX_DRIFT = 0.005
#: The exporter records its drift on random masked copies (``drift.drift_inputs``), a stress case far out
#: of AntiBERTy's distribution: measured there, the default configuration drifts 0.134 nats per token
#: and the accurate one 0.036 (on real antibody sequences 0.0129 and ~0.0045). The gate is a regression
#: bound between the two: a wrong part or scale fails it.
ACCURATE_MAX_RECORDED_DRIFT = 0.06


@pytest.fixture(scope="module")
def accurate_antiberty(antiberty_export, antiberty_hf, tmp_path_factory) -> Path:
    from mlm_export import load_checkpoint
    from mlm_export.onnx_graph import ACCURATE_INT8
    from mlm_export.to_onnx import write_onnx

    dest = tmp_path_factory.mktemp("int8_accurate")
    shutil.copytree(ModelDir.open(antiberty_export).path, dest / "1")
    write_onnx(dest / "1", load_checkpoint(antiberty_hf), quantize="int8", int8_spec=ACCURATE_INT8, log=lambda m: None)
    return dest


def test_the_accurate_int8_export_of_real_weights_drifts_within_0_005_and_is_scored(accurate_antiberty, tmp_path):
    """AntiBERTy, real weights: the export records its configuration and its drift on random masked copies;
    the scoring run (the default engine, --precision int8) accepts the file, and on real antibody domains
    its per-residue log-probs stay within 0.005 nats of the fp32 engine's on average."""
    from antibodies import baseline_rows
    from helpers import read_outputs, write_tsv

    from mlm_scorer.pipeline import score_file

    rec = _manifest(accurate_antiberty)["reduced_precision"]["onnx-int8"]
    assert rec["config"]["activation_split"] is True and rec["config"]["weight_rounding"] == "gptq"
    assert rec["config"]["saturation_free"] is True
    assert 0 < rec["mean_abs_diff"] <= ACCURATE_MAX_RECORDED_DRIFT, rec
    assert 0 < rec["probe"]["mean_abs_diff"] <= ACCURATE_MAX_RECORDED_DRIFT, rec["probe"]

    tsv = write_tsv(tmp_path / "in.tsv", baseline_rows()[:3])
    scores = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.parquet"
        score_file(tsv, out, model=accurate_antiberty, id_column="id", engine_options={"precision": precision})
        words, _ = read_outputs(out)
        scores[precision] = np.array([w["log_prob"] for w in sorted(words, key=lambda w: (w["id"], w["word_index"]))])
    fp32, int8 = scores["fp32"], scores["int8"]
    assert len(fp32) == len(int8) > 300 and np.all(np.isfinite(int8)) and np.all(int8 <= 0)
    d = np.abs(int8 - fp32)
    print(f"accurate int8 vs fp32 on {len(d)} residues of real domains: mean {d.mean():.5f}, max {d.max():.4f}")
    assert 0 < d.mean() <= ACCURATE_MAX_DRIFT, (d.mean(), d.max())
    assert d.max() <= 0.2, d.max()
    eng = get_engine("onnx", model=ModelDir.open(accurate_antiberty), precision="int8", threads=1)
    assert eng.int8_check["mean_abs_diff"] == pytest.approx(rec["probe"]["mean_abs_diff"], abs=1e-5)
