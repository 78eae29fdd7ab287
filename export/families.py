"""Masked-LM families beyond BERT, loaded into what a BERT checkpoint loads into: a ``BertConfig`` (with
the family's switches set), weights by google-research/bert name, and the tokenizer.

====================  =====================  ===============================================================
model_type            prefix in the weights  how it differs from BERT
====================  =====================  ===============================================================
roberta, camembert    ``roberta.``           positions start at padding_idx + 1; one token type; byte-level
                                             BPE (CamemBERT: SentencePiece); ``<s> … </s>``, ``<mask>``;
                                             head ``lm_head.*`` with erf GELU
xlm-roberta           ``roberta.``           RoBERTa's encoder with a SentencePiece Unigram tokenizer (``▁``)
distilbert            ``distilbert.``        no token types; its own names (``q_lin``, ``sa_layer_norm``,
                                             ``vocab_transform``, ``vocab_projector``); WordPiece
electra (generator)   ``electra.``           embeddings of width E projected to H (``embeddings_project``);
                                             head ``generator_predictions`` (H -> E) + ``generator_lm_head``
esm                   ``esm.``               pre-LayerNorm, rotary positions (ESM-2), token dropout, one
                                             residue per token (``<cls> … <eos>``)
====================  =====================  ===============================================================

Tokenizers. WordPiece families (DistilBERT, ELECTRA) are read as BERT's are (``vocab.txt``, casing).
The others keep the checkpoint's own ``tokenizer.json`` (the `tokenizers` library; its normalizer decides
the casing, which is recorded); without one, RoBERTa's ``vocab.json`` + ``merges.txt`` are assembled the
way transformers does, and a SentencePiece-only checkpoint is converted with transformers if installed.
ESM's ``vocab.txt`` becomes a tokenizer splitting the text into the vocabulary's tokens, as
``EsmTokenizer`` does. Special tokens come from the checkpoint's ``tokenizer_config.json`` /
``special_tokens_map.json`` (else the family's defaults) and must be in the vocabulary; the scorer's
[CLS]/[SEP] are the family's ``cls``/``sep`` (RoBERTa ``<s>``/``</s>``, ESM ``<cls>``/``<eos>``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .casing import SAMPLE_TEXTS, Casing, Evidence, checkpoint_name, read_tokenizer_config
from .checkpoint import (DEFAULT_SPECIAL_TOKENS, HF_LAYER, Checkpoint, CheckpointError, _check_weights, _hf_shape,
                         _linear, _norm, _read_hf_tensors, _read_json, finish_rename, wordpiece_checkpoint)
from .config import BertConfig

#: model_type -> what the refusal of an unknown family lists. BERT itself is loaded by checkpoint.py.
SUPPORTED = {
    "bert": "BERT",
    "roberta": "RoBERTa",
    "camembert": "CamemBERT",
    "xlm-roberta": "XLM-RoBERTa",
    "distilbert": "DistilBERT",
    "electra": "ELECTRA (the generator)",
    "esm": "ESM-2 / ESM-1b",
}


def supported_families() -> str:
    return ", ".join(f"{name} (model_type '{t}')" for t, name in SUPPORTED.items())


# ------------------------------------------------------------------------------------------ renaming


#: One encoder layer of the families whose layers are not BERT's (checkpoint.HF_LAYER): transformers' name
#: after ``<prefix>.layer.<i>.`` -> google name after ``layer_<i>/``.
_DISTILBERT_LAYER = {
    **_linear("attention.q_lin", "attention/self/query"), **_linear("attention.k_lin", "attention/self/key"),
    **_linear("attention.v_lin", "attention/self/value"), **_linear("attention.out_lin", "attention/output/dense"),
    **_norm("sa_layer_norm", "attention/output/LayerNorm"),
    **_linear("ffn.lin1", "intermediate/dense"), **_linear("ffn.lin2", "output/dense"),
    **_norm("output_layer_norm", "output/LayerNorm"),
}
_ESM_LAYER = {  # pre-LayerNorm: attention.LayerNorm before attention, LayerNorm before the feed-forward
    **_linear("attention.self.query", "attention/self/query"), **_linear("attention.self.key", "attention/self/key"),
    **_linear("attention.self.value", "attention/self/value"),
    **_linear("attention.output.dense", "attention/output/dense"),
    **_norm("attention.LayerNorm", "attention/LayerNorm"),
    **_linear("intermediate.dense", "intermediate/dense"), **_linear("output.dense", "output/dense"),
    **_norm("LayerNorm", "LayerNorm"),
}


@dataclass(frozen=True)
class Family:
    """How one model_type's checkpoint maps onto the graph."""

    name: str
    config: Callable[[dict], BertConfig]
    layers: str  # the layers' prefix, e.g. "roberta.encoder.layer"
    layer_names: dict[str, str]
    top: dict[str, str]  # every other mapped tensor, by its full transformers name
    decoder: str  # the tied decoder's weight (must equal the word embeddings; not exported)
    decoder_bias: str | None  # a second copy of the output bias, if the class keeps one
    encoder: re.Pattern  # names that must be mapped (an unmapped one is an error); others are ignored
    tokenizer: str  # "wordpiece" (vocab.txt, as BERT), "json" (tokenizer.json) or "esm" (vocab.txt, per token)
    special: dict[str, str]  # default special tokens
    buffers: re.Pattern = re.compile(r".*(position_ids|token_type_ids|num_batches_tracked|inv_freq)$")


