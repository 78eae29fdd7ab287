"""--flag-below / --flag-above: data-quality flags written as columns."""
from __future__ import annotations

import math

from helpers import read_outputs, write_tsv

from mlm_scorer.cli import main


def test_flags_follow_the_thresholds(tmp_path, fake_export, capsys):
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nThe cat sat on the mat.\nA dog ran.\nthe the the of of\n\n", encoding="utf-8")
    out = tmp_path / "o.parquet"
    base = [str(tsv), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--on-bad-row", "skip", "-q"]
    assert main(base) == 0
    _, plain = read_outputs(out)
    ok = [s for s in plain if s["status"] == "ok"]
    # thresholds between the observed values, so each rule fires for some rows and not others
    min_p = sorted(math.exp(s["min_word_log_prob"]) for s in ok)
    pppl = sorted(s["pseudo_perplexity"] for s in ok)
    t_p, t_ppl = (min_p[0] + min_p[1]) / 2, (pppl[-1] + pppl[-2]) / 2
    code = main(base[:-1] + ["--flag-below", f"min_word_prob={t_p!r}", "--flag-above", f"pseudo_perplexity={t_ppl!r}"])
    err = capsys.readouterr().err
    assert code == 0, err
    _, sents = read_outputs(out)
    n_flagged = 0
    for s in sents:
        if s["status"] != "ok":
            assert s["flag"] is None and s["flag_reason"] is None
            continue
        low = math.exp(s["min_word_log_prob"]) < t_p
        high = s["pseudo_perplexity"] > t_ppl
        assert s["flag"] == (low or high)
        assert (s["flag_reason"] is not None) == s["flag"]
        if low:
            assert "min_word_prob" in s["flag_reason"]
        if high:
            assert "pseudo_perplexity" in s["flag_reason"]
        n_flagged += s["flag"]
    assert 1 <= n_flagged <= 2
    assert f"flagged {n_flagged}" in err


def test_flag_rules_are_validated(tmp_path, fake_export, capsys):
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nhello\n")
    for args, msg in [(["--flag-below", "pseudo_perplexity=10"], "use --flag-above pseudo_perplexity=10"),
                      (["--flag-below", "nonsense=1"], "unknown metric 'nonsense'"),
                      (["--flag-above", "pseudo_perplexity=abc"], "'abc' is not a number"),
                      (["--flag-below", "min_word_prob"], "expects METRIC=VALUE")]:
        code = main([str(tsv), "-o", str(tmp_path / "o.parquet"), "--model", str(fake_export), "--engine", "fake",
                     "-q", *args])
        assert code == 2 and msg in capsys.readouterr().err


# ---------------------------------------------------------------------------- percentile thresholds
def _pq_meta(path) -> dict:
    import json

    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"mlm_scorer"])


def test_run_percentile_flags_the_corrupted_rows(antibody_batches, tmp_path, capsys):
    """Real weights: 3 of the 12 rows are corrupted domains; p75 of the run itself flags exactly those."""
    from fractions import Fraction

    from mlm_scorer.quality import quantile
    from mlm_scorer.writer import sentences_path

    ab = antibody_batches
    _, plain = read_outputs(ab.current)
    out = tmp_path / "o.parquet"
    code = main([str(ab.current_tsv), "-o", str(out), "--model", str(ab.model), "--id-column", "id",
                 "--cache", str(ab.cache), "--flag-above", "pseudo_perplexity=p75"])
    err = capsys.readouterr().err
    assert code == 0, err
    _, sents = read_outputs(out)
    assert [s["pll"] for s in sents] == [s["pll"] for s in plain]  # the same scores (from the cache)
    assert {s["id"] for s in sents if s["flag"]} == ab.corrupted
    # the threshold is the nearest-rank p75 of the run's own pseudo-perplexities, recorded as such
    thr = quantile([s["pseudo_perplexity"] for s in plain], Fraction(75))
    assert sorted(s["pseudo_perplexity"] for s in plain)[8] == thr  # ceil(0.75 * 12) = 9th smallest
    for s in sents:
        assert (s["flag_reason"] is not None) == s["flag"]
        if s["flag"]:
            assert s["flag_reason"] == f"pseudo_perplexity {s['pseudo_perplexity']:.4g} > {thr:.4g} (p75 of the run)"
    rules = [f"--flag-above pseudo_perplexity=p75 (of the run: {thr:.6g})"]
    assert _pq_meta(out)["flag_rules"] == rules == _pq_meta(sentences_path(out))["flag_rules"]
    assert "flagged 3" in err


