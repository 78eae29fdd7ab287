"""Stream rows of a TSV file, with errors that cite file, line and column.

Format: UTF-8 (a leading BOM is dropped), lines end in LF or CRLF, fields are separated by TAB.
Quotes are ordinary characters (no CSV quoting): ``He said "hi"`` is read as written. By default the
first line is a header naming the columns. With ``header=False`` and no text column given, each whole
line is one sentence (TABs included).

A row that cannot be read (invalid UTF-8, wrong number of fields, longer than ``max_row_chars``)
becomes a ``Row`` with ``error`` set, so the caller decides (fail or skip) and nothing is dropped
silently. A line is never held whole beyond ``4 * max_row_chars`` bytes: a longer one is known to be
too long without decoding it, and the rest of it is skipped in blocks.

Inputs that are not regular files (stdin, pipes, FIFOs, process substitution) are read exactly once:
``is_stream`` is True for them, nothing else may open them, and the reader hashes the bytes as it
reads them (``position``), so a resumed run can check the committed prefix of the stream.
"""
from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import InputError, UsageError

#: Default longest row, in characters (``--max-row-chars``). Longer rows are bad rows (``row_too_long``).
MAX_ROW_CHARS = 100_000


@dataclass
class Row:
    """One data row. ``index`` counts data rows from 0; ``line`` is the 1-based physical line."""

    index: int
    line: int
    text: str | None
    id: str | None = None
    passthrough: tuple[str | None, ...] = ()
    error: InputError | None = None


@dataclass
class Layout:
    """Which columns hold what, resolved against the header."""

    names: list[str]  # all column names (header, or col0.. without one)
    text: int | None  # None: the whole line is the text (header=False, one sentence per line)
    id: int | None
    passthrough: list[int]

    @property
    def passthrough_names(self) -> list[str]:
        return [self.names[i] for i in self.passthrough]

    @property
    def id_name(self) -> str | None:
        return self.names[self.id] if self.id is not None else None


def _resolve(spec: str | int | None, names: list[str], what: str, header: bool) -> int | None:
    if spec is None:
        return None
    s = str(spec)
    if header and s in names:
        return names.index(s)
    if s.lstrip("-").isdigit():
        i = int(s)
        if not 0 <= i < len(names):
            raise UsageError(f"{what} index {i} is out of range: the file has {len(names)} column(s) "
                             f"{names} (indices start at 0)")
        return i
    raise UsageError(f"{what} {s!r} is not a column of the header {names}; give a name or a 0-based index")


# The columns mlm-score writes, in order after row, line, [id] and the pass-through columns; ``top_k`` only
# with --top-k, ``flag`` and ``flag_reason`` only with flag rules. ``writer.word_schema`` and
# ``writer.sentence_schema`` give them their types. A pass-through column of one of these names would make
# two columns of one name: refused when the layout is read.
WORD_COLUMNS = ("word_index", "word", "char_start", "char_end", "n_pieces", "log_prob", "prob", "top_k")
SENTENCE_COLUMNS = ("text", "n_words", "n_pieces", "n_copies", "unknown_words", "pll", "pseudo_perplexity",
                    "min_word_log_prob", "min_word_index", "flag", "flag_reason", "status", "error")
OUTPUT_COLUMNS = frozenset(("row", "line", *WORD_COLUMNS, *SENTENCE_COLUMNS))


def refuse_output_names(lay: Layout, path: str, *, reserved=OUTPUT_COLUMNS, tsv_header: bool = False) -> None:
    """Refuse a pass-through column named like an output column (``id`` too, when ``--id-column`` names
    another column), before anything is scored. ``tsv_header``: the names are a TSV's header line, so the
    message points at line 1 and the column's first character."""
    taken = set(reserved) | ({"id"} if lay.id is not None else set())
    for j in lay.passthrough:
        if lay.names[j] in taken:
            line = column = None
            if tsv_header:
                line, column = 1, sum(len(n) + 1 for n in lay.names[:j]) + 1
            raise InputError(f"the input column {lay.names[j]!r} has the name of a column mlm-score writes, and "
                             f"every column other than the text and the id is passed through to the outputs: "
                             f"rename or drop it", path=path, line=line, column=column,
                             reason="column_name_taken")


