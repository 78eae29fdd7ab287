"""ScoreSettings: one set of run options at every door (the CLIs, score_file, score_frame, Ray, Airflow).

- the flags of ``mlm-score`` and ``mlm-score ray`` and the fields of ScoreSettings are checked against each
  other (derived from the parsers), so an option cannot exist at one door and be missing at another;
- the keyword form, the settings form, the CLI and the Airflow task write the same Parquet bytes;
- what does not apply at a door is refused with the reason; validation and the engine registry's errors;
- the settings that change what is written are recorded whole: metadata, summary, resume key.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import write_tsv

from mlm_scorer.cli import ENGINE_OPTION_FLAGS, main
from mlm_scorer.errors import SettingError, UnknownEngineError, UsageError
from mlm_scorer.settings import SCORE_FIELDS, SETTING_NAMES, ScoreSettings

# Flags that are not settings of the run, and why.
NOT_SETTINGS = {
    "help": "argparse's -h",
    "input": "what to score: an argument of score_file, not a setting",
    "inputs": "mlm-score ray's inputs (score_dataset's argument)",
    "output": "where to write: an argument of score_file / score_dataset",
    "summary_json": "where the CLI also writes the summary (the library returns it)",
    "verbose": "the CLI's log level (the library logs through the mlm_scorer logger)",
    # mlm-score ray's own: the actor pool and the Ray cluster (score_dataset's keyword arguments)
    "num_actors": "ray pool", "cpus_per_actor": "ray pool", "gpus_per_actor": "ray pool",
    "batch_rows": "ray: rows an actor scores and writes at a time", "address": "ray cluster",
    "num_cpus": "local ray",
}
# Flags that feed a field of another name.
FEEDS = {"engine_option": "engine_options", "flag_below": "flag_rules", "flag_above": "flag_rules",
         "quiet": "progress"}


def _parsers():
    from mlm_scorer import cli, ray_cli

    return {"mlm-score": cli.build_parser(), "mlm-score ray": ray_cli.build_parser()}


@pytest.mark.parametrize("door", ["mlm-score", "mlm-score ray"])
def test_every_flag_is_a_setting_and_every_setting_a_flag(door):
    from mlm_scorer.engines.base import engine_names, engine_options_of

    ap = _parsers()[door]
    declared = set()
    for name in engine_names():
        declared |= set(engine_options_of(name) or {})
    reached = set()
    defaults = ScoreSettings()
    for action in ap._actions:
        dest = action.dest
        if dest in NOT_SETTINGS:
            continue
        if dest in ENGINE_OPTION_FLAGS:  # a shortcut for --engine-option NAME=VALUE: an engine must take it
            assert dest in declared, f"{door}: --{dest.replace('_', '-')} sets engine option {dest!r}, which no " \
                                     f"engine declares"
            reached.add("engine_options")
            continue
        field = FEEDS.get(dest, dest)
        assert field in SETTING_NAMES, f"{door}: flag {action.option_strings} (dest {dest!r}) is no ScoreSettings " \
                                       f"field: add the field, or list the flag in NOT_SETTINGS with the reason"
        reached.add(field)
        if dest == field and action.default is not None:  # the flag's default is the setting's
            assert action.default == getattr(defaults, field), (door, dest, action.default)
    missing = set(SETTING_NAMES) - reached
    assert not missing, f"{door}: settings without a flag: {sorted(missing)}"
    # every engine-option flag exists at both doors
    assert set(ENGINE_OPTION_FLAGS) <= {a.dest for a in ap._actions}


def test_cli_defaults_are_the_settings_defaults(tmp_path):
    for door, ap in _parsers().items():
        s = ScoreSettings.from_cli_args(ap.parse_args(["in.tsv", "-o", "out"]))
        assert s == ScoreSettings(progress=None), door  # --progress unset: automatic (a bar on a terminal)
        assert ScoreSettings.from_cli_args(ap.parse_args(["in.tsv", "-o", "out", "-q"])).progress is False


def test_from_cli_args_maps_every_flag(tmp_path):
    from mlm_scorer.cli import build_parser

    args = build_parser().parse_args([
        "in.tsv", "-o", "o.parquet", "--model", "m", "--model-version", "2", "--engine", "onnx", "--precision",
        "int8", "--engine-option", "threads=3", "--cache-dir", "c", "--mode", "token", "--top-k", "2",
        "--batch-tokens", "512", "--max-batch-size", "8", "--chunk-rows", "5", "--cache", "sc", "--dedupe-cache",
        "0", "--text-column", "t", "--id-column", "1", "--no-header", "--on-bad-row", "skip", "--limit", "9",
        "--max-row-chars", "50", "--resume", "--flag-above", "pseudo_perplexity=p99.5", "--flag-below",
        "min_word_prob=0.001", "--baseline", "b.parquet", "--no-progress"])
    s = ScoreSettings.from_cli_args(args)
    assert s.to_dict() == {
        "model": "m", "model_version": 2, "engine": "onnx", "engine_options": {"threads": "3", "precision": "int8"},
        "server": None, "protocol": None, "cache_dir": "c", "mode": "token", "top_k": 2, "batch_tokens": 512,
        "max_batch_size": 8, "chunk_rows": 5, "dedupe_cache": 0, "limit": 9, "progress": False,
        "text_column": "t", "id_column": "1", "header": False, "on_bad_row": "skip", "max_row_chars": 50,
        "flag_rules": ["min_word_prob<0.001", "pseudo_perplexity>p99.5"],  # --flag-below ones first, as ever
        "baseline": "b.parquet", "score_cache": "sc", "resume": True}
    srv = ScoreSettings.from_cli_args(build_parser().parse_args(
        ["in", "-o", "o", "--server", "grpc://h:8001", "--protocol", "kserve", "--model-name", "bert",
         "--timeout", "2.5", "--concurrency", "3", "--retry-budget", "9"]))
    assert (srv.server, srv.protocol, dict(srv.engine_options)) == (
        "grpc://h:8001", "kserve", {"model_name": "bert", "timeout": 2.5, "concurrency": 3, "retry_budget": 9.0})
    assert srv.engine_call_options()["server"] == "grpc://h:8001"


def test_to_dict_is_json_and_from_dict_gives_the_same_settings(tmp_path):
    from mlm_scorer.quality import parse_rule

    s = ScoreSettings(model=tmp_path / "m", engine="torch", engine_options={"threads": 2, "precision": "bf16"},
                      flag_rules=[parse_rule("pseudo_perplexity=p99.95", "above"),
                                  parse_rule("min_word_prob=0.0012345678901", "below")],
                      baseline=tmp_path / "b.parquet", score_cache=tmp_path / "c", text_column=1, limit=0,
                      progress=None)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["model"] == str(tmp_path / "m") and d["baseline"] == str(tmp_path / "b.parquet")
    assert d["flag_rules"] == ["pseudo_perplexity>p99.95", "min_word_prob<0.0012345678901"]  # in order, exact
    back = ScoreSettings.from_dict(d)
    assert back == s and back.rules == s.rules
    import pickle

    assert pickle.loads(pickle.dumps(s)) == s  # Ray and multiprocessing pickle what they send
    with pytest.raises(TypeError):
        s.engine_options["threads"] = 4  # read-only: a frozen object's options do not change under it
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mode = "token"  # type: ignore[misc]
    assert s.replace(mode="token").mode == "token" and s.mode == "whole-word"
    with pytest.raises(UsageError, match=r"unknown setting\(s\) 'modle'; the settings are model, "):
        ScoreSettings.from_dict({"modle": "m"})
    with pytest.raises(UsageError, match="unknown setting"):
        s.replace(threads=2)
    # a percentile that is not a short decimal keeps its value through the text too
    from fractions import Fraction

    odd = dataclasses.replace(parse_rule("pseudo_perplexity=p99", "above"), percentile=Fraction(200, 3))
    assert ScoreSettings(flag_rules=[odd]).rules[0].percentile == pytest.approx(float(Fraction(200, 3)), abs=1e-12)


@pytest.mark.parametrize("kw,message", [
    ({"chunk_rows": 0}, "chunk_rows must be a positive integer, got 0"),
    ({"max_batch_size": 2.5}, "max_batch_size must be a positive integer, got 2.5"),
    ({"batch_tokens": True}, "batch_tokens must be a positive integer, got True"),
    ({"top_k": -1}, "top_k must be >= 0, got -1"),
    ({"limit": "5"}, "limit must be an integer >= 0"),
    ({"dedupe_cache": -1}, "dedupe_cache must be >= 0"),
    ({"on_bad_row": "ignore"}, "on_bad_row must be one of ('fail', 'skip'), got 'ignore'"),
    ({"mode": "wholeword"}, "unknown mode 'wholeword'; modes: whole-word, word-l2r, token"),
    ({"header": "no"}, "header must be True or False"),
    ({"flag_rules": ["pll"]}, "flag rule 'pll': write METRIC<VALUE"),
    ({"flag_rules": ["pseudo_perplexity<5"]}, "use --flag-above pseudo_perplexity=5"),
    ({"engine": "warp"}, "unknown engine 'warp'; known engines: auto, fake, grpc, kserve_grpc, kserve_http, onnx"),
    ({"engine": "rest"}, "--engine rest needs --server URL"),
    ({"protocol": "kserve"}, "--protocol applies to --server"),
    ({"server": "ftp://h"}, "--server must start with http://, https://, grpc:// or grpcs://"),
    ({"server": "grpc://h", "engine": "kserve_http"}, "is a grpc URL but --engine is kserve_http"),
    ({"server": "http://h", "engine": "rest", "protocol": "kserve"}, "--engine rest speaks tfserving, not"),
    ({"engine_options": {"server": "http://a"}, "server": "http://b"}, "server is given twice"),
    ({"engine": "onnx", "engine_options": {"memory": "system"}},
     "engine 'onnx' does not take option(s): memory; it takes: device, precision, streams, threads"),
    ({"engine_options": {"thread": 2}}, "no in-process engine takes option(s): thread; they take: device, "),
    ({"server": "http://h", "engine_options": {"threads": 2}}, "no http server client takes option(s): threads"),
])
def test_invalid_settings_are_refused_with_the_reason(kw, message):
    with pytest.raises(UsageError) as ei:
        ScoreSettings(**kw)
    assert message in str(ei.value)


def test_the_cli_says_range_errors_in_its_own_terms(tmp_path, capsys):
    for flags, message in ((["--chunk-rows", "0"], "--chunk-rows must be positive"),
                           (["--top-k", "-2"], "--top-k must be >= 0"),
                           (["--dedupe-cache", "-1"], "--dedupe-cache must be >= 0"),
                           (["--engine", "rest"], "--engine rest needs --server URL")):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "in.tsv"), "-o", str(tmp_path / "o.parquet"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    # refused before anything is read or written
    assert not list(tmp_path.iterdir())


def test_a_keyword_that_contradicts_the_settings_is_refused(fake_export, tmp_path):
    from mlm_scorer import score_file, score_frame

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat."]])
    s = ScoreSettings(model=str(fake_export), engine="fake", id_column="id", mode="word-l2r")
    with pytest.raises(UsageError, match=r"mode='word-l2r' in settings but 'token' as a keyword"):
        score_file(tsv, tmp_path / "o.parquet", s, mode="token")
    with pytest.raises(UsageError, match=r"id_column='id' in settings but 'text' as a keyword"):
        score_file(tsv, tmp_path / "o.parquet", {"model": str(fake_export), "id_column": "id"}, id_column="text")
    with pytest.raises(UsageError, match="score_file does not take threads; its settings are model, "):
        score_file(tsv, tmp_path / "o.parquet", threads=2)
    assert not (tmp_path / "o.parquet").exists()
    # the same value twice is no contradiction, and a keyword sets what the settings leave at its default
    # (a dict: what it does not hold)
    assert score_file(tsv, tmp_path / "o.parquet", s, id_column="id", engine="fake", top_k=2).scored == 1
    from mlm_scorer.settings import settings_from

    assert settings_from(s, {"top_k": 2}, door="x") == s.replace(top_k=2)
    assert settings_from({"model": "m", "mode": "token"}, {"id_column": "id"}, door="x") == \
        ScoreSettings(model="m", mode="token", id_column="id")
    import pandas as pd

    with pytest.raises(UsageError, match="score_frame does not take resume: score_frame writes no file"):
        score_frame(pd.DataFrame({"text": ["a b"]}), s.replace(resume=True))
    with pytest.raises(UsageError, match="score_frame does not take header: "):
        score_frame(pd.DataFrame({"text": ["a b"]}), model=str(fake_export), engine="fake", header=False)


def test_the_calls_written_before_settings_still_work(fake_export, tmp_path):
    """Calls in the forms the doors took before ScoreSettings: ``input_path=``/``output=`` and ``settings=`` by
    name, ``score_frame(df, TEXT_COLUMN)``, flag rules from an iterator (read once)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from mlm_scorer import score_file, score_frame
    from mlm_scorer.writer import sentences_path

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat."], ["b", "A dog ran far."]])
    s = ScoreSettings(model=str(fake_export), engine="fake", id_column="id")
    by_name = score_file(input_path=tsv, output=tmp_path / "n.parquet", model=str(fake_export), engine="fake",
                         id_column="id")
    as_keyword = score_file(tsv, tmp_path / "k.parquet", settings=s)
    assert by_name.scored == as_keyword.scored == 2
    assert pq.read_table(tmp_path / "n.parquet").equals(pq.read_table(tmp_path / "k.parquet"))
    rules = score_file(tsv, tmp_path / "r.parquet", s, flag_above=(x for x in ["pseudo_perplexity=1"]))
    assert rules.flag_rules == ["--flag-above pseudo_perplexity=1"]
    assert pq.read_table(sentences_path(tmp_path / "r.parquet"), columns=["flag"]).column("flag").to_pylist() \
        == [True, True]
    words, sentences = score_frame(pd.DataFrame({"sentence": ["The cat sat.", "A dog ran far."]}), "sentence",
                                   model=str(fake_export), engine="fake")
    assert sentences["text"].tolist() == ["The cat sat.", "A dog ran far."]
    assert len(words) == int(sentences["n_words"].sum()) > 0


