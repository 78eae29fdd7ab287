"""Data quality: flag rules on sentence scores, and the statistics that compare a batch with a baseline.

Rules are ``METRIC=THRESHOLD`` with a direction, written as the ``flag`` / ``flag_reason`` sentence
columns. A sentence is flagged when any rule fires; skipped rows get a null flag. The threshold is
either a number or a percentile ``pNN`` (``p99``, ``p1``, ``p99.9``)::

    --flag-below min_word_prob=0.001       least likely word's probability under 0.001
    --flag-above pseudo_perplexity=500     pseudo-perplexity over 500
    --flag-above pseudo_perplexity=p99     over the run's own 99th percentile
    --flag-above pseudo_perplexity=p99 --baseline base.parquet   over the baseline's 99th percentile

Percentiles (nearest rank): ``pNN`` of n values is the smallest of them such that at least NN % of
the values are less than or equal to it, i.e. the ceil(NN/100 * n)-th smallest (the smallest for
p0). It is always one of the values, never interpolated, so ``--flag-above X=p99`` flags at most 1 % of
the rows it was taken from (fewer with ties) and ``--flag-below X=p1`` at most 1 %. Only scored rows
count (status "ok"); skipped rows have no scores.

A percentile of the run itself is known only once every row is scored: the scorer commits the chunks
with the other rules applied, then takes the percentiles in a second pass over the committed sentence
parts (reading only the score columns) and writes the flags while it assembles the final file. An
interrupted run resumed with ``--resume`` does the same over all parts, old and new.

The statistics (``compare``) that ``mlm-score check`` and ``mlm-score report --baseline`` share, per
metric: the two-sample Kolmogorov-Smirnov statistic D (the largest gap between the two cumulative
distributions: a batch in which a share s of the rows moved past every baseline score has D close to
s) with its asymptotic p-value; the population stability index over the baseline's deciles; the
share of rows beyond the baseline's p99 (p1 for metrics that get worse downwards).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from .errors import UsageError

# metric -> the direction in which it gets worse (for the hint when a rule points the other way)
METRICS = {
    "pseudo_perplexity": "above",
    "min_word_prob": "below",
    "min_word_log_prob": "below",
    "mean_word_log_prob": "below",
    "pll": "below",
    "unknown_words": "above",  # words whose pieces include the unknown token ([UNK])
}
# what check and the report compare with a baseline: a sentence's overall fit and its worst word (the
# other metrics are monotone transforms of these, or depend on the length)
COMPARED = ("pseudo_perplexity", "min_word_prob")
SCORE_COLUMNS = ["status", "pll", "n_words", "pseudo_perplexity", "min_word_log_prob"]
#: metric -> the column it needs beyond SCORE_COLUMNS (results written before it existed lack it)
EXTRA_COLUMNS = {"unknown_words": "unknown_words"}


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class FlagRule:
    metric: str
    op: str  # "below" | "above"
    value: float | None  # the threshold; None for a percentile of the run not taken yet (NaN: no rows)
    percentile: Fraction | None = None  # pNN; None for a fixed threshold
    of: str | None = None  # where the percentile was taken: "run" or "baseline"

    @property
    def relative(self) -> bool:
        return self.percentile is not None

    @property
    def pending(self) -> bool:
        """A percentile of the run itself, known only after the run (``RunQuantiles``)."""
        return self.value is None

    def fires(self, x: float) -> bool:
        if self.value is None:
            return False
        return x < self.value if self.op == "below" else x > self.value

    def fires_on(self, x):
        """``fires`` over an array: a bool array (NaN never fires)."""
        import numpy as np

        x = np.asarray(x, dtype=np.float64)
        return np.zeros(x.shape, bool) if self.value is None else self.fires(x)

    def check(self, metrics: dict[str, float]) -> str | None:
        """The reason text if the rule fires, else None."""
        x = metrics[self.metric]
        return self.reason(x) if self.fires(x) else None

    def reason(self, x: float) -> str:
        sym = "<" if self.op == "below" else ">"
        if not self.relative:
            return f"{self.metric} {x:.4g} {sym} {self.value:g}"
        return f"{self.metric} {x:.4g} {sym} {self.value:.4g} (p{_pct(self.percentile)} of the {self.of})"

    def __str__(self) -> str:
        if not self.relative:
            return f"--flag-{self.op} {self.metric}={self.value:g}"
        s = f"--flag-{self.op} {self.metric}=p{_pct(self.percentile)}"
        if self.value is not None:
            s += f" (of the {self.of}: " + ("no scored rows" if math.isnan(self.value) else f"{self.value:.6g}") + ")"
        return s


def _pct(p: Fraction) -> str:
    return str(p.numerator) if p.denominator == 1 else f"{float(p):g}"


def parse_rule(spec: str, op: str) -> FlagRule:
    """``METRIC=VALUE`` or ``METRIC=pNN`` for ``--flag-below`` (op "below") or ``--flag-above``."""
    if "=" not in spec:
        raise UsageError(f"--flag-{op} expects METRIC=VALUE or METRIC=pNN (metrics: {', '.join(METRICS)}), "
                         f"got {spec!r}")
    metric, value = (x.strip() for x in spec.split("=", 1))
    metric = metric.replace("-", "_")
    if metric not in METRICS:
        raise UsageError(f"--flag-{op}: unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    if METRICS[metric] != op:
        raise UsageError(f"{metric} gets worse {METRICS[metric]} a threshold: use "
                         f"--flag-{METRICS[metric]} {metric}={value}")
    if value[:1] in ("p", "P"):
        try:
            pct = Fraction(value[1:])
        except ValueError:
            pct = None
        if pct is None or not 0 <= pct <= 100 or not value[1:].replace(".", "", 1).isdigit():
            raise UsageError(f"--flag-{op} {metric}: {value!r} is not a percentile; write p0 to p100, e.g. "
                             f"p99 or p99.9")
        return FlagRule(metric, op, None, percentile=pct, of="run")
    try:
        v = float(value)
    except ValueError:
        raise UsageError(f"--flag-{op} {metric}: {value!r} is not a number (or a percentile such as p99)") from None
    if math.isnan(v):
        raise UsageError(f"--flag-{op} {metric}: the threshold is NaN")
    return FlagRule(metric, op, v)


def sentence_metrics(pll: float, n_words: int, min_word_log_prob: float,
                     unknown_words: int | None = None) -> dict[str, float]:
    from .writer import exp, pseudo_perplexity

    return {
        "pseudo_perplexity": pseudo_perplexity(pll, n_words),
        "min_word_prob": exp(min_word_log_prob),
        "min_word_log_prob": min_word_log_prob,
        "mean_word_log_prob": pll / n_words,
        "pll": pll,
        "unknown_words": float("nan") if unknown_words is None else float(unknown_words),
    }


def evaluate(rules: list[FlagRule], pll: float, n_words: int, min_word_log_prob: float,
             unknown_words: int | None = None) -> tuple[bool, str | None]:
    m = sentence_metrics(pll, n_words, min_word_log_prob, unknown_words)
    reasons = [r for r in (rule.check(m) for rule in rules) if r]
    return bool(reasons), "; ".join(reasons) or None


def fired(rules: list[FlagRule], values: dict[str, Any], n: int):
    """bool array over ``n`` rows: any of ``rules`` fires (``values``: metric -> array of n scores)."""
    import numpy as np

    hit = np.zeros(n, bool)
    for r in rules:
        hit |= r.fires_on(_metric_values(values, r.metric))
    return hit


def _metric_values(values: dict[str, Any], metric: str):
    if metric not in values:
        raise UsageError(f"the result has no {EXTRA_COLUMNS.get(metric, metric)} column (it was scored by an "
                         f"earlier version of mlm-score): score it again to use a rule on {metric}")
    return values[metric]


def default_baseline_rules() -> list[FlagRule]:
    """What check and the report flag against a baseline when not told otherwise: a sentence less likely
    overall than 99 % of the baseline's, or with a word less likely than the baseline's 1 % worst."""
    return [FlagRule("pseudo_perplexity", "above", None, percentile=Fraction(99), of="baseline"),
            FlagRule("min_word_prob", "below", None, percentile=Fraction(1), of="baseline")]


# ------------------------------------------------------------------------------------------ percentiles
def quantile(values, percentile: Fraction | float) -> float:
    """Nearest-rank percentile (see the module doc) of ``values``; NaN when there are none."""
    return quantiles(values, [percentile])[0]


def quantiles(values, percentiles) -> list[float]:
    """``quantile`` of ``values`` at each of ``percentiles`` (one sort for all)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    v = np.sort(v[~np.isnan(v)])  # an impossible (NaN) score has no rank
    if not v.size:
        return [float("nan")] * len(percentiles)
    # exact: Fraction("99.9") * n / 100
    return [float(v[max(math.ceil(Fraction(p) * v.size / 100), 1) - 1]) for p in percentiles]


