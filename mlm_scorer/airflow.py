"""Run mlm-scorer as an Apache Airflow task: output paths per run, XCom-sized summaries, clear failures.

The example DAG is ``scripts/airflow_dag.py``. This module imports Airflow only when a task fails, so
it can be imported (and tested) without Airflow installed.

- One output per run: the output path's key is the run's logical date in UTC to the microsecond
  (``2024-01-01T000000.000000Z``), or, for a run without one, its run id escaped injectively
  (``run-manual__2024-01-01T00%3A00%3A00%2B00%3A00``): two different dates or run ids never share a path.
  The directory is claimed for the run (``claim_output_dir``: a ``.mlm-score-run.json`` naming the DAG
  and the run): a retry of the same run replaces its own output whole (``score_file`` writes to hidden
  temporary files and renames them into place at the end, so a crashed attempt never leaves a partial
  file at the final path), and another run with the same key (Airflow 3 allows two runs of one logical
  date) is refused, never overwritten.
- Small XCom: ``score_task`` returns ``ScoreSummary.to_dict()`` (paths, counts, mean PLL, timings, at
  most 20 skipped rows with messages cut to 300 characters), never the data.
- Failures: a bad input row, a bad argument, a broken model or an output that is another run's is not
  transient, so the task fails at once (``AirflowFailException``: no retries) with the scorer's message,
  e.g. ``InputError: /data/in.tsv:3:19: expected 2 tab-separated fields (id, text), found 3 (...)``. An
  engine failure (a server down past its retry budget), or the output's lock held by another attempt
  still running (``OutputLocked``: a sibling, e.g. a task Airflow believed lost), is raised as is, so
  Airflow's retries apply.
- A quality gate: ``check_task`` runs ``mlm-score check`` on the scored batch (against a baseline when
  given), writes the statistics as JSON next to the output and returns them (small) as its XCom; a
  batch that fails the gate fails the task at once (``AirflowFailException``: rescoring or retrying
  does not change the data), so the tasks after it do not run.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import InputError, MissingDependencyError, ModelError, UsageError
from .fsutil import check_target, identity, safe_unlink

__all__ = ["run_key", "output_path", "claim_output_dir", "score_task", "check_task", "xcom_summary", "NOT_TRANSIENT",
           "OutputTaken", "OWNER_FILE"]

# errors a retry cannot fix: fail the task without using up its retries (OutputLocked, a UsageError, is
# the exception: a sibling attempt holds the output, and a later try may find it free)
NOT_TRANSIENT = (InputError, UsageError, ModelError, MissingDependencyError)
MAX_MESSAGE = 300
#: in each run's output directory: which DAG run the directory belongs to
OWNER_FILE = ".mlm-score-run.json"
_MAX_KEY = 200  # bytes of a run-id key kept readable; longer ones end in a hash of the whole id


class OutputTaken(UsageError):
    """The output directory holds another run's output (or files of unknown origin): refused."""


def run_key(logical_date: datetime | None = None, run_id: str | None = None) -> str:
    """A path-safe name for one DAG run that two runs never share by accident.

    From the logical date: the instant in UTC to the microsecond, ``2024-01-01T000000.000000Z`` (the same
    on every retry and on a re-run of that date; a naive date is taken as UTC, Airflow's default). Else
    (a run triggered without a logical date) from the run id, escaped injectively: ``run-`` + the id
    percent-encoded (every byte but letters, digits and ``-._~``), so ``…T00:00:00+00:00`` and
    ``…T00_00_00+00_00`` stay apart; an id that long ends in a hash of the whole id instead.
    """
    if logical_date is not None:
        if logical_date.tzinfo is None:
            logical_date = logical_date.replace(tzinfo=timezone.utc)
        return logical_date.astimezone(timezone.utc).strftime("%Y-%m-%dT%H%M%S.%fZ")
    if not run_id:
        raise ValueError("run_key needs a logical date or a run id")
    key = "run-" + quote(run_id, safe="")
    if len(key) > _MAX_KEY:
        key = key[: _MAX_KEY - 65] + "-" + hashlib.sha256(run_id.encode()).hexdigest()
    return key


