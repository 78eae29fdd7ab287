"""TensorRT engine (``--engine tensorrt --engine-file PLAN``): runs a plan built by
``python -m mlm_export.to_tensorrt``.

Written from NVIDIA's TensorRT 10 Python API documentation (Runtime.deserialize_cuda_engine,
IExecutionContext.set_optimization_profile_async / set_input_shape / set_tensor_address /
execute_async_v3). NOT RUN on the development machines (no GPU, TensorRT not installable); the pure logic
it relies on (profile choice, shape bucketing, batch and slot splitting: ``_shapes.py`` and ``plan_chunks``
below) is unit-tested. Device buffers and the CUDA stream come from torch (``mlm-scorer[tensorrt]`` pulls it).

Per batch (int32 [B,T] / [B,P] arrays):
  1. T is rounded up to a multiple of 8 within the chosen profile (fewer distinct shapes; padding tokens
     have input_mask 0, so results are unchanged);
  2. the profile with the tightest sequence range that accepts T is chosen (``choose_profile``);
  3. rows are split into balanced chunks of at most the profile's max batch; prediction slots beyond the
     profile's max predictions are run as extra column chunks (slots are independent);
  4. inputs go to the GPU in one pinned host->device copy; every chunk is enqueued on one stream with
     ``execute_async_v3`` writing into slices of whole-batch output buffers; one device->host copy and a
     single synchronize at the end.

Options: engine_file (default ``<version>/model.plan``), device ("cuda" or "cuda:N"), precision (if given,
must match the plan's manifest: "fp16" or "fp32").
"""
from __future__ import annotations

import json
import re
from pathlib import Path


from ..errors import EngineError, MissingDependencyError, ModelError, UsageError
from ..model_dir import ModelDir
from ._shapes import Profile, choose_profile, split_ranges
from .base import INPUT_NAMES, OUTPUT_NAMES, Batch, BatchResult, Engine

SEQ_MULTIPLE = 8