# -------------------------------------------------------------------------------------------- scores
def metric_array(table, metric: str):
    """``metric`` for every row of a sentences table, float64 (NaN where a row has no score)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def col(name):
        return pc.fill_null(table.column(name).cast(pa.float64()), float("nan")).to_numpy()

    if metric == "pseudo_perplexity":
        return col("pseudo_perplexity")
    if metric == "min_word_prob":  # math.exp, as the per-row rules compute it: the same value to the bit
        from .writer import exp

        return np.fromiter((exp(x) for x in col("min_word_log_prob")), np.float64, table.num_rows)
    if metric == "mean_word_log_prob":
        with np.errstate(invalid="ignore", divide="ignore"):
            return col("pll") / col("n_words")
    if metric in ("min_word_log_prob", "pll", "unknown_words"):
        return col(metric)
    raise ValueError(metric)


def scored_mask(table):
    """bool array: the rows with status "ok"."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy()


def impossible_mask(table):
    """bool array: rows marked "ok" whose scores are impossible: a PLL or least-likely-word log-prob that is
    NaN, infinite or above 0, or a NaN pseudo-perplexity (+inf is possible: a mean word log-prob below
    about -709.78). This program never writes such a row; a damaged or foreign result may hold them."""
    import numpy as np

    ok = scored_mask(table)
    with np.errstate(invalid="ignore"):
        bad = np.zeros(table.num_rows, bool)
        for name in ("pll", "min_word_log_prob"):
            x = metric_array(table, name)
            bad |= ~np.isfinite(x) | (x > 0)
        bad |= np.isnan(metric_array(table, "pseudo_perplexity"))
    return ok & bad


