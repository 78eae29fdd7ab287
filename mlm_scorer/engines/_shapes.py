"""Pure shape logic for engines with fixed-range inputs (TensorRT): profiles, bucketing, batch splitting.

No framework imports: everything here is plain Python / NumPy and unit-tested without a GPU.

Terms:
  * a *profile* is a TensorRT optimization profile: for every input a (min, opt, max) shape. The masked-LM
    has two dynamic dimensions per input group: batch B and sequence length T for input_ids /
    input_mask / segment_ids [B,T], and B and predictions P for masked_lm_positions / masked_lm_ids [B,P].
    ``Profile`` keeps the three ranges (batch, seq, predictions) with their opt points.
  * *bucketing* rounds T (and P) up to a small set of lengths so that a runtime sees few distinct shapes
    (TensorRT picks kernels per shape; fewer shapes means fewer set_input_shape calls and tactic caches).
    Padding is safe: extra tokens have input_mask 0 and extra slots position 0 (the slot-padding rule).
  * *splitting* cuts a batch larger than a profile's max batch into chunks the profile accepts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Profile:
    """One optimization profile: inclusive (min, opt, max) for batch, seq and predictions."""

    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    predictions: tuple[int, int, int]

    def __post_init__(self):
        for name in ("batch", "seq", "predictions"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"profile {name} range must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")

    def accepts(self, seq: int, predictions: int, batch: int = 1) -> bool:
        """True if a [batch, seq] / [batch, predictions] input fits this profile."""
        return (self.batch[0] <= batch <= self.batch[2] and self.seq[0] <= seq <= self.seq[2]
                and self.predictions[0] <= predictions <= self.predictions[2])

    def input_shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """Per input name, the (min, opt, max) shapes, as ``IOptimizationProfile.set_shape`` takes them."""
        bt = tuple((self.batch[i], self.seq[i]) for i in range(3))
        bp = tuple((self.batch[i], self.predictions[i]) for i in range(3))
        return {"input_ids": bt, "input_mask": bt, "segment_ids": bt,
                "masked_lm_positions": bp, "masked_lm_ids": bp}

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(batch=tuple(d["batch"]), seq=tuple(d["seq"]), predictions=tuple(d["predictions"]))


def round_up(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (``buckets`` ascending). Raises ValueError if n exceeds the largest."""
    for b in buckets:
        if b >= n:
            return int(b)
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def seq_buckets(max_seq: int, *, first: int = 16, step_ratio: float = 2.0) -> list[int]:
    """Bucket lengths 16, 32, 64, ... capped by (and always including) ``max_seq``."""
    if max_seq < 1:
        raise ValueError("max_seq must be >= 1")
    out, b = [], max(1, int(first))
    while b < max_seq:
        out.append(b)
        b = int(round(b * step_ratio))
    out.append(int(max_seq))
    return out


def profiles_from_workload(seq_lengths: Iterable[int], *, max_batch: int, max_seq: int,
                           max_predictions: int, opt_batch: int | None = None,
                           n_profiles: int = 2) -> list[Profile]:
    """Choose TensorRT profiles from observed copy lengths (tokens incl. [CLS]/[SEP]).

    The length range [1, max_seq] is cut at quantiles of the workload into ``n_profiles`` contiguous
    ranges (so short copies do not run on kernels tuned for the longest); each profile's opt length is
    the median of the lengths that fall in it, rounded up to a multiple of 8 (tensor-core friendly) and
    clamped to its range. Batch range is [1, max_batch] with opt ``opt_batch`` (default max_batch);
    predictions [1, max_predictions], opt = max_predictions (one per copy is the common case, but a
    profile must reach the max). An empty workload gives a single profile over the full range.
    """
    if max_batch < 1 or max_seq < 1 or max_predictions < 1:
        raise ValueError("max_batch, max_seq and max_predictions must be >= 1")
    ob = int(opt_batch or max_batch)
    if not 1 <= ob <= max_batch:
        raise ValueError(f"opt_batch {ob} outside [1, {max_batch}]")
    lengths = np.asarray(sorted(min(max(int(n), 1), max_seq) for n in seq_lengths), dtype=np.int64)
    preds = (1, max_predictions, max_predictions)
    if lengths.size == 0 or n_profiles <= 1:
        opt = int(np.median(lengths)) if lengths.size else max_seq
        return [Profile((1, ob, max_batch), (1, _opt_len(opt, 1, max_seq), max_seq), preds)]
    qs = np.linspace(0, 1, n_profiles + 1)[1:-1]
    cuts = sorted({int(np.quantile(lengths, q, method="higher")) for q in qs})
    cuts = [c for c in cuts if 1 <= c < max_seq]
    bounds, lo = [], 1
    for c in cuts + [max_seq]:
        if c >= lo:
            bounds.append((lo, c))
            lo = c + 1
    out = []
    for lo, hi in bounds:
        sel = lengths[(lengths >= lo) & (lengths <= hi)]
        opt = int(np.median(sel)) if sel.size else hi
        out.append(Profile((1, ob, max_batch), (lo, _opt_len(opt, lo, hi), hi), preds))
    return out