def bucket_seq(T: int, profile: Profile, multiple: int = SEQ_MULTIPLE) -> int:
    """T rounded up to a multiple of ``multiple``, clamped to the profile's seq range (never below T)."""
    t = -(-T // multiple) * multiple
    return int(max(min(t, profile.seq[2]), T, profile.seq[0]))


def plan_chunks(profiles: list[Profile], B: int, T: int, P: int) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """Work plan for a [B,T]/[B,P] batch: (profile index, bucketed T, chunks (row0, row1, slot0, slot1)).

    Pure logic (unit-tested): rows split to the profile's max batch, slots split to its max predictions.
    Raises ValueError if no profile accepts sequence length T.
    """
    fits = [p for p in profiles if p.seq[0] <= T <= p.seq[2]]
    if not fits:
        raise ValueError(f"no optimization profile accepts sequence length {T} (profiles' seq ranges: "
                         f"{[p.seq for p in profiles]}); rebuild the plan with a larger --max-seq")
    # With P above every profile's max, choose by T only and split the slots.
    p_eff = min(P, max(p.predictions[2] for p in fits))
    idx = choose_profile(profiles, T, max(p_eff, 1))
    prof = profiles[idx]
    Tb = bucket_seq(T, prof)
    cols = split_ranges(P, prof.predictions[2]) if P > 0 else [(0, 0)]
    rows = split_ranges(B, prof.batch[2])
    return idx, Tb, [(r0, r1, c0, c1) for (r0, r1) in rows for (c0, c1) in cols]


def load_plan_manifest(plan: Path) -> dict:
    path = Path(str(plan) + ".json")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: build the plan with python -m mlm_export.to_tensorrt") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or "profiles" not in m:
        raise ModelError(f"{path} is not a TensorRT plan manifest (no profiles)")
    return m


class TensorRTEngine(Engine):
    name = "tensorrt"
    OPTIONS = {"engine_file": "the TensorRT plan (default: the export's model.plan)", "device": "cuda[:N]",
               "precision": "the plan's precision, checked against it"}

    def __init__(self, model: ModelDir, *, top_k: bool = False, engine_file: str | None = None,
                 device: str = "cuda", precision: str | None = None, **options):
        if options:
            raise UsageError(f"engine 'tensorrt' does not take option(s): {', '.join(sorted(options))}; "
                             f"it takes engine_file, device, precision")
        if not re.fullmatch(r"cuda(:\d+)?", device):
            raise UsageError(f"engine 'tensorrt' runs on a CUDA GPU: device must be cuda[:N], not {device!r}")
        plan = Path(engine_file) if engine_file else model.path / "model.plan"
        if not plan.is_file():
            raise UsageError(f"TensorRT plan {plan} not found: build it with python -m mlm_export.to_tensorrt "
                             f"{model.path} [--out FILE], then pass --engine-file FILE")
        manifest = load_plan_manifest(plan)
        if manifest.get("model_checksum") != model.checksum:
            raise ModelError(f"{plan} was built from a different export (model_checksum mismatch); rebuild it")
        if precision is not None and precision != manifest.get("precision"):
            raise UsageError(f"{plan} was built for {manifest.get('precision')}, not {precision}; rebuild it "
                             f"with{'out' if precision == 'fp16' else ''} --fp32")
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise MissingDependencyError(f"engine 'tensorrt' needs {exc.name}: pip install 'mlm-scorer[tensorrt]' "
                                         f"(on a machine with an NVIDIA GPU)") from exc
        if not torch.cuda.is_available():
            raise UsageError("engine 'tensorrt' needs a CUDA GPU; torch.cuda.is_available() is False")
        if manifest.get("tensorrt_version") != trt.__version__:
            raise ModelError(f"{plan} was built with TensorRT {manifest.get('tensorrt_version')}, this is "
                             f"{trt.__version__}: plans are not portable across versions; rebuild it")
        self._trt, self._torch = trt, torch
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        gpu = torch.cuda.get_device_name(self.device)
        if manifest.get("gpu", {}).get("name") not in (None, gpu):
            raise ModelError(f"{plan} was built on {manifest['gpu']['name']}, this GPU is {gpu}; rebuild it here")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT could not deserialize {plan}")
        self._engine = engine
        self._ctx = engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device)
        self.model, self.want_top_k, self.plan = model, top_k, plan
        self.precision = manifest.get("precision")
        self.k = model.top_k
        # Profiles from the engine itself (authoritative), checked against the manifest.
        self.profiles = []
        for i in range(engine.num_optimization_profiles):
            ids = engine.get_tensor_profile_shape("input_ids", i)  # [min, opt, max] shapes
            pos = engine.get_tensor_profile_shape("masked_lm_positions", i)
            self.profiles.append(Profile(batch=(ids[0][0], ids[1][0], ids[2][0]), seq=(ids[0][1], ids[1][1], ids[2][1]),
                                         predictions=(pos[0][1], pos[1][1], pos[2][1])))
        self._active = None
        self.max_batch_size = None  # splitting is done here, per profile

    def score_batch(self, batch: Batch) -> BatchResult:
        """int32 [B,T]/[B,P] arrays in; log_probs float32 [B,P] (+ top-k int32/float32 [B,P,k]) out."""
        torch = self._torch
        B, T = batch.input_ids.shape
        P = batch.masked_lm_positions.shape[1]
        try:
            idx, Tb, chunks = plan_chunks(self.profiles, B, T, P)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        from ._shapes import bucket_batch

        host = bucket_batch(batch.as_dict(), Tb, P)  # pad T only; slots are split, not padded
        with torch.cuda.stream(self._stream):
            dev = {k: torch.from_numpy(v).pin_memory().to(self.device, non_blocking=True) for k, v in host.items()}
            out = {"masked_lm_log_probs": torch.empty((B, P), dtype=torch.float32, device=self.device),
                   "top_k_ids": torch.empty((B, P, self.k), dtype=torch.int32, device=self.device),
                   "top_k_log_probs": torch.empty((B, P, self.k), dtype=torch.float32, device=self.device)}
            if self._active != idx:
                self._ctx.set_optimization_profile_async(idx, self._stream.cuda_stream)
                self._active = idx
            keep = []
            for r0, r1, c0, c1 in chunks:
                # Column chunks are not contiguous in [B,P] buffers: stage them in contiguous temporaries.
                whole_cols = (c0, c1) == (0, P)
                bufs = {}
                for name in INPUT_NAMES:
                    t = dev[name][r0:r1]
                    if name in ("masked_lm_positions", "masked_lm_ids") and not whole_cols:
                        t = t[:, c0:c1].contiguous()
                    bufs[name] = t
                    self._ctx.set_input_shape(name, tuple(t.shape))
                    self._ctx.set_tensor_address(name, t.data_ptr())
                outs = {}
                for name in OUTPUT_NAMES:
                    o = out[name][r0:r1]
                    if not whole_cols:
                        o = torch.empty_like(o[:, c0:c1]).contiguous()
                    outs[name] = o
                    self._ctx.set_tensor_address(name, o.data_ptr())
                if not self._ctx.execute_async_v3(self._stream.cuda_stream):
                    raise EngineError(f"TensorRT execute_async_v3 failed on rows {r0}:{r1}, slots {c0}:{c1}")
                if not whole_cols:
                    for name in OUTPUT_NAMES:
                        out[name][r0:r1, c0:c1].copy_(outs[name])
                keep.append((bufs, outs))  # alive until the synchronize below
            names = OUTPUT_NAMES if self.want_top_k else OUTPUT_NAMES[:1]
            host_out = {n: out[n].to("cpu", non_blocking=True) for n in names}
        self._stream.synchronize()
        res = BatchResult(log_probs=host_out["masked_lm_log_probs"].numpy())
        if self.want_top_k:
            res.top_k_ids = host_out["top_k_ids"].numpy()
            res.top_k_log_probs = host_out["top_k_log_probs"].numpy()
        return res

    def close(self) -> None:
        self._ctx = None
        self._engine = None
