"""DataFrames and Parquet in: ``score_frame`` equals ``score_file`` (the same columns, the same numbers,
no file written), and ``mlm-score input.parquet`` equals the same rows given as a TSV."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import write_tsv

pd = pytest.importorskip("pandas", reason="pandas is not installed (pip install 'mlm-scorer[test]')")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _sample_frame():
    """data/sample.tsv as a DataFrame of strings, as written (a TSV has no quoting)."""
    lines = (ROOT / "data" / "sample.tsv").read_text(encoding="utf-8").splitlines()
    table = [line.split("\t") for line in lines]
    return pd.DataFrame(table[1:], columns=table[0])


def _assert_frames_match(got, ref, rel: float) -> None:
    """Same columns in the same order, same values; floats within ``rel`` (relative and absolute)."""
    assert list(got.columns) == list(ref.columns)
    assert len(got) == len(ref)
    for c in ref.columns:
        for i, (x, y) in enumerate(zip(got[c].tolist(), ref[c].tolist())):
            if hasattr(y, "tolist"):  # a list column (top_k) comes as an array
                x, y = x.tolist(), y.tolist()
            if isinstance(y, float) and math.isnan(y):
                assert isinstance(x, float) and math.isnan(x), (c, i, x, y)
            elif isinstance(y, float):
                assert x == y or math.isclose(x, y, rel_tol=rel, abs_tol=rel), (c, i, x, y)
            else:
                assert x == y, (c, i, x, y)


@pytest.mark.parametrize("engine", ["saved_model", "fake"])
def test_score_frame_equals_score_file(engine, tiny_export, fake_export_session, tmp_path):
    from mlm_scorer import score_file, score_frame
    from mlm_scorer.quality import parse_rule

    model = str(tiny_export if engine == "saved_model" else fake_export_session)
    df = _sample_frame()
    df.loc[len(df)] = ["x1", "", "empty"]  # a bad row: skipped in both
    tsv = write_tsv(tmp_path / "in.tsv", df.values.tolist(), header=list(df.columns))
    rules = [parse_rule("pseudo_perplexity=p90", "above"), parse_rule("min_word_prob=1e-30", "below")]
    kw = dict(model=model, engine=engine, id_column="id", on_bad_row="skip", flag_rules=rules, top_k=2,
              chunk_rows=7)
    before = set(tmp_path.iterdir())
    words, sents = score_frame(df, **kw)
    assert set(tmp_path.iterdir()) == before  # nothing written
    summary = score_file(tsv, tmp_path / "ref.parquet", **kw)
    ref_w = pq.read_table(tmp_path / "ref.parquet").to_pandas()
    ref_s = pq.read_table(tmp_path / "ref.sentences.parquet").to_pandas()
    for ref in (ref_w, ref_s):  # a DataFrame row has no line of a file: line is its position + 1
        ref["line"] -= 1
    ref_s["error"] = [e if not isinstance(e, str) else e.replace(f"{tsv}:{n + 1}:", f"DataFrame:{n}:")
                      for e, n in zip(ref_s["error"], ref_s["line"])]
    # the same batches (chunk by chunk) as score_file: equal to float32 resolution, and in fact exactly
    _assert_frames_match(sents, ref_s, rel=1e-6)
    _assert_frames_match(words, ref_w, rel=1e-6)
    assert sents.attrs["summary"]["scored"] == summary.scored == 30 and sents.attrs["summary"]["skipped"] == 1
    assert sents.attrs["summary"]["flag_rules"] == summary.flag_rules and "(of the run: " in summary.flag_rules[0]
    assert sents.attrs["mlm_scorer"]["model_checksum"] == summary.model_checksum
    assert sents["flag"].sum() == summary.flagged > 0
    assert isinstance(words["top_k"].iloc[0][0]["token"], str)


def test_score_frame_keeps_the_frames_index_and_dtypes(fake_export_session):
    from mlm_scorer import score_frame
    from mlm_scorer.errors import InputError, UsageError

    df = pd.DataFrame({"sentence": ["The cat sat.", None, "A dog ran home."], "label": [1, 0, 1],
                       "weight": [0.5, 1.5, 2.5], "key": [10, 20, 30]}, index=["a", "b", "c"])
    kw = dict(model=str(fake_export_session), engine="fake")
    words, sents = score_frame(df, text_column="sentence", id_column="key", on_bad_row="skip", **kw)
    assert list(sents.index) == ["a", "b", "c"]
    assert list(sents.columns[:5]) == ["row", "line", "id", "label", "weight"]
    assert sents["label"].dtype == df["label"].dtype and sents["id"].tolist() == [10, 20, 30]
    assert sents["status"].tolist() == ["ok", "skipped", "ok"] and "is null" in sents["error"].iloc[1]
    assert words["row"].tolist() == [0, 0, 0, 0, 2, 2, 2, 2, 2] and words["weight"].iloc[-1] == 2.5
    joined = df.join(sents[["pll"]])  # lines up by the frame's own index
    assert joined["pll"].notna().tolist() == [True, False, True]
    # the first bad row under on_bad_row="fail" names its position (line = position + 1)
    with pytest.raises(InputError, match=r"^DataFrame:2: the text column 'sentence' is null"):
        score_frame(df, text_column="sentence", **kw)
    with pytest.raises(UsageError, match="does not take resume"):
        score_frame(df, text_column="sentence", resume=True, **kw)
    with pytest.raises(UsageError, match=r"not a column of the header \['sentence'"):
        score_frame(df, text_column="txt", **kw)
    # a column named like an output column: refused before any scoring (it used to fail after)
    with pytest.raises(InputError, match=r"^DataFrame: the input column 'pll' has the name of a column"):
        score_frame(df.assign(pll=1.0), text_column="sentence", **kw)
    # an empty frame: the columns, no rows, and no engine opened (this export has no SavedModel to open)
    w0, s0 = score_frame(df.iloc[:0], text_column="sentence", id_column="key", model=str(fake_export_session),
                         engine="saved_model")
    assert len(w0) == len(s0) == 0 and list(s0.columns) == list(sents.columns)


def test_parquet_input_equals_tsv_input(fake_export_session, tmp_path):
    """mlm-score input.parquet: the text and id columns by name, every other column passed through (as
    strings, as from a TSV); the outputs equal those of the same rows as a TSV, but for ``line``."""
    from mlm_scorer.cli import main

    df = _sample_frame()
    tsv = write_tsv(tmp_path / "in.tsv", df.values.tolist(), header=list(df.columns))
    # columns in another order, an int column, several row groups
    t = pa.table({"source": df["source"], "n": pa.array(range(len(df)), pa.int64()), "text": df["text"],
                  "id": df["id"]})
    pq.write_table(t, tmp_path / "in.parquet", row_group_size=7)
    with open(tsv, "w", encoding="utf-8") as f:
        f.write("source\tn\ttext\tid\n" + "".join(f"{s}\t{i}\t{x}\t{k}\n" for s, i, x, k in
                                                   zip(df["source"], range(len(df)), df["text"], df["id"])))
    base = ["--model", str(fake_export_session), "--engine", "fake", "--id-column", "id", "-q", "--chunk-rows", "8"]
    assert main([str(tmp_path / "in.parquet"), "-o", str(tmp_path / "p.parquet")] + base) == 0
    assert main([str(tsv), "-o", str(tmp_path / "t.parquet")] + base) == 0
    for name in ("p.parquet", "p.sentences.parquet"):
        got = pq.read_table(tmp_path / name)
        ref = pq.read_table(tmp_path / name.replace("p.", "t.", 1))
        assert got.schema.remove_metadata() == ref.schema.remove_metadata()
        g, r = got.to_pydict(), ref.to_pydict()
        assert g.pop("line") == [x - 1 for x in r.pop("line")]  # a Parquet row's line is its row number + 1
        assert g == r
    # a null text is a bad row at its row number; a column that cannot be text is refused at once
    pq.write_table(pa.table({"text": ["A cat.", None]}), tmp_path / "null.parquet")
    assert main([str(tmp_path / "null.parquet"), "-o", str(tmp_path / "n.parquet"), "--model",
                 str(fake_export_session), "--engine", "fake", "-q"]) == 3
    pq.write_table(pa.table({"text": ["A cat."], "v": pa.array([[1, 2]])}), tmp_path / "list.parquet")
    assert main([str(tmp_path / "list.parquet"), "-o", str(tmp_path / "l.parquet"), "--model",
                 str(fake_export_session), "--engine", "fake", "-q"]) == 2
    (tmp_path / "bad.parquet").write_text("id\ttext\n")
    assert main([str(tmp_path / "bad.parquet"), "-o", str(tmp_path / "b.parquet"), "--model",
                 str(fake_export_session), "--engine", "fake", "-q"]) == 3