def _opt_len(n: int, lo: int, hi: int) -> int:
    return int(min(max(-(-n // 8) * 8, lo), hi))


def choose_profile(profiles: Sequence[Profile], seq: int, predictions: int) -> int:
    """Index of the profile to run a [*, seq] / [*, predictions] batch on.

    Among profiles whose seq and predictions ranges contain the shape, the one with the smallest max
    sequence length (tightest fit; kernels tuned nearest to it), then the narrowest seq range, then the
    smallest distance to its opt length, then the lowest index. Raises ValueError if none accepts it
    (the caller must truncate or re-build).
    """
    fits = [i for i, p in enumerate(profiles)
            if p.seq[0] <= seq <= p.seq[2] and p.predictions[0] <= predictions <= p.predictions[2]]
    if not fits:
        ranges = ", ".join(f"#{i}: seq {p.seq[0]}-{p.seq[2]}, predictions {p.predictions[0]}-{p.predictions[2]}"
                           for i, p in enumerate(profiles))
        raise ValueError(f"no optimization profile accepts seq={seq}, predictions={predictions} ({ranges})")
    return min(fits, key=lambda i: (profiles[i].seq[2], profiles[i].seq[2] - profiles[i].seq[0],
                                    abs(profiles[i].seq[1] - seq), i))


def split_ranges(n: int, max_batch: int) -> list[tuple[int, int]]:
    """Cut rows [0, n) into contiguous (start, stop) chunks of at most ``max_batch`` rows, in order.

    Chunks are balanced (sizes differ by at most one), so 65 rows at max 64 become 33 + 32, not 64 + 1:
    the second chunk stays near the profile's opt batch instead of running one row on a big-batch kernel.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    if n <= 0:
        return []
    k = -(-n // max_batch)
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def pad_to(arr: np.ndarray, length: int, value: int = 0) -> np.ndarray:
    """Pad (or keep) the last axis of a [B, L] int array to ``length`` with ``value``; never truncates."""
    b, cur = arr.shape
    if cur > length:
        raise ValueError(f"cannot pad length {cur} down to {length}")
    if cur == length:
        return arr
    out = np.full((b, length), value, dtype=arr.dtype)
    out[:, :cur] = arr
    return out


def bucket_batch(inputs: dict[str, np.ndarray], seq_bucket: int, pred_bucket: int) -> dict[str, np.ndarray]:
    """Pad a batch's arrays to [B, seq_bucket] / [B, pred_bucket] with the padding conventions (all 0).

    ``inputs``: int32 input_ids / input_mask / segment_ids [B,T] and masked_lm_positions / masked_lm_ids
    [B,P]. Returns new int32 C-contiguous arrays. Outputs for the added slots are dropped by the caller
    (``result[:, :P]``); added tokens are masked out by input_mask 0, so real slots are unchanged.
    """
    out = {}
    for name, arr in inputs.items():
        target = pred_bucket if name in ("masked_lm_positions", "masked_lm_ids") else seq_bucket
        out[name] = np.ascontiguousarray(pad_to(np.asarray(arr, np.int32), target))
    return out
