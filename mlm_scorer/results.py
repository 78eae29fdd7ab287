"""Read a scoring result: the two Parquet files of ``mlm-score`` or the directory of ``mlm-score ray``.

    words, sentences = result_paths("probs.parquet")            # + probs.sentences.parquet next to it
    words, sentences = result_paths("probs.sentences.parquet")  # the same pair
    words, sentences = result_paths("out/")                     # out/words/ + out/sentences/ (Ray)

Used by ``mlm-score report``, ``mlm-score check`` and ``--baseline``. Errors are UsageErrors that name
the path and say what a result looks like.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import MlmScorerError, UsageError

__all__ = ["result_paths", "read_table", "settings"]


def result_paths(result: str | os.PathLike) -> tuple[Path, Path]:
    """(words, sentences) paths of a result given as either file of the pair or a Ray output directory."""
    p = Path(result)
    if not p.exists():
        raise UsageError(f"result {str(p)!r} does not exist (make one with: mlm-score IN.tsv -o {p.name})")
    if p.is_dir():
        if (p / "sentences").is_dir() and (p / "words").is_dir():
            return p / "words", p / "sentences"
        raise UsageError(f"{str(p)!r} is a directory without words/ and sentences/ (give probs.parquet, or a "
                         f"directory written by mlm-score ray)")
    from .writer import sentences_path

    if p.name.endswith(".sentences.parquet"):
        words = p.with_name(p.name[: -len(".sentences.parquet")] + ".parquet")
        return words, p
    return p, sentences_path(p)


def read_table(path: Path, columns: list[str] | None = None, filters=None):
    """(table, schema) of a Parquet file or a directory of Parquet files; ``columns`` that are absent are
    left out rather than refused (callers check the ones they need)."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist: a result is two files, STEM.parquet (words) and "
                         f"STEM.sentences.parquet")
    try:
        if path.is_dir():
            import pyarrow.dataset as ds

            d = ds.dataset(str(path), format="parquet")
            names = d.schema.names
            cols = [c for c in columns if c in names] if columns else None
            return d.to_table(columns=cols, filter=filters), d.schema
        schema = pq.read_schema(path)
        cols = [c for c in columns if c in schema.names] if columns else None
        return pq.read_table(path, columns=cols, filters=filters), schema
    except MlmScorerError:
        raise
    except Exception as exc:  # not Parquet, truncated...
        raise UsageError(f"cannot read {str(path)!r} as Parquet: {type(exc).__name__}: {exc}") from None


def settings(schema) -> dict[str, Any]:
    """The run's settings recorded in the Parquet metadata (model, model_checksum, mode, engine, input,
    flag_rules...), or {} when there are none."""
    raw = (schema.metadata or {}).get(b"mlm_scorer")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {"metadata": raw.decode("utf-8", "replace")}
    return meta if isinstance(meta, dict) else {"metadata": meta}
