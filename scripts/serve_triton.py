#!/usr/bin/env python
"""Serve an export through a real Triton Inference Server on the CPU, without a Triton container.

    bash scripts/triton_env.sh                                   # once: .venv-triton (PyTriton, ONNX Runtime)
    .venv-triton/bin/python scripts/serve_triton.py EXPORT [--name bert] [--http-port 8000] [--grpc-port 8001]
    mlm-score in.tsv -o out.parquet --model EXPORT --server http://127.0.0.1:8000 --model-name bert

PyTriton (nvidia-pytriton) starts the ``tritonserver`` binary it ships (Triton 2.51, Python backend) and
binds a Python callable to the model NAME: here ONNX Runtime running the export's ``model.onnx`` (``mlm-export
--onnx``). Clients see an ordinary Triton: KServe v2 over HTTP (binary tensor data included) and gRPC,
dynamic batching (``--max-batch-size``, ``--max-queue-delay-us``), the model configuration API. The
export's signature is served unchanged (INT32 inputs, FP32/INT32 outputs, batch dimension first), and its
identity goes into the configuration's ``parameters`` (``mlm_scorer.model_checksum``, ``vocab_sha256``,
``vocab_size``, ``top_k``), which the mlm-scorer client compares with its local export before its
identity probe.

Before serving, the script checks ``model.onnx`` against the manifest (sha256) and runs the export's
identity probe through it. Each request of a merged batch is checked on its own (ids inside the
vocabulary, positions inside the sequence, 0/1 mask): a request that fails gets NaN log-probs, which every
mlm-scorer client refuses, and its batch-mates are computed as usual (the Python backend cannot fail one
request of a batch alone).

For a GPU, TensorRT or a TensorFlow SavedModel, serve the repository of ``python -m mlm_export.triton_repo``
with NVIDIA's Triton container instead (docs/triton.md). SIGTERM or Ctrl-C stops the server.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

INPUTS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids")
OUTPUTS = ("masked_lm_log_probs", "top_k_ids", "top_k_log_probs")
PARAM_PREFIX = "mlm_scorer."
IDENTITY_TOLERANCE = 1e-3

log = logging.getLogger("serve_triton")


# ----------------------------------------------------------------------------------------- the export

def version_dir(path: Path, version: int | None = None) -> Path:
    """An export's version directory (the highest numeric one, or ``version``), as mlm-score resolves it."""
    if (path / "mlm_scorer.json").is_file() and version is None:
        return path
    versions = sorted(int(c.name) for c in path.iterdir() if c.name.isdigit() and (c / "mlm_scorer.json").is_file()) \
        if path.is_dir() else []
    if not versions:
        raise SystemExit(f"error: {path} is not an mlm-scorer export (no mlm_scorer.json in it or in a version "
                         f"directory); make one with mlm-export CHECKPOINT {path} --onnx")
    if version is not None and version not in versions:
        raise SystemExit(f"error: version {version} not found under {path}; versions there: {versions}")
    return path / str(version if version is not None else versions[-1])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def open_session(vdir: Path, manifest: dict[str, Any], threads: int | None):
    """ONNX Runtime session on the export's model.onnx, checked against the manifest (sha256, identity probe)."""
    import onnxruntime as ort

    path = vdir / "model.onnx"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: export with mlm-export --onnx")
    want = (manifest.get("onnx") or {}).get("sha256")
    if want and sha256(path) != want:
        raise SystemExit(f"error: {path} does not match the sha256 its manifest records; re-export with --onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if names != list(INPUTS):
        raise SystemExit(f"error: {path} has inputs {names}, expected {list(INPUTS)}; re-export it")
    probe = manifest.get("identity_probe")
    if isinstance(probe, dict):
        feed = {n: np.asarray(probe[n], np.int32) for n in INPUTS}
        got = sess.run(["masked_lm_log_probs"], feed)[0]
        diff = float(np.max(np.abs(got - np.asarray(probe["masked_lm_log_probs"], np.float32))))
        if not diff <= IDENTITY_TOLERANCE:
            raise SystemExit(f"error: {path} gives the identity probe's log-probs off by {diff:.3g}: it does not hold "
                             f"the weights of {vdir / 'mlm_scorer.json'}")
    return sess


# ----------------------------------------------------------------------------------------- the callable

def request_problem(arrs: dict[str, np.ndarray], *, vocab: int, type_vocab: int, max_len: int) -> str | None:
    """Why one request cannot be scored by this model (None if it can)."""
    ids, mask, seg = arrs["input_ids"], arrs["input_mask"], arrs["segment_ids"]
    pos, tgt = arrs["masked_lm_positions"], arrs["masked_lm_ids"]
    if ids.ndim != 2 or ids.shape != mask.shape or ids.shape != seg.shape:
        return f"input_ids/input_mask/segment_ids shapes {ids.shape}/{mask.shape}/{seg.shape} differ"
    if pos.ndim != 2 or pos.shape != tgt.shape or pos.shape[0] != ids.shape[0]:
        return f"masked_lm_positions/masked_lm_ids shapes {pos.shape}/{tgt.shape} do not fit {ids.shape}"
    T = ids.shape[1]
    if T > max_len:
        return f"sequence length {T} exceeds max_seq_length {max_len}"
    checks = (("input_ids", ids, vocab), ("masked_lm_ids", tgt, vocab), ("segment_ids", seg, type_vocab),
              ("input_mask", mask, 2), ("masked_lm_positions", pos, T))
    for name, a, hi in checks:
        if a.size and (int(a.min()) < 0 or int(a.max()) >= hi):
            return f"{name} has values outside [0, {hi})"
    return None


def make_infer(sess, *, vocab: int, type_vocab: int, max_len: int, k: int) -> Callable[[list], list]:
    """The bound callable: a list of requests (one per client request in the merged batch) -> their outputs.

    Requests of one shape run as one ONNX Runtime batch (Triton merges equal shapes only); a request that
    fails ``request_problem`` gets NaN log-probs and -1 ids instead, without touching the others.
    """
    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list[int]] = {}
        feeds: list[dict[str, np.ndarray]] = []
        for i, req in enumerate(requests):
            arrs = {n: np.asarray(req[n], np.int32) for n in INPUTS}
            feeds.append(arrs)
            problem = request_problem(arrs, vocab=vocab, type_vocab=type_vocab, max_len=max_len)
            if problem:
                B, P = arrs["masked_lm_positions"].shape[:2] if arrs["masked_lm_positions"].ndim == 2 else (0, 0)
                log.warning("refusing a request of %d copies: %s (answered with NaN)", B, problem)
                results[i] = {"masked_lm_log_probs": np.full((B, P), np.nan, np.float32),
                              "top_k_ids": np.full((B, P, k), -1, np.int32),
                              "top_k_log_probs": np.full((B, P, k), np.nan, np.float32)}
                continue
            groups.setdefault((arrs["input_ids"].shape[1], arrs["masked_lm_positions"].shape[1]), []).append(i)
        for idx in groups.values():
            feed = {n: np.concatenate([feeds[i][n] for i in idx]) for n in INPUTS}
            outs = dict(zip(OUTPUTS, sess.run(list(OUTPUTS), feed)))
            start = 0
            for i in idx:
                stop = start + feeds[i]["input_ids"].shape[0]
                results[i] = {n: np.ascontiguousarray(outs[n][start:stop]) for n in OUTPUTS}
                start = stop
        return results  # type: ignore[return-value]

    return infer


