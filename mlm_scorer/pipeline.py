"""``score_file``: the one entry point that the CLI, Airflow and Ray call.

Data flow, three stages on three threads (TensorFlow and the tokenizer release the GIL)::

    TSV rows --chunk--> tokenize, expand, plan, build arrays        (reader thread, a chunk ahead)
             --> engine.map(batches) -> log-probs per piece        (engine thread)
             --> word and sentence columns -> Parquet parts         (calling thread; assembled at the end)

Memory is bounded by the chunk size (rows) and the queue depth, not by the input size.
"""
from __future__ import annotations

import itertools
import os
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .batching import BatchPolicy
from .engines.base import LazyEngine, choose_engine, get_engine, numerics, resolve_engine
from .errors import InputError, Interrupted, MlmScorerError, StorageError, UsageError
from .models import resolve_model
from .progress import Progress
from .quality import FlagRule, RunQuantiles, baseline_rules, evaluate
from .reader import Layout, Row, TsvReader, count_lines, open_reader
from .scorer import Scorer, SentenceResult
from .settings import ScoreSettings, settings_from
from .writer import ResultWriter, check_output_path, exp, pseudo_perplexity

if TYPE_CHECKING:
    from .model_dir import ModelDir

#: Unknown words kept (as written) per run, for the cause the unknown-words warning names.
UNKNOWN_SAMPLES = 50
#: A chunk is cut at ``chunk_rows`` rows or at this many characters of text, whichever comes first: memory
#: per chunk stays bounded however long the rows are (up to ``max_row_chars`` each).
CHUNK_CHARS = 1 << 18


@dataclass
class ScoreSummary:
    """What a run did. Small and JSON-friendly (``asdict``): Airflow passes it through XCom."""

    input: str
    output: str
    sentences_output: str
    engine: str
    mode: str
    model: str
    model_checksum: str
    engine_streams: int = 1  # batches the engine scored at once (in-process engines: see engines.base)
    batch_tokens: int = 0  # padded tokens per batch at most (--batch-tokens, else the engine's preference)
    rows: int = 0
    scored: int = 0
    skipped: int = 0
    flagged: int = 0
    words: int = 0
    copies: int = 0
    unique_scored: int = 0
    duplicates: int = 0
    padding_efficiency: float = 1.0
    seconds: float = 0.0  # wall time of the whole call
    load_seconds: float = 0.0  # of which: opening the model and engine (export on first use, TF start-up)
    mean_pll: float | None = None
    cache_lookups: int = 0  # persistent score cache (--cache): distinct sentences looked up, found
    cache_hits: int = 0
    cache_rejected: int = 0  # cache entries that failed their checksum or range checks: dropped, rescored
    cache_read_only: bool = False  # the cache could be read but not written (new scores not stored)
    resumed_rows: int = 0  # rows committed by an interrupted run and not scored again (--resume)
    resume_note: str | None = None  # committed parts a resume found damaged (discarded, scored again)
    flag_rules: list[str] = field(default_factory=list)  # as applied: percentiles with the value taken
    unknown_words: int = 0  # scored words whose pieces include the unknown token ([UNK])
    warnings: list[str] = field(default_factory=list)  # what the run warned about (also logged)
    settings: dict = field(default_factory=dict)  # the settings that change what is written (ScoreSettings.scoring)
    _pll_sum: float = field(default=0.0, repr=False)
    _unknown_samples: list[str] = field(default_factory=list, repr=False)
    skipped_rows: list[dict] = field(default_factory=list)  # first MAX_LISTED: line, reason, message

    MAX_LISTED = 20

    @property
    def copies_per_second(self) -> float:
        """Throughput of the scoring itself (reading, tokenizing, inference, writing), without start-up."""
        busy = self.seconds - self.load_seconds
        return self.copies / busy if busy > 0 else 0.0

    def line(self) -> str:
        s = (f"scored {self.scored}/{self.rows} rows ({self.words} words, {self.copies} copies, "
             f"{self.copies_per_second:.1f} copies/s, {self.duplicates} duplicates reused, padding efficiency "
             f"{self.padding_efficiency:.1%}) in {self.seconds:.1f}s ({self.load_seconds:.1f}s start-up) with {self.engine}"
             + (f" ({self.engine_streams} streams)" if self.engine_streams > 1 else "") + f"/{self.mode}; "
             f"skipped {self.skipped}" + (f", flagged {self.flagged}" if self.flagged else ""))
        if self.cache_lookups:
            s += f"; score cache hit rate {self.cache_hits / self.cache_lookups:.1%} ({self.cache_hits}/{self.cache_lookups})"
        if self.cache_rejected:
            s += f", {self.cache_rejected} damaged cache entries dropped and scored again"
        if self.cache_read_only:
            s += " (cache read-only: new scores not stored)"
        if self.resumed_rows or self.resume_note:
            s += f"; resumed after {self.resumed_rows} committed rows"
        if self.resume_note:
            s += f" ({self.resume_note})"
        if self.skipped_rows:
            listed = ", ".join(f"line {r['line']} ({r['reason']})" for r in self.skipped_rows)
            s += f": {listed}{' …' if self.skipped > len(self.skipped_rows) else ''}"
        return s + f" -> {self.output}, {self.sentences_output}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_pll_sum", None)
        d.pop("_unknown_samples", None)
        d["copies_per_second"] = self.copies_per_second
        return d


