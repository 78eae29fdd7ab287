"""Fast engines (ONNX Runtime fp32/int8, PyTorch fp32/bf16/fp16, TensorRT) behind the Engine interface.

* fp32 parity: every available engine against transformers' PyTorch BertForMaskedLM (full-vocabulary
  softmax at every position, computed here row by row, unpadded) ≤ 1e-4 on Batches of real masked
  copies (token and whole-word copies of sentences of different lengths in one batch, unused slots).
* reduced precision: within the documented tolerances below, and the drift report is printed and
  recorded in the manifest.
* TensorRT: the pure logic (profiles, bucketing, splitting) always; builder and runner only where
  TensorRT and a GPU exist (skipped here with the reason).
* end to end: ``score_file`` with each fast engine gives the same Parquet as the saved_model engine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlm_scorer.batching import BatchPolicy
from mlm_scorer.engines import Batch, get_engine
from mlm_scorer.errors import ModelError, UsageError
from mlm_scorer.model_dir import MANIFEST_NAME, ModelDir

TOL = 1e-4
# Documented tolerances of the reduced-precision paths on the tiny model (weights drawn with a large
# range, so its logits are far peakier than a trained BERT's: a harsh case for quantization).
# Measured on the drift inputs: int8 mean 0.045 / max 0.14 / top-1 92.5%; bf16 (model cast) mean 0.019 /
# max 0.063 / top-1 98.8% (|Δ log-prob| vs fp32, nats).
INT8_TOL = {"mean": 0.15, "max": 0.6, "top1": 0.8}
BF16_TOL = {"mean": 0.05, "max": 0.25, "top1": 0.9}

SENTENCES = [
    "The cat sat on the mat.",
    "The quick brown fox jumps over the lazy dog!",
    "Running dogs walked; people read books?",
    "ab",
    "she was reading",
]


# ------------------------------------------------------------------------------------------ fixtures

def _onnx_copy(tiny_export, tiny_hf, tmp_path_factory, name: str, quantize: str | None) -> Path:
    """A copy of the tiny export with model.onnx (and with quantize="int8" model.int8.onnx) from write_onnx."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mlm-scorer[onnx]')")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mlm-scorer[onnx]')")
    from mlm_export import load_checkpoint
    from mlm_export.to_onnx import write_onnx

    base = tmp_path_factory.mktemp(name)
    shutil.copytree(ModelDir.open(tiny_export).path, base / "1")
    msgs: list[str] = []
    write_onnx(base / "1", load_checkpoint(tiny_hf), quantize=quantize, log=msgs.append)
    assert any(m.startswith("verified") for m in msgs), msgs
    assert any(m.startswith("drift onnx-int8") for m in msgs) == (quantize == "int8"), msgs
    return base


@pytest.fixture(scope="module")
def fast_export(tiny_export, tiny_hf, tmp_path_factory) -> Path:
    """The tiny export with model.onnx (fp32 only: no fp32 test depends on quantizing)."""
    return _onnx_copy(tiny_export, tiny_hf, tmp_path_factory, "fast_export", None)


@pytest.fixture(scope="module")
def int8_export(tiny_export, tiny_hf, tmp_path_factory) -> Path:
    """The tiny export with model.onnx and model.int8.onnx, for the int8 tests alone."""
    return _onnx_copy(tiny_export, tiny_hf, tmp_path_factory, "int8_export", "int8")


@pytest.fixture(scope="module")
def model(fast_export) -> ModelDir:
    return ModelDir.open(fast_export)


@pytest.fixture(scope="module")
def int8_model(int8_export) -> ModelDir:
    return ModelDir.open(int8_export)


def _copies(tok, sentences):
    """Masked copies as the scorer makes them: per sentence, one copy per token (1 slot) and one per
    whole word (all its pieces masked, one slot each). Returns rows of (ids, positions, targets)."""
    rows = []
    for s in sentences:
        enc = tok(s, add_special_tokens=False)
        ids = [tok.cls_token_id] + enc["input_ids"] + [tok.sep_token_id]
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(enc.word_ids()):
            groups.setdefault(w, []).append(i + 1)
        for w in sorted(groups):
            pieces = groups[w]
            for p in ([[p] for p in pieces] + ([pieces] if len(pieces) > 1 else [])):
                row = list(ids)
                for q in p:
                    row[q] = tok.mask_token_id
                rows.append((row, p, [ids[q] for q in p]))
    return rows


