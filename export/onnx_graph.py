"""The masked-LM graph as ONNX, written operator by operator with ``onnx.helper`` from NumPy weights.

No deep-learning framework is needed: the exporter writes ``model.onnx`` (fp32) and ``model.int8.onnx``
(see ``Int8Spec``) from the checkpoint's arrays. The graph computes what ``bert_mlm.py`` does for the
SavedModel, family switches included, with its serving signature:

  inputs  (int32): input_ids, input_mask, segment_ids [B,T]; masked_lm_positions, masked_lm_ids [B,P]
  outputs:         masked_lm_log_probs float32 [B,P]   (0.0 in unused slots)
                   top_k_ids           int32   [B,P,k] (-1 in unused slots)
                   top_k_log_probs     float32 [B,P,k] (-inf in unused slots)

Hidden states are 2-D [B*T,H] so every dense layer is one MatMul + Add (ONNX Runtime fuses them into a
Gemm); the last layer runs its query, attention output and feed-forward only at the B*P masked rows
(keys and values from every token), and the decoder (tied to the word embeddings: one Gemm with
transB, no transposed copy in the file) only at those rows.

Weights keep their google-research/bert names as initializers ``w.<name with / as __>`` (the torch engine
reads them back from model.onnx; ``mlm_scorer.engines.torch_engine.load_export_weights``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import BertConfig, weight_shapes

OPSET = 17  # LayerNormalization is one op
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's own operators (the int8 file's MatMulIntegerToFloat)
INPUT_NAMES = ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids"]
OUTPUT_NAMES = ["masked_lm_log_probs", "top_k_ids", "top_k_log_probs"]
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
#: The dense layers of an encoder layer, by what ``Int8Spec.keep_fp32`` calls them.
DENSE_KINDS = {"attention/self/query": "q", "attention/self/key": "k", "attention/self/value": "v",
               "attention/output/dense": "o", "intermediate/dense": "ffn_in", "output/dense": "ffn_out"}


@dataclass(frozen=True)
class Int8Spec:
    """How ``model.int8.onnx`` quantizes the dense layers (the chosen configuration: ``DEFAULT_INT8``).

    Each quantized dense layer ``y = x W + b`` runs as an int8 matrix product (MLAS's U8S8 kernel) with

      * weights: int8, symmetric, one scale per output column, ``weight_levels`` steps each side of 0
        (127: 8 bits; 63: 7 bits, ONNX Runtime's ``reduce_range``);
      * activations: uint8, asymmetric (scale and zero point from min and max, 0 included), computed at
        run time per ``activations``: "row" (one scale per token row: a copy's numbers do not depend on
        the other copies in its batch) or "tensor" (one per batch), over ``activation_levels`` + 1 values
        (255: 8 bits; 127: 7 bits).

    AVX2 (and AVX-512 without VNNI) adds each pair of u8 x s8 products in a saturating 16-bit sum
    (``vpmaddubsw``; the pair is rows 2j and 2j+1 of a column). When the largest activation times the
    largest pair of weights stays within 32767 (``saturation_free``: 8-bit activations with 7-bit weights,
    or 7-bit activations with 8-bit weights) no sum saturates, and the file computes the same integers on
    every CPU (``mlm_scorer.engines.cpu``).
    ``weight_split``: each weight column is written as two integer parts of ``weight_levels`` steps each,
    W ~= ws * (Wq_hi + Wq_lo / (2 weight_levels)): the second part is the first one's rounding error, so
    7-bit parts give ~14-bit weights. Both parts sit side by side in one int8 matrix [K, 2N] (one
    ``MatMulIntegerToFloat`` of twice the width, then the two halves added): twice the integer work, the
    same saturation bound (each part alone is what AVX2 sums).
    ``activation_split`` (per row only): each activation row is written as two uint8 parts, the row quantized
    as above and its rounding error (within half a step) in ``activation_levels`` finer steps around a zero
    point of (levels + 1) // 2: x ~= s (q - z) + s / levels (q_lo - z_lo). The two parts are stacked as
    rows ([2 rows, K]: one ``MatMulIntegerToFloat``, twice the integer work) and their products added:
    ~14-bit activations from 7-bit parts, which with 8-bit weights stay within the saturation bound.
    ``weight_rounding``: "nearest" (each weight to its nearest step) or "gptq": the input rows of each
    weight matrix rounded in turn, the rounding error of each carried into the rows not yet rounded as
    the calibration activations' second moments say (GPTQ, Frantar et al. 2023; the same scales and
    integers' range, no run-time cost). The calibration activations are the fp32 graph's own, on random
    masked copies (``calibration_inputs``: another seed than the drift the exporter measures).
    ``keep_fp32``: dense layers left in fp32: kinds of ``DENSE_KINDS`` values, "head" (the MLM transform;
    the decoder is always fp32), "first"/"last" (whole layers), or one kind of one layer, ``KIND@LAYER``
    (e.g. "ffn_out@7", layers counted from 0).
    """

    activations: str = "row"
    activation_levels: int = 255
    weight_levels: int = 63
    keep_fp32: tuple[str, ...] = ("head",)
    weight_split: bool = False
    activation_split: bool = False
    weight_rounding: str = "nearest"

    def __post_init__(self):
        if self.activations not in ("row", "tensor"):
            raise ValueError(f"activations must be 'row' or 'tensor', not {self.activations!r}")
        if not (1 <= self.activation_levels <= 255 and 1 <= self.weight_levels <= 127):
            raise ValueError("activation_levels must be in 1..255 and weight_levels in 1..127")
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))
        if self.weight_rounding not in ("nearest", "gptq"):
            raise ValueError(f"weight_rounding must be 'nearest' or 'gptq', not {self.weight_rounding!r}")
        if self.weight_rounding == "gptq" and self.weight_split:
            raise ValueError("weight_rounding 'gptq' applies to unsplit weights (weight_split=False)")
        if self.activation_split and self.activations != "row":
            raise ValueError("activation_split needs activations='row'")
        known = set(DENSE_KINDS.values()) | {"head", "embed", "first", "last"}
        for k in self.keep_fp32:
            kind, at, layer = str(k).partition("@")
            if kind not in known or (at and (kind not in DENSE_KINDS.values() or not layer.isdigit())):
                raise ValueError(f"keep_fp32: {k!r} is not one of {sorted(known)} or KIND@LAYER "
                                 f"(KIND of {sorted(DENSE_KINDS.values())})")

    @property
    def saturation_free(self) -> bool:
        """True if no two u8 x s8 products can exceed a 16-bit sum (AVX2's vpmaddubsw): same results on
        every CPU class. The largest activation is levels + 1 (two roundings), 255 at most."""
        return min(self.activation_levels + 1, 255) * 2 * self.weight_levels <= 32767

    def describe(self) -> str:
        keep = ", ".join(self.keep_fp32) or "nothing"
        w = (f"two {_bits(self.weight_levels)} parts" if self.weight_split else _bits(self.weight_levels))
        a = _bits(self.activation_levels + 1)
        a = f"two {a} parts" if self.activation_split else a
        w += ", GPTQ-rounded" if self.weight_rounding == "gptq" else ""
        return (f"int8 weights ({w}, per output column), uint8 activations "
                f"({a}, per {self.activations}, at run time); fp32: {keep}, decoder")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "keep_fp32": list(self.keep_fp32), "saturation_free": self.saturation_free}


def _bits(levels: int) -> str:
    return f"{math.log2(2 * levels + 1 if levels < 128 else levels):.0f}-bit"


#: The configuration ``mlm-export --quantize int8`` writes (chosen by measurement on real weights:
#: BENCHMARKS.md, "How much faster is reduced precision, and how far does it move the scores?").
DEFAULT_INT8 = Int8Spec()
#: Twice the integer work for about a third of the default's drift (BENCHMARKS.md, "int8 configurations on
#: real weights"): activations in two 7-bit parts (~14 bits), 8-bit GPTQ-rounded weights; saturation-free.
ACCURATE_INT8 = Int8Spec(activation_levels=127, weight_levels=127, activation_split=True, weight_rounding="gptq")
#: ``mlm-export --int8-config``: the named configurations.
INT8_CONFIGS = {"fast": DEFAULT_INT8, "accurate": ACCURATE_INT8}


class _Builder:
    """Nodes, initializers and fresh names."""

    def __init__(self, weights: dict[str, np.ndarray]):
        from onnx import TensorProto

        self.TP = TensorProto
        self.nodes: list = []
        self.inits: dict[str, Any] = {}
        self.weights = weights
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, name: str | None = None, **attrs):
        from onnx import helper

        outs = [self.fresh(name or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.float32, name: str = "c") -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype)
        key = f"{name}:{arr.dtype}:{arr.shape}:{arr.tobytes().hex()}" if arr.size <= 16 else None
        if key is not None and key in self.inits:
            return self.inits[key].name
        t = numpy_helper.from_array(arr, self.fresh(name))
        self.inits[key or t.name] = t
        return t.name

    def w(self, gname: str) -> str:
        """The fp32 weight named ``gname`` (google-research/bert name), added once."""
        from onnx import numpy_helper

        name = "w." + gname.replace("/", "__")
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(self.weights[gname], np.float32), name)
        return name


def build_graph(cfg: BertConfig, weights: dict[str, np.ndarray], top_k: int, *, int8: Int8Spec | None = None,
                name: str = "mlm", mask_id: int | None = None, _capture: list | None = None):
    """The ``onnx.ModelProto`` of the serving signature for ``cfg`` with ``weights`` (google-research/bert
    names, kernels [in, out], float arrays); ``int8``: quantize the dense layers as it says.

    Raises ValueError for a config it cannot express (an unknown activation, no layers) or weights that do
    not fit the config. ``mask_id``: the mask token, for the calibration copies of GPTQ rounding.
    (``_capture``: a list that gets (weight prefix, input tensor name) of each dense
    layer, for ``dense_input_moments``.)
    """
    import onnx
    from onnx import helper

    if cfg.num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be at least 1, got {cfg.num_hidden_layers}")
    for act_name in (cfg.hidden_act, cfg.head_act or cfg.hidden_act):
        if act_name not in ACTIVATIONS:
            raise ValueError(f"activation {act_name!r} is not supported")
    shapes = weight_shapes(cfg)
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise ValueError(f"weights do not match the config: missing {missing[:5]}")
    bad = [k for k in shapes if tuple(np.shape(weights[k])) != shapes[k]]
    if bad:
        raise ValueError(f"weights do not match the config: {bad[0]} has shape {np.shape(weights[bad[0]])}, "
                         f"expected {shapes[bad[0]]}")

    moments = (dense_input_moments(cfg, weights, top_k, calibration_inputs(cfg, mask_id))
               if int8 is not None and int8.weight_rounding == "gptq" else None)
    g = _Builder(weights)
    F, I64 = g.TP.FLOAT, g.TP.INT64
    H, E, N = cfg.hidden_size, cfg.embedding_width, cfg.num_attention_heads
    D = H // N
    L = cfg.num_hidden_layers
    eps = float(cfg.layer_norm_eps)

    # ---- shapes
    B = g.op("Shape", "input_ids", start=0, end=1)  # int64 [1]
    T = g.op("Shape", "input_ids", start=1, end=2)
    minus1 = g.const([-1], np.int64)

    def reshape(x, *dims):  # dims: int or an int64 [1] tensor name
        parts = [d if isinstance(d, str) else g.const([d], np.int64) for d in dims]
        return g.op("Reshape", x, g.op("Concat", *parts, axis=0))

    def ln(x, prefix):
        return g.op("LayerNormalization", x, g.w(prefix + "/gamma"), g.w(prefix + "/beta"), axis=-1, epsilon=eps)

    def act(x, act_name):
        if act_name == "relu":
            return g.op("Relu", x)
        if act_name == "gelu":  # x * 0.5 * (1 + erf(x / sqrt 2)): the pattern ONNX Runtime fuses into Gelu
            e = g.op("Erf", g.op("Div", x, g.const(1.4142135381698608)))
            return g.op("Mul", g.op("Mul", x, g.op("Add", e, g.const(1.0))), g.const(0.5))
        inner = g.op("Mul", g.op("Add", x, g.op("Mul", g.op("Mul", g.op("Mul", x, x), x), g.const(0.044715))),
                     g.const(math.sqrt(2.0 / math.pi)))
        return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", g.op("Tanh", inner), g.const(1.0)))

    def dense(x, prefix, kind="other", layer=None):  # x [rows, in] -> [rows, out]
        if _capture is not None:
            _capture.append((prefix, x))
        if int8 is not None and _quantized(int8, kind, layer, L):
            return _int8_dense(g, x, weights[prefix + "/kernel"], weights[prefix + "/bias"], int8, prefix,
                               None if moments is None else moments[prefix])
        return g.op("Add", g.op("MatMul", x, g.w(prefix + "/kernel")), g.w(prefix + "/bias"))

    # ---- embeddings: [B,T] -> [B*T,H]
    x = g.op("Gather", g.w("bert/embeddings/word_embeddings"), "input_ids", axis=0)  # [B,T,E]
    if cfg.token_dropout:  # ESM: <mask> rows zeroed, the others rescaled by the row's share of <mask>
        is_mask = g.op("Cast", g.op("Equal", "input_ids", g.const(cfg.mask_token_id, np.int32)), to=F)  # [B,T]
        ax1 = g.const([1], np.int64)
        observed = g.op("Div", g.op("ReduceSum", is_mask, ax1, keepdims=1),
                        g.op("ReduceSum", g.op("Cast", "input_mask", to=F), ax1, keepdims=1))  # [B,1]
        scale = g.op("Div", g.const(1.0 - 0.15 * 0.8), g.op("Sub", g.const(1.0), observed))
        keep = g.op("Mul", g.op("Sub", g.const(1.0), is_mask), scale)  # [B,T]
        x = g.op("Mul", x, g.op("Unsqueeze", keep, g.const([-1], np.int64)))
    if cfg.type_vocab_size:
        x = g.op("Add", x, g.op("Gather", g.w("bert/embeddings/token_type_embeddings"), "segment_ids", axis=0))
    if not cfg.rotary:
        off = cfg.position_offset
        table = g.op("Slice", g.w("bert/embeddings/position_embeddings"), g.const([off], np.int64),
                     g.op("Add", T, g.const([off], np.int64)), g.const([0], np.int64))  # [T,E]
        x = g.op("Add", x, table)
    x = reshape(x, -1, E)  # [B*T,E]
    if cfg.embedding_layer_norm:
        x = ln(x, "bert/embeddings/LayerNorm")
    if E != H:
        x = dense(x, "bert/embeddings_project", "embed")

    # ---- attention bias [B,1,1,T]; rotary angles
    mask_f = g.op("Cast", "input_mask", to=F)
    bias = g.op("Unsqueeze", g.op("Mul", g.op("Sub", g.const(1.0), mask_f), g.const(-10000.0)),
                g.const([1, 2], np.int64))
    pos = g.op("Cast", "masked_lm_positions", to=I64)  # [B,P]

    def rope(positions):  # int64 [B|1,Q] -> (cos, sin) [B|1,1,Q,D]
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=F), g.const([-1], np.int64)),
                     g.w("bert/encoder/rotary/inv_freq"))  # [B|1,Q,D/2]
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1], np.int64))
        return g.op("Cos", angles), g.op("Sin", angles)

    def rotate(t, cs):  # t [B,N,Q,D] -> t*cos + rotate_half(t)*sin
        t1, t2 = g.op("Split", t, g.const([D // 2, D // 2], np.int64), axis=-1, n_out=2)
        half = g.op("Concat", g.op("Neg", t2), t1, axis=-1)
        return g.op("Add", g.op("Mul", t, cs[0]), g.op("Mul", half, cs[1]))

    rope_k = rope(g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), g.op("Squeeze", T), g.const(1, np.int64)),
                       g.const([0], np.int64))) if cfg.rotary else None
    rope_q = rope(pos) if cfg.rotary else None

    def attention(x, q_rows, Q, pre, layer, rq, rk):
        """Keys and values from x [B*T,H], queries from q_rows [B*Q,H] -> [B*Q,H]."""
        q = g.op("Transpose", reshape(dense(q_rows, pre + "/self/query", "q", layer), B, -1, N, D),
                 perm=[0, 2, 1, 3])  # [B,N,Q,D]
        k = reshape(dense(x, pre + "/self/key", "k", layer), B, -1, N, D)  # [B,T,N,D]
        v = g.op("Transpose", reshape(dense(x, pre + "/self/value", "v", layer), B, -1, N, D), perm=[0, 2, 1, 3])
        if cfg.rotary:
            q = rotate(q, rq)
            k = g.op("Transpose", rotate(g.op("Transpose", k, perm=[0, 2, 1, 3]), rk), perm=[0, 1, 3, 2])
        else:
            k = g.op("Transpose", k, perm=[0, 2, 3, 1])  # [B,N,D,T]
        s = g.op("Add", g.op("Mul", g.op("MatMul", q, k), g.const(1.0 / math.sqrt(D))), bias)  # [B,N,Q,T]
        ctx = g.op("Transpose", g.op("MatMul", g.op("Softmax", s, axis=-1), v), perm=[0, 2, 1, 3])  # [B,Q,N,D]
        return dense(reshape(ctx, -1, H), pre + "/output/dense", "o", layer)

    def layer(x, q_rows, i, Q, rq, rk):
        lp = f"bert/encoder/layer_{i}"
        pre = lp + "/attention"
        if cfg.pre_layer_norm:  # ESM
            h = ln(x, pre + "/LayerNorm")
            h_q = h if q_rows is x else ln(q_rows, pre + "/LayerNorm")
            x = g.op("Add", q_rows, attention(h, h_q, Q, pre, i, rq, rk))
            f = dense(act(dense(ln(x, lp + "/LayerNorm"), lp + "/intermediate/dense", "ffn_in", i), cfg.hidden_act),
                      lp + "/output/dense", "ffn_out", i)
            return g.op("Add", x, f)
        x = ln(g.op("Add", q_rows, attention(x, q_rows, Q, pre, i, rq, rk)), pre + "/output/LayerNorm")
        h = act(dense(x, lp + "/intermediate/dense", "ffn_in", i), cfg.hidden_act)
        return ln(g.op("Add", x, dense(h, lp + "/output/dense", "ffn_out", i)), lp + "/output/LayerNorm")

    for i in range(L - 1):
        x = layer(x, x, i, T, rope_k, rope_k)
    # the last layer only at the masked positions: rows b*T + pos of x [B*T,H]
    offsets = g.op("Mul", g.op("Range", g.const(0, np.int64), g.op("Squeeze", B), g.const(1, np.int64)),
                   g.op("Squeeze", T))
    flat = g.op("Reshape", g.op("Add", pos, g.op("Unsqueeze", offsets, g.const([-1], np.int64))), minus1)  # [B*P]
    rows = g.op("Gather", x, flat, axis=0)  # [B*P,H]
    h = layer(x, rows, L - 1, None, rope_q, rope_k)
    if cfg.pre_layer_norm:
        h = ln(h, "bert/encoder/LayerNorm")
    h = ln(act(dense(h, "cls/predictions/transform/dense", "head"), cfg.head_act or cfg.hidden_act),
           "cls/predictions/transform/LayerNorm")  # [B*P,E]
    logits = g.op("Gemm", h, g.w("bert/embeddings/word_embeddings"), g.w("cls/predictions/output_bias"),
                  transB=1)  # [B*P,V]
    log_probs = g.op("LogSoftmax", logits, axis=-1)
    tgt = g.op("Reshape", g.op("Cast", "masked_lm_ids", to=I64), g.const([-1, 1], np.int64))
    target = reshape(g.op("GatherElements", log_probs, tgt, axis=1), B, -1)  # [B,P]
    valid = g.op("Greater", "masked_lm_positions", g.const(0, np.int32))  # [B,P]
    g.nodes.append(helper.make_node("Where", [valid, target, g.const(0.0)], ["masked_lm_log_probs"]))
    top_lp, top_ids = g.op("TopK", log_probs, g.const([int(top_k)], np.int64), axis=-1, n_out=2)  # [B*P,k]
    vk = g.op("Unsqueeze", valid, g.const([-1], np.int64))
    g.nodes.append(helper.make_node("Where", [vk, reshape(top_lp, B, -1, int(top_k)), g.const(-np.inf)],
                                    ["top_k_log_probs"]))
    ids32 = g.op("Cast", reshape(top_ids, B, -1, int(top_k)), to=g.TP.INT32)
    g.nodes.append(helper.make_node("Where", [vk, ids32, g.const(-1, np.int32)], ["top_k_ids"]))

    bt, bp = ["batch", "seq"], ["batch", "predictions"]
    inputs = [helper.make_tensor_value_info(n, g.TP.INT32, bt if i < 3 else bp) for i, n in enumerate(INPUT_NAMES)]
    outputs = [helper.make_tensor_value_info("masked_lm_log_probs", F, bp),
               helper.make_tensor_value_info("top_k_ids", g.TP.INT32, bp + [int(top_k)]),
               helper.make_tensor_value_info("top_k_log_probs", F, bp + [int(top_k)])]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, list(g.inits.values()))
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if int8 is not None else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mlm-export")
    model.ir_version = min(model.ir_version, 8)  # readable by ONNX Runtime >= 1.15
    onnx.checker.check_model(model, full_check=False)
    return model


def _quantized(spec: Int8Spec, kind: str, layer: int | None, n_layers: int) -> bool:
    keep = set(spec.keep_fp32)
    if kind in ("head", "embed"):
        return kind not in keep
    if kind in keep or (layer == 0 and "first" in keep) or (layer == n_layers - 1 and "last" in keep):
        return False
    if f"{kind}@{layer}" in keep:
        return False
    return True


#: The random masked copies GPTQ's activations come from (``drift_inputs`` of this shape, one batch per seed;
#: not the seeds of the exporter's drift measurement nor of its probe).
CALIBRATION_SHAPE = {"batch": 32, "max_tokens": 128, "max_predictions": 8, "seeds": (2468, 2469, 2470, 2471)}


def calibration_inputs(cfg: BertConfig, mask_id: int | None = None) -> list[dict[str, np.ndarray]]:
    """The batches of ``CALIBRATION_SHAPE`` (masked with ``mask_id``, else the config's mask token)."""
    from .drift import drift_inputs

    c = CALIBRATION_SHAPE
    mask_id = cfg.mask_token_id if mask_id is None else mask_id
    return [drift_inputs(cfg.vocab_size, cfg.max_tokens, batch=c["batch"], max_tokens=c["max_tokens"],
                         max_predictions=c["max_predictions"], seed=seed, mask_id=mask_id) for seed in c["seeds"]]


def dense_input_moments(cfg: BertConfig, weights: dict[str, np.ndarray], top_k: int,
                        feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """E[x x^T] [K,K] (float64) of each dense layer's input x, by weight prefix: the fp32 graph run with
    ONNX Runtime on ``feeds``, over the rows of real tokens (padding left out; the last layer's query-side
    layers see the masked rows only)."""
    import onnx
    import onnxruntime as ort

    seen: list = []
    model = build_graph(cfg, weights, top_k, _capture=seen)
    outputs = list(dict.fromkeys(x for _, x in seen))
    for x in outputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(x))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in feeds:
        values = dict(zip(outputs, sess.run(outputs, {k: np.asarray(v, np.int32) for k, v in feed.items()})))
        real = np.asarray(feed["input_mask"]).reshape(-1) > 0
        for prefix, x in seen:
            a = values[x].astype(np.float64)
            if len(a) == len(real):
                a = a[real]
            sums[prefix] = sums.get(prefix, 0.0) + a.T @ a
            rows[prefix] = rows.get(prefix, 0) + len(a)
    return {p: sums[p] / max(1, rows[p]) for p in sums}


def gptq_weight(W: np.ndarray, second_moment: np.ndarray, levels: int, *, damp: float = 0.01,
                block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """W float [K,N] -> (int8 [K,N], float32 scales [N]) as ``quantize_weight`` (the same scales), the rows
    rounded in order with GPTQ's error feedback: with H = E[x x^T] + damp * mean(diag) * I and U the upper
    Cholesky factor of H^-1, row k's rounding error e_k = (w_k - q_k) / U_kk moves the later rows by
    -U_kj e_k, which minimises E|x (W - Q)|^2 one row at a time."""
    W = np.asarray(W, np.float64).copy()
    _, scale = quantize_weight(W, levels)
    s = scale.astype(np.float64)
    K = W.shape[0]
    H = np.array(second_moment, np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H += damp * float(np.mean(np.diag(H))) * np.eye(K)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    Q = np.zeros(W.shape, np.int8)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[i1:i2].copy()
        E = np.zeros_like(W1)
        for i in range(i2 - i1):
            q = np.clip(np.rint(W1[i] / s), -levels, levels)
            Q[i1 + i] = q
            e = (W1[i] - q * s) / U[i1 + i, i1 + i]
            W1[i + 1:] -= np.outer(U[i1 + i, i1 + i + 1:i2], e)
            E[i] = e
        W[i2:] -= U[i1:i2, i2:].T @ E
    return Q, scale


def quantize_weight(W: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """W float [K,N] -> (int8 [K,N] in [-levels, levels], float32 scales [N]): symmetric, per column."""
    W = np.asarray(W, np.float32)
    amax = np.abs(W).max(axis=0)
    scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float32)
    return np.clip(np.rint(W / scale), -levels, levels).astype(np.int8), scale


def split_weight(W: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """W float [K,N] -> (int8 [K,2N], float32 scales [2N]): ``quantize_weight``'s columns, then their rounding
    error W/ws - Wq (within half a step) in ``2 levels`` finer steps, both parts in [-levels, levels]:
    W ~= Wq_hi * ws + Wq_lo * ws / (2 levels)."""
    W = np.asarray(W, np.float32)
    hi, ws = quantize_weight(W, levels)
    rest = W.astype(np.float64) / ws.astype(np.float64) - hi
    lo = np.clip(np.rint(rest * (2 * levels)), -levels, levels).astype(np.int8)
    return np.concatenate([hi, lo], axis=1), np.concatenate([ws, ws / np.float32(2 * levels)]).astype(np.float32)


def _int8_dense(g: _Builder, x: str, W: np.ndarray, b: np.ndarray, spec: Int8Spec, prefix: str,
                second_moment: np.ndarray | None = None) -> str:
    """y = x W + b with int8 products; x float [rows,K] -> float [rows,N].

    Activations: per row (or per tensor) lo = min(x, 0), hi = max(x, 0), scale s = (hi - lo) / levels, zero
    point z = round(-lo / s), q = round(x / s) + z as uint8 (``QuantizeLinear``, per row along axis 0).
    The product is ONNX Runtime's ``MatMulIntegerToFloat`` (com.microsoft: MLAS's quantized GEMM with the
    float scaling in its output stage). Per tensor it takes s, z and the bias itself. Per row, with the
    weights' integer column sums c:  x W + b ~= s * (sum_k q Wq * ws) - s z (c ws) + b, the last two terms
    one small Gemm ([rows,2] @ [2,N]) that adds the first as its C input.
    With ``weight_split`` the product is [rows,2N] (the two parts' columns, each with its own scale) and its
    halves are added before the bias (the bias, and the column sums, cover both parts).
    """
    from onnx import numpy_helper

    N = int(np.shape(W)[1])
    if spec.weight_split:
        Wq, ws = split_weight(W, spec.weight_levels)
    elif second_moment is not None:  # weight_rounding "gptq"
        Wq, ws = gptq_weight(W, second_moment, spec.weight_levels)
    else:
        Wq, ws = quantize_weight(W, spec.weight_levels)

    def halves(y):  # [rows,2N] -> [rows,N]: the two parts' products added
        if not spec.weight_split:
            return y
        return g.op("Add", *g.op("Split", y, g.const([N, N], np.int64), axis=1, n_out=2))

    base = "q." + prefix.replace("/", "__")
    for name, arr in ((".weight", Wq), (".scale", ws)):
        g.inits[base + name] = numpy_helper.from_array(arr, base + name)
    wq_name, ws_name = base + ".weight", base + ".scale"
    if spec.activations == "tensor":  # these paths add the bias themselves (per row: the correction Gemm does)
        bias = g.const(np.asarray(b, np.float32), name=base + ".bias")
    if spec.activations == "tensor" and spec.activation_levels == 255:
        # ONNX Runtime's own pattern, fused into one DynamicQuantizeMatMul when the session loads
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, n_out=3)
        acc = g.op("MatMulInteger", xq, wq_name, xz)
        y = g.op("Mul", g.op("Cast", acc, to=g.TP.FLOAT), g.op("Mul", xs, ws_name))
        return g.op("Add", halves(y), bias)
    zero = g.const(0.0)
    if spec.activations == "row":  # lo, hi, s, z: [rows]
        lo, hi = g.op("ReduceMin", x, axes=[-1], keepdims=0), g.op("ReduceMax", x, axes=[-1], keepdims=0)
    else:  # scalars
        lo, hi = g.op("ReduceMin", x, keepdims=0), g.op("ReduceMax", x, keepdims=0)
    lo, hi = g.op("Min", lo, zero), g.op("Max", hi, zero)
    s = g.op("Max", g.op("Div", g.op("Sub", hi, lo), g.const(float(spec.activation_levels))), g.const(1e-30))
    zf = g.op("Round", g.op("Neg", g.op("Div", lo, s)))  # z in [0, levels]
    z = g.op("Cast", zf, to=g.TP.UINT8)
    # saturate(round(x / s) + z): at most levels + 1 (two roundings), still within the saturation-free bound
    q = g.op("QuantizeLinear", x, s, z, axis=0)
    if spec.activation_split:  # rows of q, then rows of the rounding error in steps of s / levels
        L = float(spec.activation_levels)
        z_lo = float((spec.activation_levels + 1) // 2)
        err = g.op("Sub", x, g.op("DequantizeLinear", q, s, z, axis=0))  # [rows,K], within s / 2
        s_lo = g.op("Div", s, g.const(L))
        z_lo_rows = g.op("Expand", g.const(int(z_lo), np.uint8), g.op("Shape", s))
        q_lo = g.op("QuantizeLinear", err, s_lo, z_lo_rows, axis=0)
        both = halves(g.op("MatMulIntegerToFloat", g.op("Concat", q, q_lo, axis=0), wq_name, g.const(1.0), ws_name,
                           domain=MS_DOMAIN))  # [2 rows, N]
        out_hi, out_lo = g.op("Split", both, axis=0, n_out=2)
        out = g.op("Add", out_hi, g.op("Mul", out_lo, g.const(1.0 / L)))  # / s: the product of x ~ q - z + ...
        zf = g.op("Add", zf, g.const(z_lo / L))  # ... minus (z + z_lo / levels) times the column sums
    elif spec.activations == "tensor":
        if not spec.weight_split:
            return g.op("MatMulIntegerToFloat", q, wq_name, s, ws_name, z, "", bias, domain=MS_DOMAIN)
        return g.op("Add", halves(g.op("MatMulIntegerToFloat", q, wq_name, s, ws_name, z, domain=MS_DOMAIN)), bias)
    else:
        out = halves(g.op("MatMulIntegerToFloat", q, wq_name, g.const(1.0), ws_name, domain=MS_DOMAIN))  # [rows,N]
    cw = Wq.astype(np.float64).sum(axis=0) * ws  # each column's sum times its scale
    cw = (cw[:N] + cw[N:]) if spec.weight_split else cw
    corr = g.const(np.stack([-cw, np.asarray(b, np.float64)]).astype(np.float32), name=base + ".correction")  # [2,N]
    s2 = g.op("Unsqueeze", s, g.const([-1], np.int64))  # [rows,1]
    sz = g.op("Mul", s2, g.op("Unsqueeze", zf, g.const([-1], np.int64)))
    a = g.op("Concat", sz, g.op("Expand", g.const([[1.0]]), g.op("Shape", sz)), axis=1)  # [rows,2]: s z, 1
    return g.op("Gemm", a, corr, g.op("Mul", out, s2))


def initializer_weights(model) -> dict[str, np.ndarray]:
    """The fp32 weights of a graph written by ``build_graph``, by their google-research/bert names."""
    from onnx import numpy_helper

    return {i.name[2:].replace("__", "/"): numpy_helper.to_array(i) for i in model.graph.initializer
            if i.name.startswith("w.")}


__all__ = ["DEFAULT_INT8", "ACCURATE_INT8", "INT8_CONFIGS", "Int8Spec", "build_graph", "quantize_weight", "initializer_weights", "INPUT_NAMES",
           "OUTPUT_NAMES", "OPSET"]
