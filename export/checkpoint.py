"""Load a BERT masked-LM checkpoint into (config, weights by google-research/bert name, tokenizer info).

Sources:
  * a Hugging Face model directory whose ``config.json`` has ``model_type: bert`` (whatever its
    ``architectures`` say), with ``vocab.txt`` and the weights in ``model.safetensors``, sharded
    ``model-0000X-of-0000N.safetensors`` (+ ``model.safetensors.index.json``), ``pytorch_model.bin`` or
    sharded ``pytorch_model-0000X-of-0000N.bin`` (+ its index); or a hub id downloaded to one;
  * an original Google TF-1 checkpoint directory (``bert_config.json``, ``vocab.txt``,
    ``bert_model.ckpt.index`` / ``.data-*``).

Every weight the graph needs must be found with its shape, and the vocabulary must match. Tensors
outside the encoder and the MLM head (pooler, NSP, classifiers and other task heads) are ignored and
listed; a tensor that looks like part of the encoder or the MLM head but cannot be mapped is refused,
as is a missing MLM head or a decoder not tied to the word embeddings. Weights saved without the
``bert.`` prefix (a bare model with an MLM head) or under a wrapper's prefix (``module.``, ``model.``)
are read. Lower-casing is decided from evidence (``casing.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlm_scorer.models import looks_like_hub_id

from .casing import Casing, checkpoint_name, decide_casing, read_tokenizer_config, tokenizer_settings
from .config import BertConfig, weight_shapes
from .errors import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "download_from_hub"]

DEFAULT_SPECIAL_TOKENS = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"}
#: What ``Checkpoint.checksum`` covers (recorded in the manifest as ``checksum_scheme``): 2 adds every
#: family's configuration and special tokens to the weights, vocabulary and casing of scheme 1.
CHECKSUM_SCHEME = 2


def config_identity(cfg: BertConfig) -> list[tuple[str, object]]:
    """The configuration as the checksum sees it: vocab_size and every field whose value differs from its
    default, sorted by name (a field added later with a default keeps the checksums of existing models)."""
    from dataclasses import MISSING, fields

    out = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.default is MISSING or v != f.default:
            out.append((f.name, v))
    return sorted(out)


@dataclass
class Checkpoint:
    config: BertConfig
    weights: dict[str, np.ndarray]
    vocab_path: Path
    do_lower_case: bool
    tokenize_chinese_chars: bool = True
    strip_accents: bool | None = None
    special_tokens: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPECIAL_TOKENS))
    source: dict = field(default_factory=dict)
    #: Tensors of the source that are not part of the encoder or the MLM head (a pooler, the NSP head, task
    #: heads such as classifiers), by their name in the source. Not exported; listed and recorded.
    ignored: list[str] = field(default_factory=list)
    #: How do_lower_case was decided, with its evidence (printed at export, recorded in the manifest).
    casing: Casing | None = None
    #: The model family (``families.py``): "bert", or the model_type of another supported family.
    family: str = "bert"
    #: The tokenizer as `tokenizers` JSON, for families whose tokenizer is not BERT's WordPiece over
    #: vocab_path (RoBERTa's BPE, XLM-R's Unigram, ESM's residues); None for WordPiece.
    tokenizer_json: str | None = None

    def checksum(self, scheme: int = CHECKSUM_SCHEME) -> str:
        """sha256 over everything that changes a score: the weights (name, shape, bytes, in name order), the
        vocabulary (or the family's tokenizer), the casing, and (``scheme`` 2, recorded in the manifest as
        ``checksum_scheme``) for every family the configuration (``config_identity``: hidden_act,
        layer_norm_eps, ...) and the special tokens. ``scheme`` 1 is the checksum of earlier exports, which
        left out the configuration of BERT exports and every family's special tokens: exports whose
        weights were equal shared it whatever their config."""
        h = hashlib.sha256()
        for name in sorted(self.weights):
            arr = np.ascontiguousarray(self.weights[name], dtype=np.float32)
            h.update(name.encode() + repr(arr.shape).encode())
            h.update(arr.tobytes())
        h.update(self.tokenizer_json.encode() if self.tokenizer_json is not None else self.vocab_path.read_bytes())
        h.update(repr((self.do_lower_case, self.tokenize_chinese_chars, self.strip_accents)).encode())
        if scheme >= 2:
            h.update(repr(("config", self.family, config_identity(self.config),
                           sorted(self.special_tokens.items()))).encode())
        elif self.family != "bert":
            h.update(repr((self.family, sorted(self.config.to_dict().items()))).encode())
        return h.hexdigest()


# ------------------------------------------------------------------------------------- entry point


def load_checkpoint(source: str | os.PathLike, *, do_lower_case: bool | None = None,
                    cache_dir: str | os.PathLike | None = None, hub_id: str | None = None) -> Checkpoint:
    """Load from a directory (HF or TF-1) or, if ``source`` is not a path, a Hugging Face hub id.

    ``do_lower_case`` overrides the casing evidence (``casing.py``); None decides from it. ``hub_id``
    names the hub repository a local directory was downloaded from (recorded; read by the casing rule).
    Raises CheckpointError (CasingError for contradictory casing evidence) saying what is needed.
    """
    path = Path(source).expanduser()
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
            return _load_hf(path, do_lower_case, hub_id=hub_id)
        found = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(f"{str(path)!r} is neither a Hugging Face BERT directory (needs config.json and "
                              f"model.safetensors or pytorch_model.bin) nor a TF-1 BERT checkpoint (needs "
                              f"bert_config.json, vocab.txt, bert_model.ckpt.index); found: {found}")
    if looks_like_hub_id(str(source)):
        return _load_hf(download_from_hub(str(source), cache_dir), do_lower_case, hub_id=str(source))
    raise CheckpointError(f"{str(source)!r} does not exist (and is not a hub id of the form 'org/name')")


#: What a download fetches: config, tokenizer files, and the weights in any layout _read_hf_tensors reads
#: (safetensors first: when a repository has both, only those are used; the .bin files are not fetched).
HUB_FILES = ["config.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
             "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
             "vocab.json", "merges.txt", "sentencepiece.bpe.model"]  # the other families' tokenizers
HUB_FILES_BIN = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]


def download_from_hub(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch only the files an export needs. Raises CheckpointError with the offline fix."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"downloading {repo_id!r} needs huggingface_hub: pip install 'mlm-scorer[hub]', or point --model "
            f"at a local checkpoint directory") from None
    try:
        local = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=HUB_FILES))
        if not (local / "model.safetensors").is_file() and not (local / "model.safetensors.index.json").is_file():
            local = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=HUB_FILES + HUB_FILES_BIN))
    except Exception as exc:  # network errors come in many classes; all mean the same to the user
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Without network access, point --model at a "
            f"local checkpoint: a Hugging Face directory (config.json, vocab.txt, model.safetensors), an "
            f"original TF-1 BERT directory (bert_config.json, vocab.txt, bert_model.ckpt.*), or a directory "
            f"made by mlm-export") from None
    return local


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
    weights, ignored, names = _rename_hf(raw, path)
    _check_weights(weights, cfg, where=str(path), source_name=lambda g: names.get(g) or _hf_name(g),
                   source_shape=_hf_shape)
    return wordpiece_checkpoint(
        path, cfg, weights, special=_special_tokens(read_tokenizer_config(path)),
        name=checkpoint_name(path, hub_id), do_lower_case=do_lower_case, ignored=ignored,
        source={"kind": "huggingface", "path": os.path.abspath(path), **({"hub_id": hub_id} if hub_id else {})})


def _special_tokens(tok_cfg: dict) -> dict[str, str]:
    out = {}
    for key, default in DEFAULT_SPECIAL_TOKENS.items():
        tok = tok_cfg.get(f"{key}_token", default)
        out[key] = tok["content"] if isinstance(tok, dict) else str(tok)
    return out


def _read_hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the first weight layout found: model.safetensors, its shards, pytorch_model.bin, its
    shards. Shards come with an index (``<file>.index.json``): every shard it names must be present."""
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    shards = _shards(path, "model", ".safetensors")
    if shards:
        return _merge_shards(path, shards, _read_safetensors)
    if (path / "pytorch_model.bin").is_file():
        return _read_torch(path / "pytorch_model.bin")
    shards = _shards(path, "pytorch_model", ".bin")
    if shards:
        return _merge_shards(path, shards, _read_torch)
    found = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(f"{path} has config.json but no weights: needs model.safetensors or "
                          f"pytorch_model.bin (or their shards with the index file); found {found}")