def _common(c: dict, **kw) -> BertConfig:
    return BertConfig(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                      num_hidden_layers=int(c["num_hidden_layers"]), num_attention_heads=int(c["num_attention_heads"]),
                      intermediate_size=int(c["intermediate_size"]), **kw)


def _absolute_only(c: dict) -> None:
    kind = c.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise CheckpointError(f"position_embedding_type {kind!r} is not supported for model_type "
                              f"{c.get('model_type')!r}; only 'absolute'")


def _roberta_config(c: dict) -> BertConfig:
    _absolute_only(c)
    pad = c.get("pad_token_id", 1)
    return _common(c, hidden_act=c.get("hidden_act", "gelu"), max_position_embeddings=int(c["max_position_embeddings"]),
                   type_vocab_size=int(c.get("type_vocab_size", 1)),
                   layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)), position_offset=int(pad) + 1, head_act="gelu")


def _distilbert_config(c: dict) -> BertConfig:
    return BertConfig(vocab_size=int(c["vocab_size"]), hidden_size=int(c["dim"]), num_hidden_layers=int(c["n_layers"]),
                      num_attention_heads=int(c["n_heads"]), intermediate_size=int(c["hidden_dim"]),
                      hidden_act=c.get("activation", "gelu"), max_position_embeddings=int(c["max_position_embeddings"]),
                      type_vocab_size=0, layer_norm_eps=1e-12)  # DistilBERT's LayerNorms are fixed at 1e-12


def _electra_config(c: dict) -> BertConfig:
    _absolute_only(c)
    e = int(c.get("embedding_size") or c["hidden_size"])
    return _common(c, hidden_act=c.get("hidden_act", "gelu"), max_position_embeddings=int(c["max_position_embeddings"]),
                   type_vocab_size=int(c.get("type_vocab_size", 2)),
                   layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
                   embedding_size=e if e != int(c["hidden_size"]) else None, head_act="gelu")


