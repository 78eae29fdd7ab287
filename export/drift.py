"""Drift of a reduced-precision path (int8, bf16, fp16) against fp32, and recording it in the manifest.

Pure NumPy + JSON, no framework: engines (``mlm_scorer.engines``) and the exporters both use it.

A drift report compares two runs of the same model on the same masked copies, slot by slot, over the
slots that are in use (``masked_lm_positions > 0``):

  * ``mean_abs_diff`` / ``max_abs_diff``: mean and max |Δ log-prob| of the target token (nats);
  * ``top1_agreement``: fraction of slots whose most likely token is the same in both runs.

The inputs are random token ids with random lengths and masked positions (``drift_inputs``): a stress
case (random text is out of distribution and gives flatter, harder-to-rank predictions than real text),
so the numbers are an upper estimate of what real sentences see.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mlm_scorer.errors import MlmScorerError
from mlm_scorer.fsutil import atomic_write_bytes, check_target
from mlm_scorer.model_dir import MANIFEST_NAME, read_manifest

MANIFEST_KEY = "reduced_precision"
#: How errors name the manifest.
MANIFEST_WHAT = "the export's manifest"


def drift_inputs(vocab_size: int, max_len: int, *, batch: int = 32, max_tokens: int = 24,
                 max_predictions: int = 4, seed: int = 1234, mask_id: int | None = None) -> dict[str, np.ndarray]:
    """A batch of random masked copies: int32 arrays named as ``Batch`` fields.

    Returns input_ids/input_mask/segment_ids int32 [batch, T] and masked_lm_positions/masked_lm_ids int32
    [batch, P] with T = min(max_len, max_tokens), P = max_predictions; lengths vary from 3 to T, some
    prediction slots are unused (position 0, id 0), ids avoid 0..4 so [PAD]/[CLS]-like ids are rare.
    Targets are the ids originally at the masked positions; with ``mask_id`` those positions are replaced
    by it (as the scorer's masked copies are).
    """
    rng = np.random.default_rng(seed)
    T = int(min(max_len, max_tokens))
    P = int(max_predictions)
    lo = min(5, vocab_size - 1)
    ids = rng.integers(lo, vocab_size, size=(batch, T)).astype(np.int32)
    lengths = rng.integers(3, T + 1, size=batch)
    lengths[0] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * mask
    pos = np.zeros((batch, P), np.int32)
    tgt = np.zeros((batch, P), np.int32)
    for b in range(batch):
        n = P if b == 0 else int(rng.integers(1, P + 1))
        n = min(n, int(lengths[b]) - 1)
        pos[b, :n] = rng.choice(np.arange(1, lengths[b]), size=n, replace=False)
        tgt[b, :n] = ids[b, pos[b, :n]]
        if mask_id is not None:
            ids[b, pos[b, :n]] = mask_id
    return {"input_ids": ids, "input_mask": mask, "segment_ids": np.zeros_like(ids),
            "masked_lm_positions": pos, "masked_lm_ids": tgt}


def drift_report(ref_log_probs: np.ndarray, ref_top1: np.ndarray, got_log_probs: np.ndarray,
                 got_top1: np.ndarray, positions: np.ndarray) -> dict[str, Any]:
    """Compare two runs. log-probs float [B,P], top-1 ids int [B,P], positions int [B,P] (0 = unused)."""
    valid = np.asarray(positions) > 0
    d = np.abs(np.asarray(got_log_probs, np.float64) - np.asarray(ref_log_probs, np.float64))[valid]
    agree = (np.asarray(got_top1) == np.asarray(ref_top1))[valid]
    return {"mean_abs_diff": float(d.mean()) if d.size else 0.0,
            "max_abs_diff": float(d.max()) if d.size else 0.0,
            "top1_agreement": float(agree.mean()) if agree.size else 1.0,
            "n_predictions": int(valid.sum())}


def format_report(name: str, report: dict[str, Any]) -> str:
    """One line for stderr, e.g. ``drift onnx-int8 vs fp32: mean |Δ log-prob| 1.2e-02, max 9.0e-02, ...``."""
    return (f"drift {name} vs {report.get('baseline', 'fp32')}: mean |Δ log-prob| {report['mean_abs_diff']:.2e}, "
            f"max {report['max_abs_diff']:.2e}, top-1 agreement {report['top1_agreement']:.1%} "
            f"({report['n_predictions']} predictions on random masked copies)")


def update_manifest(version_dir: str | os.PathLike, updates: dict[str, Any], *,
                    merge_keys: tuple[str, ...] = (MANIFEST_KEY,), what: str = MANIFEST_WHAT) -> dict[str, Any]:
    """Set top-level manifest keys atomically (``fsutil.atomic_write_bytes``: the run's own temporary name in
    the same directory, fsync, rename), so a reader sees the old manifest or the new one, never a mix.

    For keys in ``merge_keys`` (dicts), entries are merged into the existing dict instead of replacing it,
    so recording the bf16 drift keeps the int8 one. ``what`` names the manifest in errors. Returns the new
    manifest. Raises UsageError (before anything is read) if the manifest is not a regular file (a symlink,
    a FIFO, a device, a directory: never followed or replaced), ModelError if it is missing or not a JSON
    object, OSError if the directory is read-only (callers that only record a report catch both and warn).
    """
    vdir = Path(version_dir)
    path = check_target(vdir / MANIFEST_NAME, what, parent_must_exist=False)
    manifest = read_manifest(vdir, what=what)
    for key, value in updates.items():
        if key in merge_keys and isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"), what=what)
    return manifest


def record_drift(version_dir: str | os.PathLike, name: str, report: dict[str, Any], *, log=None) -> bool:
    """Print ``report`` (via ``log``) and store it under ``manifest["reduced_precision"][name]``.

    Returns False, after logging a warning that says why (the system's error, or the refusal of a manifest
    that is not a regular file, or is not JSON), if the manifest cannot be written: e.g. a read-only model
    dir. The report was measured and printed; only its record is missing.
    """
    entry = {**report, "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if log is not None:
        log(format_report(name, report))
    try:
        update_manifest(version_dir, {MANIFEST_KEY: {name: entry}})
    except (OSError, MlmScorerError) as exc:
        if log is not None:
            log(f"warning: could not record the drift report in {Path(version_dir) / MANIFEST_NAME}: {exc}")
        return False
    return True