def _shards(path: Path, stem: str, ext: str) -> tuple[list[str], dict[str, str] | None] | None:
    """(shard file names, the index's weight_map or None) for ``stem-0000X-of-0000N{ext}``, or None if there
    are none. Refuses a shard the index names (or the numbering implies) that is not in ``path``."""
    index = path / f"{stem}{ext}.index.json"
    pattern = re.compile(rf"{re.escape(stem)}-(\d+)-of-(\d+){re.escape(ext)}")
    present = sorted(p.name for p in path.iterdir() if pattern.fullmatch(p.name))
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map: it does not say which shard holds which tensor")
        files = sorted(set(map(str, weight_map.values())))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names {len(files)} shard(s), but {len(missing)} are missing from "
                                  f"{path}: {', '.join(missing)}. Download the missing shard(s) again")
        return files, weight_map
    if not present:
        return None
    totals = {int(pattern.fullmatch(f).group(2)) for f in present}
    width = len(pattern.fullmatch(present[0]).group(1))
    if len(totals) != 1:
        raise CheckpointError(f"{path} holds shards of different sets ({', '.join(present)}) and no "
                              f"{index.name} to say which belong together")
    n = totals.pop()
    expected = [f"{stem}-{i:0{width}d}-of-{n:0{width}d}{ext}" for i in range(1, n + 1)]
    missing = [f for f in expected if f not in present]
    if missing:
        raise CheckpointError(f"{path} has {len(present)} of {n} weight shards and no {index.name}; missing: "
                              f"{', '.join(missing)}. Download the missing shard(s) (and the index) again")
    return expected, None


