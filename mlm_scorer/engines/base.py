"""The Engine interface: one abstract method, ``score_batch``.

Every backend (in-process SavedModel, TF Serving REST/gRPC, ONNX Runtime, TensorRT, PyTorch) implements
``score_batch(batch) -> BatchResult`` on fixed-shape int32 arrays named as in google-research/bert. The
base class does the slicing to ``max_batch_size`` so a backend never sees a batch larger than it can take.

Padding convention (shared by every engine and the exported model):
  * sequence padding: ``input_ids = 0`` ([PAD]), ``input_mask = 0``, ``segment_ids = 0``;
  * unused prediction slots: ``masked_lm_positions = 0`` (the [CLS] position, never a real prediction)
    and ``masked_lm_ids = 0``. The model returns ``masked_lm_log_probs = 0.0``, ``top_k_ids = -1`` and
    ``top_k_log_probs = -inf`` for such slots, so a sum over slots is already correct; aggregation
    nevertheless only reads the slots it filled.
"""
from __future__ import annotations

import abc
import collections
import concurrent.futures as cf
import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..errors import EngineError, MissingDependencyError, ModelError, SettingError, UnknownEngineError, UsageError

T = TypeVar("T")

INPUT_NAMES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids")
OUTPUT_NAMES = ("masked_lm_log_probs", "top_k_ids", "top_k_log_probs")


@dataclass
class Batch:
    """A padded batch of masked copies.

    Attributes:
      input_ids: int32 array of shape [batch_size, seq_length], [MASK] already substituted.
      input_mask: int32 array of shape [batch_size, seq_length]; 1 for real tokens, 0 for padding.
      segment_ids: int32 array of shape [batch_size, seq_length]; all 0 for single sentences.
      masked_lm_positions: int32 array of shape [batch_size, max_predictions]; 0 marks an unused slot.
      masked_lm_ids: int32 array of shape [batch_size, max_predictions]; the original (target) ids.
    """

    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray
    masked_lm_positions: np.ndarray
    masked_lm_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in INPUT_NAMES}

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(**{name: arr[start:stop] for name, arr in self.as_dict().items()})


@dataclass
class BatchResult:
    """What an engine returns for a Batch.

    Attributes:
      log_probs: float32 array of shape [batch_size, max_predictions]: natural-log probability of
        ``masked_lm_ids`` at ``masked_lm_positions``; 0.0 in unused slots.
      top_k_ids: int32 array of shape [batch_size, max_predictions, k], or None if not requested.
      top_k_log_probs: float32 array of shape [batch_size, max_predictions, k], or None.
    """

    log_probs: np.ndarray
    top_k_ids: np.ndarray | None = None
    top_k_log_probs: np.ndarray | None = None

    @staticmethod
    def concat(parts: list["BatchResult"]) -> "BatchResult":
        if len(parts) == 1:
            return parts[0]
        has_top_k = parts[0].top_k_ids is not None
        return BatchResult(
            log_probs=np.concatenate([p.log_probs for p in parts]),
            top_k_ids=np.concatenate([p.top_k_ids for p in parts]) if has_top_k else None,
            top_k_log_probs=np.concatenate([p.top_k_log_probs for p in parts]) if has_top_k else None,
        )


