"""Batching across sentences: duplicates scored once, mixed lengths equal each sentence alone,
unused prediction slots padded as documented."""
from __future__ import annotations

import numpy as np
from helpers import read_outputs, write_tsv

from mlm_scorer import score_file
from mlm_scorer.batching import BatchPolicy, build, plan
from mlm_scorer.engines.base import Batch, get_engine
from mlm_scorer.engines.fake import FakeEngine
from mlm_scorer.expand import expand
from mlm_scorer.model_dir import ModelDir
from mlm_scorer.scorer import Scorer

TEXTS = ["The cat sat on the mat.", "a", "The quick brown fox jumps over the lazy dog and the cat!",
         "Running dogs walked; people read books?", "jacksonville"]


def test_duplicates_are_scored_once(fake_export, tmp_path):
    md = ModelDir.open(fake_export)
    eng = FakeEngine(md)
    scorer = Scorer(md, eng, mode="token")
    rows = [[str(i), t] for i, t in enumerate(["The cat sat.", "A dog ran.", "The cat sat."] * 4)]
    tsv = write_tsv(tmp_path / "in.tsv", rows)
    out = tmp_path / "o.parquet"
    s = score_file(tsv, out, scorer=scorer, id_column="id", chunk_rows=5)  # duplicates across chunks too
    one = Scorer(md, FakeEngine(md), mode="token")
    expected_copies = sum(r.n_copies for r in one.score(["The cat sat.", "A dog ran."]))
    assert eng.copies == expected_copies
    assert s.duplicates == 10 and s.unique_scored == 2
    words, sents = read_outputs(out)
    assert len(sents) == 12 and [x["id"] for x in sents] == [str(i) for i in range(12)]
    plls = {}
    for x in sents:
        plls.setdefault(x["text"], set()).add(x["pll"])
    assert all(len(v) == 1 for v in plls.values())


def test_mixed_length_batch_equals_each_sentence_alone(tiny_export):
    md = ModelDir.open(tiny_export)
    with get_engine("saved_model", model=md) as eng:
        together = Scorer(md, eng, mode="whole-word").score(TEXTS)
        alone = [Scorer(md, eng, mode="whole-word").score([t])[0] for t in TEXTS]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.piece_log_probs, b.piece_log_probs, atol=1e-5)


def test_batches_group_lengths_and_respect_limits(fake_export):
    md = ModelDir.open(fake_export)
    scorer = Scorer(md, FakeEngine(md))
    sents = scorer.tokenizer.tokenize(TEXTS * 20)
    copies = expand(sents, "token", md.max_seq_length)
    policy = BatchPolicy(batch_tokens=256, max_batch_size=16)
    batches = plan(copies, policy)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(copies))), "each copy exactly once"
    lengths = copies[:, 6] - copies[:, 5] + 2
    for b in batches:
        assert len(b) <= 16 and len(b) * lengths[b].max() <= max(256, lengths[b].max())
    real = lengths.sum()
    computed = sum(len(b) * lengths[b].max() for b in batches)
    assert real / computed >= 0.97
    for b in batches:  # each batch on its own keeps the bound
        assert lengths[b].sum() >= 0.97 * len(b) * lengths[b].max()


def test_unused_slots_are_padded_and_return_zero(tiny_export):
    md = ModelDir.open(tiny_export)
    scorer = Scorer(md, FakeEngine(md), mode="whole-word")
    sents = scorer.tokenizer.tokenize(["jacksonville cat"])  # 12 pieces + 1: P = 12 for both copies
    copies = expand(sents, "whole-word", md.max_seq_length)
    batch = build(copies, sents, scorer.tokenizer.mask_id, scorer.tokenizer.cls_id, scorer.tokenizer.sep_id)
    assert batch.masked_lm_positions.shape[1] == 12
    assert (batch.masked_lm_positions[1, 1:] == 0).all() and (batch.masked_lm_ids[1, 1:] == 0).all()
    with get_engine("saved_model", model=md, top_k=True) as eng:
        res = eng.run(batch)
    assert (res.log_probs[1, 1:] == 0.0).all() and (res.log_probs[0] < 0).all()
    assert (res.top_k_ids[1, 1:] == -1).all() and np.isneginf(res.top_k_log_probs[1, 1:]).all()


def test_engine_run_slices_to_max_batch_size(fake_export):
    md = ModelDir.open(fake_export)
    eng = FakeEngine(md, max_batch_size=3)
    b = Batch(*(np.ones((7, 4), np.int32),) * 3, np.ones((7, 1), np.int32), np.ones((7, 1), np.int32))
    res = eng.run(b)
    assert res.log_probs.shape == (7, 1) and [c[0] for c in eng.calls] == [3, 3, 1]


def test_duplicates_across_chunks_survive_cache_eviction(fake_export):
    """Chunks prepared ahead of running (as the pipeline's reader thread does) with a tiny dedupe cache:
    every duplicate still gets its result, equal to scoring it alone."""
    md = ModelDir.open(fake_export)
    scorer = Scorer(md, FakeEngine(md), mode="token", cache_size=1)
    chunks = [["a cat", "the dog", "a cat"], ["the dog", "a mat", "a cat"], ["a mat", "the dog", "new one"]]
    prepared = [scorer.prepare(c) for c in chunks]  # all prepared before any runs
    got = [[r.pll for r in scorer.run(p)] for p in prepared]
    ref = Scorer(md, FakeEngine(md), mode="token")
    want = [[ref.score([t])[0].pll for t in c] for c in chunks]
    assert got == want


def test_policy_for_engine_takes_the_users_then_the_engines_batch_tokens(fake_export):
    md = ModelDir.open(fake_export)
    eng = FakeEngine(md, max_batch_size=64)
    assert eng.preferred_batch_tokens is None
    p = BatchPolicy.for_engine(eng)
    assert (p.batch_tokens, p.max_batch_size) == (BatchPolicy.batch_tokens, 64)  # the scorer's default
    eng.preferred_batch_tokens = 1024
    assert BatchPolicy.for_engine(eng).batch_tokens == 1024  # the engine's preference
    p = BatchPolicy.for_engine(eng, batch_tokens=300, max_batch_size=16)  # the user's settings win
    assert (p.batch_tokens, p.max_batch_size) == (300, 16)
    assert BatchPolicy.for_engine(FakeEngine(md), max_batch_size=1000).max_batch_size == BatchPolicy.max_batch_size
    assert Scorer(md, eng, mode="token").policy.batch_tokens == 1024  # a Scorer made without a policy too
