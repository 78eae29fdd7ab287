"""scripts/antiberty_eval.py: the conserved sites it finds, the variants it makes, its accuracy, Spearman and
drift arithmetic on hand-made numbers, and one end-to-end run on AntiBERTy whose every PLL and accuracy is
recomputed from the sentence rows score_file writes (another path through the scorer)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import antiberty_eval as ae  # noqa: E402

ANTIBODIES = ae.load_antibodies()


def test_data_file_holds_named_variable_domains():
    assert len(ANTIBODIES) == 14 and {a.chain for a in ANTIBODIES} == {"VH", "VL"}
    assert len({a.label for a in ANTIBODIES}) == 14
    for a in ANTIBODIES:
        assert 100 <= len(a.sequence) <= 130 and a.source.startswith(f"INN {a.name}") and "PDB" in a.source


def test_the_other_antibody_file_reads_too_and_agrees():
    """tests/data/antibodies_jain2017.tsv (name, chain, sequence; no source) loads, and the sequences the two
    files share are the same."""
    jain = ae.load_antibodies(Path(__file__).resolve().parent / "data" / "antibodies_jain2017.tsv")
    assert len(jain) >= 30 and all(a.source == "" for a in jain)
    ours = {a.label: a.sequence for a in ANTIBODIES}
    shared = [a for a in jain if a.label in ours]
    assert len(shared) >= 10 and all(ours[a.label] == a.sequence for a in shared)
    for a in jain:
        ae.conserved_sites(a.sequence)  # every domain of it has the four sites


@pytest.mark.parametrize("ab", ANTIBODIES, ids=[a.label for a in ANTIBODIES])
def test_conserved_sites_found_in_every_sequence(ab):
    s = ae.conserved_sites(ab.sequence)
    seq = ab.sequence
    assert [seq[s[k]] for k in ("cys1", "trp", "cys2")] == ["C", "W", "C"]
    assert seq[s["j"]] == ("W" if ab.chain == "VH" else "F")
    assert seq[s["j"] + 1] == "G" and seq[s["j"] + 3] == "G"  # the J motif [WF]G.G
    assert 20 <= s["cys1"] <= 23 and s["cys1"] < s["trp"] < s["cys2"] < s["j"]
    # the disulfide spans about 65 residues in every variable domain
    assert 60 <= s["cys2"] - s["cys1"] <= 76


def test_conserved_sites_refuse_what_is_not_a_variable_domain():
    with pytest.raises(ValueError, match="cys1"):
        ae.conserved_sites("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK")
    vh = ANTIBODIES[0].sequence
    no_j = vh.replace("WGQG", "AAAA")
    with pytest.raises(ValueError, match="no conserved j"):
        ae.conserved_sites(no_j)


def test_variants_are_deterministic_and_well_formed():
    seq = ANTIBODIES[1].sequence
    a, b = ae.shuffled(seq, "x"), ae.shuffled(seq, "x")
    assert a == b != seq and sorted(a) == sorted(seq) and ae.shuffled(seq, "y") != a
    site = ae.conserved_sites(seq)["trp"]
    subs = ae.substitutions(seq, site, 3, "s")
    assert subs == ae.substitutions(seq, site, 3, "s") and len({r for r, _ in subs}) == 3
    for r, mut in subs:
        diff = [i for i, (x, y) in enumerate(zip(seq, mut)) if x != y]
        assert len(mut) == len(seq) and diff == [site] and mut[site] == r != "W"
    every = ae.substitutions(seq, site, 19, "s")
    assert sorted(r for r, _ in every) == sorted(set(ae.AMINO_ACIDS) - {"W"})
    pairs = ae.make_pairs(ANTIBODIES[:2], shuffles=2, per_site=3)
    assert len(pairs) == 2 * (2 + 4 * 3)
    vl_cys1 = {p.label for p in pairs if p.parent == "trastuzumab VL" and p.kind == "cys1"}
    assert len(vl_cys1) == 3 and vl_cys1 <= {f"C23{x}" for x in ae.AMINO_ACIDS}
    vh_shuffles = [p.label for p in pairs if p.parent == "trastuzumab VH" and p.kind == "shuffled"]
    assert vh_shuffles == ["shuffle 0", "shuffle 1"]


def test_accuracy_spearman_and_drift_arithmetic():
    P = ae.Pair
    pairs = [P("x", "shuffled", "s0", "N", "S1"), P("x", "cys1", "C22A", "N", "M1"),
             P("x", "trp", "W36A", "N", "M2"), P("x", "trp", "W36F", "N", "M3"), P("x", "j", "W103A", "N", "M4")]
    pll = {"N": -10.0, "S1": -30.0, "M1": -10.0, "M2": -12.0, "M3": -9.0, "M4": float("nan")}
    acc = ae.pair_accuracy(pairs, pll)
    # a tie (M1) and a NaN (M4) count as wrong; M3 beats the natural
    assert acc == {"shuffled": 1.0, "cys1": 0.0, "trp": 0.5, "j": 0.0, "substituted": 0.25, "all": 0.4}

    assert ae.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ae.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get their average rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    r = np.array([1, 2.5, 2.5, 4]) - 2.5
    q = np.array([1, 2, 3, 4]) - 2.5
    assert ae.spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx((r @ q) / math.sqrt((r @ r) * (q @ q)))
    assert ae.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(1 - 6 * 4 / (4 * 15))  # 1 - 6Σd²/(n(n²-1))
    assert math.isnan(ae.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(ae.spearman([1], [1]))

    ref = {"AB": np.array([-1.0, -2.0]), "CDE": np.array([-1.0, -1.0, -1.5]), "F": np.array([-5.0])}
    got = {"AB": np.array([-1.5, -2.0]), "CDE": np.array([-1.0, -0.9, -1.5]), "F": np.array([-4.0])}
    d = ae.drift(ref, got, naturals=["AB", "CDE"],
                 pairs=[P("x", "shuffled", "s", "AB", "F"), P("x", "shuffled", "s", "CDE", "F")])
    assert d["residues"] == 6 and d["sequences"] == 3
    assert d["token_mean_abs"] == pytest.approx(1.6 / 6) and d["token_max_abs"] == pytest.approx(1.0)
    assert d["seq_mean_abs"] == pytest.approx((0.5 + 0.1 + 1.0) / 3) and d["seq_max_abs"] == pytest.approx(1.0)
    assert d["seq_mean_abs_per_residue"] == pytest.approx((0.25 + 0.1 / 3 + 1.0) / 3)
    # PLLs: ref AB -3, CDE -3.5, F -5; got AB -3.5, CDE -3.4, F -4: ranks (2, 1, 0) against (1, 2, 0)
    assert d["spearman_all"] == pytest.approx(0.5)
    assert d["spearman_natural"] == pytest.approx(-1.0)  # AB above CDE, then below
    assert d["same_decision"] == 1.0  # both pairs: natural above F in both runs
    with pytest.raises(ValueError):
        ae.drift(ref, {"AB": got["AB"]})


def test_harness_end_to_end_on_antiberty(antiberty_export, tmp_path, capsys, monkeypatch):
    """One light chain, one shuffle and one substitution per site, on the real model (SavedModel): every
    PLL equals the one score_file writes for the same text, and each accuracy follows from those. A bf16
    configuration on a CPU without bf16 is skipped and the report says why (the CPU check is faked here, so
    this runs the same on every machine; bf16 itself is measured in test_real_weights.py)."""
    from mlm_scorer.engines import torch_engine
    from mlm_scorer.pipeline import score_file

    monkeypatch.setattr(torch_engine, "cpu_has_bf16", lambda: False)

    data = tmp_path / "one.tsv"
    ab = next(a for a in ANTIBODIES if a.label == "trastuzumab VL")
    data.write_text("# one\nantibody\tchain\tsequence\tsource\n"
                    f"{ab.name}\t{ab.chain}\t{ab.sequence}\t{ab.source}\n", encoding="utf-8")
    out_md, out_json = tmp_path / "ab.md", tmp_path / "ab.json"
    ev = ae.main(["--model", str(antiberty_export), "--configs", "saved_model,torch:bf16", "--data", str(data),
                  "--out", str(out_md), "--json", str(out_json), "-q"])
    assert [p.kind for p in ev.pairs] == ["shuffled", "cys1", "trp", "cys2", "j"]
    j = json.loads(out_json.read_text())
    run = j["runs"]["saved_model"]

    texts = [ab.sequence] + [p.variant for p in ev.pairs]
    assert sorted(run["pll"]) == sorted(texts)
    # The natural sequence and its shuffle again through score_file (default mode, whole-word): same PLLs.
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\n" + "".join(ae.residues(t) + "\n" for t in texts[:2]), encoding="utf-8")
    score_file(tsv, tmp_path / "o.parquet", model=antiberty_export, text_column="text")
    rows = pq.read_table(tmp_path / "o.sentences.parquet").to_pylist()
    assert [run["pll"][t] for t in texts[:2]] == pytest.approx([r["pll"] for r in rows], abs=1e-3)
    pll = run["pll"]
    for p in ev.pairs:
        assert run["accuracy"][p.kind] == float(pll[p.natural] > pll[p.variant])
    assert run["accuracy"]["substituted"] == np.mean([pll[ab.sequence] > pll[p.variant] for p in ev.pairs[1:]])
    assert run["accuracy"]["shuffled"] == 1.0, "AntiBERTy must prefer a real light chain to its residues shuffled"
    # real weights: a natural light chain averages well above -1 nat per residue, its shuffle far below
    assert pll[ab.sequence] / len(ab.sequence) > -1.0 > pll[ev.pairs[0].variant] / len(ab.sequence) + 1.0

    text = out_md.read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert "| natural > shuffled | C22/C23 | W36/W35 | C92/C88 | W103/F98 | all substitutions |" in text.replace(
        "| engine | ", "| ")
    row = next(ln for ln in text.splitlines() if ln.startswith("| saved_model |"))
    assert row.startswith("| saved_model | 100.0 | ")
    assert j["runs"]["torch:bf16"] == {"skipped": "this CPU has no avx512_bf16/amx_bf16"}
    assert "| torch:bf16 | skipped: this CPU has no avx512_bf16/amx_bf16 |" in text
