"""Tiny random checkpoints of the families beyond BERT, with tokenizers trained here, offline, and an
independent reference (transformers' AutoModelForMaskedLM + AutoTokenizer on the same directory).

Weights are drawn with a large range (0.3, biases and LayerNorms included), as tiny_models.py does for
BERT, so that a position, target or mask out of place changes the scores visibly. The tokenizers are
trained on tests/data/blimp_402.txt (BLiMP sentences, CC-BY: see tests/data/README.md): byte-level BPE
for RoBERTa, Unigram (SentencePiece style) for XLM-R and CamemBERT; DistilBERT and ELECTRA use the
small WordPiece vocabulary; ESM (ESM-2's rotary positions, or ESM-1b's absolute ones) the 33 tokens of
ESM-2's vocabulary.
"""
from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

from helpers import TorchReference
from tiny_models import SMALL_VOCAB

CORPUS = Path(__file__).resolve().parent / "data" / "blimp_402.txt"
ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
             "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]
#: What make_family builds: one per model_type, and "esm1b" (ESM with ESM-1b's absolute positions and
#: LayerNorm after the embeddings, model_type esm).
FAMILIES = ("roberta", "camembert", "xlm-roberta", "distilbert", "electra", "esm", "esm1b")


def corpus() -> list[str]:
    return CORPUS.read_text(encoding="utf-8").splitlines()


@lru_cache(maxsize=None)
def _bpe(vocab_size: int, lines: tuple[str, ...] | None = None):
    """(vocab, merges) of a byte-level BPE trained on ``lines`` (default: the corpus), RoBERTa's four
    specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(lines or corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


@lru_cache(maxsize=None)
def _unigram(vocab_size: int):
    """[(piece, score)] of a Unigram model trained on the corpus (whitespace split, ``▁`` prefix), the
    four specials first, as SentencePiece models for XLM-R and CamemBERT are laid out."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False))
    return [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]


def _randomize(model, init_range: float, seed: int) -> None:
    """Biases and LayerNorms are initialised to 0/1: draw them too (as tiny_models.make_hf_bert)."""
    import torch

    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * init_range)