_DONE = object()


def score_file(input_path: str | os.PathLike, output: str | os.PathLike, settings: ScoreSettings | None = None, *,
               log: Callable[[str], None] | None = None, scorer: Scorer | None = None,
               **options: Any) -> ScoreSummary:
    """Score every row of a TSV and write ``output`` (words) and ``<output stem>.sentences.parquet``.

    ``settings``: a ``ScoreSettings`` (or a dict of settings, as ``to_dict`` writes); keyword ``options``
    are the same settings by name (``score_file(IN, OUT, model="models/bert", mode="token")``). A keyword
    that contradicts ``settings`` is a UsageError. ``log``: a function given notes such as "exporting ...";
    ``scorer``: a ``Scorer`` to reuse (its model, engine, mode and top-k are then the run's).

    Raises InputError (with file, line, column) for a bad row when ``on_bad_row="fail"``; with "skip",
    the row gets a sentence row with status "skipped" and the reason, and is listed in the summary.
    Outputs appear atomically at the end; on any error no file appears at the final paths. Chunks are
    committed as they finish (``OUTPUT.parts/``): ``resume=True`` continues after the last committed row
    of an interrupted run, and refuses if the input or the settings changed.
    ``flag_rules`` ("min_word_prob<0.001", or ``quality.parse_rule``'s FlagRule objects) add the ``flag``
    and ``flag_reason`` sentence columns; a percentile
    threshold (``pseudo_perplexity=p99``) is taken from ``baseline`` (a result scored with the same model
    and mode) when one is given, else from this run in a second pass at the end.
    ``score_cache`` is a directory for the persistent score cache (see ``cache.py``).
    ``max_row_chars``: longer rows are bad rows (``row_too_long``), decided before they are tokenized.
    Refuses (UsageError, before anything is touched) an input that is a file the run would replace or
    delete. A stream (stdin, a pipe, a FIFO) is read once; its committed prefix is checked on resume.
    """
    s = settings_from(settings, options, door="score_file")
    if scorer is not None:
        s = with_scorer(s, scorer, door="score_file")
    out = check_output_path(output, input_path, also=cache_files(s.score_cache))
    t0 = time.perf_counter()
    reader = open_reader(input_path, text_column=s.text_column, id_column=s.id_column, header=s.header,
                         max_row_chars=s.max_row_chars)
    owns_engine = scorer is None
    try:
        if scorer is None:
            scorer = open_scorer(s, log=log)
        notes: list[str] = []
        rules = _flag_rules(s.rules, s.baseline, scorer, notes)
        for n in notes:  # said before the run: a baseline's percentile of too few rows
            _log_warning(n)
        load_seconds = time.perf_counter() - t0
        summary = _run(reader, scorer, out, s, input_path=str(input_path), t0=time.perf_counter(), flag_rules=rules)
        summary.warnings[:0] = notes
        summary.load_seconds = load_seconds + getattr(scorer.engine, "open_seconds", 0.0)
        summary.seconds += load_seconds
        return summary
    finally:
        reader.close()
        if owns_engine and scorer is not None:
            _close_scorer(scorer)


