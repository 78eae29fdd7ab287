"""Score lists of texts: tokenize, expand into masked copies, batch across sentences, run, aggregate.

``Scorer.prepare(texts)`` does everything before the engine (tokenize, expand, plan, build the padded
arrays) and ``Scorer.run(prepared)`` runs the engine and scatters the log-probs back, so a caller can
prepare the next chunk on another thread while the engine works on this one (``pipeline.py`` does).

Aggregation (all modes): every copy yields the log-probability of each of its predicted pieces;
a word's log-prob is the sum over its pieces; a sentence's PLL is the sum over its words.

Nothing an engine returns is used unchecked, whichever engine or server it is (``check_result``): the
arrays must have the batch's shape and numeric types (else EngineError naming the engine and server), the
log-probs in the slots read must be finite and <= 0, and the top-k ids in [0, vocab_size). A copy whose
values are impossible makes its sentence a bad row (reason ``impossible_score``), never an ``ok`` one; a
batch of several sentences in which every copy is impossible is an EngineError (the engine or server is at
fault, not the rows).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .batching import BatchPolicy, build, copy_lengths, padding_efficiency, plan
from .engines.base import Batch, BatchResult, Engine, numerics
from .errors import EngineError
from .expand import PRED_A, PRED_B, SENT, WordTooLong, masked_spans, windows
from .model_dir import ModelDir
from .segment import Sentence, WordTokenizer


@dataclass
class SentenceResult:
    """Scores of one text. ``error`` is set (and the arrays empty) when it cannot be scored.

    Attributes:
      sentence: the tokenized text (pieces, word boundaries, character spans).
      piece_log_probs: float64 [n_pieces], natural-log probability of each piece as its mode defines.
      top_k_ids, top_k_log_probs: [n_words, k] predictions at each word's first piece, or None.
      n_copies: masked copies run for this text.
    """

    sentence: Sentence | None
    piece_log_probs: np.ndarray | None = None
    top_k_ids: np.ndarray | None = None
    top_k_log_probs: np.ndarray | None = None
    n_copies: int = 0
    error: str | None = None
    reason: str | None = None

    def word_log_probs(self) -> np.ndarray:
        """float64 [n_words]: sum of each word's piece log-probs."""
        ws = self.sentence.word_starts
        if len(ws) <= 1:
            return np.zeros(0)
        return np.add.reduceat(self.piece_log_probs, ws[:-1]) if len(self.piece_log_probs) else np.zeros(0)

    @property
    def pll(self) -> float:
        return float(self.word_log_probs().sum())


#: Padded tokens of a chunk's batches built ahead, on the preparing thread (12 MiB of int32 arrays); the
#: rest are built one at a time as the engine takes them. A chunk of ordinary sentences fits whole; one
#: of long rows (each copy a window of up to max_seq_length tokens) stays bounded.
EAGER_TOKENS = 1 << 20
#: Word pieces the duplicate memory (``cache_size`` sentences) may hold in all: long rows evict sooner.
CACHED_PIECES = 4_000_000


class Batches(Sequence):
    """The batches of a chunk: the first ones built ahead (up to ``EAGER_TOKENS`` padded tokens), the others
    built when asked for, so memory does not grow with the copies of a chunk."""

    def __init__(self, copies: np.ndarray, batches: list[np.ndarray], sentences: list, ids: tuple[int, int, int, int]):
        self._copies, self._batches, self._sentences, self._ids = copies, batches, sentences, ids
        lengths = copy_lengths(copies)
        self._built: list[Batch] = []
        tokens = 0
        for b in batches:
            tokens += len(b) * int(lengths[b].max())
            if tokens > EAGER_TOKENS and self._built:
                break
            self._built.append(self._build(len(self._built)))

    def _build(self, i: int) -> Batch:
        mask_id, cls_id, sep_id, pad_id = self._ids
        return build(self._copies[self._batches[i]], self._sentences, mask_id, cls_id, sep_id, pad_id)

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._built[i] if i < len(self._built) else self._build(i)


