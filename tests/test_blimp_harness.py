"""scripts/blimp_eval.py: the BLiMP harness on the tiny model, its accuracy arithmetic checked against
PLLs scored independently through mlm_scorer.pipeline.score_file (the end-to-end path, another batching)."""
from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import blimp_eval  # noqa: E402
from bench_common import BLIMP_ZIP  # noqa: E402

MODES = ("token", "word-l2r", "whole-word")


def _check_against_end_to_end(ev, data: dict, export: Path, tmp: Path) -> None:
    """Every pair's PLL and every accuracy, recomputed from the sentence rows score_file writes
    (one engine for the three modes, the TSV holding every paradigm's good then bad sentences)."""
    from mlm_scorer.engines.base import get_engine
    from mlm_scorer.model_dir import ModelDir
    from mlm_scorer.pipeline import score_file
    from mlm_scorer.scorer import Scorer

    texts = [t for p in ev.paradigms for t in p.good + p.bad]
    tsv = tmp / "pairs.tsv"
    tsv.write_text("text\n" + "".join(t + "\n" for t in texts), encoding="utf-8")
    md = ModelDir.open(export)
    with get_engine("saved_model", model=md) as eng:
        for mode in MODES:
            out = tmp / f"out-{mode}.parquet"
            score_file(tsv, out, text_column="text", scorer=Scorer(md, eng, mode=mode))
            rows = pq.read_table(tmp / f"out-{mode}.sentences.parquet").to_pylist()
            assert [r["text"] for r in rows] == texts
            plls = [r["pll"] for r in rows]
            acc, start = {}, 0
            for p in ev.paradigms:
                n = len(p.good)
                good, bad = plls[start:start + n], plls[start + n:start + 2 * n]
                start += 2 * n
                assert data["modes"][mode]["pll_good"][p.uid] == pytest.approx(good, rel=1e-4, abs=1e-4)
                assert data["modes"][mode]["pll_bad"][p.uid] == pytest.approx(bad, rel=1e-4, abs=1e-4)
                # a pair this close could flip between two batchings: none is expected with random weights
                assert all(abs(g - b) > 1e-3 for g, b in zip(good, bad)), (mode, p.uid, good, bad)
                acc[p.uid] = sum(g > b for g, b in zip(good, bad)) / n
            assert data["modes"][mode]["accuracy"] == pytest.approx(acc, abs=1e-12)
            assert data["modes"][mode]["overall"] == pytest.approx(sum(acc.values()) / len(acc), abs=1e-12)


#: The first four pairs of three BLiMP paradigms, as BLiMP.zip holds them (tests/data/blimp/SOURCE.md).
BLIMP_SAMPLE = Path(__file__).resolve().parent / "data" / "blimp"


def _sample_zip(tmp: Path) -> Path:
    """A zip laid out as BLiMP.zip (data/<UID>.jsonl) with the vendored lines."""
    path = tmp / "blimp-sample.zip"
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(BLIMP_SAMPLE.glob("*.jsonl")):
            z.writestr(f"data/{f.name}", f.read_bytes())
    return path


def test_vendored_blimp_lines_are_blimps():
    """Where the full BLiMP.zip is beside the checkout (benchmarks only), the vendored lines are its own."""
    if not BLIMP_ZIP.is_file():
        pytest.skip(f"BLiMP.zip is not at {BLIMP_ZIP} (the harness test uses the vendored lines)")
    with zipfile.ZipFile(BLIMP_ZIP) as z:
        for f in sorted(BLIMP_SAMPLE.glob("*.jsonl")):
            assert f.read_bytes().decode() == "".join(
                z.read(f"data/{f.name}").decode().splitlines(keepends=True)[:4]), f.name


def test_harness_on_real_blimp_pairs(tiny_export, tmp_path, capsys):
    uids = ["anaphor_gender_agreement", "determiner_noun_agreement_1", "wh_island"]
    out_md, out_json = tmp_path / "blimp.md", tmp_path / "blimp.json"
    ev = blimp_eval.main(["--model", str(tiny_export), "--paradigms", ",".join(uids), "--pairs-per-paradigm", "4",
                          "--blimp-zip", str(_sample_zip(tmp_path)), "--label", "tiny", "--out", str(out_md),
                          "--json", str(out_json), "-q"])
    assert [p.uid for p in ev.paradigms] == sorted(uids)
    assert all(len(p.good) == len(p.bad) == 4 for p in ev.paradigms)
    # the pairs are the first four lines of each paradigm's file, as BLiMP wrote them
    first = [json.loads(x) for x in (BLIMP_SAMPLE / "wh_island.jsonl").read_text(encoding="utf-8").splitlines()]
    p = next(p for p in ev.paradigms if p.uid == "wh_island")
    assert p.good == [d["sentence_good"] for d in first] and p.bad == [d["sentence_bad"] for d in first]
    data = json.loads(out_json.read_text())
    assert set(data["modes"]) == set(MODES)
    _check_against_end_to_end(ev, data, tiny_export, tmp_path)
    # the printed tables: the published layout, then one row per paradigm
    text = out_md.read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    header = "| model | PLL-original (one token masked) | PLL-word-l2r | PLL-whole-word |"
    assert header in text
    row = "| tiny | " + " | ".join(f"{100 * data['modes'][m]['overall']:.1f}" for m in MODES) + " |"
    assert row in text
    for uid in uids:
        assert f"| {uid} |" in text


def test_mean_over_paradigms_ties_and_macosx(tiny_export, tmp_path):
    """Overall is the mean of paradigm accuracies (not pooled over pairs); a tie counts as wrong;
    __MACOSX resource forks and non-data entries in the zip are ignored."""
    pairs = {
        "alpha": [("the cat sat on the mat.", "the cat sat on the mat.")],  # identical: a tie, wrong
        "beta": [("the dog runs.", "dog the runs."), ("a man walks home.", "home walks a man."),
                 ("she reads a book.", "book a reads she."), ("we like cats.", "cats like we.")],
    }
    zpath = tmp_path / "mini.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for uid, ps in pairs.items():
            z.writestr(f"data/{uid}.jsonl", "".join(json.dumps({"sentence_good": g, "sentence_bad": b, "field": "syntax",
                                                                "linguistics_term": uid, "UID": uid}) + "\n"
                                                    for g, b in ps))
            z.writestr(f"__MACOSX/data/._{uid}.jsonl", b"\x00\x05\x16\x07 not json")
        z.writestr("data/.DS_Store", b"\x00\x00")
    out_json = tmp_path / "mini.json"
    ev = blimp_eval.main(["--model", str(tiny_export), "--blimp-zip", str(zpath), "--modes", "token,word-l2r,whole-word",
                          "--json", str(out_json), "-q"])
    assert [p.uid for p in ev.paradigms] == ["alpha", "beta"]
    data = json.loads(out_json.read_text())
    for mode in MODES:
        r = data["modes"][mode]
        assert r["accuracy"]["alpha"] == 0.0  # the tie
        g, b = r["pll_good"]["beta"], r["pll_bad"]["beta"]
        acc_beta = sum(x > y for x, y in zip(g, b)) / 4
        assert r["accuracy"]["beta"] == acc_beta
        assert r["overall"] == pytest.approx((0.0 + acc_beta) / 2)
        assert not any(math.isnan(x) for x in g + b)
    assert len(ev.paradigms[1].good) == 4


def test_accuracy_arithmetic():
    assert blimp_eval.accuracy([1.0, -2.0, 0.5, float("nan")], [0.0, -1.0, 0.5, -9.0]) == 0.25
    assert math.isnan(blimp_eval.accuracy([], []))
