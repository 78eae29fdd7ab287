"""Turn sentences into masked copies, one per prediction unit of the chosen mode.

For the sentence "the jacksonville cat" = pieces [the, jack, ##son, ##ville, cat] (word_starts
[0, 1, 4, 5]), the copies are (M = [MASK], the predicted pieces marked with ^)::

    whole-word   [CLS] M    the  ...           one copy per word, all its pieces masked, all predicted
                 [CLS] the  M^   M^   M^   cat [SEP]
    word-l2r     [CLS] the  M^   M    M    cat [SEP]   piece i predicted with pieces i..end of its word
                 [CLS] the  jack M^   M    cat [SEP]   masked (Kauf & Ivanova 2023)
                 [CLS] the  jack ##son M^  cat [SEP]
    token        [CLS] the  jack M^ ##ville cat [SEP]  one copy per piece, only it masked
                                                        (Salazar et al. 2020)

A copy is six integers: (sentence, mask_start, mask_end, pred_start, pred_end, window_start,
window_end) in piece indices: pieces [mask_start, mask_end) are replaced by [MASK], the log-probs of
pieces [pred_start, pred_end) are read, and the model sees pieces [window_start, window_end).

Windows. A copy fits the model when its window plus [CLS] and [SEP] is at most ``max_seq_length``. A
sentence that fits is seen whole. A longer one gets, for each copy, a window of at most
``max_seq_length - 2`` pieces centred on the masked span, shifted inwards at the sentence's ends and
then trimmed to whole words (a window never starts or ends inside a word). Nothing is truncated:
every word is scored, each with as much context as fits around it. A single word with more pieces
than the window can hold cannot be scored; ``WordTooLong`` says so.
"""
from __future__ import annotations

import numpy as np

from .segment import Sentence

MODES = ("whole-word", "word-l2r", "token")

# Column indices of the copies array.
SENT, MASK_A, MASK_B, PRED_A, PRED_B, WIN_A, WIN_B = range(7)


class WordTooLong(ValueError):
    def __init__(self, word_index: int, n_pieces: int, window: int):
        self.word_index, self.n_pieces, self.window = word_index, n_pieces, window
        super().__init__(f"word {word_index} has {n_pieces} word-pieces, more than the {window} that fit "
                         f"the model's max_seq_length")


def masked_spans(sent: Sentence, mode: str) -> np.ndarray:
    """[n_copies, 4] int64 of (mask_a, mask_b, pred_a, pred_b) for one sentence."""
    ws = sent.word_starts.astype(np.int64)
    if mode == "whole-word":
        a, b = ws[:-1], ws[1:]
        return np.stack([a, b, a, b], axis=1)
    n = sent.n_pieces
    piece = np.arange(n, dtype=np.int64)
    if mode == "token":
        return np.stack([piece, piece + 1, piece, piece + 1], axis=1)
    if mode == "word-l2r":
        word_end = np.repeat(ws[1:], np.diff(ws))  # end of each piece's word
        return np.stack([piece, word_end, piece, piece + 1], axis=1)
    raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")


def windows(sent: Sentence, spans: np.ndarray, max_seq_length: int) -> np.ndarray:
    """[n_copies, 2] (win_a, win_b) for the masked spans, per the policy in the module docstring."""
    n = sent.n_pieces
    cap = max_seq_length - 2
    if n <= cap:
        return np.tile(np.array([0, n], np.int64), (len(spans), 1))
    ws = sent.word_starts.astype(np.int64)
    out = np.empty((len(spans), 2), np.int64)
    for c, (ma, mb, _, _) in enumerate(spans):
        # The masked span grows to its whole word(s): the window must hold them.
        wa = ws[np.searchsorted(ws, ma, side="right") - 1]
        wb = ws[np.searchsorted(ws, mb, side="left")]
        if wb - wa > cap:
            raise WordTooLong(int(np.searchsorted(ws, ma, side="right") - 1), int(wb - wa), cap)
        left = max(0, min(int(wa) - (cap - int(wb - wa)) // 2, n - cap))
        right = left + cap
        # Trim to word boundaries: first word start >= left, last word boundary <= right.
        a = ws[np.searchsorted(ws, left, side="left")]
        b = ws[np.searchsorted(ws, right, side="right") - 1]
        out[c] = (min(a, wa), max(b, wb))
    return out


def expand(sentences: list[Sentence], mode: str, max_seq_length: int) -> np.ndarray:
    """All copies of the given sentences: int64 array [n_copies, 7] (columns SENT..WIN_B).

    Raises WordTooLong (with ``.sentence`` set to the index) for a word that cannot fit.
    """
    parts = []
    for i, s in enumerate(sentences):
        spans = masked_spans(s, mode)
        try:
            win = windows(s, spans, max_seq_length)
        except WordTooLong as exc:
            exc.sentence = i
            raise
        parts.append(np.concatenate([np.full((len(spans), 1), i, np.int64), spans, win], axis=1))
    if not parts:
        return np.zeros((0, 7), np.int64)
    return np.concatenate(parts)