@dataclass
class Prepared:
    """A chunk ready for the engine: unique sentences, their copies and the built batches."""

    texts: list[str]
    keys: list[int]  # for each input text: index into `unique`; -1: scored in an earlier chunk
    borrowed: dict[int, "SentenceResult"]  # input position -> result found in a cache at prepare time
    unique: list[str]
    sentences: list[Sentence | None]
    errors: dict[int, tuple[str, str]]  # unique index -> (reason, message)
    copies: np.ndarray
    batches: list[np.ndarray]  # indices into copies
    built: Sequence[Batch] = field(default_factory=list)  # ``Batches``: built ahead or on demand
    n_stored: int = 0  # input texts answered by the persistent score cache

    @property
    def n_copies(self) -> int:
        return len(self.copies)


@dataclass
class Stats:
    unique_scored: int = 0
    duplicates: int = 0
    copies: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


class Scorer:
    """Scores texts with one model and engine. Thread-safe between one preparer and one runner."""

    def __init__(self, model: ModelDir, engine: Engine, *, mode: str = "whole-word", top_k: int = 0,
                 policy: BatchPolicy | Callable[[Engine], BatchPolicy] | None = None, cache_size: int = 20_000,
                 store_dir: str | None = None, server: str | None = None):
        """``policy``: a BatchPolicy, or a function of the engine giving one (called when the first batch
        is planned: an engine opened on first use, ``engines.base.LazyEngine``, stays closed until then).
        ``server``: for an engine that asks a server, where it is (address and model name): the score
        cache keeps its answers apart, and stores them only after the identity probe passes again."""
        from .expand import MODES

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if top_k < 0 or top_k > model.top_k:
            raise ValueError(f"top_k must be between 0 and the export's k ({model.top_k}), got {top_k}")
        self.model = model
        self.engine = engine
        self.mode = mode
        self.top_k = top_k
        self._policy_arg = policy
        self._policy: BatchPolicy | None = None
        #: the arithmetic of the scores (engines.base.numerics): "fp32", or e.g. "onnx-int8"
        self.numerics = getattr(engine, "numerics", None) or numerics(engine.name, {
            "precision": getattr(engine, "precision", None)})
        self.tokenizer = WordTokenizer(model)
        self.max_seq_length = model.max_seq_length
        self.stats = Stats()
        # Results of texts already scored (identical sentences are scored once), and texts handed to the
        # engine in a chunk not yet run. Both bounded: memory does not grow with the input.
        self._cache: OrderedDict[str, SentenceResult] = OrderedDict()
        self._cache_size = cache_size
        self._cache_pieces = 0
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.server = server
        self.store = None
        self._trusted = False  # the store's entries may be used (see _trust_store)
        self._stamped = False  # the export's files stamp is recorded in the store as verified
        if store_dir is not None:
            from .cache import ScoreCache

            # The family leads the key and reduced precision ends it (BERT exports scored in fp32 keep the key
            # they always had, so existing caches stay valid): int8 or bf16 scores never answer an fp32 run,
            # and a server's answers never answer an in-process run or another server's.
            family = "" if model.family == "bert" else f"{model.family}|"
            reduced = "" if self.numerics == "fp32" else f"|{self.numerics}"
            remote = "" if server is None else f"|server={server}"
            source = f"{engine.name} {server} {self.numerics}" if server else f"{engine.name} {self.numerics}"
            self.store = ScoreCache(store_dir, source=source, namespace=f"{family}{model.checksum}|"
                                    f"{model.max_seq_length}|{mode}|{top_k}{reduced}{remote}")

    @property
    def policy(self) -> BatchPolicy:
        """The batch policy (for an engine opened on first use, reading it opens the engine)."""
        if self._policy is None:
            arg, eng = self._policy_arg, self.engine
            pol = arg if isinstance(arg, BatchPolicy) else arg(eng) if arg else BatchPolicy.for_engine(eng)
            if eng.max_batch_size and pol.max_batch_size > eng.max_batch_size:
                pol = BatchPolicy(pol.batch_tokens, eng.max_batch_size)
            self._policy = pol
        return self._policy

    # ------------------------------------------------------------------------------------- prepare
    def prepare(self, texts: list[str], *, force: bool = False) -> Prepared:
        """Everything before the engine. ``force``: score every distinct text, ignoring earlier chunks."""
        keys: list[int] = [-1] * len(texts)
        borrowed: dict[int, SentenceResult] = {}
        candidates: list[int] = []
        with self._lock:
            for j, t in enumerate(texts):
                if not force:
                    hit = self._cache.get(t)
                    if hit is not None:  # held by this chunk: a later eviction cannot lose it
                        borrowed[j] = hit
                        continue
                    if t in self._pending:  # in a chunk prepared earlier: its result is ready when this runs
                        continue
                candidates.append(j)
        stored = self._from_store(list(dict.fromkeys(texts[j] for j in candidates))) if self.store and not force \
            else {}
        index: dict[str, int] = {}
        unique: list[str] = []
        for j in candidates:
            t = texts[j]
            if t in stored:
                borrowed[j] = stored[t]
                continue
            k = index.get(t)
            if k is None:
                k = index[t] = len(unique)
                unique.append(t)
            keys[j] = k
        with self._lock:
            for t in unique:
                self._pending[t] = None
        sentences: list[Sentence | None] = list(self.tokenizer.tokenize(unique)) if unique else []
        errors: dict[int, tuple[str, str]] = {}
        parts = []
        for i, s in enumerate(sentences):
            if s.n_words == 0:
                errors[i] = ("empty", "no words to score: the text is empty, whitespace or control characters only")
                continue
            spans = masked_spans(s, self.mode)
            try:
                win = windows(s, spans, self.max_seq_length)
            except WordTooLong as exc:
                errors[i] = ("word_too_long", str(exc))
                continue
            parts.append(np.concatenate([np.full((len(spans), 1), i, np.int64), spans, win], axis=1))
        copies = np.concatenate(parts) if parts else np.zeros((0, 7), np.int64)
        batches = plan(copies, self.policy) if len(copies) else []  # nothing to score: the engine stays closed
        tk = self.tokenizer
        built = Batches(copies, batches, sentences, (tk.mask_id, tk.cls_id, tk.sep_id, tk.pad_id))
        return Prepared(texts=texts, keys=keys, borrowed=borrowed, unique=unique, sentences=sentences, errors=errors,
                        copies=copies, batches=batches, built=built,
                        n_stored=sum(1 for j in candidates if texts[j] in stored))

    # ----------------------------------------------------------------------------------------- run
    def run(self, prep: Prepared, on_batch: Callable[[int], None] | None = None) -> list[SentenceResult]:
        """Run the engine on a prepared chunk; return one result per input text, in input order.
        ``on_batch(n_copies)`` is called after each engine batch (progress)."""
        offsets = np.zeros(len(prep.sentences) + 1, np.int64)
        if prep.sentences:
            offsets[1:] = np.cumsum([s.n_pieces for s in prep.sentences])
        piece_lp = np.zeros(int(offsets[-1]), np.float64)
        k = self.top_k
        word_of_piece, word_offsets = self._first_piece_words(prep.sentences)
        top_ids = np.full((int(word_offsets[-1]), k), -1, np.int32) if k else None
        top_lp = np.full((int(word_offsets[-1]), k), -np.inf, np.float32) if k else None
        impossible: dict[int, str] = {}  # sentence -> why its scores cannot be used
        for idx, res in zip(prep.batches, self.engine.map(prep.built) if prep.built else ()):
            if on_batch is not None:
                on_batch(len(idx))
            cp = prep.copies[idx]
            n_pred = cp[:, PRED_B] - cp[:, PRED_A]
            lp, ids, tlp, bad = check_result(res, n_pred, k=k, vocab_size=self.tokenizer.vocab_size,
                                             engine=lambda: describe_engine(self.engine))
            if bad is not None:
                sents = cp[:, SENT]
                if bad.all() and len(np.unique(sents)) > 1:
                    raise EngineError(f"{describe_engine(self.engine)} returned {bad_values(res, n_pred)} for every "
                                      f"one of the {len(bad)} masked copies of a batch of {len(np.unique(sents))} "
                                      f"sentences: a log-probability is finite and <= 0, so none of them is used. "
                                      f"The model or the server is at fault (a damaged export: re-export it; a "
                                      f"server: check what it serves)")
                why = (f"{describe_engine(self.engine)} returned {bad_values(res, n_pred, bad)} for "
                       f"this row, not a log-probability (finite, <= 0), so it cannot be scored; the model or the "
                       f"server is at fault, not the text (a damaged export gives NaN at some positions: "
                       f"re-export and verify it)")
                for i in np.unique(sents[bad]):
                    impossible.setdefault(int(i), why)
            P = lp.shape[1]
            slot = np.arange(P)[None, :]
            valid = slot < n_pred[:, None]
            flat = offsets[cp[:, SENT]][:, None] + cp[:, PRED_A][:, None] + slot
            piece_lp[flat[valid]] = lp[valid]
            if k:
                first = flat[:, 0]
                w = word_of_piece[first]  # -1 where slot 0 is not a word's first piece
                sel = w >= 0
                top_ids[w[sel]] = ids[sel, 0, :k]
                top_lp[w[sel]] = tlp[sel, 0, :k]
        self.stats.copies += prep.n_copies
        real, computed = padding_efficiency(prep.copies, prep.batches)
        self.stats.real_tokens += real
        self.stats.computed_tokens += computed

        fresh: list[SentenceResult] = []
        n_copies = np.bincount(prep.copies[:, SENT], minlength=len(prep.sentences)) if len(prep.copies) else \
            np.zeros(len(prep.sentences), np.int64)
        for i, s in enumerate(prep.sentences):
            if i in prep.errors or i in impossible:
                reason, msg = prep.errors[i] if i in prep.errors else ("impossible_score", impossible[i])
                fresh.append(SentenceResult(sentence=s, error=msg, reason=reason))
                continue
            r = SentenceResult(sentence=s, piece_log_probs=piece_lp[offsets[i]:offsets[i + 1]].copy(),
                               n_copies=int(n_copies[i]))
            if k:
                r.top_k_ids = top_ids[word_offsets[i]:word_offsets[i + 1]].copy()
                r.top_k_log_probs = top_lp[word_offsets[i]:word_offsets[i + 1]].copy()
            fresh.append(r)
        if self.store is not None:
            items = [(t, r.piece_log_probs, r.top_k_ids, r.top_k_log_probs, r.n_copies)
                     for t, r in zip(prep.unique, fresh) if r.error is None]
            if items and self.server is not None:
                self._verify_server()
            self.store.put_many(items)
            self._stamp_verified()
        with self._lock:
            for t in prep.unique:
                self._pending.pop(t, None)
            self._remember(zip(prep.unique, fresh))
        out: list[SentenceResult] = []
        missing: list[int] = []
        for j, (t, key) in enumerate(zip(prep.texts, prep.keys)):
            if key >= 0:
                out.append(fresh[key])
                continue
            r = prep.borrowed.get(j)
            if r is None:
                with self._lock:
                    r = self._cache.get(t)
            if r is None:
                missing.append(j)  # evicted before use: score again below (rare; keeps the cache bounded)
            out.append(r)
        if missing:
            redo = self.run(self.prepare([prep.texts[j] for j in missing], force=True))
            for j, r in zip(missing, redo):
                out[j] = r
        self.stats.unique_scored += len(prep.unique)
        self.stats.duplicates += len(prep.texts) - len(prep.unique) - prep.n_stored
        return out

    def score(self, texts: list[str]) -> list[SentenceResult]:
        """Prepare and run in one call (no overlap)."""
        return self.run(self.prepare(texts))

    def _from_store(self, texts: list[str]) -> dict[str, SentenceResult]:
        """Results of the persistent cache for these texts (re-tokenized: cheap and deterministic)."""
        found = self.store.get_many(texts)
        if not found:
            return {}
        self._trust_store()
        hit_texts = list(found)
        out = {}
        wrong = []
        for t, sent in zip(hit_texts, self.tokenizer.tokenize(hit_texts)):
            lp, ids, tlp, n_copies = found[t]
            k = self.top_k
            copies = sent.n_words if self.mode == "whole-word" else sent.n_pieces  # one per word / per piece
            if len(lp) != sent.n_pieces or n_copies != copies or (ids is None) != (k == 0) or \
                    (ids is not None and ids.shape != (sent.n_words, k)):
                wrong.append(t)  # values that do not fit this sentence: damaged, score it again
                continue
            out[t] = SentenceResult(sentence=sent, piece_log_probs=lp, top_k_ids=ids, top_k_log_probs=tlp,
                                    n_copies=n_copies)
        self.store.reject(wrong)
        with self._lock:
            self._remember(out.items())
        return out

    def _trust_store(self) -> None:
        """Before the first entry of the score cache is used: make sure the export's weights are those an
        engine verified. An engine already open verified them (its identity probe); else the export's files
        must have the stamp recorded when one did (``cache.files_stamp``), or the engine is opened now (and
        verifies them: ModelError if they are not the manifest's). A server's entries are keyed by the
        server and were probed before they were stored."""
        if self._trusted:
            return
        if self.server is None and not getattr(self.engine, "opened", True):
            from .cache import files_stamp

            if self.store.verified_stamp(self.model.path) != files_stamp(self.model.path):
                self.engine.open()  # LazyEngine: the engine verifies the weights as it opens
        self._stamp_verified()
        self._trusted = True

    def _stamp_verified(self) -> None:
        """Record in the store that the export's files, as they are now, were verified by an engine (once an
        in-process engine is open)."""
        if self._stamped or self.server is not None or not getattr(self.engine, "opened", True):
            return
        from .cache import files_stamp

        self.store.record_stamp(self.model.path, files_stamp(self.model.path))
        self._stamped = True

    def _verify_server(self) -> None:
        """Run the export's identity probe against the server again before its answers are stored: EngineError
        if the served model no longer gives the numbers recorded at export (another model behind the same
        name, a restart on other weights)."""
        from .engines.base import IDENTITY_TOLERANCE, probe_diff, read_identity_probe

        probe = read_identity_probe(self.model)
        if probe is None:
            raise EngineError(f"{describe_engine(self.engine)}: the export {self.model.path} records no identity "
                              f"probe, so the server's answers cannot be verified before they are stored in the "
                              f"score cache; re-export the model with mlm-export, or run without --cache")
        batch, expected = probe
        diff = probe_diff(check_result(self.engine.run(batch), np.count_nonzero(batch.masked_lm_positions, axis=1),
                                       k=0, vocab_size=self.tokenizer.vocab_size,
                                       engine=lambda: describe_engine(self.engine))[0], expected)
        if not diff <= IDENTITY_TOLERANCE:
            raise EngineError(f"{describe_engine(self.engine)}: the served model no longer answers the identity probe "
                              f"recorded in the export {self.model.path} (its log-probs differ by up to {diff:.3g}, "
                              f"allowed {IDENTITY_TOLERANCE:g}): another model is being served. Its answers are "
                              f"neither stored in the score cache nor written")

    def _remember(self, items) -> None:
        """Keep (text, result) pairs for duplicates (the caller holds the lock), evicting the oldest beyond
        ``cache_size`` sentences or ``CACHED_PIECES`` word pieces."""
        for t, r in items:
            old = self._cache.pop(t, None)
            if old is not None:
                self._cache_pieces -= _pieces(old)
            self._cache[t] = r
            self._cache_pieces += _pieces(r)
        while self._cache and (len(self._cache) > self._cache_size or self._cache_pieces > CACHED_PIECES):
            self._cache_pieces -= _pieces(self._cache.popitem(last=False)[1])

    @staticmethod
    def _first_piece_words(sentences: list[Sentence | None]) -> tuple[np.ndarray, np.ndarray]:
        """For every piece (concatenated over sentences): global word index if it starts a word, else -1."""
        total = sum(s.n_pieces for s in sentences)
        word_of_piece = np.full(total, -1, np.int64)
        word_offsets = np.zeros(len(sentences) + 1, np.int64)
        base = 0
        for i, s in enumerate(sentences):
            nw = s.n_words
            word_of_piece[base + s.word_starts[:-1]] = word_offsets[i] + np.arange(nw)
            word_offsets[i + 1] = word_offsets[i] + nw
            base += s.n_pieces
        return word_of_piece, word_offsets


