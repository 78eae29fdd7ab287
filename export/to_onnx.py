"""Write the exported model as ONNX (``model.onnx``, optionally ``model.int8.onnx``) next to the SavedModel.

The ONNX graph has the SavedModel's ``serving_default`` signature exactly (names, dtypes, slot padding):

  inputs  (int32): input_ids, input_mask, segment_ids [B,T]; masked_lm_positions, masked_lm_ids [B,P]
  outputs:         masked_lm_log_probs float32 [B,P]   (0.0 in unused slots)
                   top_k_ids           int32   [B,P,k] (-1 in unused slots)
                   top_k_log_probs     float32 [B,P,k] (-inf in unused slots)

B, T and P are dynamic axes; k is the manifest's ``top_k``. As in the TF graph, the masked positions are
gathered *before* the vocabulary projection, so the [*,V] matmul runs on B*P rows, not B*T.

It is built as a small ``torch.nn.Module`` directly from the checkpoint's weights (google-research/bert
names, TF kernels [in, out]), so TF-1 sources work as well as Hugging Face ones, and exported with
``torch.onnx.export`` (TorchScript exporter, opset 17: LayerNormalization is a single op). The file is
verified against ``mlm_export.verify.reference_log_probs`` (float64 NumPy, independent of torch and
ONNX) with ONNX Runtime, and refused above the tolerance.

``quantize="int8"`` also writes ``model.int8.onnx`` (ONNX Runtime dynamic quantization: int8 weights of
the MatMuls, activations quantized per batch at run time) and records its drift against fp32 in the
manifest under ``reduced_precision["onnx-int8"]``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import GRAPH_REVISION, BertConfig, weight_shapes
from .drift import drift_inputs, drift_report, record_drift, update_manifest
from .verify import VerificationError, generated_inputs, reference_log_probs

ONNX_NAME = "model.onnx"
ONNX_INT8_NAME = "model.int8.onnx"
OPSET = 17
DEFAULT_TOLERANCE = 1e-4
INPUT_NAMES = ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids"]
OUTPUT_NAMES = ["masked_lm_log_probs", "top_k_ids", "top_k_log_probs"]
#: int8 is refused (not just reported) if its drift exceeds these on the random drift inputs.
INT8_MAX_MEAN_ABS_DIFF = 0.5
INT8_MIN_TOP1_AGREEMENT = 0.5


def build_module(cfg: BertConfig, weights: dict[str, np.ndarray], top_k: int):
    """A torch ``nn.Module`` computing the serving signature from google-research/bert-named weights.

    forward(input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids), all int32 tensors
    ([B,T] x3, [B,P] x2) -> (masked_lm_log_probs float32 [B,P], top_k_ids int32 [B,P,k],
    top_k_log_probs float32 [B,P,k]). Semantics follow ``bert_mlm.py``, the config's family switches
    included: additive attention bias -10000 on padding, erf GELU, LayerNorm eps from the config, tied
    decoder + output_bias, log_softmax.
    """
    import torch
    import torch.nn.functional as F

    if cfg.num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be at least 1, got {cfg.num_hidden_layers}")
    for name in (cfg.hidden_act, cfg.head_act or cfg.hidden_act):
        if name not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu"):
            raise ValueError(f"activation {name!r} is not supported")
    expected = weight_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"weights do not match the config: missing {missing[:5]}")

    def activation(name):
        if name == "gelu":
            return F.gelu
        if name == "relu":
            return F.relu
        return lambda x: F.gelu(x, approximate="tanh")

    act, head_act = activation(cfg.hidden_act), activation(cfg.head_act or cfg.hidden_act)

    class BertMLMModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # Parameter names: the original name with '/' -> '__' ('.' is not allowed in a module name).
            self.w = torch.nn.ParameterDict({
                name.replace("/", "__"): torch.nn.Parameter(torch.from_numpy(
                    np.ascontiguousarray(weights[name], dtype=np.float32)), requires_grad=False)
                for name in expected})
            self.k = int(top_k)
            self.N = cfg.num_attention_heads
            self.D = cfg.hidden_size // cfg.num_attention_heads
            self.eps = float(cfg.layer_norm_eps)
            self.H = cfg.hidden_size

        def p(self, name):
            return self.w[name.replace("/", "__")]

        def dense(self, x, prefix):  # x [rows,H]: 2-D MatMul + Add, which ONNX Runtime fuses into Gemm
            return torch.matmul(x, self.p(prefix + "/kernel")) + self.p(prefix + "/bias")

        def ln(self, x, prefix):
            g = self.p(prefix + "/gamma")
            return F.layer_norm(x, (g.shape[0],), g, self.p(prefix + "/beta"), self.eps)

        def rotary(self, positions):  # int [B|1,Q] -> (cos, sin) [B|1,1,Q,D]
            freqs = positions.float().unsqueeze(-1) * self.p("bert/encoder/rotary/inv_freq")
            angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
            return torch.cos(angles), torch.sin(angles)

        @staticmethod
        def rotate(t, rope):  # t [B,N,Q,D] -> t*cos + rotate_half(t)*sin
            cos, sin = rope
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        def embed(self, input_ids, input_mask, segment_ids):  # [B,T] x3 -> [B*T,H]
            B, T = input_ids.shape[0], input_ids.shape[1]
            ids = input_ids.long()
            x = F.embedding(ids, self.p("bert/embeddings/word_embeddings"))  # [B,T,E]
            if cfg.token_dropout:  # ESM: <mask> rows zeroed, the others rescaled by the row's share of <mask>
                is_mask = (ids == cfg.mask_token_id).float()
                observed = is_mask.sum(-1) / input_mask.float().sum(-1)
                x = x * (1.0 - is_mask).unsqueeze(-1) * ((1.0 - 0.15 * 0.8) / (1.0 - observed))[:, None, None]
            if cfg.type_vocab_size:
                x = x + F.embedding(segment_ids.long(), self.p("bert/embeddings/token_type_embeddings"))
            else:  # no token types: segment_ids is ignored, but stays an input of the ONNX graph (an unused
                x = x + (segment_ids.unsqueeze(-1) * 0).to(x.dtype)  # input would be dropped by the exporter)
            if not cfg.rotary:
                off = cfg.position_offset
                x = x + self.p("bert/embeddings/position_embeddings")[off:off + T].unsqueeze(0)
            x = x.reshape(B * T, cfg.embedding_width)
            if cfg.embedding_layer_norm:
                x = self.ln(x, "bert/embeddings/LayerNorm")
            if cfg.embedding_width != self.H:
                x = self.dense(x, "bert/embeddings_project")
            return x

        def attention(self, x, q_rows, bias, pre, B, T, Q, rope_k, rope_q):
            N, D, H = self.N, self.D, self.H
            q = self.dense(q_rows, pre + "/self/query").reshape(B, Q, N, D).transpose(1, 2)  # [B,N,Q,D]
            k = self.dense(x, pre + "/self/key").reshape(B, T, N, D).transpose(1, 2)  # [B,N,T,D]
            v = self.dense(x, pre + "/self/value").reshape(B, T, N, D).transpose(1, 2)
            if cfg.rotary:
                q, k = self.rotate(q, rope_q), self.rotate(k, rope_k)
            s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D)) + bias  # [B,N,Q,T]
            ctx = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(B * Q, H)
            return self.dense(ctx, pre + "/output/dense")

        def layer(self, x, q_rows, bias, i, B, T, Q, rope_k=None, rope_q=None):
            """Encoder layer i for the rows q_rows [B*Q,H] attending over x [B*T,H] (Q == T but in the last)."""
            lp = f"bert/encoder/layer_{i}"
            pre = lp + "/attention"
            if cfg.pre_layer_norm:  # ESM
                h = self.ln(x, pre + "/LayerNorm")
                h_q = h if q_rows is x else self.ln(q_rows, pre + "/LayerNorm")
                x = q_rows + self.attention(h, h_q, bias, pre, B, T, Q, rope_k, rope_q)
                return x + self.dense(act(self.dense(self.ln(x, lp + "/LayerNorm"), lp + "/intermediate/dense")),
                                      lp + "/output/dense")
            x = self.ln(q_rows + self.attention(x, q_rows, bias, pre, B, T, Q, rope_k, rope_q),
                        pre + "/output/LayerNorm")
            h = act(self.dense(x, lp + "/intermediate/dense"))
            return self.ln(x + self.dense(h, lp + "/output/dense"), lp + "/output/LayerNorm")

        def forward(self, input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids):
            B, T, P, H = input_ids.shape[0], input_ids.shape[1], masked_lm_positions.shape[1], self.H
            x = self.embed(input_ids, input_mask, segment_ids)  # [B*T,H]
            bias = ((1.0 - input_mask.float()) * -10000.0)[:, None, None, :]  # [B,1,1,T]
            pos = masked_lm_positions.long()  # [B,P]
            rope_k = self.rotary(torch.arange(T, device=pos.device).unsqueeze(0)) if cfg.rotary else None
            rope_q = self.rotary(pos) if cfg.rotary else None
            last = cfg.num_hidden_layers - 1
            for i in range(last):
                x = self.layer(x, x, bias, i, B, T, T, rope_k, rope_k)
            # The last layer only at the masked positions (keys/values still from every token), as bert_mlm.py.
            rows = torch.gather(x.reshape(B, T, H), 1, pos.unsqueeze(-1).expand(-1, -1, H)).reshape(B * P, H)
            g = self.layer(x, rows, bias, last, B, T, P, rope_k, rope_q)  # [B*P,H]
            if cfg.pre_layer_norm:
                g = self.ln(g, "bert/encoder/LayerNorm")
            g = head_act(self.dense(g, "cls/predictions/transform/dense"))
            g = self.ln(g, "cls/predictions/transform/LayerNorm").reshape(B, P, cfg.embedding_width)
            logits = (torch.matmul(g, self.p("bert/embeddings/word_embeddings").t())
                      + self.p("cls/predictions/output_bias"))  # [B,P,V]
            log_probs = torch.log_softmax(logits, dim=-1)
            valid = masked_lm_positions > 0  # [B,P]
            target = torch.gather(log_probs, 2, masked_lm_ids.long().unsqueeze(-1)).squeeze(-1)
            target = torch.where(valid, target, torch.zeros_like(target))
            top_lp, top_ids = torch.topk(log_probs, self.k, dim=-1)  # [B,P,k]
            vk = valid.unsqueeze(-1)
            top_lp = torch.where(vk, top_lp, torch.full_like(top_lp, float("-inf")))
            top_ids = torch.where(vk, top_ids.int(), torch.full_like(top_ids.int(), -1))
            return target, top_ids, top_lp

    return BertMLMModule().eval()


def export_onnx_file(module, path: str | os.PathLike, *, opset: int = OPSET) -> None:
    """``torch.onnx.export`` with dynamic batch / sequence / prediction axes; weights embedded in the file."""
    import torch

    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]], dtype=torch.int32)
    mask = (ids > 0).int()
    pos = torch.tensor([[1, 2], [1, 0]], dtype=torch.int32)
    tgt = torch.tensor([[5, 6], [7, 0]], dtype=torch.int32)
    bt = {0: "batch", 1: "seq"}
    bp = {0: "batch", 1: "predictions"}
    dynamic_axes = {"input_ids": bt, "input_mask": bt, "segment_ids": bt, "masked_lm_positions": bp,
                    "masked_lm_ids": bp, "masked_lm_log_probs": bp, "top_k_ids": bp, "top_k_log_probs": bp}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic; the axes are dynamic
        with torch.no_grad():
            torch.onnx.export(module, (ids, mask, torch.zeros_like(ids), pos, tgt), str(path),
                              input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)


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


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """ONNX Runtime dynamic quantization: int8 (signed) MatMul weights, per-channel, activations at run time."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # silence "please consider pre-processing" (a root-logger warning)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)


