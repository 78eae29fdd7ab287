"""A persistent score cache (``--cache DIR``): a daily run over mostly the same data scores only what is new.

One SQLite database, ``DIR/scores.sqlite`` (WAL journal, so concurrent runs read while one writes; a
writer waits up to ``timeout`` seconds for another's transaction). The key is the SHA-256 of the
model's family (other than BERT) and checksum (weights, configuration and tokenizer, verified when the
engine opened the export), the export's max_seq_length, the mode, the top-k setting, the numerics other
than fp32 (``engines.base.numerics``), for a server its address and model name, and the sentence text: a
different model, mode, window policy, arithmetic or server never reads another's scores, and a server's
answers never answer an in-process run. Each entry also names where it came from (``source``: the engine
and its numerics, or the server). The value is what the engine produced for the sentence (piece
log-probs, top-k, copies run); tokenization is redone on a hit (cheap, deterministic for a given model
checksum).

Answers are stored only once they are trusted: an in-process engine verified the export's weights when
it opened (its identity probe); a server's answers are stored after the identity probe is run against it
again (``Scorer``). A run the cache answers whole opens no engine, so the cache also records, per export,
a stamp of its files (size, modification time, inode) as they were when an engine last verified them
(``verified_stamp``/``record_stamp``): a run whose stamp differs (``variables/`` swapped for another
model's, say) opens the engine, which verifies the weights, before any entry is used.

Nothing read back is trusted blindly (SQLite has no page checksums): every entry carries a checksum
over its key and values, and values are range-checked (log-probs finite and <= 0, lengths that fit
the sentence, the top-k width). An entry that fails is *rejected*: not used, deleted, scored again
and counted (``rejected``, shown in the run summary). A database SQLite cannot read raises
UsageError naming the file and the fix. A cache in a directory this process cannot write is opened
read-only (``read_only``: hits are used, new scores are not stored); a directory that is not
writable and holds no cache is refused.

Only scored sentences are stored; rows that could not be scored are recomputed (they cost nothing).
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import tempfile
import threading
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UsageError

DB_NAME = "scores.sqlite"
#: The files SQLite keeps for the database (the journal modes' included).
DB_FILES = ("", "-wal", "-shm", "-journal")
#: 1: no checksums (its entries are dropped on upgrade); 2: a checksum per entry; 3: each entry's source.
SCHEMA_VERSION = 3
#: versions this code reads (a read-only cache of version 2 is read as it is)
READABLE = (2, 3)

_CREATE = ("CREATE TABLE IF NOT EXISTS scores (key BLOB PRIMARY KEY, n_copies INTEGER NOT NULL, "
           "piece_log_probs BLOB NOT NULL, top_k_ids BLOB, top_k_log_probs BLOB, k INTEGER, "
           "checksum BLOB NOT NULL, source TEXT)")


def entry_checksum(key: bytes, n_copies: int, k: int | None, lp: bytes, tid: bytes | None,
                   tlp: bytes | None) -> bytes:
    """16-byte BLAKE2b over the key and every value of an entry (lengths included, so no two differ)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(key)
    h.update(struct.pack("<qq", int(n_copies), -1 if k is None else int(k)))
    for blob in (lp, tid, tlp):
        h.update(struct.pack("<q", -1 if blob is None else len(blob)))
        h.update(blob or b"")
    return h.digest()