class Engine(abc.ABC):
    """Runs the exported masked-LM on batches of copies.

    Subclasses implement ``score_batch``; callers use ``run`` (which caps batch size), ``map`` and ``close``.
    An in-process engine that sets ``streams`` > 1 gets ``map`` scoring that many batches at once, each on
    its own thread (``score_batch`` must then be safe to call concurrently).
    """

    #: Name used by ``get_engine`` and shown in summaries.
    name: str = "engine"
    #: Largest batch the backend accepts in one call (None: no limit).
    max_batch_size: int | None = None
    #: Padded tokens per batch the backend runs fastest at: the scorer's batch size when the user sets
    #: none (``BatchPolicy.for_engine``; None: the scorer's default, 8192). A preference, not a limit.
    preferred_batch_tokens: int | None = None
    #: Batches ``map`` scores at once (see ``plan_streams``).
    streams: int = 1
    #: The threads behind ``streams`` > 1, made on first use and shut down by ``close``.
    _streams_executor: cf.ThreadPoolExecutor | None = None

    @abc.abstractmethod
    def score_batch(self, batch: Batch) -> BatchResult:
        """Score one batch (at most ``max_batch_size`` rows). Must not modify ``batch``."""

    def run(self, batch: Batch) -> BatchResult:
        """Score a batch of any size, slicing it to ``max_batch_size``."""
        limit = self.max_batch_size
        if limit is None or len(batch) <= limit:
            return self.score_batch(batch)
        return BatchResult.concat(
            [self.score_batch(batch.slice(i, i + limit)) for i in range(0, len(batch), limit)])

    def map(self, batches: Iterable[Batch]) -> Iterator[BatchResult]:
        """Score many batches, yielding results in input order.

        With ``streams`` > 1, that many batches run at once on a thread pool (one more waits in its queue,
        so a stream that finishes starts the next batch at once); remote engines override this to keep
        several requests in flight.
        """
        if self.streams <= 1:
            for batch in batches:
                yield self.run(batch)
            return
        yield from ordered_map(self.run, batches, concurrency=self.streams + 1, executor=self._stream_pool())

    def _stream_pool(self) -> cf.ThreadPoolExecutor:
        with _POOL_LOCK:
            if self._streams_executor is None:
                self._streams_executor = cf.ThreadPoolExecutor(self.streams,
                                                               thread_name_prefix=f"mlm-{self.name}-stream")
            return self._streams_executor

    def close(self) -> None:
        """Release resources (sessions, connections, stream threads). Safe to call twice."""
        with _POOL_LOCK:
            pool, self._streams_executor = self._streams_executor, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_POOL_LOCK = threading.Lock()


def numerics(engine: str, options: dict | None = None, model=None) -> str:
    """The arithmetic an engine's numbers come from, as it is asked for before it opens: "fp32" for every
    fp32 engine (they agree within 1e-4, so their scores may be mixed), else the engine and its precision
    ("onnx-int8", "torch-bf16"; a TensorRT plan's precision is its own). For ONNX int8 with ``model``
    given, the int8 file's SHA-256 prefix is appended ("onnx-int8-1a2b3c4d5e6f"): two int8 files of the
    same weights (another quantization) give other numbers. Scores of different numerics are not mixed:
    the score cache and ``--resume`` key on it."""
    precision = (options or {}).get("precision")
    if engine == "tensorrt" and precision in (None, "fp16"):
        return f"tensorrt-{precision or 'plan'}"
    if precision in (None, "fp32"):
        return "fp32"
    name = f"{engine}-{precision}"
    if engine == "onnx" and precision == "int8" and model is not None:
        sha = ((getattr(model, "manifest", None) or {}).get("onnx") or {}).get("int8", {}).get("sha256")
        if isinstance(sha, str) and sha:
            name += f"-{sha[:12]}"
    return name


class LazyEngine(Engine):
    """An engine opened on first use: ``factory()`` runs when a batch must be scored (or a property below
    is read). A run whose every sentence comes from the score cache, or an empty input, never imports
    the engine's runtime (TensorFlow, onnxruntime, torch)."""

    def __init__(self, name: str, factory: Callable[[], Engine], numerics: str = "fp32"):
        self.name = name
        self.numerics = numerics  # see ``numerics()``: known without opening the engine
        self._factory = factory
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self.open_seconds = 0.0  # how long ``factory()`` took (imports, model load, warm-up)

    @property
    def opened(self) -> bool:
        return self._engine is not None

    def open(self) -> Engine:
        with self._lock:
            if self._engine is None:
                import time

                t0 = time.perf_counter()
                self._engine = self._factory()
                self.open_seconds = time.perf_counter() - t0
            return self._engine

    # what the scorer asks of an engine; reading them opens it
    max_batch_size = property(lambda self: self.open().max_batch_size)  # type: ignore[assignment]
    preferred_batch_tokens = property(lambda self: self.open().preferred_batch_tokens)  # type: ignore[assignment]
    streams = property(lambda self: self.open().streams)  # type: ignore[assignment]

    def score_batch(self, batch: Batch) -> BatchResult:
        return self.open().score_batch(batch)

    def run(self, batch: Batch) -> BatchResult:
        return self.open().run(batch)

    def map(self, batches: Iterable[Batch]) -> Iterator[BatchResult]:
        return self.open().map(batches)

    def close(self) -> None:
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()