# ----------------------------------------------------------------------------------------- the server

_PARAMETERS: dict[str, dict[str, str]] = {}


def _install_parameters_hook() -> None:
    """Put ``_PARAMETERS[model]`` into the ``parameters`` of the configuration PyTriton generates (PyTriton
    0.7.0 has no public setting for them; it keeps its own ``workspace-path`` entry there)."""
    from pytriton.models import model as pm

    if getattr(pm.Model, "_mlm_parameters", False):
        return
    original = pm.Model._get_triton_model_config

    def with_parameters(self):
        cfg = original(self)
        for key, value in _PARAMETERS.get(self.model_name, {}).items():
            cfg.backend_parameters.setdefault(key, value)
        return cfg

    pm.Model._get_triton_model_config = with_parameters
    pm.Model._mlm_parameters = True


def identity_parameters(manifest: dict[str, Any]) -> dict[str, str]:
    return {PARAM_PREFIX + key: str(manifest[key])
            for key in ("model_checksum", "vocab_sha256", "vocab_size", "top_k") if key in manifest}


def prepare_environment() -> None:
    """Triton's Python-backend stub loads libpython3.X.so: put the interpreter's LIBDIR on LD_LIBRARY_PATH
    (inherited by the tritonserver process PyTriton starts)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def read_manifest(vdir: Path) -> dict[str, Any]:
    return json.loads((vdir / "mlm_scorer.json").read_text(encoding="utf-8"))


def export_callable(vdir: Path, manifest: dict[str, Any], threads: int | None = None) -> Callable[[list], list]:
    """The callable that serves the export in ``vdir``: ONNX Runtime on its model.onnx (checked by
    ``open_session``), each request checked by ``make_infer``."""
    cfg = manifest.get("config") or {}
    return make_infer(open_session(vdir, manifest, threads), vocab=int(manifest["vocab_size"]),
                      type_vocab=int(cfg.get("type_vocab_size") or 2), max_len=int(manifest["max_seq_length"]),
                      k=int(manifest["top_k"]))


def bind_export(triton, export: Path, *, name: str, version: int | None = None, max_batch_size: int = 64,
                max_queue_delay_us: int = 2000, instances: int = 1, threads: int | None = None,
                with_identity: bool = True, infer: Callable[[list], list] | None = None) -> dict[str, Any]:
    """Bind the export's ONNX model to ``triton`` as NAME (version: the export's); returns its manifest.

    ``with_identity``: put the export's identity into the configuration's parameters (a client then refuses
    another export before probing). ``infer``: the callable to bind instead of ``export_callable``'s (it
    must answer as the export's signature says).
    """
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    vdir = version_dir(export, version)
    manifest = read_manifest(vdir)
    k = int(manifest["top_k"])
    if infer is None:
        infer = export_callable(vdir, manifest, threads)
    if with_identity:
        _install_parameters_hook()
        _PARAMETERS[name] = identity_parameters(manifest)
    triton.bind(
        model_name=name,
        model_version=int(vdir.name) if vdir.name.isdigit() else 1,
        infer_func=[infer] * max(1, int(instances)),
        inputs=[Tensor(name=n, dtype=np.int32, shape=(-1,)) for n in INPUTS],
        outputs=[Tensor(name="masked_lm_log_probs", dtype=np.float32, shape=(-1,)),
                 Tensor(name="top_k_ids", dtype=np.int32, shape=(-1, k)),
                 Tensor(name="top_k_log_probs", dtype=np.float32, shape=(-1, k))],
        config=ModelConfig(batching=True, max_batch_size=int(max_batch_size),
                           batcher=DynamicBatcher(max_queue_delay_microseconds=int(max_queue_delay_us))),
        strict=True,
    )
    return manifest


def triton_config(*, http_port: int, grpc_port: int, metrics_port: int | None, host: str, log_verbose: int = 0):
    from pytriton.triton import TritonConfig

    kw: dict[str, Any] = dict(http_port=http_port, grpc_port=grpc_port, http_address=host, grpc_address=host,
                              log_verbose=log_verbose, exit_on_error=True)
    if metrics_port:
        kw["metrics_port"] = metrics_port
    else:
        kw["allow_metrics"] = False
    return TritonConfig(**kw)


def stop_on_sigterm(triton) -> None:
    def handler(signum, frame):
        threading.Thread(target=triton.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("export", type=Path, help="export directory with model.onnx (mlm-export --onnx)")
    ap.add_argument("--name", default="bert", help="model name on the server (default bert)")
    ap.add_argument("--version", type=int, help="export version directory (default: the highest)")
    ap.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (default: off)")
    ap.add_argument("--max-batch-size", type=int, default=64, help="copies per request and merged batch (default 64)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000,
                    help="dynamic batcher's wait to merge requests, microseconds (default 2000)")
    ap.add_argument("--instances", type=int, default=1, help="model instances (ONNX Runtime batches run at once)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per instance (default: all cores)")
    ap.add_argument("--workspace", type=Path, help="PyTriton's working directory (default: a temporary one, removed at exit)")
    ap.add_argument("--verbose", action="store_true", help="Triton's own log at verbose level 1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="serve_triton: %(message)s")
    for noisy in ("pytriton", "sh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.max_batch_size < 1 or args.instances < 1 or args.max_queue_delay_us < 0:
        ap.error("--max-batch-size and --instances must be positive, --max-queue-delay-us >= 0")
    prepare_environment()
    try:
        from pytriton.triton import Triton
    except ImportError:
        ap.error("PyTriton is not installed here: run with .venv-triton/bin/python (bash scripts/triton_env.sh)")
    cfg = triton_config(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                        host=args.host, log_verbose=1 if args.verbose else 0)
    with Triton(config=cfg, workspace=str(args.workspace) if args.workspace else None) as triton:
        manifest = bind_export(triton, args.export, name=args.name, version=args.version,
                               max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                               instances=args.instances, threads=args.threads)
        stop_on_sigterm(triton)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        log.info("serving %r (model_checksum %s…, vocabulary %d, top-%d) at http://%s:%d and grpc://%s:%d",
                 args.name, str(manifest["model_checksum"])[:12], manifest["vocab_size"], manifest["top_k"], host,
                 args.http_port, host, args.grpc_port)
        print(f"READY http://{host}:{args.http_port} grpc://{host}:{args.grpc_port}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