def test_baseline_percentile_flags_the_corrupted_rows(antibody_batches, tmp_path, capsys):
    """--baseline: p99 of 20 natural domains (nearest rank: their maximum) flags the corrupted rows, and a
    natural row only where it is less likely than every baseline domain."""
    ab = antibody_batches
    _, base = read_outputs(ab.baseline)
    _, plain = read_outputs(ab.current)
    out = tmp_path / "o.parquet"
    args = [str(ab.current_tsv), "-o", str(out), "--model", str(ab.model), "--id-column", "id", "--cache",
            str(ab.cache), "--flag-above", "pseudo_perplexity=p99", "--baseline", str(ab.baseline), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    _, sents = read_outputs(out)
    top = max(s["pseudo_perplexity"] for s in base)
    expected = {s["id"] for s in plain if s["pseudo_perplexity"] > top}
    assert {s["id"] for s in sents if s["flag"]} == expected
    assert ab.corrupted <= expected and len(expected - ab.corrupted) <= 1, (expected, top)
    meta = _pq_meta(out)
    assert meta["baseline"] == str(ab.baseline)
    assert meta["flag_rules"] == [f"--flag-above pseudo_perplexity=p99 (of the baseline: {top:.6g})"]

    # a baseline of another mode is refused (before anything is scored); so is --baseline without a percentile rule
    token = tmp_path / "token.parquet"
    assert main([str(write_tsv(tmp_path / "t.tsv", [["a", "E V Q L V E S G G G"]])), "-o", str(token), "--model",
                 str(ab.model), "--id-column", "id", "--mode", "token", "-q"]) == 0
    assert main(args[:-1] + ["--baseline", str(token), "-o", str(tmp_path / "x.parquet")]) == 2
    assert "mode token vs whole-word" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()
    assert main(args[:args.index("--flag-above")] + ["--baseline", str(ab.baseline)]) == 2
    assert "no rule has one" in capsys.readouterr().err
    assert main(args[:-1] + ["--baseline", str(tmp_path / "nope.parquet"), "-o", str(tmp_path / "y.parquet")]) == 2
    err = capsys.readouterr().err
    assert "baseline: result" in err and "does not exist" in err


def test_run_percentiles_survive_an_interrupted_run_and_resume(tmp_path, fake_export, capsys):
    """The second pass reads every committed part: resumed after a failure, the flags equal an undisturbed
    run's, and each threshold is the percentile of all rows (not of the part scored last)."""
    import random
    from fractions import Fraction

    from mlm_scorer.quality import quantile

    rng = random.Random(5)
    words = "the cat sat on a mat dog ran big small house read book people walk good bad new old".split()
    lines = ["id\ttext"] + [f"r{i}\t" + " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
                            for i in range(300)]
    lines.insert(250, "bad\tx\ty")  # data row 249: fail mode stops in the 5th chunk, 4 chunks of 50 committed
    tsv = tmp_path / "in.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rules = ["--flag-above", "pseudo_perplexity=p90", "--flag-below", "min_word_prob=p5"]

    def run(out, *extra):
        return main([str(tsv), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--id-column", "id",
                     "--chunk-rows", "50", "-q", *rules, *extra])

    out = tmp_path / "out.parquet"
    assert run(out, "--on-bad-row", "fail") == 3
    assert "rerun with --resume" in capsys.readouterr().err and not out.exists()
    assert run(out, "--on-bad-row", "skip", "--resume", "--summary-json", str(tmp_path / "s.json")) == 0
    ref = tmp_path / "ref.parquet"
    assert run(ref, "--on-bad-row", "skip") == 0
    _, sents = read_outputs(out)
    assert sents == read_outputs(ref)[1]
    ok = [s for s in sents if s["status"] == "ok"]
    p90 = quantile([s["pseudo_perplexity"] for s in ok], Fraction(90))
    p5 = quantile([math.exp(s["min_word_log_prob"]) for s in ok], Fraction(5))
    for s in sents:
        if s["status"] != "ok":
            assert s["flag"] is None
            continue
        assert s["flag"] == (s["pseudo_perplexity"] > p90 or math.exp(s["min_word_log_prob"]) < p5)
    n_flagged = sum(bool(s["flag"]) for s in sents)
    assert 0 < n_flagged <= 0.15 * len(ok)
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["flagged"] == n_flagged and summary["resumed_rows"] == 200
    assert summary["flag_rules"] == [f"--flag-below min_word_prob=p5 (of the run: {p5:.6g})",
                                     f"--flag-above pseudo_perplexity=p90 (of the run: {p90:.6g})"]


def test_a_percentile_of_too_few_rows_is_said_in_the_runs_output(tmp_path, fake_export, capsys):
    """p99 of fewer than 100 rows is their maximum, p1 of at most 100 their minimum: the run says so (a
    warning, and the summary's warnings), for the run's own rows and for a baseline's."""
    import json

    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\n" + "".join(f"sentence {i} of the cat\n" for i in range(40)), encoding="utf-8")
    out, js = tmp_path / "o.parquet", tmp_path / "s.json"
    base = [str(tsv), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--summary-json", str(js)]
    assert main(base + ["--flag-above", "pseudo_perplexity=p99", "--flag-below", "min_word_prob=p1"]) == 0
    err = capsys.readouterr().err
    above = "p99 of 40 rows is their maximum (it takes at least 100 rows to be anything else), so no row of the " \
            "run is above it"
    below = "p1 of 40 rows is their minimum (it takes at least 101 rows to be anything else)"
    assert above in err and below in err, err
    warnings = json.loads(js.read_text())["warnings"]
    assert any(above in w for w in warnings) and any(below in w for w in warnings)
    _, sents = read_outputs(out)
    assert not any(s["flag"] for s in sents)
    # a baseline of 40 rows: said before the run, for its percentiles
    ref = tmp_path / "ref.parquet"
    assert main([str(tsv), "-o", str(ref), "--model", str(fake_export), "--engine", "fake", "-q"]) == 0
    assert main(base + ["--flag-above", "pseudo_perplexity=p99", "--baseline", str(ref)]) == 0
    err = capsys.readouterr().err
    assert "(of the baseline: " in err and "p99 of 40 rows is their maximum" in err and \
        "only rows above all of them are flagged" in err, err
    # 100 rows are enough for p99
    tsv.write_text("text\n" + "".join(f"sentence {i} of the cat\n" for i in range(100)), encoding="utf-8")
    assert main(base + ["--flag-above", "pseudo_perplexity=p99"]) == 0
    assert "is their maximum" not in capsys.readouterr().err and json.loads(js.read_text())["warnings"] == []