def _merge_shards(path: Path, shards: tuple[list[str], dict[str, str] | None], read) -> dict[str, np.ndarray]:
    files, weight_map = shards
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(read(path / f))
    if weight_map is not None:
        lost = [f"{name} (in {shard})" for name, shard in weight_map.items() if name not in out]
        if lost:
            raise CheckpointError(f"the shard index names tensors its shards do not hold: {lost[:5]}"
                                  f"{' …' if len(lost) > 5 else ''}; the shards are incomplete or from another "
                                  f"checkpoint")
    return out


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """A .safetensors file read with NumPy alone, bf16 included (widened exactly to float32).

    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
    """
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = np.frombuffer(bytearray(f.read()), dtype=np.uint8)  # writable, as torch.from_numpy wants
    except (OSError, ValueError, struct.error, MemoryError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        if info["dtype"] == "BF16":
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            arr = raw.view(_SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which is not read here "
                                  f"(float32, float16, bfloat16 and integers are)")
        out[name] = arr.reshape(info["shape"])
    return out


def _read_torch(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{file} is a PyTorch file; reading it needs torch: "
                              f"pip install 'mlm-scorer[torch]' (or convert it to model.safetensors)") from None
    try:
        # weights_only=True: the restricted unpickler; no pickled code is ever executed.
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file} could not be loaded safely (weights_only=True refused it: "
                              f"{str(exc).splitlines()[0]}); it may contain code, not just tensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the state dict
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy()
            for k, v in state.items() if hasattr(v, "detach")}


def _linear(hf: str, g: str) -> dict[str, str]:
    """A torch Linear's two tensors -> their google names (``g``/kernel, ``g``/bias)."""
    return {f"{hf}.weight": f"{g}/kernel", f"{hf}.bias": f"{g}/bias"}


def _norm(hf: str, g: str) -> dict[str, str]:
    """A torch LayerNorm's two tensors -> their google names (``g``/gamma, ``g``/beta)."""
    return {f"{hf}.weight": f"{g}/gamma", f"{hf}.bias": f"{g}/beta"}


#: One BERT encoder layer (also RoBERTa's and ELECTRA's): transformers' name after ``<prefix>.layer.<i>.``
#: (LayerNorm.gamma/beta already read as weight/bias) -> google name after ``layer_<i>/``.
HF_LAYER = {
    **_linear("attention.self.query", "attention/self/query"),
    **_linear("attention.self.key", "attention/self/key"),
    **_linear("attention.self.value", "attention/self/value"),
    **_linear("attention.output.dense", "attention/output/dense"),
    **_norm("attention.output.LayerNorm", "attention/output/LayerNorm"),
    **_linear("intermediate.dense", "intermediate/dense"), **_linear("output.dense", "output/dense"),
    **_norm("output.LayerNorm", "output/LayerNorm"),
}
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
_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def _hf_name(google: str) -> str:
    """The transformers name of a google-research/bert weight name (for messages)."""
    for hf, g in _HF_TOP.items():
        if g == google:
            return hf
    m = re.fullmatch(r"bert/encoder/layer_(\d+)/(.+)", google)
    if not m:
        return google
    rest = m.group(2).replace("/", ".").replace("kernel", "weight").replace("gamma", "weight").replace("beta", "bias")
    return f"bert.encoder.layer.{m.group(1)}.{rest}"


