"""Ray Data runner (mlm_scorer.ray_data.score_dataset) on a local Ray with 2 CPUs, against the
single-machine ``score_file`` output, row by row."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import read_outputs, write_tsv

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'mlm-scorer[ray]')")
pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install 'mlm-scorer[ray]')")

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _rows(path: Path, name: str) -> tuple[list[dict], object]:
    import pyarrow.parquet as pq

    t = pq.read_table(path / name)
    return t.to_pylist(), t.schema


def _same(a: dict, b: dict, where: str, rel: float, diffs: list) -> None:
    """Equal rows; floats equal, or within ``rel`` (relative and absolute) when ``rel`` > 0."""
    assert a.keys() == b.keys(), where
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float) and not (math.isnan(x) and math.isnan(y)):
            assert x == y or math.isclose(x, y, rel_tol=rel, abs_tol=rel), (where, k, x, y)
            diffs.append(abs(x - y) / max(abs(y), 1e-300))
        else:
            assert x == y, (where, k, x, y)


def _compare(sents: list[dict], words: list[dict], cases, tmp_path: Path, kw: dict, rel: float) -> list[float]:
    """Each input's rows in the ray output == ``score_file`` of that input (with ``kw``), row by row.
    ``cases``: (input as given to ray, TSV scored by score_file, line shift). Returns the relative diffs."""
    from mlm_scorer.pipeline import score_file

    diffs: list[float] = []
    for src, ref_in, line_shift in cases:
        ref = tmp_path / f"ref_{src.name}.parquet"
        score_file(ref_in, ref, **kw)
        ref_words, ref_sents = read_outputs(ref)
        got_s = [{k: v for k, v in r.items() if k != "file"} for r in sents if r["file"] == str(src)]
        got_w = [{k: v for k, v in r.items() if k != "file"} for r in words if r["file"] == str(src)]
        assert len(got_s) == len(ref_sents) > 0 and len(got_w) == len(ref_words) > 0, src
        for g, e in zip(got_s, ref_sents):
            if line_shift:  # a Parquet row has no TSV line: `line` is its 1-based row number
                e = {**e, "line": e["line"] + line_shift}
                if e["error"]:
                    e["error"] = e["error"].replace(f"{ref_in}:{e['line'] - line_shift}:", f"{src}:{e['line']}:")
            _same(g, e, f"{src.name} sentence row {e['row']}", rel, diffs)
        for g, e in zip(got_w, ref_words):
            if line_shift:
                e = {**e, "line": e["line"] + line_shift}
            _same(g, e, f"{src.name} word row {e['row']}/{e['word_index']}", rel, diffs)
    return diffs


def _inputs(tmp_path: Path):
    """data/sample.tsv, a TSV with its columns and bad rows, and a Parquet copy of that TSV's good rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample = ROOT / "data" / "sample.tsv"
    # a bad row (4 fields), a duplicate of a sample sentence, an empty text, markup and non-ASCII
    extra = write_tsv(tmp_path / "extra.tsv", [["x1", "A dog ran home.", "misc"], ["x2", "bad", "row", "here"],
                                                ["x3", "The cat sat on the mat.", "dup"], ["x4", "", "empty"],
                                                ["x5", "Zürich's café: naïve <b>tags</b> & \"quotes\".", "misc"]],
                      header=["id", "text", "source"])
    good = [r for r in (l.split("\t") for l in extra.read_text(encoding="utf-8").splitlines()[1:]) if len(r) == 3]
    pq_in = tmp_path / "extra.parquet"  # row index = position in the file; line = row + 1
    pq.write_table(pa.table({"id": [r[0] for r in good], "text": [r[1] for r in good],
                             "source": [r[2] for r in good]}), pq_in, row_group_size=2)
    pq_tsv = write_tsv(tmp_path / "extra_good.tsv", good, header=["id", "text", "source"])
    return sample, extra, pq_in, [(sample, sample, 0), (extra, extra, 0), (pq_in, pq_tsv, -1)]


