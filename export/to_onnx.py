"""Write the exported model as ONNX (``model.onnx``, optionally ``model.int8.onnx``) next to the SavedModel.

The graphs are written directly from the checkpoint's NumPy weights (``mlm_export.onnx_graph``: ONNX
operators, opset 17; no deep-learning framework needed), with the SavedModel's ``serving_default``
signature exactly (names, dtypes, slot padding):

  inputs  (int32): input_ids, input_mask, segment_ids [B,T]; masked_lm_positions, masked_lm_ids [B,P]
  outputs:         masked_lm_log_probs float32 [B,P]   (0.0 in unused slots)
                   top_k_ids           int32   [B,P,k] (-1 in unused slots)
                   top_k_log_probs     float32 [B,P,k] (-inf in unused slots)

B, T and P are dynamic axes; k is the manifest's ``top_k``. As in the TF graph, the masked positions are
gathered *before* the vocabulary projection, so the [*,V] product runs on B*P rows, not B*T. The fp32 file
is verified against ``mlm_export.verify.reference_log_probs`` (float64 NumPy, independent of ONNX) with
ONNX Runtime, and refused above the tolerance.

``quantize="int8"`` also writes ``model.int8.onnx`` (``onnx_graph.Int8Spec``: by default 7-bit weights per
output column and 8-bit activations per token row at run time, so that no CPU's int8 product can
saturate) and records under ``reduced_precision["onnx-int8"]``:

  * its drift against fp32 on random masked copies (``drift.drift_inputs``), printed;
  * a ``probe``: a small fixed batch with the fp32 and int8 log-probs of it on the exporting CPU (and that
    CPU's int8 class). The onnx engine replays it when it opens the int8 file (``engines.ort``): on a CPU
    whose int8 arithmetic differs, the int8 file is refused with that cause, not run.

It is refused (nothing written) if its drift on this CPU exceeds ``INT8_MAX_MEAN_ABS_DIFF`` /
``INT8_MIN_TOP1_AGREEMENT``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from .config import GRAPH_REVISION
from .drift import MANIFEST_WHAT, drift_inputs, drift_report, record_drift, update_manifest
from .onnx_graph import DEFAULT_INT8, INPUT_NAMES, OPSET, OUTPUT_NAMES, Int8Spec, build_graph
from .verify import VerificationError, generated_inputs, reference_log_probs

ONNX_NAME = "model.onnx"
ONNX_INT8_NAME = "model.int8.onnx"
DEFAULT_TOLERANCE = 1e-4
#: int8 is refused (not just reported) if its drift exceeds these on the random drift inputs.
INT8_MAX_MEAN_ABS_DIFF = 0.5
INT8_MIN_TOP1_AGREEMENT = 0.5
#: The probe replayed at open (``int8_probe_inputs``): small, so that checking costs milliseconds.
PROBE_SHAPE = {"batch": 8, "max_tokens": 16, "max_predictions": 4, "seed": 4321}

__all__ = ["ONNX_NAME", "ONNX_INT8_NAME", "write_onnx", "verify_onnx", "write_graph", "int8_drift",
           "build_graph", "Int8Spec", "DEFAULT_INT8", "INPUT_NAMES", "OUTPUT_NAMES", "OPSET"]


def write_graph(cfg, weights: dict[str, np.ndarray], top_k: int, path: str | os.PathLike | BinaryIO, *,
                int8: Int8Spec | None = None, mask_id: int | None = None) -> None:
    """Write the graph for ``cfg`` with ``weights`` (google-research/bert names) to ``path``, a file name or
    a binary file open for writing (fp32, or int8 as ``int8`` says; ``mask_id``: the mask token of its
    calibration copies)."""
    import onnx

    model = build_graph(cfg, weights, top_k, int8=int8, mask_id=mask_id)
    if hasattr(path, "write"):  # what onnx.save writes for a path (protobuf, no external data)
        path.write(model.SerializeToString())
    else:
        onnx.save(model, str(path))


def _session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    outs = sess.run(OUTPUT_NAMES, {k: np.asarray(v, np.int32) for k, v in feed.items()})
    return dict(zip(OUTPUT_NAMES, outs))


def verify_onnx(path: str | os.PathLike, ckpt, *, max_len: int, top_k: int,
                tolerance: float = DEFAULT_TOLERANCE, mask_id: int | None = None) -> dict[str, Any]:
    """Run ``path`` with ONNX Runtime on generated inputs and compare with the float64 NumPy reference.

    Checks masked_lm_log_probs (max |Δ| ≤ tolerance), top-1 agreement, and the slot-padding outputs.
    Raises VerificationError on failure; returns a report dict.
    """
    sess = _session(path)
    ids, mask, seg, pos, tgt = generated_inputs(ckpt.config.vocab_size, max_len, seed=7, batch=4, mask_id=mask_id)
    out = _run(sess, dict(input_ids=ids, input_mask=mask, segment_ids=seg, masked_lm_positions=pos,
                          masked_lm_ids=tgt))
    ref_full = reference_log_probs(ckpt.config, ckpt.weights, ids, mask, seg, pos)
    valid = pos > 0
    ref = np.where(valid, np.take_along_axis(ref_full, tgt[..., None], axis=-1)[..., 0], 0.0)
    diff = float(np.max(np.abs(out["masked_lm_log_probs"] - ref)))
    if out["top_k_ids"].shape[-1] != top_k or out["top_k_ids"].dtype != np.int32:
        raise VerificationError(f"{path}: top_k_ids has shape {out['top_k_ids'].shape} dtype "
                                f"{out['top_k_ids'].dtype}, expected [..., {top_k}] int32")
    if not (np.all(out["top_k_ids"][~valid] == -1) and np.all(np.isneginf(out["top_k_log_probs"][~valid]))
            and np.all(out["masked_lm_log_probs"][~valid] == 0.0)):
        raise VerificationError(f"{path}: unused prediction slots do not return 0.0 / -1 / -inf")
    top_diff = float(np.max(np.abs(np.sort(ref_full, -1)[..., ::-1][..., :top_k][valid]
                                   - out["top_k_log_probs"][valid])))
    top1 = float(np.mean((out["top_k_ids"][..., 0] == ref_full.argmax(-1))[valid]))
    report = {"max_abs_diff": diff, "top_k_max_abs_diff": top_diff, "tolerance": tolerance,
              "top1_agreement": top1, "n_predictions": int(valid.sum()),
              "reference": "numpy float64 forward pass over the source weights", "runtime": "onnxruntime CPU"}
    if not (diff <= tolerance and top_diff <= tolerance):
        raise VerificationError(f"{path}: ONNX model differs from the source weights: max |Δ log-prob| = "
                                f"{max(diff, top_diff):.3e} > tolerance {tolerance:g}")
    return report


def int8_probe_inputs(vocab_size: int, max_len: int, mask_id: int | None = None) -> dict[str, np.ndarray]:
    """The batch the int8 file is checked on at open: ``drift_inputs`` of ``PROBE_SHAPE`` (8 copies of up to
    16 tokens, up to 4 masked positions each). Recorded whole in the manifest."""
    s = PROBE_SHAPE
    return drift_inputs(vocab_size, max_len, batch=s["batch"], max_tokens=s["max_tokens"],
                        max_predictions=s["max_predictions"], seed=s["seed"], mask_id=mask_id)


def int8_drift(fp32_path, int8_path, *, vocab_size: int, max_len: int, mask_id: int | None = None,
               threads: int | None = None, spec: Int8Spec = DEFAULT_INT8) -> dict[str, Any]:
    """Drift of the int8 model against the fp32 one (both with ONNX Runtime) on ``drift_inputs``, with the
    ``probe`` the engine replays at open (its inputs, the fp32 and the int8 answers, this CPU's int8 class)."""
    from mlm_scorer.engines.cpu import cpu_flags, int8_class

    a_sess, b_sess = _session(fp32_path, threads), _session(int8_path, threads)
    feed = drift_inputs(vocab_size, max_len, mask_id=mask_id)
    a, b = _run(a_sess, feed), _run(b_sess, feed)
    rep = drift_report(a["masked_lm_log_probs"], a["top_k_ids"][..., 0], b["masked_lm_log_probs"],
                       b["top_k_ids"][..., 0], feed["masked_lm_positions"])
    probe = int8_probe_inputs(vocab_size, max_len, mask_id)
    pa, pb = _run(a_sess, probe)["masked_lm_log_probs"], _run(b_sess, probe)["masked_lm_log_probs"]
    probe_rep = drift_report(pa, np.zeros_like(pa), pb, np.zeros_like(pb), probe["masked_lm_positions"])
    rep.update({"baseline": "onnx fp32", "method": spec.describe(), "config": spec.to_dict(),
                "file": ONNX_INT8_NAME, "inputs": "random masked copies (drift_inputs)",
                "cpu": int8_class(), "cpu_flags": sorted(cpu_flags()),
                "probe": {**{k: v.tolist() for k, v in probe.items()}, "fp32": pa.tolist(), "int8": pb.tolist(),
                          "mean_abs_diff": probe_rep["mean_abs_diff"], "max_abs_diff": probe_rep["max_abs_diff"],
                          "cpu": int8_class()}})
    return rep


def write_onnx(version_dir: str | os.PathLike, ckpt, quantize: str | None = None, *,
               tolerance: float = DEFAULT_TOLERANCE, int8_spec: Int8Spec = DEFAULT_INT8,
               log: Callable[[str], None] = print) -> Path:
    """Write ``model.onnx`` (and with ``quantize="int8"`` ``model.int8.onnx``) into an export's version dir.

    ``version_dir`` is what ``mlm_export.export`` returned; ``ckpt`` the Checkpoint it was made from (its
    checksum, in the manifest's ``checksum_scheme``, must equal the manifest's ``model_checksum``). Each file
    is written to the run's own temporary name (``fsutil.temp_path``: created exclusively, never through a
    symlink; a killed run's are removed by the next), verified with ONNX Runtime against the float64 NumPy
    reference (VerificationError above ``tolerance``), then renamed into place; the manifest gains an
    ``onnx`` entry (file, sha256, opset, verification) and, for int8, ``reduced_precision["onnx-int8"]``
    (drift vs fp32, also printed with ``log``, and the probe). Without ``quantize`` a stale
    ``model.int8.onnx`` from an earlier run is removed. Returns the fp32 path.

    Raises UsageError, before any work, if ``model.onnx``, ``model.int8.onnx`` or the manifest is not
    absent or a regular file (a symlink, a device, a FIFO, a directory: never followed or replaced);
    ImportError (naming the extra) if onnx / onnxruntime are missing, ValueError for a checkpoint that is
    not the export's, VerificationError above ``tolerance`` or for an int8 model that drifts past
    INT8_MAX_MEAN_ABS_DIFF / INT8_MIN_TOP1_AGREEMENT on this CPU. Nothing is left behind on failure: no
    temporary file, and no int8 file that this CPU would refuse.
    """
    from mlm_scorer.fsutil import (check_target, create_exclusive, default_file_mode, identity, remove_debris,
                                   replace_file, safe_unlink, temp_path)
    from mlm_scorer.model_dir import MANIFEST_NAME, load_manifest, sha256_file

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    vdir = Path(version_dir)
    final, final8 = vdir / ONNX_NAME, vdir / ONNX_INT8_NAME
    targets = ((final, "the ONNX model"), (final8, "the int8 ONNX model"), (vdir / MANIFEST_NAME, MANIFEST_WHAT))
    for path, what in targets:  # model.int8.onnx too without --quantize: a stale one is deleted
        check_target(path, what)
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"writing ONNX needs {', '.join(missing)}: pip install 'mlm-scorer[onnx-export]'")
    manifest = load_manifest(vdir)  # checked: a missing or malformed key is a ModelError naming it
    if manifest.get("model_checksum") != ckpt.checksum(scheme=manifest.get("checksum_scheme", 1)):
        raise ValueError(f"{vdir} was exported from different weights than the checkpoint given "
                         f"(model_checksum mismatch); pass the checkpoint the export was made from")
    top_k = int(manifest["top_k"])
    max_len = int(manifest["max_seq_length"])
    for f in (final, final8):
        remove_debris(f)  # temporary files of runs that were killed
    made: dict[Path, tuple[int, int]] = {}

    def write_temp(dest: Path, int8: Int8Spec | None = None, mask_id: int | None = None) -> Path:
        tmp = temp_path(dest)
        fd = create_exclusive(tmp)
        made[tmp] = identity(os.fstat(fd))
        with os.fdopen(fd, "wb") as f:
            write_graph(ckpt.config, ckpt.weights, top_k, f, int8=int8, mask_id=mask_id)
            f.flush()
            os.fsync(f.fileno())  # on disk before the manifest that records its sha256 is
        os.chmod(tmp, default_file_mode())  # as any file the process creates: a server may run as another user
        return tmp

    try:
        tmp = write_temp(final)
        mask_id = (manifest.get("special_token_ids") or {}).get("mask")
        report = verify_onnx(tmp, ckpt, max_len=max_len, top_k=top_k, tolerance=tolerance, mask_id=mask_id)
        log(f"verified {final}: max |Δ log-prob| vs the source weights = {report['max_abs_diff']:.2e} "
            f"(tolerance {tolerance:g}, {report['n_predictions']} predictions, ONNX Runtime)")
        entry: dict[str, Any] = {"file": ONNX_NAME, "opset": OPSET, "graph_revision": GRAPH_REVISION,
                                 "sha256": sha256_file(tmp), "inputs": INPUT_NAMES, "outputs": OUTPUT_NAMES,
                                 "writer": "onnx.helper (mlm_export.onnx_graph)",
                                 "verification": report, "versions": _versions()}
        drift = tmp8 = None
        if quantize == "int8":
            tmp8 = write_temp(final8, int8_spec, mask_id)
            drift = int8_drift(tmp, tmp8, vocab_size=ckpt.config.vocab_size, max_len=max_len, mask_id=mask_id,
                               spec=int8_spec)
            if drift["mean_abs_diff"] > INT8_MAX_MEAN_ABS_DIFF or drift["top1_agreement"] < INT8_MIN_TOP1_AGREEMENT:
                raise VerificationError(
                    f"int8 quantization drifts too far from fp32 on this CPU ({drift['cpu']}): mean |Δ log-prob| "
                    f"{drift['mean_abs_diff']:.3f} (at most {INT8_MAX_MEAN_ABS_DIFF}), top-1 agreement "
                    f"{drift['top1_agreement']:.1%} (at least {INT8_MIN_TOP1_AGREEMENT:.0%}); export without "
                    f"--quantize and score in fp32")
            entry["int8"] = {"file": ONNX_INT8_NAME, "sha256": sha256_file(tmp8), "config": int8_spec.to_dict()}
        for path, what in targets:  # again before the first rename: nothing put there during the minutes above
            check_target(path, what)
        replace_file(tmp, final, "the ONNX model")
        updates: dict[str, Any] = {"onnx": entry}
        rp = dict(manifest.get("reduced_precision") or {})
        if rp.pop("onnx-int8", None) is not None:  # an earlier int8 report no longer describes the files
            updates["reduced_precision"] = rp
        if tmp8 is not None:
            replace_file(tmp8, final8, "the int8 ONNX model")
        else:  # a stale int8 file from an earlier run no longer matches (a regular file: checked above)
            safe_unlink(final8)
        update_manifest(vdir, updates, merge_keys=(), what=MANIFEST_WHAT)
        if drift is not None:
            record_drift(vdir, "onnx-int8", drift, log=log)
    finally:
        for t, ident in made.items():  # only the files this run created, still the ones it created
            safe_unlink(t, identity_of=ident)
    return final


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
