"""Tiny random BERT checkpoints for tests, written with transformers' PyTorch classes.

Weights are drawn with a large range (initializer_range 0.3 by default): BERT's default 0.02 gives
near-uniform predictions that would hide a misaligned position, target or mask.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

#: The real bert-base-uncased vocabulary (Apache-2.0; see data/bert-base-uncased/SOURCE.md).
UNCASED_VOCAB = Path(__file__).resolve().parent / "data" / "bert-base-uncased" / "vocab.txt"
SMALL_VOCAB = Path(__file__).resolve().parent / "data" / "small_vocab.txt"


def make_hf_bert(out: Path, *, vocab: Path = SMALL_VOCAB, hidden: int = 32, layers: int = 2, heads: int = 4,
                 intermediate: int = 64, max_pos: int = 64, seed: int = 0, init_range: float = 0.3,
                 do_lower_case: bool = True, safetensors: bool = True, hidden_act: str = "gelu") -> Path:
    """Write a random BertForMaskedLM (config.json, weights, vocab.txt, tokenizer_config.json) to ``out``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    out.mkdir(parents=True, exist_ok=True)
    n_vocab = len(vocab.read_text(encoding="utf-8").rstrip("\n").split("\n"))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=n_vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_pos, initializer_range=init_range,
                     hidden_act=hidden_act)
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # biases and LayerNorms are initialised to 0/1: randomise them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * init_range)
    model.save_pretrained(str(out))
    if not safetensors:  # transformers 5 always writes safetensors: write the legacy format by hand
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    shutil.copyfile(vocab, out / "vocab.txt")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case,
                                                           "tokenizer_class": "BertTokenizer"}))
    return out


def antiberty_files() -> dict[str, Path] | None:
    """The three files of AntiBERTy (a real pretrained BERT masked LM, MIT) in the antiberty==0.1.3 wheel,
    or None when it is not installed (``make test`` installs it with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("antiberty")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "trained_models"
    files = {"vocab.txt": root / "vocab.txt", "config.json": root / "AntiBERTy_md_smooth" / "config.json",
             "pytorch_model.bin": root / "AntiBERTy_md_smooth" / "pytorch_model.bin"}
    return files if all(p.is_file() for p in files.values()) else None


def copy_antiberty(out: Path) -> Path:
    """The checkpoint as a user lays it out: the wheel's vocab.txt, config.json and pytorch_model.bin in one
    directory, untouched (no tokenizer_config.json; the weights carry species/chain/graft heads)."""
    files = antiberty_files()
    if files is None:
        raise FileNotFoundError("antiberty==0.1.3 is not installed (pip install --no-deps antiberty==0.1.3)")
    out.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copyfile(src, out / name)
    return out


def load_reference(hf_dir: Path):
    """(model, tokenizer) from transformers, for independent reference numbers."""
    from transformers import BertForMaskedLM, BertTokenizerFast

    model = BertForMaskedLM.from_pretrained(str(hf_dir)).eval()
    tok = BertTokenizerFast.from_pretrained(str(hf_dir))
    n_vocab = len((hf_dir / "vocab.txt").read_text(encoding="utf-8").rstrip("\n").split("\n"))
    assert len(tok) == n_vocab, f"tokenizer has {len(tok)} tokens, vocab.txt {n_vocab}"
    return model, tok