def make_family(family: str, out: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
                max_pos: int = 64, seed: int = 0, init_range: float = 0.3, tokenizer_files: str = "tokenizer.json",
                bpe_vocab: int = 600, bpe_lines: tuple[str, ...] | None = None, vocab_size: int | None = None) -> Path:
    """Write a random ``family`` masked LM (config.json, model.safetensors, the tokenizer's files) to ``out``.

    RoBERTa only: ``tokenizer_files`` "tokenizer.json" as transformers saves it, or "vocab.json+merges.txt"
    (no tokenizer.json, as older RoBERTa checkpoints are laid out); a BPE of ``bpe_vocab`` tokens trained on
    ``bpe_lines`` (default: the test corpus); ``vocab_size`` pads the vocabulary with tokens no text produces
    (``<unused_N>``: unreachable without merges) to give the embeddings and the head a real model's size.
    """
    import torch
    import transformers as T

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, initializer_range=init_range)
    if family in ("roberta", "camembert", "xlm-roberta"):
        if family == "roberta":
            vocab, merges = _bpe(bpe_vocab, bpe_lines)
            vocab = dict(vocab)
            for i in range(len(vocab), (vocab_size or 0) - 1):  # - 1: <mask> is added after
                vocab[f"<unused_{i}>"] = i
            tok = T.RobertaTokenizer(vocab=vocab, merges=list(merges))
        elif family == "xlm-roberta":
            tok = T.XLMRobertaTokenizer(vocab=_unigram(500))
        else:
            tok = T.CamembertTokenizer(vocab=_unigram(450))
        cfg_cls, model_cls = {"roberta": (T.RobertaConfig, T.RobertaForMaskedLM),
                              "camembert": (T.CamembertConfig, T.CamembertForMaskedLM),
                              "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaForMaskedLM)}[family]
        cfg = cfg_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, max_position_embeddings=max_pos + 2, type_vocab_size=1, **common)
        model = model_cls(cfg).eval()
    elif family == "distilbert":
        tok = None
        n = len(SMALL_VOCAB.read_text(encoding="utf-8").rstrip("\n").split("\n"))
        cfg = T.DistilBertConfig(vocab_size=n, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate,
                                 max_position_embeddings=max_pos, initializer_range=init_range, pad_token_id=0)
        model = T.DistilBertForMaskedLM(cfg).eval()
    elif family == "electra":
        tok = None
        n = len(SMALL_VOCAB.read_text(encoding="utf-8").rstrip("\n").split("\n"))
        cfg = T.ElectraConfig(vocab_size=n, embedding_size=hidden // 2, max_position_embeddings=max_pos, **common)
        model = T.ElectraForMaskedLM(cfg).eval()
    elif family in ("esm", "esm1b"):
        (out / "vocab.txt").write_text("\n".join(ESM_VOCAB) + "\n", encoding="utf-8")
        tok = T.EsmTokenizer(str(out / "vocab.txt"))
        esm2 = family == "esm"
        cfg = T.EsmConfig(vocab_size=len(ESM_VOCAB), pad_token_id=1, mask_token_id=ESM_VOCAB.index("<mask>"),
                          max_position_embeddings=max_pos + (0 if esm2 else 2), token_dropout=True,
                          position_embedding_type="rotary" if esm2 else "absolute", emb_layer_norm_before=not esm2,
                          **common)
        model = T.EsmForMaskedLM(cfg).eval()
    else:
        raise ValueError(family)
    _randomize(model, init_range, seed)
    model.save_pretrained(str(out))
    if tok is None:  # WordPiece: the BERT layout
        shutil.copyfile(SMALL_VOCAB, out / "vocab.txt")
        (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                               "tokenizer_class": "BertTokenizer"}))
    else:
        tok.save_pretrained(str(out))
    if family == "roberta" and tokenizer_files == "vocab.json+merges.txt":
        vocab, merges = _bpe(bpe_vocab, bpe_lines)
        (out / "vocab.json").write_text(json.dumps(dict(vocab)), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        (out / "tokenizer.json").unlink()
    return out


class FamilyReference(TorchReference):
    """Word log-probs computed independently, as helpers.TorchReference does for BERT, for any family:
    transformers' AutoTokenizer and AutoModelForMaskedLM on the checkpoint directory, the full-vocabulary
    softmax at every position, masked copies built from the definitions."""

    def __init__(self, hf_dir: Path):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.model = AutoModelForMaskedLM.from_pretrained(str(hf_dir)).eval()
        self.tok = AutoTokenizer.from_pretrained(str(hf_dir))
        assert len(self.tok) == self.model.config.vocab_size, (len(self.tok), self.model.config.vocab_size)
        cfg = self.model.config
        # the longest copy: RoBERTa's (and ESM-1b's) positions start at padding_idx + 1
        offset = cfg.model_type in ("roberta", "camembert", "xlm-roberta") or (
            cfg.model_type == "esm" and cfg.position_embedding_type == "absolute")
        self.max_len = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if offset else 0)
        self.cls_id = self.tok.cls_token_id
        self.sep_id = self.tok.sep_token_id if self.tok.sep_token_id is not None else self.tok.eos_token_id

    def word_log_probs(self, text: str, mode: str, window_fn=None) -> list[float]:
        """As TorchReference's, on one torch thread: a tiny model's forward pass costs ~10x more CPU on
        two spinning threads of a busy 2-core machine."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().word_log_probs(text, mode, window_fn)
        finally:
            torch.set_num_threads(threads)

    def words(self, text: str) -> tuple[list[int], list[list[int]]]:
        """(piece ids, pieces of each word): the tokenizer's units; a whitespace-only unit joins the next
        word (the last one at the end of the text). ESM's slow tokenizer has no word ids: one token a word."""
        if not self.tok.is_fast:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            return ids, [[i] for i in range(len(ids))]
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(enc.word_ids()):
            groups.setdefault(w, []).append(i)
        words, pending = [], []
        for w in sorted(groups):
            pieces = pending + groups[w]
            if not "".join(text[a:b] for a, b in (enc["offset_mapping"][i] for i in groups[w])).strip():
                pending = pieces  # whitespace only
                continue
            words.append(pieces)
            pending = []
        if pending and words:
            words[-1] += pending
        return ids, words
