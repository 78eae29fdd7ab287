"""An exported model directory: the SavedModel plus everything needed to tokenize for it.

Layout written by ``mlm-export`` (TF Serving's ``model_base_path/VERSION`` convention)::

    <base>/                       # --model_base_path for tensorflow_model_server
      <version>/                  # e.g. 1/
        saved_model.pb            # signatures serving_default (+ top_k)
        variables/
        mlm_scorer.json           # the manifest (MANIFEST_NAME), validated by ``load_manifest``
        tokenizer/vocab.txt       # the vocabulary, one token a line, in id order
        tokenizer/tokenizer.json  # the tokenizer for the `tokenizers` library (what the scorer uses)
        batching_parameters.txt   # (optional) a TF Serving batching file
        model.onnx                # (optional) the same model for ONNX Runtime

The scorer needs only this directory: a client of a remote server tokenizes from a copy of it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

MANIFEST_NAME = "mlm_scorer.json"
FORMAT = "mlm-scorer-export"
#: The newest manifest format this scorer reads. 1: BERT. 2: adds ``family`` (RoBERTa, XLM-R, DistilBERT,
#: ELECTRA, ESM), so that a scorer predating them refuses such an export instead of treating it as BERT. The
#: exporter still writes BERT exports as format 1; a manifest without ``family`` is a BERT export.
FORMAT_VERSION = 2

# key -> type, for validation before use (a manifest is never trusted blindly).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "vocab_size": int,
    "vocab_sha256": str,
    "max_seq_length": int,
    "top_k": int,
    "do_lower_case": bool,
    "tokenize_chinese_chars": bool,
    "special_tokens": dict,
    "model_checksum": str,
    "signature": dict,
}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a version directory or a base directory holding numeric version directories."""
    p = Path(path)
    if (p / MANIFEST_NAME).is_file():
        return True
    return any(c.name.isdigit() and (c / MANIFEST_NAME).is_file() for c in p.iterdir()) if p.is_dir() else False


def resolve_version_dir(path: str | os.PathLike, version: int | None = None) -> Path:
    """A base dir resolves to its highest (or the given) numeric version, as TF Serving does."""
    p = Path(path)
    if (p / MANIFEST_NAME).is_file() and version is None:
        return p
    if not p.is_dir():
        raise ModelError(f"model directory {str(p)!r} does not exist")
    versions = sorted((int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / MANIFEST_NAME).is_file()))
    if not versions:
        raise ModelError(f"{str(p)!r} is not an mlm-scorer export: no {MANIFEST_NAME} in it or in a numeric "
                         f"version subdirectory. Make one with: mlm-export CHECKPOINT {p}")
    if version is not None:
        if version not in versions:
            raise ModelError(f"version {version} not found under {str(p)!r}; versions there: {versions}")
        return p / str(version)
    return p / str(versions[-1])


def read_manifest(version_dir: str | os.PathLike, *, what: str | None = None) -> dict[str, Any]:
    """The manifest's JSON object, unchecked; ModelError (naming the file, after ``what`` if given) if it is
    missing or not one."""
    path = Path(version_dir) / MANIFEST_NAME
    name = f"{what} {str(path)!r}" if what else str(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{name} is missing: not an mlm-scorer export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{name} is not valid JSON ({exc}); re-export the model") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{name}: expected a JSON object")
    return manifest


