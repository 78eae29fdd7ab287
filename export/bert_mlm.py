"""BERT encoder + masked-LM head in plain TensorFlow, reading weights directly. Top to bottom:
activations, layers, the encoder, the head, and the serving signatures (config and names: config.py).

Variable names follow google-research/bert (``bert/encoder/layer_0/attention/self/query/kernel``,
``cls/predictions/output_bias``), so an original TF-1 checkpoint maps one to one; Hugging Face weights
are renamed to these by ``checkpoint.py``. Shapes in comments: B batch, T sequence, P predictions per
copy, H hidden, N heads, D head size, V vocabulary.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from .config import BertConfig, weight_shapes  # noqa: F401  (config and variable names: no TF needed)

# ----------------------------------------------------------------------------------------- activations

_ACTIVATIONS = {
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),  # erf form, as BERT and HF "gelu"
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: tf.nn.gelu(x, approximate=True),
    "relu": tf.nn.relu,
}

# --------------------------------------------------------------------------------------------- model


class BertMLM(tf.Module):
    """Encoder + MLM head. ``weights`` maps every name of ``weight_shapes(cfg)`` to a numpy array."""

    def __init__(self, cfg: BertConfig, weights: dict[str, np.ndarray], top_k: int = 5):
        super().__init__(name="bert_mlm")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        expected = weight_shapes(cfg)
        missing = sorted(set(expected) - set(weights))
        unused = sorted(set(weights) - set(expected))
        if missing or unused:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}"
                             f"{'…' if len(missing) > 5 else ''}, unused {unused[:5]}{'…' if len(unused) > 5 else ''}")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(weights[name].shape)}, expected {shape}")
        self.cfg = cfg
        self.top_k = int(top_k)
        self._act = _ACTIVATIONS[cfg.hidden_act]
        # tf.Variable names keep the original scope path, so `saved_model_cli` and a TF-1 reader agree.
        self.v = {name: tf.Variable(np.asarray(weights[name], np.float32), name=name.replace("/", "."),
                                    trainable=False) for name in expected}

    # -- layers -------------------------------------------------------------------------------------
    def _dense(self, x, prefix):
        return tf.matmul(x, self.v[prefix + "/kernel"]) + self.v[prefix + "/bias"]

    def _layer_norm(self, x, prefix):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        x = (x - mean) * tf.math.rsqrt(var + self.cfg.layer_norm_eps)
        return x * self.v[prefix + "/gamma"] + self.v[prefix + "/beta"]

    def _attention(self, x, bias, prefix):
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        N = self.cfg.num_attention_heads
        D = self.cfg.hidden_size // N

        def heads(t):  # [B,T,H] -> [B,N,T,D]
            return tf.transpose(tf.reshape(t, [B, T, N, D]), [0, 2, 1, 3])

        q = heads(self._dense(x, prefix + "/self/query"))
        k = heads(self._dense(x, prefix + "/self/key"))
        v = heads(self._dense(x, prefix + "/self/value"))
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(D)) + bias  # [B,N,T,T]
        ctx = tf.matmul(tf.nn.softmax(scores, axis=-1), v)  # [B,N,T,D]
        ctx = tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [B, T, N * D])  # [B,T,H]
        return self._dense(ctx, prefix + "/output/dense")

    # -- encoder ------------------------------------------------------------------------------------
    def encode(self, input_ids, input_mask, segment_ids):
        """int32 [B,T] x3 -> float32 [B,T,H] sequence output."""
        T = tf.shape(input_ids)[1]
        x = (tf.gather(self.v["bert/embeddings/word_embeddings"], input_ids)
             + tf.gather(self.v["bert/embeddings/token_type_embeddings"], segment_ids)
             + self.v["bert/embeddings/position_embeddings"][tf.newaxis, :T])  # [B,T,H]
        x = self._layer_norm(x, "bert/embeddings/LayerNorm")
        # Additive attention bias: 0 for real tokens, -10000 for padding (as the original BERT).
        bias = (1.0 - tf.cast(input_mask, tf.float32))[:, tf.newaxis, tf.newaxis, :] * -10000.0  # [B,1,1,T]
        for i in range(self.cfg.num_hidden_layers):
            p = f"bert/encoder/layer_{i}"
            x = self._layer_norm(x + self._attention(x, bias, p + "/attention"), p + "/attention/output/LayerNorm")
            h = self._act(self._dense(x, p + "/intermediate/dense"))  # [B,T,I]
            x = self._layer_norm(x + self._dense(h, p + "/output/dense"), p + "/output/LayerNorm")
        return x

    # -- head ---------------------------------------------------------------------------------------
    def masked_lm_log_probs(self, sequence_output, masked_lm_positions):
        """Gather the masked positions first, then run the head: [B,T,H] x [B,P] -> [B,P,V] log-probs."""
        gathered = tf.gather(sequence_output, masked_lm_positions, batch_dims=1)  # [B,P,H]
        h = self._act(self._dense(gathered, "cls/predictions/transform/dense"))
        h = self._layer_norm(h, "cls/predictions/transform/LayerNorm")  # [B,P,H]
        logits = tf.einsum("bph,vh->bpv", h, self.v["bert/embeddings/word_embeddings"])
        logits += self.v["cls/predictions/output_bias"]  # [B,P,V], tied decoder + bias
        return tf.nn.log_softmax(logits, axis=-1)

    def _predict(self, input_ids, input_mask, segment_ids, masked_lm_positions):
        seq = self.encode(input_ids, input_mask, segment_ids)
        log_probs = self.masked_lm_log_probs(seq, masked_lm_positions)  # [B,P,V], never leaves the graph
        valid = masked_lm_positions > 0  # slot padding is position 0 ([CLS])
        top_lp, top_ids = tf.math.top_k(log_probs, k=self.top_k)  # [B,P,k]
        top_lp = tf.where(valid[..., tf.newaxis], top_lp, tf.fill(tf.shape(top_lp), -np.inf))
        top_ids = tf.where(valid[..., tf.newaxis], top_ids, -tf.ones_like(top_ids))
        return log_probs, valid, top_ids, top_lp

    # -- serving signatures -------------------------------------------------------------------------
    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([None, None], tf.int32, name="input_mask"),
        tf.TensorSpec([None, None], tf.int32, name="segment_ids"),
        tf.TensorSpec([None, None], tf.int32, name="masked_lm_positions"),
        tf.TensorSpec([None, None], tf.int32, name="masked_lm_ids"),
    ])
    def serve(self, input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids):
        log_probs, valid, top_ids, top_lp = self._predict(input_ids, input_mask, segment_ids, masked_lm_positions)
        target = tf.gather(log_probs, masked_lm_ids, batch_dims=2)  # [B,P]
        return {
            "masked_lm_log_probs": tf.where(valid, target, tf.zeros_like(target)),
            "top_k_ids": top_ids,
            "top_k_log_probs": top_lp,
        }

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([None, None], tf.int32, name="input_mask"),
        tf.TensorSpec([None, None], tf.int32, name="segment_ids"),
        tf.TensorSpec([None, None], tf.int32, name="masked_lm_positions"),
    ])
    def serve_top_k(self, input_ids, input_mask, segment_ids, masked_lm_positions):
        _, _, top_ids, top_lp = self._predict(input_ids, input_mask, segment_ids, masked_lm_positions)
        return {"top_k_ids": top_ids, "top_k_log_probs": top_lp}