def test_the_ray_runner_refuses_what_does_not_apply_before_starting(fake_export, tmp_path, capsys):
    from mlm_scorer.ray_data import score_dataset

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat."]])
    for kw, why in (({"resume": True}, "resume: its output directory is published whole at the end"),
                    ({"limit": 5}, "limit: it plans its splits over whole files"),
                    ({"chunk_rows": 10}, "chunk_rows: an actor reads batch_rows rows at a time"),
                    ({"score_cache": str(tmp_path / "c")}, "score_cache: the score cache is a SQLite database")):
        with pytest.raises(UsageError, match=f"the ray runner does not take {why}"):
            score_dataset([str(tsv)], tmp_path / "out", model=str(fake_export), engine="fake", **kw)
    code = main(["ray", str(tsv), "-o", str(tmp_path / "out"), "--model", str(fake_export), "--engine", "fake",
                 "--resume", "--limit", "3", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "error: the ray runner does not take --limit: it plans" in err, err
    assert "; the ray runner does not take --resume: its output directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake_export", "in.tsv"]  # nothing made, no Ray


def _parquet_bytes(out: Path) -> tuple[bytes, bytes]:
    from mlm_scorer.writer import sentences_path

    return out.read_bytes(), sentences_path(out).read_bytes()


def test_every_door_writes_the_same_bytes(tiny_export, tmp_path, capsys):
    """The keyword form (as before ScoreSettings), the settings form, the settings as a dict (an XCom), the
    CLI and the Airflow task: the same Parquet bytes, words and sentences (the outputs hold no timestamp
    or run id: the metadata is the model, engine, input, rules and settings)."""
    from mlm_scorer import score_file
    from mlm_scorer.airflow import output_path, score_task
    from mlm_scorer.quality import parse_rule

    rows = [[str(i), s] for i, s in enumerate(["The cat sat on the mat.", "A dog ran home quickly.", "x" * 80,
                                               "The cat sat on the mat.", "Running dogs walked; people read books?",
                                               "two\ttabs", "Mat the on sat cat the."])]
    tsv = write_tsv(tmp_path / "in.tsv", rows)
    kw = dict(model=str(tiny_export), engine="saved_model", id_column="id", on_bad_row="skip", top_k=2,
              chunk_rows=3, batch_tokens=64, max_row_chars=60, mode="word-l2r",
              flag_rules=[parse_rule("pseudo_perplexity=p50", "above"), parse_rule("min_word_prob=1e-4", "below")])
    old = score_file(tsv, tmp_path / "kw.parquet", **kw)
    s = ScoreSettings(**kw)
    new = score_file(tsv, tmp_path / "settings.parquet", s)
    as_dict = score_file(tsv, tmp_path / "dict.parquet", json.loads(json.dumps(s.to_dict())))
    assert main([str(tsv), "-o", str(tmp_path / "cli.parquet"), "--model", str(tiny_export), "--engine",
                 "saved_model", "--id-column", "id", "--on-bad-row", "skip", "--top-k", "2", "--chunk-rows", "3",
                 "--batch-tokens", "64", "--max-row-chars", "60", "--mode", "word-l2r",
                 "--flag-above", "pseudo_perplexity=p50", "--flag-below", "min_word_prob=1e-4", "-q"]) == 0, \
        capsys.readouterr().err
    day = datetime(2024, 1, 1, tzinfo=timezone.utc)
    xcom = score_task(tsv, tmp_path / "af", s.to_dict(), logical_date=day, run_id="r", dag_id="d", log=None)
    ref = _parquet_bytes(tmp_path / "kw.parquet")
    cli_words, cli_sents = _parquet_bytes(tmp_path / "cli.parquet")
    for name in ("settings", "dict"):
        assert _parquet_bytes(tmp_path / f"{name}.parquet") == ref, name
    assert _parquet_bytes(output_path(tmp_path / "af", logical_date=day)) == ref
    # the CLI: --flag-below rules come first on the command line's side, so its rules are in that order;
    # with the same order the bytes are the same
    s2 = s.replace(flag_rules=["min_word_prob<1e-4", "pseudo_perplexity>p50"])
    score_file(tsv, tmp_path / "cli_order.parquet", s2)
    assert (cli_words, cli_sents) == _parquet_bytes(tmp_path / "cli_order.parquet")
    # what the run did: the same counts; a long row and a bad row skipped, the rest scored
    assert (old.scored, old.skipped) == (new.scored, new.skipped) == (as_dict.scored, as_dict.skipped) == (5, 2)
    assert xcom["scored"] == 5 and xcom["settings"] == s.scoring()
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(tmp_path / "kw.parquet").metadata[b"mlm_scorer"])
    assert meta["settings"] == s.scoring() == old.settings and set(meta["settings"]) == set(SCORE_FIELDS)
    assert meta["settings"]["max_row_chars"] == 60 and meta["settings"]["flag_rules"] == list(s.flag_rules)


