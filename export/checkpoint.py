"""Load a BERT masked-LM checkpoint into (config, weights by google-research/bert name, tokenizer info).

Sources:
  * a Hugging Face model directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
    ``vocab.txt``, optional ``tokenizer_config.json``), or a hub id downloaded to one;
  * an original Google TF-1 checkpoint directory (``bert_config.json``, ``vocab.txt``,
    ``bert_model.ckpt.index`` / ``.data-*``).

Anything else is refused with what was found and what is needed. Every weight the graph needs must be
found, and every weight found must be used (the MLM head included); the vocabulary must match.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import BertConfig, weight_shapes


class CheckpointError(Exception):
    """The checkpoint cannot be exported; the message says what was found and what is needed."""


@dataclass
class Checkpoint:
    config: BertConfig
    weights: dict[str, np.ndarray]
    vocab_path: Path
    do_lower_case: bool
    tokenize_chinese_chars: bool = True
    strip_accents: bool | None = None
    special_tokens: dict[str, str] = field(default_factory=lambda: {
        "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"})
    source: dict = field(default_factory=dict)
    #: Tensors of the source that are not part of the encoder or the MLM head (a pooler, the NSP head, task
    #: heads such as classifiers), by their name in the source. Not exported; listed and recorded.
    ignored: list[str] = field(default_factory=list)
    #: The model family (``families.py``): "bert", or the model_type of another supported family.
    family: str = "bert"
    #: The tokenizer as `tokenizers` JSON, for families whose tokenizer is not BERT's WordPiece over
    #: vocab_path (RoBERTa's BPE, XLM-R's Unigram, ESM's residues); None for WordPiece.
    tokenizer_json: str | None = None

    def checksum(self) -> str:
        """sha256 over the weights (name, shape, bytes, in name order), the vocab (or tokenizer) and the
        casing; for a family other than BERT also the family and its config (what the graph computes)."""
        h = hashlib.sha256()
        for name in sorted(self.weights):
            arr = np.ascontiguousarray(self.weights[name], dtype=np.float32)
            h.update(name.encode() + repr(arr.shape).encode())
            h.update(arr.tobytes())
        h.update(self.tokenizer_json.encode() if self.tokenizer_json is not None else self.vocab_path.read_bytes())
        h.update(repr((self.do_lower_case, self.tokenize_chinese_chars, self.strip_accents)).encode())
        if self.family != "bert":
            h.update(repr((self.family, sorted(self.config.to_dict().items()))).encode())
        return h.hexdigest()


# ------------------------------------------------------------------------------------- entry point


def load_checkpoint(source: str | os.PathLike, *, do_lower_case: bool | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Load from a directory (HF or TF-1) or, if ``source`` is not a path, a Hugging Face hub id."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            if path.name.startswith("bert_model.ckpt"):
                path = path.parent
            else:
                raise CheckpointError(f"{source!r} is a file; expected a checkpoint directory "
                                      f"(Hugging Face: config.json + model.safetensors; TF-1: bert_config.json "
                                      f"+ bert_model.ckpt.*)")
        if (path / "bert_model.ckpt.index").is_file() or list(path.glob("*.ckpt*.index")):
            return _load_tf1(path, do_lower_case)
        if (path / "config.json").is_file():
            return _load_hf(path, do_lower_case)
        found = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(f"{str(path)!r} is neither a Hugging Face BERT directory (needs config.json and "
                              f"model.safetensors or pytorch_model.bin) nor a TF-1 BERT checkpoint (needs "
                              f"bert_config.json, vocab.txt, bert_model.ckpt.index); found: {found}")
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)) and not str(source).startswith((".", "/")):
        return _load_hf(download_from_hub(str(source), cache_dir), do_lower_case, hub_id=str(source))
    raise CheckpointError(f"{str(source)!r} does not exist (and is not a hub id of the form 'org/name')")


def download_from_hub(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch only the files an export needs. Raises CheckpointError with the offline fix."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"downloading {repo_id!r} needs huggingface_hub: pip install 'mlm-scorer[hub]', or point --model "
            f"at a local checkpoint directory") from None
    try:
        local = snapshot_download(
            repo_id, cache_dir=cache_dir,
            allow_patterns=["config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                            "model.safetensors", "pytorch_model.bin",
                            # the tokenizers of the other families (families.py)
                            "tokenizer.json", "vocab.json", "merges.txt", "sentencepiece.bpe.model"])
    except Exception as exc:  # network errors come in many classes; all mean the same to the user
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Without network access, point --model at a "
            f"local checkpoint: a Hugging Face directory (config.json, vocab.txt, model.safetensors), an "
            f"original TF-1 BERT directory (bert_config.json, vocab.txt, bert_model.ckpt.*), or a directory "
            f"made by mlm-export") from None
    return Path(local)


# ------------------------------------------------------------------------------------ Hugging Face


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _load_hf(path: Path, do_lower_case: bool | None, hub_id: str | None = None) -> Checkpoint:
    cfg_dict = _read_json(path / "config.json")
    model_type = cfg_dict.get("model_type")
    if model_type != "bert":  # RoBERTa, XLM-R, DistilBERT, ELECTRA, ESM; anything else is refused there
        from .families import load_family

        return load_family(path, cfg_dict, do_lower_case, hub_id)
    if cfg_dict.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"position_embedding_type {cfg_dict['position_embedding_type']!r} is not "
                              f"supported; only 'absolute'")
    cfg = BertConfig.from_dict(cfg_dict)
    raw = _read_hf_tensors(path)
    weights, ignored = _rename_hf(raw, path)
    vocab = path / "vocab.txt"
    tok_cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    if do_lower_case is None:
        do_lower_case = tok_cfg.get("do_lower_case")
    if do_lower_case is None:
        do_lower_case = _guess_lower_case(vocab, str(hub_id or path))
    ckpt = Checkpoint(
        config=cfg, weights=weights, vocab_path=vocab, do_lower_case=bool(do_lower_case),
        tokenize_chinese_chars=bool(tok_cfg.get("tokenize_chinese_chars", True)),
        strip_accents=tok_cfg.get("strip_accents"),
        source={"kind": "huggingface", "path": str(path), **({"hub_id": hub_id} if hub_id else {})},
        ignored=ignored)
    for key, default in (("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"), ("pad", "[PAD]"), ("unk", "[UNK]")):
        tok = tok_cfg.get(f"{key}_token", default)
        ckpt.special_tokens[key] = tok["content"] if isinstance(tok, dict) else str(tok)
    _check_vocab(ckpt)
    return ckpt


def _read_hf_tensors(path: Path) -> dict[str, np.ndarray]:
    st = path / "model.safetensors"
    if st.is_file():
        from safetensors.numpy import load_file
        return dict(load_file(str(st)))
    if list(path.glob("model-*.safetensors")):
        from safetensors.numpy import load_file
        out: dict[str, np.ndarray] = {}
        for shard in sorted(path.glob("model-*.safetensors")):
            out.update(load_file(str(shard)))
        return out
    binf = path / "pytorch_model.bin"
    if binf.is_file():
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{binf} is a PyTorch file; reading it needs torch: "
                                  f"pip install 'mlm-scorer[torch]' (or convert it to model.safetensors)") from None
        try:
            # weights_only=True: the restricted unpickler; no pickled code is ever executed.
            state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{binf} could not be loaded safely (weights_only=True refused it: "
                                  f"{str(exc).splitlines()[0]}); it may contain code, not just tensors") from None
        return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
    found = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(f"{path} has config.json but no weights: needs model.safetensors or "
                          f"pytorch_model.bin; found {found}")


# HF names (after stripping the 'bert.' prefix) -> original names.
_HF_LAYER = [
    (r"attention\.self\.(query|key|value)\.weight", r"attention/self/\1/kernel"),
    (r"attention\.self\.(query|key|value)\.bias", r"attention/self/\1/bias"),
    (r"attention\.output\.dense\.weight", "attention/output/dense/kernel"),
    (r"attention\.output\.dense\.bias", "attention/output/dense/bias"),
    (r"attention\.output\.LayerNorm\.(weight|gamma)", "attention/output/LayerNorm/gamma"),
    (r"attention\.output\.LayerNorm\.(bias|beta)", "attention/output/LayerNorm/beta"),
    (r"intermediate\.dense\.weight", "intermediate/dense/kernel"),
    (r"intermediate\.dense\.bias", "intermediate/dense/bias"),
    (r"output\.dense\.weight", "output/dense/kernel"),
    (r"output\.dense\.bias", "output/dense/bias"),
    (r"output\.LayerNorm\.(weight|gamma)", "output/LayerNorm/gamma"),
    (r"output\.LayerNorm\.(bias|beta)", "output/LayerNorm/beta"),
]
_HF_TOP = {
    "bert.embeddings.word_embeddings.weight": "bert/embeddings/word_embeddings",
    "bert.embeddings.position_embeddings.weight": "bert/embeddings/position_embeddings",
    "bert.embeddings.token_type_embeddings.weight": "bert/embeddings/token_type_embeddings",
    "bert.embeddings.LayerNorm.weight": "bert/embeddings/LayerNorm/gamma",
    "bert.embeddings.LayerNorm.bias": "bert/embeddings/LayerNorm/beta",
    "cls.predictions.transform.dense.weight": "cls/predictions/transform/dense/kernel",
    "cls.predictions.transform.dense.bias": "cls/predictions/transform/dense/bias",
    "cls.predictions.transform.LayerNorm.weight": "cls/predictions/transform/LayerNorm/gamma",
    "cls.predictions.transform.LayerNorm.bias": "cls/predictions/transform/LayerNorm/beta",
    "cls.predictions.bias": "cls/predictions/output_bias",
}
# Buffers that carry no weights (not listed as ignored: they are not tensors a user trained).
_HF_BUFFERS = re.compile(r"(.*position_ids|.*num_batches_tracked)$")
# Names that belong to the encoder or the MLM head: one of these that cannot be mapped is an error (the
# scores would be wrong without it); any other tensor (pooler, NSP, classifiers, task heads) is ignored.
_HF_ENCODER = re.compile(r"(bert\.embeddings\.|bert\.encoder\.|cls\.predictions\.).*")


def _rename_hf(raw: dict[str, np.ndarray], path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """HF tensors -> (weights by google-research/bert name, names of the tensors ignored)."""
    # Old checkpoints use LayerNorm.gamma/beta; some lack the 'bert.' prefix (BertModel saved bare).
    norm = {}
    for k, v in raw.items():
        k2 = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        norm[k2] = v
    if not any(k.startswith("cls.predictions") for k in norm):
        raise CheckpointError(
            f"{path} has no masked-LM head weights (cls.predictions.*): it looks like a bare BertModel or a "
            f"fine-tuned classifier. Scoring needs a BertForMaskedLM / BertForPreTraining checkpoint")
    out: dict[str, np.ndarray] = {}
    unused, ignored = [], []
    decoder_w = norm.pop("cls.predictions.decoder.weight", None)
    decoder_b = norm.pop("cls.predictions.decoder.bias", None)
    for k, v in norm.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", k)
        if m:
            for pat, repl in _HF_LAYER:
                if re.fullmatch(pat, m.group(2)):
                    out[f"bert/encoder/layer_{m.group(1)}/" + re.sub(pat, repl, m.group(2))] = v
                    break
            else:
                unused.append(k)
            continue
        if _HF_BUFFERS.fullmatch(k):
            continue
        (unused if _HF_ENCODER.fullmatch(k) else ignored).append(k)
    if unused:
        raise CheckpointError(f"{path}: encoder or MLM-head weights that cannot be mapped to BERT: {unused[:8]}"
                              f"{' …' if len(unused) > 8 else ''}")
    for k in list(out):
        if k.endswith("/kernel"):
            out[k] = np.ascontiguousarray(out[k].T)  # torch Linear is [out, in]; TF kernels are [in, out]
    if "cls/predictions/output_bias" not in out and decoder_b is not None:
        out["cls/predictions/output_bias"] = decoder_b
    if decoder_w is not None and "bert/embeddings/word_embeddings" in out:
        if not np.array_equal(decoder_w, out["bert/embeddings/word_embeddings"]):
            raise CheckpointError(f"{path}: the decoder (cls.predictions.decoder.weight) is not tied to the word "
                                  f"embeddings; untied MLM decoders are not supported")
    return {k: np.asarray(v, np.float32) for k, v in out.items()}, sorted(ignored)


# ------------------------------------------------------------------------------------------- TF-1


def _load_tf1(path: Path, do_lower_case: bool | None) -> Checkpoint:
    cfg_file = path / "bert_config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has a TF checkpoint but no bert_config.json")
    cfg = BertConfig.from_dict({**_read_json(cfg_file), "layer_norm_eps": 1e-12})
    prefix = path / "bert_model.ckpt"
    if not (path / "bert_model.ckpt.index").is_file():
        prefix = Path(str(sorted(path.glob("*.ckpt*.index"))[0])[: -len(".index")])
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(prefix))
    names = reader.get_variable_to_shape_map()
    if not any(n.startswith("cls/predictions") for n in names):
        raise CheckpointError(f"{prefix}: no masked-LM head (cls/predictions/*) in the checkpoint")
    needed = weight_shapes(cfg)
    weights, ignored = {}, []
    for n in sorted(names):
        if n in needed:
            weights[n] = reader.get_tensor(n).astype(np.float32)
        elif n == "global_step" or "adam_" in n or n.endswith(("/Adam", "/Adam_1")):
            continue  # optimizer state
        elif n.startswith(("bert/embeddings/", "bert/encoder/", "cls/predictions/")):
            raise CheckpointError(f"{prefix}: variable {n!r} looks like part of BERT's encoder or MLM head "
                                  f"but is not one of its weights for this config")
        else:
            ignored.append(n)  # pooler, NSP head, task heads
    vocab = path / "vocab.txt"
    if do_lower_case is None:
        do_lower_case = _guess_lower_case(vocab, str(path))
    ckpt = Checkpoint(config=cfg, weights=weights, vocab_path=vocab, do_lower_case=do_lower_case,
                      source={"kind": "tf1", "path": str(prefix)}, ignored=ignored)
    _check_vocab(ckpt)
    return ckpt


# ------------------------------------------------------------------------------------------ shared


def _guess_lower_case(vocab: Path, name: str) -> bool:
    """As google-research/bert's validate_case_matches_checkpoint: the name, else the vocab's casing."""
    low = name.lower()
    if "uncased" in low:
        return True
    if "cased" in low:
        return False
    if not vocab.is_file():
        return True
    words = [w for w in vocab.read_text(encoding="utf-8").split("\n") if w and not w.startswith("[")]
    return not any(w[:1].isupper() for w in words)


def _check_vocab(ckpt: Checkpoint) -> None:
    if not ckpt.vocab_path.is_file():
        raise CheckpointError(f"{ckpt.vocab_path} is missing: the export needs the WordPiece vocabulary")
    tokens = ckpt.vocab_path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens = tokens[:-1]
    n = len(tokens)
    if n != ckpt.config.vocab_size:
        raise CheckpointError(f"vocab.txt has {n} tokens but the model's vocab_size is {ckpt.config.vocab_size}: "
                              f"the vocabulary does not belong to these weights")
    have = set(tokens)
    if len(have) != n:
        dups = sorted({t for t in tokens if tokens.count(t) > 1})[:5] if n < 200_000 else []
        raise CheckpointError(f"{ckpt.vocab_path} has duplicate tokens {dups}: token ids would be ambiguous")
    for key, tok in ckpt.special_tokens.items():
        if tok not in have:
            raise CheckpointError(f"special token {key}={tok!r} is not in {ckpt.vocab_path}")
    emb = ckpt.weights.get("bert/embeddings/word_embeddings")
    if emb is not None and emb.shape[0] != n:
        raise CheckpointError(f"word embeddings have {emb.shape[0]} rows but vocab.txt has {n} tokens")
