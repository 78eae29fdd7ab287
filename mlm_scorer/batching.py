"""Pack masked copies from many sentences into padded batches, grouped by length.

Copies are sorted by (sequence length, predictions per copy) and cut into batches holding at most
``max_batch_size`` copies and at most ``batch_tokens`` padded tokens; a batch is also closed before a
longer copy would bring its padding efficiency (real tokens / computed tokens) under
``min_efficiency``, so a batch pads only to the longest copy among near-equal neighbours. ``plan`` returns index arrays; ``build`` makes the arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engines.base import Batch, Engine
from .expand import PRED_A, PRED_B, WIN_A, WIN_B
from .segment import Sentence


@dataclass(frozen=True)
class BatchPolicy:
    """How big a batch may be. ``batch_tokens`` bounds memory and latency; ``max_batch_size`` is the
    engine's hard limit (a TensorRT profile's maximum, a server's max_batch_size)."""

    batch_tokens: int = 8192
    max_batch_size: int = 256
    #: a batch is closed rather than take a longer copy that would make real/computed tokens drop below
    #: this; near 1.0 suits CPUs (cost ~ computed tokens), lower values give GPUs larger batches
    min_efficiency: float = 0.97

    def __post_init__(self):
        if self.batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("batch_tokens and max_batch_size must be positive")
        if not 0.0 <= self.min_efficiency <= 1.0:
            raise ValueError("min_efficiency must be between 0 and 1")

    @classmethod
    def for_engine(cls, engine: Engine, batch_tokens: int | None = None,
                   max_batch_size: int | None = None) -> "BatchPolicy":
        """The policy for ``engine``: ``batch_tokens`` if given, else the engine's
        ``preferred_batch_tokens``, else 8192; at most ``max_batch_size``, the engine's limit and 256 copies."""
        tokens = batch_tokens or engine.preferred_batch_tokens or cls.batch_tokens
        return cls(batch_tokens=int(tokens),
                   max_batch_size=min(x for x in (max_batch_size, engine.max_batch_size, cls.max_batch_size) if x))


def copy_lengths(copies: np.ndarray) -> np.ndarray:
    """Sequence length of each copy: its window plus [CLS] and [SEP]."""
    return copies[:, WIN_B] - copies[:, WIN_A] + 2


def plan(copies: np.ndarray, policy: BatchPolicy) -> list[np.ndarray]:
    """Split copy indices into batches of near-equal length. Each element: int64 indices into copies."""
    if len(copies) == 0:
        return []
    lengths = copy_lengths(copies)
    preds = copies[:, PRED_B] - copies[:, PRED_A]
    order = np.lexsort((preds, lengths))
    sorted_len = lengths[order].tolist()
    batches = []
    start = 0
    n = len(order)
    while start < n:
        # sorted ascending: the batch's padded length is the length of its last copy
        stop = start + 1
        real = sorted_len[start]
        while stop < n and stop - start < policy.max_batch_size:
            T = sorted_len[stop]
            padded = (stop - start + 1) * T
            if padded > policy.batch_tokens or real + T < policy.min_efficiency * padded:
                break
            real += T
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


def build(copies: np.ndarray, sentences: list[Sentence], mask_id: int, cls_id: int, sep_id: int,
          pad_id: int = 0) -> Batch:
    """Padded int32 arrays for the given copies (rows of the copies array).

    Sequence padding uses ``pad_id`` with input_mask 0; unused prediction slots use position 0 and id 0.
    """
    lengths = copy_lengths(copies)
    preds = copies[:, PRED_B] - copies[:, PRED_A]
    B, T, P = len(copies), int(lengths.max()), int(preds.max())
    input_ids = np.full((B, T), pad_id, np.int32)
    input_mask = np.zeros((B, T), np.int32)
    positions = np.zeros((B, P), np.int32)
    targets = np.zeros((B, P), np.int32)
    for r, (s, ma, mb, pa, pb, wa, wb) in enumerate(copies.tolist()):
        ids = sentences[s].ids
        L = wb - wa
        row = input_ids[r]
        row[0] = cls_id
        row[1:L + 1] = ids[wa:wb]
        row[1 + ma - wa:1 + mb - wa] = mask_id
        row[L + 1] = sep_id
        input_mask[r, :L + 2] = 1
        k = pb - pa
        positions[r, :k] = np.arange(1 + pa - wa, 1 + pb - wa)
        targets[r, :k] = ids[pa:pb]
    return Batch(input_ids=input_ids, input_mask=input_mask, segment_ids=np.zeros((B, T), np.int32),
                 masked_lm_positions=positions, masked_lm_ids=targets)


def padding_efficiency(copies: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int]:
    """(real tokens, computed tokens) over the planned batches."""
    lengths = copy_lengths(copies)
    real = int(lengths.sum())
    computed = int(sum(len(b) * lengths[b].max() for b in batches))
    return real, computed