def _hf_shape(google: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A weight's shape as transformers stores it (Linear weights are [out, in], TF kernels [in, out])."""
    return tuple(reversed(shape)) if google.endswith("/kernel") else tuple(shape)


def _unwrap_names(raw: dict[str, np.ndarray], path: Path) -> dict[str, str]:
    """{canonical name ('bert.…', 'cls.…'): name in the file}. Reads what BertForMaskedLM saves, and the same
    weights under a wrapper's prefix ('module.bert.…' from DataParallel, 'model.bert.…' from a training
    framework) or saved without the 'bert.' prefix ('embeddings.…', 'encoder.…' next to 'cls.predictions.…')."""
    found = [k for k in raw if k.endswith(_WORD_EMBEDDINGS)]
    if len(found) > 1:
        raise CheckpointError(f"{path}: several word-embedding tensors ({', '.join(found[:4])}): the weights hold "
                              f"more than one model, and which one to export is ambiguous")
    prefix = found[0][: -len(_WORD_EMBEDDINGS)] if found else "bert."
    if prefix == "bert.":
        return {k: k for k in raw}
    wrapper, bare = (prefix[:-len("bert.")], False) if prefix.endswith("bert.") else (prefix, True)
    out = {}
    for k in raw:
        name = k[len(wrapper):] if k.startswith(wrapper) else k
        if bare and k.startswith(wrapper) and name.startswith(("embeddings.", "encoder.", "pooler.")):
            name = "bert." + name
        out[name] = k
    return out


def finish_rename(out: dict[str, np.ndarray], unused: list[str], what: str) -> None:
    """The end of every renaming to google names: refuse the encoder-looking tensors left unmapped (``what``
    starts the message), then turn torch Linear weights [out, in] into TF kernels [in, out], in place."""
    if unused:
        raise CheckpointError(f"{what}: {unused[:8]}{' …' if len(unused) > 8 else ''}")
    for k in list(out):
        if k.endswith("/kernel"):
            out[k] = np.ascontiguousarray(out[k].T)


def _rename_hf(raw: dict[str, np.ndarray], path: Path) -> tuple[dict[str, np.ndarray], list[str], dict[str, str]]:
    """HF tensors -> (weights by google-research/bert name, names of the tensors ignored, and for each weight
    its name in the file)."""
    # Old checkpoints use LayerNorm.gamma/beta; some carry a wrapper's prefix or lack the 'bert.' prefix.
    norm, origin = {}, {}
    for name, k in _unwrap_names(raw, path).items():
        n2 = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        norm[n2], origin[n2] = raw[k], k
    if not any(k.startswith("cls.predictions") for k in norm):
        raise CheckpointError(
            f"{path} has no masked-LM head weights (cls.predictions.*): it looks like a bare BertModel or a "
            f"fine-tuned classifier. Scoring needs a BertForMaskedLM / BertForPreTraining checkpoint")
    out: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    unused, ignored = [], []
    decoder_w = norm.pop("cls.predictions.decoder.weight", None)
    decoder_b = norm.pop("cls.predictions.decoder.bias", None)
    for k, v in norm.items():
        g = _HF_TOP.get(k)
        m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", k)
        if m and m.group(2) in HF_LAYER:
            g = f"bert/encoder/layer_{m.group(1)}/" + HF_LAYER[m.group(2)]
        if g is not None:
            out[g], names[g] = v, origin[k]
        elif _HF_BUFFERS.fullmatch(k):
            continue
        else:
            (unused if _HF_ENCODER.fullmatch(k) else ignored).append(origin[k])
    finish_rename(out, unused, f"{path}: encoder or MLM-head weights that cannot be mapped to BERT")
    bias = out.get("cls/predictions/output_bias")
    if bias is None and decoder_b is not None:
        out["cls/predictions/output_bias"] = decoder_b
        names["cls/predictions/output_bias"] = origin["cls.predictions.decoder.bias"]
    elif bias is not None and decoder_b is not None and not np.array_equal(bias, decoder_b):
        raise CheckpointError(f"{path}: the decoder's bias (cls.predictions.decoder.bias) differs from "
                              f"cls.predictions.bias; BERT ties them, and untied MLM decoders are not supported")
    emb = out.get("bert/embeddings/word_embeddings")
    if decoder_w is not None and emb is not None:
        if decoder_w.shape != emb.shape or not np.array_equal(decoder_w, emb):
            raise CheckpointError(f"{path}: the decoder (cls.predictions.decoder.weight) is not tied to the word "
                                  f"embeddings; untied MLM decoders are not supported")
    return {k: np.asarray(v, np.float32) for k, v in out.items()}, sorted(ignored), names


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
    _check_weights(weights, cfg, where=str(prefix))
    return wordpiece_checkpoint(path, cfg, weights, special=_special_tokens(read_tokenizer_config(path)),
                                name=checkpoint_name(path), do_lower_case=do_lower_case, ignored=ignored,
                                source={"kind": "tf1", "path": os.path.abspath(prefix)})


# ------------------------------------------------------------------------------------------ shared


def wordpiece_checkpoint(path: Path, cfg: BertConfig, weights: dict[str, np.ndarray], *, special: dict[str, str],
                         name: str, do_lower_case: bool | None, source: dict, ignored: list[str],
                         family: str = "bert") -> Checkpoint:
    """A checkpoint tokenized as BERT is (BERT, DistilBERT, ELECTRA): ``path``'s vocab.txt, casing decided
    from the evidence (``name`` is what the name rule reads), the tokenizer files' accent and CJK
    settings; the vocabulary checked against the weights and the special tokens."""
    vocab = path / "vocab.txt"
    tokens = _read_vocab(vocab)
    casing = decide_casing(directory=path, name=name, vocab_tokens=tokens, special=set(special.values()),
                           given=do_lower_case)
    settings = tokenizer_settings(path)
    ckpt = Checkpoint(config=cfg, weights=weights, vocab_path=vocab, do_lower_case=casing.do_lower_case,
                      tokenize_chinese_chars=settings["tokenize_chinese_chars"] is not False,
                      strip_accents=settings["strip_accents"], special_tokens=special, source=source,
                      ignored=ignored, family=family, casing=casing)
    _check_vocab(ckpt, tokens)
    return ckpt


def _check_weights(weights: dict[str, np.ndarray], cfg: BertConfig, *, where: str, source_name=lambda g: g,
                   source_shape=lambda g, shape: tuple(shape)) -> None:
    """Every weight the config needs is present with its shape, and none is beyond the config (a layer
    past num_hidden_layers). Names and shapes in messages are the source's (``source_name``/``source_shape``)."""
    expected = weight_shapes(cfg)
    missing = [f"{source_name(g)} (expected shape {list(source_shape(g, s))})" for g, s in expected.items()
               if g not in weights]
    wrong = [f"{source_name(g)} has shape {list(source_shape(g, weights[g].shape))}, expected "
             f"{list(source_shape(g, s))}" for g, s in expected.items()
             if g in weights and tuple(weights[g].shape) != tuple(s)]
    beyond = [source_name(g) for g in weights if g not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} needed weight(s) missing: {'; '.join(missing[:6])}"
                        f"{' …' if len(missing) > 6 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} weight(s) mis-shaped for the config: {'; '.join(wrong[:6])}"
                        f"{' …' if len(wrong) > 6 else ''}")
    if beyond:
        problems.append(f"weights beyond the config (num_hidden_layers={cfg.num_hidden_layers}): "
                        f"{', '.join(sorted(beyond)[:6])}{' …' if len(beyond) > 6 else ''}")
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit the config: {'. '.join(problems)}")


def _read_vocab(vocab: Path) -> list[str]:
    if not vocab.is_file():
        raise CheckpointError(f"{vocab} is missing: the export needs the WordPiece vocabulary")
    tokens = vocab.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens = tokens[:-1]
    return tokens


def _check_vocab(ckpt: Checkpoint, tokens: list[str]) -> None:
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
