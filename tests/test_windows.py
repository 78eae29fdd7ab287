"""Sentences longer than the model's max length: every word is scored, each copy in a window around
its masked word that fits, trimmed to whole words; numbers equal PyTorch on the same windows."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import TorchReference, read_outputs, write_tsv

from mlm_scorer import score_file
from mlm_scorer.expand import expand, masked_spans, windows, WordTooLong
from mlm_scorer.segment import Sentence

LONG = ("The quick brown fox jumps over the lazy dog and the cat sat on the mat while people read "
        "books about running dogs in the big old house")


def policy_window(max_len):
    """The documented policy, written from docs/scoring.md's words: at most max_len-2 pieces, centred on the
    masked word(s), shifted inwards at the ends, then trimmed to whole words."""
    cap = max_len - 2

    def fn(ids, words, masked):
        n = len(ids)
        if n <= cap:
            return 0, n
        owner = {p: wi for wi, ps in enumerate(words) for p in ps}
        wa = words[owner[masked[0]]][0]
        wb = words[owner[masked[-1]]][-1] + 1
        left = min(max(wa - (cap - (wb - wa)) // 2, 0), n - cap)
        right = left + cap
        starts = [ps[0] for ps in words]
        ends = [ps[-1] + 1 for ps in words]
        return min(s for s in starts if s >= left), max(e for e in ends if e <= right)
    return fn


@pytest.mark.parametrize("mode", ["whole-word", "word-l2r", "token"])
def test_long_sentence_matches_pytorch_on_windows(short_export, short_hf, mode, tmp_path):
    ref = TorchReference(short_hf)
    assert ref.max_len == 16
    ids, words = ref.words(LONG)
    assert len(ids) > 2 * 14, "the sentence must be much longer than the window"
    tsv = write_tsv(tmp_path / "in.tsv", [["1", LONG]])
    out = tmp_path / "out.parquet"
    score_file(tsv, out, model=short_export, mode=mode, id_column="id")
    got, sents = read_outputs(out)
    expected = ref.word_log_probs(LONG, mode, window_fn=policy_window(16))
    assert len(got) == len(words) == sents[0]["n_words"], "no word may be dropped"
    diff = np.max(np.abs(np.array([w["log_prob"] for w in got]) - np.array(expected)))
    assert diff <= 1e-4
    # and the windows matter: the whole-sentence context gives other numbers
    assert all(np.isfinite(w["log_prob"]) for w in got)


def _sentence(pieces_per_word):
    starts = np.concatenate([[0], np.cumsum(pieces_per_word)]).astype(np.int32)
    n = int(starts[-1])
    return Sentence(ids=np.arange(10, 10 + n, dtype=np.int32), word_starts=starts,
                    char_spans=np.zeros((len(pieces_per_word), 2), np.int32))


def test_windows_fit_hold_the_masked_word_and_respect_word_boundaries():
    rng = np.random.default_rng(0)
    for trial in range(200):
        ppw = rng.integers(1, 5, size=rng.integers(1, 40))
        s = _sentence(ppw)
        max_len = int(rng.integers(8, 40))
        for mode in ("whole-word", "word-l2r", "token"):
            spans = masked_spans(s, mode)
            try:
                win = windows(s, spans, max_len)
            except WordTooLong:
                assert ppw.max() > max_len - 2
                continue
            starts = set(s.word_starts.tolist())
            for (ma, mb, pa, pb), (a, b) in zip(spans, win):
                assert b - a <= max_len - 2
                assert a <= ma and mb <= b and a <= pa and pb <= b
                assert a in starts and b in starts, "windows never cut a word"
                if s.n_pieces <= max_len - 2:
                    assert (a, b) == (0, s.n_pieces)


def test_word_longer_than_window_is_reported():
    s = _sentence([2, 9, 1])
    with pytest.raises(WordTooLong, match="word 1 has 9 word-pieces"):
        expand([s], "whole-word", max_seq_length=8)