def _esm_config(c: dict) -> BertConfig:
    if c.get("is_folding_model") or c.get("esmfold_config"):
        raise CheckpointError("this is an ESMFold (structure prediction) checkpoint, not an ESM masked LM; use an "
                              "EsmForMaskedLM checkpoint such as facebook/esm2_t6_8M_UR50D")
    kind = c.get("position_embedding_type", "absolute")
    if kind not in ("absolute", "rotary"):
        raise CheckpointError(f"ESM position_embedding_type {kind!r} is not supported; only 'rotary' (ESM-2) and "
                              f"'absolute' (ESM-1b)")
    token_dropout = bool(c.get("token_dropout", False))
    if token_dropout and c.get("mask_token_id") is None:
        raise CheckpointError("config.json sets token_dropout but no mask_token_id; the model cannot be run "
                              "without it")
    return _common(c, hidden_act="gelu",  # EsmIntermediate and EsmLMHead apply erf GELU whatever hidden_act says
                   max_position_embeddings=int(c["max_position_embeddings"]), type_vocab_size=0,
                   layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)), position_embedding_type=kind,
                   position_offset=int(c.get("pad_token_id", 1)) + 1 if kind == "absolute" else 0,
                   embedding_layer_norm=bool(c.get("emb_layer_norm_before")), pre_layer_norm=True,
                   head_act="gelu", token_dropout=token_dropout,
                   mask_token_id=int(c["mask_token_id"]) if c.get("mask_token_id") is not None else None)


_ROBERTA_SPECIAL = {"cls": "<s>", "sep": "</s>", "mask": "<mask>", "pad": "<pad>", "unk": "<unk>"}


def _roberta(name: str) -> Family:
    return Family(
        name=name, config=_roberta_config, layers="roberta.encoder.layer", layer_names=HF_LAYER,
        top={"roberta.embeddings.word_embeddings.weight": "bert/embeddings/word_embeddings",
             "roberta.embeddings.position_embeddings.weight": "bert/embeddings/position_embeddings",
             "roberta.embeddings.token_type_embeddings.weight": "bert/embeddings/token_type_embeddings",
             **_norm("roberta.embeddings.LayerNorm", "bert/embeddings/LayerNorm"),
             **_linear("lm_head.dense", "cls/predictions/transform/dense"),
             **_norm("lm_head.layer_norm", "cls/predictions/transform/LayerNorm"),
             "lm_head.bias": "cls/predictions/output_bias"},
        decoder="lm_head.decoder.weight", decoder_bias="lm_head.decoder.bias",
        encoder=re.compile(r"(roberta\.(embeddings|encoder)\.|lm_head\.).*"), tokenizer="json",
        special=_ROBERTA_SPECIAL)


FAMILIES: dict[str, Family] = {
    "roberta": _roberta("roberta"),
    "camembert": _roberta("camembert"),
    "xlm-roberta": _roberta("xlm-roberta"),
    "distilbert": Family(
        name="distilbert", config=_distilbert_config, layers="distilbert.transformer.layer",
        layer_names=_DISTILBERT_LAYER,
        top={"distilbert.embeddings.word_embeddings.weight": "bert/embeddings/word_embeddings",
             "distilbert.embeddings.position_embeddings.weight": "bert/embeddings/position_embeddings",
             **_norm("distilbert.embeddings.LayerNorm", "bert/embeddings/LayerNorm"),
             **_linear("vocab_transform", "cls/predictions/transform/dense"),
             **_norm("vocab_layer_norm", "cls/predictions/transform/LayerNorm"),
             "vocab_projector.bias": "cls/predictions/output_bias"},
        decoder="vocab_projector.weight", decoder_bias=None,
        encoder=re.compile(r"(distilbert\.(embeddings|transformer)\.|vocab_).*"), tokenizer="wordpiece",
        special=DEFAULT_SPECIAL_TOKENS),
    "electra": Family(
        name="electra", config=_electra_config, layers="electra.encoder.layer", layer_names=HF_LAYER,
        top={"electra.embeddings.word_embeddings.weight": "bert/embeddings/word_embeddings",
             "electra.embeddings.position_embeddings.weight": "bert/embeddings/position_embeddings",
             "electra.embeddings.token_type_embeddings.weight": "bert/embeddings/token_type_embeddings",
             **_norm("electra.embeddings.LayerNorm", "bert/embeddings/LayerNorm"),
             **_linear("electra.embeddings_project", "bert/embeddings_project"),
             **_linear("generator_predictions.dense", "cls/predictions/transform/dense"),
             **_norm("generator_predictions.LayerNorm", "cls/predictions/transform/LayerNorm"),
             "generator_lm_head.bias": "cls/predictions/output_bias"},
        decoder="generator_lm_head.weight", decoder_bias=None,
        encoder=re.compile(r"(electra\.(embeddings|embeddings_project|encoder)\.|generator_).*"),
        tokenizer="wordpiece", special=DEFAULT_SPECIAL_TOKENS),
    "esm": Family(
        name="esm", config=_esm_config, layers="esm.encoder.layer", layer_names=_ESM_LAYER,
        top={"esm.embeddings.word_embeddings.weight": "bert/embeddings/word_embeddings",
             "esm.embeddings.position_embeddings.weight": "bert/embeddings/position_embeddings",
             **_norm("esm.embeddings.layer_norm", "bert/embeddings/LayerNorm"),
             **_norm("esm.encoder.emb_layer_norm_after", "bert/encoder/LayerNorm"),
             **_linear("lm_head.dense", "cls/predictions/transform/dense"),
             **_norm("lm_head.layer_norm", "cls/predictions/transform/LayerNorm"),
             "lm_head.bias": "cls/predictions/output_bias"},
        decoder="lm_head.decoder.weight", decoder_bias=None,
        encoder=re.compile(r"(esm\.(embeddings|encoder)\.|lm_head\.).*"), tokenizer="esm",
        special={"cls": "<cls>", "sep": "<eos>", "mask": "<mask>", "pad": "<pad>", "unk": "<unk>"}),
}
_SEP_ALIASES = ("sep_token", "eos_token")  # RoBERTa's and ESM's tokenizers end a sequence with eos


