"""ONNX Runtime engine (``--engine onnx``): runs ``<version>/model.onnx`` written by ``mlm-export``.

Options:
  precision: "fp32" (default, ``model.onnx``) or "int8" (``model.int8.onnx`` from ``--quantize int8``;
             its drift against fp32 was printed and recorded in the manifest at export). bf16/fp16 are
             refused here: on CPU the torch engine's bf16 (AMX) path is the faster one.
  device:    "cpu" (default) or "cuda" (needs onnxruntime-gpu with CUDAExecutionProvider).
  streams:   batches scored at once, each on its own thread (default: one per CPU up to
             ``base.MAX_AUTO_STREAMS``; see ``base.plan_streams``); one session serves them all.
             CPU only: refused with device cuda.
  threads:   intra-op threads per stream (alone, without streams: one stream of that many threads).

On CPU the engine asks for batches of ``CPU_BATCH_TOKENS`` padded tokens unless ``--batch-tokens`` is
given: ONNX Runtime's fp32 and int8 products run faster on smaller batches than TensorFlow's do.

The ONNX graph has the SavedModel's inputs and outputs (see ``mlm_export.to_onnx``), so the batch goes in
as is: int32 arrays, outputs float32 [B,P], int32 [B,P,k], float32 [B,P,k].

Checks at open. fp32: the export's identity probe (``base.check_identity``). int8 (``check_int8``): the
int8 file's drift is measured on this CPU, on the probe the exporter recorded with its fp32 answers, and
compared with the drift the exporter measured on its own CPU; the int8 arithmetic of CPUs differs (see
``engines.cpu``), so a file can be right on one machine and wrong on another. Above the bound the file is
refused, and the message names the cause: the file's bytes differ from the ones recorded at export
(replaced or damaged), or they are the same and this CPU computes them differently (e.g. it lacks VNNI).
"""
from __future__ import annotations

import numpy as np

from ..errors import EngineError, MissingDependencyError, ModelError, UsageError
from ..model_dir import ModelDir
from .base import (IDENTITY_TOLERANCE, INPUT_NAMES, Batch, BatchResult, Engine, check_identity, numerics,
                   plan_streams, probe_diff, read_identity_probe, refuse_streams_off_cpu)

_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
#: Padded tokens per batch on CPU when the user sets none (``Engine.preferred_batch_tokens``).
CPU_BATCH_TOKENS = 1024


#: An int8 file is refused at open if its mean |Δ log-prob| on the recorded probe exceeds
#: INT8_DRIFT_FACTOR x the exporter's figure + INT8_DRIFT_MARGIN nats. On CPUs that compute the same
#: integers the two figures agree to float rounding; a saturating CPU gave 5-15x the exporter's figure.
INT8_DRIFT_FACTOR = 2.0
INT8_DRIFT_MARGIN = 0.005


def identity_tolerance(model: ModelDir, precision: str) -> float:
    """The identity probe's tolerance for an export whose int8 record has no probe (written before the
    probe was): fp32's, or for int8 twice the drift recorded when it was quantized."""
    if precision == "fp32":
        return IDENTITY_TOLERANCE
    drift = ((model.manifest.get("reduced_precision") or {}).get(f"onnx-{precision}") or {}).get("max_abs_diff")
    return max(IDENTITY_TOLERANCE, 2 * float(drift)) if isinstance(drift, (int, float)) else 0.5


