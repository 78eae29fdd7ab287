"""Property-based fuzzing of the input path (hypothesis): generated TSV bytes — random Unicode with
combining marks, emoji, right-to-left text, control characters, NUL, invalid UTF-8, stray quotes and
tabs, huge and empty fields, ragged rows, BOM and CRLF — either score or fail with a clear error that
names the line; never another exception; every scored row maps back to its input row.

The number of examples is bounded for CI (FUZZ_EXAMPLES, default 150 per property); the README's
reliability section records what was run."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import read_outputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlm_scorer import InputError, score_file
from mlm_scorer.engines.fake import FakeEngine
from mlm_scorer.model_dir import ModelDir
from mlm_scorer.scorer import Scorer

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPICE = ["\u0301", "\u0308", "😀", "👩‍👩‍👧", "שלום", "مرحبا", "\u200f", "\u202e", "\x00", "\x07", "\x1b", "\x7f",
         "\r", '"', "'", "“", "\u3000", "\u00a0", "中文", "ﬁ", "İ", "ß", " ", "  ", "the", "cat", "jacksonville"]
text_field = st.lists(st.one_of(st.sampled_from(SPICE), st.text(max_size=6)), max_size=12).map("".join)
huge_field = st.integers(min_value=200, max_value=800).map(lambda n: "the cat " * n)
field = st.one_of(text_field, text_field, text_field, huge_field, st.just(""))
row = st.lists(field, min_size=1, max_size=4)  # ragged: 1..4 fields where the header has 2


@st.composite
def tsv_bytes(draw):
    rows = draw(st.lists(row, min_size=1, max_size=12))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    bom = draw(st.booleans())
    body = [("\t".join(r)).encode("utf-8", errors="surrogatepass") for r in rows]
    body = [b.replace(b"\n", b" ") for b in body]
    # invalid UTF-8: a stray byte somewhere in some rows
    for i in draw(st.lists(st.integers(0, len(body) - 1), max_size=2)):
        pos = draw(st.integers(0, len(body[i])))
        body[i] = body[i][:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + body[i][pos:]
    data = (b"\xef\xbb\xbf" if bom else b"") + b"id\ttext" + eol + eol.join(body) + draw(st.sampled_from([eol, b""]))
    return data, len(body)


@pytest.fixture(scope="module")
def scorer(fake_export_session):
    md = ModelDir.open(fake_export_session)
    return Scorer(md, FakeEngine(md), mode="whole-word")


def _run(data: bytes, scorer, on_bad_row: str):
    with tempfile.TemporaryDirectory() as d:
        tsv = Path(d) / "in.tsv"
        tsv.write_bytes(data)
        out = Path(d) / "out.parquet"
        try:
            summary = score_file(tsv, out, scorer=scorer, on_bad_row=on_bad_row, id_column="id", chunk_rows=4)
        except InputError as exc:
            assert str(tsv) in str(exc) and exc.line is not None, str(exc)
            assert not out.exists()
            return exc, None, None, data
        return summary, *read_outputs(out), data


def _data_lines(data: bytes) -> list[bytes]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines][1:]


@FUZZ
@given(tsv_bytes())
def test_skip_mode_scores_or_records_every_row(scorer, case):
    data, n = case
    summary, words, sents, _ = _run(data, scorer, "skip")
    lines = _data_lines(data)
    assert len(sents) == len(lines) == summary.rows, "one sentence row per input row, none lost or duplicated"
    assert [s["row"] for s in sents] == list(range(len(lines)))
    assert [s["line"] for s in sents] == list(range(2, len(lines) + 2))
    ok_rows = set()
    for s, raw in zip(sents, lines):
        if s["status"] == "ok":
            ok_rows.add(s["row"])
            fields = raw.decode("utf-8").split("\t")
            assert len(fields) == 2 and s["id"] == fields[0] and s["text"] == fields[1], "maps back to its row"
            assert s["n_words"] > 0 and s["pll"] is not None
        else:
            assert s["status"] == "skipped" and s["error"] and f":{s['line']}" in s["error"]
    by_row: dict[int, list] = {}
    for w in words:
        by_row.setdefault(w["row"], []).append(w)
    assert set(by_row) == ok_rows
    for r, ws in by_row.items():
        text = sents[r]["text"]
        assert [w["word_index"] for w in ws] == list(range(sents[r]["n_words"]))
        for w in ws:
            assert text[w["char_start"]:w["char_end"]] == w["word"]


@FUZZ
@given(tsv_bytes())
def test_fail_mode_stops_at_the_first_bad_row_or_scores_all(scorer, case):
    data, _ = case
    result = _run(data, scorer, "fail")
    skip_summary, _, skip_sents, _ = _run(data, scorer, "skip")
    first_bad = next((s["line"] for s in skip_sents if s["status"] != "ok"), None)
    if isinstance(result[0], InputError):
        assert result[0].line == first_bad, "fail mode names the first bad line"
    else:
        assert first_bad is None and result[0].scored == skip_summary.scored