def values_ok(lp: np.ndarray, tid: np.ndarray | None, tlp: np.ndarray | None, n_copies: int) -> bool:
    """Range checks an engine's result for one sentence always passes: log-probs finite and <= 0, at least
    one copy, top-k ids >= -1 with log-probs <= 0 (-inf in unused slots), both top-k arrays the same shape."""
    if n_copies < 1 or lp.ndim != 1 or not np.all(np.isfinite(lp)) or np.any(lp > 0):
        return False
    if (tid is None) != (tlp is None):
        return False
    if tid is not None:
        if tid.shape != tlp.shape or tid.ndim != 2 or np.any(tid < -1) or np.any(np.isnan(tlp)) or np.any(tlp > 0):
            return False
    return True


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction (taking the write lock at once, waiting up to the connection's timeout):
    committed if the block completes, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _writable(directory: Path, db: Path) -> str | None:
    """None if this process can write the cache (create files in ``directory``, write ``db``), else why not."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
        if db.exists():
            with open(db, "r+b"):
                pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class ScoreCache:
    """get_many / put_many of per-sentence engine results under one namespace (model, mode, ...)."""

    def __init__(self, directory: str | os.PathLike, *, namespace: str, source: str = "", timeout: float = 60.0):
        """``source``: where the entries this run stores come from (an engine and its numerics, or a server)."""
        from .fsutil import check_target

        d = Path(directory)
        for suffix in DB_FILES:  # never open, create or replace a database through a symlink or a device
            check_target(d / (DB_NAME + suffix), "the score cache file", parent_must_exist=False)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the cache directory {str(d)!r}: {exc}") from None
        self.path = d / DB_NAME
        self.namespace = namespace
        self.source = source
        self.timeout = timeout
        self._lock = threading.Lock()
        self.hits = 0
        self.lookups = 0
        self.rejected = 0
        why = _writable(d, self.path)
        self.read_only = why is not None
        if self.read_only and not self.path.is_file():
            raise UsageError(f"the cache directory {str(d)!r} cannot be written ({why}) and holds no cache to "
                             f"read: make it writable or choose another --cache directory")
        try:
            self._db = self._connect()
            version = self._schema()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        if version not in READABLE:
            self._db.close()
            if self.read_only:
                raise UsageError(f"the score cache {self.path} has schema version {version} and cannot be "
                                 f"upgraded to {SCHEMA_VERSION} here (its directory is read-only: {why}); make "
                                 f"{str(d)!r} writable or choose another --cache directory")
            raise UsageError(f"the score cache {self.path} has schema version {version}, this mlm-scorer uses "
                             f"{SCHEMA_VERSION}; use another --cache directory")

    def _connect(self) -> sqlite3.Connection:
        if not self.read_only:
            db = sqlite3.connect(str(self.path), timeout=self.timeout, check_same_thread=False,
                                 isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            return db
        uri = "file:" + urllib.parse.quote(str(self.path.resolve()))
        try:  # read-only; a WAL database needs its -shm file, which a read-only directory may lack ...
            db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=self.timeout, check_same_thread=False,
                                 isolation_level=None)
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return db
        except sqlite3.OperationalError:
            # ... then read it as an immutable file (no locking): a write by another process while this run
            # reads could tear an entry, which its checksum then rejects
            return sqlite3.connect(uri + "?immutable=1", uri=True, check_same_thread=False, isolation_level=None)

    def _schema(self) -> int:
        """Create or upgrade the tables (writable cache); return the schema version in effect."""
        db = self._db
        if not self.read_only:
            with _transaction(db):
                db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
                row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
                if row is not None and int(row[0]) == 1:  # entries without checksums: drop them
                    db.execute("DROP TABLE IF EXISTS scores")
                    db.execute("DELETE FROM meta WHERE name='schema_version'")
                    row = None
                if row is None:
                    db.execute(_CREATE)
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) == 2:  # entries kept; new ones name their source
                    db.execute("ALTER TABLE scores ADD COLUMN source TEXT")
                    db.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(SCHEMA_VERSION),))
        row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _error(self, exc: sqlite3.Error) -> UsageError:
        """A clear message for a database SQLite cannot use, naming the file and the fix."""
        msg = str(exc)
        if "locked" in msg or "busy" in msg:
            return UsageError(f"the score cache {self.path} stayed locked by another process for more than "
                              f"{self.timeout:g} s (SQLite: {msg}); retry, or choose another --cache directory")
        return UsageError(f"the score cache {self.path} cannot be read (SQLite: {msg}): it is damaged or not a "
                          f"score cache. Delete it (rm {self.path}*) to start an empty cache, or choose another "
                          f"--cache directory")

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(self.namespace.encode() + b"\x00" + text.encode("utf-8", "surrogatepass")).digest()

    def get_many(self, texts: list[str]) -> dict[str, tuple]:
        """text -> (piece_log_probs float64 [n], top_k_ids int32 [w,k] | None, top_k_log_probs | None, n_copies).

        Entries failing their checksum or range checks are left out and rejected (see ``reject``)."""
        if not texts:
            return {}
        keys = {self._key(t): t for t in texts}
        out: dict[str, tuple] = {}
        bad: list[bytes] = []
        with self._lock:
            klist = list(keys)
            try:
                for i in range(0, len(klist), 500):  # SQLite's bound-parameter limit
                    part = klist[i:i + 500]
                    rows = self._db.execute(
                        f"SELECT key, n_copies, piece_log_probs, top_k_ids, top_k_log_probs, k, checksum FROM scores "
                        f"WHERE key IN ({','.join('?' * len(part))})", part).fetchall()
                    for row in rows:
                        entry = _decode(*row)
                        if entry is None:
                            bad.append(row[0])
                        else:
                            out[keys[row[0]]] = entry
            except sqlite3.Error as exc:
                raise self._error(exc) from None
            self.lookups += len(texts)
            self.hits += len(out)
        if bad:
            self._drop(bad)
        return out

    def reject(self, texts: list[str]) -> None:
        """Entries found wrong by the caller (e.g. a length that does not fit the sentence): not hits, deleted."""
        if texts:
            with self._lock:
                self.hits -= len(texts)
            self._drop([self._key(t) for t in texts])

    def _drop(self, keys: list[bytes]) -> None:
        with self._lock:
            self.rejected += len(keys)
            if self.read_only:
                return
            try:
                self._db.executemany("DELETE FROM scores WHERE key = ?", [(k,) for k in keys])
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def put_many(self, items: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None, int]]) -> None:
        """Store (text, piece_log_probs, top_k_ids, top_k_log_probs, n_copies); existing keys are kept.
        Results failing the range checks are not stored (nothing an engine returns should)."""
        if not items or self.read_only:
            return
        rows = []
        for text, lp, tid, tlp, n_copies in items:
            lp = np.asarray(lp, np.float64)
            tid = None if tid is None else np.asarray(tid, np.int32)
            tlp = None if tlp is None else np.asarray(tlp, np.float32)
            if not values_ok(lp, tid, tlp, int(n_copies)):
                continue
            k = tid.shape[1] if tid is not None else None
            key = self._key(text)
            blobs = (lp.tobytes(), None if tid is None else tid.tobytes(), None if tlp is None else tlp.tobytes())
            rows.append((key, int(n_copies), *blobs, k, entry_checksum(key, int(n_copies), k, *blobs),
                         self.source or None))
        with self._lock:
            try:
                with _transaction(self._db):
                    self._db.executemany("INSERT OR IGNORE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    # -- what was verified ------------------------------------------------------------------------
    def _stamp_name(self, export: str | os.PathLike) -> str:
        where = hashlib.sha256(os.path.realpath(export).encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"verified:{hashlib.sha256(self.namespace.encode()).hexdigest()[:32]}:{where}"

    def verified_stamp(self, export: str | os.PathLike) -> str | None:
        """The stamp (``files_stamp``) of ``export`` recorded when an engine last verified its weights for
        this namespace, or None."""
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM meta WHERE name=?", (self._stamp_name(export),)).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc) from None
        return row[0] if row else None

    def record_stamp(self, export: str | os.PathLike, stamp: str) -> None:
        """Record ``stamp`` for ``export``: an engine has verified the weights those files hold."""
        if self.read_only:
            return
        with self._lock:
            try:
                with _transaction(self._db):
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (self._stamp_name(export), stamp))
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


def files_stamp(version_dir: str | os.PathLike) -> str:
    """A cheap identity of an export's files (no file is read): path, size, modification time and inode of
    every regular file under ``version_dir`` except ``tokenizer/`` (checked by its hashes when the export is
    opened). Copying another model's ``variables/`` or ``model.onnx`` in changes it."""
    root = Path(version_dir)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == "tokenizer":
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            h.update(f"{os.path.join(rel, name)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode(
                "utf-8", "surrogatepass"))
    return h.hexdigest()


def _decode(key: bytes, n_copies, lp: bytes, tid: bytes | None, tlp: bytes | None, k, checksum) -> tuple | None:
    """The values of one row, or None if its checksum or ranges say it is damaged."""
    try:
        if checksum != entry_checksum(key, n_copies, k, lp, tid, tlp):
            return None
        lps = np.frombuffer(lp, np.float64).copy()
        ids = tlps = None
        if tid is not None or tlp is not None:
            ids = np.frombuffer(tid, np.int32).reshape(-1, k)
            tlps = np.frombuffer(tlp, np.float32).reshape(-1, k)
    except (TypeError, ValueError, struct.error):  # wrong types, a length that is no multiple of the item size
        return None
    return (lps, ids, tlps, int(n_copies)) if values_ok(lps, ids, tlps, int(n_copies)) else None
