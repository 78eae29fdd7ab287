"""Bad input: each case is scored correctly or reported with file and line (never a traceback,
never a silently dropped row); outputs appear atomically."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import read_outputs

from mlm_scorer.cli import main
from mlm_scorer.errors import InputError


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.err


def fake(tsv, out, fake_export, *extra):
    return [tsv, "-o", out, "--model", fake_export, "--engine", "fake", "-q", *extra]


@pytest.fixture()
def files(tmp_path):
    def write(name: str, data: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        return p
    return write


BAD_CASES = {
    # name: (file bytes, line, reason text, column or None)
    "invalid_utf8": (b"id\ttext\n1\tgood one\n2\tbad \xff byte\n3\tfine\n", 3, "invalid UTF-8 byte 0xff", 7),
    "too_few_fields": (b"id\ttext\n1\tgood one\n2\n3\tfine\n", 3, "expected 2 tab-separated fields", None),
    "too_many_fields": (b"id\ttext\n1\tgood one\n2\ta\tb\n3\tfine\n", 3, "found 3", None),
    "empty_text": (b"id\ttext\n1\tgood one\n2\t\n3\tfine\n", 3, "no words to score", None),
    "whitespace_only": (b"id\ttext\n1\tgood one\n2\t \xe3\x80\x80\xc2\xa0 \n3\tfine\n", 3, "no words to score", None),
    "tab_as_text": (b"id\ttext\n1\tgood one\n2\t \t\n3\tfine\n", 3, "expected 2", None),
    "control_only": (b"id\ttext\n1\tgood one\n2\t\x07\x00\x1b\n3\tfine\n", 3, "no words to score", None),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_row_fails_with_file_and_line(case, files, tmp_path, fake_export, capsys):
    data, line, reason, col = BAD_CASES[case]
    tsv = files("in.tsv", data)
    out = tmp_path / "out.parquet"
    code, err = run(capsys, *fake(tsv, out, fake_export, "--id-column", "id"))
    assert code == 3, err
    where = f"{tsv}:{line}:{col}" if col else f"{tsv}:{line}"
    assert where in err and reason in err and "--on-bad-row skip" in err
    assert not out.exists() and not (tmp_path / "out.sentences.parquet").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "no temporary file is left behind"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_row_skipped_is_recorded_not_dropped(case, files, tmp_path, fake_export, capsys):
    data, line, reason, _ = BAD_CASES[case]
    tsv = files("in.tsv", data)
    out = tmp_path / "out.parquet"
    code, err = main_with_summary(capsys, fake(tsv, out, fake_export, "--id-column", "id", "--on-bad-row", "skip"))
    assert code == 0
    words, sents = read_outputs(out)
    assert [s["line"] for s in sents] == [2, 3, 4], "every input row has a sentence row, in order"
    assert [s["status"] for s in sents] == ["ok", "skipped", "ok"]
    assert reason in sents[1]["error"] and sents[1]["pll"] is None
    assert {w["line"] for w in words} == {2, 4}
    assert f"line {line}" in err and "skipped 1" in err


def main_with_summary(capsys, args):
    args = [a for a in args if a != "-q"]
    return run(capsys, *args)


def test_bom_crlf_quotes_control_chars_are_scored_like_clean_text(files, tmp_path, fake_export, capsys):
    texts = ['He said "hi" and \'bye\'', 'a "stray quote', "The\x07 cat\x00 sat\x1b.", "Über naïve café 中文 😀"]
    clean = files("clean.tsv", ("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts))).encode())
    messy = files("messy.tsv", ("\ufeffid\ttext\r\n" + "".join(f"{i}\t{t}\r\n" for i, t in enumerate(texts))).encode())
    assert run(capsys, *fake(clean, tmp_path / "a.parquet", fake_export, "--id-column", "id"))[0] == 0
    assert run(capsys, *fake(messy, tmp_path / "b.parquet", fake_export, "--id-column", "id"))[0] == 0
    wa, sa = read_outputs(tmp_path / "a.parquet")
    wb, sb = read_outputs(tmp_path / "b.parquet")
    assert [s["id"] for s in sb] == ["0", "1", "2", "3"], "the BOM is not part of the first column name"
    assert [s["text"] for s in sb] == texts, "CRLF is not part of the text"
    assert [s["pll"] for s in sa] == [s["pll"] for s in sb]
    assert [w["word"] for w in wb if w["row"] == 0] == ["He", "said", '"', "hi", '"', "and", "'", "bye", "'"]
    assert [w["word"] for w in wb if w["row"] == 2] == ["The", "cat", "sat", "."], "control characters removed"
    for w in wb:
        assert sb[w["row"]]["text"][w["char_start"]:w["char_end"]] == w["word"]


def test_ten_thousand_word_sentence_is_scored_whole(files, tmp_path, fake_export, capsys):
    words = ("the cat sat on the mat and the dog ran " * 1000).split()
    assert len(words) == 10_000
    tsv = files("in.tsv", ("text\n" + " ".join(words) + "\nshort one\n").encode())
    out = tmp_path / "out.parquet"
    code, err = run(capsys, *fake(tsv, out, fake_export))
    assert code == 0, err
    w, s = read_outputs(out)
    assert s[0]["n_words"] == 10_000 and s[0]["n_copies"] == 10_000 and s[0]["status"] == "ok"
    assert sum(1 for x in w if x["row"] == 0) == 10_000 and s[1]["n_words"] == 2


def test_no_header_one_sentence_per_line_keeps_tabs(files, tmp_path, fake_export, capsys):
    tsv = files("in.txt", b"first sentence\nsecond\twith a tab\n")
    out = tmp_path / "o.parquet"
    assert run(capsys, *fake(tsv, out, fake_export, "--no-header"))[0] == 0
    _, s = read_outputs(out)
    assert [x["text"] for x in s] == ["first sentence", "second\twith a tab"] and [x["line"] for x in s] == [1, 2]


def test_passthrough_columns_and_column_by_index(files, tmp_path, fake_export, capsys):
    tsv = files("in.tsv", b"src\tsentence\tkey\nweb\tThe cat sat.\tk1\nbook\tA dog.\tk2\n")
    out = tmp_path / "o.parquet"
    assert run(capsys, *fake(tsv, out, fake_export, "--text-column", "1", "--id-column", "key"))[0] == 0
    w, s = read_outputs(out)
    assert [(x["id"], x["src"]) for x in s] == [("k1", "web"), ("k2", "book")]
    assert {x["src"] for x in w if x["id"] == "k2"} == {"book"}


@pytest.mark.parametrize("header, args, column, col", [
    (b"id\ttext\tpll", ["--id-column", "id"], "pll", 9),       # a sentence column
    (b"word\ttext", [], "word", 1),                           # a word column
    (b"key\tsentence\ttext", ["--id-column", "key", "--text-column", "sentence"], "text", 14),
    (b"key\tid\ttext", ["--id-column", "key"], "id", 5),       # the id column mlm-score writes
])
def test_a_passthrough_column_named_like_an_output_column_is_refused_at_the_header(
        header, args, column, col, files, tmp_path, fake_export, capsys):
    """Every other column passes through to the outputs: one named like an output column would make two
    columns of one name (it ended as an internal Arrow error after the whole file was scored)."""
    tsv = files("in.tsv", header + b"\n" + b"\t".join([b"a b"] * header.count(b"\t")) + b"\tthe cat\n")
    out = tmp_path / "o.parquet"
    code, err = run(capsys, *fake(tsv, out, fake_export, *args, "--on-bad-row", "skip"))
    assert code == 3, err
    assert f"{tsv}:1:{col}: the input column {column!r} has the name of a column mlm-score writes" in err
    assert "internal error" not in err and not out.exists() and not [p for p in os.listdir(tmp_path) if "o." in p]


def test_an_input_column_named_file_is_passed_through_except_under_ray(files, tmp_path, fake_export, capsys):
    tsv = files("in.tsv", b"file\ttext\na.txt\tthe cat sat\n")
    out = tmp_path / "o.parquet"
    assert run(capsys, *fake(tsv, out, fake_export))[0] == 0
    assert [x["file"] for x in read_outputs(out)[1]] == ["a.txt"]
    from mlm_scorer.ray_data import _check_layouts, _layout

    with pytest.raises(InputError, match="the input column 'file' has the name of a column"):
        _check_layouts([str(tsv)], [_layout(str(tsv), None, None, True)])


@pytest.mark.parametrize("args, message", [
    (["--text-column", "nope"], "'nope' is not a column of the header"),
    (["--text-column", "7"], "index 7 is out of range"),
    (["--id-column", "text"], "name the same column"),
    ([], "which column holds the text"),
])
def test_bad_usage_exits_2_with_hint(args, message, files, tmp_path, fake_export, capsys):
    tsv = files("in.tsv", b"id\ttext2\tz\n1\tx\ty\n")
    if args == ["--id-column", "text"]:
        tsv = files("in.tsv", b"id\ttext\n1\tx\n")
        args = ["--id-column", "text", "--text-column", "text"]
    code, err = run(capsys, *fake(tsv, tmp_path / "o.parquet", fake_export, *args))
    assert code == 2 and message in err


def test_empty_file_and_missing_file(files, tmp_path, fake_export, capsys):
    code, err = run(capsys, *fake(files("e.tsv", b""), tmp_path / "o.parquet", fake_export))
    assert code == 3 and "the file is empty" in err
    code, err = run(capsys, *fake(tmp_path / "missing.tsv", tmp_path / "o.parquet", fake_export))
    assert code == 2 and "does not exist" in err


def test_output_paths_refused(files, tmp_path, fake_export, capsys):
    tsv = files("in.tsv", b"text\nhello there\n")
    code, err = run(capsys, *fake(tsv, tmp_path, fake_export))
    assert code == 2 and "is a directory" in err
    link = tmp_path / "link.parquet"
    link.symlink_to(tmp_path / "elsewhere.parquet")
    code, err = run(capsys, *fake(tsv, link, fake_export))
    assert code == 2 and "symlink" in err
    code, err = run(capsys, *fake(tsv, tsv, fake_export))
    assert code == 2 and "refusing to run" in err and "the words output" in err


def test_failed_run_leaves_previous_output_untouched(files, tmp_path, fake_export, capsys):
    out = tmp_path / "o.parquet"
    good = files("good.tsv", b"text\nhello there\n")
    assert run(capsys, *fake(good, out, fake_export))[0] == 0
    before = out.read_bytes(), (tmp_path / "o.sentences.parquet").read_bytes()
    bad = files("bad.tsv", b"text\n" + b"fine words here\n" * 5000 + b"\xfe\n")
    assert run(capsys, *fake(bad, out, fake_export, "--chunk-rows", "100"))[0] == 3
    assert (out.read_bytes(), (tmp_path / "o.sentences.parquet").read_bytes()) == before


def test_help_has_examples_and_does_not_import_engines(capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--on-bad-row" in out and "--mode" in out
    code = ("import sys, mlm_scorer.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('tensorflow', 'torch', 'onnxruntime', 'pyarrow', 'grpc') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_engine_lists_known_ones(files, tmp_path, fake_export, capsys):
    tsv = files("in.tsv", b"text\nhello\n")
    code, err = run(capsys, tsv, "-o", tmp_path / "o.parquet", "--model", fake_export, "--engine", "warp", "-q")
    assert code == 2 and "unknown engine 'warp'" in err and "saved_model" in err