def test_resume_refuses_a_changed_setting_that_changes_what_is_written(fake_export, tmp_path, monkeypatch):
    """max_row_chars decides which rows are skipped: the resume key holds it (with every SCORE_FIELDS
    setting), so committed rows judged under one limit are not continued under another."""
    from mlm_scorer import score_file
    from mlm_scorer.writer import ResultWriter

    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), "the cat sat " * (i + 1)] for i in range(6)])
    s = ScoreSettings(model=str(fake_export), engine="fake", id_column="id", on_bad_row="skip", chunk_rows=2)
    out = tmp_path / "o.parquet"

    class Stop(Exception):
        pass

    real = ResultWriter.write_chunk

    def stop_after_first(self, *a, **k):  # an interrupted run: one chunk committed
        real(self, *a, **k)
        raise Stop()

    with monkeypatch.context() as m:
        m.setattr(ResultWriter, "write_chunk", stop_after_first)
        with pytest.raises(Stop):
            score_file(tsv, out, s)
    with pytest.raises(UsageError, match=r"setting max_row_chars changed \(100000 -> 30\)"):
        score_file(tsv, out, s.replace(max_row_chars=30, resume=True))
    # the same settings (the text column named rather than found: the same column): continued after 2 rows
    done = score_file(tsv, out, s.replace(resume=True, text_column="text"))
    assert (done.resumed_rows, done.scored) == (2, 6)