def layout_for(names: list[str], text_column: str | int | None, id_column: str | int | None, path: str,
               *, tsv_header: bool = False) -> Layout:
    """Resolve the text and id columns against named columns (a header, a Parquet schema).

    The text column defaults to ``text``, or to the only column; every other column passes through (a
    pass-through column named like an output column is refused).
    """
    if text_column is None:
        if "text" in names:
            text_column = "text"
        elif len(names) == 1:
            text_column = 0
        else:
            raise UsageError(f"{path}: which column holds the text? The columns are {names}; "
                             f"pass --text-column NAME (or a 0-based index)")
    t = _resolve(text_column, names, "--text-column", True)
    i = _resolve(id_column, names, "--id-column", True)
    if t == i:
        raise UsageError("--text-column and --id-column name the same column")
    lay = Layout(names=names, text=t, id=i, passthrough=[j for j in range(len(names)) if j not in (t, i)])
    refuse_output_names(lay, path, tsv_header=tsv_header)
    return lay


def _open(path: str | os.PathLike) -> BinaryIO:
    if str(path) == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"input file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"input {str(path)!r} is a directory, not a TSV file") from None
    except PermissionError:
        raise UsageError(f"input file {str(path)!r} cannot be read (permission denied)") from None


def _decode(raw: bytes, path: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # column: 1-based character position of the bad byte in the line
        col = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
        raise InputError(f"invalid UTF-8 byte 0x{raw[exc.start]:02x} (byte offset {exc.start} in the line)",
                         path=path, line=line, column=col, reason="bad_utf8") from None


class TsvReader:
    """Iterate ``Row``s of a TSV. ``layout`` is known after construction (the header is read then)."""

    def __init__(self, path: str | os.PathLike, *, text_column: str | int | None = None,
                 id_column: str | int | None = None, header: bool = True, max_row_chars: int = MAX_ROW_CHARS):
        if max_row_chars < 1:
            raise UsageError(f"max_row_chars must be positive, got {max_row_chars}")
        self.path = str(path)
        self.header = header
        self.max_row_chars = int(max_row_chars)
        self._cap = 4 * self.max_row_chars + 5  # UTF-8 has at most 4 bytes a character; + BOM, CR, LF
        self._f = _open(path)
        self._line = 0
        self._first = True
        self._overflow = 0  # bytes of the last line read when it was cut at the cap (too long), else 0
        self.is_stream = not stat.S_ISREG(os.fstat(self._f.fileno()).st_mode)
        self.bytes_read = 0
        self._hash = hashlib.sha256() if self.is_stream else None
        if header:
            raw = self._next_raw()
            if raw is None:
                raise InputError("the file is empty: expected a header line (use --no-header for a file "
                                 "with one sentence per line)", path=self.path, line=1, reason="empty_file")
            if self._overflow:
                raise InputError(f"the header line is longer than {self.max_row_chars} characters: is this a "
                                 f"TSV file? (raise the limit with --max-row-chars N)", path=self.path, line=1,
                                 reason="row_too_long")
            names = _decode(raw, self.path, self._line).split("\t")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise InputError(f"duplicate column name(s) in the header: {dup}", path=self.path, line=1)
            self.layout = layout_for(names, text_column, id_column, self.path, tsv_header=True)
        else:
            self._peek = self._next_raw()
            n = 1 if self._peek is None else _decode_or_count(self._peek)
            names = [f"col{j}" for j in range(n)]
            if text_column is None:
                t, i = None, _resolve(id_column, names, "--id-column", False)
                if i is not None:
                    raise UsageError("--id-column with --no-header needs --text-column too")
            else:
                t = _resolve(text_column, names, "--text-column", False)
                i = _resolve(id_column, names, "--id-column", False)
            if t is not None and t == i:
                raise UsageError("--text-column and --id-column name the same column")
            self.layout = Layout(names=names, text=t, id=i,
                                 passthrough=[j for j in range(len(names)) if j not in (t, i)] if t is not None else [])
        self._index = 0

    def _read(self, limit: int) -> bytes:
        block = self._f.readline(limit)
        self.bytes_read += len(block)
        if self._hash is not None:
            self._hash.update(block)
        return block

    def _next_raw(self) -> bytes | None:
        raw = self._read(self._cap)
        if not raw:
            return None
        self._line += 1
        self._overflow = 0
        if len(raw) >= self._cap and not raw.endswith(b"\n"):  # too long whatever it holds: skip the rest
            n = len(raw)
            while (block := self._read(1 << 20)) and not block.endswith(b"\n"):
                n += len(block)
            self._overflow = n + len(block)
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        if self._first:
            self._first = False
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        return raw

    def __iter__(self) -> Iterator[Row]:
        peek = getattr(self, "_peek", None)
        self._peek = None
        if peek is not None:
            yield self._row(peek)
        while (raw := self._next_raw()) is not None:
            yield self._row(raw)

    def _row(self, raw: bytes) -> Row:
        idx, line = self._index, self._line
        self._index += 1
        if self._overflow:
            return self._too_long(idx, line, raw.decode("utf-8", errors="replace"), f"{self._overflow} bytes",
                                  complete=False)
        try:
            text = _decode(raw, self.path, line)
        except InputError as exc:
            return Row(idx, line, None, error=exc)
        if len(text) > self.max_row_chars:
            return self._too_long(idx, line, text, f"{len(text)} characters", complete=True)
        lay = self.layout
        if lay.text is None:
            return Row(idx, line, text)
        fields = text.split("\t")
        if len(fields) != len(lay.names):
            col = len("\t".join(fields[: len(lay.names)])) + 1 if len(fields) > len(lay.names) else len(text) + 1
            return Row(idx, line, None, error=InputError(
                f"expected {len(lay.names)} tab-separated fields ({', '.join(lay.names)}), found {len(fields)}",
                path=self.path, line=line, column=col, reason="wrong_field_count"))
        return Row(idx, line, fields[lay.text], fields[lay.id] if lay.id is not None else None,
                   tuple(fields[j] for j in lay.passthrough))

    def _too_long(self, idx: int, line: int, prefix: str, size: str, *, complete: bool) -> Row:
        """A ``row_too_long`` bad row; its id and pass-through fields are kept where ``prefix`` (the line, or
        only its start when not ``complete``) holds them whole. The text is not kept."""
        err = InputError(f"the row is {size} long, more than --max-row-chars {self.max_row_chars} characters "
                         f"(raise it with --max-row-chars N)", path=self.path, line=line,
                         column=self.max_row_chars + 1, reason="row_too_long")
        lay = self.layout
        fields = prefix.split("\t") if lay.text is not None else []
        if not complete:
            fields = fields[:-1]  # it may be cut
        def field(j: int | None) -> str | None:
            return fields[j] if j is not None and j < len(fields) else None
        return Row(idx, line, None, field(lay.id), tuple(field(j) for j in lay.passthrough), error=err)

    def position(self) -> dict:
        """Where reading stands: bytes read so far and, for a stream, the sha256 of those bytes."""
        pos = {"bytes": self.bytes_read}
        if self._hash is not None:
            pos["sha256"] = self._hash.copy().hexdigest()
        return pos

    def identity(self) -> dict:
        """What a resumed run must find again. A regular file: path, size, mtime and the sha256 of its bytes
        (read through this reader's own descriptor with ``pread``: the same file, the read position
        untouched). A stream cannot be read twice: only its kind; each committed part records the hash of
        the bytes read up to it instead (``position``)."""
        if self.is_stream:
            return {"kind": "stream"}
        return _file_identity(self.path, self._f.fileno())

    def seek(self, offset: int, *, line: int, index: int) -> None:
        """Continue at byte ``offset`` (the start of a line; a file, not stdin), which is physical
        ``line`` (1-based) and data row ``index`` (0-based): a worker reads its own slice of a file."""
        self._f.seek(offset)
        self.bytes_read = offset
        self._line, self._index = line - 1, index
        self._first = offset == 0  # a BOM can only start the file
        self._peek = None
        self._overflow = 0

    def close(self) -> None:
        if self._f is not sys.stdin.buffer:
            self._f.close()

    def __enter__(self) -> "TsvReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _file_identity(path: str, fd: int) -> dict:
    """Path, size, mtime and the sha256 of the bytes of the regular file open as ``fd`` (read with ``pread``:
    the read position is untouched)."""
    st = os.fstat(fd)
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, 1 << 20, offset):
        h.update(block)
        offset += len(block)
    return {"path": "-" if path == "-" else os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": h.hexdigest()}


def _decode_or_count(raw: bytes) -> int:
    return raw.count(b"\t") + 1


def count_lines(path: str | os.PathLike) -> int | None:
    """Number of lines (for a progress total), or None for stdin or any other stream (reading one here
    would take its rows from the scorer). Reads a regular file once, fast."""
    if str(path) == "-":
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (0 if last == b"\n" else 1)



# ---------------------------------------------------------------------------------------------- Parquet
def is_parquet(path: str | os.PathLike) -> bool:
    """A Parquet input is recognized by its name: ``.parquet`` or ``.pq``."""
    return str(path).lower().endswith((".parquet", ".pq"))


#: Decoded bytes of a Parquet record batch at most (about; see ``ParquetReader``): a file whose rows are
#: megabytes each is read a few rows at a time.
PARQUET_BATCH_BYTES = 64 << 20

#: Arrow types a text column may have (a dictionary of them too).
_TEXT_TYPES = ("string", "large_string", "string_view")


def _is_text_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return str(t) in _TEXT_TYPES or pa.types.is_string(t) or pa.types.is_large_string(t)


def _byte_lengths(arr):
    """Bytes of each value of a string (or dictionary of strings) array, without decoding it: int64, 0 for null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):  # a value's length, read from the dictionary: nothing is expanded
        lengths = pc.binary_length(arr.dictionary).cast(pa.int64()).take(arr.indices)
    else:
        lengths = pc.binary_length(arr).cast(pa.int64())
    return pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False)


def _without(arr, drop):
    """``arr`` with the rows of the bool mask ``drop`` made null, decoded to plain strings (dropped values
    are never expanded)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if drop.any():
        mask = pa.array(np.asarray(drop, bool))
        if pa.types.is_dictionary(arr.type):
            arr = pa.DictionaryArray.from_arrays(pc.if_else(mask, pa.scalar(None, arr.indices.type), arr.indices),
                                                 arr.dictionary)
        else:
            arr = pc.if_else(mask, pa.scalar(None, arr.type), arr)
    return arr


def parquet_rows(batch, lay: Layout, path: str, *, first: int, max_row_chars: int = MAX_ROW_CHARS) -> list[Row]:
    """Rows of a Parquet record batch whose first row is row ``first`` (0-based) of the file.

    ``line`` is the 1-based row number (a Parquet file has no lines). The id and pass-through columns
    are passed on as strings, as from a TSV; a null text is a bad row (reason ``null_text``), and so is a
    row longer than ``max_row_chars`` (``row_too_long``): its text, or its other columns together (a TSV
    line is limited whole). Lengths are read from the column data (a dictionary column's dictionary)
    before any value is decoded to Python: a row of megabytes is never copied.
    """
    import numpy as np
    import pyarrow as pa

    n = batch.num_rows
    others = ([lay.id] if lay.id is not None else []) + list(lay.passthrough)

    def as_text(j: int):
        arr = batch.column(j)
        if _is_text_type(arr.type):
            return arr
        try:
            return arr.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise UsageError(f"{path}: column {lay.names[j]!r} of type {batch.schema.field(j).type} cannot be "
                             f"read as text; drop it from the file (or score a copy without it)") from None

    ttype = batch.schema.field(lay.text).type
    if not _is_text_type(ttype):
        raise UsageError(f"{path}: the text column {lay.names[lay.text]!r} has type {ttype}, not text (a Parquet "
                         f"string column): choose the text with --text-column NAME, or convert the column to "
                         f"strings first")
    cols = {j: as_text(j) for j in [lay.text, *others]}
    cap = 4 * max_row_chars  # UTF-8: at most 4 bytes a character
    text_bytes = _byte_lengths(cols[lay.text])
    other_bytes = sum((_byte_lengths(cols[j]) for j in others), np.zeros(n, np.int64))
    too_long = (text_bytes > cap) | (other_bytes > cap)  # longer than the limit whatever the characters
    text = _without(cols[lay.text], too_long).to_pylist()
    decoded = {j: _without(cols[j], too_long).to_pylist() for j in others}
    rows = []
    for k, t in enumerate(text):
        i = first + k
        err = None
        fields = [decoded[j][k] for j in others]
        size = sum(len(f) for f in fields if f is not None)
        if too_long[k] or size > max_row_chars or (t is not None and len(t) > max_row_chars):
            what = (f"the text is {len(t)} characters long" if t is not None and len(t) > max_row_chars else
                    f"the text is {text_bytes[k]:,} bytes long" if text_bytes[k] > cap else
                    f"its id and pass-through columns are {other_bytes[k] if other_bytes[k] > cap else size:,} "
                    f"{'bytes' if other_bytes[k] > cap else 'characters'} long")
            err = InputError(f"{what}, more than --max-row-chars {max_row_chars} (raise it with --max-row-chars N)",
                             path=path, line=i + 1, reason="row_too_long")
            t, fields = None, [None] * len(others)
        elif t is None:
            err = InputError(f"the text column {lay.names[lay.text]!r} is null", path=path, line=i + 1,
                             reason="null_text")
        idv = fields[0] if lay.id is not None else None
        rows.append(Row(i, i + 1, t, idv, tuple(fields[1:] if lay.id is not None else fields), err))
    return rows


class ParquetReader:
    """Iterate the ``Row``s of a Parquet file, as ``TsvReader`` does a TSV: the text and id columns by name
    (or 0-based index), every other column passed through.

    Memory stays bounded whatever the rows hold: string columns are read as dictionaries where the file
    stores them so (a value repeated in many rows is decoded once, its length read before it is expanded),
    and each row group is read ``batch_rows`` rows at a time, fewer where its uncompressed size says rows
    are large (``PARQUET_BATCH_BYTES`` per batch). The text column must hold strings: a column of numbers
    (a float column's NaN would be scored as the word "nan") or bytes is refused.
    """

    header = True  # the schema names the columns, as a header line does
    is_stream = False

    def __init__(self, path: str | os.PathLike, *, text_column: str | int | None = None,
                 id_column: str | int | None = None, batch_rows: int = 2048, max_row_chars: int = MAX_ROW_CHARS):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if max_row_chars < 1:
            raise UsageError(f"max_row_chars must be positive, got {max_row_chars}")
        self.path = str(path)
        self.batch_rows, self.max_row_chars = batch_rows, max_row_chars
        self.rows_read = 0
        if not os.path.exists(self.path):
            raise UsageError(f"input file {self.path!r} does not exist")
        if os.path.isdir(self.path):
            raise UsageError(f"input {self.path!r} is a directory, not a Parquet file")
        try:
            self._pf = pq.ParquetFile(self.path)
            schema = self._pf.schema_arrow
        except PermissionError:
            raise UsageError(f"input file {self.path!r} cannot be read (permission denied)") from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"not a readable Parquet file ({exc}); a TSV input must not end in .parquet",
                             path=self.path, reason="bad_parquet") from None
        self.layout = lay = layout_for(schema.names, text_column, id_column, self.path)
        ttype = schema.field(lay.text).type
        if not _is_text_type(ttype):
            raise UsageError(f"{self.path}: the text column {lay.names[lay.text]!r} has type {ttype}, not text (a "
                             f"Parquet string column): choose the text with --text-column NAME, or convert the "
                             f"column to strings first")
        self.num_rows = self._pf.metadata.num_rows
        strings = [n for n in schema.names if _is_text_type(schema.field(n).type)]
        self._pf.close()
        try:  # again, with the string columns read as dictionaries where the file stores them so
            self._pf = pq.ParquetFile(self.path, read_dictionary=strings)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"not a readable Parquet file ({exc})", path=self.path, reason="bad_parquet") from None

    def _batch_rows(self, group: int) -> int:
        """Rows per batch for row group ``group``: ``batch_rows``, fewer where its columns' uncompressed size
        per row is large."""
        rg = self._pf.metadata.row_group(group)
        size = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns))
        per_row = size / max(1, rg.num_rows)
        return int(max(1, min(self.batch_rows, PARQUET_BATCH_BYTES // max(1.0, per_row))))

    def __iter__(self) -> Iterator[Row]:
        import pyarrow as pa

        first = 0
        for g in range(self._pf.metadata.num_row_groups):
            batches = self._pf.iter_batches(batch_size=self._batch_rows(g), row_groups=[g])
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as exc:  # a damaged page: "Corrupt snappy compressed data"
                    raise InputError(f"the Parquet data from row {first + 1} on cannot be read ({exc}): the file "
                                     f"is damaged; rows before it were read", path=self.path, line=first + 1,
                                     reason="bad_parquet") from None
                for row in parquet_rows(batch, self.layout, self.path, first=first,
                                        max_row_chars=self.max_row_chars):
                    self.rows_read += 1
                    yield row
                first += batch.num_rows

    def position(self) -> dict:
        """Where reading stands (rows read; a file is checked whole by ``identity`` on resume)."""
        return {"rows": self.rows_read}

    def identity(self) -> dict:
        """What a resumed run must find again: path, size, mtime and the sha256 of the file's bytes."""
        with open(self.path, "rb") as f:
            return _file_identity(self.path, f.fileno())

    def close(self) -> None:
        close = getattr(self._pf, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "ParquetReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_reader(path: str | os.PathLike, *, text_column: str | int | None = None, id_column: str | int | None = None,
                header: bool = True, max_row_chars: int = MAX_ROW_CHARS):
    """``ParquetReader`` for a ``.parquet``/``.pq`` file, else ``TsvReader`` (``-``: standard input)."""
    if is_parquet(path):
        if not header:
            raise UsageError("--no-header applies to TSV input; a Parquet file's schema names its columns")
        return ParquetReader(path, text_column=text_column, id_column=id_column, max_row_chars=max_row_chars)
    return TsvReader(path, text_column=text_column, id_column=id_column, header=header, max_row_chars=max_row_chars)
