"""``score_frame``: score the texts of a pandas DataFrame in memory; DataFrames out, no file written.

    from mlm_scorer import score_frame
    words, sentences = score_frame(df, text_column="text", id_column="id", model="models/bert")

The two DataFrames have the columns of the Parquet files ``score_file`` writes, in the same order, with
the same numbers (``pd.read_parquet`` of those files gives the same frames): ``row`` is the 0-based
position in ``df`` and ``line`` is ``row + 1`` (as for a Parquet input); ``id`` (the id column, renamed)
and the other columns of ``df`` follow with their own dtypes. ``sentences`` keeps ``df``'s index, so
``df.join(sentences[["pll", "pseudo_perplexity"]])`` lines up. Both carry ``attrs["mlm_scorer"]`` (the
Parquet files' metadata: model, checksum, mode, engine, flag rules); ``sentences.attrs["summary"]`` is
the run summary (``ScoreSummary.to_dict()``).

Settings are ``score_file``'s (a ``ScoreSettings``, or the same by keyword), with the same defaults but
``text_column`` ("text"); those about files (``header``, ``resume``) are refused with the reason.
"""
from __future__ import annotations

import math
import time
from typing import Any

from .errors import InputError, UsageError
from .reader import Layout, Row, layout_for

SOURCE = "DataFrame"  # the "file" in messages: DataFrame:4: ... is the row at position 3
#: Settings that do not apply to a DataFrame: {setting: why}.
NOT_HERE = {"header": "a DataFrame has its column names; header is about TSV files",
            "resume": "score_frame writes no file, so there is nothing committed to resume"}


