"""Ray Data runner (mlm_scorer.ray_data.score_dataset) on a local Ray with 2 CPUs, against the
single-machine ``score_file`` output, row by row; its defaults, streaming memory and quiet stderr.
The two-node cluster test is in test_ray_cluster.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import read_outputs, write_tsv

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'mlm-scorer[ray]')")
pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install 'mlm-scorer[ray]')")

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def test_mlm_score_ray_with_no_resource_options_finishes_quietly(tiny_export, tmp_path):
    """The command a new user types, in a fresh process: no Ray running, no --num-actors, no
    --cpus-per-actor. It starts its own Ray, chooses the pool from the machine's CPUs, finishes, and
    stderr holds only our own lines (no Ray or TensorFlow log lines). Runs first: no Ray in this process."""
    assert not ray.is_initialized()
    sample = ROOT / "data" / "sample.tsv"
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RAY_ADDRESS")}
    p = subprocess.run([sys.executable, "-m", "mlm_scorer", "ray", str(sample), "-o", str(out), "--model",
                        str(tiny_export), "--id-column", "id"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert summary["rows"] == summary["scored"] == 30 and summary["skipped"] == 0
    # actors of up to 4 CPUs sharing the machine's CPUs (a new Ray counts the CPUs it may use)
    n = summary["num_actors"]
    assert min(abs(summary["cpus_per_actor"] * n - c) for c in (cpus, os.cpu_count())) < 0.01, summary
    assert summary["cpus_per_actor"] <= 4
    lines = p.stderr.splitlines()
    assert lines and all(line.startswith(("scoring ", "actors: ", "progress: ", "scored ")) for line in lines), \
        p.stderr
    assert lines[-1].startswith("scored 30/30 rows")
    # -q: nothing at all on stderr
    q = subprocess.run([sys.executable, "-m", "mlm_scorer", "ray", str(sample), "-o", str(out), "--model",
                        str(tiny_export), "--engine", "fake", "-q"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert q.returncode == 0 and q.stderr == "", q.stderr


def test_mlm_score_ray_sigterm_exits_143_and_publishes_nothing(fake_export, tmp_path):
    """SIGTERM (Airflow's and Kubernetes' stop) mid-run: the message and exit code of a Ctrl-C'd run
    (143), no output directory and no temporary one left. ray.init replaces the process's SIGTERM handler
    with sys.exit(15); without putting ours back the run ended with exit 15 and not a word."""
    import signal

    tsv = tmp_path / "in.tsv"
    tsv.write_text("id\ttext\n" + "".join(f"r{i}\tthe cat sat on the mat {i}\n" for i in range(4000)))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([sys.executable, "-m", "mlm_scorer", "ray", str(tsv), "-o", str(out), "--model",
                          str(fake_export), "--engine", "fake", "--engine-option", "delay=0.05", "--batch-rows", "64",
                          "--id-column", "id", "--no-progress"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.mlm-score-ray/run-*/sentences/part-*.parquet")):  # scoring has begun
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


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
    run = dict(batch_rows=8, **kw)  # the actors and their CPUs from the cluster: 2 CPUs, 1 actor of 2
    summary = score_dataset([str(sample), str(extra), str(pq_in)], out, **run)
    assert (summary["num_actors"], summary["cpus_per_actor"], summary["threads_per_actor"]) == (1, 2.0, 2)
    # one part file per batch, named by input file and first row; no temporary file left
    assert sorted(p.name for p in (out / "sentences").iterdir()) == sorted(p.name for p in (out / "words").iterdir())
    assert "part-00000-000000000008.parquet" in os.listdir(out / "words")
    assert not [p for sub in ("words", "sentences") for p in (out / sub).iterdir() if p.name.startswith(".")]
    words, wschema = _rows(out, "words")
    sents, sschema = _rows(out, "sentences")
    # the schema: a leading `file`, then exactly the CLI's (types, order, nullability) + its metadata key
    assert sschema.names[0] == wschema.names[0] == "file"
    assert sschema.remove(0).remove_metadata() == sentence_schema("id", ["source"], True)
    assert wschema.remove(0).remove_metadata() == word_schema("id", ["source"], False)
    meta = json.loads(sschema.metadata[b"mlm_scorer"])
    assert meta["mode"] == "whole-word" and meta["engine"] == "saved_model" and meta["runner"] == "ray"
    assert summary["actors"] == summary["nodes"] == 1 and summary["copies"] > 0
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
    assert [(r["file"], r["line"]) for r in summary["skipped_rows"]] == [(s["file"], s["line"]) for s in bad]
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


def test_ray_with_a_model_version(local_ray, fake_export, tmp_path):
    """``model_version`` names the export's version directory; the actors open the directory the driver
    resolved (not that directory's version N again)."""
    from mlm_scorer.ray_data import score_dataset

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat."], ["b", "A dog ran."]])
    summary = score_dataset([str(tsv)], tmp_path / "o", model=str(fake_export), model_version=1, engine="fake",
                            id_column="id", num_actors=1, num_cpus_per_actor=0.5)
    assert (summary["rows"], summary["scored"]) == (2, 2)
    assert summary["model"] == str(fake_export / "1")


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
    # a failure while an actor opens the model or the engine comes back as our error, at once (Ray would
    # otherwise restart the actor again and again)
    # (an option no engine takes is refused before Ray starts: ScoreSettings; a bad value of one it takes is
    # found when the actor opens the engine)
    with pytest.raises(UsageError, match="threads must be a positive integer"):  # (the first run's actor is gone)
        score_dataset([str(other)], out, model=str(fake_export), engine="saved_model",
                      engine_options={"intra_op_threads": "none"}, wait_for_actors_s=60)
    assert not out.exists()
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


def test_mlm_score_ray_reports_a_bug_without_a_traceback(fake_export, tmp_path, capsys, monkeypatch):
    """As mlm-score: an unexpected exception is an "internal error" line and exit 1 (it was a traceback);
    MLM_SCORER_DEBUG=1 re-raises it. A --baseline without a percentile rule is refused the same way too."""
    import mlm_scorer.ray_data
    from mlm_scorer.cli import main

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(mlm_scorer.ray_data, "score_dataset", boom)
    monkeypatch.delenv("MLM_SCORER_DEBUG", raising=False)
    args = ["ray", str(ROOT / "data" / "sample.tsv"), "-o", str(tmp_path / "out"), "--model", str(fake_export)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: a bug" in err and "Traceback" not in err, err
    monkeypatch.setenv("MLM_SCORER_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(args)
    assert main(args + ["--baseline", str(tmp_path / "b.parquet"), "--flag-below", "pll=-3"]) == 2
    assert "--baseline is where pNN thresholds are taken from" in capsys.readouterr().err


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


def test_plan_actors_from_the_cluster():
    from mlm_scorer.errors import UsageError
    from mlm_scorer.ray_data import ActorPlan, plan_actors

    one, two = [{"CPU": 1}], [{"CPU": 2}]
    # defaults: actors of up to 4 CPUs sharing each node's CPUs equally, one size for all (nothing else
    # needs CPUs: the actors read and write themselves)
    assert plan_actors(one) == ActorPlan(1, 1, 1.0, 0.0, 1)
    assert plan_actors(two) == ActorPlan(1, 1, 2.0, 0.0, 2)
    assert plan_actors([{"CPU": 16}, {"CPU": 4}, {"CPU": 0}]) == ActorPlan(5, 5, 4.0, 0.0, 4)
    assert plan_actors([{"CPU": 6}]) == ActorPlan(2, 2, 3.0, 0.0, 3)
    assert plan_actors([{"CPU": 2}, {"CPU": 16}]).num_actors == 9  # the 2-CPU node's size: 1 + 8
    assert plan_actors([{"CPU": 0.5}]) == ActorPlan(1, 1, 0.5, 0.0, 1)  # a fraction of a CPU: one actor
    # --num-actors alone: the largest equal share that places them all
    assert plan_actors(two, num_actors=1) == ActorPlan(1, 1, 2.0, 0.0, 2)
    assert plan_actors(two, num_actors=3).cpus == 0.6666  # rounded down to Ray's 1e-4: all three fit
    assert plan_actors([{"CPU": 3}, {"CPU": 2}], num_actors=2) == ActorPlan(2, 2, 2.0, 0.0, 2)
    assert plan_actors([{"CPU": 3}], num_actors=2).cpus == 1.5
    # --cpus-per-actor alone: as many as the nodes hold
    assert plan_actors([{"CPU": 16}, {"CPU": 8}], cpus_per_actor=4) == ActorPlan(6, 6, 4.0, 0.0, 4)
    with pytest.raises(UsageError, match="no node of the Ray cluster has 4 CPUs"):
        plan_actors(two, cpus_per_actor=4)
    # both, more than fit now: start with those that fit, grow as nodes join
    assert plan_actors(two, num_actors=4, cpus_per_actor=1) == ActorPlan(4, 2, 1.0, 0.0, 1)
    # others' work holds part of the cluster: start with what is free now (at least one), grow later
    assert plan_actors([{"CPU": 4}], cpus_per_actor=1, available=[{"CPU": 1.5}]) == ActorPlan(4, 1, 1.0, 0.0, 1)
    assert plan_actors([{"CPU": 4}], available=[{"CPU": 0}]).min_actors == 1
    # GPUs: one actor per GPU share, an equal share of that node's CPUs
    gpu = [{"CPU": 8, "GPU": 2}, {"CPU": 4}]
    assert plan_actors(gpu, gpus_per_actor=1) == ActorPlan(2, 2, 4.0, 1.0, 4)
    assert plan_actors(gpu, gpus_per_actor=0.5).num_actors == 4
    with pytest.raises(UsageError, match="GPU"):
        plan_actors(two, gpus_per_actor=1)
    with pytest.raises(UsageError, match="no CPUs"):
        plan_actors([{"CPU": 0}])


@pytest.mark.parametrize("header", [True, False])
def test_tsv_batch_starts_match_the_reader(tmp_path, header):
    """The driver's one-pass split plan: a reader that seeks to each start reads exactly the rows a reader
    from the top reads there (a BOM, CRLF, empty lines, a missing last newline, a bad row)."""
    import hashlib

    from mlm_scorer.ray_data import tsv_batch_starts, tsv_plan
    from mlm_scorer.reader import TsvReader

    lines = ["id\ttext"] if header else []
    lines += [f"r{i}\tsentence number {i}" for i in range(23)]
    lines[3] = "r2\t"
    lines[5] = "r4\ttoo\tmany"
    raw = ("\ufeff" + "\r\n".join(lines[:9]) + "\n" + "\n".join(lines[9:])).encode()  # no final newline
    path = tmp_path / "in.tsv"
    path.write_bytes(raw)
    kw = dict(text_column=1 if not header else None, id_column=0 if not header else None, header=header)
    with TsvReader(path, **kw) as r:
        expect = [(row.index, row.line, row.text, row.id, row.error is None) for row in r]
    for block in (7, 1 << 20):  # small blocks: batch starts fall on every block edge case
        starts, rows = tsv_batch_starts(str(path), header=header, batch_rows=4, block=block)
        assert rows == len(expect) == 23 and len(starts) == 6
        got = []
        for b, off in enumerate(starts):
            with TsvReader(path, **kw) as r:
                r.seek(off, line=4 * b + (2 if header else 1), index=4 * b)
                got += [(row.index, row.line, row.text, row.id, row.error is None)
                        for _, row in zip(range(min(4, rows - 4 * b)), r)]
        assert got == expect
        # what the planner hashed: the header, and each batch's bytes up to the next start (or the end)
        plan = tsv_plan(str(path), header=header, batch_rows=4, block=block)
        ends = starts[1:] + [len(raw)]
        assert plan.batch_sha256 == [hashlib.sha256(raw[a:b]).hexdigest() for a, b in zip(starts, ends)]
        assert plan.header_sha256 == hashlib.sha256(raw[:starts[0]]).hexdigest()
        assert (plan.size, plan.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    empty = tmp_path / "empty.tsv"
    empty.write_text("id\ttext\n")
    assert tsv_batch_starts(str(empty), header=True, batch_rows=4) == ([], 0)


def _peak_rss_of_this_process_since_reset() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


class _ObjectStoreSampler:
    """Peak bytes in Ray's object store (every node), sampled every 50 ms while a run goes on."""

    def __init__(self):
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._reply = get_memory_info_reply
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            used = self._reply(self._state).store_stats.object_store_bytes_used
            self.peak = max(self.peak, used)
            self._stop.wait(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_ray_memory_is_flat_at_10x_rows(local_ray, fake_export, tmp_path):
    """Streaming: peak RSS of the driver and of the actors, and the object store's peak, are the same
    (within 10 %) for 10x the rows: nothing holds the dataset or its results."""
    from mlm_scorer.ray_data import score_dataset

    sents = [l.split("\t")[1] for l in (ROOT / "data" / "sample.tsv").read_text(encoding="utf-8").splitlines()[1:]]

    def run(n: int, name: str) -> dict:
        tsv = write_tsv(tmp_path / f"{name}.tsv", [[f"r{i}", sents[i % len(sents)]] for i in range(n)])
        Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (VmHWM)
        with _ObjectStoreSampler() as store:
            s = score_dataset([str(tsv)], tmp_path / name, model=str(fake_export), engine="fake", id_column="id",
                              batch_rows=256)
        assert s["rows"] == n and s["actors"] >= 1
        return {"driver": _peak_rss_of_this_process_since_reset(), "actor": s["max_actor_rss_bytes"],
                "store": store.peak, "words": s["words"]}

    run(600, "warmup")  # first-use imports in this process
    m1, m10 = run(3_000, "x1"), run(30_000, "x10")  # the 30 sample sentences over and over
    print(f"peak memory 1x vs 10x rows: {m1} vs {m10}")
    assert m10["words"] == 10 * m1["words"] > 0
    for k in ("driver", "actor"):
        assert abs(m10[k] - m1[k]) <= 0.10 * m1[k], (k, m1[k], m10[k])
    # the object store holds the split descriptions and count rows only, far below one batch of text
    # (small objects live in the driver's memory, not the store): flat within 10 % or 1 MiB
    assert m10["store"] <= max(1.10 * m1["store"], m1["store"] + (1 << 20)), (m1["store"], m10["store"])
