#!/usr/bin/env python
"""Copies/s through a real Triton Inference Server (KServe v2 over HTTP with binary tensors, and gRPC)
against in-process ONNX Runtime, on the same model and machine, and the client's share of the CPU time.

    bash scripts/triton_env.sh      # once: .venv-triton (PyTriton's tritonserver, ONNX Runtime)
    python scripts/bench_triton.py --shape bert-base --sentences 200 --rounds 3 --work bench-out/triton

The server is ``scripts/serve_triton.py`` (tritonserver 2.51 with the Python backend, ONNX Runtime inside)
on the same cores, started here on free ports with as many model instances as the in-process engine has
streams, one intra-op thread each; requests of up to ``--max-batch-size`` copies, ``--concurrency`` in
flight. Every engine scores the same prepared batches (BLiMP sentences, ``--batch-tokens`` padded tokens a
batch), and the benchmark checks that their log-probs agree before it reports a rate.

Columns: copies/s (best / median of the interleaved rounds), copies per CPU-second (client and server
processes together), the client's share of that CPU time (this process: building requests, encoding,
decoding, checking every response; the server's: Triton, the Python backend, ONNX Runtime), and CPU steal.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import BLIMP_ZIP, Steal, blimp_sentences, emit, ensure_export, fmt_pct, machine, make_checkpoint  # noqa: E402


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid`` (the server: Python, tritonserver, stubs)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def triton_venv_python() -> Path:
    py = Path(os.environ.get("MLM_TRITON_VENV") or ROOT / ".venv-triton") / "bin" / "python"
    if not py.is_file():
        sys.exit(f"{py} is missing: build it with bash scripts/triton_env.sh")
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="export with model.onnx (default: a random checkpoint of --shape, exported "
                                     "under --work)")
    ap.add_argument("--shape", choices=("small", "bert-base"), default="small")
    ap.add_argument("--work", default="bench-out/triton", help="where the random checkpoint and export are kept")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--mode", default="whole-word", choices=("whole-word", "word-l2r", "token"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight to the server")
    ap.add_argument("--max-batch-size", type=int, default=64, help="copies per request (and the server's cap)")
    ap.add_argument("--batch-tokens", type=int, default=1024, help="padded tokens per batch, every engine")
    ap.add_argument("--streams", type=int, default=None,
                    help="in-process streams and server model instances (default: the onnx engine's choice)")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--json", help="write the numbers here as JSON")
    a = ap.parse_args()

    from triton_fixtures import serve_triton_process

    from mlm_scorer.batching import BatchPolicy
    from mlm_scorer.engines.base import plan_streams
    from mlm_scorer.engines.fake import FakeEngine
    from mlm_scorer.engines.kserve_grpc import KServeGrpcEngine
    from mlm_scorer.engines.kserve_http import KServeHttpEngine
    from mlm_scorer.engines.ort import OnnxEngine
    from mlm_scorer.model_dir import ModelDir
    from mlm_scorer.scorer import Scorer

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.model:
        base = Path(a.model)
    else:
        ckpt = make_checkpoint(work / f"{a.shape}-hf", a.shape)
        base = ensure_export(ckpt, work / f"{a.shape}-export", onnx=True)
    md = ModelDir.open(base)
    if not (md.path / "model.onnx").is_file():
        sys.exit(f"{md.path / 'model.onnx'} is missing: export with mlm-export --onnx")
    if BLIMP_ZIP.is_file():
        texts = blimp_sentences(a.sentences)
    else:
        sys.exit(f"{BLIMP_ZIP} is missing (set MLM_SHARED to the directory holding benchmarks/blimp)")
    policy = BatchPolicy(batch_tokens=a.batch_tokens, max_batch_size=a.max_batch_size)
    batches = list(Scorer(md, FakeEngine(md), mode=a.mode, policy=policy).prepare(texts).built)
    copies = sum(len(b) for b in batches)
    streams, threads = plan_streams(a.streams, None, engine="onnx")
    print(f"{len(texts)} sentences -> {copies} copies in {len(batches)} batches; {streams} stream(s) x {threads} "
          f"thread(s); server: {streams} instance(s) x {threads} thread(s)", flush=True)

    server = serve_triton_process(triton_venv_python(), base, work, name="bench", threads=threads,
                                  extra=("--instances", str(streams), "--max-batch-size", str(a.max_batch_size)))
    server.start()
    engines = {
        "onnx (in-process)": lambda: OnnxEngine(md, streams=streams, threads=threads),
        "Triton HTTP (binary)": lambda: KServeHttpEngine(md, server=server.http_url, model_name="bench",
                                                         concurrency=a.concurrency, max_batch_size=a.max_batch_size,
                                                         timeout=600),
        "Triton gRPC": lambda: KServeGrpcEngine(md, server=server.grpc_url, model_name="bench",
                                                concurrency=a.concurrency, max_batch_size=a.max_batch_size,
                                                timeout=600),
    }
    results: dict[str, list[dict]] = {name: [] for name in engines}
    reference: list[np.ndarray] | None = None
    try:
        opened = {name: make() for name, make in engines.items()}
        for eng in opened.values():
            eng.run(batches[0])  # warm up
        for r in range(a.rounds):
            for name, eng in opened.items():
                c0, s0 = self_cpu_seconds(), group_cpu_seconds(server.proc.pid)
                with Steal() as st:
                    t = time.perf_counter()
                    out = [x.log_probs for x in eng.map(batches)]
                    wall = time.perf_counter() - t
                client = self_cpu_seconds() - c0
                srv = group_cpu_seconds(server.proc.pid) - s0
                if reference is None:
                    reference = out
                diff = max(float(np.max(np.abs(x - y))) for x, y in zip(out, reference))
                if diff > 1e-4:
                    sys.exit(f"{name}: log-probs differ from the first engine's by {diff:.2e}")
                row = {"copies_per_s": copies / wall, "wall_s": wall, "client_cpu_s": client, "server_cpu_s": srv,
                       "steal_pct": st.pct, "max_abs_diff": diff}
                results[name].append(row)
                print(f"round {r + 1} {name:22s} {copies / wall:8.1f} copies/s  client CPU {client:6.2f}s  server "
                      f"CPU {srv:6.2f}s  steal {fmt_pct(st.pct)}", flush=True)
        for eng in opened.values():
            eng.close()
    finally:
        server.stop()

    m = machine()
    lines = [f"{a.shape if not a.model else base}, {a.mode}, {len(texts)} BLiMP sentences ({copies} copies, "
             f"{len(batches)} batches of <= {a.batch_tokens} padded tokens), {a.rounds} rounds; {m['cpu']}, "
             f"{m['cores']} cores, {m['date']}", "",
             "| engine | copies/s, best / median | copies per CPU-s | client share of CPU | steal |",
             "|---|---:|---:|---:|---:|"]
    data = {"machine": m, "shape": a.shape, "mode": a.mode, "copies": copies, "results": results}
    for name, rows in results.items():
        best = max(rows, key=lambda x: x["copies_per_s"])
        med = statistics.median(x["copies_per_s"] for x in rows)
        cpu = best["client_cpu_s"] + (best["server_cpu_s"] if "Triton" in name else 0.0)
        share = best["client_cpu_s"] / cpu if "Triton" in name and cpu > 0 else 1.0
        lines.append(f"| {name} | {best['copies_per_s']:.1f} / {med:.1f} | {copies / cpu:.1f} | "
                     f"{share:.1%} | {fmt_pct(best['steal_pct'])} |")
    emit("\n".join(lines), a.out, a.json, data)


if __name__ == "__main__":
    main()