def score_frame(df, settings=None, *, log=None, scorer=None, **options: Any):
    """Score ``df[text_column]``; return ``(words, sentences)`` pandas DataFrames (see the module doc).

    ``settings`` and keyword ``options`` as ``score_file``'s. A null or empty text is a bad row:
    ``on_bad_row="fail"`` (the default) raises InputError naming its position (``DataFrame:LINE``, LINE =
    position + 1); "skip" gives it a sentence row with status "skipped". Raises UsageError for an unknown
    option or column, and for a setting about files (``NOT_HERE``).
    """
    import pyarrow as pa

    from .pipeline import (ScoreSummary, _add_stats, _close_scorer, _finish_summary, _flag_rules, _score_chunk,
                           build_columns, open_scorer, output_metadata, warn, with_scorer)
    from .progress import Progress
    from .quality import RunQuantiles
    from .settings import refuse, settings_from
    from .writer import sentence_schema, word_schema

    if isinstance(settings, (str, int)) and not isinstance(settings, bool):  # score_frame(df, "text"): the text
        settings, options = None, {"text_column": settings, **options}       # column, as its second argument was
    o = settings_from(settings, options, door="score_frame")
    refuse(o, NOT_HERE, "score_frame")
    if scorer is not None:
        o = with_scorer(o, scorer, door="score_frame")
    if o.text_column is None:  # a DataFrame's default text column
        o = o.replace(text_column="text")

    t0 = time.perf_counter()
    names = [str(c) for c in df.columns]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"the DataFrame has duplicate column name(s) {dup}")
    lay = layout_for(names, o.text_column, o.id_column, SOURCE)
    kind = getattr(df.dtypes.iloc[lay.text], "kind", "O")
    if kind in "biufcmM":  # numbers, booleans, times: not text (a float column's NaN would be the word "nan")
        raise UsageError(f"{SOURCE}: the text column {names[lay.text]!r} has dtype {df.dtypes.iloc[lay.text]}, not "
                         f"text: choose the text with text_column=NAME, or convert the column to str first")
    n = len(df) if o.limit is None else min(len(df), o.limit)
    rows = [_row(i, t, lay, o.max_row_chars) for i, t in enumerate(df.iloc[:n, lay.text].tolist())]

    owns = scorer is None
    if owns:
        scorer = open_scorer(o, log=log)
    try:
        notes: list[str] = []
        rules = _flag_rules(o.rules, o.baseline, scorer, notes)
        load_seconds = time.perf_counter() - t0
        core = Layout(names=[names[lay.text]], text=0, id=None, passthrough=[])  # id and the rest: added below
        wschema, sschema = word_schema(None, [], scorer.top_k > 0), sentence_schema(None, [], bool(rules))
        summary = ScoreSummary(input=SOURCE, output="", sentences_output="", engine=scorer.engine.name,
                               mode=scorer.mode, model=str(scorer.model.path), model_checksum=scorer.model.checksum,
                               settings=o.scoring())
        tk = scorer.tokenizer
        vocab = [tk.id_to_token(i) for i in range(tk.vocab_size)] if scorer.top_k else None
        mode = "off" if o.progress is False else Progress.auto_mode(o.progress)
        bar = Progress(n if mode != "off" else None, mode=mode)
        words, sents = [], []
        try:
            for a in range(0, n, o.chunk_rows):
                chunk = rows[a:a + o.chunk_rows]
                prepared = scorer.prepare([r.text for r in chunk if r.error is None])
                results = _score_chunk(scorer, prepared, len(chunk), bar)
                W, S, st = build_columns(chunk, results, path=SOURCE, on_bad_row=o.on_bad_row, scorer=scorer,
                                         layout=core, vocab=vocab, flag_rules=rules)
                st["skipped_rows"] = st.pop("skipped")[: ScoreSummary.MAX_LISTED]
                st["skipped"] = len(S["row"]) - st["scored"]
                _add_stats(summary, st)
                words.append(pa.Table.from_pydict(W, schema=wschema))
                sents.append(pa.Table.from_pydict(S, schema=sschema))
            bar.close()
        finally:
            bar.close(done=False)
        warn(summary, notes)
        second = RunQuantiles.from_tables(rules, sents)  # percentiles of this run: a second pass, in memory
        if second is not None:
            sents = [second.apply(t) for t in sents]
            summary.flagged, rules = second.flagged, second.rules
            warn(summary, second.notes)
        summary.flag_rules = [str(r) for r in rules]
        _finish_summary(summary, scorer)
    finally:
        if owns:
            _close_scorer(scorer)
    summary.load_seconds = load_seconds + getattr(scorer.engine, "open_seconds", 0.0)
    summary.seconds = time.perf_counter() - t0

    w = _frame(words, wschema, df, lay, names)
    s = _frame(sents, sschema, df, lay, names)
    s.index = df.index[s["row"].to_numpy()]
    meta = output_metadata(o, scorer, input=SOURCE, flag_rules=rules)
    w.attrs["mlm_scorer"] = s.attrs["mlm_scorer"] = meta
    s.attrs["summary"] = summary.to_dict()
    return w, s


def _row(i: int, text, lay: Layout, max_chars: int) -> Row:
    if text is None or (isinstance(text, float) and math.isnan(text)) or type(text).__name__ in ("NAType", "NaTType"):
        return Row(i, i + 1, None, error=InputError(f"the text column {lay.names[lay.text]!r} is null", path=SOURCE,
                                                    line=i + 1, reason="null_text"))
    if not isinstance(text, str):  # bytes, a list, a number in an object column: never scored through str()
        return Row(i, i + 1, None, error=InputError(
            f"the text column {lay.names[lay.text]!r} holds a {type(text).__name__} here, not a str; decode or "
            f"convert it first", path=SOURCE, line=i + 1, reason="not_text"))
    if len(text) > max_chars:
        return Row(i, i + 1, None, error=InputError(
            f"the text is {len(text)} characters long, more than max_row_chars {max_chars}", path=SOURCE,
            line=i + 1, reason="row_too_long"))
    return Row(i, i + 1, text)


def _frame(tables: list, schema, df, lay: Layout, names: list[str]):
    """A pandas DataFrame of the tables, with the id and pass-through columns of ``df`` after ``line``."""
    import pyarrow as pa

    out = (pa.concat_tables(tables) if tables else schema.empty_table()).to_pandas()
    pos = out["row"].to_numpy()
    extra = ([("id", lay.id)] if lay.id is not None else []) + [(names[j], j) for j in lay.passthrough]
    for k, (name, j) in enumerate(extra):
        out.insert(2 + k, name, df.iloc[pos, j].reset_index(drop=True))
    return out