def with_scorer(s: ScoreSettings, scorer: Scorer, *, door: str) -> ScoreSettings:
    """``s`` with the mode and top-k of the ``scorer`` a caller hands in (they are the run's); a different
    value set in ``s`` is a UsageError, not ignored."""
    clash = [n for n in ("mode", "top_k") if n in s.changed() and getattr(s, n) != getattr(scorer, n)]
    if clash:
        raise UsageError(f"{door}: the scorer given scores with " + ", ".join(
            f"{n}={getattr(scorer, n)!r}, the settings say {getattr(s, n)!r}" for n in clash))
    return s.replace(mode=scorer.mode, top_k=scorer.top_k)


def output_metadata(s: ScoreSettings, scorer: Scorer, *, input: str, flag_rules: list[FlagRule]) -> dict[str, Any]:
    """What a result's Parquet metadata (key ``mlm_scorer``) records: the model and engine as they resolved
    (path, checksum, engine, numerics), the input, the flag rules as applied, the baseline, and the settings
    that change what is written (``ScoreSettings.scoring``). ``score_frame`` gives the same as ``attrs``."""
    md = scorer.model
    return {"model": str(md.path), "model_checksum": md.checksum, "mode": scorer.mode,
            "engine": scorer.engine.name, "numerics": scorer.numerics, "input": input,
            "flag_rules": [str(r) for r in flag_rules], **({"baseline": s.baseline} if s.baseline else {}),
            "settings": s.scoring()}