def _pieces(r: SentenceResult) -> int:
    return r.sentence.n_pieces if r.sentence is not None else 0


#: A log-probability above 0 by at most this much is a rounding artefact of log-softmax (set to 0.0); above
#: it, an impossible value.
LOG_PROB_SLACK = 1e-5


def describe_engine(engine: Engine) -> str:
    """"the rest engine (server http://host:8501, model bert)": the engine, and the server where there is one."""
    from .engines.base import LazyEngine

    inner = engine.open() if isinstance(engine, LazyEngine) else engine
    opts = getattr(inner, "opts", None)
    where = opts.describe() if hasattr(opts, "describe") else None
    return f"the {engine.name} engine" + (f" ({where})" if where else "")


def check_result(res: BatchResult, n_pred: np.ndarray, *, k: int, vocab_size: int,
                 engine: Callable[[], str]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Check what an engine returned for a batch of ``len(n_pred)`` copies (``n_pred``: slots read per copy).

    Returns (log_probs float64 [B, P], top_k_ids int32 [B, P, k'] or None, top_k_log_probs float32 or None,
    bad) where ``bad`` is None when every value read is possible, else a bool [B]: the copies with a
    log-prob that is not finite or above 0 (beyond ``LOG_PROB_SLACK``), or, with ``k``, a top-k id outside
    [0, vocab_size) or a top-k log-prob that is not finite or above 0, at slot 0. Raises EngineError
    (``engine()`` names it) for arrays that are not numeric or not of the batch's shape.
    """
    B = len(n_pred)
    need = int(n_pred.max()) if B else 0

    def malformed(what: str) -> EngineError:
        return EngineError(f"{engine()} returned {what} for a batch of {B} copies with up to {need} predictions "
                           f"each; nothing of it is used")

    def numeric(x, name: str, kinds: str) -> np.ndarray:
        try:
            a = np.asarray(x)
        except (TypeError, ValueError) as exc:  # ragged nested lists
            raise malformed(f"{name} that is not an array ({exc})") from None
        if a.dtype.kind not in kinds:
            raise malformed(f"{name} of type {a.dtype}, not numbers")
        return a

    lp = numeric(res.log_probs, "log-probs", "fiu")
    if lp.ndim != 2 or lp.shape[0] != B or lp.shape[1] < need:
        raise malformed(f"log-probs of shape {list(lp.shape)}, not [{B}, >= {need}]")
    lp = lp.astype(np.float64)
    valid = np.arange(lp.shape[1])[None, :] < n_pred[:, None]
    with np.errstate(invalid="ignore"):
        wrong = valid & ~(np.isfinite(lp) & (lp <= LOG_PROB_SLACK))
        lp[valid & (lp > 0) & (lp <= LOG_PROB_SLACK)] = 0.0
    bad = wrong.any(axis=1)
    ids = tlp = None
    if k:
        if res.top_k_ids is None or res.top_k_log_probs is None:
            raise malformed("no top-k arrays (top-k was asked for)")
        ids = numeric(res.top_k_ids, "top-k ids", "iu")
        tlp = numeric(res.top_k_log_probs, "top-k log-probs", "fiu")
        if ids.ndim != 3 or ids.shape[:2] != lp.shape or ids.shape[2] < k or tlp.shape != ids.shape:
            raise malformed(f"top-k arrays of shapes {list(ids.shape)} and {list(tlp.shape)}, not "
                            f"[{B}, {lp.shape[1]}, >= {k}]")
        first_ids = ids[:, 0, :k]
        first_lp = tlp[:, 0, :k].astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad |= ((first_ids < 0) | (first_ids >= vocab_size)).any(axis=1)
            bad |= (~np.isfinite(first_lp) | (first_lp > LOG_PROB_SLACK)).any(axis=1)
        ids = ids.astype(np.int32, copy=False)
        tlp = np.minimum(tlp.astype(np.float32), 0.0)
    return lp, ids, tlp, (bad if bad.any() else None)


def bad_values(res: BatchResult, n_pred: np.ndarray, rows: np.ndarray | None = None) -> str:
    """The impossible log-probs of ``res`` in words ("NaN (3), +inf (1), 3.2 (2)"), over ``rows`` if given."""
    lp = np.asarray(res.log_probs, dtype=np.float64)
    valid = np.arange(lp.shape[1])[None, :] < n_pred[:, None]
    if rows is not None:
        valid &= rows[:, None]
    v = lp[valid]
    parts = []
    for name, m in (("NaN", np.isnan(v)), ("+inf", np.isposinf(v)), ("-inf", np.isneginf(v)),
                    ("values above 0", np.isfinite(v) & (v > LOG_PROB_SLACK))):
        if m.any():
            eg = f", e.g. {v[m][0]:.4g}" if name == "values above 0" else ""
            parts.append(f"{name} ({int(m.sum())}{eg})")
    return "log-probs " + ", ".join(parts) if parts else "impossible top-k predictions (ids outside the vocabulary " \
                                                          "or log-probs that are not finite or above 0)"
