"""mlm-score check: the quality gate. With real weights (AntiBERTy): a baseline of natural antibody domains
passes against itself, a batch in which 3 of 12 domains are corrupted fails; the statistics are checked
against their definitions computed here from the Parquet rows."""
from __future__ import annotations

import json
import math

from helpers import read_outputs

from mlm_scorer.cli import main


def _ks(a, b) -> float:
    return max(abs(sum(x <= t for x in a) / len(a) - sum(x <= t for x in b) / len(b)) for t in list(a) + list(b))


def _scores(path):
    _, sents = read_outputs(path)
    ok = [s for s in sents if s["status"] == "ok"]
    return ok, [s["pseudo_perplexity"] for s in ok], [math.exp(s["min_word_log_prob"]) for s in ok]


def test_the_baseline_passes_against_itself(antibody_batches, tmp_path, capsys):
    ab = antibody_batches
    js = tmp_path / "check.json"
    code = main(["check", str(ab.baseline), "--baseline", str(ab.baseline), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0, out
    r = json.loads(js.read_text())
    assert r["passed"] and r["failures"] == [] and out.splitlines()[-1].startswith("PASS: ")
    assert (r["result"]["rows"], r["result"]["scored"], r["baseline"]["scored"]) == (20, 20, 20)
    # nearest-rank tails: no row of a batch lies beyond its own p99 / p1
    assert r["flagged"] == 0 and r["flagged_rate"] == 0.0
    for m, st in r["metrics"].items():
        assert (st["ks"], st["ks_pvalue"], st["psi"], st["share_beyond"]) == (0.0, 1.0, 0.0, 0.0), m
    assert [c["name"] for c in r["criteria"]] == ["scored", "impossible", "skipped_rate", "flagged_rate",
                                                  "shift:pseudo_perplexity", "shift:min_word_prob"]


def test_a_batch_with_corrupted_rows_fails(antibody_batches, tmp_path, capsys):
    ab = antibody_batches
    base, b_ppl, b_minp = _scores(ab.baseline)
    cur, c_ppl, c_minp = _scores(ab.current)
    js = tmp_path / "check.json"
    code = main(["check", str(ab.current), "--baseline", str(ab.baseline), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 1, out
    r = json.loads(js.read_text())
    assert not r["passed"]
    # flagged by default: less likely than every baseline domain overall (p99 of 20 rows is their maximum),
    # or a residue less likely than any in the baseline (p1: their minimum)
    beyond = {s["id"] for s, p, q in zip(cur, c_ppl, c_minp) if p > max(b_ppl) or q < min(b_minp)}
    assert ab.corrupted <= beyond and r["flagged"] == len(beyond) == 4
    # the fourth: evolocumab's light chain, the only lambda chain here (the baseline's light chains are
    # all kappa); its first residue is less likely than any residue of the baseline
    assert beyond - ab.corrupted == {"evolocumab-VL"}
    assert r["flagged_rate"] == 4 / 12
    assert [c["name"] for c in r["criteria"] if not c["passed"]] == ["flagged_rate"]
    assert r["failures"] == ["flagged 4 of 12 scored rows (33.3 %) > 5.0 % (--max-flagged-rate)"]
    assert out.splitlines()[-1] == f"FAIL: {ab.current} fails 1 of 6 criteria: " + r["failures"][0]
    st = r["metrics"]["pseudo_perplexity"]
    assert st["ks"] == _ks(c_ppl, b_ppl) and st["rows_beyond"] == 3 and st["share_beyond"] == 0.25
    assert st["baseline_threshold"] == max(b_ppl) and st["baseline_share_beyond"] == 0.0
    assert r["metrics"]["min_word_prob"]["ks"] == _ks(c_minp, b_minp)
    assert st["psi"] > 0.25  # a major shift by the usual reading of PSI
    # the shift itself is large, but 12 rows against 20 cannot show it at the default alpha: the flagged
    # rate is what fails this batch. Counting every D above the limit (--shift-alpha 1), the shift fails too.
    assert st["ks"] > 0.1 and st["ks_pvalue"] > 0.001
    code = main(["check", str(ab.current), "--baseline", str(ab.baseline), "--shift-alpha", "1",
                 "--max-flagged-rate", "0.5", "--json", str(js)])
    r = json.loads(js.read_text())
    assert code == 1 and "shift:pseudo_perplexity" in [c["name"] for c in r["criteria"] if not c["passed"]]
    assert "flagged_rate" not in [c["name"] for c in r["criteria"] if not c["passed"]]
    capsys.readouterr()
    # a looser gate passes the same batch; -q prints the verdict only
    code = main(["check", str(ab.current), "--baseline", str(ab.baseline), "--max-flagged-rate", "0.4", "-q"])
    assert code == 0 and capsys.readouterr().out.strip() == f"PASS: {ab.current} meets all 6 criteria"
    # the rules can be given: the corrupted rows are the ones above the baseline's p99 pseudo-perplexity
    code = main(["check", str(ab.current), "--baseline", str(ab.baseline), "--flag-above", "pseudo_perplexity=p99",
                 "--max-flagged-rate", "0.2", "--json", str(js)])
    r = json.loads(js.read_text())
    assert code == 1 and r["flagged"] == 3 and r["flagged_by"] == [
        f"--flag-above pseudo_perplexity=p99 (of the baseline: {max(b_ppl):.6g})"]


def test_without_a_baseline_the_results_own_flags_count(tmp_path, fake_export, capsys):
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\n" + "".join(f"sentence number {i} of the cat\n" for i in range(40)) + "\n",
                   encoding="utf-8")
    out = tmp_path / "o.parquet"
    base = [str(tsv), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--on-bad-row", "skip", "-q"]
    assert main(base) == 0
    js = tmp_path / "c.json"
    # no flag column and no baseline: only the scored and skipped criteria apply (one empty row skipped)
    assert main(["check", str(out), "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["flagged"] is None and [c["name"] for c in r["criteria"]] == ["scored", "impossible", "skipped_rate"]
    assert r["skipped_rate"] == 1 / 41
    assert main(["check", str(out), "--max-skipped-rate", "0.01", "-q"]) == 1
    assert "skipped 1 of 41 rows (2.4 %) > 1.0 % (--max-skipped-rate)" in capsys.readouterr().out
    # scored with a rule: its flag column is what counts
    assert main(base + ["--flag-above", "pseudo_perplexity=p80"]) == 0
    _, sents = read_outputs(out)
    n = sum(bool(s["flag"]) for s in sents)
    assert 0 < n <= 8
    assert main(["check", str(out), "--json", str(js), "--max-flagged-rate", "0.01"]) == 1
    r = json.loads(js.read_text())
    assert r["flagged"] == n and "p80 (of the run:" in r["flagged_by"][0]
    assert main(["check", str(out), "--max-flagged-rate", "0.25", "-q"]) == 0


def test_check_usage_errors_exit_2(antibody_batches, tmp_path, fake_export, capsys):
    ab = antibody_batches
    assert main(["check", str(tmp_path / "missing.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["check", str(ab.current), "--baseline", str(tmp_path / "missing.parquet")]) == 2
    assert "baseline: result" in capsys.readouterr().err
    assert main(["check", str(ab.current), "--max-flagged-rate", "2"]) == 2
    assert "max_flagged_rate must be between 0 and 1" in capsys.readouterr().err
    # a baseline scored by another model is not comparable
    other = tmp_path / "fake.parquet"
    assert main([str(ab.baseline_tsv), "-o", str(other), "--model", str(fake_export), "--engine", "fake",
                 "--id-column", "id", "-q"]) == 0
    assert main(["check", str(ab.current), "--baseline", str(other)]) == 2
    err = capsys.readouterr().err
    assert "scored differently (model checksum fake" in err and "same --model and --mode" in err


def _with_impossible_rows(src, dst, rows: dict[int, float]):
    """A copy of the result ``src`` (both files) in which the sentence rows ``rows`` (index -> a PLL: NaN, +3,
    -inf) hold impossible scores, as a damaged file or another writer would leave them, still marked ok."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlm_scorer.writer import sentences_path

    shutil.copyfile(src, dst)
    t = pq.read_table(sentences_path(src))
    pll = t.column("pll").to_pylist()
    ppl = t.column("pseudo_perplexity").to_pylist()
    for i, v in rows.items():
        pll[i] = v
        ppl[i] = float("nan") if v != v else math.exp(-v / 3) if math.isfinite(v) else math.inf
    t = t.set_column(t.schema.get_field_index("pll"), "pll", pa.array(pll, pa.float64()))
    t = t.set_column(t.schema.get_field_index("pseudo_perplexity"), "pseudo_perplexity", pa.array(ppl, pa.float64()))
    pq.write_table(t, sentences_path(dst))
    return dst


def test_impossible_scores_fail_the_gate_and_lead_the_report(tmp_path, fake_export, capsys):
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\n" + "".join(f"sentence number {i} of the cat that sat\n" for i in range(300)),
                   encoding="utf-8")
    base = tmp_path / "base.parquet"
    assert main([str(tsv), "-o", str(base), "--model", str(fake_export), "--engine", "fake", "-q"]) == 0
    bad = {i: float("nan") for i in range(0, 270, 10)} | {5: 3.0, 7: -math.inf}
    cur = _with_impossible_rows(base, tmp_path / "cur.parquet", bad)
    js = tmp_path / "c.json"
    code = main(["check", str(cur), "--baseline", str(base), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 1, out
    r = json.loads(js.read_text())
    assert r["impossible"] == len(bad) == 29
    assert [c["name"] for c in r["criteria"] if not c["passed"]] == ["impossible"]
    assert r["failures"][0].startswith("29 scored row(s) with impossible scores (NaN, or a log-prob that is infinite "
                                       "or above 0) (line 2, 7, 9, 12,")
    # the statistics are those of the possible rows: the rest of the batch equals the baseline
    assert r["metrics"]["pseudo_perplexity"]["ks"] < 0.05
    assert main(["check", str(cur), "--baseline", str(base), "--max-impossible", "29", "-q"]) == 0
    assert main(["check", str(cur), "-q"]) == 1  # without a baseline too
    capsys.readouterr()
    html = tmp_path / "r.html"
    assert main(["report", str(cur), "-o", str(html), "--lowest", "40"]) == 0
    page = html.read_text()
    assert 'data-count="impossible scores"><b>29</b>' in page
    import re

    lowest = page[page.index('<table class="lowest">'):]
    lines = [int(x) for x in re.findall(r'<tr><td class="num">\d+</td><td class="num">(\d+)</td>', lowest)][:29]
    assert sorted(lines) == sorted(i + 2 for i in bad), "the impossible rows come first"
