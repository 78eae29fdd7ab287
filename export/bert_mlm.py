"""BERT encoder + masked-LM head in plain TensorFlow, reading weights directly. Top to bottom:
activations, layers, the encoder, the head, and the serving signatures (config and names: config.py).

Variable names follow google-research/bert (``bert/encoder/layer_0/attention/self/query/kernel``,
``cls/predictions/output_bias``), so an original TF-1 checkpoint maps one to one; Hugging Face weights
are renamed to these by ``checkpoint.py`` (BERT) and ``families.py`` (the others). The other families
are this graph with a few of the config's switches: RoBERTa/XLM-R start positions at an offset;
DistilBERT has no token types; ELECTRA's generator projects narrower embeddings up to H and its head
back down; ESM-2 puts LayerNorm before attention and feed-forward and rotates queries and keys by
position (rotary) instead of adding position embeddings. Shapes in comments: B batch, T sequence, P
predictions per copy, H hidden, E embedding width (H but for ELECTRA), N heads, D head size, V vocabulary.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from .config import LAYER_NORMS, BertConfig, weight_shapes  # noqa: F401  (config and names: no TF needed)

# ----------------------------------------------------------------------------------------- activations

_ACTIVATIONS = {
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),  # erf form, as BERT and HF "gelu"
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: tf.nn.gelu(x, approximate=True),
    "relu": tf.nn.relu,
}

# --------------------------------------------------------------------------------------------- model

#: The signatures' inputs, all int32 with dynamic batch and length: [B,T] x3, then [B,P] x2.
_INPUTS = [tf.TensorSpec([None, None], tf.int32, name=n) for n in
           ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids")]


class BertMLM(tf.Module):
    """Encoder + MLM head. ``weights`` maps every name of ``weight_shapes(cfg)`` to a numpy array."""

    def __init__(self, cfg: BertConfig, weights: dict[str, np.ndarray], top_k: int = 5, layer_norm: str = "fused"):
        super().__init__(name="bert_mlm")
        if layer_norm not in LAYER_NORMS:
            raise ValueError(f"layer_norm must be one of {', '.join(LAYER_NORMS)}, got {layer_norm!r}")
        self.layer_norm = layer_norm
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be at least 1, got {cfg.num_hidden_layers}")
        for act in (cfg.hidden_act, cfg.head_act or cfg.hidden_act):
            if act not in _ACTIVATIONS:
                raise ValueError(f"activation {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
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
        self._head_act = _ACTIVATIONS[cfg.head_act or cfg.hidden_act]
        # tf.Variable names keep the original scope path, so `saved_model_cli` and a TF-1 reader agree.
        self.v = {name: tf.Variable(np.asarray(weights[name], np.float32), name=name.replace("/", "."),
                                    trainable=False) for name in expected}

    # -- layers -------------------------------------------------------------------------------------
    # Hidden states stay 2-D [B*T,H] between layers: a rank-2 MatMul + BiasAdd is what TensorFlow's
    # oneDNN rewrite fuses and runs at full speed; the same product on a rank-3 tensor becomes a
    # broadcasting BatchMatMul that ran at two thirds of the speed (bert-base, 2-core CPU).
    def _dense(self, x, prefix):
        return tf.nn.bias_add(tf.matmul(x, self.v[prefix + "/kernel"]), self.v[prefix + "/bias"])

    def _layer_norm(self, x, prefix):
        """LayerNorm over the last axis of x [M,H] (``layer_norm``: see config.LAYER_NORMS)."""
        gamma, beta, eps = self.v[prefix + "/gamma"], self.v[prefix + "/beta"], self.cfg.layer_norm_eps
        if self.layer_norm == "fused":
            # [M,H] seen as NCHW [1,M,H,1]: batch-norm statistics per "channel" are per-row mean and
            # (biased) variance over H, which is LayerNorm's normalization. oneDNN's rewrite turns this
            # op with the scale and shift after it into one _MklLayerNorm (measured: LayerNorm's share of
            # bert-base's op time 7 % -> 1.7 %).
            M, H = tf.shape(x)[0], int(gamma.shape[0])  # H: the normalized width (E for ELECTRA's embeddings)
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(tf.reshape(x, [1, M, H, 1]), tf.ones([M]), tf.zeros([M]),
                                                       epsilon=eps, data_format="NCHW", is_training=True)
            return tf.reshape(y, [M, H]) * gamma + beta
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + eps) * gamma + beta

    def _heads(self, t, B, T):  # [B*T,H] -> [B,N,T,D]
        N = self.cfg.num_attention_heads
        return tf.transpose(tf.reshape(t, [B, T, N, self.cfg.hidden_size // N]), [0, 2, 1, 3])

    def _rotary(self, positions):
        """Rotary tables for ``positions`` (int32 [B,Q] or [1,Q]) -> (cos, sin), each float32 [B,1,Q,D]."""
        freqs = tf.cast(positions, tf.float32)[..., tf.newaxis] * self.v["bert/encoder/rotary/inv_freq"]  # [B,Q,D/2]
        angles = tf.concat([freqs, freqs], axis=-1)[:, tf.newaxis]  # [B,1,Q,D]
        return tf.cos(angles), tf.sin(angles)

    @staticmethod
    def _rotate(t, rope):  # t [B,N,Q,D]: t*cos + rotate_half(t)*sin, as ESM / GPT-NeoX
        cos, sin = rope
        t1, t2 = tf.split(t, 2, axis=-1)
        return t * cos + tf.concat([-t2, t1], axis=-1) * sin

    def _attention(self, x, q_rows, bias, prefix, B, T, Q, rope_k=None, rope_q=None):
        """Self-attention of the rows ``q_rows`` [B*Q,H] over all of ``x`` [B*T,H] -> [B*Q,H].

        Q == T (``q_rows is x``) in every layer but the last, where only the masked positions are asked.
        With rotary positions, keys are rotated by ``rope_k`` (positions 0..T-1) and queries by ``rope_q``.
        """
        D = self.cfg.hidden_size // self.cfg.num_attention_heads
        q = self._heads(self._dense(q_rows, prefix + "/self/query"), B, Q)  # [B,N,Q,D]
        k = self._heads(self._dense(x, prefix + "/self/key"), B, T)  # [B,N,T,D]
        v = self._heads(self._dense(x, prefix + "/self/value"), B, T)
        if self.cfg.rotary:
            q, k = self._rotate(q, rope_q), self._rotate(k, rope_k)
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(D)) + bias  # [B,N,Q,T]
        ctx = tf.matmul(tf.nn.softmax(scores, axis=-1), v)  # [B,N,Q,D]
        ctx = tf.reshape(tf.transpose(ctx, [0, 2, 1, 3]), [B * Q, self.cfg.hidden_size])  # [B*Q,H]
        return self._dense(ctx, prefix + "/output/dense")

    def _layer(self, x, q_rows, bias, i, B, T, Q, rope_k=None, rope_q=None):
        p = f"bert/encoder/layer_{i}"
        if self.cfg.pre_layer_norm:  # ESM: x + attention(LN(x)), then + feed-forward(LN(.))
            h = self._layer_norm(x, p + "/attention/LayerNorm")
            h_q = h if q_rows is x else self._layer_norm(q_rows, p + "/attention/LayerNorm")
            x = q_rows + self._attention(h, h_q, bias, p + "/attention", B, T, Q, rope_k, rope_q)
            h = self._act(self._dense(self._layer_norm(x, p + "/LayerNorm"), p + "/intermediate/dense"))
            return x + self._dense(h, p + "/output/dense")
        x = self._layer_norm(q_rows + self._attention(x, q_rows, bias, p + "/attention", B, T, Q, rope_k, rope_q),
                             p + "/attention/output/LayerNorm")
        h = self._act(self._dense(x, p + "/intermediate/dense"))  # [B*Q,I]
        return self._layer_norm(x + self._dense(h, p + "/output/dense"), p + "/output/LayerNorm")

    # -- embeddings ---------------------------------------------------------------------------------
    def embed(self, input_ids, input_mask, segment_ids):
        """int32 [B,T] x3 -> float32 [B*T,H]: token (+ token type) (+ position) embeddings, normalized
        (and projected from E to H for ELECTRA)."""
        cfg = self.cfg
        B, T, E = tf.shape(input_ids)[0], tf.shape(input_ids)[1], cfg.embedding_width
        x = tf.gather(self.v["bert/embeddings/word_embeddings"], input_ids)  # [B,T,E]
        if cfg.token_dropout:  # ESM: <mask> rows zeroed, the others scaled by the row's share of <mask>
            is_mask = tf.cast(tf.equal(input_ids, cfg.mask_token_id), tf.float32)  # [B,T]
            observed = tf.reduce_sum(is_mask, -1) / tf.cast(tf.reduce_sum(input_mask, -1), tf.float32)  # [B]
            scale = (1.0 - 0.15 * 0.8) / (1.0 - observed)  # [B]
            x = x * (1.0 - is_mask)[..., tf.newaxis] * scale[:, tf.newaxis, tf.newaxis]
        if cfg.type_vocab_size:  # else (DistilBERT, ESM) segment_ids is ignored
            x += tf.gather(self.v["bert/embeddings/token_type_embeddings"], segment_ids)
        if not cfg.rotary:
            x += self.v["bert/embeddings/position_embeddings"][tf.newaxis, cfg.position_offset:cfg.position_offset + T]
        x = tf.reshape(x, [B * T, E])
        if cfg.embedding_layer_norm:
            x = self._layer_norm(x, "bert/embeddings/LayerNorm")
        if E != cfg.hidden_size:
            x = self._dense(x, "bert/embeddings_project")  # [B*T,H]
        return x

    # -- encoder ------------------------------------------------------------------------------------
    def encode(self, input_ids, input_mask, segment_ids, masked_lm_positions):
        """int32 [B,T] x3, [B,P] -> float32 [B,P,H]: the last layer's output at the masked positions.

        Nothing downstream reads the other positions of the last layer, so that layer computes keys and
        values for every token but queries, attention output and feed-forward only for the P gathered
        rows (about 1/12 of bert-base's work for P=1). Identical to running it everywhere and gathering.
        """
        B, T = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
        P = tf.shape(masked_lm_positions)[1]
        H = self.cfg.hidden_size
        x = self.embed(input_ids, input_mask, segment_ids)  # [B*T,H]
        # Additive attention bias: 0 for real tokens, -10000 for padding (as the original BERT).
        bias = (1.0 - tf.cast(input_mask, tf.float32))[:, tf.newaxis, tf.newaxis, :] * -10000.0  # [B,1,1,T]
        rope_k = self._rotary(tf.range(T)[tf.newaxis]) if self.cfg.rotary else None  # [1,1,T,D] x2
        last = self.cfg.num_hidden_layers - 1
        for i in range(last):
            x = self._layer(x, x, bias, i, B, T, T, rope_k, rope_k)
        rows = tf.reshape(tf.gather(tf.reshape(x, [B, T, H]), masked_lm_positions, batch_dims=1), [B * P, H])
        rope_q = self._rotary(masked_lm_positions) if self.cfg.rotary else None  # [B,1,P,D] x2
        out = self._layer(x, rows, bias, last, B, T, P, rope_k, rope_q)  # [B*P,H]
        if self.cfg.pre_layer_norm:
            out = self._layer_norm(out, "bert/encoder/LayerNorm")
        return tf.reshape(out, [B, P, H])

    # -- head ---------------------------------------------------------------------------------------
    def _logits(self, gathered):
        """The MLM head on the masked positions' hidden states: [B,P,H] -> [B*P,V] logits."""
        B, P, H = tf.shape(gathered)[0], tf.shape(gathered)[1], self.cfg.hidden_size
        h = self._head_act(self._dense(tf.reshape(gathered, [B * P, H]), "cls/predictions/transform/dense"))
        h = self._layer_norm(h, "cls/predictions/transform/LayerNorm")  # [B*P,E]
        return tf.nn.bias_add(tf.matmul(h, self.v["bert/embeddings/word_embeddings"], transpose_b=True),
                              self.v["cls/predictions/output_bias"])  # [B*P,V], tied decoder + bias

    def masked_lm_log_probs(self, gathered):
        """[B,P,H] -> [B,P,V] log-probs."""
        B, P = tf.shape(gathered)[0], tf.shape(gathered)[1]
        return tf.reshape(tf.nn.log_softmax(self._logits(gathered), axis=-1), [B, P, -1])

    def _predict(self, input_ids, input_mask, segment_ids, masked_lm_positions):
        gathered = self.encode(input_ids, input_mask, segment_ids, masked_lm_positions)  # [B,P,H]
        log_probs = self.masked_lm_log_probs(gathered)  # [B,P,V], never leaves the graph
        valid = masked_lm_positions > 0  # slot padding is position 0 ([CLS])
        top_lp, top_ids = tf.math.top_k(log_probs, k=self.top_k)  # [B,P,k]
        top_lp = tf.where(valid[..., tf.newaxis], top_lp, tf.fill(tf.shape(top_lp), -np.inf))
        top_ids = tf.where(valid[..., tf.newaxis], top_ids, -tf.ones_like(top_ids))
        return log_probs, valid, top_ids, top_lp

    # -- serving signatures -------------------------------------------------------------------------
    @tf.function(input_signature=_INPUTS)
    def serve(self, input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids):
        log_probs, valid, top_ids, top_lp = self._predict(input_ids, input_mask, segment_ids, masked_lm_positions)
        target = tf.gather(log_probs, masked_lm_ids, batch_dims=2)  # [B,P]
        return {
            "masked_lm_log_probs": tf.where(valid, target, tf.zeros_like(target)),
            "top_k_ids": top_ids,
            "top_k_log_probs": top_lp,
        }

    @tf.function(input_signature=_INPUTS[:4])  # no masked_lm_ids
    def serve_top_k(self, input_ids, input_mask, segment_ids, masked_lm_positions):
        _, _, top_ids, top_lp = self._predict(input_ids, input_mask, segment_ids, masked_lm_positions)
        return {"top_k_ids": top_ids, "top_k_log_probs": top_lp}

    @tf.function(input_signature=_INPUTS)
    def serve_log_prob(self, input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids):
        """serving_default's ``masked_lm_log_probs`` alone: the target's logit minus the log-sum-exp over
        the vocabulary, with no [B,P,V] log-softmax written and no top-k search (a sixth of the small
        shape's time). The scorer's path when top-k is not asked for."""
        gathered = self.encode(input_ids, input_mask, segment_ids, masked_lm_positions)  # [B,P,H]
        logits = self._logits(gathered)  # [B*P,V]
        B, P = tf.shape(masked_lm_positions)[0], tf.shape(masked_lm_positions)[1]
        target = (tf.gather(logits, tf.reshape(masked_lm_ids, [-1]), batch_dims=1)
                  - tf.reduce_logsumexp(logits, axis=-1))  # [B*P]
        target = tf.reshape(target, [B, P])
        return {"masked_lm_log_probs": tf.where(masked_lm_positions > 0, target, tf.zeros_like(target))}
