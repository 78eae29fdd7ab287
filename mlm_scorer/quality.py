"""Data-quality flags: thresholds on sentence scores, written as the ``flag`` / ``flag_reason`` columns.

Rules are ``METRIC=VALUE`` with a direction: ``--flag-below min_word_prob=0.001`` flags a sentence
whose least likely word has probability under 0.001; ``--flag-above pseudo_perplexity=500`` flags a
sentence whose pseudo-perplexity exceeds 500. A sentence is flagged when any rule fires; skipped rows
get a null flag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError

# metric -> the direction in which it gets worse (for the hint when a rule points the other way)
METRICS = {
    "pseudo_perplexity": "above",
    "min_word_prob": "below",
    "min_word_log_prob": "below",
    "mean_word_log_prob": "below",
    "pll": "below",
}


@dataclass(frozen=True)
class FlagRule:
    metric: str
    op: str  # "below" | "above"
    value: float

    def check(self, metrics: dict[str, float]) -> str | None:
        """The reason text if the rule fires, else None."""
        x = metrics[self.metric]
        if self.op == "below" and x < self.value:
            return f"{self.metric} {x:.4g} < {self.value:g}"
        if self.op == "above" and x > self.value:
            return f"{self.metric} {x:.4g} > {self.value:g}"
        return None

    def __str__(self) -> str:
        return f"--flag-{self.op} {self.metric}={self.value:g}"


def parse_rule(spec: str, op: str) -> FlagRule:
    if "=" not in spec:
        raise UsageError(f"--flag-{op} expects METRIC=VALUE (metrics: {', '.join(METRICS)}), got {spec!r}")
    metric, value = (x.strip() for x in spec.split("=", 1))
    metric = metric.replace("-", "_")
    if metric not in METRICS:
        raise UsageError(f"--flag-{op}: unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    try:
        v = float(value)
    except ValueError:
        raise UsageError(f"--flag-{op} {metric}: {value!r} is not a number") from None
    if METRICS[metric] != op:
        raise UsageError(f"{metric} gets worse {METRICS[metric]} a threshold: use "
                         f"--flag-{METRICS[metric]} {metric}={value}")
    if math.isnan(v):
        raise UsageError(f"--flag-{op} {metric}: the threshold is NaN")
    return FlagRule(metric, op, v)


def sentence_metrics(pll: float, n_words: int, min_word_log_prob: float) -> dict[str, float]:
    return {
        "pseudo_perplexity": math.exp(-pll / n_words),
        "min_word_prob": math.exp(min_word_log_prob),
        "min_word_log_prob": min_word_log_prob,
        "mean_word_log_prob": pll / n_words,
        "pll": pll,
    }


def evaluate(rules: list[FlagRule], pll: float, n_words: int, min_word_log_prob: float) -> tuple[bool, str | None]:
    m = sentence_metrics(pll, n_words, min_word_log_prob)
    reasons = [r for r in (rule.check(m) for rule in rules) if r]
    return bool(reasons), "; ".join(reasons) or None
