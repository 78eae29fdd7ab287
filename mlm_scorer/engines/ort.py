"""ONNX Runtime engine (``--engine onnx``): runs ``<version>/model.onnx`` written by ``mlm-export --onnx``.

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
"""
from __future__ import annotations

import numpy as np

from ..errors import EngineError, MissingDependencyError, ModelError, UsageError
from ..model_dir import ModelDir
from .base import (IDENTITY_TOLERANCE, INPUT_NAMES, Batch, BatchResult, Engine, check_identity, plan_streams,
                   refuse_streams_off_cpu)

_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
#: Padded tokens per batch on CPU when the user sets none (``Engine.preferred_batch_tokens``).
CPU_BATCH_TOKENS = 1024


def identity_tolerance(model: ModelDir, precision: str) -> float:
    """The identity probe's tolerance: fp32's, or for int8 twice the drift recorded when it was quantized
    (the probe's numbers are fp32's; a model with other weights differs by whole nats)."""
    if precision == "fp32":
        return IDENTITY_TOLERANCE
    drift = ((model.manifest.get("reduced_precision") or {}).get(f"onnx-{precision}") or {}).get("max_abs_diff")
    return max(IDENTITY_TOLERANCE, 2 * float(drift)) if isinstance(drift, (int, float)) else 0.5


class OnnxEngine(Engine):
    name = "onnx"

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
        self.device = device
        self.want_top_k = top_k
        self._outputs = (["masked_lm_log_probs", "top_k_ids", "top_k_log_probs"] if top_k
                         else ["masked_lm_log_probs"])
        self.identity_diff = check_identity(self, model, weights=str(path),
                                            tolerance=identity_tolerance(model, precision))

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