def test_ray_matches_single_machine_row_by_row(local_ray, tiny_export, tmp_path):
    from mlm_scorer.quality import parse_rule
    from mlm_scorer.ray_data import score_dataset
    from mlm_scorer.writer import sentence_schema, word_schema

    sample, extra, pq_in, cases = _inputs(tmp_path)
    rules = [parse_rule("min_word_prob=1e-30", "below")]
    kw = dict(model=str(tiny_export), id_column="id", on_bad_row="skip", flag_rules=rules)
    out = tmp_path / "ray_out"
    run = dict(num_actors=2, num_cpus_per_actor=0.5, batch_rows=8, engine_options={"intra_op_threads": 1}, **kw)
    summary = score_dataset([str(sample), str(extra), str(pq_in)], out, **run)
    words, wschema = _rows(out, "words")
    sents, sschema = _rows(out, "sentences")
    # the schema: a leading `file`, then exactly the CLI's (types, order, nullability) + its metadata key
    assert sschema.names[0] == wschema.names[0] == "file"
    assert sschema.remove(0).remove_metadata() == sentence_schema("id", ["source"], True)
    assert wschema.remove(0).remove_metadata() == word_schema("id", ["source"], False)
    meta = json.loads(sschema.metadata[b"mlm_scorer"])
    assert meta["mode"] == "whole-word" and meta["engine"] == "saved_model" and meta["runner"] == "ray"
    assert 1 <= summary["actors"] <= 2, summary  # (which actors get work is timing: see the fake-engine test)
    assert json.loads((out / "summary.json").read_text()) == summary

    # The SavedModel computes in float32, and a sentence's numbers move in the last float32 bits with the
    # batch it lands in (its neighbours, the padded length): the actors batch other rows together than
    # score_file does, so compare to 1e-6 (float32 resolution). test_ray_exact_with_a_batch_invariant_engine
    # checks everything else is exact.
    diffs = _compare(sents, words, cases, tmp_path, kw, rel=1e-6)
    print(f"ray vs score_file (saved_model): {len(diffs)} floats, {sum(d == 0 for d in diffs)} identical, "
          f"max relative difference {max(diffs):.2e}")
    # rows come back in input order: files as given, rows in file order
    assert [(r["file"], r["row"]) for r in sents] == [(str(p), i) for p, n in
                                                     ((sample, 30), (extra, 5), (pq_in, 4)) for i in range(n)]
    assert (summary["rows"], summary["words"]) == (39, len(words))
    bad = [s for s in sents if s["status"] == "skipped"]
    assert [(s["file"], s["line"]) for s in bad] == [(str(extra), 3), (str(extra), 5), (str(pq_in), 3)]
    assert summary["skipped"] == 3 and summary["scored"] == 36
    assert summary["flagged"] == sum(bool(s["flag"]) for s in sents) > 0

    # a rerun replaces the directory whole and gives the same rows
    summary2 = score_dataset([str(sample), str(extra), str(pq_in)], out, **run)
    w2, s2 = _rows(out, "words")[0], _rows(out, "sentences")[0]
    assert [(r["file"], r["row"], r["word_index"]) for r in w2] == [(r["file"], r["row"], r["word_index"]) for r in words]
    assert [(r["file"], r["row"], r["status"]) for r in s2] == [(r["file"], r["row"], r["status"]) for r in sents]
    assert summary2["rows"] == summary["rows"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ray_out")] == []


def test_ray_exact_with_a_batch_invariant_engine(local_ray, fake_export, tmp_path):
    """The fake engine's numbers do not depend on the batch: then the ray output equals score_file's exactly."""
    from mlm_scorer.ray_data import score_dataset

    sample, extra, pq_in, cases = _inputs(tmp_path)
    kw = dict(model=str(fake_export), engine="fake", id_column="id", on_bad_row="skip")
    out = tmp_path / "ray_fake"
    # 0.1 s per engine batch: an actor is still busy when the next block comes, so the pool uses both
    # (with instant batches one actor may keep up alone, which is fine but proves nothing here)
    summary = score_dataset([str(sample), str(extra), str(pq_in)], out, num_actors=2, num_cpus_per_actor=0.5,
                            batch_rows=5, **kw, engine_options={"delay": "0.1"})
    words, _ = _rows(out, "words")
    sents, _ = _rows(out, "sentences")
    diffs = _compare(sents, words, cases, tmp_path, kw, rel=0.0)
    assert diffs and max(diffs) == 0.0
    assert summary["rows"] == 39 and summary["actors"] == 2
    # the HTML report reads a ray output directory too (words/ + sentences/), with a file column
    from mlm_scorer.report import make_report

    info = make_report(out, tmp_path / "r.html", lowest=5)
    assert (info["rows"], info["scored"], info["skipped"], info["shown"]) == (39, 36, 3, 5)
    assert "<th>file</th>" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_ray_bad_row_fails_with_file_and_line(local_ray, fake_export, tmp_path):
    from mlm_scorer.errors import InputError, UsageError
    from mlm_scorer.ray_data import score_dataset

    bad = write_tsv(tmp_path / "bad.tsv", [["a", "fine"], ["b", "two", "many"]])
    out = tmp_path / "o"
    with pytest.raises(InputError) as ei:
        score_dataset([str(bad)], out, model=str(fake_export), engine="fake", num_actors=1, num_cpus_per_actor=0.5)
    assert str(ei.value).startswith(f"{bad}:3:") and "expected 2 tab-separated fields" in str(ei.value)
    assert ei.value.line == 3 and type(ei.value) is InputError
    assert not out.exists()
    # inputs with different columns cannot share one output schema: said before any work starts
    other = write_tsv(tmp_path / "other.tsv", [["x"]], header=["text"])
    with pytest.raises(UsageError, match="same columns"):
        score_dataset([str(bad), str(other)], out, model=str(fake_export), engine="fake")
    # a directory that is not ours is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        score_dataset([str(other)], tmp_path / "mine", model=str(fake_export), engine="fake")


def test_mlm_score_ray_subcommand(local_ray, fake_export, tmp_path, capsys):
    from mlm_scorer.cli import main

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat on the mat."], ["b", "A dog ran home."]])
    out, js = tmp_path / "out", tmp_path / "summary.json"
    base = ["ray", str(tsv), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--id-column", "id",
            "--num-actors", "1", "--cpus-per-actor", "0.5"]
    assert main(base + ["--summary-json", str(js)]) == 0
    err = capsys.readouterr().err
    assert "scored 2/2 rows" in err and json.loads(js.read_text())["rows"] == 2
    sents, _ = _rows(out, "sentences")
    assert [(s["id"], s["status"]) for s in sents] == [("a", "ok"), ("b", "ok")]
    bad = write_tsv(tmp_path / "bad.tsv", [["a", "fine"], ["b", "x", "y"]])
    base[1] = str(bad)
    assert main(base + ["-q"]) == 3
    assert f"mlm-score ray: error: {bad}:3:" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["rows"] == 2  # the earlier output is untouched


def test_ray_percentile_flags_check_and_report(local_ray, fake_export, tmp_path):
    """Percentile rules of the run itself get the same second pass in the ray runner (the same flags as
    score_file, row by row), and check / report read a ray output directory as result or baseline."""
    from mlm_scorer.check import run_check
    from mlm_scorer.cli import main
    from mlm_scorer.pipeline import score_file
    from mlm_scorer.quality import parse_rule
    from mlm_scorer.ray_data import score_dataset
    from mlm_scorer.report import make_report

    sample = ROOT / "data" / "sample.tsv"
    kw = dict(model=str(fake_export), engine="fake", id_column="id")
    rules = [parse_rule("pseudo_perplexity=p80", "above"), parse_rule("min_word_prob=p10", "below")]
    out = tmp_path / "ray"
    summary = score_dataset([str(sample)], out, num_actors=1, num_cpus_per_actor=0.5, batch_rows=7,
                            flag_rules=rules, **kw)
    ref = tmp_path / "ref.parquet"
    ref_summary = score_file(sample, ref, flag_rules=rules, **kw)
    sents, schema = _rows(out, "sentences")
    _, ref_sents = read_outputs(ref)
    assert [(s["flag"], s["flag_reason"]) for s in sents] == [(s["flag"], s["flag_reason"]) for s in ref_sents]
    assert summary["flagged"] == ref_summary.flagged == sum(bool(s["flag"]) for s in sents) > 0
    assert summary["flag_rules"] == ref_summary.flag_rules and "(of the run: " in summary["flag_rules"][0]
    assert json.loads(schema.metadata[b"mlm_scorer"])["flag_rules"] == summary["flag_rules"]
    assert json.loads((out / "summary.json").read_text())["flagged"] == summary["flagged"]

    # check and report on the directory, against the single-file result of the same scores, and back
    for result, baseline in ((out, ref), (ref, out)):
        r = run_check(result, baseline=baseline)
        assert r["passed"] and r["result"]["rows"] == 30 and all(st["ks"] == 0 for st in r["metrics"].values())
    assert main(["check", str(out), "--baseline", str(ref), "-q"]) == 0
    info = make_report(out, tmp_path / "r.html", baseline=ref, lowest=5)
    assert info["newly_flagged"] == 0 and info["rows"] == 30
    # with the ray runner's --baseline, the percentile is the baseline's
    out2 = tmp_path / "ray2"
    summary2 = score_dataset([str(sample)], out2, num_actors=1, num_cpus_per_actor=0.5, flag_rules=rules[:1],
                             baseline=ref, **kw)
    p80 = sorted(s["pseudo_perplexity"] for s in ref_sents if s["status"] == "ok")[23]  # ceil(0.8 * 30) = 24th
    assert summary2["flag_rules"] == [f"--flag-above pseudo_perplexity=p80 (of the baseline: {p80:.6g})"]
    sents2, _ = _rows(out2, "sentences")
    assert [bool(s["flag"]) for s in sents2] == [s["status"] == "ok" and s["pseudo_perplexity"] > p80 for s in sents2]
