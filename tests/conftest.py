"""Shared fixtures: tiny random BERT checkpoints (HF and TF-1), their exports, and an independent
PyTorch reference for word log-probabilities."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TorchReference  # noqa: E402
from tiny_models import SMALL_VOCAB, UNCASED_VOCAB, antiberty_files, copy_antiberty, make_hf_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """Tiny random BertForMaskedLM (small vocab, max 64 positions) in Hugging Face format."""
    return make_hf_bert(tmp_path_factory.mktemp("tiny_hf"))


def _export(hf: Path, tmp_path_factory, name: str, **kw) -> Path:
    """Export ``hf`` (quietly) into a fresh session temp dir; returns the export base directory."""
    from mlm_export import export

    base = tmp_path_factory.mktemp(name)
    export(hf, base, log=lambda m: None, **kw)
    return base


@pytest.fixture(scope="session")
def tiny_export(tiny_hf, tmp_path_factory) -> Path:
    return _export(tiny_hf, tmp_path_factory, "tiny_export", top_k=5)


@pytest.fixture(scope="session")
def realvocab_hf(tmp_path_factory) -> Path:
    """Tiny random BERT on the real 30,522-token uncased vocabulary: realistic word-piece splits."""
    return make_hf_bert(tmp_path_factory.mktemp("realvocab_hf"), vocab=UNCASED_VOCAB, hidden=32, layers=2,
                        heads=2, intermediate=48, max_pos=64, seed=1)


@pytest.fixture(scope="session")
def realvocab_export(realvocab_hf, tmp_path_factory) -> Path:
    return _export(realvocab_hf, tmp_path_factory, "realvocab_export")


@pytest.fixture(scope="session")
def short_hf(tmp_path_factory) -> Path:
    """A model with only 16 positions: sentences longer than 14 pieces need windows."""
    return make_hf_bert(tmp_path_factory.mktemp("short_hf"), max_pos=16, seed=2)


@pytest.fixture(scope="session")
def short_export(short_hf, tmp_path_factory) -> Path:
    return _export(short_hf, tmp_path_factory, "short_export")


@pytest.fixture(scope="session")
def tiny_reference(tiny_hf) -> TorchReference:
    return TorchReference(tiny_hf)


@pytest.fixture(scope="session")
def realvocab_reference(realvocab_hf) -> TorchReference:
    return TorchReference(realvocab_hf)


@pytest.fixture(scope="session")
def antiberty_hf(tmp_path_factory) -> Path:
    """AntiBERTy, real pretrained weights (8 layers, hidden 512, 25-token residue vocabulary), copied out of
    the antiberty==0.1.3 wheel exactly as a user would: vocab.txt, config.json, pytorch_model.bin."""
    if antiberty_files() is None:
        pytest.skip("antiberty==0.1.3 is not installed (make test installs it: pip install --no-deps "
                    "antiberty==0.1.3)")
    return copy_antiberty(tmp_path_factory.mktemp("antiberty_hf"))


@pytest.fixture(scope="session")
def antiberty_export(antiberty_hf, tmp_path_factory) -> Path:
    return _export(antiberty_hf, tmp_path_factory, "antiberty_export", top_k=5)


@pytest.fixture()
def fake_export(tmp_path) -> Path:
    """An export directory with a real tokenizer and manifest but no SavedModel: for the fake engine."""
    return make_fake_export(tmp_path / "fake_export")


@pytest.fixture(scope="session")
def fake_export_session(tmp_path_factory) -> Path:
    return make_fake_export(tmp_path_factory.mktemp("fake") / "fake_export")


def make_fake_export(base: Path) -> Path:
    import json
    import shutil

    from mlm_scorer.model_dir import MANIFEST_NAME, sha256_file

    vdir = base / "1"
    (vdir / "tokenizer").mkdir(parents=True)
    shutil.copyfile(SMALL_VOCAB, vdir / "tokenizer" / "vocab.txt")
    from tokenizers import BertWordPieceTokenizer

    BertWordPieceTokenizer(str(vdir / "tokenizer" / "vocab.txt"), lowercase=True).save(
        str(vdir / "tokenizer" / "tokenizer.json"))
    n = len(SMALL_VOCAB.read_text(encoding="utf-8").rstrip("\n").split("\n"))
    manifest = {"format": "mlm-scorer-export", "format_version": 1, "vocab_size": n,
                "vocab_sha256": sha256_file(vdir / "tokenizer" / "vocab.txt"), "max_seq_length": 32, "top_k": 3,
                "do_lower_case": True, "tokenize_chinese_chars": True,
                "special_tokens": {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"},
                "model_checksum": "fake", "signature": {}}
    (vdir / MANIFEST_NAME).write_text(json.dumps(manifest))
    return vdir.parent



@pytest.fixture(scope="session")
def antibody_batches(antiberty_export, tmp_path_factory):
    """The baseline of natural antibody domains and the current batch with three corrupted rows
    (tests/antibodies.py), scored with AntiBERTy once per session. Scoring goes through a persistent
    score cache (``cache``): tests that score these rows again, with other flag rules or under
    Airflow, read the engine's results from it instead of running the model again."""
    from types import SimpleNamespace

    from antibodies import baseline_rows, corrupted_ids, current_rows
    from helpers import write_tsv

    from mlm_scorer.pipeline import score_file

    d = tmp_path_factory.mktemp("antibodies")
    ns = SimpleNamespace(dir=d, cache=d / "cache", model=antiberty_export, corrupted=corrupted_ids())
    for name, rows in (("baseline", baseline_rows()), ("current", current_rows())):
        tsv = write_tsv(d / f"{name}.tsv", rows)
        out = d / f"{name}.parquet"
        score_file(tsv, out, model=antiberty_export, id_column="id", score_cache=ns.cache)
        setattr(ns, f"{name}_tsv", tsv)
        setattr(ns, name, out)
    return ns
