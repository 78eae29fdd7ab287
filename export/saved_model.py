"""Write a checkpoint as a self-describing TensorFlow SavedModel at ``<out>/<version>/``, then verify it.

Signatures (all inputs int32, dynamic batch B and length T; P prediction slots per copy):
  serving_default(input_ids, input_mask, segment_ids [B,T]; masked_lm_positions, masked_lm_ids [B,P])
      -> masked_lm_log_probs [B,P] float32, top_k_ids [B,P,k] int32, top_k_log_probs [B,P,k] float32
  top_k(input_ids, input_mask, segment_ids, masked_lm_positions) -> top_k_ids, top_k_log_probs
Unused prediction slots are padded with position 0 ([CLS]) and id 0; their outputs are 0.0, -1, -inf.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import stat
from pathlib import Path

from mlm_scorer.fsutil import check_target, lstat_or_none, make_temp_dir
from mlm_scorer.model_dir import FORMAT, FORMAT_VERSION, MANIFEST_NAME, sha256_file

from .casing import check_pieces
from .checkpoint import CHECKSUM_SCHEME, Checkpoint, load_checkpoint
from .config import GRAPH_REVISION
from .serving_config import MODELS_CONFIG_FILE, write_serving_files
from .verify import verify_export

_INT32_2D = {"dtype": "int32", "shape": [-1, -1]}
_INPUTS = {n: _INT32_2D for n in ("input_ids", "input_mask", "segment_ids", "masked_lm_positions")}
_LOG_PROBS = {"masked_lm_log_probs": {"dtype": "float32", "shape": [-1, -1]}}
_TOP_K = {"top_k_ids": {"dtype": "int32", "shape": [-1, -1, -1]},
          "top_k_log_probs": {"dtype": "float32", "shape": [-1, -1, -1]}}

SIGNATURE = {
    "serving_default": {"inputs": {**_INPUTS, "masked_lm_ids": _INT32_2D}, "outputs": {**_LOG_PROBS, **_TOP_K}},
    "top_k": {"inputs": _INPUTS, "outputs": _TOP_K},
    # serving_default's masked_lm_log_probs alone, without the top-k search (graph revision 2 on)
    "log_prob": {"inputs": {**_INPUTS, "masked_lm_ids": _INT32_2D}, "outputs": _LOG_PROBS},
}

DEFAULT_TOLERANCE = 1e-4


def export(source: str | os.PathLike, out_dir: str | os.PathLike, *, version: int = 1, top_k: int = 5,
           max_seq_length: int | None = None, do_lower_case: bool | None = None, overwrite: bool = False,
           tolerance: float = DEFAULT_TOLERANCE, layer_norm: str = "fused", log=print) -> Path:
    """Export ``source`` (HF dir, hub id or TF-1 dir) to ``out_dir/version``; return the version dir.

    The version directory appears atomically (written to a temporary sibling, verified, then renamed).
    Raises CheckpointError for an unusable source and VerificationError if the reloaded model differs
    from the source weights by more than ``tolerance`` (max |Δ log-prob|).
    """
    check_version_dir(out_dir, version, overwrite=overwrite)  # before the checkpoint is loaded (seconds)
    ckpt = load_checkpoint(source, do_lower_case=do_lower_case)
    return export_checkpoint(ckpt, out_dir, version=version, top_k=top_k, max_seq_length=max_seq_length,
                             overwrite=overwrite, tolerance=tolerance, layer_norm=layer_norm, log=log)


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export this program wrote: a real directory (not a symlink) whose manifest is a
    regular file (not a symlink) of this program's format."""
    p = Path(path)
    st, mst = lstat_or_none(p), lstat_or_none(p / MANIFEST_NAME)
    if st is None or not stat.S_ISDIR(st.st_mode) or mst is None or not stat.S_ISREG(mst.st_mode):
        return False
    try:
        manifest = json.loads((p / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_version_dir(out_dir: str | os.PathLike, version: int, *, overwrite: bool = False) -> Path:
    """``out_dir/version``, refused before anything is loaded if it exists (FileExistsError, saying the
    choices) unless ``overwrite``; with ``overwrite`` only an export this program wrote (``is_export``) is
    replaced, never a symlink, a file or another directory (FileExistsError). The TF Serving model config
    written into ``out_dir`` must be absent or a regular file (UsageError, ``fsutil.check_target``)."""
    final = Path(out_dir) / str(int(version))
    check_target(Path(out_dir) / MODELS_CONFIG_FILE, "the TF Serving model config", parent_must_exist=False)
    if not os.path.lexists(final):
        return final
    if not overwrite:
        raise FileExistsError(f"{final} already exists; choose another --version, pass --overwrite to replace it, "
                              f"or --onnx / --quantize int8 to add the ONNX model to it")
    if not is_export(final):
        raise FileExistsError(f"{final} exists and is not an export made by mlm-export (a symlink, a file, or a "
                              f"directory without an mlm-export {MANIFEST_NAME} as a regular file); refusing to "
                              f"replace it: move it away")
    return final


def export_checkpoint(ckpt: Checkpoint, out_dir: str | os.PathLike, *, version: int = 1, top_k: int = 5,
                      max_seq_length: int | None = None, overwrite: bool = False,
                      tolerance: float = DEFAULT_TOLERANCE, serving_max_batch_size: int = 64,
                      layer_norm: str = "fused", log=print) -> Path:
    import tensorflow as tf

    from .bert_mlm import BertMLM

    cfg = ckpt.config
    if ckpt.casing is not None:
        log(ckpt.casing.line())
    if ckpt.ignored:
        n = len(ckpt.ignored)
        log(f"ignoring {n} tensor{'s' if n != 1 else ''} that are not part of the encoder or the MLM head: "
            f"{', '.join(ckpt.ignored)}")
    if not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {cfg.vocab_size}, got {top_k}")
    max_len = min(max_seq_length or cfg.max_tokens, cfg.max_tokens)  # RoBERTa: max_position_embeddings - 2
    if max_len < 3:
        raise ValueError(f"max_seq_length must be at least 3 ([CLS] word [SEP]), got {max_len}")
    base = Path(out_dir)
    final = check_version_dir(base, version, overwrite=overwrite)
    base.mkdir(parents=True, exist_ok=True)
    # readable as any directory made under the umask: a server running as another user loads it
    tmp = make_temp_dir(prefix=f".{version}.tmp-", dir=base)
    try:
        _write_tokenizer(ckpt, tmp / "tokenizer")
        casing = _check_tokenizer(ckpt, tmp / "tokenizer" / "tokenizer.json", log)
        module = BertMLM(cfg, ckpt.weights, top_k=top_k, layer_norm=layer_norm)
        tf.saved_model.save(module, str(tmp), signatures={
            "serving_default": module.serve.get_concrete_function(),
            "top_k": module.serve_top_k.get_concrete_function(),
            "log_prob": module.serve_log_prob.get_concrete_function(),
        })
        del module
        special_ids = _special_ids(tmp / "tokenizer" / "vocab.txt", ckpt.special_tokens)
        manifest = {
            "format": FORMAT,
            # a BERT export stays format 1, readable by scorers that predate the other families
            "format_version": FORMAT_VERSION if ckpt.family != "bert" else 1,
            "family": ckpt.family,
            "graph_revision": GRAPH_REVISION,
            "layer_norm": layer_norm,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": ckpt.source,
            "ignored_tensors": list(ckpt.ignored),
            "model_checksum": ckpt.checksum(),
            "checksum_scheme": CHECKSUM_SCHEME,
            "config": cfg.to_dict(),
            "vocab_size": cfg.vocab_size,
            "vocab_sha256": sha256_file(tmp / "tokenizer" / "vocab.txt"),
            "tokenizer_sha256": sha256_file(tmp / "tokenizer" / "tokenizer.json"),
            "max_seq_length": max_len,
            "top_k": top_k,
            "do_lower_case": bool(ckpt.do_lower_case),
            "casing": casing,
            "tokenize_chinese_chars": bool(ckpt.tokenize_chinese_chars),
            "strip_accents": ckpt.strip_accents,
            "special_tokens": dict(ckpt.special_tokens),
            "special_token_ids": special_ids,
            "signature": SIGNATURE,
            "slot_padding": "masked_lm_positions=0 and masked_lm_ids=0 mark an unused slot; outputs there are "
                            "masked_lm_log_probs=0.0, top_k_ids=-1, top_k_log_probs=-inf",
            "versions": _versions(),
        }
        report = verify_export(tmp, ckpt, max_len=max_len, tolerance=tolerance, mask_id=special_ids["mask"])
        manifest["identity_probe"] = report.pop("identity_probe")
        manifest["verification"] = report
        log(f"verified {final}: max |Δ log-prob| vs the source weights = {report['max_abs_diff']:.2e} "
            f"(tolerance {tolerance:g}, {report['n_predictions']} predictions, reference {report['reference']})")
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if os.path.lexists(final):  # --overwrite of an export (check_version_dir): set aside, then removed
            check_version_dir(base, version, overwrite=True)
            old = make_temp_dir(prefix=f".{version}.old-", dir=base)
            os.replace(final, old / "export")
            if not is_export(old / "export"):  # what was moved is not what was checked: put it back
                os.replace(old / "export", final)
                os.rmdir(old)
                check_version_dir(base, version, overwrite=True)  # says what it is
                raise FileExistsError(f"{final} changed while it was replaced; refusing to replace it")
            os.replace(tmp, final)
            # a directory this run made, holding the export checked above (rmtree never follows a symlink)
            shutil.rmtree(old, ignore_errors=True)
        else:
            check_version_dir(base, version, overwrite=overwrite)  # nothing put there since the first check
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # TF Serving: a batching file suited to this workload next to the model, a models.config in the base
    write_serving_files(final, max_batch_size=serving_max_batch_size)
    return final


def _write_tokenizer(ckpt: Checkpoint, out: Path) -> None:
    """vocab.txt (copied), tokenizer.json (the `tokenizers` library) and transformers' config files.

    A family with its own tokenizer (``ckpt.tokenizer_json``: RoBERTa, XLM-R, ESM) keeps it as it is, and
    vocab.txt lists its tokens in id order.
    """
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    out.mkdir(parents=True)
    st = ckpt.special_tokens
    if ckpt.tokenizer_json is not None:
        tok = Tokenizer.from_str(ckpt.tokenizer_json)
        (out / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
        tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size(with_added_tokens=True))]
        (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "do_lower_case": ckpt.do_lower_case,
            "model_max_length": ckpt.config.max_tokens, **{f"{k}_token": v for k, v in st.items()}},
            indent=2) + "\n", encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(
            {f"{k}_token": v for k, v in st.items()}, indent=2) + "\n", encoding="utf-8")
        return
    shutil.copyfile(ckpt.vocab_path, out / "vocab.txt")
    tok = BertWordPieceTokenizer(
        str(out / "vocab.txt"), unk_token=st["unk"], sep_token=st["sep"], cls_token=st["cls"],
        pad_token=st["pad"], mask_token=st["mask"], clean_text=True,
        handle_chinese_chars=ckpt.tokenize_chinese_chars, strip_accents=ckpt.strip_accents,
        lowercase=ckpt.do_lower_case)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": ckpt.do_lower_case,
        "tokenize_chinese_chars": ckpt.tokenize_chinese_chars, "strip_accents": ckpt.strip_accents,
        "model_max_length": ckpt.config.max_position_embeddings,
        **{f"{k}_token": v for k, v in st.items()}}, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {f"{k}_token": v for k, v in st.items()}, indent=2) + "\n", encoding="utf-8")