def test_engine_options_are_declared_by_the_engines():
    """Each in-process engine's OPTIONS are exactly its constructor's keyword options; the server clients'
    are RemoteOptions' (the declaration cannot drift from what the engine takes)."""
    import inspect

    from mlm_scorer.engines._remote import OPTION_SPEC, RemoteOptions
    from mlm_scorer.engines.base import _ENGINES, engine_options_of, get_engine_class

    for name, entry in _ENGINES.items():
        if name == "auto":
            continue
        if entry.protocol:  # a server's client: RemoteOptions.parse takes OPTION_SPEC
            derived = {f.name for f in dataclasses.fields(RemoteOptions)} - {"scheme", "host", "port", "base_path"}
            assert derived == set(OPTION_SPEC)
            assert set(OPTION_SPEC) <= set(engine_options_of(name))
            continue
        cls = get_engine_class(name)
        params = inspect.signature(cls.__init__).parameters
        taken = {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY} - {"top_k"}
        assert taken == set(cls.OPTIONS) == set(engine_options_of(name)), name


def test_settings_load_no_engine_runtime():
    """Checking a server client's options reads their declaration, not the client (TensorFlow's protos,
    grpc); the in-process engines' modules import no runtime either."""
    code = ("import sys; from mlm_scorer.settings import ScoreSettings\n"
            "ScoreSettings(engine='grpc', server='grpc://h:8500', engine_options={'timeout': 1})\n"
            "ScoreSettings(engine='kserve_grpc', server='grpcs://h:8001', engine_options={'headers': 'a: b'})\n"
            "ScoreSettings(server='http://h:8000')\n"
            "ScoreSettings(engine_options={'threads': 1})\n"
            "print(sorted(m for m in ('tensorflow', 'torch', 'onnxruntime', 'grpc', 'tritonclient', 'requests') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_unknown_names_list_the_known_ones():
    from mlm_scorer.engines.base import engine_names, get_engine

    with pytest.raises(UnknownEngineError) as ei:
        ScoreSettings(engine="tensorflow")
    assert all(n in str(ei.value) for n in engine_names())
    with pytest.raises(UsageError, match="engine 'fake' does not take option"):
        get_engine("fake", model=None, bogus=1)
    with pytest.raises(SettingError, match="protocol must be one of auto, kserve, tfserving, not 'triton'"):
        ScoreSettings(server="http://h", protocol="triton")
