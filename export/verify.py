"""Check an export against its source weights on generated inputs.

The reference is an independent NumPy forward pass over the checkpoint's arrays (float64), so the check
needs nothing beyond NumPy; it covers the graph, the weight renaming and the SavedModel round trip.
Inputs are random ids with random padding and random masked positions (some slots left unused), which
exercise the attention mask, the gather and the slot padding, and one copy as long as max_seq_length,
so that every position the export accepts is used (a weight damaged only at late positions shows).
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


def _rotate(t, positions, inv_freq):
    """Rotary positions: t [B,N,Q,D] at ``positions`` [B|1,Q] -> t*cos + rotate_half(t)*sin."""
    freqs = positions[..., None] * inv_freq  # [B,Q,D/2]
    angles = np.concatenate([freqs, freqs], -1)[:, None]  # [B,1,Q,D]
    half = t.shape[-1] // 2
    return t * np.cos(angles) + np.concatenate([-t[..., half:], t[..., :half]], -1) * np.sin(angles)


def reference_log_probs(cfg, w, input_ids, input_mask, segment_ids, positions) -> np.ndarray:
    """[B,T] int arrays + [B,P] positions -> [B,P,V] float64 log-probs. Plain NumPy, every family.

    Every layer runs at every position (no pruning of the last layer) and the head at the gathered ones.
    """
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    B, T = input_ids.shape
    N = cfg.num_attention_heads
    D = cfg.hidden_size // N
    eps = cfg.layer_norm_eps
    x = w["bert/embeddings/word_embeddings"][input_ids]
    if cfg.token_dropout:
        is_mask = (input_ids == cfg.mask_token_id).astype(np.float64)
        observed = is_mask.sum(-1) / input_mask.sum(-1)
        x = x * (1.0 - is_mask)[..., None] * ((1.0 - 0.15 * 0.8) / (1.0 - observed))[:, None, None]
    if cfg.type_vocab_size:
        x = x + w["bert/embeddings/token_type_embeddings"][segment_ids]
    if not cfg.rotary:
        off = cfg.position_offset
        x = x + w["bert/embeddings/position_embeddings"][off:off + T][None]
    if cfg.embedding_layer_norm:
        x = _layer_norm(x, w["bert/embeddings/LayerNorm/gamma"], w["bert/embeddings/LayerNorm/beta"], eps)
    if "bert/embeddings_project/kernel" in w:
        x = x @ w["bert/embeddings_project/kernel"] + w["bert/embeddings_project/bias"]
    bias = (1.0 - input_mask[:, None, None, :]) * -10000.0
    for i in range(cfg.num_hidden_layers):
        p = f"bert/encoder/layer_{i}/"

        def lin(t, name):
            return t @ w[p + name + "/kernel"] + w[p + name + "/bias"]

        def split(t):
            return t.reshape(B, T, N, D).transpose(0, 2, 1, 3)

        def norm(t, name):
            return _layer_norm(t, w[p + name + "/gamma"], w[p + name + "/beta"], eps)

        h = norm(x, "attention/LayerNorm") if cfg.pre_layer_norm else x
        q, k, v = (split(lin(h, f"attention/self/{n}")) for n in ("query", "key", "value"))
        if cfg.rotary:
            q, k = (_rotate(t, np.arange(T)[None], w["bert/encoder/rotary/inv_freq"]) for t in (q, k))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(B, T, N * D)
        if cfg.pre_layer_norm:
            x = x + lin(ctx, "attention/output/dense")
            x = x + lin(_act(cfg.hidden_act, lin(norm(x, "LayerNorm"), "intermediate/dense")), "output/dense")
        else:
            x = norm(x + lin(ctx, "attention/output/dense"), "attention/output/LayerNorm")
            x = norm(x + lin(_act(cfg.hidden_act, lin(x, "intermediate/dense")), "output/dense"), "output/LayerNorm")
    if cfg.pre_layer_norm:
        x = _layer_norm(x, w["bert/encoder/LayerNorm/gamma"], w["bert/encoder/LayerNorm/beta"], eps)
    g = np.take_along_axis(x, positions[..., None], axis=1)  # [B,P,H]
    g = _act(cfg.head_act or cfg.hidden_act,
             g @ w["cls/predictions/transform/dense/kernel"] + w["cls/predictions/transform/dense/bias"])
    g = _layer_norm(g, w["cls/predictions/transform/LayerNorm/gamma"], w["cls/predictions/transform/LayerNorm/beta"],
                    eps)
    logits = g @ w["bert/embeddings/word_embeddings"].T + w["cls/predictions/output_bias"]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def generated_inputs(vocab_size: int, max_len: int, seed: int = 0, batch: int = 3, mask_id: int | None = None):
    """Random [B,T] ids (padded with id 0), mask and zero segments, [B,P] positions and targets; some
    prediction slots unused. With ``mask_id`` the masked positions hold it, as in the scorer's copies (and
    no other position does)."""
    rng = np.random.default_rng(seed)
    T = min(max_len, 12)
    P = 3
    ids = rng.integers(0, vocab_size, size=(batch, T)).astype(np.int32)
    if mask_id is not None:
        ids[ids == mask_id] = (mask_id + 1) % vocab_size
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
        if mask_id is not None:
            ids[b, pos[b, :n]] = mask_id
    return ids, mask, seg, pos, tgt


def full_length_inputs(vocab_size: int, max_len: int, seed: int = 1, mask_id: int | None = None, slots: int = 8):
    """One copy of ``max_len`` real tokens (every position the export accepts is used) with ``slots``
    predictions spread from the second position to the last: a weight that is wrong only at late positions
    (NaN in rows 100-127 of the position embeddings) shows in every output, through attention."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(1, max_len)).astype(np.int32)
    if mask_id is not None:
        ids[ids == mask_id] = (mask_id + 1) % vocab_size
    mask = np.ones_like(ids)
    pos = np.unique(np.linspace(1, max_len - 1, num=min(slots, max_len - 1)).astype(np.int32))[None]
    tgt = rng.integers(0, vocab_size, size=pos.shape).astype(np.int32)
    if mask_id is not None:
        ids[0, pos[0]] = mask_id
    return ids, mask, np.zeros_like(ids), pos, tgt