def _batch(rows) -> Batch:
    """Pad rows to [B, max T] and [B, max P] with the conventions (0 ids / mask / slot)."""
    B, T, P = len(rows), max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    z = lambda n: np.zeros((B, n), np.int32)  # noqa: E731
    ids, mask, seg, pos, tgt = z(T), z(T), z(T), z(P), z(P)
    for b, (row, p, t) in enumerate(rows):
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
        pos[b, :len(p)] = p
        tgt[b, :len(t)] = t
    return Batch(ids, mask, seg, pos, tgt)


def _reference(ref_model, rows, k):
    """transformers BertForMaskedLM, one unpadded row at a time, full-vocab log_softmax in float64."""
    import torch

    P = max(len(r[1]) for r in rows)
    lp = np.zeros((len(rows), P))
    top = np.full((len(rows), P, k), -1)
    top_lp = np.full((len(rows), P, k), -np.inf)
    with torch.no_grad():
        for b, (row, p, t) in enumerate(rows):
            full = torch.log_softmax(ref_model(input_ids=torch.tensor([row])).logits[0].double(), -1).numpy()
            for j, (q, tid) in enumerate(zip(p, t)):
                lp[b, j] = full[q, tid]
                order = np.argsort(-full[q])[:k]
                top[b, j], top_lp[b, j] = order, full[q, order]
    return lp, top, top_lp


@pytest.fixture(scope="module")
def copies_batch(tiny_reference, model):
    rows = _copies(tiny_reference.tok, SENTENCES)
    # Interleave long and short rows so padding varies within the batch.
    rows = rows[::2] + rows[1::2]
    batch = _batch(rows)
    assert len({len(r[0]) for r in rows}) >= 4 and (batch.masked_lm_positions == 0).any()
    return batch, _reference(tiny_reference.model, rows, model.top_k)


def _assert_slot_padding(res, batch):
    unused = batch.masked_lm_positions == 0
    assert np.all(res.log_probs[unused] == 0.0)
    assert np.all(res.top_k_ids[unused] == -1)
    assert np.all(np.isneginf(res.top_k_log_probs[unused]))


def _check_parity(res, batch, ref, tol=TOL):
    lp, top, top_lp = ref
    used = batch.masked_lm_positions > 0
    assert res.log_probs.dtype == np.float32 and res.log_probs.shape == batch.masked_lm_positions.shape
    assert res.top_k_ids.dtype == np.int32 and res.top_k_log_probs.dtype == np.float32
    diff = np.abs(res.log_probs - lp)[used]
    assert diff.max() <= tol, f"max |Δ log-prob| {diff.max():.2e} > {tol}"
    assert np.abs(res.top_k_log_probs[used] - top_lp[used]).max() <= tol
    # Ids may swap only between near-tied candidates.
    gaps = np.full(used.shape, np.inf)
    gaps[used] = np.abs(np.diff(top_lp[used], axis=-1)).min(-1)
    clear = used & (gaps > 10 * tol)
    assert clear.sum() >= used.sum() // 2
    assert np.array_equal(res.top_k_ids[clear], top[clear])
    _assert_slot_padding(res, batch)


# ------------------------------------------------------------------------------- fp32 engine parity

FP32_ENGINES = [("onnx", {}), ("torch", {}), ("saved_model", {})]


@pytest.mark.parametrize("name,opts", FP32_ENGINES, ids=[e[0] for e in FP32_ENGINES])
def test_fp32_engine_matches_transformers(name, opts, model, copies_batch):
    batch, ref = copies_batch
    with get_engine(name, model=model, top_k=True, **opts) as eng:
        res = eng.run(batch)
        _check_parity(res, batch, ref)
        # Without top_k the log-probs are the same (saved_model computes them by another path, its
        # log_prob signature: same to float32 rounding) and no top-k arrays come back.
        plain = get_engine(name, model=model, top_k=False, **opts)
        r2 = plain.run(batch)
        assert r2.top_k_ids is None
        np.testing.assert_allclose(r2.log_probs, res.log_probs, rtol=0, atol=1e-5)
        plain.close()


# One single-threaded stream, each engine's way of saying so: the reference for the streams test.
_THREADS = {"saved_model": {"intra_op_threads": 1}, "onnx": {"threads": 1}, "torch": {"threads": 1}}


