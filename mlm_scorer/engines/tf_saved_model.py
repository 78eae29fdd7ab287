"""In-process TensorFlow SavedModel engine (the default).

Loads ``<export>/<version>`` with ``tf.saved_model.load`` and calls its ``log_prob`` signature (the
target log-probs alone, no top-k search) unless top-k is requested or the export predates it; then
``serving_default``.

Options:
  streams:          batches scored at once, each on its own thread (default: one per CPU up to
                    ``base.MAX_AUTO_STREAMS``; see ``base.plan_streams``).
  intra_op_threads: threads per stream. TensorFlow's intra-op pool is shared by the streams: it gets 1
                    thread when each stream has one (every op then runs on its stream's thread) and
                    streams x threads otherwise.
  inter_op_threads: TensorFlow's inter-op pool (default: the number of streams).

TensorFlow's thread pools are process-wide and fixed once TensorFlow has run anything: an engine created
after that keeps the pools it finds (``threading`` records what is in effect) and still scores correctly.
"""

from __future__ import annotations

import numpy as np

from ..errors import EngineError, UsageError
from ..model_dir import ModelDir
from .base import Batch, BatchResult, Engine, check_identity, plan_streams


class SavedModelEngine(Engine):
    name = "saved_model"
    OPTIONS = {"streams": "batches in flight at once on the CPU (default: from the CPUs)",
               "intra_op_threads": "threads per operation (of all streams together)",
               "inter_op_threads": "operations run at once"}

    def __init__(self, model: ModelDir, *, top_k: bool = False, streams: int | str | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None, **options):
        if options:
            raise UsageError(f"engine 'saved_model' does not take option(s): {', '.join(sorted(options))}; "
                             f"it takes streams, intra_op_threads, inter_op_threads")
        self.streams, per_stream = plan_streams(streams, intra_op_threads, engine=self.name)
        from ..logs import import_tensorflow

        tf = import_tensorflow()  # without its C++ start-up lines on stderr (unless -v)

        intra = per_stream if self.streams == 1 or per_stream == 1 else per_stream * self.streams
        inter = int(inter_op_threads) if inter_op_threads else self.streams
        self.threading = _set_tf_threads(tf, intra, inter)
        self._tf = tf
        self.model = model
        self.want_top_k = top_k
        try:
            self._loaded = tf.saved_model.load(str(model.path))
        except Exception as exc:  # TF raises several classes for a damaged directory
            from ..errors import ModelError

            raise ModelError(f"cannot load the SavedModel at {model.path}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        sigs = self._loaded.signatures
        self._fn = sigs["serving_default"] if top_k or "log_prob" not in sigs else sigs["log_prob"]
        table = getattr(self._loaded, "v", {}).get("bert/embeddings/position_embeddings")
        if table is not None:
            model.check_positions(int(table.shape[0]), f"{model.path / 'variables'}, position_embeddings")
        # The weights must be the manifest's (the identity probe). Its batch is also the first call, which
        # optimizes the graph (seconds for bert-base): done now, as part of start-up.
        self.identity_diff = check_identity(self, model, weights=str(model.path / "variables"))

    def score_batch(self, batch: Batch) -> BatchResult:
        tf = self._tf
        try:
            out = self._fn(**{k: tf.constant(v, dtype=tf.int32) for k, v in batch.as_dict().items()})
        except tf.errors.OpError as exc:
            raise EngineError(f"the SavedModel failed on a batch of shape {batch.input_ids.shape}: "
                              f"{exc.message.splitlines()[0]}") from None
        res = BatchResult(log_probs=out["masked_lm_log_probs"].numpy())
        if self.want_top_k:
            res.top_k_ids = out["top_k_ids"].numpy().astype(np.int32, copy=False)
            res.top_k_log_probs = out["top_k_log_probs"].numpy()
        return res


def _set_tf_threads(tf, intra: int | None, inter: int | None) -> dict[str, int]:
    """Set TensorFlow's process-wide intra/inter-op pools where it still allows it; return what is in effect."""
    for value, setter in ((intra, tf.config.threading.set_intra_op_parallelism_threads),
                          (inter, tf.config.threading.set_inter_op_parallelism_threads)):
        if value:
            try:
                setter(int(value))
            except RuntimeError:  # TensorFlow already ran in this process: its pools are fixed
                pass
    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
