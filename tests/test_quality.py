"""quality.py: percentiles, flag rules, and the shift statistics, against definitions written out here."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from mlm_scorer.errors import UsageError
from mlm_scorer.quality import FlagRule, kolmogorov_q, ks_2samp, parse_rule, psi, quantile


def _nearest_rank(values, pct) -> float:
    """The definition: the smallest value v with at least pct % of the values <= v."""
    for v in sorted(values):
        if 100 * sum(x <= v for x in values) >= pct * len(values):
            return v
    raise AssertionError


def test_quantile_is_the_nearest_rank_and_bounds_the_tail():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 60)
        values = [round(rng.gauss(0, 1), 1) for _ in range(n)]  # rounded: ties happen
        for pct in (Fraction(0), Fraction(1), Fraction(5), Fraction(50), Fraction(99), Fraction("99.9"),
                    Fraction(100), Fraction(rng.randint(0, 1000), 10)):
            q = quantile(values, pct)
            assert q == _nearest_rank(values, pct), (values, pct)
            # what a flag rule relies on: at most (100 - pct) % of the values lie above it, pct % below
            assert 100 * sum(x > q for x in values) <= (100 - pct) * n
            assert 100 * sum(x < q for x in values) < max(pct * n, 1e-9) or sum(x < q for x in values) == 0
    assert math.isnan(quantile([], 99))
    # exact arithmetic: 7 % of 100 values is the 7th, not the 8th (7/100*100 is 7.000000000000001 in floats)
    assert quantile(list(range(1, 101)), Fraction(7)) == 7


def _ks_by_definition(a, b) -> float:
    return max(abs(sum(x <= t for x in a) / len(a) - sum(x <= t for x in b) / len(b)) for t in list(a) + list(b))


def test_ks_statistic_matches_its_definition_with_ties():
    rng = random.Random(1)
    for _ in range(100):
        a = [rng.randint(0, 9) for _ in range(rng.randint(1, 30))]
        b = [rng.randint(0, 12) for _ in range(rng.randint(1, 30))]
        d, p = ks_2samp(a, b)
        assert d == pytest.approx(_ks_by_definition(a, b), abs=1e-12)
        assert 0 <= p <= 1
    assert ks_2samp([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    assert ks_2samp([1, 2, 3], [10, 11])[0] == 1.0
    assert all(math.isnan(x) for x in ks_2samp([], [1.0]))


def test_kolmogorov_distribution_tail():
    # the classical critical values of the Kolmogorov distribution: P(K > 1.358) = 0.05, 1.628: 0.01, 1.949: 0.001
    assert kolmogorov_q(1.3581) == pytest.approx(0.05, abs=2e-4)
    assert kolmogorov_q(1.6276) == pytest.approx(0.01, abs=1e-4)
    assert kolmogorov_q(1.9495) == pytest.approx(0.001, abs=2e-5)
    assert kolmogorov_q(0.0) == 1.0 and kolmogorov_q(0.3) == pytest.approx(1.0, abs=1e-5)
    # the two series agree where they meet
    assert kolmogorov_q(1.18 - 1e-12) == pytest.approx(kolmogorov_q(1.18 + 1e-12), abs=1e-10)
    xs = np.linspace(0.05, 3, 200)
    assert np.all(np.diff([kolmogorov_q(x) for x in xs]) <= 1e-12)  # a tail probability: non-increasing


def test_ks_pvalue_is_calibrated_under_the_null():
    """Two samples of one distribution: p < 0.05 about 5 % of the time (the gate's alpha relies on it)."""
    rng = np.random.default_rng(2)
    hits = sum(ks_2samp(rng.normal(size=120), rng.normal(size=80))[1] < 0.05 for _ in range(400))
    assert 6 <= hits <= 34, hits  # 5 % of 400 = 20; binomial sd 4.4


def test_psi():
    rng = np.random.default_rng(3)
    base = rng.normal(size=2000)
    assert psi(base, base) == 0.0
    assert psi(base, rng.normal(size=2000)) < 0.02  # another sample of the same distribution
    assert psi(base, rng.normal(loc=1.0, size=2000)) > 0.25  # a shift of one standard deviation: major
    # by hand: baseline deciles of 0..99 are 9, 19, ..., 89 (bins of 10); a batch all in the top bin
    b = list(range(100))
    e = (10 + 0.5) / (100 + 5)
    a_top, a_other = (20 + 0.5) / (20 + 5), 0.5 / (20 + 5)
    expected = 9 * (a_other - e) * math.log(a_other / e) + (a_top - e) * math.log(a_top / e)
    assert psi(b, [95] * 20) == pytest.approx(expected, rel=1e-12)


def test_rules_parse_percentiles_and_say_what_they_are():
    r = parse_rule("pseudo_perplexity=p99", "above")
    assert (r.metric, r.op, r.value, r.percentile, r.pending) == ("pseudo_perplexity", "above", None, 99, True)
    assert str(r) == "--flag-above pseudo_perplexity=p99"
    assert parse_rule("min-word-prob=P0.5", "below").percentile == Fraction(1, 2)
    assert str(FlagRule("min_word_prob", "below", 0.00123, Fraction(1), "baseline")) == \
        "--flag-below min_word_prob=p1 (of the baseline: 0.00123)"
    assert FlagRule("pseudo_perplexity", "above", 2.5, Fraction(99), "run").reason(3.25) == \
        "pseudo_perplexity 3.25 > 2.5 (p99 of the run)"
    assert str(parse_rule("pseudo_perplexity=500", "above")) == "--flag-above pseudo_perplexity=500"  # unchanged
    assert not r.fires(1e9)  # a percentile not taken yet never fires
    for spec, op, msg in [("pseudo_perplexity=p101", "above", "not a percentile"),
                          ("pseudo_perplexity=p-1", "above", "not a percentile"),
                          ("pseudo_perplexity=pxx", "above", "not a percentile"),
                          ("pseudo_perplexity=p1e2", "above", "not a percentile"),
                          ("pseudo_perplexity=p1", "below", "use --flag-above pseudo_perplexity=p1"),
                          ("min_word_prob=low", "below", "or a percentile such as p99")]:
        with pytest.raises(UsageError, match=msg):
            parse_rule(spec, op)
