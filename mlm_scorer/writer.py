"""Write word rows and sentence rows to two Parquet files, incrementally, finalized atomically.

``-o probs.parquet`` gives ``probs.parquet`` (one row per word) and ``probs.sentences.parquet`` (one row
per input row, scored or not). Chunks are committed as parts in ``probs.parquet.parts/`` (resumable
after a crash, see ``ResultWriter``); at the end the parts are assembled into hidden temporary files in
the same directory, fsync'ed and renamed into place: the sentences file first, the words file last, so
a words file at the final path always comes with its complete sentences file. After a crash there is
never a partial file at a final path.

Schemas (units: natural-log probabilities; character offsets are Python str indices, i.e. Unicode
code points, into the original text, end exclusive):

words:     row int64, line int64, [id string], [pass-through columns string], word_index int32,
           word string, char_start int32, char_end int32, n_pieces int32, log_prob float64,
           prob float64, [top_k list<struct<token string, log_prob float32>>]
sentences: row int64, line int64, [id string], [pass-through columns string], text string,
           n_words int32, n_pieces int32, n_copies int32, unknown_words int32, pll float64, pseudo_perplexity float64,
           min_word_log_prob float64, min_word_index int32, [flag bool, flag_reason string],
           status string, error string
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UsageError
from .fsutil import (OwnedDir, atomic_write_bytes, check_distinct, check_target, create_exclusive, default_file_mode,
                     fsync_path, identity, remove_debris, replace_file, safe_unlink, same_file, temp_names, temp_path)
from .reader import SENTENCE_COLUMNS, WORD_COLUMNS


def sentences_path(words_path: str | os.PathLike) -> Path:
    p = Path(words_path)
    stem = p.name[: -len(".parquet")] if p.name.endswith(".parquet") else p.name
    return p.with_name(stem + ".sentences.parquet")


def parts_path(words_path: str | os.PathLike) -> Path:
    """The parts directory of a run on ``words_path``: ``OUT.parts``."""
    return Path(str(words_path) + ".parts")


_PART = re.compile(r"(?:words|sentences)-\d{6,}\.parquet")
_PART_FILE = r"(?:lock|progress\.json|(?:words|sentences)-\d{6,}\.parquet)"
# temporary names of the files above: fsutil.temp_path's, and tempfile.mkstemp's of earlier versions
_PART_TEMP = re.compile(rf"\.{_PART_FILE}\.(?:tmp-\d+(?:-\d+-[0-9a-f]{{8}}-\d+)?|[a-z0-9_]{{8}}\.tmp)")


def is_part_name(name: str) -> bool:
    """A name the writer makes in a parts directory: lock, progress.json, the parts and their temporary names."""
    return name in ("lock", ResultWriter.PROGRESS) or bool(_PART.fullmatch(name)) or bool(_PART_TEMP.fullmatch(name))


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None = None,
                      also: Iterable[tuple[str | os.PathLike, str]] = ()) -> Path:
    """Refuse, before anything is touched, outputs that are not the run's to write (UsageError, naming the path).

    Both outputs must be absent or regular files (not a directory, a symlink, a device such as /dev/null, a
    FIFO or a socket: ``fsutil.check_target``) in an existing directory; ``OUT.parts`` must be absent or a
    parts directory this program made (``fsutil.OwnedDir``); the input must be none of the files the run
    replaces or deletes (``check_not_input``). ``also``: more (path, what) pairs the run will write (the
    score cache's files, the summary JSON): each must be absent or a regular file, not the input, not an
    output, and not inside the parts directory.
    """
    out = Path(output)
    also = [(Path(a), w) for a, w in also]
    if input_path is not None:
        check_not_input(input_path, out, also)
    check_target(out, "the output (-o)")
    check_target(sentences_path(out), "the sentences output", parent_must_exist=False)
    OwnedDir.check(parts_path(out), what="the parts directory", known=is_part_name)
    parts_real = os.path.realpath(parts_path(out))
    for p, what in also:
        check_target(p, what, parent_must_exist=False)
        if os.path.realpath(p).startswith(parts_real + os.sep):
            raise UsageError(f"{what} {str(p)!r} lies inside the parts directory {parts_real!r}, which belongs to the "
                             f"run on {str(out)!r}; choose another path for it")
    check_distinct([(out, "the words output"), (sentences_path(out), "the sentences output"), *also])
    return out


def touched_paths(output: str | os.PathLike) -> list[tuple[Path, str]]:
    """Every existing path a run on ``output`` may replace or delete, with what it is: both outputs, their
    temporary names (a dead run's are deleted), the parts directory and everything in it."""
    out = Path(output)
    parts = parts_path(out)
    found = [(out, "the words output"), (sentences_path(out), "the sentences output"),
             (parts, "the parts directory")]
    for final in (out, sentences_path(out)):
        found += [(p, "a temporary name of an output") for p in temp_names(final)]
    if parts.is_dir() and not parts.is_symlink():
        found += [(p, f"a file in the parts directory {parts}") for p in sorted(parts.rglob("*"))]
    return found


def check_not_input(input_path: str | os.PathLike, output: str | os.PathLike,
                    also: Iterable[tuple[str | os.PathLike, str]] = ()) -> None:
    """Raise UsageError, before anything is touched, if the input is a file the run would replace or delete
    (``touched_paths`` and ``also``): the same path, a path through symlinks, or the same inode (a hard
    link), or if it lies inside the parts directory."""
    if str(input_path) == "-":
        return
    try:
        os.stat(input_path)
    except OSError:
        return  # the reader says what is wrong with it
    real = os.path.realpath(input_path)
    out = Path(output)
    parts_real = os.path.realpath(parts_path(out))
    for p, what in [*touched_paths(out), *((Path(a), w) for a, w in also)]:
        if same_file(p, input_path):
            raise UsageError(f"refusing to run: the input {str(input_path)!r} is {what} ({str(p)!r}), which this "
                             f"run would replace or delete; choose another output path (-o) or move the input")
    if real.startswith(parts_real + os.sep):
        raise UsageError(f"refusing to run: the input {str(input_path)!r} lies inside the parts directory "
                         f"{parts_real!r}, which this run deletes; move the input or choose another output path")


# The type of each column mlm-score writes (their names and order: ``reader.WORD_COLUMNS`` and
# ``reader.SENTENCE_COLUMNS``, after row, line, [id] and the pass-through columns).
_TYPES = {
    "word_index": pa.int32(), "word": pa.string(), "char_start": pa.int32(), "char_end": pa.int32(),
    "n_pieces": pa.int32(), "log_prob": pa.float64(), "prob": pa.float64(),
    "top_k": pa.list_(pa.struct([("token", pa.string()), ("log_prob", pa.float32())])),
    "text": pa.string(), "n_words": pa.int32(), "n_copies": pa.int32(), "unknown_words": pa.int32(), "pll": pa.float64(),
    "pseudo_perplexity": pa.float64(), "min_word_log_prob": pa.float64(), "min_word_index": pa.int32(),
    "flag": pa.bool_(), "flag_reason": pa.string(), "status": pa.string(), "error": pa.string(),
}


def _schema(id_name: str | None, passthrough: list[str], columns) -> pa.Schema:
    fields = [pa.field("row", pa.int64()), pa.field("line", pa.int64())]
    if id_name is not None:
        fields.append(pa.field("id", pa.string()))
    fields += [pa.field(n, pa.string()) for n in passthrough]
    return pa.schema(fields + [pa.field(n, _TYPES[n]) for n in columns])


def word_schema(id_name: str | None, passthrough: list[str], top_k: bool) -> pa.Schema:
    return _schema(id_name, passthrough, [n for n in WORD_COLUMNS if top_k or n != "top_k"])


def sentence_schema(id_name: str | None, passthrough: list[str], flag: bool) -> pa.Schema:
    return _schema(id_name, passthrough, [n for n in SENTENCE_COLUMNS if flag or n not in ("flag", "flag_reason")])


class _AtomicParquet:
    """A Parquet file written under the run's own temporary name (created exclusively), renamed into place."""

    def __init__(self, final: Path, schema: pa.Schema, metadata: dict[str, str]):
        self.final = final
        self.tmp = temp_path(final)
        self.schema = schema.with_metadata({k: v.encode() for k, v in metadata.items()})
        fd = create_exclusive(self.tmp, default_file_mode())
        self._made = identity(os.fstat(fd))
        self._file = os.fdopen(fd, "wb")
        self.writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")

    def write(self, columns: dict) -> None:
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if table.num_rows:
            self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def commit(self, what: str) -> None:
        replace_file(self.tmp, self.final, what)

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass
        self._file.close()
        safe_unlink(self.tmp, identity_of=self._made)


class OutputLocked(UsageError):
    """Another live run holds the output's lock: a sibling to wait for (a retry may pass), not a mistake."""


def lock_output(lock_path: str | os.PathLike, output: str | os.PathLike) -> int:
    """``flock`` ``lock_path`` (created if absent) for the run writing ``output``; returns the descriptor
    (closing it releases the lock). OutputLocked when a live run holds it. A lock file that its holder
    removed after this run opened it (a finished run cleaning up) is opened again, so that two runs
    never hold locks on two files of one name. A lock path that is not absent or a regular file (a device,
    whose opening alone may act, a FIFO, a socket, a symlink) is refused (UsageError) and never opened."""
    import fcntl

    while True:
        check_target(lock_path, "the lock file", parent_must_exist=False)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0),
                     default_file_mode())
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # put there since the check
            os.close(fd)
            check_target(lock_path, "the lock file", parent_must_exist=False)
            raise UsageError(f"the lock file {str(lock_path)!r} is not a regular file; refusing to use it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLocked(f"another mlm-score run is writing {output} (lock {lock_path} is held); wait for "
                               f"it or choose another output") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