def rename(family: Family, cfg: BertConfig, raw: dict[str, np.ndarray], path: Path
           ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The family's transformers tensors -> (weights by google name, names of the tensors ignored)."""
    names = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): k
             for k in raw}
    layer_re = re.compile(re.escape(family.layers) + r"\.(\d+)\.(.+)")
    out: dict[str, np.ndarray] = {}
    unused, ignored = [], []
    inv_freq = None
    for name, key in names.items():
        v = raw[key]
        if name in (family.decoder, family.decoder_bias):
            continue  # tied copies, checked below
        g = family.top.get(name)
        m = layer_re.fullmatch(name)
        if g is None and m and m.group(2) in family.layer_names:
            g = f"bert/encoder/layer_{m.group(1)}/" + family.layer_names[m.group(2)]
        if g is not None:
            out[g] = v
        elif name.endswith("inv_freq") and cfg.rotary:
            inv_freq = v  # rotary frequencies (one copy per layer in older ESM files; all equal)
        elif family.buffers.fullmatch(name):
            continue
        else:
            (unused if family.encoder.fullmatch(name) else ignored).append(key)
    finish_rename(out, unused, f"{path}: {family.name} encoder or MLM-head tensors that cannot be mapped")
    word = out.get("bert/embeddings/word_embeddings")
    decoder = raw.get(family.decoder)
    if decoder is not None and word is not None and not np.array_equal(decoder, word):
        raise CheckpointError(f"{path}: the decoder ({family.decoder}) is not tied to the word embeddings; untied "
                              f"MLM decoders are not supported")
    bias_copy = raw.get(family.decoder_bias) if family.decoder_bias else None
    if bias_copy is not None:
        if "cls/predictions/output_bias" not in out:
            out["cls/predictions/output_bias"] = bias_copy
        elif not np.array_equal(bias_copy, out["cls/predictions/output_bias"]):
            raise CheckpointError(f"{path}: {family.decoder_bias} differs from the head's bias; the two are one "
                                  f"tensor in {family.name}")
    if cfg.rotary:
        d = cfg.hidden_size // cfg.num_attention_heads
        computed = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
        out["bert/encoder/rotary/inv_freq"] = np.asarray(inv_freq if inv_freq is not None else computed, np.float32)
    if cfg.type_vocab_size == 0:
        out.pop("bert/embeddings/token_type_embeddings", None)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}, sorted(ignored)


