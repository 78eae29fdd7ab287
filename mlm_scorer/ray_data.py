"""Score a dataset past one machine with Ray Data: read, score in an actor pool, write Parquet.

    from mlm_scorer.ray_data import score_dataset
    summary = score_dataset(["a.tsv", "b.tsv"], "out/", model="models/bert", num_actors=4)

or ``mlm-score ray a.tsv b.tsv -o out/ --model models/bert --num-actors 4``.

Pipeline::

    inputs --read tasks--> chunks of rows (file, row, line, text, id, pass-through, read error)
           --map_batches(actor pool: one Scorer per actor, model loaded once)--> sentence rows + nested words
           --materialize--> write OUTDIR/sentences/*.parquet and (exploded) OUTDIR/words/*.parquet

Reading: a TSV file is read by one task with the CLI's own reader (``TsvReader``: same header rules,
same bad-row errors with file:line:column); a Parquet file is read one row group per task. Scoring, the
costly part, is spread over ``num_actors`` actors, each holding one model. The actors turn rows and
results into columns with ``pipeline.build_columns``, the function the single-machine CLI uses, so the
numbers and columns are the CLI's.

Output (``OUTDIR``, replaced as a whole at the end: a rerun gives the same result, never a mix)::

    OUTDIR/words/       Parquet dataset: a leading ``file`` column (the input path as given), then exactly
                        the CLI's word schema (``writer.word_schema``): row, line, [id], [pass-through], ...
    OUTDIR/sentences/   ``file`` + exactly the CLI's sentence schema (``writer.sentence_schema``)
    OUTDIR/summary.json counts and settings (the same keys as the CLI's ``--summary-json`` where they apply)

``row`` is the 0-based data row within its file and ``line`` the 1-based physical line of a TSV (for a
Parquet input: the 1-based row number in the file), so every output row maps back to (file, row, line).
Rows are written in input order (files in the order given, rows in file order); reading the
directories with ``pyarrow.parquet.read_table`` gives them in that order. Both Parquet datasets carry
the CLI's schema metadata key ``mlm_scorer`` (model, mode, engine, inputs), so ``mlm-score report``
reads them too.

All inputs of one run must have the same columns (one output schema). On a multi-node cluster, give
``output_dir`` on a filesystem every node sees (the workers write the part files); the final rename is
done by the driver.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from .errors import InputError, MlmScorerError, UsageError
from .models import DEFAULT_MODEL
from .quality import FlagRule
from .reader import Layout, Row, TsvReader
from .writer import sentence_schema, word_schema

__all__ = ["score_dataset", "OUTPUT_MARKER"]

OUTPUT_MARKER = "summary.json"  # present in every directory score_dataset wrote (so it may replace it)
_WORD_FIELDS = ("word_index", "word", "char_start", "char_end", "n_pieces", "log_prob", "prob")
_ERR = ("_err_message", "_err_reason", "_err_column")


# ----------------------------------------------------------------------------------------------- layout
def _is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


def _parquet_layout(path: str, text_column, id_column) -> Layout:
    import pyarrow.parquet as pq

    from .reader import layout_for

    return layout_for(pq.read_schema(path).names, text_column, id_column, path)


def _layout(path: str, text_column, id_column, header: bool) -> Layout:
    if _is_parquet(path):
        return _parquet_layout(path, text_column, id_column)
    with TsvReader(path, text_column=text_column, id_column=id_column, header=header) as r:
        return r.layout


def _check_layouts(inputs: list[str], layouts: list[Layout]) -> Layout:
    first = layouts[0]
    for path, lay in zip(inputs[1:], layouts[1:]):
        if (lay.id_name, lay.passthrough_names, lay.text is None) != (first.id_name, first.passthrough_names,
                                                                       first.text is None):
            raise UsageError(f"all inputs of one run need the same columns: {inputs[0]} has {first.names}, "
                             f"{path} has {lay.names} (score them in separate runs)")
    return first


# ---------------------------------------------------------------------------------------------- reading
def _chunk_table(file: str, rows: list[Row], lay: Layout) -> pa.Table:
    cols: dict[str, list] = {"file": [file] * len(rows), "row": [r.index for r in rows],
                             "line": [r.line for r in rows], "text": [r.text for r in rows],
                             "id": [r.id for r in rows]}
    for j, name in enumerate(lay.passthrough_names):
        cols[f"_p{j}"] = [r.passthrough[j] if j < len(r.passthrough) else None for r in rows]
    cols["_err_message"] = [r.error.detail if r.error else None for r in rows]
    cols["_err_reason"] = [r.error.reason if r.error else None for r in rows]
    cols["_err_column"] = [r.error.column if r.error else None for r in rows]
    types = {"row": pa.int64(), "line": pa.int64(), "_err_column": pa.int64()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})


def _read_task(spec: dict, *, text_column, id_column, header: bool, chunk_rows: int):
    """Yield chunks (Arrow tables) of one input: a whole TSV, or one row group of a Parquet file."""
    path = spec["path"]
    if spec["kind"] == "tsv":
        with TsvReader(path, text_column=text_column, id_column=id_column, header=header) as reader:
            lay = reader.layout
            chunk: list[Row] = []
            for row in reader:
                chunk.append(row)
                if len(chunk) >= chunk_rows:
                    yield _chunk_table(path, chunk, lay)
                    chunk = []
            if chunk:
                yield _chunk_table(path, chunk, lay)
        return
    import pyarrow.parquet as pq

    lay = _parquet_layout(path, text_column, id_column)
    table = pq.ParquetFile(path).read_row_group(spec["row_group"])
    offset = spec["offset"]
    text = table.column(lay.text).cast(pa.string()).to_pylist()
    ids = table.column(lay.id).cast(pa.string()).to_pylist() if lay.id is not None else [None] * len(text)
    passthrough = [table.column(j).cast(pa.string()).to_pylist() for j in lay.passthrough]
    for a in range(0, len(text), chunk_rows):
        rows = []
        for k in range(a, min(a + chunk_rows, len(text))):
            idx = offset + k
            err = None if text[k] is not None else InputError(
                f"the text column {lay.names[lay.text]!r} is null", path=path, line=idx + 1, reason="null_text")
            rows.append(Row(idx, idx + 1, text[k], ids[k], tuple(p[k] for p in passthrough), err))
        yield _chunk_table(path, rows, lay)


def _read_specs(inputs: list[str]) -> list[dict]:
    import pyarrow.parquet as pq

    specs = []
    for path in inputs:
        if _is_parquet(path):
            md = pq.ParquetFile(path).metadata
            offset = 0
            for g in range(md.num_row_groups):
                specs.append({"path": path, "kind": "parquet", "row_group": g, "offset": offset})
                offset += md.row_group(g).num_rows
        else:
            specs.append({"path": path, "kind": "tsv", "row_group": -1, "offset": 0})
    return specs


# ---------------------------------------------------------------------------------------------- scoring
def _nested_schema(id_name, passthrough: list[str], top_k: bool, flag: bool) -> pa.Schema:
    """``file`` + the sentence schema + ``_words``: the word-only fields of each word, nested."""
    ws = word_schema(id_name, passthrough, top_k)
    word_struct = pa.struct([ws.field(n) for n in _WORD_FIELDS + (("top_k",) if top_k else ())])
    return pa.schema([pa.field("file", pa.string())] + list(sentence_schema(id_name, passthrough, flag))
                     + [pa.field("_words", pa.list_(word_struct)), pa.field("_actor", pa.string())])


class _ScoreActor:
    """One model per actor: loaded in ``__init__``, reused for every batch the actor gets."""

    def __init__(self, *, model: str, model_version, engine: str, engine_options: dict, mode: str, top_k: int,
                 batch_tokens: int, max_batch_size, cache_dir, layout: Layout, on_bad_row: str,
                 flag_rules: list[FlagRule]):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from .batching import BatchPolicy
        from .engines.base import get_engine
        from .models import resolve_model
        from .scorer import Scorer

        md = resolve_model(model, version=model_version, cache_dir=cache_dir)
        eng = get_engine(engine, model=md, top_k=top_k > 0, **engine_options)
        policy = BatchPolicy.for_engine(eng, batch_tokens, max_batch_size)
        self.scorer = Scorer(md, eng, mode=mode, top_k=top_k, policy=policy)
        self.layout, self.on_bad_row, self.flag_rules = layout, on_bad_row, flag_rules
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"  # which actor scored a row (summary: actors)
        lay = layout
        self.schema = _nested_schema(lay.id_name, lay.passthrough_names, top_k > 0, bool(flag_rules))
        self.vocab = ([self.scorer.tokenizer.id_to_token(i) for i in range(self.scorer.tokenizer.vocab_size)]
                      if top_k else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Ray may put rows of several files (or read tasks) in one batch: score file by file, in order.
        files = batch.column("file").to_pylist()
        pieces = []
        start = 0
        for k in range(1, len(files) + 1):
            if k == len(files) or files[k] != files[start]:
                pieces.append(self._score(files[start], batch.slice(start, k - start)))
                start = k
        if not pieces:
            return self.schema.empty_table()
        return pa.concat_tables(pieces)

    def _score(self, path: str, t: pa.Table) -> pa.Table:
        from .pipeline import build_columns

        lay = self.layout
        c = {name: t.column(name).to_pylist() for name in t.column_names}
        n_pass = len(lay.passthrough_names)
        rows = []
        for k in range(t.num_rows):
            err = None
            if c["_err_message"][k] is not None:
                err = InputError(c["_err_message"][k], path=path, line=c["line"][k], column=c["_err_column"][k],
                                 reason=c["_err_reason"][k] or "bad_row")
            rows.append(Row(c["row"][k], c["line"][k], c["text"][k], c["id"][k],
                            tuple(c[f"_p{j}"][k] for j in range(n_pass)), err))
        sc = self.scorer
        try:
            results = sc.run(sc.prepare([r.text for r in rows if r.error is None]))
            W, S, _stats = build_columns(rows, results, path=path, on_bad_row=self.on_bad_row, scorer=sc,
                                         layout=lay, vocab=self.vocab, flag_rules=self.flag_rules)
        except MlmScorerError as exc:
            raise _Shipped(exc) from None
        # nest each sentence's words (contiguous in W, in row order) under it
        counts = [n or 0 for n in S["n_words"]]
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        wstruct = self.schema.field("_words").type.value_type
        words = pa.StructArray.from_arrays(
            [pa.array(W[f.name], type=f.type) for f in wstruct], fields=list(wstruct))
        S = dict(S)
        S["file"] = [path] * len(S["row"])
        S["_actor"] = [self.actor_id] * len(S["row"])
        arrays = []
        for f in self.schema:
            if f.name == "_words":
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), words, type=f.type))
            else:
                arrays.append(pa.array(S[f.name], type=f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)


def _explode_words(batch: pa.Table, *, schema: pa.Schema) -> pa.Table:
    """Sentence rows with nested words -> one row per word (``file`` + the CLI's word schema)."""
    import pyarrow.compute as pc

    nested = batch.column("_words").combine_chunks()
    parent = pc.list_parent_indices(nested)
    flat = pc.list_flatten(nested)
    keys = batch.select([f.name for f in schema if f.name not in _WORD_FIELDS + ("top_k",)]).take(parent)
    cols = {name: keys.column(name) for name in keys.column_names}
    for i, f in enumerate(flat.type):
        cols[f.name] = flat.field(i)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


# ------------------------------------------------------------------------------------------------ main
def score_dataset(inputs: list[str] | str, output_dir: str | os.PathLike, *, model: str | os.PathLike = DEFAULT_MODEL,
                  model_version: int | None = None, engine: str = "saved_model",
                  engine_options: dict[str, Any] | None = None, mode: str = "whole-word",
                  text_column: str | int | None = None, id_column: str | int | None = None, header: bool = True,
                  on_bad_row: str = "fail", top_k: int = 0, flag_rules: list[FlagRule] | None = None,
                  num_actors: int = 2, num_cpus_per_actor: float = 1, num_gpus_per_actor: float = 0,
                  batch_rows: int = 512, read_chunk_rows: int = 2048, read_num_cpus: float = 0.25,
                  batch_tokens: int | None = None, max_batch_size: int | None = None,
                  cache_dir: str | os.PathLike | None = None, ray_address: str | None = None,
                  ray_init_options: dict[str, Any] | None = None, overwrite: bool = True,
                  wait_for_actors_s: float = 600, baseline: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Score TSV and/or Parquet files with a Ray actor pool; write ``output_dir/{words,sentences}``.

    ``num_actors`` actors each load the model once and take ``num_cpus_per_actor`` CPUs and
    ``num_gpus_per_actor`` GPUs (all must start within ``wait_for_actors_s``); ``batch_rows`` rows go to an
    actor at a time. Connects to Ray at
    ``ray_address`` (or starts a local Ray) unless Ray is already initialized. Raises InputError (with
    file:line) for a bad row under ``on_bad_row="fail"``, UsageError for bad arguments; on any error
    ``output_dir`` is left as it was. Returns the summary dict also written to ``summary.json``.
    Percentile flag rules (``pseudo_perplexity=p99``) take the percentile from ``baseline`` when given,
    else from this run: a second pass over the written sentence files before the output is published.
    """
    from .pipeline import ON_BAD_ROW

    t0 = time.perf_counter()
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise UsageError("no input files given")
    if on_bad_row not in ON_BAD_ROW:
        raise UsageError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    for name, v in (("num_actors", num_actors), ("batch_rows", batch_rows), ("read_chunk_rows", read_chunk_rows)):
        if v < 1:
            raise UsageError(f"{name} must be positive, got {v}")
    if num_cpus_per_actor < 0 or num_gpus_per_actor < 0:
        raise UsageError("num_cpus_per_actor and num_gpus_per_actor must be >= 0")
    for p in inputs:
        if p == "-":
            raise UsageError("the ray runner reads files, not stdin")
        if not Path(p).is_file():
            raise UsageError(f"input file {p!r} does not exist" if not Path(p).exists() else
                             f"input {p!r} is not a file")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} is a file; the ray runner writes a directory (words/, sentences/)")
    if out.is_dir() and any(out.iterdir()) and not (out / OUTPUT_MARKER).is_file():
        raise UsageError(f"output directory {str(out)!r} is not empty and was not written by mlm-score ray; "
                         f"refusing to replace it. Choose a new or empty directory")
    if out.is_dir() and (out / OUTPUT_MARKER).is_file() and not overwrite:
        raise UsageError(f"output directory {str(out)!r} exists (pass overwrite=True to replace it)")
    if not out.parent.is_dir():
        raise UsageError(f"the parent of the output directory, {str(out.parent)!r}, does not exist")
    flag_rules = list(flag_rules or [])
    lay = _check_layouts(inputs, [_layout(p, text_column, id_column, header) for p in inputs])

    # the model is resolved once here (exported into the cache if it is a checkpoint) so the actors only open it
    from .models import resolve_model

    if top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")
    md = resolve_model(model, version=model_version, cache_dir=cache_dir, log=log, engine=engine,
                       precision=(engine_options or {}).get("precision"), top_k=top_k)
    if baseline is not None and any(r.relative for r in flag_rules):
        from .quality import baseline_rules

        flag_rules = baseline_rules(flag_rules, baseline, model_checksum=md.checksum, mode=mode)
    engine_options = dict(engine_options or {})
    if engine == "saved_model" and num_cpus_per_actor >= 1:
        # one TF thread pool per actor, sized to its CPUs: actors sharing a node do not oversubscribe it
        engine_options.setdefault("intra_op_threads", int(num_cpus_per_actor))
        engine_options.setdefault("inter_op_threads", 1)

    import ray
    import ray.data

    if not ray.is_initialized():
        opts = {"include_dashboard": False, "log_to_driver": False, **(ray_init_options or {})}
        ray.init(address=ray_address, **opts)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.raise_original_map_exception,
             ctx.wait_for_min_actors_s)
    ctx.execution_options.preserve_order = True  # output rows in input order
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True  # an actor's InputError comes back as itself, not as a UDF failure
    # start scoring once every actor holds its model (all share the work from the first batch); a cluster
    # that cannot place them fails with a timeout instead of waiting forever
    ctx.wait_for_min_actors_s = int(wait_for_actors_s)
    try:
        return _execute(ray, inputs, out, md=md, lay=lay, mode=mode, engine=engine, engine_options=engine_options,
                        text_column=text_column, id_column=id_column, header=header, on_bad_row=on_bad_row,
                        top_k=top_k, flag_rules=flag_rules, num_actors=num_actors,
                        num_cpus_per_actor=num_cpus_per_actor, num_gpus_per_actor=num_gpus_per_actor,
                        batch_rows=batch_rows, read_chunk_rows=read_chunk_rows, read_num_cpus=read_num_cpus,
                        batch_tokens=batch_tokens, max_batch_size=max_batch_size, cache_dir=cache_dir, t0=t0,
                        baseline=None if baseline is None else str(baseline))
    finally:  # leave the caller's Ray Data settings as they were
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.raise_original_map_exception,
         ctx.wait_for_min_actors_s) = saved


def _execute(ray, inputs: list[str], out: Path, *, md, lay: Layout, mode, engine, engine_options, text_column,
             id_column, header, on_bad_row, top_k, flag_rules, num_actors, num_cpus_per_actor, num_gpus_per_actor,
             batch_rows, read_chunk_rows, read_num_cpus, batch_tokens, max_batch_size, cache_dir, t0,
             baseline=None) -> dict:
    specs = _read_specs(inputs)
    read_kw = {"text_column": text_column, "id_column": id_column, "header": header, "chunk_rows": read_chunk_rows}

    def read_batch(batch: pa.Table):
        for spec in batch.to_pylist():
            yield from _read_task(spec, **read_kw)

    rows_ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
        read_batch, batch_size=1, batch_format="pyarrow", num_cpus=read_num_cpus
    ).repartition(target_num_rows_per_block=batch_rows)  # blocks of batch_rows: one file spreads over the actors
    actor_kw = dict(model=str(md.path), model_version=None, engine=engine, engine_options=engine_options,
                    mode=mode, top_k=top_k, batch_tokens=batch_tokens, max_batch_size=max_batch_size,
                    cache_dir=cache_dir, layout=lay, on_bad_row=on_bad_row, flag_rules=flag_rules)
    scored = rows_ds.map_batches(
        _ScoreActor, fn_constructor_kwargs=actor_kw, batch_size=batch_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),  # a fixed pool (the `concurrency=N` of older Rays)
        num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor or None)
    try:
        scored = scored.materialize()
    except Exception as exc:  # Ray wraps the actor's exception: hand back ours (file:line message)
        own = _find_own_error(exc)
        if own is not None:
            raise own from None
        raise

    meta = {"model": str(md.path), "model_checksum": md.checksum, "mode": mode, "engine": engine,
            "input": inputs[0] if len(inputs) == 1 else ", ".join(inputs), "inputs": inputs,
            "flag_rules": [str(r) for r in flag_rules], "runner": "ray", **({"baseline": baseline} if baseline else {})}
    md_bytes = {"mlm_scorer": json.dumps(meta, sort_keys=True)}
    file_field = pa.field("file", pa.string())
    wschema = pa.schema([file_field] + list(word_schema(lay.id_name, lay.passthrough_names, top_k > 0)),
                        metadata=md_bytes)
    sschema = pa.schema([file_field] + list(sentence_schema(lay.id_name, lay.passthrough_names, bool(flag_rules))),
                        metadata=md_bytes)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if scored.count():
            sents = scored.drop_columns(["_words", "_actor"])
            sents.write_parquet(str(tmp / "sentences"), schema=sschema, compression="zstd")
            scored.map_batches(_explode_words, fn_kwargs={"schema": wschema}, batch_format="pyarrow",
                               num_cpus=read_num_cpus).write_parquet(str(tmp / "words"), schema=wschema,
                                                                     compression="zstd")
        else:  # no rows: Ray writes no file; write empty ones so readers still get the schema
            import pyarrow.parquet as pq

            for sub, sch in (("sentences", sschema), ("words", wschema)):
                (tmp / sub).mkdir()
                pq.write_table(sch.empty_table(), tmp / sub / "part-0.parquet", compression="zstd")
        summary = _summarize(scored, inputs=inputs, output=str(out), md=md, mode=mode, engine=engine, meta=meta,
                             flag=bool(flag_rules))
        from .quality import RunQuantiles  # percentiles of the run itself: a second pass over its sentences

        second = RunQuantiles.fit(flag_rules, sorted((tmp / "sentences").glob("*.parquet")))
        if second is not None:
            second.rewrite(sorted((tmp / "sentences").glob("*.parquet")), {"flag_rules": second.rule_strings})
            summary["flagged"], summary["flag_rules"] = second.flagged, second.rule_strings
        summary["seconds"] = time.perf_counter() - t0
        (tmp / OUTPUT_MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        for sub in ("sentences", "words"):  # an empty input gives no part files: make the directory anyway
            (tmp / sub).mkdir(exist_ok=True)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _summarize(scored, *, inputs, output, md, mode, engine, meta, flag: bool) -> dict:
    import pyarrow.compute as pc

    cols = ["line", "status", "error", "n_words", "pll", "_actor"] + (["flag"] if flag else [])
    tables = list(_iter_tables(scored.select_columns(cols))) if scored.count() else []
    actors: set[str] = set()
    s: dict[str, Any] = {"inputs": inputs, "output": output, "words_output": str(Path(output) / "words"),
                         "sentences_output": str(Path(output) / "sentences"), "engine": engine, "mode": mode,
                         "model": str(md.path), "model_checksum": md.checksum, "rows": 0, "scored": 0,
                         "skipped": 0, "flagged": 0, "words": 0, "mean_pll": None, "skipped_rows": [],
                         "runner": "ray", "flag_rules": meta["flag_rules"]}
    pll_sum = 0.0
    for t in tables:
        ok = pc.equal(t.column("status"), "ok")
        s["rows"] += t.num_rows
        actors.update(t.column("_actor").unique().to_pylist())
        n_ok = pc.sum(ok).as_py() or 0
        s["scored"] += n_ok
        s["skipped"] += t.num_rows - n_ok
        s["words"] += pc.sum(t.column("n_words")).as_py() or 0
        pll_sum += pc.sum(t.column("pll")).as_py() or 0.0
        if "flag" in t.column_names:
            s["flagged"] += pc.sum(t.column("flag").cast(pa.int64())).as_py() or 0
        if len(s["skipped_rows"]) < 20:
            bad = t.filter(pc.invert(ok)).slice(0, 20 - len(s["skipped_rows"]))
            s["skipped_rows"] += [{"line": r["line"], "message": r["error"]} for r in bad.to_pylist()]
    s["mean_pll"] = pll_sum / s["scored"] if s["scored"] else None
    s["actors"] = len(actors)  # actors that scored at least one batch
    return s


def _iter_tables(ds):
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch


def _rebuild_error(cls, args, state):
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class _Shipped(Exception):
    """Carries one of our errors out of an actor whole: it unpickles as the original class with all its
    attributes (InputError's path, line, column; plain pickling would keep only the message)."""

    def __init__(self, exc: MlmScorerError):
        super().__init__(str(exc))
        self.exc = exc

    def __reduce__(self):
        return _rebuild_error, (type(self.exc), self.exc.args, dict(self.exc.__dict__))


def _find_own_error(exc: BaseException) -> MlmScorerError | None:
    """Our error inside a Ray exception chain (RayTaskError / UserCodeException wrap it), as a plain one."""
    seen, stack, found = set(), [exc], None
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MlmScorerError):
            if type(e).__module__.startswith("mlm_scorer"):
                return e  # the original object, unpickled from the actor
            found = found or e  # Ray's RayTaskError(InputError) hybrid: rebuild it below
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    if isinstance(found, InputError):
        return InputError(found.detail, path=found.path, line=found.line, column=found.column, reason=found.reason)
    return found
