"""Build a TensorRT engine (plan) from an export's ``model.onnx``: fp16 with fp32 where fp16 overflows.

    python -m mlm_export.to_tensorrt MODEL_DIR [--out model.plan] [--workload sentences.txt]
        [--max-batch 256] [--opt-batch 128] [--max-seq 128] [--max-predictions 8] [--profiles 2] [--fp32]

Written from NVIDIA's TensorRT 10 Python API documentation (Builder / OnnxParser / IBuilderConfig /
IOptimizationProfile). NOT RUN on the development machines (no GPU, TensorRT not installable): only the
pure parts (profile choice from a workload, manifest contents) are unit-tested; see tests/test_fast_engines.py.

What it does:
  * parses ``<version>/model.onnx`` (``mlm-export --onnx``) with ``trt.OnnxParser``;
  * precision: fp16 enabled (``BuilderFlag.FP16``), and the layers that overflow or lose too much in fp16
    pinned to fp32 with ``layer.precision`` / ``set_output_type`` + ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``:
    normalization (LayerNorm: its variance reduction overflows fp16 — TensorRT itself warns about it),
    softmax / log-softmax, reductions, unary ops (exp, log, erf, sqrt), power, and TopK. The matmuls (the
    time) stay fp16 on tensor cores;
  * optimization profiles for dynamic batch, sequence length and predictions: sequence ranges cut at the
    workload's length quantiles (``mlm_scorer.engines._shapes.profiles_from_workload``), opt at the median;
  * writes the plan and ``<plan>.json`` (the manifest: TensorRT version, GPU name and compute capability,
    profiles, precision, fp32 layer count, the export's model_checksum and the ONNX sha256). A plan only
    runs on the TensorRT version and GPU model it was built for; the runner checks the manifest.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

PLAN_NAME = "model.plan"
MANIFEST_SUFFIX = ".json"
PLAN_FORMAT = "mlm-scorer-tensorrt-plan"


def plan_manifest_path(plan: str | os.PathLike) -> Path:
    return Path(str(plan) + MANIFEST_SUFFIX)


def workload_lengths(model_dir, sentences: Iterable[str]) -> list[int]:
    """Token counts incl. [CLS]/[SEP] of each sentence, with the export's tokenizer (``tokenizers``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir.tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    lines = [s.rstrip("\n") for s in sentences if s.strip()]
    return [len(e.ids) for e in tok.encode_batch(lines)] if lines else []


def plan_manifest(*, model_dir, profiles, precision: str, trt_version: str, gpu: dict[str, Any],
                  fp32_layers: int, onnx_sha256: str, workload: dict[str, Any]) -> dict[str, Any]:
    """The JSON written next to a plan (pure: unit-tested without TensorRT)."""
    return {
        "format": PLAN_FORMAT,
        "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tensorrt_version": trt_version,
        "gpu": gpu,
        "precision": precision,
        "fp32_layers": int(fp32_layers),
        "profiles": [p.to_dict() for p in profiles],
        "model_checksum": model_dir.checksum,
        "onnx_sha256": onnx_sha256,
        "top_k": model_dir.top_k,
        "workload": workload,
        "inputs": ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids"],
        "outputs": ["masked_lm_log_probs", "top_k_ids", "top_k_log_probs"],
    }


def _keep_fp32(trt, network) -> int:
    """Pin overflow-prone layers to fp32. Returns how many layers were pinned."""
    pinned_types = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE,
                    trt.LayerType.UNARY, trt.LayerType.TOPK}
    float_types = {trt.float32, trt.float16}
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pin = layer.type in pinned_types
        if layer.type == trt.LayerType.ELEMENTWISE:
            # get_layer returns the base ILayer; cast to read .op (as polygraphy does). x^2 in a decomposed
            # LayerNorm is the classic fp16 overflow.
            layer.__class__ = trt.IElementWiseLayer
            pin = layer.op == trt.ElementWiseOperation.POW
        if not pin:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not all(o.dtype in float_types or j > 0 for j, o in enumerate(outs)):
            continue  # int/bool outputs (TopK indices are output 1) keep their type
        layer.precision = trt.float32
        for j, o in enumerate(outs):
            if o.dtype in float_types:
                layer.set_output_type(j, trt.float32)
        n += 1
    return n


