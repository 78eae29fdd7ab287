"""Streams: an in-process engine scoring several batches at once (``Engine.map`` with ``streams`` > 1).

The arithmetic of each batch does not change (parity of every engine with streams is in
test_fast_engines.py); what is checked here is the bookkeeping: how streams and threads are chosen,
results in input order, batches really overlapping, the first error (in input order) surfacing with
nothing left running, and ``close`` stopping the threads.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mlm_scorer.engines.base import (MAX_AUTO_STREAMS, Batch, BatchResult, Engine, get_engine_class, plan_streams,
                                    refuse_streams_off_cpu)
from mlm_scorer.errors import EngineError, UsageError


@pytest.mark.parametrize("streams,threads,cpus,expected", [
    (None, None, 2, (2, 1)),            # auto: one single-threaded stream per CPU
    (None, None, 1, (1, 1)),
    (None, None, 16, (MAX_AUTO_STREAMS, 16 // MAX_AUTO_STREAMS)),  # auto caps the streams, not the CPUs
    ("auto", None, 3, (3, 1)),
    (None, 2, 16, (1, 2)),              # threads alone: one stream of exactly that (Ray actors rely on it)
    (None, "4", 2, (1, 4)),
    (3, None, 16, (3, 5)),              # streams alone: the CPUs shared among them
    (8, None, 2, (8, 1)),               # more streams than CPUs: each still gets a thread
    ("2", "3", 2, (2, 3)),              # both: as given
])
def test_plan_streams(streams, threads, cpus, expected):
    assert plan_streams(streams, threads, cpus=cpus) == expected


@pytest.mark.parametrize("streams,threads", [(0, None), ("two", None), (-1, None), (None, -2), (2, "x")])
def test_plan_streams_refuses_nonsense(streams, threads):
    with pytest.raises(UsageError, match="positive integer"):
        plan_streams(streams, threads, cpus=2, engine="saved_model")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_streams_are_refused_off_the_cpu(device):
    for left_out in (None, "", "auto"):
        refuse_streams_off_cpu(left_out, device, engine="torch")  # not given: fine anywhere
    refuse_streams_off_cpu(2, "cpu", engine="torch")
    with pytest.raises(UsageError, match="streams applies to device cpu only"):
        refuse_streams_off_cpu(1, device, engine="torch")


@pytest.mark.parametrize("name,device", [("onnx", "cuda"), ("torch", "cuda"), ("torch", "cuda:0")])
def test_gpu_engines_refuse_streams_before_loading_anything(name, device):
    pytest.importorskip("onnxruntime" if name == "onnx" else "torch")
    # The refusal comes before the model is read or CUDA is looked for, so no model (None) is needed
    # and the message is the same on a machine without a GPU.
    with pytest.raises(UsageError, match="streams applies to device cpu only"):
        get_engine_class(name)(None, device=device, streams=2)


class _SlowEngine(Engine):
    """score_batch sleeps, records how many calls overlap, returns its batch's first id as the log-prob,
    and fails on a batch whose first id is ``fail_on``."""

    name = "slow"

    def __init__(self, streams, delay=0.02, fail_on=None):
        self.streams, self.delay, self.fail_on = streams, delay, fail_on
        self.active = self.peak = self.calls = 0
        self.lock = threading.Lock()
        self.threads: set[str] = set()

    def score_batch(self, batch):
        with self.lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.delay * (1 + (int(batch.input_ids[0, 0]) % 3)))  # uneven: finish out of order
            if int(batch.input_ids[0, 0]) == self.fail_on:
                raise EngineError(f"batch {self.fail_on} failed")
            return BatchResult(log_probs=batch.input_ids[:, :1].astype(np.float32))
        finally:
            with self.lock:
                self.active -= 1


def _batches(n):
    return [Batch(*(np.full((2, 3), i, np.int32),) * 3, np.ones((2, 1), np.int32), np.zeros((2, 1), np.int32))
            for i in range(n)]


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_map_keeps_input_order_and_overlaps_as_many_batches_as_streams(streams):
    eng = _SlowEngine(streams)
    out = [r.log_probs[0, 0] for r in eng.map(_batches(12))]
    assert out == list(range(12))
    assert eng.peak == streams
    assert eng.calls == 12
    assert (streams == 1) == (eng.threads == {threading.current_thread().name})
    eng.close()
    if streams > 1:  # the pool's threads are gone after close
        assert not [t for t in threading.enumerate() if t.name.startswith("mlm-slow-stream")]
    eng.close()  # twice is fine


def test_map_raises_the_first_error_and_leaves_nothing_running():
    eng = _SlowEngine(2, fail_on=4)
    got = []
    with pytest.raises(EngineError, match="batch 4 failed"):
        for r in eng.map(iter(_batches(40))):
            got.append(int(r.log_probs[0, 0]))
    assert got == [0, 1, 2, 3]  # every batch before the failed one, in order, none after
    assert eng.active == 0 and eng.calls < 40  # batches were consumed lazily, a few ahead at most
    assert eng.calls <= 4 + 1 + eng.streams + 1
    eng.close()


def test_map_stopped_early_by_the_consumer_waits_for_calls_in_flight():
    eng = _SlowEngine(3)
    it = eng.map(_batches(20))
    assert int(next(it).log_probs[0, 0]) == 0
    it.close()  # the consumer stops: nothing may keep running behind its back
    assert eng.active == 0 and eng.calls <= 1 + eng.streams + 1
    eng.close()