def nonfinite_weights(weights: dict) -> list[str]:
    """Where the weights hold NaN or inf: "name (n values; rows a-b)" for each such tensor."""
    out = []
    for name, w in sorted(weights.items()):
        bad = ~np.isfinite(np.asarray(w, np.float64))
        if bad.any():
            rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1)) if bad.ndim > 1 else None
            where = f"; rows {rows[0]}-{rows[-1]}" if rows is not None and len(rows) else ""
            out.append(f"{name} ({int(bad.sum())} values{where})")
    return out


def verify_export(version_dir: str | Path, ckpt, *, max_len: int, tolerance: float, mask_id: int | None = None) -> dict:
    """Compare the SavedModel in ``version_dir`` with the NumPy reference over ``ckpt``'s weights: on generated
    short inputs (recorded as the identity probe) and on one copy of ``max_len`` tokens, so every position the
    export accepts is covered. Every log-prob must be finite and within ``tolerance``; VerificationError
    otherwise (naming the weights that hold NaN or inf, where some do)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    fn = loaded.signatures["serving_default"]
    full = full_length_inputs(ckpt.config.vocab_size, max_len, mask_id=mask_id)
    f_ids, f_mask, f_seg, f_pos, f_tgt = full
    f_out = fn(input_ids=tf.constant(f_ids), input_mask=tf.constant(f_mask), segment_ids=tf.constant(f_seg),
               masked_lm_positions=tf.constant(f_pos), masked_lm_ids=tf.constant(f_tgt))
    f_got = f_out["masked_lm_log_probs"].numpy()
    f_ref = np.take_along_axis(reference_log_probs(ckpt.config, ckpt.weights, f_ids, f_mask, f_seg, f_pos),
                               f_tgt[..., None], axis=-1)[..., 0]
    if not (np.all(np.isfinite(f_got)) and np.all(np.isfinite(f_out["top_k_log_probs"].numpy()))):
        bad = nonfinite_weights(ckpt.weights)
        raise VerificationError(
            f"the exported model gives NaN or infinite log-probs on a copy of {max_len} tokens (max_seq_length)"
            + (f": the weights hold non-finite values: {'; '.join(bad)}" if bad else "")
            + ". Fix the checkpoint, or export a shorter --max-seq-length that avoids the damaged positions")
    full_diff = float(np.max(np.abs(f_got - f_ref)))
    ids, mask, seg, pos, tgt = generated_inputs(ckpt.config.vocab_size, max_len, mask_id=mask_id)
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
    if not np.all(np.isfinite(got)):
        raise VerificationError("the exported model gives NaN or infinite log-probs on the generated inputs"
                                + (f": the weights hold non-finite values: {'; '.join(nonfinite_weights(ckpt.weights))}"
                                   if nonfinite_weights(ckpt.weights) else ""))
    diff = max(diff, full_diff)
    report = {"max_abs_diff": diff, "tolerance": tolerance, "n_predictions": int(valid.sum()) + int(f_pos.size),
              "positions_checked": max_len,
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