# ------------------------------------------------------------------------------------------ loading


def load_family(path: Path, cfg_dict: dict, do_lower_case: bool | None, hub_id: str | None = None) -> Checkpoint:
    """A Hugging Face directory of a family other than BERT -> Checkpoint. Unknown families are refused
    with the list of supported ones."""
    model_type = cfg_dict.get("model_type")
    archs = cfg_dict.get("architectures") or []
    family = FAMILIES.get(model_type)
    if family is None:
        raise CheckpointError(f"{path}/config.json has model_type {model_type!r} (architectures {archs}), which "
                              f"is not a masked-LM family mlm-scorer exports. Supported: {supported_families()}")
    if model_type == "electra" and any("Discriminator" in a or a == "ElectraForPreTraining" for a in archs):
        raise CheckpointError(f"{path} is an ELECTRA discriminator ({archs}): it has no masked-LM head. Score with "
                              f"the generator (e.g. google/electra-base-generator)")
    cfg = family.config(cfg_dict)
    raw = _read_hf_tensors(path)
    word = next(k for k, g in family.top.items() if g == "bert/embeddings/word_embeddings")
    if word not in raw:
        raise CheckpointError(f"{path}/config.json says model_type {model_type!r}, but the weights are not a "
                              f"{model_type} model's: no {word} (they hold {sorted(raw)[:3]} …)")
    weights, ignored = rename(family, cfg, raw, path)
    head = [g for g in ("cls/predictions/transform/dense/kernel", "cls/predictions/output_bias") if g not in weights]
    if head:
        raise CheckpointError(f"{path} has no masked-LM head ({', '.join(head)} missing): it looks like a bare "
                              f"{model_type} model or a fine-tuned classifier. Scoring needs a "
                              f"{_MLM_CLASS.get(model_type, 'ForMaskedLM')} checkpoint")
    hf_names = {g: h for h, g in family.top.items()}
    _check_weights(weights, cfg, where=str(path), source_name=lambda g: hf_names.get(g) or _layer_name(family, g),
                   source_shape=_hf_shape)
    source = {"kind": "huggingface", "path": os.path.abspath(path), "model_type": model_type,
              **({"hub_id": hub_id} if hub_id else {})}
    tok_cfg = _tokenizer_config(path)
    special = _special_tokens(tok_cfg, family.special)
    if family.tokenizer == "wordpiece":  # DistilBERT, ELECTRA: vocabulary and casing as BERT's
        return wordpiece_checkpoint(path, cfg, weights, special=special, name=checkpoint_name(path, hub_id),
                                    do_lower_case=do_lower_case, source=source, ignored=ignored, family=family.name)
    tok = _esm_tokenizer(path) if family.tokenizer == "esm" else _json_tokenizer(path, tok_cfg)
    tokenizer_json = tok.to_str()  # serialized once: a 250k-token vocabulary makes megabytes of JSON
    lower = _normalizer_lowercases(json.loads(tokenizer_json).get("normalizer"))
    if do_lower_case is not None and bool(do_lower_case) != lower:
        raise CheckpointError(f"--{'do' if do_lower_case else 'no'}-lower-case contradicts the checkpoint's "
                              f"tokenizer, whose normalizer {'lower-cases' if lower else 'keeps the case'}; the "
                              f"casing of a {family.name} tokenizer is fixed by it: leave the flag out")
    what = ("ESM's vocab.txt (case-sensitive residues)" if family.tokenizer == "esm" else
            f"the tokenizer's normalizer {'lower-cases' if lower else 'does not lower-case'}")
    casing = Casing(lower, what, [Evidence(lower, what)])
    ckpt = Checkpoint(config=cfg, weights=weights, vocab_path=path / "vocab.txt", do_lower_case=lower,
                      special_tokens=special, source=source, ignored=ignored, family=family.name,
                      tokenizer_json=tokenizer_json, casing=casing)
    check_tokenizer(ckpt, cfg_dict)
    return ckpt