@pytest.mark.parametrize("name", ["saved_model", "onnx", "torch"])
def test_streams_score_every_batch_as_one_stream_does(name, model, copies_batch):
    """Several batches in flight at once (threads sharing one model) give each batch its own results, in
    order, equal to a single stream's and to the reference."""
    batch, (lp, top, top_lp) = copies_batch
    cuts = list(range(0, len(batch), 5)) + [len(batch)]
    parts = [batch.slice(a, b) for a, b in zip(cuts, cuts[1:])]
    assert len(parts) >= 6
    with get_engine(name, model=model, top_k=True, streams=1, **_THREADS[name]) as one:
        assert one.streams == 1
        single = list(one.map(parts))
    for streams in (2, 3):
        with get_engine(name, model=model, top_k=True, streams=streams) as eng:
            assert eng.streams == streams
            got = list(eng.map(parts))
        assert len(got) == len(parts)
        for (a, b), r, r1 in zip(zip(cuts, cuts[1:]), got, single):
            _check_parity(r, batch.slice(a, b), (lp[a:b], top[a:b], top_lp[a:b]))
            np.testing.assert_allclose(r.log_probs, r1.log_probs, rtol=0, atol=1e-6)


def test_engines_do_not_modify_batch(model, copies_batch):
    batch, _ = copies_batch
    before = {k: v.copy() for k, v in batch.as_dict().items()}
    for name in ("onnx", "torch"):
        get_engine(name, model=model).run(batch)
    assert all(np.array_equal(before[k], v) for k, v in batch.as_dict().items())


def test_torch_engine_weights_from_savedmodel_equal_from_onnx(model, tmp_path):
    """The torch engine reads weights from model.onnx; without it, from the SavedModel: same numbers."""
    pytest.importorskip("tensorflow", reason="tensorflow is needed to read the SavedModel's variables")
    from mlm_scorer.engines.torch_engine import load_export_weights

    w_onnx, src1 = load_export_weights(model)
    vdir = tmp_path / "1"
    shutil.copytree(model.path, vdir, ignore=shutil.ignore_patterns("*.onnx"))
    w_tf, src2 = load_export_weights(ModelDir.open(vdir))
    assert src1.endswith("model.onnx") and src2.endswith("variables")
    assert sorted(w_onnx) == sorted(w_tf)
    assert all(np.array_equal(w_onnx[k], w_tf[k]) for k in w_onnx)


def test_bucket_padding_does_not_change_results(model, copies_batch):
    """Padding T (TensorRT shape bucketing) and slots leaves real slots unchanged (checked on ONNX)."""
    from mlm_scorer.engines._shapes import bucket_batch

    batch, _ = copies_batch
    T, P = batch.input_ids.shape[1], batch.masked_lm_positions.shape[1]
    padded = Batch(**bucket_batch(batch.as_dict(), T + 13, P + 2))
    eng = get_engine("onnx", model=model, top_k=True)
    a, b = eng.run(batch), eng.run(padded)
    assert np.abs(b.log_probs[:, :P] - a.log_probs).max() <= 1e-5
    assert np.array_equal(b.top_k_ids[:, :P], a.top_k_ids)
    assert np.all(b.top_k_ids[:, P:] == -1)


# ------------------------------------------------------------------------------- reduced precision

def _manifest(model):
    return json.loads((model.path / MANIFEST_NAME).read_text())


def _assert_drift_within(res, batch, lp, top, tol) -> np.ndarray:
    """Reduced-precision results against the fp32 reference: mean / max |Δ log-prob| and top-1 agreement
    within ``tol``, unused slots padded. Returns the per-prediction |Δ| for further checks."""
    used = batch.masked_lm_positions > 0
    d = np.abs(res.log_probs - lp)[used]
    top1 = np.mean((res.top_k_ids[..., 0] == top[..., 0])[used])
    assert d.mean() <= tol["mean"] and d.max() <= tol["max"] and top1 >= tol["top1"], (d.mean(), d.max(), top1)
    _assert_slot_padding(res, batch)
    return d


