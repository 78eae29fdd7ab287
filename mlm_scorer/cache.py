"""A persistent score cache (``--cache DIR``): a daily run over mostly the same data scores only what is new.

One SQLite database, ``DIR/scores.sqlite`` (WAL journal, so concurrent runs read while one writes; a
writer waits up to ``timeout`` seconds for another's transaction). The key is the SHA-256 of the
model's family (other than BERT) and checksum (weights + vocabulary + casing), the export's
max_seq_length, the mode, the top-k setting and the sentence text: a different model, mode or window
policy never reads another's scores. The value is what the engine produced for the sentence (piece
log-probs, top-k, copies run); tokenization is redone on a hit (cheap, deterministic for a given model
checksum).

Only scored sentences are stored; rows that could not be scored are recomputed (they cost nothing).
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np

from .errors import UsageError

SCHEMA_VERSION = 1


class ScoreCache:
    """get_many / put_many of per-sentence engine results under one namespace (model, mode, ...)."""

    def __init__(self, directory: str | os.PathLike, *, namespace: str, timeout: float = 60.0):
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the cache directory {str(d)!r}: {exc}") from None
        self.path = d / "scores.sqlite"
        self.namespace = namespace
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS scores (key BLOB PRIMARY KEY, n_copies INTEGER NOT NULL, "
                             "piece_log_probs BLOB NOT NULL, top_k_ids BLOB, top_k_log_probs BLOB, k INTEGER)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            (version,) = self._db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"the score cache {self.path} cannot be used ({exc}); remove it or choose another "
                             f"--cache directory") from None
        if int(version) != SCHEMA_VERSION:
            raise UsageError(f"the score cache {self.path} has schema version {version}, this mlm-scorer uses "
                             f"{SCHEMA_VERSION}; use another --cache directory")
        self.hits = 0
        self.lookups = 0

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(self.namespace.encode() + b"\x00" + text.encode("utf-8", "surrogatepass")).digest()

    def get_many(self, texts: list[str]) -> dict[str, tuple]:
        """text -> (piece_log_probs float64 [n], top_k_ids int32 [w,k] | None, top_k_log_probs | None, n_copies)."""
        if not texts:
            return {}
        keys = {self._key(t): t for t in texts}
        out: dict[str, tuple] = {}
        with self._lock:
            klist = list(keys)
            for i in range(0, len(klist), 500):  # SQLite's bound-parameter limit
                part = klist[i:i + 500]
                rows = self._db.execute(
                    f"SELECT key, n_copies, piece_log_probs, top_k_ids, top_k_log_probs, k FROM scores "
                    f"WHERE key IN ({','.join('?' * len(part))})", part).fetchall()
                for key, n_copies, lp, tid, tlp, k in rows:
                    ids = np.frombuffer(tid, np.int32).reshape(-1, k) if tid is not None else None
                    tlps = np.frombuffer(tlp, np.float32).reshape(-1, k) if tlp is not None else None
                    out[keys[key]] = (np.frombuffer(lp, np.float64).copy(), ids, tlps, n_copies)
            self.lookups += len(texts)
            self.hits += len(out)
        return out

    def put_many(self, items: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None, int]]) -> None:
        """Store (text, piece_log_probs, top_k_ids, top_k_log_probs, n_copies); existing keys are kept."""
        if not items:
            return
        rows = []
        for text, lp, tid, tlp, n_copies in items:
            k = tid.shape[1] if tid is not None and tid.ndim == 2 else None
            rows.append((self._key(text), int(n_copies), np.asarray(lp, np.float64).tobytes(),
                         None if tid is None else np.asarray(tid, np.int32).tobytes(),
                         None if tlp is None else np.asarray(tlp, np.float32).tobytes(), k))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO scores VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