@dataclass
class Scores:
    """The scores of one result's scored rows (in row order), for percentiles and comparisons."""

    path: str  # as given
    sentences: Path
    settings: dict[str, Any]
    rows: int
    scored: int
    values: dict[str, Any]  # metric -> float64 array over the scored rows
    flag: Any | None  # bool array over the scored rows (the result's flag column), None without one
    impossible: int = 0  # scored rows whose scores are impossible (``impossible_mask``)
    impossible_lines: list = None  # where the first of them are ("12", or "file:12" for a Ray result)

    @property
    def skipped(self) -> int:
        return self.rows - self.scored


def load_scores(result: str | os.PathLike, *, what: str = "result") -> Scores:
    """Read the score columns of a result (either file of the pair, or a Ray output directory)."""
    from .results import read_table, result_paths

    try:
        _, sents_path = result_paths(result)
        table, schema = read_table(sents_path, SCORE_COLUMNS + ["flag", "line", "file", "unknown_words"])
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None
    missing = [c for c in SCORE_COLUMNS if c not in table.column_names]
    if missing:
        raise UsageError(f"{what}: {str(sents_path)!r} is not an mlm-score sentences file: no {missing[0]!r} column")
    return scores_of(table, schema, path=result, sentences=sents_path)


def scores_of(table, schema, *, path: str | os.PathLike, sentences: Path) -> Scores:
    """The Scores of a sentences table already read (with the SCORE_COLUMNS, and ``flag`` if it has one)."""
    import numpy as np
    import pyarrow.compute as pc

    from .results import settings

    ok = scored_mask(table)
    values = {m: metric_array(table, m)[ok] for m in METRICS
              if EXTRA_COLUMNS.get(m) in (None, *table.column_names)}
    flag = None
    if "flag" in table.column_names:
        flag = np.asarray(pc.fill_null(table.column("flag"), False).to_numpy(), dtype=bool)[ok]
    bad = impossible_mask(table)
    where = []
    if bad.any() and "line" in table.column_names:
        idx = np.flatnonzero(bad)[:10]
        lines = table.column("line").take(idx).to_pylist()
        files = table.column("file").take(idx).to_pylist() if "file" in table.column_names else [None] * len(idx)
        where = [f"{f}:{n}" if f else str(n) for f, n in zip(files, lines)]
    return Scores(path=str(path), sentences=sentences, settings=settings(schema), rows=table.num_rows,
                  scored=int(ok.sum()), values=values, flag=flag, impossible=int(bad.sum()), impossible_lines=where)


