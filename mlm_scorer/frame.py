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

Options are ``score_file``'s, with the same defaults, except those about files (``header``, ``resume``).
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any

from .errors import InputError, UsageError
from .reader import Layout, Row, layout_for

SOURCE = "DataFrame"  # the "file" in messages: DataFrame:4: ... is the row at position 3
_FILE_ONLY = {"input_path", "output", "text_column", "id_column", "header", "resume"}


def score_frame(df, text_column: str | int = "text", id_column: str | int | None = None, **options: Any):
    """Score ``df[text_column]``; return ``(words, sentences)`` pandas DataFrames (see the module doc).

    A null or empty text is a bad row: ``on_bad_row="fail"`` (the default) raises InputError naming its
    position (``DataFrame:LINE``, LINE = position + 1); "skip" gives it a sentence row with status
    "skipped". Raises UsageError for an unknown option or column.
    """
    import pyarrow as pa

    from .pipeline import (ScoreSummary, _add_stats, _check_options, _close_scorer, _finish_summary, _flag_rules,
                           _score_chunk, build_columns, open_scorer, score_file, warn)
    from .progress import Progress
    from .quality import RunQuantiles
    from .writer import sentence_schema, word_schema

    params = inspect.signature(score_file).parameters
    unknown = sorted(set(options) - (set(params) - _FILE_ONLY))
    if unknown:
        raise UsageError(f"score_frame does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(set(params) - _FILE_ONLY))}")
    o = {k: options.get(k, p.default) for k, p in params.items() if k not in _FILE_ONLY}
    _check_options(on_bad_row=o["on_bad_row"], chunk_rows=o["chunk_rows"], dedupe_cache=o["dedupe_cache"],
                   limit=o["limit"], max_row_chars=o["max_row_chars"], max_batch_size=o["max_batch_size"],
                   batch_tokens=o["batch_tokens"])

    t0 = time.perf_counter()
    names = [str(c) for c in df.columns]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"the DataFrame has duplicate column name(s) {dup}")
    lay = layout_for(names, text_column, id_column, SOURCE)
    kind = getattr(df.dtypes.iloc[lay.text], "kind", "O")
    if kind in "biufcmM":  # numbers, booleans, times: not text (a float column's NaN would be the word "nan")
        raise UsageError(f"{SOURCE}: the text column {names[lay.text]!r} has dtype {df.dtypes.iloc[lay.text]}, not "
                         f"text: choose the text with text_column=NAME, or convert the column to str first")
    n = len(df) if o["limit"] is None else min(len(df), o["limit"])
    rows = [_row(i, t, lay, o["max_row_chars"]) for i, t in enumerate(df.iloc[:n, lay.text].tolist())]

    scorer, owns = o["scorer"], o["scorer"] is None
    if owns:
        scorer = open_scorer(model=o["model"], model_version=o["model_version"], engine=o["engine"],
                             engine_options=o["engine_options"], mode=o["mode"], top_k=o["top_k"],
                             batch_tokens=o["batch_tokens"], max_batch_size=o["max_batch_size"],
                             cache_dir=o["cache_dir"], dedupe_cache=o["dedupe_cache"],
                             score_cache=o["score_cache"], log=o["log"])
    try:
        notes: list[str] = []
        rules = _flag_rules(o["flag_rules"], o["baseline"], scorer, notes)
        load_seconds = time.perf_counter() - t0
        core = Layout(names=[names[lay.text]], text=0, id=None, passthrough=[])  # id and the rest: added below
        wschema, sschema = word_schema(None, [], scorer.top_k > 0), sentence_schema(None, [], bool(rules))
        summary = ScoreSummary(input=SOURCE, output="", sentences_output="", engine=scorer.engine.name,
                               mode=scorer.mode, model=str(scorer.model.path), model_checksum=scorer.model.checksum)
        tk = scorer.tokenizer
        vocab = [tk.id_to_token(i) for i in range(tk.vocab_size)] if scorer.top_k else None
        mode = "off" if o["progress"] is False else Progress.auto_mode(o["progress"])
        bar = Progress(n if mode != "off" else None, mode=mode)
        words, sents = [], []
        try:
            for a in range(0, n, o["chunk_rows"]):
                chunk = rows[a:a + o["chunk_rows"]]
                prepared = scorer.prepare([r.text for r in chunk if r.error is None])
                results = _score_chunk(scorer, prepared, len(chunk), bar)
                W, S, st = build_columns(chunk, results, path=SOURCE, on_bad_row=o["on_bad_row"], scorer=scorer,
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
    meta = {"model": str(scorer.model.path), "model_checksum": scorer.model.checksum, "mode": scorer.mode,
            "engine": scorer.engine.name, "input": SOURCE, "flag_rules": summary.flag_rules,
            **({"baseline": str(o["baseline"])} if o["baseline"] else {})}
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