def _run(reader: TsvReader, scorer: Scorer, out, s: ScoreSettings, *, input_path: str, t0: float,
         flag_rules: list[FlagRule]) -> ScoreSummary:
    lay = reader.layout
    md = scorer.model
    on_bad_row, chunk_rows, limit = s.on_bad_row, s.chunk_rows, s.limit
    summary = ScoreSummary(input=input_path, output=str(out), sentences_output="", engine=scorer.engine.name,
                           mode=scorer.mode, model=str(md.path), model_checksum=md.checksum, settings=s.scoring())
    # What must not change between an interrupted run and its --resume: what the settings that change what
    # is written (ScoreSettings.scoring) resolved to -- the model, the engine's numerics, the columns by
    # index (the same column named or numbered is the same), the rules as applied -- and those of them that
    # resolve to nothing else (limit, max_row_chars, baseline). The engine, batch sizes and on_bad_row may
    # change: they do not change the rows already committed.
    resume_key = {"model_checksum": md.checksum, "max_seq_length": md.max_seq_length, "mode": scorer.mode,
                  "top_k": scorer.top_k, "numerics": scorer.numerics, "columns": lay.names,
                  "text_column": lay.text, "id_column": lay.id, "header": reader.header,
                  "flag_rules": [str(r) for r in flag_rules], "limit": s.limit, "max_row_chars": s.max_row_chars,
                  **({"baseline": s.baseline} if s.baseline else {})}
    writer = ResultWriter(out, id_name=lay.id_name, passthrough=lay.passthrough_names, top_k=scorer.top_k,
                          flag=bool(flag_rules),
                          metadata=output_metadata(s, scorer, input=input_path, flag_rules=flag_rules),
                          identity=reader.identity(), settings=resume_key, resume=s.resume)
    summary.sentences_output = str(writer.sentences_path)
    skip_rows = writer.rows_done
    summary.resumed_rows = skip_rows
    summary.resume_note = writer.resume_note
    for st in writer.committed_stats:
        _add_stats(summary, st)
    vocab = [scorer.tokenizer.id_to_token(i) for i in range(scorer.tokenizer.vocab_size)] if scorer.top_k else None

    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            chunk: list[Row] = []
            chars = n = 0
            # islice: the reader never reads past the limit (a stream's committed prefix ends at a row)
            for n, row in enumerate(reader if limit is None else itertools.islice(reader, limit), 1):
                if stop.is_set():
                    break
                if n <= skip_rows:  # committed by an earlier run (--resume): read again, not scored
                    if n == skip_rows:
                        writer.check_prefix(reader.position(), None)
                    continue
                chunk.append(row)
                chars += len(row.text) if row.text else 0
                if len(chunk) >= chunk_rows or chars >= CHUNK_CHARS:
                    _put(q, stop, (chunk, scorer.prepare([r.text for r in chunk if r.error is None]),
                                   reader.position()))
                    chunk, chars = [], 0
            if n < skip_rows and not stop.is_set():
                writer.check_prefix(reader.position(), n)
            if chunk:
                _put(q, stop, (chunk, scorer.prepare([r.text for r in chunk if r.error is None]), reader.position()))
            _put(q, stop, _DONE)
        except BaseException as exc:  # hand any failure to the consumer, which re-raises it
            _put(q, stop, exc)

    mode = "off" if s.progress is False else Progress.auto_mode(s.progress)
    bar = Progress(_progress_total(reader, input_path, limit) if mode != "off" else None, mode=mode,
                   initial=skip_rows)
    # Stage 2: the engine, on its own thread, so building columns and writing (below) overlap inference.
    q2: queue.Queue = queue.Queue(maxsize=1)

    def infer() -> None:
        first = True
        try:
            while not stop.is_set():
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _DONE or isinstance(item, BaseException):
                    _put(q2, stop, item)
                    return
                rows, prepared, position = item
                if first:  # the engine is open and the first chunk ready: rates leave start-up out
                    bar.restart()
                    first = False
                _put(q2, stop, (rows, prepared, _score_chunk(scorer, prepared, len(rows), bar), position))
        except BaseException as exc:
            _put(q2, stop, exc)

    stopping = False
    threads = [threading.Thread(target=produce, name="mlm-scorer-reader", daemon=True),
               threading.Thread(target=infer, name="mlm-scorer-engine", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            item = q2.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            rows, prepared, results, position = item
            words, sents, stats = build_columns(rows, results, path=reader.path, on_bad_row=on_bad_row,
                                                scorer=scorer, layout=lay, vocab=vocab, flag_rules=flag_rules)
            stats["copies"] = prepared.n_copies
            stats["skipped_rows"] = stats.pop("skipped")[: ScoreSummary.MAX_LISTED]
            stats["skipped"] = len(sents["row"]) - stats["scored"]
            writer.write_chunk(words, sents, stats, position=position)
            _add_stats(summary, stats)
        bar.close()
        # percentiles of the run itself: a second pass over the committed parts (all of them, after --resume)
        second = RunQuantiles.fit(flag_rules, writer.sentence_parts())
        if second is None:
            writer.commit()
        else:
            writer.commit(transform=second.apply, metadata={"flag_rules": second.rule_strings})
            summary.flagged = second.flagged
            flag_rules = second.rules
            warn(summary, second.notes)
        summary.flag_rules = [str(r) for r in flag_rules]
    except BaseException as exc:
        stop.set()
        stopping = True
        try:
            writer.abort()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM again while stopping: stop the same way
            writer.close()
        told = explain_committed(exc, committed_note(writer, reader, input_path))
        if told is exc:
            raise
        raise told from (None if isinstance(told, Interrupted) else exc)
    finally:
        stop.set()
        try:
            bar.close(done=False)
            for t in threads:
                _drain(q)
                _drain(q2)
                t.join(timeout=10)
        except KeyboardInterrupt:
            if not stopping:  # not already stopping for another reason: this one is the reason
                raise
            # a second Ctrl-C / SIGTERM while the threads stop: the first one's message (what is committed,
            # how to resume) stands; the threads are daemons and end with the process
    _finish_summary(summary, scorer)
    summary.seconds = time.perf_counter() - t0
    return summary


def _flag_rules(flag_rules: list[FlagRule] | None, baseline, scorer: Scorer,
                notes: list[str] | None = None) -> list[FlagRule]:
    """The rules to apply: percentile thresholds are taken from ``baseline`` when one is given (else from the
    run itself, in a second pass at the end). ``notes`` receives what to know about them (``percentile_notes``)."""
    rules = list(flag_rules or [])
    if baseline is not None and any(r.relative for r in rules):
        rules = baseline_rules(rules, baseline, model_checksum=scorer.model.checksum, mode=scorer.mode, notes=notes)
    return rules


def warn(summary: ScoreSummary, notes: list[str]) -> None:
    """Log each note as a warning and keep it in the summary (``warnings``)."""
    for n in notes:
        summary.warnings.append(n)
        _log_warning(n)


def _log_warning(message: str) -> None:
    from .logs import log

    log.warning(message)


def _score_chunk(scorer: Scorer, prepared, n_rows: int, bar: Progress) -> list[SentenceResult]:
    """``scorer.run`` on a prepared chunk of ``n_rows`` rows, crediting them to ``bar`` as its batches finish
    (progress moves with every batch); a chunk with nothing to score is credited at once."""
    n_copies = prepared.n_copies
    if not n_copies:
        results = scorer.run(prepared)
        bar.add(n_rows)
        return results
    return scorer.run(prepared, on_batch=lambda k: bar.add(n_rows * k / n_copies, k))


def _finish_summary(summary: ScoreSummary, scorer: Scorer) -> None:
    """The scorer's counters at the end of a run (engine, copies, deduplication, score cache) into ``summary``,
    and the warning when many words are unknown to the model's vocabulary (logged, and in ``warnings``)."""
    from .segment import unknown_words_warning

    unknown = unknown_words_warning(scorer.tokenizer, summary.unknown_words, summary.words, summary._unknown_samples)
    if unknown:
        warn(summary, [unknown])
    if getattr(scorer.engine, "opened", True):  # an engine opened on first use that scored nothing stays closed
        summary.engine_streams = scorer.engine.streams
        summary.batch_tokens = scorer.policy.batch_tokens
    st = scorer.stats
    summary.copies = st.copies
    summary.unique_scored = st.unique_scored
    summary.duplicates = st.duplicates
    summary.padding_efficiency = st.padding_efficiency
    summary.mean_pll = summary._pll_sum / summary.scored if summary.scored else None
    if scorer.store is not None:
        summary.cache_lookups, summary.cache_hits = scorer.store.lookups, scorer.store.hits
        summary.cache_rejected, summary.cache_read_only = scorer.store.rejected, scorer.store.read_only


def _close_scorer(scorer: Scorer) -> None:
    """Close what ``open_scorer`` opened: the engine and the score cache."""
    scorer.engine.close()
    if scorer.store is not None:
        scorer.store.close()


def resolve_run(s: ScoreSettings, *, log: Callable[[str], None] | None = None) -> tuple[ModelDir, str, dict[str, Any]]:
    """What ``s`` names, resolved once: ``(model directory, engine name, engine options)``. A server named with
    no protocol or engine is asked which protocol it speaks (logged); a checkpoint is exported into the
    cache; "auto" becomes the engine that will run."""
    opts = s.engine_call_options()
    engine = resolve_engine(s.engine, s.server, s.protocol)
    if s.server and engine == "auto":  # TF Serving or KServe v2: what the server answers (detect_protocol)
        from .engines.kserve_base import server_engine

        engine = server_engine(s.server, "auto", opts, log_fn=log)
    md = resolve_model(s.model, version=s.model_version, cache_dir=s.cache_dir, log=log, engine=engine,
                       precision=opts.get("precision"), top_k=s.top_k)
    return (md, *choose_engine(engine, md, opts))


def open_scorer(settings: ScoreSettings | None = None, *, log: Callable[[str], None] | None = None,
                **options: Any) -> Scorer:
    """The model (exported first if it is a checkpoint), its tokenizer, and the engine, opened on first use
    (``engines.base.LazyEngine``): a run the score cache answers whole never imports the engine's runtime.
    With a server and no protocol or engine named, the server is asked which protocol it speaks (logged)."""
    s = settings_from(settings, options, door="open_scorer")
    md, engine, opts = resolve_run(s, log=log)
    top_k = s.top_k
    eng = LazyEngine(engine, lambda: get_engine(engine, model=md, top_k=top_k > 0, **opts),
                     numerics=numerics(engine, opts, md))
    try:
        return Scorer(md, eng, mode=s.mode, top_k=top_k, cache_size=s.dedupe_cache, store_dir=s.score_cache,
                      policy=lambda e: BatchPolicy.for_engine(e, s.batch_tokens, s.max_batch_size),
                      server=server_of(opts))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def server_of(engine_options: dict[str, Any]) -> str | None:
    """Where an engine that asks a server gets its answers ("http://host:8501 model bert version 3"), from its
    options; None for an in-process engine."""
    server = engine_options.get("server")
    if not server:
        return None
    where = f"{server} model {engine_options.get('model_name') or 'bert'}"
    version = engine_options.get("model_version")
    return where + (f" version {version}" if version not in (None, "", "latest") else "")


def _progress_total(reader, input_path: str, limit: int | None) -> int | None:
    """Rows the run will read, for the progress total: a Parquet file's row count, a TSV's lines (one fast
    pass over the file), None for standard input."""
    total = getattr(reader, "num_rows", None)
    if getattr(reader, "is_stream", False):  # a pipe is read once: no counting pass
        return None
    if total is None:
        try:
            lines = count_lines(input_path)
        except OSError:
            lines = None
        total = None if lines is None else max(0, lines - (1 if reader.header else 0))
    return total if limit is None or total is None else min(total, limit)


def _add_stats(summary: ScoreSummary, st: dict) -> None:
    summary.rows += st.get("scored", 0) + st.get("skipped", 0)
    summary.scored += st.get("scored", 0)
    summary.skipped += st.get("skipped", 0)
    summary.words += st.get("words", 0)
    summary.unknown_words += st.get("unknown_words", 0)
    room = UNKNOWN_SAMPLES - len(summary._unknown_samples)
    if room > 0:
        summary._unknown_samples += st.get("unknown_samples", [])[:room]
    summary.flagged += st.get("flagged", 0)
    summary._pll_sum += st.get("pll_sum", 0.0)
    for sk in st.get("skipped_rows", []):
        if len(summary.skipped_rows) < ScoreSummary.MAX_LISTED:
            summary.skipped_rows.append(sk)


def cache_files(score_cache: str | os.PathLike | None) -> list[tuple[str, str]]:
    """The score cache's files (written by the run), for the input collision check."""
    if score_cache is None:
        return []
    from .cache import DB_NAME

    db = os.path.join(score_cache, DB_NAME)
    return [(db + suffix, "the score cache") for suffix in ("", "-wal", "-shm", "-journal")]


def committed_note(writer: ResultWriter, reader: TsvReader, input_path: str) -> str | None:
    """What an interrupted or failed run leaves for --resume, or None when nothing is committed."""
    n = writer.rows_done
    if not n:
        return None
    if reader.is_stream:
        again = "the same input on stdin" if input_path == "-" else f"the same input through {input_path} again"
        how = f"rerun with --resume, feeding {again} (its committed rows are read and checked, not scored),"
    else:
        how = "rerun with --resume (same command and input)"
    return f"{n} rows are committed in {writer.parts_dir}; {how} to continue after them"


def explain_committed(exc: BaseException, note: str | None) -> BaseException:
    """The exception to raise for ``exc`` so that its message says what is committed (``note``).

    Ctrl-C / SIGTERM -> ``Interrupted`` (its message says what is kept, and how to resume); an OSError
    (disk full, ...) -> ``StorageError``; an MlmScorerError gets the note in its message; anything else
    (a bug, or a caller's own signal exception) carries it as ``mlm_committed`` for the CLI to print,
    and as a note where Python has them.
    """
    if isinstance(exc, KeyboardInterrupt):
        signum = getattr(exc, "signum", signal.SIGINT)
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        kept = note or "no rows were committed"
        return Interrupted(f"{what}; nothing was written at the output path; {kept}", signum=signum, explained=True)
    if note is None:
        return exc
    if isinstance(exc, MlmScorerError):
        exc.args = (f"{exc.args[0] if exc.args else exc} [{note}]",)
        return exc
    if isinstance(exc, OSError):
        return StorageError(f"{exc} [{note}]")
    exc.mlm_committed = note
    if hasattr(exc, "add_note"):  # Python 3.11+: shown with the traceback (an Airflow task's log)
        exc.add_note(note)
    return exc


def _put(q: queue.Queue, stop: threading.Event, item) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def build_columns(rows: list[Row], results: list[SentenceResult], *, path: str, on_bad_row: str, scorer: Scorer,
                  layout: Layout, vocab: list[str] | None = None, flag_rules: list[FlagRule] | None = None
                  ) -> tuple[dict, dict, dict]:
    """Word and sentence columns (dicts of lists, the writer's schemas) for one chunk, in input order.

    ``results`` holds one SentenceResult per row without a read error, in order (``Scorer.run`` on
    their texts). Raises InputError for the first bad row under ``on_bad_row="fail"``. Returns
    (words, sentences, stats) where stats counts scored/flagged rows and lists skipped ones.
    """
    lay = layout
    if scorer.top_k and vocab is None:
        vocab = [scorer.tokenizer.id_to_token(i) for i in range(scorer.tokenizer.vocab_size)]
    has_id = lay.id is not None
    W: dict[str, list] = {k: [] for k in ("row", "line", "word_index", "word", "char_start", "char_end", "n_pieces",
                                          "log_prob", "prob")}
    S: dict[str, list] = {k: [] for k in ("row", "line", "text", "n_words", "n_pieces", "n_copies", "unknown_words",
                                          "pll", "pseudo_perplexity", "min_word_log_prob", "min_word_index",
                                          "status", "error")}
    if flag_rules:
        S["flag"], S["flag_reason"] = [], []
    if has_id:
        W["id"], S["id"] = [], []
    for name in lay.passthrough_names:
        W[name], S[name] = [], []
    if scorer.top_k:
        W["top_k"] = []
    stats = {"scored": 0, "words": 0, "pll_sum": 0.0, "skipped": [], "flagged": 0, "unknown_words": 0,
             "unknown_samples": []}
    it = iter(results)
    for row in rows:
        err = row.error
        res = None
        if err is None:
            res = next(it)
            if res.error is not None:
                err = InputError(res.error, path=path, line=row.line, reason=res.reason or "bad_row")
        if err is not None and on_bad_row == "fail":
            raise InputError(f"{err.detail} (use --on-bad-row skip to skip such rows)", path=err.path or path,
                             line=err.line or row.line, column=err.column, reason=err.reason)
        S["row"].append(row.index)
        S["line"].append(row.line)
        if has_id:
            S["id"].append(row.id)
        for j, name in enumerate(lay.passthrough_names):
            S[name].append(row.passthrough[j] if j < len(row.passthrough) else None)
        S["text"].append(row.text)
        if err is not None:
            for k in ("n_words", "n_pieces", "n_copies", "unknown_words", "pll", "pseudo_perplexity",
                      "min_word_log_prob", "min_word_index"):
                S[k].append(None)
            S["status"].append("skipped")
            S["error"].append(str(err))
            if flag_rules:
                S["flag"].append(None)
                S["flag_reason"].append(None)
            stats["skipped"].append({"line": row.line, "reason": err.reason, "message": err.detail})
            continue
        sent = res.sentence
        wlp = res.word_log_probs()
        pll = float(wlp.sum())
        nw = sent.n_words
        imin = int(np.argmin(wlp))
        unknown = scorer.tokenizer.unknown(sent)
        n_unknown = int(unknown.sum())
        S["n_words"].append(nw)
        S["n_pieces"].append(sent.n_pieces)
        S["n_copies"].append(res.n_copies)
        S["unknown_words"].append(n_unknown)
        S["pll"].append(pll)
        S["pseudo_perplexity"].append(pseudo_perplexity(pll, nw))
        S["min_word_log_prob"].append(float(wlp[imin]))
        S["min_word_index"].append(imin)
        S["status"].append("ok")
        S["error"].append(None)
        if n_unknown:
            stats["unknown_words"] += n_unknown
            if len(stats["unknown_samples"]) < UNKNOWN_SAMPLES:
                stats["unknown_samples"] += [row.text[int(a):int(b)][:64] for a, b in sent.char_spans[unknown][:5]]
        if flag_rules:
            flagged, why = evaluate(flag_rules, pll, nw, float(wlp[imin]), n_unknown)
            S["flag"].append(flagged)
            S["flag_reason"].append(why)
            stats["flagged"] += flagged
        stats["scored"] += 1
        stats["words"] += nw
        stats["pll_sum"] += pll
        text = row.text
        ws = sent.word_starts
        npieces = np.diff(ws)
        for w in range(nw):
            a, b = int(sent.char_spans[w, 0]), int(sent.char_spans[w, 1])
            W["row"].append(row.index)
            W["line"].append(row.line)
            if has_id:
                W["id"].append(row.id)
            for j, name in enumerate(lay.passthrough_names):
                W[name].append(row.passthrough[j])
            W["word_index"].append(w)
            W["word"].append(text[a:b])
            W["char_start"].append(a)
            W["char_end"].append(b)
            W["n_pieces"].append(int(npieces[w]))
            lp = float(wlp[w])
            W["log_prob"].append(lp)
            W["prob"].append(exp(lp))
            if scorer.top_k:
                W["top_k"].append([{"token": vocab[i], "log_prob": float(v)}
                                   for i, v in zip(res.top_k_ids[w], res.top_k_log_probs[w]) if i >= 0])
    return W, S, stats