def check_int8(engine: Engine, model: ModelDir, path) -> dict:
    """Measure the int8 file's drift on this CPU and refuse it (ModelError) where it exceeds the bound.

    The exporter recorded, under ``reduced_precision["onnx-int8"]["probe"]``, a batch of masked copies with
    the fp32 log-probs and the int8 ones on its CPU. Here the int8 answers are computed again and their mean
    |Δ| from fp32 compared with the exporter's: allowed ``INT8_DRIFT_FACTOR`` x it + ``INT8_DRIFT_MARGIN``.
    Past it, the cause is found out: the file's SHA-256 against the one recorded at export (else it was
    replaced or damaged), then this CPU's int8 class against the exporter's (``engines.cpu``). An export
    made before the probe existed is checked with the identity probe instead. Returns
    {"mean_abs_diff": here, "export_mean_abs_diff": ..., "bound": ..., "cpu": ...}.
    """
    from .cpu import int8_class

    rec = (model.manifest.get("reduced_precision") or {}).get("onnx-int8") or {}
    probe = rec.get("probe")
    if not isinstance(probe, dict):
        return _check_int8_legacy(engine, model, path, rec)
    try:
        batch = Batch(**{n: np.asarray(probe[n], np.int32) for n in INPUT_NAMES})
        fp32 = np.asarray(probe["fp32"], np.float32)
        at_export = float(probe["mean_abs_diff"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{model.path}: the int8 probe in the manifest is malformed ({exc}); re-export the "
                         f"model with --quantize int8") from None
    try:
        got = engine.run(batch).log_probs
    except EngineError as exc:
        raise ModelError(f"{path} cannot run the int8 probe recorded in the manifest: {exc}") from None
    used = batch.masked_lm_positions > 0
    here = float(np.mean(np.abs(got - fp32)[used])) if got.shape == fp32.shape else np.inf
    bound = INT8_DRIFT_FACTOR * at_export + INT8_DRIFT_MARGIN
    result = {"mean_abs_diff": here, "export_mean_abs_diff": at_export, "bound": bound, "cpu": int8_class(),
              "export_cpu": probe.get("cpu")}
    if here <= bound:
        return result
    _refuse_drift(model, path, rec, f"int8 drifts {here:.3g} nats per token here on the export's probe against "
                  f"{at_export:.3g} on the exporting CPU ({probe.get('cpu', 'unknown')}; allowed {bound:.3g})")


def _check_int8_legacy(engine: Engine, model: ModelDir, path, rec: dict) -> dict:
    """An int8 file exported before the probe was recorded: the identity probe (fp32 answers) within twice
    the max drift recorded at export; past it, the same diagnosis as ``check_int8``."""
    from .cpu import int8_class

    probe = read_identity_probe(model)
    if probe is None:
        check_identity(engine, model, weights=str(path), tolerance=identity_tolerance(model, "int8"))
        return {}
    batch, expected = probe
    try:
        got = engine.run(batch).log_probs
    except EngineError as exc:
        raise ModelError(f"{path} cannot run the identity probe recorded in the manifest: {exc}") from None
    diff, tol = probe_diff(got, expected), identity_tolerance(model, "int8")
    if diff <= tol:
        return {"max_abs_diff": diff, "bound": tol, "cpu": int8_class()}
    _refuse_drift(model, path, rec, f"on the identity probe int8 differs from fp32 by up to {diff:.3g} nats here "
                  f"(allowed {tol:.3g}, twice the largest drift measured at export)")


def _refuse_drift(model: ModelDir, path, rec: dict, measured: str) -> None:
    """Raise the ModelError that names why the int8 file drifts past its bound here."""
    from ..model_dir import sha256_file
    from ..models import rebuild_hint
    from .cpu import int8_class, int8_exact

    recorded = ((model.manifest.get("onnx") or {}).get("int8") or {}).get("sha256")
    if recorded is None or sha256_file(path) != recorded:
        what = "differ from the ones recorded at export" if recorded else "cannot be checked (no checksum recorded)"
        raise ModelError(f"the weights in {path} {what}: {measured}. The file was replaced or damaged after export. "
                         + rebuild_hint(model, None, "--quantize int8"))
    here, there = int8_class(), (rec.get("probe") or {}).get("cpu") or rec.get("cpu")
    saturation_free = ((rec.get("config") or {}).get("saturation_free") is True)
    if not int8_exact() and not saturation_free:
        cause = (f"this CPU ({here}) lacks VNNI: ONNX Runtime's int8 products add pairs in a saturating 16-bit "
                 f"sum here, and this file's values can overflow it")
        fix = ("use --precision fp32, or re-export with the current mlm-export --quantize int8, whose int8 file "
               "cannot saturate and computes alike on every CPU (" + rebuild_hint(model, None, "--quantize int8")
               + ")")
    else:
        cause = (f"this CPU ({here}) computes this int8 file differently from the CPU that exported it "
                 f"({there or 'unknown'})")
        fix = "use --precision fp32, or quantize on this machine: " + rebuild_hint(model, None, "--quantize int8")
    raise ModelError(f"{path} is not used: {cause}; {measured}. The file itself is intact (its SHA-256 is the "
                     f"one recorded at export). Fix: {fix}")


class OnnxEngine(Engine):
    name = "onnx"
    OPTIONS = {"precision": "fp32 (default) or int8 (the export's model.int8.onnx)", "device": "cpu or cuda",
               "threads": "threads per stream", "streams": "batches in flight at once on the CPU (default: from the CPUs)"}

    def __init__(self, model: ModelDir, *, top_k: bool = False, precision: str = "fp32", device: str = "cpu",
                 threads: int | None = None, streams: int | str | None = None, **options):
        if options:
            raise UsageError(f"engine 'onnx' does not take option(s): {', '.join(sorted(options))}; "
                             f"it takes precision, device, threads, streams")
        if precision not in _FILES:
            raise UsageError(f"engine 'onnx' supports precision fp32 or int8, not {precision!r}"
                             + ("; for bf16 use --engine torch (CPU autocast on AMX)" if precision == "bf16" else "")
                             + ("; for fp16 use --engine torch --device cuda or --engine tensorrt"
                                if precision == "fp16" else ""))
        if device not in ("cpu", "cuda"):
            raise UsageError(f"engine 'onnx' device must be cpu or cuda, not {device!r}")
        refuse_streams_off_cpu(streams, device, engine=self.name)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependencyError("engine 'onnx' needs onnxruntime: pip install 'mlm-scorer[onnx]'") from exc
        path = model.path / _FILES[precision]
        if not path.is_file():
            from ..models import rebuild_hint

            raise ModelError(f"{path} is missing (this export was made without it). "
                             + rebuild_hint(model, None, "--quantize int8" if precision == "int8" else "--onnx"))
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UsageError("device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available; "
                                 f"available: {ort.get_available_providers()})")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if device == "cpu":
            self.streams, threads = plan_streams(streams, threads, engine=self.name)
            # MLAS's fp32 products slow down as a batch grows past ~1000 rows (BENCHMARKS.md, "What batch
            # size?": bert-base, 2 streams, 384 padded tokens per batch 43 copies/s, 3072 tokens 34).
            self.preferred_batch_tokens = CPU_BATCH_TOKENS
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self._sess = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception classes for bad files
            raise ModelError(f"cannot load {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        names = [i.name for i in self._sess.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ModelError(f"{path} has inputs {names}, expected {list(INPUT_NAMES)}; re-export it")
        self.model = model
        self.precision = precision
        self.numerics = numerics(self.name, {"precision": precision}, model)  # names the int8 file (its SHA-256)
        self.device = device
        self.want_top_k = top_k
        self._outputs = (["masked_lm_log_probs", "top_k_ids", "top_k_log_probs"] if top_k
                         else ["masked_lm_log_probs"])
        if precision == "fp32":
            self.identity_diff = check_identity(self, model, weights=str(path))
        else:  # the int8 file's drift on this CPU (its fp32 answers are the manifest's model's: identity too)
            self.int8_check = check_int8(self, model, path)

    def score_batch(self, batch: Batch) -> BatchResult:
        """int32 [B,T]/[B,P] arrays in; log_probs float32 [B,P] (+ top-k int32/float32 [B,P,k]) out."""
        feed = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in batch.as_dict().items()}
        try:
            outs = self._sess.run(self._outputs, feed)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed on a batch of shape {batch.input_ids.shape}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        res = BatchResult(log_probs=np.asarray(outs[0], np.float32))
        if self.want_top_k:
            res.top_k_ids = np.asarray(outs[1], np.int32)
            res.top_k_log_probs = np.asarray(outs[2], np.float32)
        return res

    def close(self) -> None:
        super().close()
        self._sess = None
