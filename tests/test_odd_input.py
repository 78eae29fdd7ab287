"""Silently odd input gets a clear message: a text column that is not text (a Parquet float column, bytes or
lists in a DataFrame), a damaged Parquet data page (bad input, exit 3, not an internal error), options out of
range (--max-batch-size, max_row_chars), and words the model's vocabulary does not know (the unknown_words
column, a warning with the likely cause, flag rules on it)."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_outputs

from mlm_scorer import score_file
from mlm_scorer.cli import main
from mlm_scorer.errors import InputError, UsageError


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _fake(inp, out, model, *extra):
    return [inp, "-o", out, "--model", model, "--engine", "fake", "-q", *extra]


# --------------------------------------------------------------------------------------- Parquet input
@pytest.mark.parametrize("values,typ", [([1.5, float("nan"), 2.0], pa.float64()), ([1, 2, 3], pa.int64()),
                                        ([b"the cat", b"a dog", b"x"], pa.binary())])
def test_a_parquet_text_column_that_is_not_text_is_refused(values, typ, tmp_path, fake_export, capsys):
    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": pa.array(values, typ), "id": ["a", "b", "c"]}), f)
    code, err = _cli(capsys, *_fake(f, tmp_path / "o.parquet", fake_export))
    assert code == 2 and f"the text column 'text' has type {typ}, not text" in err and str(f) in err, err
    assert not (tmp_path / "o.parquet").exists()


def test_parquet_ids_and_dictionary_text_are_read_as_strings(tmp_path, fake_export, capsys):
    f = tmp_path / "in.parquet"
    text = pa.array(["the cat sat", "a dog ran", "the cat sat"]).dictionary_encode()
    pq.write_table(pa.table({"text": text, "id": pa.array([7, 8, 9]), "score": [0.5, None, 1.5]}), f)
    out = tmp_path / "o.parquet"
    code, err = _cli(capsys, *_fake(f, out, fake_export, "--id-column", "id"))
    assert code == 0, err
    _, sents = read_outputs(out)
    assert [(s["id"], s["text"], s["score"], s["status"]) for s in sents] == [
        ("7", "the cat sat", "0.5", "ok"), ("8", "a dog ran", None, "ok"), ("9", "the cat sat", "1.5", "ok")]


def _damaged_parquet(path):
    table = pa.table({"text": [f"sentence {i} of the cat that sat on the mat" for i in range(5000)]})
    pq.write_table(table, path, compression="snappy", use_dictionary=False, data_page_size=4096)
    col = pq.ParquetFile(path).metadata.row_group(0).column(0)
    raw = bytearray(path.read_bytes())
    mid = col.data_page_offset + col.total_compressed_size // 2
    raw[mid:mid + 64] = os.urandom(64)  # garbage inside a compressed data page
    path.write_bytes(bytes(raw))


def test_a_damaged_parquet_data_page_is_bad_input_naming_the_file(tmp_path, fake_export, capsys):
    f = tmp_path / "in.parquet"
    _damaged_parquet(f)
    for skip in ([], ["--on-bad-row", "skip"]):
        code, err = _cli(capsys, *_fake(f, tmp_path / "o.parquet", fake_export, *skip))
        assert code == 3, err
        assert f"{f}:" in err and "cannot be read" in err and "damaged" in err, err
        assert "internal error" not in err and not (tmp_path / "o.parquet").exists()


def test_parquet_rows_longer_than_the_limit_in_any_column_are_bad_rows(tmp_path, fake_export, capsys):
    f = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["short one", "x " * 600, "fine", "ok"],
                             "note": ["a", "b", "y" * 2000, "z"]}), f)
    out = tmp_path / "o.parquet"
    code, err = _cli(capsys, *_fake(f, out, fake_export, "--max-row-chars", "1000", "--on-bad-row", "skip"))
    assert code == 0, err
    _, sents = read_outputs(out)
    assert [s["status"] for s in sents] == ["ok", "skipped", "skipped", "ok"]
    assert "the text is 1200 characters long" in sents[1]["error"]
    assert "pass-through columns are 2,000 characters long" in sents[2]["error"] and sents[2]["note"] is None


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_batch_size_out_of_range_is_bad_usage(value, tmp_path, fake_export, capsys):
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat\n")
    with pytest.raises(SystemExit) as e:
        main(_fake(str(tsv), str(tmp_path / "o.parquet"), str(fake_export), "--max-batch-size", value))
    assert e.value.code == 2 and "--max-batch-size must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("option", [{"max_batch_size": 0}, {"max_batch_size": -5}, {"max_row_chars": 0},
                                    {"batch_tokens": 0}])
def test_library_options_out_of_range_are_refused(option, tmp_path, fake_export):
    import pandas as pd

    from mlm_scorer import score_frame

    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nthe cat\n")
    name = next(iter(option))
    with pytest.raises(UsageError, match=f"{name} must be a positive integer"):
        score_file(tsv, tmp_path / "o.parquet", model=fake_export, engine="fake", **option)
    with pytest.raises(UsageError, match=f"{name} must be a positive integer"):
        score_frame(pd.DataFrame({"text": ["the cat"]}), model=fake_export, engine="fake", **option)
    assert not (tmp_path / "o.parquet").exists()


def test_score_frame_never_scores_bytes_lists_or_numbers_as_text(fake_export):
    import pandas as pd

    from mlm_scorer import score_frame

    df = pd.DataFrame({"text": ["the cat", b"the cat", ["the", "cat"], 3.5, None]})
    with pytest.raises(InputError, match=r"DataFrame:2: the text column 'text' holds a bytes here"):
        score_frame(df, model=fake_export, engine="fake")
    _, sents = score_frame(df, model=fake_export, engine="fake", on_bad_row="skip")
    assert list(sents["status"]) == ["ok", "skipped", "skipped", "skipped", "skipped"]
    assert "holds a list" in sents["error"][2] and "holds a float" in sents["error"][3]
    with pytest.raises(UsageError, match="has dtype float64, not text"):
        score_frame(pd.DataFrame({"text": [1.5, float("nan")]}), model=fake_export, engine="fake")


# ------------------------------------------------------------------------------------------ unknown words
def test_unknown_words_are_counted_warned_about_and_flaggable(tmp_path, fake_export, capsys):
    tsv = tmp_path / "in.tsv"
    # the fake export's vocabulary has the Latin alphabet only: Greek words are [UNK]
    tsv.write_text("text\nthe cat sat\nthe ωψ sat λόγος\nωψ λόγος\n", encoding="utf-8")
    out = tmp_path / "o.parquet"
    code, err = _cli(capsys, tsv, "-o", out, "--model", fake_export, "--engine", "fake", "--flag-above",
                     "unknown_words=0")
    assert code == 0, err
    _, sents = read_outputs(out)
    assert [s["unknown_words"] for s in sents] == [0, 2, 2]
    assert [s["flag"] for s in sents] == [False, True, True]
    assert sents[1]["flag_reason"] == "unknown_words 2 > 0"
    assert "warning: 44% of words (4 of 9) are unknown to this model's vocabulary (scored as [UNK])" in err, err
    assert "'ωψ', 'λόγος'" in err and "may not be in this model's language or alphabet" in err
    assert main(["check", str(out), "--flag-above", "unknown_words=1", "-q"]) == 1
    assert "flagged 2 of 3 scored rows" in capsys.readouterr().out


def test_a_protein_model_says_why_its_words_are_unknown(antiberty_export, tmp_path, capsys):
    """Tried as a new user would, on AntiBERTy (real weights, a vocabulary of residues): residues written
    without spaces are one unknown 'word' each, English text is unknown throughout; each run says so, with
    the likely cause, and the residues written with spaces are not warned about."""
    vh = "EVQLVESGGGLVQPGGSLRLSCAASGFTFSSYAMSWVRQAPGKGLEWVS"
    cases = {"no_spaces": (vh, "written without spaces", "100% of words (2 of 2)"),
             "english": ("the cat sat on the mat", "may not be in this model's language", "100% of words"),
             "lower_case": (" ".join(vh.lower()), "knows these words in upper case", "100% of words")}
    for name, (text, cause, share) in cases.items():
        tsv = tmp_path / f"{name}.tsv"
        tsv.write_text(f"text\n{text}\n{text[::-1]}\n", encoding="utf-8")
        code, err = _cli(capsys, tsv, "-o", tmp_path / f"{name}.parquet", "--model", antiberty_export)
        assert code == 0, err
        assert f"warning: {share}" in err and cause in err, (name, err)
    tsv = tmp_path / "spaced.tsv"
    tsv.write_text(f"text\n{' '.join(vh)}\n", encoding="utf-8")
    code, err = _cli(capsys, tsv, "-o", tmp_path / "spaced.parquet", "--model", antiberty_export)
    assert code == 0 and "unknown" not in err, err
    assert read_outputs(tmp_path / "spaced.parquet")[1][0]["unknown_words"] == 0
