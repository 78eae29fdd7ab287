"""``mlm-score check``: a quality gate for a scored batch: statistics, a verdict, an exit code.

    mlm-score check today.parquet --baseline reference.parquet --json check.json
    mlm-score check out/ --baseline reference.parquet            # a directory written by mlm-score ray
    run_check("today.parquet", baseline="reference.parquet")    # the same, as a dict

Exit codes: 0 the batch passes, 1 it fails, 2 bad usage (a missing or unreadable result, a baseline
scored with another model or mode, a bad limit).

The criteria (every one must hold; DEFAULTS below, docs/data-quality.md says how they were chosen):

    scored rows    at least one row of the batch was scored
    impossible     rows marked ok whose scores are impossible (a NaN, an infinite or positive log-prob:
                   a damaged or foreign result; mlm-score never writes one)        <= --max-impossible (0)
    skipped rate   rows that could not be scored / rows                       <= --max-skipped-rate
    flagged rate   flagged rows / scored rows                                 <= --max-flagged-rate
                   flagged by the --flag-above/--flag-below rules given here (pNN: the baseline's
                   percentile, or the batch's own without a baseline); else, with a baseline,
                   pseudo-perplexity above its p99 or least-likely-word probability below its p1;
                   else the result's own flag column (the rules it was scored with); else not measured
    shift          per metric (pseudo_perplexity, min_word_prob), with a baseline: the two-sample
                   Kolmogorov-Smirnov statistic D                              <= --max-shift
                   a larger D fails the batch only when the KS test also rejects "same distribution"
                   at --shift-alpha: small batches differ by chance, and that is not a shift
    PSI            per metric, with a baseline, when --max-psi is given       <= --max-psi
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from .errors import MlmScorerError, UsageError

__all__ = ["DEFAULTS", "run_check", "format_text", "main", "QualityGateFailed"]

DEFAULTS = {"max_flagged_rate": 0.05, "max_skipped_rate": 0.05, "max_shift": 0.10, "shift_alpha": 0.001,
            "max_psi": None, "max_impossible": 0}


class QualityGateFailed(MlmScorerError):
    """A batch failed ``check`` (the message lists the criteria it failed)."""

    exit_code = 1


def run_check(result: str | os.PathLike, *, baseline: str | os.PathLike | None = None, rules: list | None = None,
              max_flagged_rate: float = DEFAULTS["max_flagged_rate"],
              max_skipped_rate: float = DEFAULTS["max_skipped_rate"], max_shift: float = DEFAULTS["max_shift"],
              shift_alpha: float = DEFAULTS["shift_alpha"], max_psi: float | None = DEFAULTS["max_psi"],
              max_impossible: int = DEFAULTS["max_impossible"]) -> dict[str, Any]:
    """Check ``result`` (either file of a result, or a Ray output directory), against ``baseline`` if
    given. Returns a JSON-ready dict: ``passed``, ``failures`` (one line each), ``criteria``, the counts
    and, with a baseline, ``metrics`` (see ``quality.compare``). Raises UsageError for bad usage."""
    from .quality import compare, default_baseline_rules, fired, load_baseline, load_scores, resolve

    for name, v, hi in (("max_flagged_rate", max_flagged_rate, 1), ("max_skipped_rate", max_skipped_rate, 1),
                        ("max_shift", max_shift, 1), ("shift_alpha", shift_alpha, 1)):
        if not (isinstance(v, (int, float)) and 0 <= v <= hi):
            raise UsageError(f"{name} must be between 0 and {hi}, got {v!r}")
    if max_psi is not None and not max_psi >= 0:
        raise UsageError(f"max_psi must be >= 0, got {max_psi!r}")
    if isinstance(max_impossible, bool) or not isinstance(max_impossible, int) or max_impossible < 0:
        raise UsageError(f"max_impossible must be an integer >= 0, got {max_impossible!r}")
    cur = load_scores(result, what="result")
    base = None if baseline is None else load_baseline(
        baseline, model_checksum=cur.settings.get("model_checksum"), mode=cur.settings.get("mode"),
        other=f"the result {result}", empty="there is nothing to compare with")

    out: dict[str, Any] = {
        "result": _summary(cur), "baseline": _summary(base) if base else None,
        "limits": {"max_flagged_rate": max_flagged_rate, "max_skipped_rate": max_skipped_rate,
                   "max_shift": max_shift, "shift_alpha": shift_alpha, "max_psi": max_psi,
                   "max_impossible": max_impossible},
    }
    criteria: list[dict[str, Any]] = [{"name": "scored", "value": cur.scored, "limit": 1, "passed": cur.scored >= 1,
                                       "text": f"{cur.scored} scored row(s)"}]
    out["impossible"] = cur.impossible
    where = f" (line {', '.join(cur.impossible_lines)}{' …' if cur.impossible > len(cur.impossible_lines) else ''})" \
        if cur.impossible_lines else ""
    passed = cur.impossible <= max_impossible
    criteria.append({"name": "impossible", "value": cur.impossible, "limit": max_impossible, "passed": passed,
                     "text": f"{cur.impossible} scored row(s) with impossible scores (NaN, or a log-prob that is "
                             f"infinite or above 0){where}" + ("" if passed else f" > {max_impossible} (--max-impossible)")})
    skipped_rate = cur.skipped / cur.rows if cur.rows else 0.0
    out["skipped_rate"] = skipped_rate
    criteria.append(_limit("skipped_rate", skipped_rate, max_skipped_rate, "--max-skipped-rate",
                           f"skipped {cur.skipped} of {cur.rows} rows ({_pc(skipped_rate)})"))

    # flagged rows: rules given here, else the baseline's tails, else the result's own flag column
    flagged, by = None, None
    if rules or base is not None:
        applied = resolve(list(rules or default_baseline_rules()), (base or cur).values,
                          of="baseline" if base else "run")
        flagged, by = int(fired(applied, cur.values, cur.scored).sum()), [str(r) for r in applied]
    elif cur.flag is not None:
        flagged = int(cur.flag.sum())
        by = ["the result's flag column (" + (", ".join(cur.settings.get("flag_rules") or []) or "its rules") + ")"]
    out["flagged"], out["flagged_by"] = flagged, by
    out["flagged_rate"] = flagged / cur.scored if flagged is not None and cur.scored else None
    if out["flagged_rate"] is not None:
        criteria.append(_limit("flagged_rate", out["flagged_rate"], max_flagged_rate, "--max-flagged-rate",
                               f"flagged {flagged} of {cur.scored} scored rows ({_pc(out['flagged_rate'])})"))

    if base is not None and cur.scored:
        out["metrics"] = metrics = compare(cur, base)
        for m, st in metrics.items():
            d, p = st["ks"], st["ks_pvalue"]
            significant = p is not None and p < shift_alpha
            passed = d is None or d <= max_shift or not significant
            text = f"shift of {m}: KS D {d:.3f} (p = {_p(p)})"
            if d is not None and d > max_shift and not significant:
                text += f", above {max_shift:g} but not significant at {shift_alpha:g} (too few rows to tell)"
            criteria.append({"name": f"shift:{m}", "value": d, "limit": max_shift, "p_value": p, "alpha": shift_alpha,
                             "passed": passed, "text": text + ("" if passed else f" > {max_shift:g} (--max-shift)")})
            if max_psi is not None:
                criteria.append(_limit(f"psi:{m}", st["psi"], max_psi, "--max-psi", f"PSI of {m}: {st['psi']:.3f}"))
    out["criteria"] = criteria
    out["failures"] = [c["text"] for c in criteria if not c["passed"]]
    out["passed"] = not out["failures"]
    return out


def _summary(s) -> dict[str, Any]:
    st = s.settings
    return {"path": s.path, "sentences": str(s.sentences), "rows": s.rows, "scored": s.scored, "skipped": s.skipped,
            "model": st.get("model"), "model_checksum": st.get("model_checksum"), "mode": st.get("mode")}


def _limit(name: str, value: float, limit: float, flag: str, text: str) -> dict[str, Any]:
    passed = value is not None and value <= limit
    return {"name": name, "value": value, "limit": limit, "passed": passed,
            "text": text + ("" if passed else f" > {_pc(limit) if 'rate' in name else f'{limit:g}'} ({flag})")}


def _pc(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _p(p: float | None) -> str:
    return "–" if p is None else (f"{p:.2g}" if p >= 1e-4 else "< 0.0001")


def _num(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4g}"


def format_text(r: dict[str, Any]) -> str:
    """The check as lines of text: what was checked, each criterion, the comparison table, and the
    verdict last (``-q`` prints only that line)."""
    res, base = r["result"], r["baseline"]
    head = f"mlm-score check: {res['path']} ({res['rows']} rows)"
    if base:
        head += f" against the baseline {base['path']} ({base['rows']} rows)"
    lines = [head]
    for c in r["criteria"]:
        lines.append(f"  {'ok  ' if c['passed'] else 'FAIL'}  {c['text']}")
    if r.get("flagged_by"):
        lines.append("        flagged by: " + "; ".join(r["flagged_by"]))
    if r.get("metrics"):
        lines.append(f"  {'metric':<19} {'KS D':>6} {'p-value':>9} {'PSI':>7} {'tail':>20} {'beyond':>8} "
                     f"{'(baseline)':>10} {'median':>10} {'(baseline)':>10}")
        for m, st in r["metrics"].items():
            tail = f"{'>' if st['direction'] == 'above' else '<'} {st['tail']} = {_num(st['baseline_threshold'])}"
            lines.append(f"  {m:<19} {_num(st['ks']):>6} {_p(st['ks_pvalue']):>9} {_num(st['psi']):>7} {tail:>20} "
                         f"{_pc(st['share_beyond']):>8} {_pc(st['baseline_share_beyond']):>10} "
                         f"{_num(st['current_percentiles']['p50']):>10} {_num(st['baseline_percentiles']['p50']):>10}")
        lines.append("  (tail: the baseline's percentile; beyond: share of the batch, and of the baseline, beyond it)")
    n = len(r["criteria"])
    lines.append(f"PASS: {res['path']} meets all {n} criteria" if r["passed"] else
                 f"FAIL: {res['path']} fails {len(r['failures'])} of {n} criteria: " + "; ".join(r["failures"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mlm-score check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A quality gate for a scored batch: print its statistics, compare it with a baseline, and "
                    "exit 0 when it passes, 1 when it fails, 2 on bad usage.",
        epilog="defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULTS.items() if v is not None)
               + "; see docs/data-quality.md for what they mean and why")
    ap.add_argument("result", help="probs.parquet (or its .sentences.parquet), or a directory written by mlm-score ray")
    ap.add_argument("--baseline", metavar="RESULT", help="an earlier result of the same model and mode to compare with")
    ap.add_argument("--max-flagged-rate", type=float, default=DEFAULTS["max_flagged_rate"], metavar="R",
                    help="fail when more than this share of the scored rows is flagged (default %(default)s)")
    ap.add_argument("--max-skipped-rate", type=float, default=DEFAULTS["max_skipped_rate"], metavar="R",
                    help="fail when more than this share of the rows could not be scored (default %(default)s)")
    ap.add_argument("--max-shift", type=float, default=DEFAULTS["max_shift"], metavar="S",
                    help="fail when a metric's KS statistic against the baseline exceeds S and is significant "
                         "(default %(default)s)")
    ap.add_argument("--shift-alpha", type=float, default=DEFAULTS["shift_alpha"], metavar="A",
                    help="significance level for --max-shift; 1 counts every D above S (default %(default)s)")
    ap.add_argument("--max-psi", type=float, default=None, metavar="P",
                    help="also fail when a metric's population stability index exceeds P (0.25 is the usual "
                         "'major shift'; default: not checked)")
    ap.add_argument("--flag-above", action="append", default=[], metavar="METRIC=VALUE",
                    help="count rows above this as flagged (pNN: the baseline's percentile); default with a "
                         "baseline: pseudo_perplexity=p99 and --flag-below min_word_prob=p1")
    ap.add_argument("--flag-below", action="append", default=[], metavar="METRIC=VALUE",
                    help="count rows below this as flagged (e.g. min_word_prob=p1)")
    ap.add_argument("--max-impossible", type=int, default=DEFAULTS["max_impossible"], metavar="N",
                    help="fail when more than N rows marked ok have impossible scores: NaN, or a log-prob that is "
                         "infinite or above 0 (default %(default)s; a damaged or foreign result)")
    ap.add_argument("--json", metavar="FILE", help="also write the statistics and the verdict as JSON")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the verdict line")
    args = ap.parse_args(argv)
    from .fsutil import atomic_write_bytes
    from .logs import configure_cli, log
    from .quality import parse_rule

    configure_cli("mlm-score check", quiet=args.quiet)
    try:
        rules = [parse_rule(x, "below") for x in args.flag_below] + [parse_rule(x, "above") for x in args.flag_above]
        if args.json:
            from .report import check_report_target

            check_report_target(args.json, "the --json file", args.result, args.baseline)
        r = run_check(args.result, baseline=args.baseline, rules=rules or None, max_flagged_rate=args.max_flagged_rate,
                      max_skipped_rate=args.max_skipped_rate, max_shift=args.max_shift,
                      shift_alpha=args.shift_alpha, max_psi=args.max_psi, max_impossible=args.max_impossible)
        if args.json:
            atomic_write_bytes(args.json, (json.dumps(r, indent=2) + "\n").encode(), what="the --json file")
    except MlmScorerError as exc:
        log.error(str(exc))
        return exc.exit_code
    except OSError as exc:  # the --json file cannot be written: bad usage (1 is a failed batch)
        log.error(str(exc))
        return 2
    text = format_text(r)
    print(text.splitlines()[-1] if args.quiet else text)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