def _check_tokenizer(ckpt: Checkpoint, tokenizer_json: Path, log) -> dict:
    """The casing record for the manifest, with the check of the export's pieces against transformers'
    tokenizer built from the source directory (VerificationError if they differ)."""
    if ckpt.casing is None:  # a Checkpoint built by the caller, not by load_checkpoint
        return {"do_lower_case": bool(ckpt.do_lower_case), "decided_by": "given (Checkpoint built by the caller)"}
    if ckpt.tokenizer_json is not None:  # RoBERTa, XLM-R, ESM: their own tokenizer, against AutoTokenizer
        from .families import check_pieces as check_family_pieces

        report = check_family_pieces(tokenizer_json, ckpt.vocab_path.parent, ckpt.family)
    else:
        special = set(ckpt.special_tokens.values())
        tokens = ckpt.vocab_path.read_text(encoding="utf-8").split("\n")
        report = check_pieces(tokenizer_json, ckpt.vocab_path.parent, do_lower_case=ckpt.do_lower_case,
                              strip_accents=ckpt.strip_accents, tokenize_chinese_chars=ckpt.tokenize_chinese_chars,
                              vocab_tokens=[t for t in tokens if t], special=special)
    if report.get("equal"):
        about = report.get("about", "capitals, accents, CJK, punctuation, vocabulary words")
        log(f"tokenizer: the same pieces as transformers' tokenizer of the source directory on {report['texts']} "
            f"texts ({report['pieces']} pieces; {about})")
    else:
        log(f"tokenizer: not checked against transformers ({report['skipped']})")
    ckpt.casing.pieces_check = report
    return ckpt.casing.to_manifest()


def _special_ids(vocab: Path, special: dict[str, str]) -> dict[str, int]:
    index = {t: i for i, t in enumerate(vocab.read_text(encoding="utf-8").split("\n"))}
    return {k: index[v] for k, v in special.items()}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("mlm-scorer", "tensorflow", "tensorflow-cpu", "tokenizers", "numpy", "safetensors", "torch",
                 "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out