def resolve(rules: list[FlagRule], values: dict[str, Any], *, of: str) -> list[FlagRule]:
    """The rules with every percentile taken from ``values`` (metric -> scores of the reference)."""
    return [replace(r, value=quantile(_metric_values(values, r.metric), r.percentile), of=of) if r.relative else r
            for r in rules]


def check_comparable(reference: Scores, *, model_checksum: str | None, mode: str | None, what: str = "baseline",
                     other: str = "this run") -> None:
    """Refuse to compare scores of different models or modes (their scales differ)."""
    s = reference.settings
    diffs = []
    if model_checksum and s.get("model_checksum") and s["model_checksum"] != model_checksum:
        diffs.append(f"model checksum {s['model_checksum'][:16]} ({s.get('model', '?')}) vs {model_checksum[:16]}")
    if mode and s.get("mode") and s["mode"] != mode:
        diffs.append(f"mode {s['mode']} vs {mode}")
    if diffs:
        raise UsageError(f"the {what} {reference.path} and {other} were scored differently ({'; '.join(diffs)}): "
                         f"scores of different models or modes are not comparable. Score the {what} with the same "
                         f"--model and --mode")


def load_baseline(baseline: str | os.PathLike, *, model_checksum: str | None, mode: str | None,
                  other: str = "this run", empty: str = "its percentiles are undefined") -> Scores:
    """The baseline's scores, refused if it was scored with another model or mode than ``other``, or has
    no scored rows (``empty`` says what that leaves undefined)."""
    ref = load_scores(baseline, what="baseline")
    check_comparable(ref, model_checksum=model_checksum, mode=mode, other=other)
    if ref.scored == 0:
        raise UsageError(f"the baseline {baseline} has no scored rows: {empty}")
    return ref


def baseline_rules(rules: list[FlagRule], baseline: str | os.PathLike, *, model_checksum: str | None = None,
                   mode: str | None = None, notes: list[str] | None = None) -> list[FlagRule]:
    """``rules`` with their percentiles taken from the baseline result (see ``load_baseline``); ``notes``, if
    given, receives ``percentile_notes`` about them."""
    values = load_baseline(baseline, model_checksum=model_checksum, mode=mode).values
    resolved = resolve(rules, values, of="baseline")
    if notes is not None:
        notes += percentile_notes(resolved, values)
    return resolved


def percentile_notes(rules: list[FlagRule], values: dict[str, Any]) -> list[str]:
    """What a user should know about percentiles taken from too few rows: ``--flag-above X=p99`` of fewer than
    100 scores is their maximum (the run's own rows then never exceed it), ``--flag-below X=p1`` of at most
    100 their minimum. ``rules``: resolved; ``values``: the scores they were taken from."""
    import numpy as np

    notes = []
    for r in rules:
        if not r.relative or r.metric not in values:
            continue
        v = np.asarray(values[r.metric], dtype=np.float64)
        n = int((~np.isnan(v)).sum())
        p = r.percentile
        if n == 0:
            notes.append(f"{r}: the {r.of} has no scored rows, so the rule flags nothing")
            continue
        rank = max(math.ceil(p * n / 100), 1)
        if r.op == "above" and rank == n and p < 100:
            need = math.ceil(Fraction(100) / (100 - p))
            effect = "no row of the run is above it" if r.of == "run" else "only rows above all of them are flagged"
            notes.append(f"{r}: p{_pct(p)} of {n} rows is their maximum (it takes at least {need} rows to be "
                         f"anything else), so {effect}")
        elif r.op == "below" and rank == 1 and p > 0:
            need = math.floor(Fraction(100) / p) + 1
            effect = "no row of the run is below it" if r.of == "run" else "only rows below all of them are flagged"
            notes.append(f"{r}: p{_pct(p)} of {n} rows is their minimum (it takes at least {need} rows to be "
                         f"anything else), so {effect}")
    return notes