_MLM_CLASS = {"roberta": "RobertaForMaskedLM", "camembert": "CamembertForMaskedLM",
              "xlm-roberta": "XLMRobertaForMaskedLM", "distilbert": "DistilBertForMaskedLM",
              "electra": "ElectraForMaskedLM (the generator)", "esm": "EsmForMaskedLM"}


def _layer_name(family: Family, google: str) -> str:
    """The transformers name of a google-named layer weight of ``family`` (for messages)."""
    m = re.fullmatch(r"bert/encoder/layer_(\d+)/(.+)", google)
    if m:
        for hf, g in family.layer_names.items():
            if g == m.group(2):
                return f"{family.layers}.{m.group(1)}.{hf}"
    return google


def _tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json (either may be missing)."""
    tokens_map = path / "special_tokens_map.json"
    return {**(_read_json(tokens_map) if tokens_map.is_file() else {}), **read_tokenizer_config(path)}


def _special_tokens(tok_cfg: dict, defaults: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, default in defaults.items():
        keys = _SEP_ALIASES if key == "sep" else (f"{key}_token",)
        tok = next((tok_cfg[k] for k in keys if tok_cfg.get(k)), default)
        out[key] = tok["content"] if isinstance(tok, dict) else str(tok)
    return out


def _normalizer_lowercases(spec) -> bool:
    """True if a tokenizer.json normalizer (possibly a Sequence) lower-cases."""
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "Lowercase" or (spec.get("type") == "BertNormalizer" and spec.get("lowercase")):
        return True
    return any(_normalizer_lowercases(s) for s in spec.get("normalizers") or [])


def _json_tokenizer(path: Path, tok_cfg: dict):
    """The checkpoint's tokenizer as a `tokenizers` Tokenizer: tokenizer.json, else RoBERTa's vocab.json +
    merges.txt, else a SentencePiece model converted by transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if (path / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise CheckpointError(f"{path}/tokenizer.json cannot be read by the tokenizers library: {exc}") from None
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        # What transformers' RobertaTokenizer builds from these two files.
        special = _special_tokens(tok_cfg, _ROBERTA_SPECIAL)
        bpe = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"), dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        tok = Tokenizer(bpe)
        prefix = bool(tok_cfg.get("add_prefix_space", False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
        tok.decoder = decoders.ByteLevel()
        # as RobertaTokenizer: the mask token takes the space before it
        tok.add_special_tokens([AddedToken(t, lstrip=t == special["mask"], special=True)
                                for t in dict.fromkeys(special.values())])
        sep, cls = special["sep"], special["cls"]
        tok.post_processor = processors.RobertaProcessing((sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls)),
                                                          trim_offsets=bool(tok_cfg.get("trim_offsets", True)),
                                                          add_prefix_space=prefix)
        return tok
    spm = [p.name for p in path.glob("*.model")]
    if spm:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
        except Exception as exc:  # transformers missing, or sentencepiece/protobuf for the conversion
            raise CheckpointError(
                f"{path} has a SentencePiece model ({', '.join(spm)}) but no tokenizer.json, and converting it "
                f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Write one with "
                f"transformers: python -c \"from transformers import AutoTokenizer; "
                f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')\"") from None
    found = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(f"{path} has no tokenizer: needs tokenizer.json (or vocab.json + merges.txt for RoBERTa); "
                          f"found {found}")


def _esm_tokenizer(path: Path):
    """ESM's vocab.txt as a tokenizer that splits text into vocabulary tokens (one residue per token) and
    whitespace, as transformers' EsmTokenizer does: a run of unknown characters is one <unk>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab_file = path / "vocab.txt"
    if not vocab_file.is_file():
        raise CheckpointError(f"{vocab_file} is missing: the ESM export needs its vocabulary")
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = [t for t in tokens if t.startswith("<") and t.endswith(">")]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else tokens[0]))
    ordinary = sorted((t for t in tokens if t not in specials), key=len, reverse=True)  # longest match first
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex("|".join(re.escape(t) for t in ordinary)), behavior="isolated")])
    tok.add_special_tokens(specials)
    return tok


def check_tokenizer(ckpt: Checkpoint, cfg_dict: dict) -> None:
    """The tokenizer of a tokenizer.json family belongs to the weights: its size, its special tokens, and the
    padding id the model's positions are counted from."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    if tok.pre_tokenizer is None:
        raise CheckpointError("the checkpoint's tokenizer has no pre-tokenizer, so its text has no word units to "
                              "score: mlm-scorer scores words, the units a pre-tokenizer makes")
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != ckpt.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {n} tokens but the model's vocab_size is {ckpt.config.vocab_size}: "
                              f"the tokenizer does not belong to these weights")
    ids = {k: tok.token_to_id(v) for k, v in ckpt.special_tokens.items()}
    missing = {k: ckpt.special_tokens[k] for k, v in ids.items() if v is None}
    if missing:
        raise CheckpointError(f"special tokens {missing} are not in the checkpoint's tokenizer")
    pad = cfg_dict.get("pad_token_id")
    if pad is not None and int(pad) != ids["pad"]:
        raise CheckpointError(f"config.json's pad_token_id is {pad} but the tokenizer's pad token "
                              f"{ckpt.special_tokens['pad']!r} has id {ids['pad']}: the model counts positions "
                              f"from its pad_token_id, so tokenizer and weights do not belong together")
    mask = ckpt.config.mask_token_id
    if ckpt.config.token_dropout and mask != ids["mask"]:
        raise CheckpointError(f"config.json's mask_token_id is {mask} but the tokenizer's mask token has id "
                              f"{ids['mask']}")
    for i in range(n):
        t = tok.id_to_token(i)
        if t is None or "\n" in t or "\r" in t:
            raise CheckpointError(f"the tokenizer's token {i} is {t!r}: the export lists the vocabulary one token a "
                                  f"line (tokenizer/vocab.txt) and cannot hold it")


# ---------------------------------------------------------------------------------- the cross-check

#: ESM's text: residues, with and without spaces, lower case (unknown), the rarer letters, a mask.
PROTEIN_TEXTS = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQ",
                 "M K T A Y", "mktay MKTAY", "XBUZO.-GAVL", "QIS<mask>VKS<mask>")


def check_pieces(tokenizer_json: Path, source_dir: Path, family: str) -> dict:
    """Compare the export's tokenizer with transformers' ``AutoTokenizer`` of the source directory on
    sample texts (casing.SAMPLE_TEXTS; ESM: PROTEIN_TEXTS): the ids must be equal.

    Returns a report (recorded in the manifest); raises VerificationError on the first text that differs.
    Skipped (and the report says why) without transformers or when it cannot read the directory.
    """
    from tokenizers import Tokenizer

    from .verify import VerificationError

    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError:
        return {"skipped": "transformers is not installed"}
    try:
        ref = AutoTokenizer.from_pretrained(str(source_dir))
    except Exception as exc:  # a directory transformers cannot read: say so, do not fail the export
        return {"skipped": f"transformers could not build a tokenizer from {source_dir}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    ours = Tokenizer.from_file(str(tokenizer_json))
    ours.no_truncation()
    ours.no_padding()
    texts = PROTEIN_TEXTS if family == "esm" else SAMPLE_TEXTS
    n_pieces = 0
    for text in texts:
        got = ours.encode(text, add_special_tokens=False).ids
        want = ref(text, add_special_tokens=False)["input_ids"]
        if got != want:
            raise VerificationError(
                f"the export's tokenizer and transformers' {type(ref).__name__} (from {source_dir}) split {text!r} "
                f"differently: ours {got[:24]}, transformers {want[:24]}")
        n_pieces += len(got)
    about = ("residues with and without spaces, lower case, rare letters, <mask>" if family == "esm" else
             "capitals, accents, CJK, punctuation")
    return {"reference": f"transformers {transformers.__version__} {type(ref).__name__} from the source directory",
            "texts": len(texts), "pieces": n_pieces, "about": about, "equal": True}