def load_manifest(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest, checked: required keys and their types, format, special tokens, top_k."""
    path = Path(version_dir) / MANIFEST_NAME
    manifest = read_manifest(version_dir)
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise ModelError(f"{path}: required key {key!r} is missing; re-export the model")
        if not isinstance(manifest[key], typ) or (typ is int and isinstance(manifest[key], bool)):
            raise ModelError(f"{path}: key {key!r} should be {getattr(typ, '__name__', typ)}, "
                             f"found {type(manifest[key]).__name__}")
    if manifest["format"] != FORMAT:
        raise ModelError(f"{path}: format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ModelError(f"{path}: format_version {manifest['format_version']} is newer than this "
                         f"mlm-scorer understands ({FORMAT_VERSION}); upgrade mlm-scorer")
    for tok in ("cls", "sep", "mask", "pad", "unk"):
        if not isinstance(manifest["special_tokens"].get(tok), str):
            raise ModelError(f"{path}: special_tokens.{tok} is missing")
    if not 1 <= manifest["top_k"] <= manifest["vocab_size"]:
        raise ModelError(f"{path}: top_k {manifest['top_k']} out of range")
    if manifest["max_seq_length"] < 3:
        raise ModelError(f"{path}: max_seq_length {manifest['max_seq_length']} is too small")
    return manifest


@dataclass
class ModelDir:
    """A validated export: its version directory, manifest and tokenizer files."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike, version: int | None = None, *, check_vocab: bool = True) -> "ModelDir":
        vdir = resolve_version_dir(path, version)
        manifest = load_manifest(vdir)
        md = cls(vdir, manifest)
        if not md.vocab_path.is_file():
            raise ModelError(f"{md.vocab_path} is missing; re-export the model")
        positions = (manifest.get("config") or {}).get("max_position_embeddings")
        if isinstance(positions, int):
            md.check_positions(positions, "config.max_position_embeddings")
        if check_vocab:
            actual = sha256_file(md.vocab_path)
            if actual != manifest["vocab_sha256"]:
                raise ModelError(f"{md.vocab_path} does not match the manifest's vocab_sha256 "
                                 f"({actual[:12]}… vs {manifest['vocab_sha256'][:12]}…): the tokenizer "
                                 f"was changed after export")
            want = manifest.get("tokenizer_sha256")  # recorded since format 2's exporter; older: not checked
            if isinstance(want, str) and sha256_file(md.tokenizer_json) != want:
                raise ModelError(f"{md.tokenizer_json} does not match the manifest's tokenizer_sha256: the "
                                 f"tokenizer was changed after export")
        return md

    def check_positions(self, rows: int, where: str) -> None:
        """Raise ModelError if ``max_seq_length`` exceeds the positions of a table of ``rows`` position
        embeddings (read from ``where``), less the family's ``position_offset`` (RoBERTa: 2)."""
        c = self.manifest.get("config") or {}
        offset = 0 if c.get("position_embedding_type") == "rotary" else int(c.get("position_offset") or 0)
        positions = rows - offset
        L = self.max_seq_length
        if L > positions:
            rows_note = f", {rows} rows less the position_offset {offset}" if offset else ""
            raise ModelError(f"{self.path / MANIFEST_NAME}: max_seq_length {L} exceeds the {positions} positions "
                             f"of the model ({where}{rows_note}): the manifest contradicts its graph, and every "
                             f"copy longer than {positions} tokens would fail. Re-export with mlm-export "
                             f"--max-seq-length {positions} (or set max_seq_length to at most {positions} in the "
                             f"manifest)")

    @property
    def vocab_path(self) -> Path:
        return self.path / "tokenizer" / "vocab.txt"

    @property
    def tokenizer_json(self) -> Path:
        return self.path / "tokenizer" / "tokenizer.json"

    @property
    def family(self) -> str:
        """The model family ("bert", "roberta", "xlm-roberta", ...); exports without one are BERT."""
        return str(self.manifest.get("family") or "bert")

    @property
    def version(self) -> int | None:
        return int(self.path.name) if self.path.name.isdigit() else None

    @property
    def max_seq_length(self) -> int:
        return int(self.manifest["max_seq_length"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def checksum(self) -> str:
        """Identity of what the scores depend on (weights, tokenizer, casing, special tokens and, from
        ``checksum_scheme`` 2 on, the configuration): key for caches, resume and baselines, and for
        client/server match checks."""
        return str(self.manifest["model_checksum"])