class RunQuantiles:
    """The second pass for rules relative to the run itself: ``fit`` takes the percentiles from the
    committed sentence parts, ``apply`` recomputes the flag columns of a sentences table with every rule."""

    def __init__(self, rules: list[FlagRule], notes: list[str] | None = None):
        self.rules = rules  # every percentile taken
        self.notes = notes or []  # percentile_notes: percentiles of too few rows
        self.flagged = 0  # rows flagged by ``apply`` so far

    @classmethod
    def fit(cls, rules: list[FlagRule], parts: list[str | os.PathLike]) -> RunQuantiles | None:
        """None when no rule needs the run's percentiles; reads only the score columns of ``parts``."""
        import pyarrow.parquet as pq

        if not any(r.pending for r in rules):
            return None
        need = SCORE_COLUMNS + sorted({EXTRA_COLUMNS[r.metric] for r in rules if r.metric in EXTRA_COLUMNS})
        return cls.from_tables(rules, (pq.read_table(p, columns=need) for p in parts))

    @classmethod
    def from_tables(cls, rules: list[FlagRule], tables) -> RunQuantiles | None:
        """As ``fit``, from sentence tables in memory (``score_frame``)."""
        import numpy as np

        pending = sorted({r.metric for r in rules if r.pending})
        if not pending:
            return None
        chunks: dict[str, list] = {m: [] for m in pending}
        for t in tables:
            ok = scored_mask(t)
            for m in pending:
                chunks[m].append(metric_array(t, m)[ok])
        values = {m: np.concatenate(c) if c else np.empty(0) for m, c in chunks.items()}
        taken = [replace(r, value=quantile(values[r.metric], r.percentile)) if r.pending else r for r in rules]
        return cls(taken, percentile_notes([t for r, t in zip(rules, taken) if r.pending], values))

    @property
    def rule_strings(self) -> list[str]:
        return [str(r) for r in self.rules]

    def apply(self, table):
        """``table`` (a sentences table with flag columns) with ``flag`` and ``flag_reason`` recomputed."""
        import numpy as np
        import pyarrow as pa

        ok = scored_mask(table)
        metrics = {m: metric_array(table, m) for m in {r.metric for r in self.rules}}
        hits = [r.fires_on(metrics[r.metric]) & ok for r in self.rules]  # per rule: the rows where it fires
        anyf = np.logical_or.reduce(hits) if hits else np.zeros(table.num_rows, bool)
        reasons: list[str | None] = [None] * table.num_rows
        for i in np.flatnonzero(anyf):
            reasons[i] = "; ".join(r.reason(metrics[r.metric][i]) for r, hit in zip(self.rules, hits) if hit[i])
        self.flagged += int(anyf.sum())
        for name, arr in (("flag", pa.array(anyf, pa.bool_(), mask=~ok)), ("flag_reason", pa.array(reasons, pa.string()))):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), arr)
        return table

    def rewrite(self, paths: list[str | os.PathLike], metadata: dict[str, Any] | None = None) -> None:
        """Apply to Parquet files in place (each written to a temporary name, then renamed), updating the
        ``mlm_scorer`` metadata with ``metadata``. For outputs not yet published (the Ray runner's)."""
        import json

        import pyarrow.parquet as pq

        for p in map(Path, paths):
            t = self.apply(pq.read_table(p))
            if metadata:
                meta = dict(t.schema.metadata or {})
                old = json.loads(meta.get(b"mlm_scorer", b"{}"))
                meta[b"mlm_scorer"] = json.dumps({**old, **metadata}, sort_keys=True).encode()
                t = t.replace_schema_metadata(meta)
            atomic_write_parquet(t, p)


def atomic_write_parquet(table, path: str | os.PathLike, what: str = "a result file") -> None:
    """Write ``table`` to ``path`` under the run's own temporary name (created exclusively), then rename it
    into place (``fsutil.replace_file``: ``path`` must be absent or a regular file)."""
    import pyarrow.parquet as pq

    from .fsutil import create_exclusive, default_file_mode, identity, replace_file, safe_unlink, temp_path

    tmp = temp_path(path)
    fd = create_exclusive(tmp, default_file_mode())
    made = identity(os.fstat(fd))
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path, what)
    except BaseException:
        safe_unlink(tmp, identity_of=made)
        raise


