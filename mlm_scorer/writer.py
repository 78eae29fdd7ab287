"""Write word rows and sentence rows to two Parquet files, incrementally, finalized atomically.

``-o probs.parquet`` gives ``probs.parquet`` (one row per word) and ``probs.sentences.parquet`` (one row
per input row, scored or not). Both are written to hidden temporary files in the same directory, one
row group per chunk, then fsync'ed and renamed into place: the sentences file first, the words file
last, so a words file at the final path always comes with its complete sentences file. After a crash
there is never a partial file at a final path (only a ``.*.tmp-*`` file, removed by the next run).

Schemas (units: natural-log probabilities; character offsets are Python str indices, i.e. Unicode
code points, into the original text, end exclusive):

words:     row int64, line int64, [id string], [pass-through columns string], word_index int32,
           word string, char_start int32, char_end int32, n_pieces int32, log_prob float64,
           prob float64, [top_k list<struct<token string, log_prob float32>>]
sentences: row int64, line int64, [id string], [pass-through columns string], text string,
           n_words int32, n_pieces int32, n_copies int32, pll float64, pseudo_perplexity float64,
           min_word_log_prob float64, min_word_index int32, [flag bool, flag_reason string],
           status string, error string
"""
from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UsageError


def sentences_path(words_path: str | os.PathLike) -> Path:
    p = Path(words_path)
    stem = p.name[: -len(".parquet")] if p.name.endswith(".parquet") else p.name
    return p.with_name(stem + ".sentences.parquet")


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """Refuse outputs that would clobber the input, a directory, or write through a symlink elsewhere."""
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"output {str(out)!r} is a directory; give a file path like {out / 'probs.parquet'}")
    for p in (out, sentences_path(out)):
        if p.is_symlink():
            raise UsageError(f"output {str(p)!r} is a symlink (to {os.readlink(p)!r}); refusing to replace it. "
                             f"Remove it or choose another path")
    if input_path is not None and str(input_path) != "-" and out.exists() and Path(input_path).exists():
        for p in (out, sentences_path(out)):
            if p.exists() and os.path.samefile(p, input_path):
                raise UsageError(f"output {str(p)!r} is the input file itself")
    if not out.parent.exists():
        raise UsageError(f"output directory {str(out.parent)!r} does not exist")
    return out


def word_schema(id_name: str | None, passthrough: list[str], top_k: bool) -> pa.Schema:
    fields = [pa.field("row", pa.int64()), pa.field("line", pa.int64())]
    if id_name is not None:
        fields.append(pa.field("id", pa.string()))
    fields += [pa.field(n, pa.string()) for n in passthrough]
    fields += [pa.field("word_index", pa.int32()), pa.field("word", pa.string()),
               pa.field("char_start", pa.int32()), pa.field("char_end", pa.int32()),
               pa.field("n_pieces", pa.int32()), pa.field("log_prob", pa.float64()), pa.field("prob", pa.float64())]
    if top_k:
        fields.append(pa.field("top_k", pa.list_(pa.struct([("token", pa.string()), ("log_prob", pa.float32())]))))
    return pa.schema(fields)


def sentence_schema(id_name: str | None, passthrough: list[str], flag: bool) -> pa.Schema:
    fields = [pa.field("row", pa.int64()), pa.field("line", pa.int64())]
    if id_name is not None:
        fields.append(pa.field("id", pa.string()))
    fields += [pa.field(n, pa.string()) for n in passthrough]
    fields += [pa.field("text", pa.string()), pa.field("n_words", pa.int32()), pa.field("n_pieces", pa.int32()),
               pa.field("n_copies", pa.int32()), pa.field("pll", pa.float64()),
               pa.field("pseudo_perplexity", pa.float64()), pa.field("min_word_log_prob", pa.float64()),
               pa.field("min_word_index", pa.int32())]
    if flag:
        fields += [pa.field("flag", pa.bool_()), pa.field("flag_reason", pa.string())]
    fields += [pa.field("status", pa.string()), pa.field("error", pa.string())]
    return pa.schema(fields)


class _AtomicParquet:
    def __init__(self, final: Path, schema: pa.Schema, metadata: dict[str, str]):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.schema = schema.with_metadata({k: v.encode() for k, v in metadata.items()})
        self.writer = pq.ParquetWriter(str(self.tmp), self.schema, compression="zstd")

    def write(self, columns: dict) -> None:
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if table.num_rows:
            self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class ResultWriter:
    """Collects per-chunk rows and writes them as row groups; ``commit`` renames both files into place."""

    def __init__(self, output: str | os.PathLike, *, id_name: str | None, passthrough: list[str], top_k: int,
                 flag: bool, metadata: dict[str, str]):
        self.words_path = Path(output)
        self.sentences_path = sentences_path(output)
        for stale in glob.glob(str(self.words_path.with_name(f".{self.words_path.name}.tmp-*"))) + \
                glob.glob(str(self.sentences_path.with_name(f".{self.sentences_path.name}.tmp-*"))):
            _remove_if_dead(stale)
        meta = {"mlm_scorer": json.dumps(metadata, sort_keys=True)}
        self.id_name, self.passthrough, self.top_k, self.flag = id_name, passthrough, top_k, flag
        self.words = _AtomicParquet(self.words_path, word_schema(id_name, passthrough, top_k > 0), meta)
        self.sentences = _AtomicParquet(self.sentences_path, sentence_schema(id_name, passthrough, flag), meta)
        self.n_words = 0
        self.n_sentences = 0

    def write_chunk(self, words: dict, sentences: dict) -> None:
        self.words.write(words)
        self.sentences.write(sentences)
        self.n_words += len(words["row"])
        self.n_sentences += len(sentences["row"])

    def commit(self) -> None:
        self.words.close()
        self.sentences.close()
        self.sentences.commit()
        self.words.commit()
        dfd = os.open(self.words_path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        self.words.abort()
        self.sentences.abort()


def _remove_if_dead(tmp: str) -> None:
    """Remove a temporary file left by a crashed run (its pid is gone); leave a live run's file alone."""
    pid = tmp.rsplit("-", 1)[-1]
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), 0)
            return  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            return
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def pseudo_perplexity(pll: float, n_words: int) -> float:
    return math.exp(-pll / n_words) if n_words else float("nan")

