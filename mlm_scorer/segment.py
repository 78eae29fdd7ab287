"""Split text into words and pieces, keeping each word's pieces together.

Words are the tokenizer's pre-tokenization units, with character offsets into the ORIGINAL text, so a
word can be cut out of the input with ``text[char_start:char_end]`` whatever lower-casing or accent
stripping the model applies::

    text    "The cat's jacksonville!"
    words   The | cat | ' | s | jacksonville | !
    pieces  the | cat | ' | s | jack ##son ##ville | !
    word_starts (piece index of each word's first piece, plus the end): [0, 1, 2, 3, 4, 7, 8]

Units by tokenizer: BERT's WordPiece splits on whitespace and punctuation (each CJK character on its
own); RoBERTa's byte-level BPE on its regex (letters, digits, other symbols, each run taking the space
before it: "Ġcat", "'s", "!"); XLM-R's SentencePiece on whitespace only ("▁cat's!" is one word); ESM's
one residue per token. A word's offsets never include the space (or the ``▁``) its first piece carries.
A unit that is only whitespace (byte-level BPE makes one of the first of two spaces: "a␣␣b" -> a | Ġ |
Ġb) belongs to the word after it (at the end of a text: the word before), so every piece is in a word and
a sentence's PLL still sums every piece.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelError
from .model_dir import ModelDir


@dataclass
class Sentence:
    """One tokenized sentence.

    Attributes:
      ids: int32 array [n_pieces] of WordPiece ids (no [CLS]/[SEP]).
      word_starts: int32 array [n_words + 1]; pieces of word w are ids[word_starts[w]:word_starts[w+1]].
      char_spans: int32 array [n_words, 2]; (start, end) character offsets into the original text.
    """

    ids: np.ndarray
    word_starts: np.ndarray
    char_spans: np.ndarray

    @property
    def n_words(self) -> int:
        return len(self.word_starts) - 1

    @property
    def n_pieces(self) -> int:
        return len(self.ids)


class WordTokenizer:
    """The tokenizer of an export (``tokenizer/tokenizer.json``), with word grouping."""

    def __init__(self, model: ModelDir):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(model.tokenizer_json))
        except Exception as exc:
            raise ModelError(f"cannot load {model.tokenizer_json}: {exc}") from None
        vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if vocab_size != model.manifest["vocab_size"]:
            raise ModelError(f"{model.tokenizer_json} has {vocab_size} tokens, but the model's vocab_size is "
                             f"{model.manifest['vocab_size']}: tokenizer and model do not belong together")
        # The truncation/padding a tokenizer.json may carry would silently cut long sentences: turn it off.
        self._tok.no_truncation()
        self._tok.no_padding()
        st = model.manifest["special_tokens"]
        ids = {k: self._tok.token_to_id(v) for k, v in st.items()}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ModelError(f"special tokens {missing} are not in the vocabulary of {model.tokenizer_json}")
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = ids["cls"], ids["sep"], ids["mask"], ids["pad"]
        self.unk_id, self.unk_token = ids["unk"], st["unk"]
        self.vocab_size = vocab_size

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def tokenize(self, texts: list[str]) -> list[Sentence]:
        """Tokenize many texts at once (the Rust tokenizer runs them in parallel)."""
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [_to_sentence(e, t) for e, t in zip(encs, texts)]

    def unknown(self, sent: Sentence) -> np.ndarray:
        """bool [n_words]: the words whose pieces include the unknown token (``[UNK]``, ``<unk>``)."""
        if sent.n_words == 0:
            return np.zeros(0, bool)
        return np.logical_or.reduceat(sent.ids == self.unk_id, sent.word_starts[:-1])

    def unknown_share(self, words: list[str]) -> float:
        """Share of ``words`` (each tokenized alone) that contain the unknown token."""
        if not words:
            return 0.0
        return sum(bool(self.unknown(s).any()) for s in self.tokenize(words)) / len(words)


#: A run warns when at least this share of its words is unknown to the model's vocabulary (ordinary
#: English on bert-base-uncased: well under 1 %).
UNKNOWN_WARN_SHARE = 0.10


def unknown_words_warning(tok: WordTokenizer, unknown: int, words: int, samples: list[str]) -> str | None:
    """The warning for a run in which ``unknown`` of ``words`` words are unknown to the vocabulary (``samples``:
    some of them, as written), with the likely cause, or None when the share is below UNKNOWN_WARN_SHARE.

    Causes tried on the samples: residues (or characters) written without spaces, for a vocabulary of
    single-character tokens (a protein model); the casing the vocabulary does not have; else the text is
    not in the model's language or alphabet (a wrong model)."""
    if not words or unknown / words < UNKNOWN_WARN_SHARE:
        return None
    head = (f"{unknown / words:.0%} of words ({unknown:,} of {words:,}) are unknown to this model's vocabulary "
            f"(scored as {tok.unk_token}), so their scores say little about the text: ")
    samples = list(dict.fromkeys(w for w in samples if w))[:50]
    eg = ", ".join(repr(w if len(w) <= 24 else w[:21] + "...") for w in samples[:3])
    if samples:
        base = tok.unknown_share(samples)
        long = sum(map(len, samples)) / len(samples) >= 8
        spaced = {how: tok.unknown_share([" ".join(f(w)) for w in samples])
                  for how, f in (("", str), (" and in upper case", str.upper), (" and in lower case", str.lower))}
        how, best = min(spaced.items(), key=lambda kv: kv[1])
        if long and best <= 0.5 * base and best < 0.5:
            return head + (f"they look like sequences written without spaces (e.g. {eg}), and this model's "
                           f"vocabulary has single residues or characters: write them separated by spaces{how} "
                           f"('E V Q L V E S')")
        cased = {how: tok.unknown_share([f(w) for w in samples])
                 for how, f in (("upper", str.upper), ("lower", str.lower))}
        how, best = min(cased.items(), key=lambda kv: kv[1])
        if best <= 0.5 * base and best < 0.5:
            return head + (f"the model's vocabulary knows these words in {how} case (e.g. {eg}): the text's casing "
                           f"is not the model's; convert it, or use a model of the text's casing")
    return head + (f"the text may not be in this model's language or alphabet (e.g. {eg}): is --model the right "
                   f"model for it?")


def _to_sentence(enc, text: str) -> Sentence:
    ids = np.asarray(enc.ids, np.int32)
    # The tokenizer's units: (first piece, start, end), the span covering all of the unit's pieces.
    units: list[list[int]] = []
    prev = None
    for i, (w, (a, b)) in enumerate(zip(enc.word_ids, enc.offsets)):
        if w is None:  # only special tokens have no word; none are added here
            continue
        if w != prev:
            units.append([i, a, b])
            prev = w
        else:
            units[-1][1] = min(units[-1][1], a)
            units[-1][2] = max(units[-1][2], b)
    starts: list[int] = []
    spans: list[list[int]] = []
    blank_from = None  # first piece of whitespace-only units waiting for the next word
    for i, a, b in units:
        while a < b and text[a].isspace():  # the space a byte-level or SentencePiece unit starts with
            a += 1
        while a < b and text[b - 1].isspace():
            b -= 1
        if a == b:
            blank_from = i if blank_from is None else blank_from
            continue
        starts.append(i if blank_from is None else blank_from)
        spans.append([a, b])
        blank_from = None
    if not starts:  # nothing but whitespace: no words, and no pieces to score
        ids = ids[:0]
    starts.append(len(ids))  # trailing whitespace-only units stay with the last word
    return Sentence(ids=ids, word_starts=np.asarray(starts, np.int32),
                    char_spans=np.asarray(spans, np.int32).reshape(-1, 2))