def test_onnx_int8_within_tolerance_and_recorded(int8_model, copies_batch):
    batch, (lp, top, _) = copies_batch
    eng = get_engine("onnx", model=int8_model, top_k=True, precision="int8")
    res = eng.run(batch)
    d = _assert_drift_within(res, batch, lp, top, INT8_TOL)
    assert d.max() > 1e-6, "int8 gave fp32-identical numbers: the quantized file is not being used"
    rep = _manifest(int8_model)["reduced_precision"]["onnx-int8"]
    assert {"mean_abs_diff", "max_abs_diff", "top1_agreement", "n_predictions", "probe", "cpu"} <= set(rep)
    assert rep["mean_abs_diff"] <= INT8_TOL["mean"]
    assert _manifest(int8_model)["onnx"]["int8"]["file"] == "model.int8.onnx"
    # the engine measured the file's drift on the recorded probe at open: on this CPU, as at export
    assert eng.int8_check["mean_abs_diff"] == pytest.approx(rep["probe"]["mean_abs_diff"], abs=1e-4)


def test_torch_bf16_cpu_within_tolerance_and_recorded(model, copies_batch, capsys):
    from mlm_scorer.engines.torch_engine import cpu_has_bf16

    if not cpu_has_bf16():
        with pytest.raises(UsageError, match="bf16"):
            get_engine("torch", model=model, precision="bf16")
        pytest.skip("this CPU has no avx512_bf16/amx_bf16: bf16 is refused (checked), drift not measurable")
    batch, (lp, top, _) = copies_batch
    eng = get_engine("torch", model=model, top_k=True, precision="bf16")
    assert "drift torch-bf16-cpu" in capsys.readouterr().err
    res = eng.run(batch)
    d = _assert_drift_within(res, batch, lp, top, BF16_TOL)
    assert d.max() > 1e-5, "bf16 gave fp32-identical numbers: the bf16 cast of the model is not in effect"
    rep = _manifest(model)["reduced_precision"]["torch-bf16-cpu"]
    assert rep["mean_abs_diff"] == pytest.approx(eng.drift["mean_abs_diff"])