def claim_output_dir(directory: str | os.PathLike, *, run_id: str | None, dag_id: str | None = None,
                     logical_date: datetime | None = None) -> Path:
    """Make ``directory`` this run's, or raise OutputTaken: it holds the output of another run (another
    run id, or DAG), or (visible) files and no record of whose they are. A retry of the same run finds its own
    record and goes on. The record (``OWNER_FILE``) is created with O_EXCL, so of two runs claiming one
    directory at once exactly one wins."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    me = {"written_by": "mlm_scorer.airflow", "dag_id": dag_id, "run_id": run_id,
          "logical_date": logical_date.isoformat() if logical_date is not None else None}
    owner = d / OWNER_FILE
    for _ in range(2):
        try:
            fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            pass
        else:
            made = identity(os.fstat(fd))
            # files from before any claim: whose, nobody can say (hidden ones are a crashed writer's
            # temporary files, never an output: the writer removes them)
            others = sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
            if others:
                os.close(fd)
                safe_unlink(owner, identity_of=made)  # the record this call made, not one put there since
                raise OutputTaken(f"{d} already holds {', '.join(others[:5])} and no record of the run that wrote "
                                  f"them ({OWNER_FILE}); refusing to overwrite them. Move them away, or write this "
                                  f"run elsewhere")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            return d
        try:
            if not owner.is_file() or owner.is_symlink():
                raise ValueError("not a regular file")
            them = json.loads(owner.read_text(encoding="utf-8"))
            if not isinstance(them, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            continue  # removed meanwhile: claim it
        except (OSError, ValueError) as exc:
            raise OutputTaken(f"{owner} is unreadable ({exc}); refusing to write into {d}") from None
        if (them.get("dag_id"), them.get("run_id")) == (dag_id, run_id):
            return d  # a retry (or a re-run) of this very run: its own output, replaced whole
        raise OutputTaken(f"{d} holds the output of another run (DAG {them.get('dag_id')!r}, run "
                          f"{them.get('run_id')!r}, logical date {them.get('logical_date')}); this run (DAG "
                          f"{dag_id!r}, run {run_id!r}) refuses to overwrite it. Delete that directory to score "
                          f"the date again, or give this run another output_dir")
    raise OutputTaken(f"cannot claim {d}: its {OWNER_FILE} keeps changing")


def check_destinations(input_path: str | os.PathLike, out: Path,
                       score_cache: str | os.PathLike | None = None) -> None:
    """Refuse (UsageError), before the claim writes anything, what ``score_task`` would write that is not
    absent or a regular file (the claim record, both outputs, the score cache's files) or that is the input
    (by path, through symlinks or by inode); ``score_file`` checks its own again before it writes."""
    from .pipeline import cache_files
    from .writer import sentences_path

    inputs = [(input_path, "the input")]
    for p, what in ((out.parent / OWNER_FILE, "the run's claim record"), (out, "the output"),
                    (sentences_path(out), "the sentences output"), *cache_files(score_cache)):
        check_target(p, what, inputs=inputs, parent_must_exist=False)


def output_path(output_dir: str | os.PathLike, *, logical_date: datetime | None = None, run_id: str | None = None,
                name: str = "probs.parquet") -> Path:
    """``OUTPUT_DIR/<run key>/probs.parquet`` (sentence rows next to it: ``probs.sentences.parquet``).
    Nothing is created: ``score_task`` claims the directory (``claim_output_dir``) before it writes."""
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


#: Settings an Airflow param may leave empty ("") to mean "not set" (None).
_EMPTY_IS_NONE = ("text_column", "id_column", "baseline", "score_cache", "cache_dir", "server", "protocol")


def score_task(input_path: str | os.PathLike, output_dir: str | os.PathLike, settings=None, *,
               logical_date: datetime | None = None, run_id: str | None = None, dag_id: str | None = None,
               log=print, **options: Any) -> dict[str, Any]:
    """Score ``input_path`` into ``output_path(output_dir, ...)``; return the XCom-sized summary.

    Meant to be called from a TaskFlow ``@task`` (see scripts/airflow_dag.py) with the run's logical
    date, run id and DAG id (the output directory is claimed for that run: another run's is refused).
    ``settings``: a ``ScoreSettings``, or a dict of settings (``ScoreSettings.to_dict()``, or any subset,
    e.g. from a DAG's params or an XCom); keyword ``options`` are the same settings by name (``model=...,
    max_row_chars=..., resume=True, batch_tokens=...``): every setting of ``mlm-score``. An empty string
    stands for "not set" in the settings Airflow params hold as strings (``text_column``, ``baseline``,
    ...). ``progress`` is on unless set: a line every ~10 s and one at the end in the task log (logger
    ``mlm_scorer``, level INFO). With ``resume=True``, a retry continues after the rows an interrupted
    attempt committed (its parts are kept next to the output) instead of starting over.
    Raises ``AirflowFailException`` for errors a retry cannot fix (see the module doc), ``OutputLocked``
    as is (retried) when another attempt is still writing the output.
    """
    from .pipeline import score_file
    from .settings import ScoreSettings, settings_from
    from .writer import OutputLocked

    try:
        if isinstance(settings, dict):
            settings = {k: (None if k in _EMPTY_IS_NONE and v == "" else v) for k, v in settings.items()}
        options = {k: (None if k in _EMPTY_IS_NONE and v == "" else v) for k, v in options.items()}
        if not isinstance(settings, ScoreSettings) and "progress" not in options and "progress" not in (settings or {}):
            options["progress"] = True
        s = settings_from(settings, options, door="score_task")
        out = output_path(output_dir, logical_date=logical_date, run_id=run_id)
        check_destinations(input_path, out, s.score_cache)
        claim_output_dir(out.parent, run_id=run_id, dag_id=dag_id, logical_date=logical_date)
        summary = score_file(input_path, out, s, log=log)
    except OutputLocked:
        raise  # a sibling attempt is still writing: a later try may find the output free
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
    message lists the failed criteria) or the check cannot run (a missing baseline, another model's), or
    when ``json_path`` is a file it may not write (checked first: not absent or a regular file, or a file of
    the result or of the baseline)."""
    import json

    from .check import DEFAULTS, QualityGateFailed, format_text, run_check
    from .fsutil import atomic_write_bytes
    from .report import check_report_target

    limits = {k: v if v is not None else DEFAULTS[k] for k, v in (("max_flagged_rate", max_flagged_rate),
                                                                  ("max_skipped_rate", max_skipped_rate),
                                                                  ("max_shift", max_shift))}
    dest = Path(json_path) if json_path else Path(result).parent / "check.json"
    if Path(result).is_dir():  # a Ray output directory: the JSON goes inside it
        dest = Path(json_path) if json_path else Path(result) / "check.json"
    # check.json in a Ray output directory is one of the files that runner's outputs may hold (ray_data._OWN_FILES)
    own = Path(result).is_dir() and os.path.realpath(dest) == os.path.realpath(Path(result) / "check.json")
    try:
        check_report_target(dest, "the check JSON", None if own else result, baseline or None)
        r = run_check(result, baseline=baseline or None, **limits)
        atomic_write_bytes(dest, (json.dumps(r, indent=2) + "\n").encode(), what="the check JSON")
    except NOT_TRANSIENT as exc:
        raise _fail_fast(exc) from exc
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


def main(argv: list[str] | None = None) -> int:
    """``python -m mlm_scorer.airflow claim DIR --run-id ID [--dag-id ID]``: ``claim_output_dir`` for a
    task that runs the CLI (a BashOperator); exit 0, or 2 with the reason when the directory is another
    run's."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mlm_scorer.airflow", description="claim a run's output directory")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("claim", help="claim DIR for the run (exit 2 if it is another run's)")
    c.add_argument("directory")
    c.add_argument("--run-id", required=True)
    c.add_argument("--dag-id")
    args = ap.parse_args(argv)
    try:
        claim_output_dir(args.directory, run_id=args.run_id, dag_id=args.dag_id)
    except (UsageError, OSError) as exc:
        print(f"mlm-score airflow claim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
