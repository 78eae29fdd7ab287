"""``mlm-score report``: turn a result into one self-contained HTML page.

    mlm-score report probs.parquet -o report.html [--lowest 50] [--baseline BASELINE.parquet]
    make_report("probs.parquet", "report.html")

The page has no external resources (inline CSS and SVG, no script, no network): the distribution of
sentence pseudo-perplexity (log scale) and of the least likely word's probability as histograms; the
lowest-scoring sentences (highest pseudo-perplexity) with each word coloured by its probability and the
least likely word outlined; counts (rows, scored, skipped, flagged) and the settings recorded in the
Parquet metadata (model, mode, engine, input, flag rules). Flag columns (``--flag-below/--flag-above``)
are shown when present, and skipped rows are listed with their errors.

With ``--baseline BASELINE`` (an earlier result of the same model and mode) the page compares the two:
both distributions on one plot per metric (shares of each batch's rows, the baseline as an outline), the
KS statistic and PSI per metric, the share of rows beyond the baseline's p99 pseudo-perplexity (p1 for
the least likely word's probability), and the rows newly flagged against those tails.

Input: the words file (``probs.parquet``; its ``probs.sentences.parquet`` is found next to it), the
sentences file itself, or a directory written by ``mlm-score ray`` (``words/`` and ``sentences/``); the
same for the baseline.
All text from the data is HTML-escaped.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .errors import MlmScorerError, UsageError
from .fsutil import atomic_write_bytes
from .results import read_table as _read
from .writer import exp as _exp
from .results import result_paths as _paths
from .results import settings as _settings

__all__ = ["make_report", "main"]


# ------------------------------------------------------------------------------------------------- SVG
def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt_pow(x: float) -> str:
    v = 10 ** x
    if abs(x - round(x)) < 1e-9:
        k = int(round(x))
        return f"{10 ** k:g}" if -3 <= k <= 4 else f"1e{k}"
    return f"{v:.3g}"


def _binning(vals: list[float], bins: int) -> tuple[float, float, float, int]:
    """(lo, hi, step, number of bins): round edges covering ``vals``."""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    step = _nice_step(hi - lo, bins)
    lo = math.floor(lo / step) * step
    hi = max(lo + step, math.ceil(hi / step) * step)
    return lo, hi, step, max(1, int(round((hi - lo) / step)))


def _counts(vals: list[float], lo: float, step: float, nb: int) -> list[int]:
    counts = [0] * nb
    for v in vals:
        counts[min(nb - 1, max(0, int((v - lo) / step)))] += 1
    return counts


def _log_values(values, log10: bool) -> list[float]:
    return [math.log10(v) if log10 else v for v in values
            if v is not None and math.isfinite(v) and (v > 0 or not log10)]


def _svg_head(css_class: str, title: str, width: int, height: int) -> str:
    esc = html.escape
    return (f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
            f'<title>{esc(title)}</title>')


def _axes(lo: float, hi: float, X, Y, ticks: list[tuple[float, str]], *, log10: bool, box: tuple, height: int,
          x_label: str, y_label: str) -> list[str]:
    """Horizontal grid with y labels (``ticks``: value, label), x ticks, both axes and their labels."""
    esc = html.escape
    ml, mt, pw, ph = box
    parts = []
    for c, lab in ticks:
        y = Y(c)
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{esc(lab)}</text>')
    xs: list[float] = []
    if log10 and 0.5 <= hi - lo < 2.5:  # a decade or two: 1, 2, 5 x 10^k
        xs = [k + math.log10(m) for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
              if lo - 1e-9 <= k + math.log10(m) <= hi + 1e-9]
    else:
        xstep = _nice_step(hi - lo, 8)
        if log10:
            xstep = max(xstep, 0.1 if hi - lo < 1.5 else 1.0)
            if xstep < 1:
                xstep = 1.0 if hi - lo >= 1 else xstep
        t = math.ceil(lo / xstep) * xstep
        while t <= hi + 1e-9:
            xs.append(t)
            t += xstep
    for t in xs:
        x = X(t)
        lab = _fmt_pow(t) if log10 else f"{t:.4g}"
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 5}" class="axis"/>'
                     f'<text x="{x:.1f}" y="{mt + ph + 18}" text-anchor="middle" class="tick">{esc(lab)}</text>')
    parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" class="axis"/>'
                 f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + ph}" class="axis"/>'
                 f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" class="lab">{esc(x_label)}</text>'
                 f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" class="lab" '
                 f'transform="rotate(-90 14 {mt + ph / 2})">{esc(y_label)}</text>')
    return parts


def _scales(lo: float, hi: float, top: float, width: int, height: int, unit: str = ""):
    """(X, Y, plot box, y ticks) of a plot of [lo, hi] x [0, top]: value -> pixel maps and round ticks."""
    ml, mr, mt, mb = 52, 16, 28, 44
    pw, ph = width - ml - mr, height - mt - mb
    ystep = max(1.0, _nice_step(top, 4))
    ytop = max(ystep, math.ceil(top / ystep) * ystep)

    def X(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    def Y(c: float) -> float:
        return mt + ph - c / ytop * ph

    ticks = [(k * ystep, f"{k * ystep:g}{unit}") for k in range(int(round(ytop / ystep)) + 1)]
    return X, Y, (ml, mt, pw, ph), ticks


def histogram_svg(values: list[float], *, title: str, x_label: str, log10: bool = True, bins: int = 30,
                  css_class: str = "hist", width: int = 760, height: int = 260) -> str:
    """An inline SVG histogram of ``values`` (log10 of them when ``log10``), with axes and a title per bar."""
    vals = _log_values(values, log10)
    esc = html.escape
    head = _svg_head(css_class, title, width, height)
    if not vals:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no scored sentences' \
                      f'</text></svg>'
    lo, hi, step, nb = _binning(vals, bins)
    counts = _counts(vals, lo, step, nb)
    X, Y, box, ticks = _scales(lo, hi, max(counts), width, height)
    parts = [head, f'<text x="{box[0]}" y="16" class="t">{esc(title)}</text>']
    parts += _axes(lo, hi, X, Y, ticks, log10=log10, box=box, height=height, x_label=x_label, y_label="sentences")
    for i, c in enumerate(counts):
        a, b = lo + i * step, lo + (i + 1) * step
        if not c:
            continue
        label = (f"{_fmt_pow(a)} – {_fmt_pow(b)}" if log10 else f"{a:.4g} – {b:.4g}") + f": {c} sentence(s)"
        parts.append(f'<rect class="bar" x="{X(a) + 0.5:.1f}" y="{Y(c):.1f}" width="{max(1.0, X(b) - X(a) - 1):.1f}" '
                     f'height="{Y(0) - Y(c):.1f}"><title>{esc(label)}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def compare_svg(baseline: list[float], current: list[float], *, title: str, x_label: str, threshold: float | None,
                threshold_label: str, log10: bool = True, bins: int = 30, css_class: str = "cmp",
                width: int = 760, height: int = 280) -> str:
    """Both distributions on one inline SVG plot, as shares of each batch's scored rows (the batches may
    differ in size): the current batch as bars, the baseline as an outline over them, and a dashed line
    at ``threshold`` (the baseline's tail). Each bar's title gives both counts."""
    bv, cv = _log_values(baseline, log10), _log_values(current, log10)
    esc = html.escape
    head = _svg_head(css_class, title, width, height)
    if not bv or not cv:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no scored sentences' \
                      f'</text></svg>'
    thr = None
    if threshold is not None and math.isfinite(threshold) and (threshold > 0 or not log10):
        thr = math.log10(threshold) if log10 else threshold
    lo, hi, step, nb = _binning(bv + cv + ([thr] if thr is not None else []), bins)
    bc, cc = _counts(bv, lo, step, nb), _counts(cv, lo, step, nb)
    bs, cs = [100 * c / len(bv) for c in bc], [100 * c / len(cv) for c in cc]
    X, Y, box, ticks = _scales(lo, hi, max(bs + cs), width, height, unit=" %")
    ml, mt, pw, ph = box
    parts = [head, f'<text x="{ml}" y="16" class="t">{esc(title)}</text>']
    parts += _axes(lo, hi, X, Y, ticks, log10=log10, box=box, height=height, x_label=x_label,
                   y_label="share of rows")
    for i in range(nb):
        a, b = lo + i * step, lo + (i + 1) * step
        if not bc[i] and not cc[i]:
            continue
        label = ((f"{_fmt_pow(a)} – {_fmt_pow(b)}" if log10 else f"{a:.4g} – {b:.4g}")
                 + f": current {cc[i]} of {len(cv)} ({cs[i]:.1f} %), baseline {bc[i]} of {len(bv)} ({bs[i]:.1f} %)")
        parts.append(f'<rect class="bar cur" x="{X(a) + 0.5:.1f}" y="{Y(cs[i]):.1f}" '
                     f'width="{max(1.0, X(b) - X(a) - 1):.1f}" height="{Y(0) - Y(cs[i]):.1f}">'
                     f'<title>{esc(label)}</title></rect>')
    # the baseline: a step outline over the bars
    pts = [f"{X(lo):.1f},{Y(0):.1f}"]
    for i in range(nb):
        a, b = lo + i * step, lo + (i + 1) * step
        pts += [f"{X(a):.1f},{Y(bs[i]):.1f}", f"{X(b):.1f},{Y(bs[i]):.1f}"]
    pts.append(f"{X(hi):.1f},{Y(0):.1f}")
    parts.append(f'<polyline class="base" points="{" ".join(pts)}"/>')
    if thr is not None:
        x = X(thr)
        parts.append(f'<line class="thr" x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}"/>'
                     f'<text class="thr-lab" x="{x + 4:.1f}" y="{mt + 12}">{esc(threshold_label)}</text>')
    lx = ml + pw - 250
    parts.append(f'<rect class="bar cur" x="{lx}" y="{mt + 2}" width="14" height="10"/>'
                 f'<text x="{lx + 20}" y="{mt + 11}" class="tick">current ({len(cv)} rows)</text>'
                 f'<line class="base" x1="{lx + 120}" x2="{lx + 138}" y1="{mt + 7}" y2="{mt + 7}"/>'
                 f'<text x="{lx + 144}" y="{mt + 11}" class="tick">baseline ({len(bv)} rows)</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ highlighting
def _colour(log10p: float, floor: float) -> str:
    """White (p = 1) to red (p <= 10**floor), as an rgba background."""
    a = 0.0 if floor >= 0 else min(1.0, max(0.0, log10p / floor))
    return f"rgba(220, 38, 38, {0.08 + 0.82 * a:.2f})"


def highlight(text: str, words: list[dict], *, floor: float, least: int | None) -> str:
    """``text`` as HTML with each word in a coloured span (title: word, probability); everything escaped."""
    out, pos = [], 0
    for w in sorted(words, key=lambda w: w["char_start"]):
        a, b = int(w["char_start"]), int(w["char_end"])
        if a < pos or b > len(text) or a > b:
            continue  # inconsistent spans: leave the text as is rather than garble it
        out.append(html.escape(text[pos:a]))
        lp = w["log_prob"]
        l10 = lp / math.log(10) if lp is not None and math.isfinite(lp) else floor
        cls = "w least" if w["word_index"] == least else "w"
        tip = f"{text[a:b]}: p = {_exp(lp):.3g} (log p = {lp:.3f})" if lp is not None else text[a:b]
        out.append(f'<span class="{cls}" style="background:{_colour(l10, floor)}" title="{html.escape(tip)}">'
                   f'{html.escape(text[a:b])}</span>')
        pos = b
    out.append(html.escape(text[pos:]))
    return "".join(out)


# ----------------------------------------------------------------------------------------------- report
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;
max-width:1140px;padding:0 16px;color:#1f2937;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.sub{color:#6b7280;margin:0 0 16px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #e5e7eb;border-radius:8px;padding:10px 16px;min-width:110px}
.card b{display:block;font-size:22px}.card span{color:#6b7280;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #e5e7eb;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f9fafb;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:#4b5563}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.settings td:first-child{width:180px;color:#4b5563}
.w{border-radius:3px;padding:0 1px}.w.least{outline:2px solid #7f1d1d;font-weight:600}
.flag{color:#b91c1c;font-weight:600;font-size:12px;max-width:220px}.err{color:#b91c1c}
svg .bar{fill:#2563eb}svg .grid{stroke:#e5e7eb}svg .axis{stroke:#6b7280}svg .tick{font-size:11px;fill:#4b5563}
svg .lab{font-size:12px;fill:#374151}svg .t{font-size:13px;font-weight:600;fill:#111827}svg{max-width:100%;height:auto}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;color:#4b5563;margin:6px 0}
.legend .scale{display:inline-block;width:160px;height:12px;border-radius:3px;
background:linear-gradient(90deg,rgba(220,38,38,.08),rgba(220,38,38,.9))}
.plots{display:flex;flex-wrap:wrap;gap:8px}code{font-size:12px}
svg .bar.cur{fill:#2563eb;fill-opacity:.6}svg .base{fill:none;stroke:#ea580c;stroke-width:2.5}
svg .thr{stroke:#7f1d1d;stroke-width:1.5;stroke-dasharray:5 4}svg .thr-lab{font-size:11px;fill:#7f1d1d}
.card.warn b{color:#b91c1c}td.bad{color:#b91c1c;font-weight:600}
"""


def _num(x, fmt: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt)


def make_report(result_parquet: str | os.PathLike, out_html: str | os.PathLike, *, lowest: int = 50,
                title: str | None = None, baseline: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the HTML report of ``result_parquet`` to ``out_html``; return the counts shown in it.

    With ``baseline`` (an earlier result of the same model and mode) the page also compares the two:
    both distributions on one plot per metric, the shift statistics of ``quality.compare``, and the rows
    newly flagged against the baseline (beyond its p99 pseudo-perplexity or its p1 least-likely-word
    probability: ``quality.default_baseline_rules``)."""
    import pyarrow.compute as pc

    if lowest < 0:
        raise UsageError("lowest must be >= 0")
    words_path, sents_path = _paths(result_parquet)
    dest = check_report_target(out_html, "the report (-o)", result_parquet, baseline)
    sents, schema = _read(sents_path)
    settings = _settings(schema)
    names = sents.column_names
    has = set(names)
    for col in ("row", "text", "status", "pseudo_perplexity", "pll", "n_words", "min_word_log_prob"):
        if col not in has:
            raise UsageError(f"{str(sents_path)!r} is not an mlm-score sentences file: no {col!r} column")
    n_rows = sents.num_rows
    status = sents.column("status").to_pylist()
    n_ok = sum(s == "ok" for s in status)
    n_skipped = n_rows - n_ok
    has_flag = "flag" in has
    n_flagged = int(pc.sum(sents.column("flag").cast("int64")).as_py() or 0) if has_flag else None
    rows = sents.to_pylist()
    from .quality import impossible_mask

    bad = impossible_mask(sents)
    for r, b in zip(rows, bad):
        r["_impossible"] = bool(b)
    scored = [r for r in rows if r["status"] == "ok"]
    ok = [r for r in scored if not r["_impossible"]]  # what the statistics are taken over
    n_impossible = len(scored) - len(ok)

    def order(r):  # impossible scores first (they are never expected), then the least likely
        ppl = r["pseudo_perplexity"]
        return (not r["_impossible"], -ppl if ppl is not None and not math.isnan(ppl) else 0.0,
                r.get("file") or "", r["row"])

    worst = sorted(scored, key=order)[:lowest]

    cmp = None
    if baseline is not None:
        from .quality import scores_of

        cmp = _compare_with(result_parquet, baseline, scores_of(sents, schema, path=result_parquet,
                                                                sentences=sents_path), ok)
        cmp["newly"] = sorted(cmp["newly"], key=order)

    # words of the sentences shown
    keys = {(r.get("file"), r["row"]) for r in worst + (cmp["newly"][:lowest] if cmp else [])}
    by_key: dict[tuple, list[dict]] = {}
    if keys:
        import pyarrow.dataset as ds

        wanted = sorted({k[1] for k in keys})
        wt, _ = _read(words_path, ["file", "row", "word_index", "char_start", "char_end", "log_prob"],
                      filters=ds.field("row").isin(wanted))
        for w in wt.to_pylist():
            k = (w.get("file"), w["row"])
            if k in keys:
                by_key.setdefault(k, []).append(w)
    shown_lp = [w["log_prob"] / math.log(10) for ws in by_key.values() for w in ws
                if w["log_prob"] is not None and math.isfinite(w["log_prob"])]
    floor = -1.0
    if shown_lp:
        shown_lp.sort()
        floor = min(-1.0, shown_lp[max(0, int(0.05 * len(shown_lp)) - 1)])

    esc = html.escape
    ttl = title or f"mlm-scorer report: {Path(str(result_parquet)).name}"
    show_file = "file" in has and len({r.get("file") for r in rows}) > 1
    has_id = "id" in has
    out: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # nothing may load from elsewhere: the page is self-contained
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">",
        f"<title>{esc(ttl)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(ttl)}</h1>",
        f'<p class="sub">{esc(str(settings.get("input", sents_path)))} · model {esc(str(settings.get("model", "?")))}'
        f' · {esc(str(settings.get("mode", "?")))} · {esc(str(settings.get("engine", "?")))}</p>',
        '<section id="counts"><div class="cards">',
    ]
    cards = [("rows", n_rows), ("scored", n_ok), ("skipped", n_skipped)]
    if n_impossible:
        cards.append(("impossible scores", n_impossible))
    if has_flag:
        cards.append(("flagged", n_flagged))
    words_total = sum(r["n_words"] or 0 for r in ok)
    cards.append(("words", words_total))
    if cmp:
        n_new = len(cmp["newly"])
        cards.append(("beyond the baseline's tails", f"{n_new} ({100 * n_new / max(1, n_ok):.1f} %)"))
    if ok:
        ppl = sorted(r["pseudo_perplexity"] for r in ok)
        cards.append(("median pseudo-perplexity", _num(ppl[len(ppl) // 2], ".4g")))
        cards.append(("mean PLL per word", _num(sum(r["pll"] for r in ok) / max(1, words_total), ".3f")))
    for name, v in cards:
        warn = " warn" if name == "impossible scores" else ""
        out.append(f'<div class="card{warn}" data-count="{esc(name)}"><b>{esc(str(v))}</b><span>{esc(name)}</span>'
                   f'</div>')
    out.append("</div></section>")

    if cmp:
        out += _baseline_section(cmp)

    def sentence_table(css: str, shown: list[dict], flag_head: str | None, flag_text) -> None:
        head = ["#"] + (["file"] if show_file else []) + ["line"] + (["id"] if has_id else []) + \
            ["pseudo-perplexity", "PLL", "min word p"] + ([flag_head] if flag_head else []) + ["sentence"]
        out.append(f'<table class="{css}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head)
                   + "</tr></thead><tbody>")
        for i, r in enumerate(shown, 1):
            ws = by_key.get((r.get("file"), r["row"]), [])
            cells = [f'<td class="num">{i}</td>']
            if show_file:
                cells.append(f"<td>{esc(str(r.get('file')))}</td>")
            cells.append(f'<td class="num">{esc(str(r["line"]))}</td>')
            if has_id:
                cells.append(f"<td>{esc(str(r['id'])) if r['id'] is not None else ''}</td>")
            cells += [f'<td class="num">{_num(r["pseudo_perplexity"])}</td>',
                      f'<td class="num">{_num(r["pll"], ".2f")}</td>',
                      f'<td class="num">{_num(_exp(r["min_word_log_prob"]), ".3g")}</td>']
            if flag_head:
                why = flag_text(r)
                cells.append(f'<td class="flag">{esc(why)}</td>' if why else "<td></td>")
            cells.append(f'<td class="text">{highlight(r["text"], ws, floor=floor, least=r["min_word_index"])}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")

    legend = (f'<div class="legend">word probability: 1 <span class="scale"></span> ≤ {esc(_fmt_pow(floor))} · '
              f'outlined: the sentence\'s least likely word · hover a word for its probability</div>')
    if cmp:
        newly = cmp["newly"]
        shown_new = newly[:lowest]
        out.append(f'<section id="newly-flagged"><h2>Rows newly flagged against the baseline ({len(newly)}'
                   f'{", first " + str(len(shown_new)) if len(shown_new) < len(newly) else ""})</h2>'
                   f'<p class="sub">Scored rows beyond the baseline\'s tails: {esc("; ".join(cmp["rules"]))}. '
                   f'The baseline itself has {cmp["baseline_beyond"]} such row(s) of {cmp["baseline"].scored}.</p>')
        if shown_new:
            out.append(legend)
            sentence_table("newly", shown_new, "why", lambda r: cmp["why"][id(r)])
        out.append("</section>")
    out.append('<section id="distribution"><h2>Score distribution</h2><div class="plots">')
    out.append(histogram_svg([r["pseudo_perplexity"] for r in ok], title="Pseudo-perplexity per sentence (log scale)",
                             x_label="pseudo-perplexity = exp(−PLL / words); higher is less likely",
                             css_class="hist pppl"))
    out.append(histogram_svg([_exp(r["min_word_log_prob"]) for r in ok if r["min_word_log_prob"] is not None],
                             title="Probability of each sentence's least likely word (log scale)",
                             x_label="min word probability; lower is less likely", css_class="hist minp"))
    out.append("</div></section>")
    out.append(f'<section id="lowest"><h2>The {len(worst)} lowest-scoring sentence(s)</h2>')
    if n_impossible:
        out.append(f'<p class="sub err">{n_impossible} row(s) marked ok hold impossible scores (NaN, or a '
                   f'log-prob that is infinite or above 0): they come first below and are left out of the '
                   f'statistics. mlm-score never writes such a row: the file is damaged or was written by '
                   f'something else; score the input again.</p>')
    out.append(legend)
    sentence_table("lowest", worst, "flag" if has_flag else None,
                   lambda r: (r.get("flag_reason") or "") if r.get("flag") else "")
    out.append("</section>")

    if has_flag and n_flagged:
        flagged = [r for r in rows if r.get("flag")][:lowest]
        out.append(f'<section id="flagged"><h2>Flagged sentences ({n_flagged}'
                   f'{", first " + str(len(flagged)) if len(flagged) < n_flagged else ""})</h2>'
                   '<table class="flagged"><thead><tr><th>line</th>' + ("<th>id</th>" if has_id else "")
                   + "<th>reason</th><th>sentence</th></tr></thead><tbody>")
        for r in flagged:
            out.append(f'<tr><td class="num">{esc(str(r["line"]))}</td>'
                       + (f"<td>{esc(str(r['id'] or ''))}</td>" if has_id else "")
                       + f'<td class="flag">{esc(r.get("flag_reason") or "")}</td><td>{esc(r["text"] or "")}</td></tr>')
        out.append("</tbody></table></section>")

    if n_skipped:
        skipped = [r for r in rows if r["status"] != "ok"][:lowest]
        out.append(f'<section id="skipped"><h2>Skipped rows ({n_skipped})</h2><table class="skipped"><thead><tr>'
                   "<th>line</th><th>error</th><th>text</th></tr></thead><tbody>")
        for r in skipped:
            out.append(f'<tr><td class="num">{esc(str(r["line"]))}</td><td class="err">{esc(r.get("error") or "")}</td>'
                       f'<td>{esc(r["text"] or "")}</td></tr>')
        out.append("</tbody></table></section>")

    out.append('<section id="settings"><h2>Settings</h2><table class="settings"><tbody>')
    shown = dict(settings)
    shown.setdefault("sentences file", str(sents_path))
    for k, v in shown.items():
        if isinstance(v, (list, dict)):
            v = ", ".join(map(str, v)) if isinstance(v, list) else json.dumps(v, sort_keys=True)
        out.append(f"<tr><td>{esc(str(k))}</td><td><code>{esc(str(v)) if v not in ('', None) else '–'}</code></td></tr>")
    out.append("</tbody></table></section>")
    out.append('<p class="sub">Generated by mlm-score report. PLL: pseudo-log-likelihood (natural log), the sum of '
               "the words' log-probabilities; pseudo-perplexity = exp(−PLL / words).</p></body></html>")

    atomic_write_bytes(dest, ("\n".join(out) + "\n").encode("utf-8"), what="the report (-o)")
    info = {"rows": n_rows, "scored": n_ok, "skipped": n_skipped, "flagged": n_flagged, "shown": len(worst),
            "impossible": n_impossible, "output": str(dest)}
    if cmp:
        info.update(newly_flagged=len(cmp["newly"]), baseline=str(baseline), metrics=cmp["metrics"])
    return info


def check_report_target(path: str | os.PathLike, what: str, result: str | os.PathLike | None,
                        baseline: str | os.PathLike | None = None) -> Path:
    """Refuse (UsageError) a file ``report`` or ``check`` would write that is not absent or a regular file, or
    that is one of the files it reads: either file of the result or of the baseline, or a file inside a
    result directory of ``mlm-score ray``. ``result`` None: a writer that reads only ``baseline``."""
    from .fsutil import check_target

    reads: list[tuple[Path, str]] = []
    for name, r in (("result", result), ("baseline", baseline)):
        if r is None:
            continue
        if Path(r).is_dir():
            inside = os.path.realpath(r) + os.sep
            if os.path.realpath(path).startswith(inside):
                raise UsageError(f"{what} {str(path)!r} lies inside the {name} directory {str(r)!r}, which is read; "
                                 f"choose a path outside it")
            continue
        words, sents = _paths(r) if Path(r).exists() else (Path(r), Path(r))
        reads += [(Path(r), f"the {name}"), (words, f"the {name}'s words file"),
                  (sents, f"the {name}'s sentences file")]
    return check_target(path, what, inputs=reads)


def _compare_with(result, baseline, cur, ok: list[dict]) -> dict[str, Any]:
    """The comparison of ``cur`` (the Scores of ``result``) with ``baseline``: statistics per metric, the
    tail rules, the current rows beyond them (``newly``) with their reasons (``why``, by id of the row dict)."""
    from .quality import compare, default_baseline_rules, evaluate, fired, load_baseline, resolve

    base = load_baseline(baseline, model_checksum=cur.settings.get("model_checksum"), mode=cur.settings.get("mode"),
                         other=f"the result {result}", empty="there is nothing to compare with")
    rules = resolve(default_baseline_rules(), base.values, of="baseline")
    newly, why = [], {}
    for r in ok:
        hit, reason = evaluate(rules, r["pll"], r["n_words"], r["min_word_log_prob"], r.get("unknown_words"))
        if hit:
            newly.append(r)
            why[id(r)] = reason
    return {"baseline": base, "current": cur, "metrics": compare(cur, base), "rules": [str(x) for x in rules],
            "newly": newly, "why": why, "baseline_beyond": int(fired(rules, base.values, base.scored).sum())}


def _baseline_section(cmp: dict[str, Any]) -> list[str]:
    """The comparison: what the baseline is, a table of statistics, both distributions per metric."""
    esc = html.escape
    base, cur, metrics = cmp["baseline"], cmp["current"], cmp["metrics"]
    st = base.settings
    out = ['<section id="baseline"><h2>Compared with the baseline</h2>',
           f'<p class="sub">baseline {esc(base.path)}: {base.rows} rows, {base.scored} scored · model '
           f'{esc(str(st.get("model", "?")))} · {esc(str(st.get("mode", "?")))}. KS D: the largest gap between the '
           f'two cumulative distributions (0 = same, 1 = disjoint; about the share of rows that moved). PSI: '
           f'population stability index over the baseline\'s deciles (&lt; 0.1 stable, &gt; 0.25 a major shift).'
           f'</p>',
           '<table class="shift"><thead><tr><th>metric</th><th>KS D</th><th>KS p-value</th><th>PSI</th>'
           '<th>baseline tail</th><th>current beyond it</th><th>baseline beyond it</th><th>median (current)</th>'
           '<th>median (baseline)</th></tr></thead><tbody>']
    for m, s in metrics.items():
        sym = ">" if s["direction"] == "above" else "<"
        share = s["share_beyond"]
        out.append(f'<tr data-metric="{esc(m)}"><td>{esc(m)}</td><td class="num">{_num(s["ks"], ".3f")}</td>'
                   f'<td class="num">{_num(s["ks_pvalue"], ".2g")}</td><td class="num">{_num(s["psi"], ".3f")}</td>'
                   f'<td class="num">{sym} {esc(s["tail"])} = {_num(s["baseline_threshold"])}</td>'
                   f'<td class="num{" bad" if share and share > 0.05 else ""}">{s["rows_beyond"]} '
                   f'({100 * (share or 0):.1f} %)</td>'
                   f'<td class="num">{100 * (s["baseline_share_beyond"] or 0):.1f} %</td>'
                   f'<td class="num">{_num(s["current_percentiles"]["p50"])}</td>'
                   f'<td class="num">{_num(s["baseline_percentiles"]["p50"])}</td></tr>')
    out.append("</tbody></table><div class=\"plots\">")
    pp, mp = metrics["pseudo_perplexity"], metrics["min_word_prob"]
    out.append(compare_svg(list(base.values["pseudo_perplexity"]), list(cur.values["pseudo_perplexity"]),
                           title="Pseudo-perplexity: current batch vs baseline (log scale)",
                           x_label="pseudo-perplexity; higher is less likely", threshold=pp["baseline_threshold"],
                           threshold_label=f"baseline {pp['tail']}", css_class="cmp pppl"))
    out.append(compare_svg(list(base.values["min_word_prob"]), list(cur.values["min_word_prob"]),
                           title="Least likely word's probability: current batch vs baseline (log scale)",
                           x_label="min word probability; lower is less likely", threshold=mp["baseline_threshold"],
                           threshold_label=f"baseline {mp['tail']}", css_class="cmp minp"))
    out.append("</div></section>")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlm-score report",
                                 description="Write a self-contained HTML report of a scoring result.")
    ap.add_argument("result", help="probs.parquet (its probs.sentences.parquet next to it), a .sentences.parquet "
                                   "file, or a directory written by mlm-score ray")
    ap.add_argument("-o", "--output", required=True, help="HTML file to write")
    ap.add_argument("--lowest", type=int, default=50, help="how many of the lowest-scoring sentences to show "
                                                           "(default 50)")
    ap.add_argument("--title", help="page title")
    ap.add_argument("--baseline", metavar="RESULT", help="an earlier result of the same model and mode: adds both "
                                                        "distributions, shift statistics and the rows newly flagged")
    args = ap.parse_args(argv)
    if args.lowest < 0:
        ap.error("--lowest must be >= 0")
    from .logs import configure_cli, log

    configure_cli("mlm-score report")
    try:
        info = make_report(args.result, args.output, lowest=args.lowest, title=args.title, baseline=args.baseline)
    except MlmScorerError as exc:
        log.error(str(exc))
        return exc.exit_code
    except OSError as exc:
        log.error(str(exc))
        return 1
    log.info(f"report: {info['rows']} rows, {info['scored']} scored, {info['skipped']} skipped"
             + (f", {info['flagged']} flagged" if info["flagged"] is not None else "")
             + (f", {info['newly_flagged']} beyond the baseline's tails" if "newly_flagged" in info else "")
             + f" -> {info['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
