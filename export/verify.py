"""Check an export against its source weights on generated inputs.

The reference is an independent NumPy forward pass over the checkpoint's arrays (float64), so the check
needs nothing beyond NumPy; it covers the graph, the weight renaming and the SavedModel round trip.
Inputs are random ids with random padding and random masked positions (some slots left unused), which
exercise the attention mask, the gather and the slot padding.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


class VerificationError(Exception):
    """The reloaded export does not match its source weights within tolerance."""


def _layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _act(name, x):
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_log_probs(cfg, w, input_ids, input_mask, segment_ids, positions) -> np.ndarray:
    """[B,T] int arrays + [B,P] positions -> [B,P,V] float64 log-probs. Plain NumPy BERT."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    B, T = input_ids.shape
    N = cfg.num_attention_heads
    D = cfg.hidden_size // N
    eps = cfg.layer_norm_eps
    x = (w["bert/embeddings/word_embeddings"][input_ids] + w["bert/embeddings/token_type_embeddings"][segment_ids]
         + w["bert/embeddings/position_embeddings"][:T][None])
    x = _layer_norm(x, w["bert/embeddings/LayerNorm/gamma"], w["bert/embeddings/LayerNorm/beta"], eps)
    bias = (1.0 - input_mask[:, None, None, :]) * -10000.0
    for i in range(cfg.num_hidden_layers):
        p = f"bert/encoder/layer_{i}/"

        def lin(t, name):
            return t @ w[p + name + "/kernel"] + w[p + name + "/bias"]

        def split(t):
            return t.reshape(B, T, N, D).transpose(0, 2, 1, 3)

        q, k, v = (split(lin(x, f"attention/self/{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(B, T, N * D)
        x = _layer_norm(x + lin(ctx, "attention/output/dense"), w[p + "attention/output/LayerNorm/gamma"],
                        w[p + "attention/output/LayerNorm/beta"], eps)
        h = _act(cfg.hidden_act, lin(x, "intermediate/dense"))
        x = _layer_norm(x + lin(h, "output/dense"), w[p + "output/LayerNorm/gamma"], w[p + "output/LayerNorm/beta"], eps)
    g = np.take_along_axis(x, positions[..., None], axis=1)  # [B,P,H]
    g = _act(cfg.hidden_act, g @ w["cls/predictions/transform/dense/kernel"] + w["cls/predictions/transform/dense/bias"])
    g = _layer_norm(g, w["cls/predictions/transform/LayerNorm/gamma"], w["cls/predictions/transform/LayerNorm/beta"], eps)
    logits = g @ w["bert/embeddings/word_embeddings"].T + w["cls/predictions/output_bias"]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def generated_inputs(vocab_size: int, max_len: int, seed: int = 0, batch: int = 3):
    rng = np.random.default_rng(seed)
    T = min(max_len, 12)
    P = 3
    ids = rng.integers(0, vocab_size, size=(batch, T)).astype(np.int32)
    lengths = rng.integers(3, T + 1, size=batch)
    lengths[0] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * mask
    seg = np.zeros_like(ids)
    pos = np.zeros((batch, P), np.int32)
    tgt = np.zeros((batch, P), np.int32)
    for b in range(batch):
        n = int(rng.integers(1, P + 1)) if b else P  # leave some slots unused
        pos[b, :n] = rng.integers(1, lengths[b], size=n)  # any real, non-[CLS] position
        tgt[b, :n] = rng.integers(0, vocab_size, size=n)
    return ids, mask, seg, pos, tgt


def verify_export(version_dir: str | Path, ckpt, *, max_len: int, tolerance: float) -> dict:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    fn = loaded.signatures["serving_default"]
    ids, mask, seg, pos, tgt = generated_inputs(ckpt.config.vocab_size, max_len)
    out = fn(input_ids=tf.constant(ids), input_mask=tf.constant(mask), segment_ids=tf.constant(seg),
             masked_lm_positions=tf.constant(pos), masked_lm_ids=tf.constant(tgt))
    got = out["masked_lm_log_probs"].numpy()
    ref_full = reference_log_probs(ckpt.config, ckpt.weights, ids, mask, seg, pos)
    ref = np.take_along_axis(ref_full, tgt[..., None], axis=-1)[..., 0]
    valid = pos > 0
    ref = np.where(valid, ref, 0.0)
    diff = float(np.max(np.abs(got - ref)))
    if "log_prob" in loaded.signatures:  # the scorer's path without top-k: held to the same reference
        lp = loaded.signatures["log_prob"](input_ids=tf.constant(ids), input_mask=tf.constant(mask),
                                           segment_ids=tf.constant(seg), masked_lm_positions=tf.constant(pos),
                                           masked_lm_ids=tf.constant(tgt))["masked_lm_log_probs"].numpy()
        diff = max(diff, float(np.max(np.abs(lp - ref))))
    k = out["top_k_ids"].shape[-1]
    ref_top = np.argsort(-ref_full, axis=-1)[..., :k]
    top1_agree = float(np.mean((out["top_k_ids"].numpy()[..., 0] == ref_top[..., 0])[valid]))
    if not np.all(out["top_k_ids"].numpy()[~valid] == -1):
        raise VerificationError("unused prediction slots did not return top_k_ids = -1")
    report = {"max_abs_diff": diff, "tolerance": tolerance, "n_predictions": int(valid.sum()),
              "top1_agreement": top1_agree, "reference": "numpy float64 forward pass over the source weights",
              # what this export answers to fixed inputs: a client of a remote server replays it to check
              # that the served model is this one (same weights), not just one of the same shape
              "identity_probe": {"input_ids": ids.tolist(), "input_mask": mask.tolist(), "segment_ids": seg.tolist(),
                                 "masked_lm_positions": pos.tolist(), "masked_lm_ids": tgt.tolist(),
                                 "masked_lm_log_probs": got.tolist()}}
    if not diff <= tolerance:
        raise VerificationError(f"the exported model differs from the source weights: max |Δ log-prob| = "
                                f"{diff:.3e} > tolerance {tolerance:g}")
    return report
