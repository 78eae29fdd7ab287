"""The encoder's configuration and the names and shapes of its variables (google-research/bert naming).

One configuration describes every supported family (``families.py``): BERT is the default, and a few
switches describe how the others differ from it (position offset, no token types, an embedding
projection, the MLM head's activation; pre-LayerNorm, rotary positions and token dropout for ESM).

Kept free of TensorFlow so checkpoints can be inspected and validated without importing it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

#: Revision of the graphs the exporter writes (SavedModel and ONNX), recorded in the manifest. Outputs
#: do not change between revisions (every export is verified against the weights); speed does, so
#: benchmark caches re-export when it differs. 2: 2-D hidden states, last layer only at masked positions.
#: 3: LayerNorm written as the FusedBatchNormV3 form that TensorFlow's oneDNN rewrite runs as one op.
#: 4: model.onnx written operator by operator from the weights (onnx_graph.py; the decoder a Gemm on the
#: word embeddings, no transposed copy); model.int8.onnx quantized per token row.
GRAPH_REVISION = 4

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
    """BERT's configuration, plus the switches of the other families (their defaults are BERT's).

    A manifest written before the switches existed has none of them: it reads as BERT.
    """

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    #: 0: no token-type embeddings (DistilBERT, ESM); segment_ids is accepted and ignored
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    #: row of position_embeddings used by the first token (RoBERTa: padding_idx + 1)
    position_offset: int = 0
    #: "absolute" (a learned table) or "rotary" (ESM-2: queries and keys rotated, no table)
    position_embedding_type: str = "absolute"
    #: width of the embeddings when it is not hidden_size (ELECTRA): a projection to hidden_size follows
    embedding_size: int | None = None
    #: LayerNorm over the embedding sum (ESM-2 has none)
    embedding_layer_norm: bool = True
    #: LayerNorm before attention and feed-forward, and once after the last layer (ESM), not after them
    pre_layer_norm: bool = False
    #: the MLM head's activation when it is not hidden_act (RoBERTa, ELECTRA and ESM heads use erf GELU)
    head_act: str | None = None
    #: ESM's token dropout at inference: <mask> embeddings zeroed, the rest scaled by
    #: (1 - 0.15 * 0.8) / (1 - the row's share of <mask> tokens); needs mask_token_id
    token_dropout: bool = False
    mask_token_id: int | None = None

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def rotary(self) -> bool:
        return self.position_embedding_type == "rotary"

    @property
    def max_tokens(self) -> int:
        """The longest input the position embeddings allow (rotary positions: max_position_embeddings)."""
        return self.max_position_embeddings - (0 if self.rotary else self.position_offset)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------------------- weight names


def weight_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every variable the graph needs, by its google-research/bert name, with its shape.

    Kernels are [in, out] (TF convention). The decoder is tied to the word embeddings, as in BERT. Names
    that BERT lacks: ``bert/embeddings_project`` (ELECTRA: embeddings of width E projected to H); for
    pre-LayerNorm encoders (ESM) ``layer_i/attention/LayerNorm`` (before attention), ``layer_i/LayerNorm``
    (before the feed-forward) and ``bert/encoder/LayerNorm`` (after the last layer) instead of BERT's two
    LayerNorms per layer; ``bert/encoder/rotary/inv_freq`` (rotary positions' frequencies, [D/2]).
    """
    H, I, V, E = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.embedding_width
    w = {"bert/embeddings/word_embeddings": (V, E)}
    if not cfg.rotary:
        w["bert/embeddings/position_embeddings"] = (cfg.max_position_embeddings, E)
    if cfg.type_vocab_size:
        w["bert/embeddings/token_type_embeddings"] = (cfg.type_vocab_size, E)
    if cfg.embedding_layer_norm:
        w["bert/embeddings/LayerNorm/gamma"] = (E,)
        w["bert/embeddings/LayerNorm/beta"] = (E,)
    if E != H:
        w["bert/embeddings_project/kernel"] = (E, H)
        w["bert/embeddings_project/bias"] = (H,)
    if cfg.rotary:
        w["bert/encoder/rotary/inv_freq"] = (H // cfg.num_attention_heads // 2,)
    # BERT's LayerNorms follow the attention and the feed-forward; a pre-LN encoder's precede them.
    norms = ("attention/LayerNorm", "LayerNorm") if cfg.pre_layer_norm else \
        ("attention/output/LayerNorm", "output/LayerNorm")
    for i in range(cfg.num_hidden_layers):
        p = f"bert/encoder/layer_{i}/"
        for name in ("query", "key", "value"):
            w[p + f"attention/self/{name}/kernel"] = (H, H)
            w[p + f"attention/self/{name}/bias"] = (H,)
        w[p + "attention/output/dense/kernel"] = (H, H)
        w[p + "attention/output/dense/bias"] = (H,)
        w[p + "intermediate/dense/kernel"] = (H, I)
        w[p + "intermediate/dense/bias"] = (I,)
        w[p + "output/dense/kernel"] = (I, H)
        w[p + "output/dense/bias"] = (H,)
        for norm in norms:
            w[p + norm + "/gamma"] = (H,)
            w[p + norm + "/beta"] = (H,)
    if cfg.pre_layer_norm:
        w["bert/encoder/LayerNorm/gamma"] = (H,)
        w["bert/encoder/LayerNorm/beta"] = (H,)
    w["cls/predictions/transform/dense/kernel"] = (H, E)
    w["cls/predictions/transform/dense/bias"] = (E,)
    w["cls/predictions/transform/LayerNorm/gamma"] = (E,)
    w["cls/predictions/transform/LayerNorm/beta"] = (E,)
    w["cls/predictions/output_bias"] = (V,)
    return w