# ------------------------------------------------------------------------------------------ statistics
def ks_2samp(a, b) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (D, asymptotic p-value). D = max over x of |F_a(x) - F_b(x)|
    (ties handled: F counts values <= x). NaN, NaN when a sample is empty."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = np.sort(a[~np.isnan(a)]), np.sort(b[~np.isnan(b)])  # impossible (NaN) scores are counted apart
    if not a.size or not b.size:
        return float("nan"), float("nan")
    x = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, x, side="right") / a.size
                            - np.searchsorted(b, x, side="right") / b.size)))
    ne = a.size * b.size / (a.size + b.size)
    return d, kolmogorov_q((math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d)


def kolmogorov_q(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: the asymptotic KS p-value (Stephens' small-sample
    correction is applied by the caller). Two series, each fast where it is used."""
    if lam <= 0:
        return 1.0
    if lam < 1.18:  # 1 - sqrt(2 pi)/lam * sum exp(-(2j-1)^2 pi^2 / (8 lam^2))
        y = math.exp(-math.pi ** 2 / (8 * lam * lam))
        s = sum(y ** ((2 * j - 1) ** 2) for j in range(1, 8))
        return min(1.0, max(0.0, 1 - math.sqrt(2 * math.pi) / lam * s))
    x = math.exp(-2 * lam * lam)  # 2 sum (-1)^(j-1) exp(-2 j^2 lam^2)
    return min(1.0, max(0.0, 2 * sum((-1) ** (j - 1) * x ** (j * j) for j in range(1, 8))))


def psi(baseline, current, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``baseline`` over the baseline's ``bins``
    quantile bins (deciles): sum (a - e) ln(a / e) over bins, with e and a the baseline's and the
    current batch's shares. Half a row is added to every bin of both, so an empty bin stays finite.
    0 for identical distributions; by convention < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a
    major one."""
    import numpy as np

    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    b, c = b[~np.isnan(b)], c[~np.isnan(c)]
    if not b.size or not c.size:
        return float("nan")
    edges = np.unique(quantiles(b, [Fraction(100 * k, bins) for k in range(1, bins)]))
    k = edges.size + 1
    e = (np.bincount(np.searchsorted(edges, b, side="left"), minlength=k) + 0.5) / (b.size + 0.5 * k)
    a = (np.bincount(np.searchsorted(edges, c, side="left"), minlength=k) + 0.5) / (c.size + 0.5 * k)
    return float(np.sum((a - e) * np.log(a / e)))


def _finite(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def compare(current: Scores, baseline: Scores) -> dict[str, dict[str, Any]]:
    """Per metric in COMPARED: KS D and p-value, PSI, percentiles of both, and the share of the current
    rows beyond the baseline's p99 (p1 for metrics that get worse downwards). JSON-ready (NaN -> None)."""
    shown = ("p1", "p50", "p99")
    out = {}
    for m in COMPARED:
        b, c = baseline.values[m], current.values[m]
        d, p = ks_2samp(c, b)
        tail = Fraction(99) if METRICS[m] == "above" else Fraction(1)
        thr, *b_pcts = quantiles(b, [tail] + [Fraction(q[1:]) for q in shown])
        c_pcts = quantiles(c, [Fraction(q[1:]) for q in shown])
        rule = FlagRule(m, METRICS[m], thr, percentile=tail, of="baseline")
        beyond_c, beyond_b = rule.fires_on(c), rule.fires_on(b)
        out[m] = {
            "direction": METRICS[m], "ks": _finite(d), "ks_pvalue": _finite(p), "psi": _finite(psi(b, c)),
            "tail": f"p{_pct(tail)}", "baseline_threshold": _finite(thr),
            "rows_beyond": int(beyond_c.sum()), "share_beyond": float(beyond_c.mean()) if c.size else None,
            "baseline_share_beyond": float(beyond_b.mean()) if b.size else None,
            "baseline_percentiles": {q: _finite(x) for q, x in zip(shown, b_pcts)},
            "current_percentiles": {q: _finite(x) for q, x in zip(shown, c_pcts)},
        }
    return out
