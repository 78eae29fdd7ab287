"""Run mlm-scorer as an Apache Airflow task: output paths per run, XCom-sized summaries, clear failures.

The example DAG is ``scripts/airflow_dag.py``. This module imports Airflow only when a task fails, so
it can be imported (and tested) without Airflow installed.

- Idempotent on retry: the output path depends only on the run (its logical date, or its run id for a
  run without one), so a retry of the same run writes the same files; ``score_file`` writes to hidden
  temporary files and renames them into place at the end, so a retry replaces a previous attempt's
  output whole and a crashed attempt never leaves a partial file at the final path.
- Small XCom: ``score_task`` returns ``ScoreSummary.to_dict()`` (paths, counts, mean PLL, timings, at
  most 20 skipped rows with messages cut to 300 characters), never the data.
- Failures: a bad input row, a bad argument or a broken model is not transient, so the task fails at
  once (``AirflowFailException``: no retries) with the scorer's message, e.g.
  ``InputError: /data/in.tsv:3:19: expected 2 tab-separated fields (id, text), found 3 (...)``. An
  engine failure (a server down past its retry budget) is raised as is, so Airflow's retries apply.
- A quality gate: ``check_task`` runs ``mlm-score check`` on the scored batch (against a baseline when
  given), writes the statistics as JSON next to the output and returns them (small) as its XCom; a
  batch that fails the gate fails the task at once (``AirflowFailException``: rescoring or retrying
  does not change the data), so the tasks after it do not run.
"""
from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError, MissingDependencyError, ModelError, UsageError

__all__ = ["run_key", "output_path", "score_task", "check_task", "xcom_summary", "NOT_TRANSIENT"]

# errors a retry cannot fix: fail the task without using up its retries
NOT_TRANSIENT = (InputError, UsageError, ModelError, MissingDependencyError)
MAX_MESSAGE = 300


def run_key(logical_date: datetime | None = None, run_id: str | None = None) -> str:
    """A path-safe name for one DAG run: ``2024-01-01T000000`` from the logical date (the same on every
    retry and on a re-run of that date), else the run id (a run triggered without a logical date)."""
    if logical_date is not None:
        return logical_date.strftime("%Y-%m-%dT%H%M%S")
    if not run_id:
        raise ValueError("run_key needs a logical date or a run id")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", run_id)


def output_path(output_dir: str | os.PathLike, *, logical_date: datetime | None = None, run_id: str | None = None,
                name: str = "probs.parquet") -> Path:
    """``OUTPUT_DIR/<run key>/probs.parquet`` (sentence rows next to it: ``probs.sentences.parquet``)."""
    return Path(output_dir) / run_key(logical_date, run_id) / name


def xcom_summary(summary) -> dict[str, Any]:
    """``ScoreSummary.to_dict()``, with skipped-row messages cut short: a few KB at most."""
    d = summary.to_dict()
    d["skipped_rows"] = [{**r, "message": _cut(r.get("message"))} for r in d.get("skipped_rows", [])]
    return d


def _cut(msg: str | None) -> str | None:
    if msg is None or len(msg) <= MAX_MESSAGE:
        return msg
    return msg[: MAX_MESSAGE - 1] + "…"


def _fail_fast(exc: Exception) -> Exception:
    """AirflowFailException (the task fails without retrying) carrying the scorer's message."""
    msg = f"{type(exc).__name__}: {exc}"
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:
        try:
            from airflow.exceptions import AirflowFailException  # Airflow 2
        except ImportError:
            return exc
    return AirflowFailException(msg)


def score_task(input_path: str | os.PathLike, output_dir: str | os.PathLike, *, model: str | os.PathLike,
               logical_date: datetime | None = None, run_id: str | None = None, mode: str = "whole-word",
               engine: str = "saved_model", engine_options: dict[str, Any] | None = None,
               text_column: str | int | None = None, id_column: str | int | None = None, header: bool = True,
               on_bad_row: str = "fail", top_k: int = 0, flag_below: Iterable[str] = (),
               flag_above: Iterable[str] = (), baseline: str | os.PathLike | None = None,
               score_cache: str | os.PathLike | None = None, progress: bool = True, log=print) -> dict[str, Any]:
    """Score ``input_path`` into ``output_path(output_dir, ...)``; return the XCom-sized summary.

    Meant to be called from a TaskFlow ``@task`` (see scripts/airflow_dag.py) with the run's logical
    date and run id. Raises ``AirflowFailException`` for errors a retry cannot fix (see the module doc).
    ``baseline`` gives percentile flag rules their reference; ``score_cache`` is a persistent score cache
    directory (sentences scored by an earlier run or task are not scored again). ``progress``: a line
    every ~10 s and one at the end in the task log (logger ``mlm_scorer``, level INFO).
    """
    from .pipeline import score_file
    from .quality import parse_rule

    try:
        out = output_path(output_dir, logical_date=logical_date, run_id=run_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        rules = [parse_rule(x, "below") for x in flag_below or ()] + [parse_rule(x, "above") for x in flag_above or ()]
        summary = score_file(input_path, out, model=model, engine=engine, engine_options=engine_options, mode=mode,
                             text_column=text_column or None, id_column=id_column or None, header=header,
                             on_bad_row=on_bad_row, top_k=top_k, flag_rules=rules, baseline=baseline or None,
                             score_cache=score_cache or None, progress=progress, log=log)
    except NOT_TRANSIENT as exc:
        raise _fail_fast(exc) from exc
    if log:
        log(summary.line())
    return xcom_summary(summary)


def check_task(result: str | os.PathLike, *, baseline: str | os.PathLike | None = None,
               max_flagged_rate: float | None = None, max_skipped_rate: float | None = None,
               max_shift: float | None = None, json_path: str | os.PathLike | None = None, log=print) -> dict[str, Any]:
    """The quality gate on a scored batch (``mlm_scorer.check.run_check``); a limit left None takes its
    default. Writes the full statistics to ``json_path`` (default: ``check.json`` next to the result) and
    returns a small summary for XCom. Raises ``AirflowFailException`` when the batch fails the gate (the
    message lists the failed criteria) or the check cannot run (a missing baseline, another model's)."""
    import json

    from .check import DEFAULTS, QualityGateFailed, format_text, run_check
    from .fsutil import atomic_write_bytes

    limits = {k: v if v is not None else DEFAULTS[k] for k, v in (("max_flagged_rate", max_flagged_rate),
                                                                  ("max_skipped_rate", max_skipped_rate),
                                                                  ("max_shift", max_shift))}
    try:
        r = run_check(result, baseline=baseline or None, **limits)
    except NOT_TRANSIENT as exc:
        raise _fail_fast(exc) from exc
    dest = Path(json_path) if json_path else Path(result).parent / "check.json"
    if Path(result).is_dir():  # a Ray output directory: the JSON goes inside it
        dest = Path(json_path) if json_path else Path(result) / "check.json"
    atomic_write_bytes(dest, (json.dumps(r, indent=2) + "\n").encode())
    if log:
        log(format_text(r))
    small = {"passed": r["passed"], "failures": [_cut(f) for f in r["failures"]], "json": str(dest),
             "rows": r["result"]["rows"], "scored": r["result"]["scored"], "flagged": r["flagged"],
             "flagged_rate": r["flagged_rate"], "skipped_rate": r["skipped_rate"],
             "ks": {m: st["ks"] for m, st in (r.get("metrics") or {}).items()}}
    if not r["passed"]:
        raise _fail_fast(QualityGateFailed(f"{result} failed the quality gate: " + "; ".join(r["failures"])
                                           + f" (statistics: {dest})"))
    return small
