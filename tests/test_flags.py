"""--flag-below / --flag-above: data-quality flags written as columns."""
from __future__ import annotations

import math

from helpers import read_outputs

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
