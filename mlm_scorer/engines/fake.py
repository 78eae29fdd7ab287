"""A deterministic engine for pipeline and CLI tests that need no model runtime.

The "log-probability" of a target is a pure function of (the unmasked context, position, target id), so
identical copies get identical numbers wherever they land in a batch and whatever the padding; it also
records every batch it saw (``calls``) so tests can count copies and check padding.
"""
from __future__ import annotations

import time

import numpy as np

from ..model_dir import ModelDir
from .base import Batch, BatchResult, Engine


class FakeEngine(Engine):
    name = "fake"
    OPTIONS = {"k": "top-k width", "max_batch_size": "largest batch", "delay": "seconds per batch"}

    def __init__(self, model: ModelDir | None = None, *, top_k: bool = False, k: int = 3,
                 max_batch_size: int | None = None, delay: float | str = 0.0, **options):
        self.delay = float(delay)  # seconds per batch, to make runs long enough to interrupt in tests
        self.want_top_k = top_k
        self.k = k
        self.max_batch_size = max_batch_size
        self.calls: list[tuple[int, int, int]] = []  # (batch, seq, predictions) per call
        self.copies = 0

    def score_batch(self, batch: Batch) -> BatchResult:
        if self.delay:
            time.sleep(self.delay)
        B, T = batch.input_ids.shape
        P = batch.masked_lm_positions.shape[1]
        self.calls.append((B, T, P))
        self.copies += B
        lengths = batch.input_mask.sum(1)
        out = np.zeros((B, P), np.float32)
        for b in range(B):
            ctx = batch.input_ids[b, : lengths[b]].astype(np.int64)
            h = int((ctx * (np.arange(len(ctx)) + 7)).sum() % 9973)
            for p in range(P):
                pos = int(batch.masked_lm_positions[b, p])
                if pos > 0:
                    tgt = int(batch.masked_lm_ids[b, p])
                    out[b, p] = -((h * 31 + pos * 17 + tgt * 13) % 1000) / 100.0 - 0.01
        res = BatchResult(log_probs=out)
        if self.want_top_k:
            ids = np.tile(np.arange(self.k, dtype=np.int32), (B, P, 1)) + 1
            res.top_k_ids = np.where(batch.masked_lm_positions[..., None] > 0, ids, -1).astype(np.int32)
            res.top_k_log_probs = np.where(res.top_k_ids >= 0, -np.arange(1, self.k + 1, dtype=np.float32), -np.inf)
        return res