def int8_drift(fp32_path, int8_path, *, vocab_size: int, max_len: int, mask_id: int | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """Drift of the int8 model against the fp32 one (both with ONNX Runtime) on ``drift_inputs``."""
    feed = drift_inputs(vocab_size, max_len, mask_id=mask_id)
    a = _run(_session(fp32_path, threads), feed)
    b = _run(_session(int8_path, threads), feed)
    rep = drift_report(a["masked_lm_log_probs"], a["top_k_ids"][..., 0], b["masked_lm_log_probs"],
                       b["top_k_ids"][..., 0], feed["masked_lm_positions"])
    rep.update({"baseline": "onnx fp32", "method": "onnxruntime quantize_dynamic QInt8 per-channel MatMul",
                "file": ONNX_INT8_NAME, "inputs": "random masked copies (drift_inputs)"})
    return rep


def write_onnx(version_dir: str | os.PathLike, ckpt, quantize: str | None = None, *,
               tolerance: float = DEFAULT_TOLERANCE, opset: int = OPSET,
               log: Callable[[str], None] = print) -> Path:
    """Write ``model.onnx`` (and with ``quantize="int8"`` ``model.int8.onnx``) into an export's version dir.

    ``version_dir`` is what ``mlm_export.export`` returned; ``ckpt`` the Checkpoint it was made from (its
    checksum must equal the manifest's ``model_checksum``). The file is written to a temporary name,
    verified with ONNX Runtime against the float64 NumPy reference (VerificationError above ``tolerance``),
    then renamed; the manifest gains an ``onnx`` entry (file, sha256, opset, verification) and, for int8,
    ``reduced_precision["onnx-int8"]`` (drift vs fp32, also printed with ``log``). Without ``quantize`` a
    stale ``model.int8.onnx`` from an earlier run is removed. Returns the fp32 path.

    Raises ImportError (naming the extra) if torch / onnxruntime / onnx are missing, ValueError for a
    checkpoint that is not the export's, VerificationError above ``tolerance`` or for an int8 model that
    drifts past INT8_MAX_MEAN_ABS_DIFF / INT8_MIN_TOP1_AGREEMENT. Nothing is left behind on failure.
    """
    import json

    from mlm_scorer.model_dir import MANIFEST_NAME, sha256_file

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    need = ["torch", "onnxruntime"] + (["onnx"] if quantize else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"writing ONNX needs {', '.join(missing)}: pip install 'mlm-scorer[onnx-export]'")
    vdir = Path(version_dir)
    manifest = json.loads((vdir / MANIFEST_NAME).read_text(encoding="utf-8"))
    if manifest.get("model_checksum") != ckpt.checksum():
        raise ValueError(f"{vdir} was exported from different weights than the checkpoint given "
                         f"(model_checksum mismatch); pass the checkpoint the export was made from")
    top_k = int(manifest["top_k"])
    max_len = int(manifest["max_seq_length"])
    module = build_module(ckpt.config, ckpt.weights, top_k)
    final = vdir / ONNX_NAME
    fd, tmp_name = tempfile.mkstemp(prefix=".model.", suffix=".onnx.tmp", dir=vdir)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp8 = vdir / f".model.int8.{os.getpid()}.onnx.tmp"
    try:
        export_onnx_file(module, tmp, opset=opset)
        del module
        mask_id = (manifest.get("special_token_ids") or {}).get("mask")
        report = verify_onnx(tmp, ckpt, max_len=max_len, top_k=top_k, tolerance=tolerance, mask_id=mask_id)
        log(f"verified {final}: max |Δ log-prob| vs the source weights = {report['max_abs_diff']:.2e} "
            f"(tolerance {tolerance:g}, {report['n_predictions']} predictions, ONNX Runtime)")
        entry: dict[str, Any] = {"file": ONNX_NAME, "opset": opset, "graph_revision": GRAPH_REVISION,
                                 "sha256": sha256_file(tmp), "inputs": INPUT_NAMES, "outputs": OUTPUT_NAMES,
                                 "verification": report, "versions": _versions()}
        drift = None
        if quantize == "int8":
            quantize_int8(tmp, tmp8)
            drift = int8_drift(tmp, tmp8, vocab_size=ckpt.config.vocab_size, max_len=max_len, mask_id=mask_id)
            if drift["mean_abs_diff"] > INT8_MAX_MEAN_ABS_DIFF or drift["top1_agreement"] < INT8_MIN_TOP1_AGREEMENT:
                raise VerificationError(
                    f"int8 quantization drifts too far from fp32 (mean |Δ log-prob| {drift['mean_abs_diff']:.3f} "
                    f"> {INT8_MAX_MEAN_ABS_DIFF} or top-1 agreement {drift['top1_agreement']:.1%} < "
                    f"{INT8_MIN_TOP1_AGREEMENT:.0%}); export without --quantize")
            entry["int8"] = {"file": ONNX_INT8_NAME, "sha256": sha256_file(tmp8)}
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, final)
        updates: dict[str, Any] = {"onnx": entry}
        if quantize == "int8":
            os.replace(tmp8, vdir / ONNX_INT8_NAME)
        elif (vdir / ONNX_INT8_NAME).exists():  # a stale int8 file from an earlier run: it no longer matches
            (vdir / ONNX_INT8_NAME).unlink()
            rp = dict(manifest.get("reduced_precision") or {})
            rp.pop("onnx-int8", None)
            updates["reduced_precision"] = rp
        update_manifest(vdir, updates, merge_keys=())
        if drift is not None:
            record_drift(vdir, "onnx-int8", drift, log=log)
    finally:
        for t in (tmp, tmp8):
            if t.exists():
                t.unlink()
    return final


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