def build_engine(model_path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 workload_file: str | os.PathLike | None = None, max_batch: int = 256,
                 opt_batch: int | None = None, max_seq: int | None = None, max_predictions: int = 8,
                 n_profiles: int = 2, fp16: bool = True, workspace_gib: float = 4.0, log=print) -> Path:
    """Build and write the plan + manifest; return the plan path. Needs TensorRT >= 10 and a CUDA GPU.
    Both files must be absent or regular files, and neither the ONNX model, the export's manifest nor the
    workload file (UsageError, before TensorRT is loaded)."""
    from mlm_scorer.engines._shapes import profiles_from_workload
    from mlm_scorer.fsutil import atomic_write_bytes, check_distinct, check_target
    from mlm_scorer.model_dir import MANIFEST_NAME, ModelDir, sha256_file

    md = ModelDir.open(model_path)
    onnx_path = md.path / "model.onnx"
    plan = Path(out) if out else md.path / PLAN_NAME
    reads = [(onnx_path, "the ONNX model"), (md.path / MANIFEST_NAME, "the export's manifest")]
    if workload_file:
        reads.append((workload_file, "the workload file"))
    targets = [(plan, "the plan"), (plan_manifest_path(plan), "the plan's manifest")]
    for path, what in targets:
        check_target(path, what, inputs=reads)
    check_distinct(targets)
    try:
        import tensorrt as trt
    except ImportError:
        raise SystemExit("mlm_export.to_tensorrt needs TensorRT (pip install 'mlm-scorer[tensorrt]' on a machine "
                         "with an NVIDIA GPU and driver)") from None
    if not onnx_path.is_file():
        raise SystemExit(f"{onnx_path} is missing: re-export with mlm-export ... --onnx")
    max_seq = int(min(max_seq or md.max_seq_length, md.max_seq_length))
    lengths: list[int] = []
    if workload_file:
        with open(workload_file, encoding="utf-8") as f:
            lengths = workload_lengths(md, f)
    profiles = profiles_from_workload(lengths, max_batch=max_batch, max_seq=max_seq,
                                      max_predictions=max_predictions, opt_batch=opt_batch, n_profiles=n_profiles)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    n_fp32 = 0
    if not fp16:
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; an fp32 plan must be real fp32
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        n_fp32 = _keep_fp32(trt, network)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.input_shapes().items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    log(f"building {plan} ({'fp16 + fp32 for ' + str(n_fp32) + ' overflow-prone layers' if fp16 else 'fp32'}; "
        f"profiles: {[p.to_dict() for p in profiles]}) — this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SystemExit("TensorRT failed to build the engine (see the log above)")
    gpu = _gpu_info()
    manifest = plan_manifest(model_dir=md, profiles=profiles, precision="fp16" if fp16 else "fp32",
                             trt_version=trt.__version__, gpu=gpu, fp32_layers=n_fp32,
                             onnx_sha256=sha256_file(onnx_path),
                             workload={"file": str(workload_file) if workload_file else None,
                                       "n_sentences": len(lengths)})
    atomic_write_bytes(plan, bytes(serialized), what="the plan")
    atomic_write_bytes(plan_manifest_path(plan), (json.dumps(manifest, indent=2) + "\n").encode(),
                       what="the plan's manifest")
    log(f"wrote {plan} and {plan_manifest_path(plan).name} (TensorRT {trt.__version__}, {gpu.get('name')})")
    return plan


def _gpu_info() -> dict[str, Any]:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / (1 << 30), 1)}
    except ImportError:
        pass
    return {"name": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlm_export.to_tensorrt", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="export directory (base or version dir) holding model.onnx")
    ap.add_argument("--out", help=f"plan path (default: <version dir>/{PLAN_NAME}; manifest at <plan>.json)")
    ap.add_argument("--workload", help="text file, one sentence a line: profiles are fitted to its token lengths")
    ap.add_argument("--max-batch", type=int, default=256, help="largest batch a profile accepts (default 256)")
    ap.add_argument("--opt-batch", type=int, default=None, help="batch size to tune for (default: --max-batch)")
    ap.add_argument("--max-seq", type=int, default=None, help="longest copy (default: the export's max_seq_length)")
    ap.add_argument("--max-predictions", type=int, default=8, help="prediction slots per copy (default 8)")
    ap.add_argument("--profiles", type=int, default=2, help="number of sequence-length profiles (default 2)")
    ap.add_argument("--fp32", action="store_true", help="build fp32 only (no fp16)")
    ap.add_argument("--workspace-gib", type=float, default=4.0)
    a = ap.parse_args(argv)
    from mlm_scorer.errors import MlmScorerError

    try:
        plan = build_engine(a.model, a.out, workload_file=a.workload, max_batch=a.max_batch, opt_batch=a.opt_batch,
                            max_seq=a.max_seq, max_predictions=a.max_predictions, n_profiles=a.profiles,
                            fp16=not a.fp32, workspace_gib=a.workspace_gib, log=lambda m: print(m, file=sys.stderr))
    except MlmScorerError as exc:  # not an export; a plan path that is a symlink, a device, or an input
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