def test_int8_manifest_update_keeps_other_entries(int8_model, tmp_path):
    from mlm_export.drift import record_drift

    vdir = tmp_path / "1"
    shutil.copytree(int8_model.path, vdir, ignore=shutil.ignore_patterns("*.onnx", "variables"))
    before = _manifest(int8_model)
    assert record_drift(vdir, "x-test", {"mean_abs_diff": 1.0, "max_abs_diff": 2.0, "top1_agreement": 0.5,
                                         "n_predictions": 3})
    after = json.loads((vdir / MANIFEST_NAME).read_text())
    assert after["reduced_precision"]["x-test"]["max_abs_diff"] == 2.0
    assert after["reduced_precision"]["onnx-int8"] == before["reduced_precision"]["onnx-int8"]
    assert {k: v for k, v in after.items() if k != "reduced_precision"} == \
        {k: v for k, v in before.items() if k != "reduced_precision"}
    assert not list(vdir.glob(".*tmp"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_cuda_half(model, copies_batch, precision):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: torch fp16/bf16 on CUDA not run")
    batch, (lp, _, _) = copies_batch
    res = get_engine("torch", model=model, top_k=True, device="cuda", precision=precision).run(batch)
    used = batch.masked_lm_positions > 0
    assert np.abs(res.log_probs - lp)[used].mean() <= BF16_TOL["mean"]
    fp32 = get_engine("torch", model=model, top_k=True, device="cuda").run(batch)
    _check_parity(fp32, batch, copies_batch[1])


# -------------------------------------------------------------------------- export checks, options

def test_onnx_verification_catches_wrong_weights(tiny_hf, model, tmp_path):
    """verify_onnx must fail on a file whose weights differ from the checkpoint (a test that can fail)."""
    from mlm_export import load_checkpoint
    from mlm_export.to_onnx import verify_onnx, write_graph
    from mlm_export.verify import VerificationError

    ck = load_checkpoint(tiny_hf)
    w = dict(ck.weights)
    name = "bert/encoder/layer_1/output/dense/kernel"
    # Random noise (a constant shift would be cancelled by the following LayerNorm).
    w[name] = w[name] + np.random.default_rng(0).normal(0, 0.01, w[name].shape).astype(np.float32)
    path = tmp_path / "bad.onnx"
    write_graph(ck.config, w, model.top_k, path)
    with pytest.raises(VerificationError, match="differs"):
        verify_onnx(path, ck, max_len=model.max_seq_length, top_k=model.top_k)


def test_write_onnx_refuses_other_checkpoint(model, tmp_path):
    from mlm_export import load_checkpoint
    from mlm_export.to_onnx import write_onnx
    from tiny_models import make_hf_bert

    other = make_hf_bert(tmp_path / "other", seed=5)
    with pytest.raises(ValueError, match="model_checksum"):
        write_onnx(model.path, load_checkpoint(other))


def test_onnx_file_has_savedmodel_signature(model):
    import onnx

    m = onnx.load(str(model.path / "model.onnx"), load_external_data=False)
    ins = {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
           for i in m.graph.input}
    outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert list(ins) == ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids"]
    assert all(t == onnx.TensorProto.INT32 for t, _ in ins.values())
    assert all(isinstance(d, str) for _, dims in ins.values() for d in dims), "axes must be dynamic"
    assert outs == {"masked_lm_log_probs": onnx.TensorProto.FLOAT, "top_k_ids": onnx.TensorProto.INT32,
                    "top_k_log_probs": onnx.TensorProto.FLOAT}
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17


@pytest.mark.parametrize("name,opts,exc,match", [
    ("onnx", {"bogus": 1}, UsageError, "bogus"),
    ("onnx", {"precision": "bf16"}, UsageError, "torch"),
    ("onnx", {"device": "tpu"}, UsageError, "device"),
    ("torch", {"engine_file": "x"}, UsageError, "engine_file"),
    ("torch", {"precision": "fp16"}, UsageError, "fp16 on CPU"),
    ("torch", {"precision": "int8"}, UsageError, "int8"),
    ("torch", {"memory": "jemalloc"}, UsageError, "memory must be one of retain, system"),
    ("tensorrt", {"threads": 2}, UsageError, "threads"),
    ("tensorrt", {"engine_file": "/nonexistent/model.plan"}, UsageError, "not found"),
])
def test_engine_options_are_checked(model, name, opts, exc, match):
    with pytest.raises(exc, match=match):
        get_engine(name, model=model, **opts)


def test_torch_engine_retains_freed_memory_on_cpu_unless_told(model, monkeypatch):
    """The torch engine asks glibc to keep freed memory (``engines._malloc``; its effect is tested in
    test_malloc.py) by default on CPU, and leaves malloc alone with memory=system."""
    from mlm_scorer.engines import torch_engine

    calls = []
    monkeypatch.setattr(torch_engine, "retain_freed_memory", lambda: calls.append(1) or True)
    with get_engine("torch", model=model) as eng:
        assert eng.memory_retained is True and calls == [1]
    with get_engine("torch", model=model, memory="system") as eng:
        assert eng.memory_retained is False and calls == [1]


def test_onnx_int8_missing_file_says_how_to_make_it(model, tmp_path):
    vdir = tmp_path / "1"
    shutil.copytree(model.path, vdir, ignore=shutil.ignore_patterns("model.int8.onnx", "variables"))
    with pytest.raises(ModelError, match="--quantize int8"):
        get_engine("onnx", model=ModelDir.open(vdir), precision="int8")


# --------------------------------------------------------------------- TensorRT: pure logic, always

def test_profiles_from_workload_cover_range_and_follow_lengths():
    from mlm_scorer.engines._shapes import profiles_from_workload

    lengths = [6] * 50 + [9] * 30 + [14] * 15 + [60] * 5
    ps = profiles_from_workload(lengths, max_batch=128, max_seq=128, max_predictions=8, opt_batch=64)
    assert len(ps) == 2
    assert ps[0].seq[0] == 1 and ps[-1].seq[2] == 128
    assert all(a.seq[2] + 1 == b.seq[0] for a, b in zip(ps, ps[1:])), "ranges must be contiguous"
    assert ps[0].seq[1] == 8  # median 6, rounded up to a multiple of 8
    assert all(p.batch == (1, 64, 128) and p.predictions == (1, 8, 8) for p in ps)
    one = profiles_from_workload([], max_batch=32, max_seq=64, max_predictions=4)
    assert one == [one[0]] and one[0].seq == (1, 64, 64)
    three = profiles_from_workload(range(1, 101), max_batch=8, max_seq=100, max_predictions=2, n_profiles=3)
    assert [p.seq[2] for p in three][-1] == 100 and len(three) == 3
    with pytest.raises(ValueError):
        profiles_from_workload([5], max_batch=8, max_seq=16, max_predictions=2, opt_batch=9)


def test_choose_profile_tightest_fit():
    from mlm_scorer.engines._shapes import Profile, choose_profile

    ps = [Profile((1, 64, 64), (1, 64, 128), (1, 8, 8)), Profile((1, 64, 64), (1, 16, 32), (1, 8, 8)),
          Profile((1, 64, 64), (33, 64, 128), (1, 4, 4))]
    assert choose_profile(ps, 10, 2) == 1  # both 0 and 1 fit; 1 is tighter
    assert choose_profile(ps, 40, 2) == 2
    assert choose_profile(ps, 40, 6) == 0  # 2 lacks predictions 6
    with pytest.raises(ValueError, match="no optimization profile"):
        choose_profile(ps, 200, 1)
    with pytest.raises(ValueError):
        Profile((1, 70, 64), (1, 2, 3), (1, 1, 1))


def test_split_ranges_balanced_and_complete():
    from mlm_scorer.engines._shapes import split_ranges

    assert split_ranges(65, 64) == [(0, 33), (33, 65)]
    assert split_ranges(64, 64) == [(0, 64)]
    assert split_ranges(0, 8) == []
    for n in range(1, 200, 7):
        for m in (1, 3, 16, 64):
            r = split_ranges(n, m)
            assert r[0][0] == 0 and r[-1][1] == n and all(a[1] == b[0] for a, b in zip(r, r[1:]))
            sizes = [b - a for a, b in r]
            assert max(sizes) <= m and max(sizes) - min(sizes) <= 1 and len(r) == -(-n // m)


def test_seq_buckets_and_round_up():
    from mlm_scorer.engines._shapes import round_up, seq_buckets

    assert seq_buckets(128) == [16, 32, 64, 128]
    assert seq_buckets(100) == [16, 32, 64, 100]
    assert seq_buckets(10) == [10]
    assert round_up(17, [16, 32]) == 32 and round_up(16, [16, 32]) == 16
    with pytest.raises(ValueError):
        round_up(33, [16, 32])


def test_trt_plan_chunks_bucket_and_split():
    from mlm_scorer.engines._shapes import Profile
    from mlm_scorer.engines.trt import bucket_seq, plan_chunks

    ps = [Profile((1, 32, 32), (1, 16, 20), (1, 4, 4)), Profile((1, 16, 16), (21, 64, 128), (1, 8, 8))]
    idx, Tb, chunks = plan_chunks(ps, 70, 11, 3)
    assert idx == 0 and Tb == 16 and chunks == [(0, 24, 0, 3), (24, 47, 0, 3), (47, 70, 0, 3)]
    assert bucket_seq(19, ps[0]) == 20  # 24 clamped to the profile max
    assert bucket_seq(20, ps[0]) == 20 and bucket_seq(22, ps[1]) == 24
    idx, Tb, chunks = plan_chunks(ps, 5, 11, 6)  # more slots than profile 0 takes: profile 0 by T, split slots
    assert idx == 0 and chunks == [(0, 5, 0, 3), (0, 5, 3, 6)]
    idx, Tb, chunks = plan_chunks(ps, 20, 50, 20)
    assert idx == 1 and Tb == 56
    assert chunks == [(0, 10, 0, 7), (0, 10, 7, 14), (0, 10, 14, 20), (10, 20, 0, 7), (10, 20, 7, 14), (10, 20, 14, 20)]
    with pytest.raises(ValueError, match="max-seq"):
        plan_chunks(ps, 1, 129, 1)


def test_trt_plan_manifest_contents(model):
    from mlm_export.to_tensorrt import plan_manifest, workload_lengths
    from mlm_scorer.engines._shapes import Profile, profiles_from_workload

    lengths = workload_lengths(model, ["The cat sat on the mat.", "", "ab"])
    assert lengths == [9, 4]  # [CLS] the cat sat on the mat . [SEP]; [CLS] a ##b [SEP]
    ps = profiles_from_workload(lengths, max_batch=64, max_seq=model.max_seq_length, max_predictions=4)
    m = plan_manifest(model_dir=model, profiles=ps, precision="fp16", trt_version="10.x", gpu={"name": "X"},
                      fp32_layers=7, onnx_sha256="abc", workload={"n_sentences": 2})
    assert m["model_checksum"] == model.checksum and m["tensorrt_version"] == "10.x"
    assert [Profile.from_dict(p) for p in json.loads(json.dumps(m["profiles"]))] == ps


def test_trt_keep_fp32_pins_overflow_prone_layers():
    """The builder's precision pinning on a stand-in network (the TensorRT calls it makes, mocked)."""
    from types import SimpleNamespace

    from mlm_export.to_tensorrt import _keep_fp32

    class Enum:
        def __init__(self, *names):
            for n in names:
                setattr(self, n, n)

    class Tensor:
        def __init__(self, dtype):
            self.dtype = dtype

    class Layer:
        def __init__(self, type_, *dtypes, op=None):
            self.type, self.op, self._outs = type_, op, [Tensor(d) for d in dtypes]
            self.precision, self.out_types = None, {}

        num_outputs = property(lambda self: len(self._outs))

        def get_output(self, j):
            return self._outs[j]

        def set_output_type(self, j, t):
            self.out_types[j] = t

    class ElementWise(Layer):
        pass

    trt = SimpleNamespace(LayerType=Enum("NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY", "TOPK", "ELEMENTWISE",
                                         "MATRIX_MULTIPLY", "GATHER"),
                          ElementWiseOperation=Enum("POW", "SUM"), IElementWiseLayer=ElementWise,
                          float32="float32", float16="float16", int32="int32", bool="bool")
    layers = {
        "ln": Layer("NORMALIZATION", "float32"), "softmax": Layer("SOFTMAX", "float32"),
        "erf": Layer("UNARY", "float32"), "not": Layer("UNARY", "bool"),
        "topk": Layer("TOPK", "float32", "int32"), "pow": Layer("ELEMENTWISE", "float32", op="POW"),
        "add": Layer("ELEMENTWISE", "float32", op="SUM"), "matmul": Layer("MATRIX_MULTIPLY", "float32"),
        "gather": Layer("GATHER", "float32"),
    }
    order = list(layers.values())
    net = SimpleNamespace(num_layers=len(order), get_layer=lambda i: order[i])
    n = _keep_fp32(trt, net)
    pinned = {k for k, v in layers.items() if v.precision == "float32"}
    assert pinned == {"ln", "softmax", "erf", "topk", "pow"} and n == 5
    assert layers["topk"].out_types == {0: "float32"}  # the int32 indices keep their type
    assert layers["not"].out_types == {} and layers["matmul"].out_types == {}


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_tensorrt_builder_and_runner(model, copies_batch, tmp_path, fp16):
    """Build a plan from the tiny export and run it on the copies batch (only where TensorRT and a GPU are)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU machine): the plan "
                                           "builder and the runner are not exercised here; pure logic is tested above")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but there is no CUDA GPU")
    from mlm_export.to_tensorrt import build_engine

    batch, (lp, top, _) = copies_batch
    P = batch.masked_lm_positions.shape[1]
    plan = build_engine(model.path, tmp_path / "tiny.plan", max_batch=16, max_seq=model.max_seq_length,
                        max_predictions=max(1, P - 1), n_profiles=2, fp16=fp16, log=lambda m: None)
    # max_batch 16 and max_predictions P-1 force both row and slot splitting on this batch.
    assert len(batch) > 16
    with get_engine("tensorrt", model=model, top_k=True, engine_file=str(plan)) as eng:
        res = eng.run(batch)
    _assert_slot_padding(res, batch)
    if not fp16:
        _check_parity(res, batch, copies_batch[1])
    else:
        used = batch.masked_lm_positions > 0
        d = np.abs(res.log_probs - lp)[used]
        assert d.mean() <= BF16_TOL["mean"] and d.max() <= BF16_TOL["max"], (d.mean(), d.max())


# --------------------------------------------------------------------------------- end to end (Parquet)

def _compare(a, b, tol, path=""):
    if isinstance(a, float) and isinstance(b, float):
        if "perplexity" in path:  # exp(-mean log-prob): compare relatively
            tol = tol * max(1.0, abs(b))
        assert (np.isinf(a) and a == b) or abs(a - b) <= tol, f"{path}: {a} vs {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _compare(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, tol, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("engine,opts", [("onnx", {}), ("torch", {})], ids=["onnx", "torch"])
@pytest.mark.parametrize("mode", ["whole-word", "word-l2r", "token"])
def test_score_file_same_parquet_as_saved_model(engine, opts, mode, fast_export, tiny_reference, tmp_path):
    pipeline = pytest.importorskip("mlm_scorer.pipeline", reason="mlm_scorer.pipeline is not there yet")
    from helpers import read_outputs, write_tsv

    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), s] for i, s in enumerate(SENTENCES)])
    ref = _SM_OUTPUTS.get(mode)  # the saved_model run, once per mode
    if ref is None:
        out0 = tmp_path / "sm.parquet"
        pipeline.score_file(tsv, out0, model=fast_export, engine="saved_model", mode=mode, id_column="id", top_k=3)
        ref = _SM_OUTPUTS[mode] = read_outputs(out0)
    out = tmp_path / f"{engine}.parquet"
    summary = pipeline.score_file(tsv, out, model=fast_export, engine=engine, engine_options=opts, mode=mode,
                                  id_column="id", top_k=3)
    assert summary.scored == len(SENTENCES)
    # No --batch-tokens given: the engine's preference (ONNX Runtime on CPU asks for smaller batches).
    from mlm_scorer.engines.ort import CPU_BATCH_TOKENS
    assert summary.batch_tokens == (CPU_BATCH_TOKENS if engine == "onnx" else BatchPolicy.batch_tokens)
    words, sents = read_outputs(out)
    assert len(words) == len(ref[0]) > len(SENTENCES)
    _compare(words, ref[0], TOL, "words")
    _compare(sents, ref[1], TOL * 10, "sentences")  # sums over up to ~10 words
    # And against the independent reference directly (transformers, masked copies built in helpers.py).
    for i, text in enumerate(SENTENCES):
        expected = tiny_reference.word_log_probs(text, mode)
        got = [w["log_prob"] for w in words if w["row"] == i]
        assert len(got) == len(expected) and np.abs(np.array(got) - expected).max() <= TOL, (text, got, expected)


_SM_OUTPUTS: dict = {}


def test_reduced_precision_scores_never_mix_with_fp32(int8_model, tmp_path):
    """The score cache and --resume key on the numerics: an int8 run is never answered from fp32 scores
    (nor the reverse), fp32 engines share their entries, and a run cannot resume in another precision."""
    import pyarrow.parquet as pq

    from mlm_scorer import UsageError, score_file
    from mlm_scorer.writer import sentences_path

    texts = ["the cat sat on the mat", "a dog ran in the house", "people read good books", "x y z"]
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\n" + "".join(t + "\n" for t in texts), encoding="utf-8")
    cache = tmp_path / "cache"

    def run(name, engine, **opts):
        out = tmp_path / f"{name}.parquet"
        s = score_file(tsv, out, model=int8_model.path, engine=engine, engine_options=opts, score_cache=cache)
        return s, [r["pll"] for r in pq.read_table(sentences_path(out)).to_pylist()], out

    fp32, fp32_pll, _ = run("fp32", "onnx")
    assert fp32.cache_hits == 0 and fp32.copies > 0
    int8, int8_pll, out = run("int8", "onnx", precision="int8")
    assert int8.cache_hits == 0 and int8.copies == fp32.copies  # scored afresh, not read from fp32's entries
    assert int8_pll != fp32_pll  # dynamic quantization moves the scores: mixing them would be visible
    int8_numerics = "onnx-int8-" + _manifest(int8_model)["onnx"]["int8"]["sha256"][:12]  # this int8 file's
    assert json.loads(pq.read_schema(out).metadata[b"mlm_scorer"])["numerics"] == int8_numerics
    again, again_pll, _ = run("again", "saved_model")  # another fp32 engine: answered by the fp32 entries
    assert again.copies == 0 and again.cache_hits == len(texts) and again_pll == fp32_pll
    int8_again, int8_again_pll, _ = run("int8b", "onnx", precision="int8")
    assert int8_again.copies == 0 and int8_again_pll == int8_pll

    # --resume in another precision is refused, naming what changed
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\n" + "".join(t + "\n" for t in texts * 3) + "\n" + "more words here\n", encoding="utf-8")
    with pytest.raises(Exception):  # the empty line is a bad row under fail: two chunks are committed
        score_file(bad, tmp_path / "r.parquet", model=int8_model.path, engine="onnx", chunk_rows=5)
    with pytest.raises(UsageError, match=rf"setting numerics changed \('fp32' -> '{int8_numerics}'\)"):
        score_file(bad, tmp_path / "r.parquet", model=int8_model.path, engine="onnx",
                   engine_options={"precision": "int8"}, chunk_rows=5, resume=True)