class ResultWriter:
    """Commits each chunk as Parquet parts, resumable; ``commit`` assembles the final files atomically.

    Layout while a run is in progress (``OUT`` = the words path)::

        OUT.parts/progress.json          what is committed: input identity, settings, one entry per part
        OUT.parts/words-000000.parquet   one pair of parts per chunk, each written to a temporary name,
        OUT.parts/sentences-000000.parquet    fsync'ed and renamed before progress.json lists it
        OUT.parts/lock                   flock'ed by the live run: a second run on OUT is refused
        OUT.parts/.mlm-scorer-owned      the marker: the directory is this program's (``fsutil.OwnedDir``)

    The parts directory is never followed through a symlink, and a directory of that name that this program
    did not make is refused; only the files named above are ever deleted from it. A run killed at any
    point leaves only committed parts (and perhaps a temporary file: the next run deletes it). With
    ``resume=True`` a new run checks that the input and the settings are unchanged and continues after
    the last committed row; otherwise an old ``OUT.parts`` is discarded and the run starts over. At the
    end the parts are concatenated into the final files (temporary names, fsync, rename: sentences
    first, words last), then ``OUT.parts`` is removed.
    """

    PROGRESS = "progress.json"

    def __init__(self, output: str | os.PathLike, *, id_name: str | None, passthrough: list[str], top_k: int,
                 flag: bool, metadata: dict, identity: dict | None = None, settings: dict | None = None,
                 resume: bool = False):
        self.words_path = Path(output)
        self.sentences_path = sentences_path(output)
        self.parts_dir = parts_path(output)
        for final in (self.words_path, self.sentences_path):  # left by runs that were killed
            remove_debris(final)
        self.meta = {"mlm_scorer": json.dumps(metadata, sort_keys=True)}
        self.word_schema = word_schema(id_name, passthrough, top_k > 0)
        self.sentence_schema = sentence_schema(id_name, passthrough, flag)
        self.identity, self.settings = identity or {}, settings or {}
        self.resume_note: str | None = None  # what a resume found damaged and scored again
        self._lock_fd = self._lock()
        try:
            self.progress = self._load_or_start(resume)
        except BaseException:
            self.close()  # release the lock: the caller may retry in this process
            raise

    # -- progress ---------------------------------------------------------------------------------
    def _lock(self) -> int:
        self.parts = OwnedDir.open(self.parts_dir, what="the parts directory", known=is_part_name,
                                   owner=f"mlm-score, the committed parts of {self.words_path}")
        return lock_output(self.parts_dir / "lock", self.words_path)

    def _load_or_start(self, resume: bool) -> dict:
        path = self.parts_dir / self.PROGRESS
        fresh = {"format": 1, "identity": self.identity, "settings": self.settings, "parts": []}
        if not resume:
            self._clear_parts()
            self._save(fresh)
            return fresh
        try:
            prog = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self._clear_parts()
            self._save(fresh)
            return fresh  # nothing to resume: a fresh start is what --resume means then
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} is damaged ({exc}); rerun without --resume to start over") from None
        changes = _diff("input", prog.get("identity", {}), self.identity) + \
            _diff("setting", prog.get("settings", {}), self.settings)
        if changes:
            raise UsageError(f"cannot resume {self.words_path}: " + "; ".join(changes) +
                             ". Rerun without --resume to start over")
        for i, part in enumerate(prog["parts"]):
            problem = self._check_part(part)
            if problem:  # it and every later part are scored again
                later = len(prog["parts"]) - i - 1
                rows = sum(p["rows"] for p in prog["parts"][i:])
                which = f"it and the {later} parts after it were" if later else "it was"
                self.resume_note = f"{problem}: {which} discarded and their {rows} rows scored again"
                prog["parts"] = prog["parts"][:i]
                keep = {p[k] for p in prog["parts"] for k in ("words", "sentences")} | {"lock", self.PROGRESS}
                self.parts.clear(keep=keep)
                self._save(prog)
                break
        return prog

    def _check_part(self, part: dict) -> str | None:
        """None if a committed part pair is intact, else what is wrong (naming the file)."""
        for kind, schema in (("words", self.word_schema), ("sentences", self.sentence_schema)):
            path = self.parts_dir / part[kind]
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return f"{part[kind]} is missing"
            want = part.get("sha256", {}).get(kind)
            if want is not None and hashlib.sha256(data).hexdigest() != want:
                return f"{part[kind]} is damaged (its sha256 is not the one committed)"
            try:
                meta = pq.read_metadata(pa.BufferReader(data))
                ok = meta.schema.to_arrow_schema().remove_metadata() == schema.remove_metadata()
            except (pa.ArrowException, OSError, ValueError) as exc:
                return f"{part[kind]} is damaged (not readable as Parquet: {exc})"
            if not ok:
                return f"{part[kind]} is damaged (its columns are not this run's)"
            if kind == "sentences" and meta.num_rows != part["rows"]:
                return f"{part[kind]} is damaged ({meta.num_rows} rows, {part['rows']} committed)"
        return None

    def check_prefix(self, position: dict, rows: int | None) -> None:
        """For a resumed stream: raise UsageError unless the bytes read up to the last committed row (``rows``
        rows read, ``position`` from ``TsvReader.position``) are those the interrupted run committed."""
        parts = self.progress["parts"]
        want = parts[-1].get("position") if parts else None
        if not want or "sha256" not in want:
            return
        if rows is not None and rows < self.rows_done:
            raise UsageError(f"cannot resume {self.words_path}: the input ended after {rows} rows, but "
                             f"{self.rows_done} were committed: it is not the input of the interrupted run. "
                             f"Rerun without --resume to start over")
        if position.get("bytes") != want.get("bytes") or position.get("sha256") != want["sha256"]:
            raise UsageError(f"cannot resume {self.words_path}: the first {self.rows_done} rows of the input "
                             f"differ from those committed (sha256 of the first {want.get('bytes')} bytes): it "
                             f"is not the input of the interrupted run. Rerun without --resume to start over")

    def _clear_parts(self) -> None:
        self.parts.clear(keep={"lock"})

    def _save(self, prog: dict) -> None:
        atomic_write_bytes(self.parts_dir / self.PROGRESS, json.dumps(prog, indent=1).encode())

    @property
    def rows_done(self) -> int:
        """Input rows already committed (a resumed run skips them)."""
        return sum(p["rows"] for p in self.progress["parts"])

    @property
    def committed_stats(self) -> list[dict]:
        return [p["stats"] for p in self.progress["parts"]]

    # -- writing ----------------------------------------------------------------------------------
    def write_chunk(self, words: dict, sentences: dict, stats: dict | None = None,
                    position: dict | None = None) -> None:
        """Write one chunk's parts and commit them (durable once this returns). ``position``: where the
        input stood after the chunk's last row (``TsvReader.position``), checked by a resumed stream."""
        i = len(self.progress["parts"])
        names = {"words": f"words-{i:06d}.parquet", "sentences": f"sentences-{i:06d}.parquet"}
        digests = {}
        for kind, cols, schema in (("words", words, self.word_schema), ("sentences", sentences, self.sentence_schema)):
            buf = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pydict(cols, schema=schema), buf, compression="zstd")
            data = buf.getvalue().to_pybytes()
            digests[kind] = hashlib.sha256(data).hexdigest()
            atomic_write_bytes(self.parts_dir / names[kind], data)
        part = {**names, "rows": len(sentences["row"]), "stats": stats or {}, "sha256": digests}
        if position:
            part["position"] = position
        self.progress["parts"].append(part)
        self._save(self.progress)

    def sentence_parts(self) -> list[Path]:
        """The committed sentence parts, in row order (for a second pass over the run's scores)."""
        return [self.parts_dir / part["sentences"] for part in self.progress["parts"]]

    def commit(self, transform=None, metadata: dict | None = None) -> None:
        """Assemble the parts into the final files, atomically, and remove the parts directory.

        ``transform`` (sentences table -> table of the same schema) is applied to each sentences part on
        the way; ``metadata`` updates the recorded settings. The parts themselves are left as they were.
        """
        meta = self.meta
        if metadata:
            meta = {"mlm_scorer": json.dumps({**json.loads(self.meta["mlm_scorer"]), **metadata}, sort_keys=True)}
        outs = [(self.sentences_path, "sentences", self.sentence_schema), (self.words_path, "words", self.word_schema)]
        writers = [_AtomicParquet(final, schema, meta) for final, _, schema in outs]
        try:
            for w, (_, kind, _) in zip(writers, outs):
                for part in self.progress["parts"]:
                    table = pq.read_table(self.parts_dir / part[kind])
                    if transform is not None and kind == "sentences":
                        table = transform(table)
                    table = table.replace_schema_metadata(w.schema.metadata)
                    if table.num_rows:
                        w.writer.write_table(table)
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        try:
            for w, what in zip(writers, ("the sentences output", "the words output")):
                w.commit(what)  # sentences first, words last: a words file always has its sentences file
        except BaseException:
            for w in writers:
                w.abort()
            raise
        fsync_path(self.words_path.parent)
        self.parts.remove()
        self.close()

    def abort(self) -> None:
        """Stop without assembling: committed parts stay for --resume (an empty parts dir goes)."""
        if not self.progress["parts"]:
            self.parts.remove()
        self.close()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _diff(what: str, old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(f"{what} {k} changed ({old.get(k)!r} -> {new.get(k)!r})")
    return out


def exp(x: float) -> float:
    """``math.exp`` that gives +inf where the result exceeds the largest float (an impossible log-prob read
    from a damaged result) instead of raising OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def pseudo_perplexity(pll: float, n_words: int) -> float:
    """exp(-pll / n_words): +inf where that exceeds the largest float (a mean word log-prob below about
    -709.78, e.g. one word of many unlikely pieces), NaN without words."""
    return exp(-pll / n_words) if n_words else float("nan")

