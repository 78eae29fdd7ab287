"""BERT's configuration and the names and shapes of its variables (google-research/bert naming).

Kept free of TensorFlow so checkpoints can be inspected and validated without importing it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

#: Revision of the graphs the exporter writes (SavedModel and ONNX), recorded in the manifest. Outputs
#: do not change between revisions (every export is verified against the weights); speed does, so
#: benchmark caches re-export when it differs. 2: 2-D hidden states, last layer only at masked positions.
#: 3: LayerNorm written as the FusedBatchNormV3 form that TensorFlow's oneDNN rewrite runs as one op.
GRAPH_REVISION = 3

#: How the SavedModel writes LayerNorm (``mlm-export --layer-norm``), recorded in the manifest.
#: "fused": one FusedBatchNormV3 per LayerNorm over rows seen as channels, plus scale and shift, the
#: pattern TensorFlow's oneDNN graph rewrite (on by default in x86-64 Linux builds) replaces with a single
#: ``_MklLayerNorm`` op. "plain": mean, variance, rsqrt and element-wise arithmetic, for a TensorFlow
#: built without oneDNN (there the fused form runs FusedBatchNorm's NCHW path, with transposes).
#: Both compute the same function; each export is verified against the weights.
LAYER_NORMS = ("fused", "plain")

# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------------------- weight names


def weight_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every variable the graph needs, by its google-research/bert name, with its shape.

    Kernels are [in, out] (TF convention). The decoder is tied to the word embeddings, as in BERT.
    """
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    w = {
        "bert/embeddings/word_embeddings": (V, H),
        "bert/embeddings/position_embeddings": (cfg.max_position_embeddings, H),
        "bert/embeddings/token_type_embeddings": (cfg.type_vocab_size, H),
        "bert/embeddings/LayerNorm/gamma": (H,),
        "bert/embeddings/LayerNorm/beta": (H,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"bert/encoder/layer_{i}/"
        for name in ("query", "key", "value"):
            w[p + f"attention/self/{name}/kernel"] = (H, H)
            w[p + f"attention/self/{name}/bias"] = (H,)
        w[p + "attention/output/dense/kernel"] = (H, H)
        w[p + "attention/output/dense/bias"] = (H,)
        w[p + "attention/output/LayerNorm/gamma"] = (H,)
        w[p + "attention/output/LayerNorm/beta"] = (H,)
        w[p + "intermediate/dense/kernel"] = (H, I)
        w[p + "intermediate/dense/bias"] = (I,)
        w[p + "output/dense/kernel"] = (I, H)
        w[p + "output/dense/bias"] = (H,)
        w[p + "output/LayerNorm/gamma"] = (H,)
        w[p + "output/LayerNorm/beta"] = (H,)
    w["cls/predictions/transform/dense/kernel"] = (H, H)
    w["cls/predictions/transform/dense/bias"] = (H,)
    w["cls/predictions/transform/LayerNorm/gamma"] = (H,)
    w["cls/predictions/transform/LayerNorm/beta"] = (H,)
    w["cls/predictions/output_bias"] = (V,)
    return w