#: max |Δ log-prob| between an fp32 engine's answer to the export's identity probe and the numbers the
#: exporter recorded (engines agree to ~1e-5; the TF Serving clients hold the served model to the same).
IDENTITY_TOLERANCE = 1e-3


def read_identity_probe(model) -> tuple[Batch, np.ndarray] | None:
    """The manifest's ``identity_probe``: its batch (three fixed masked copies, int32 [3, 12] inputs) and the
    log-probs the exported weights gave for it (float32 [3, P]); None if the manifest records none. Raises
    ModelError if it is malformed."""
    from ..model_dir import MANIFEST_NAME

    probe = model.manifest.get("identity_probe")
    if not isinstance(probe, dict):
        return None
    try:
        batch = Batch(**{n: np.asarray(probe[n], np.int32) for n in INPUT_NAMES})
        expected = np.asarray(probe["masked_lm_log_probs"], np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{model.path / MANIFEST_NAME}: identity_probe is malformed ({exc}); re-export the "
                         f"model") from None
    return batch, expected


def probe_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| of an answer to the identity probe (inf if its shape is not the recorded one)."""
    got = np.asarray(got, np.float32)
    return float(np.max(np.abs(got - expected))) if got.shape == expected.shape else np.inf


def check_identity(engine: Engine, model, *, weights: str, tolerance: float = IDENTITY_TOLERANCE) -> float:
    """Verify that the weights an in-process engine loaded are those of the export's manifest.

    The exporter records an ``identity_probe`` in the manifest (``read_identity_probe``). ``engine`` runs
    it and must agree within ``tolerance``; other weights of the same shape (a ``variables/`` or
    ``model.onnx`` copied from another export, a damaged file) give differences of whole nats. Only then
    are the manifest's ``model_checksum`` (in the outputs' metadata, the score-cache key and the resume
    key) and its numbers this model's. Costs one batch of 36 tokens: at bert-base on 2 cores 75 to 117 ms,
    a third of hashing the weight files from the page cache (BENCHMARKS.md). Returns the max |Δ|; raises
    ModelError. ``weights`` names what was loaded, for the message. (The TF Serving clients run the same
    probe against the served model: ``_remote.RemoteEngine.check_vocabulary``.)
    """
    from ..model_dir import MANIFEST_NAME

    manifest = model.path / MANIFEST_NAME
    probe = read_identity_probe(model)
    if probe is None:
        raise ModelError(f"{manifest} records no identity_probe, so the weights in {weights} cannot be verified "
                         f"against it; re-export the model with mlm-export")
    batch, expected = probe
    try:
        got = engine.run(batch).log_probs
    except EngineError as exc:
        raise ModelError(f"{weights} cannot run the identity probe recorded in {manifest}: {exc}") from None
    diff = probe_diff(got, expected)
    if not diff <= tolerance:
        raise ModelError(f"the weights in {weights} are not those of {manifest}: on the identity probe recorded "
                         f"at export their log-probs differ by up to {diff:.3g} (allowed {tolerance:g}). They were "
                         f"replaced or damaged after export, and the manifest's model_checksum would label "
                         f"another model's scores. Re-export the model (mlm-export SOURCE {model.path.parent})")
    return diff


#: ``plan_streams``' automatic choice uses at most this many streams (measured on 2 cores only; above 4
#: cores each stream gets several threads).
MAX_AUTO_STREAMS = 4


def usable_cpus() -> int:
    """CPUs this process may run on: ``$MLM_SCORER_CPUS`` where set (a Ray actor sets its share of a node
    there), else the affinity mask, which containers and ``taskset`` narrow."""
    env = os.environ.get("MLM_SCORER_CPUS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def plan_streams(streams: int | str | None, threads: int | str | None, *, cpus: int | None = None,
                 engine: str = "engine") -> tuple[int, int]:
    """(streams, threads per stream) for an in-process CPU engine.

    A stream is one batch in flight, on its own thread. Streams of one thread each need no
    synchronisation between cores, which on a shared 2-core VM ran the same products faster than one
    batch split over both cores (BENCHMARKS.md, "Why streams rather than one batch over all cores?").

    * neither given: ``min(cpus, MAX_AUTO_STREAMS)`` streams sharing the CPUs (one thread each up to 4 CPUs);
    * only ``threads``: one stream of that many threads (the behaviour before streams existed: a Ray
      actor or a user that sized its threads keeps exactly that);
    * only ``streams``: the CPUs shared among them;
    * both: as given.
    """
    def positive(v, what):
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise UsageError(f"engine {engine!r}: {what} must be a positive integer, not {v!r}")
        return n

    cpus = cpus or usable_cpus()
    s = positive(streams, "streams") if _streams_given(streams) else None
    t = positive(threads, "threads") if threads not in (None, "", 0) else None
    if s is None and t is not None:
        return 1, t
    if s is None:
        s = min(cpus, MAX_AUTO_STREAMS)
    return s, t if t is not None else max(1, cpus // s)


def _streams_given(streams: int | str | None) -> bool:
    """False for the values that mean "not given, choose automatically": None, "" and "auto"."""
    return streams not in (None, "", "auto")


def refuse_streams_off_cpu(streams: int | str | None, device: str, *, engine: str) -> None:
    """Raise UsageError if ``streams`` was given for a device other than the CPU, where ``map`` runs one
    batch at a time (streams are a CPU-engine setting; silently ignoring it would mislead)."""
    if device != "cpu" and _streams_given(streams):
        raise UsageError(f"engine {engine!r}: streams applies to device cpu only; on {device} one batch "
                         f"runs at a time (leave streams out)")


def ordered_map(fn: Callable[[Any], T], items: Iterable[Any], *, concurrency: int,
                executor: cf.Executor) -> Iterator[T]:
    """``map(fn, items)`` with up to ``concurrency`` calls running at once; results in input order.

    ``items`` is consumed lazily (at most ``concurrency`` ahead of the consumer). The first exception
    (in input order) is raised after cancelling the calls not yet started.
    """
    window: collections.deque[cf.Future] = collections.deque()
    it = iter(items)
    try:
        for item in it:
            window.append(executor.submit(fn, item))
            if len(window) >= concurrency:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for fut in window:
            fut.cancel()
        for fut in window:  # do not leave calls running behind the caller's back
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - already failing or closing
                    pass


# The engine registry: every name ``--engine`` takes, in-process engines and the clients of model servers
# alike. Entries are imported lazily (heavy dependencies load only when the engine is chosen).
#
# Constructor contract: ``EngineClass(model: ModelDir, *, top_k: bool = False, **options)`` where options
# are the engine's own settings (server, timeout, engine_file, precision, ...), declared by the engine as
# ``OPTIONS`` ({name: what it sets}); an engine raises UsageError for an option it does not take. "auto" is
# a function with that contract that returns the engine ``choose_engine`` picks.
@dataclass(frozen=True)
class EngineEntry:
    """Where an engine lives and what it is.

    ``target``: "package.module:Class"; ``extra``: the pip extra that provides its dependencies;
    ``protocol``: for a server's client, the API it speaks ("tfserving" or "kserve"), None in-process;
    ``transport``: for a server's client, "http" or "grpc"; ``options``: "package.module:NAME" of its
    ``OPTIONS`` declaration where importing the class's module is heavy (TensorFlow's protos, grpc), so
    options are checked before anything heavy loads (None: the class's ``OPTIONS``).
    """

    target: str
    extra: str = ""
    protocol: str | None = None
    transport: str | None = None
    options: str | None = None


_REMOTE_OPTIONS = "mlm_scorer.engines._remote:OPTION_SPEC"
_KSERVE_OPTIONS = "mlm_scorer.engines.kserve_base:KSERVE_OPTIONS"
_ENGINES: dict[str, EngineEntry] = {
    "auto": EngineEntry("mlm_scorer.engines.base:auto_engine"),
    "saved_model": EngineEntry("mlm_scorer.engines.tf_saved_model:SavedModelEngine", "tf"),
    "fake": EngineEntry("mlm_scorer.engines.fake:FakeEngine"),
    "rest": EngineEntry("mlm_scorer.engines.tf_serving_rest:RestEngine", "serving", "tfserving", "http", _REMOTE_OPTIONS),
    "grpc": EngineEntry("mlm_scorer.engines.tf_serving_grpc:GrpcEngine", "grpc", "tfserving", "grpc", _REMOTE_OPTIONS),
    "onnx": EngineEntry("mlm_scorer.engines.ort:OnnxEngine", "onnx"),
    "tensorrt": EngineEntry("mlm_scorer.engines.trt:TensorRTEngine", "tensorrt"),
    "torch": EngineEntry("mlm_scorer.engines.torch_engine:TorchEngine", "torch"),
    "kserve_http": EngineEntry("mlm_scorer.engines.kserve_http:KServeHttpEngine", "serving", "kserve", "http",
                               _KSERVE_OPTIONS),
    "kserve_grpc": EngineEntry("mlm_scorer.engines.kserve_grpc:KServeGrpcEngine", "kserve", "kserve", "grpc",
                               _KSERVE_OPTIONS),
}

#: The default engine: ``choose_engine`` decides what runs.
DEFAULT_ENGINE = "auto"
#: A server URL's scheme -> its transport.
SERVER_SCHEMES = {"http": "http", "https": "http", "grpc": "grpc", "grpcs": "grpc"}


def register_engine(name: str, target: str, extra: str = "", *, protocol: str | None = None,
                    transport: str | None = None, options: str | None = None) -> None:
    """Register an engine class by dotted path ``"package.module:Class"`` (see ``EngineEntry``)."""
    _ENGINES[name] = EngineEntry(target, extra, protocol, transport, options)


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def _unknown(name: str) -> UnknownEngineError:
    return UnknownEngineError(f"unknown engine {name!r}; known engines: {', '.join(engine_names())}")


def engine_options_of(name: str) -> dict[str, str] | None:
    """The options engine ``name`` declares ({option: what it sets}), read without loading its runtime;
    None for an engine that declares none (a registered one without ``OPTIONS``: not checked here).
    "auto" takes what any in-process engine takes (its choice gets them)."""
    if name not in _ENGINES:
        raise _unknown(name)
    if name == "auto":
        union: dict[str, str] = {}
        for other, e in _ENGINES.items():
            if e.protocol is None and other not in ("auto", "fake"):
                union.update(engine_options_of(other) or {})
        return union
    entry = _ENGINES[name]
    try:
        if entry.options:
            module_name, attr = entry.options.split(":")
            declared = getattr(importlib.import_module(module_name), attr)
        else:
            declared = getattr(get_engine_class(name), "OPTIONS", None)
    except MissingDependencyError:
        return None  # said when the engine is opened
    return None if declared is None else {k: (v if isinstance(v, str) else "") for k, v in declared.items()}


def check_engine_options(name: str, options: dict[str, Any], *, server: str | None = None) -> None:
    """Refuse (UsageError) options engine ``name`` does not declare, naming them and listing those it takes.
    "auto" with a ``server``: the options of that server's clients."""
    if name == "auto" and server:
        transport = _transport(server)
        declared: dict[str, str] | None = {}
        for other, e in _ENGINES.items():
            if e.transport == transport:
                declared.update(engine_options_of(other) or {})  # type: ignore[union-attr]
        what = f"no {transport} server client takes"
    else:
        declared = engine_options_of(name)
        what = "no in-process engine takes" if name == "auto" else f"engine {name!r} does not take"
    if declared is None:
        return
    unknown = sorted(set(options) - set(declared))
    if unknown:
        takes = "they take" if name == "auto" else "it takes"
        raise UsageError(f"{what} option(s): {', '.join(unknown)}; {takes}: {', '.join(sorted(declared))}")


def _transport(server: str) -> str | None:
    scheme = server.split("://", 1)[0].lower() if "://" in server else ""
    return SERVER_SCHEMES.get(scheme)


def resolve_engine(engine: str, server: str | None = None, protocol: str | None = None) -> str:
    """The engine that ``--engine``, ``--server`` and ``--protocol`` name, decided without asking anything:
    an in-process engine, a server's client, or "auto". With a server, "auto" means: ask it which protocol
    it speaks (``kserve_base.server_engine``, when the run starts). UsageError for a combination that
    cannot be (a gRPC URL and a REST client, a server's client and no server, ...); UnknownEngineError,
    listing the known names, for a name the registry does not hold."""
    if engine not in _ENGINES:
        raise _unknown(engine)
    entry = _ENGINES[engine]
    if not server:
        if entry.protocol:
            raise SettingError(f"--engine {engine} needs --server URL", option="engine")
        if protocol:
            raise SettingError("--protocol applies to --server", option="protocol")
        return engine
    transport = _transport(server)
    if transport is None:
        raise SettingError(f"--server must start with http://, https://, grpc:// or grpcs://, got {server!r}",
                           option="server")
    implied = "rest" if transport == "http" else "grpc"  # the URL's kind, as the TF Serving client is named
    if engine != "auto":
        if entry.transport != transport:
            raise SettingError(f"--server {server} is a {implied} URL but --engine is {engine}", option="engine")
        if protocol not in (None, "auto", entry.protocol):
            raise SettingError(f"--engine {engine} speaks {entry.protocol}, not --protocol {protocol}",
                               option="protocol")
        return engine
    if protocol in (None, "auto"):
        return "auto"
    for other, e in _ENGINES.items():
        if e.transport == transport and e.protocol == protocol:
            return other
    raise SettingError(f"no engine speaks --protocol {protocol} over {transport}; known protocols: "
                       f"{', '.join(sorted({e.protocol for e in _ENGINES.values() if e.protocol}))}", option="protocol")


def choose_engine(name: str, model, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The engine "auto" stands for, and its options; any other name is returned as given.

    Decided without importing a runtime (``importlib.util.find_spec`` and the export's files):

      * ``precision`` int8 -> onnx; bf16 / fp16, or a CUDA ``device`` -> torch; an ``engine_file`` -> tensorrt;
      * else (fp32 on CPU) ONNX Runtime when the export has ``model.onnx`` and onnxruntime is installed, else
        the SavedModel (``threads`` becomes its ``intra_op_threads``).

    Why ONNX Runtime first: it starts in a fraction of TensorFlow's time (0.2 s against ~3-5 s to import)
    and scored as fast or faster on the CPUs measured (BENCHMARKS.md, "Which engine runs by default?").
    """
    opts = dict(options or {})
    if name != "auto":
        return name, opts
    precision, device = str(opts.get("precision") or "fp32"), str(opts.get("device") or "cpu")
    if opts.get("engine_file"):
        return "tensorrt", opts
    if precision == "int8":
        return "onnx", opts
    if precision in ("bf16", "fp16") or device.startswith("cuda"):
        return "torch", opts
    onnx_file = getattr(model, "path", None) is not None and (model.path / "model.onnx").is_file()
    if onnx_file and importlib.util.find_spec("onnxruntime") is not None and not (
            {"intra_op_threads", "inter_op_threads"} & set(opts)):
        return "onnx", opts
    if "threads" in opts:
        opts["intra_op_threads"] = opts.pop("threads")
    for key in ("precision", "device"):  # fp32 on the CPU is what the SavedModel computes: nothing to pass
        opts.pop(key, None)
    return "saved_model", opts


def auto_engine(model, **kwargs: Any) -> Engine:
    """``get_engine("auto", ...)``: the engine ``choose_engine`` picks, opened with its options."""
    top_k = kwargs.pop("top_k", False)
    name, opts = choose_engine("auto", model, kwargs)
    return get_engine(name, model=model, top_k=top_k, **opts)


def get_engine_class(name: str) -> Callable[..., Engine]:
    if name not in _ENGINES:
        raise _unknown(name)
    target, extra = _ENGINES[name].target, _ENGINES[name].extra
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # a missing optional dependency
        hint = f"pip install 'mlm-scorer[{extra}]'" if extra else "reinstall mlm-scorer"
        raise MissingDependencyError(f"engine {name!r} needs a package that is not installed "
                                     f"({exc.name or exc}): {hint}") from exc
    return getattr(module, cls_name)


def get_engine(name: str, **kwargs: Any) -> Engine:
    """Create an engine by name, e.g. ``get_engine("onnx", model=md, threads=2)``; options it does not declare
    are refused before it loads anything (``check_engine_options``)."""
    check_engine_options(name, {k: v for k, v in kwargs.items() if k not in ("model", "top_k")},
                         server=kwargs.get("server"))
    return get_engine_class(name)(**kwargs)
