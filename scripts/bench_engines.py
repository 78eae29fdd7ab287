"""Benchmark engines × precision × batch size on the bert-base shape: masked copies per second.

    .venv/bin/python scripts/bench_engines.py --out bench.md [--work /tmp/bench-bert-base]
        [--engines saved_model,onnx,onnx-int8,torch,torch-bf16] [--batch-sizes 8,32,128] [--seq 24]
        [--threads N] [--streams auto|N] [--seconds 4] [--rounds 3] [--drift-ref onnx]

On a CUDA machine (agreement with CPU fp32 via --drift-ref):
    python scripts/bench_engines.py --out gpu.md --engines torch-cuda,torch-cuda-fp16,torch-cuda-bf16 \
        --batch-sizes 256,1024,4096 --drift-ref torch

The model is a random BertForMaskedLM with bert-base's shape (12 layers, hidden 768, 12 heads,
intermediate 3072, vocabulary 30,522 from /work/shared/vocab/bert-base-uncased/vocab.txt), exported
with mlm-export (SavedModel) and write_onnx (ONNX fp32 + int8) into --work (reused on later runs).
Each copy is ``--seq`` tokens with one masked position (the whole-word / token modes' common case).

Also measured:
  * the fp32 matrix-multiply ceiling of this machine (torch.matmul, [B*T,768]x[768,3072], the shape of
    BERT's FFN, same thread count) and the bf16 one, in GFLOP/s; each fp32 row shows the share of that
    ceiling it reaches (model FLOPs per copy × copies/s / ceiling);
  * the drift of every reduced-precision path against the fp32 ONNX engine on the benchmark batch (mean
    and max |Δ log-prob|, top-1 agreement). With random weights predictions are nearly uniform, so the
    drift here is indicative only; the tests measure it on a peaky tiny model.

CPU engines run as the scorer runs them: ``--streams`` batches at once (default: the engines' automatic
choice, one single-threaded stream per core on up to 4 cores), the --threads shared among them; a cell's
batch size is per stream. ``--streams 1`` gives one stream of --threads threads (the engine before
commit 59dcbab).

Prints a markdown table and writes it to --out.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench_common import BERT_VOCAB as VOCAB, Steal, command_line, export_is_current, git_rev, machine  # noqa: E402
BASE = dict(hidden=768, layers=12, heads=12, intermediate=3072, max_pos=512)
ENGINES = {  # label -> (engine name, options)
    "saved_model": ("saved_model", {}),
    "onnx": ("onnx", {}),
    "onnx-int8": ("onnx", {"precision": "int8"}),
    "torch": ("torch", {}),
    "torch-bf16": ("torch", {"precision": "bf16"}),
    "torch-cuda": ("torch", {"device": "cuda"}),
    "torch-cuda-fp16": ("torch", {"device": "cuda", "precision": "fp16"}),
    "torch-cuda-bf16": ("torch", {"device": "cuda", "precision": "bf16"}),
}


def prepare(work: Path, log) -> Path:
    """Make (once) the random bert-base checkpoint and its export with ONNX fp32 + int8."""
    from tiny_models import make_hf_bert

    import mlm_export
    from mlm_export.to_onnx import write_onnx

    export_base = work / "export"
    if export_is_current(export_base / "1", int8=True):
        return export_base
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        log("making a random bert-base-shaped checkpoint ...")
        make_hf_bert(hf, vocab=VOCAB, init_range=0.02, seed=0, **BASE)
    log("exporting SavedModel ...")
    ckpt = mlm_export.load_checkpoint(hf)
    from mlm_export.saved_model import export_checkpoint

    vdir = export_checkpoint(ckpt, export_base, max_seq_length=128, overwrite=True, log=log)
    log("writing ONNX fp32 + int8 ...")
    write_onnx(vdir, ckpt, quantize="int8", log=log)
    return export_base


def make_batch(vocab_size: int, B: int, T: int, mask_id: int, seed: int = 0):
    """B copies of T tokens ([CLS] ... [SEP]), one masked position each; int32 arrays."""
    from mlm_scorer.engines import Batch

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab_size, size=(B, T)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    pos = rng.integers(1, T - 1, size=(B, 1)).astype(np.int32)
    tgt = np.take_along_axis(ids, pos, 1).copy()
    np.put_along_axis(ids, pos, mask_id, 1)
    return Batch(ids, np.ones_like(ids), np.zeros_like(ids), pos, tgt)


def matmul_ceiling(threads: int, dtype: str = "fp32", M: int = 768, seconds: float = 2.0) -> float:
    """GFLOP/s of torch.matmul on [M,768]x[768,3072] (BERT's FFN shape), best of repeated runs."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(M, 768, dtype=dt)
    b = torch.randn(768, 3072, dtype=dt)
    flop = 2 * M * 768 * 3072
    for _ in range(3):
        torch.matmul(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, b)
        best = max(best, 5 * flop / (time.perf_counter() - t0) / 1e9)
    return best


def cpu_seconds() -> float:
    """This process's CPU time (every thread), user + system."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def matmul_per_cpu_second(M: int = 768, seconds: float = 2.0) -> float:
    """GFLOP per CPU-second of one-threaded torch.matmul on [M,768]x[768,3072]: the product rate a core
    gives, whatever else the machine runs (CPU time, not wall time)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(M, 768), torch.randn(768, 3072)
        torch.matmul(a, b)
        flop, best, t_end = 2 * M * 768 * 3072, 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            c0 = cpu_seconds()
            for _ in range(5):
                torch.matmul(a, b)
            best = max(best, 5 * flop / max(cpu_seconds() - c0, 1e-9) / 1e9)
        return best
    finally:
        torch.set_num_threads(n)


def flops_per_copy(T: int, H=768, L=12, I=3072, V=30522, P=1) -> float:
    """Multiply-adds ×2 of the encoder on T tokens plus the head on P positions."""
    per_token = L * (4 * H * H + 2 * H * I) * 2
    attn = L * 2 * T * H * 2  # QK^T and AV, per token
    head = P * (H * H + H * V) * 2
    return T * (per_token + attn) + head


def time_engine(eng, batch, seconds: float, warmup: int = 1, min_runs: int = 1) -> tuple[float, float, float]:
    """(best, median) copies/s over repeated runs for about ``seconds`` (at least ``min_runs``), and copies
    per CPU-second over them all; a run is one batch per stream, all in flight at once (``eng.map``), as the
    scorer feeds the engine.

    The machine may be shared: the best run is the least disturbed one, so it is what the table
    reports (with the median next to it to show the noise).
    """
    work = [batch] * max(1, eng.streams)
    for _ in range(warmup):  # graph optimisation, kernel selection, allocations
        list(eng.map(work))
    times, t_end, c0 = [], time.perf_counter() + seconds, cpu_seconds()
    while time.perf_counter() < t_end or len(times) < min_runs:
        t0 = time.perf_counter()
        list(eng.map(work))
        times.append(time.perf_counter() - t0)
    n = len(batch) * len(work)
    return n / min(times), n / float(np.median(times)), n * len(times) / max(cpu_seconds() - c0, 1e-9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="write the markdown table here")
    ap.add_argument("--work", default="/tmp/mlm-bench-bert-base", help="cache dir for the random model + export")
    ap.add_argument("--engines", default="saved_model,onnx,onnx-int8,torch,torch-bf16")
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--seq", type=int, default=24, help="tokens per copy incl. [CLS]/[SEP] (default 24)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (default: all cores)")
    ap.add_argument("--streams", default="auto",
                    help="batches in flight per CPU engine, sharing --threads (default: the engines' automatic choice)")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per cell, over all rounds (default 4)")
    ap.add_argument("--drift-ref", default="onnx", choices=sorted(ENGINES),
                    help="fp32 engine the drift is measured against (run untimed if not in --engines)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all cells (default 3)")
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    import torch

    from mlm_scorer.engines import get_engine
    from mlm_scorer.engines.base import plan_streams
    from mlm_scorer.model_dir import ModelDir

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.prepare_only:
        prepare(work, log)
        return 0
    if not export_is_current(work / "export" / "1", int8=True):
        # in a child process: exporting starts TensorFlow here, after which its thread pools cannot be set
        subprocess.run([sys.executable, __file__, "--prepare-only", "--work", str(work), "--out", a.out], check=True)
    md = ModelDir.open(prepare(work, log))
    V = int(md.manifest["vocab_size"])
    mask_id = int(md.manifest["special_token_ids"]["mask"])
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    labels = [e for e in a.engines.split(",") if e]
    streams, per_stream = plan_streams(a.streams, None, cpus=a.threads)
    torch.set_num_threads(a.threads)
    ceil32 = matmul_ceiling(a.threads, "fp32")
    core_rate = matmul_per_cpu_second()
    try:
        ceil16 = matmul_ceiling(a.threads, "bf16")
    except RuntimeError:
        ceil16 = float("nan")
    fpc = flops_per_copy(a.seq, V=V)
    log(f"matmul ceiling: fp32 {ceil32:.0f} GFLOP/s, bf16 {ceil16:.0f} GFLOP/s; {fpc / 1e9:.2f} GFLOP per copy")

    drift_batch = make_batch(V, 64, a.seq, mask_id, seed=1)
    engines, results, drift, ref = {}, {}, {}, None
    for label in labels:
        name, opts = ENGINES[label]
        opts = dict(opts)
        if name == "saved_model":
            opts.update(streams=streams, intra_op_threads=per_stream)
        elif "device" not in opts:
            opts.update(streams=streams, threads=per_stream)
        try:
            eng = get_engine(name, model=md, top_k=True, **opts)
        except Exception as exc:  # a missing extra / no GPU: report and go on
            log(f"{label}: skipped ({type(exc).__name__}: {exc})")
            results[label] = {"skipped": str(exc).splitlines()[0]}
            continue
        out = eng.run(drift_batch)
        if label == a.drift_ref:
            ref = out
        drift[label] = out
        engines[label] = eng
        results[label] = {B: [] for B in sizes}
    if ref is None and a.drift_ref:  # the reference is not among the timed engines: run it once, untimed
        name, opts = ENGINES[a.drift_ref]
        with get_engine(name, model=md, top_k=True, **opts) as r_eng:
            ref = r_eng.run(drift_batch)
    batches = {B: make_batch(V, B, a.seq, mask_id) for B in sizes}
    # Rounds: every engine and batch size once per round, the fp32 matmul ceiling at the start of each.
    # On a shared machine the load moves; interleaving spreads it over all cells alike, and the best
    # round of each cell is its least disturbed measurement.
    ceils = [ceil32]
    per_cpu_s: dict[str, list[float]] = {}
    whole = Steal().start()
    for r in range(a.rounds):
        for label, eng in engines.items():
            for B in sizes:
                ceils.append(matmul_ceiling(a.threads, "fp32", seconds=0.3))  # next to every cell
                # torch's threads are process-wide: the torch engine's streams each get their share
                torch.set_num_threads(a.threads if eng.streams == 1 else per_stream)
                with Steal() as st:
                    best, med, per_cpu = time_engine(eng, batches[B], a.seconds / a.rounds, warmup=1 if r == 0 else 0)
                results[label][B].append(best)
                per_cpu_s.setdefault(label, []).append(per_cpu)
                log(f"round {r + 1}/{a.rounds} {label:16s} batch {B:4d}: {best:8.1f} copies/s "
                    f"({best * fpc / 1e9:.0f} GFLOP/s; fp32 matmul just before: {ceils[-1]:.0f}; CPU steal {st})")
    whole.stop()
    for label, eng in engines.items():
        results[label] = {B: (max(v), float(np.median(v))) for B, v in results[label].items()}
        eng.close()
    ceil32 = max(ceils)
    core_rate = max(core_rate, matmul_per_cpu_second())

    from mlm_export.drift import drift_report

    lines = [f"### Engines on the bert-base shape ({a.seq} tokens, 1 masked position per copy)", "",
             f"Machine: {platform.processor() or platform.machine()}, {a.threads} threads "
             f"({_cpu_name()}); CPU engines: {streams} stream(s) x {per_stream} "
             f"thread(s), batch size per stream; torch {torch.__version__}"
             + (f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no GPU")
             + f"; {machine()['date']}; commit {git_rev()}. Random weights (bert-base shape, 30,522 vocab). "
             f"CPU steal (time the hypervisor gave to other VMs) over the timed rounds: {whole}.", "",
             f"Command: `{command_line(argv)}`.", "",
             f"Measured matmul ceiling ([768x768]x[768x3072], torch, best in the run): **fp32 {ceil32:.0f} "
             f"GFLOP/s**, bf16 {ceil16:.0f} GFLOP/s. Model cost: {fpc / 1e9:.2f} GFLOP per copy.", "",
             "Cells: best / median over interleaved rounds of copies/s "
             "(the machine is shared; best = least disturbed). "
             "% of ceiling: best copies/s × GFLOP per copy / the highest fp32 matmul rate measured in the run "
             "(measured next to every cell).", "",
             f"Per CPU-second (robust to a shared machine's load): the engine's copies per CPU-second of this "
             f"process over every round and batch size, × GFLOP per copy, against one core's fp32 product rate "
             f"(one-threaded torch [768x768]x[768x3072], GFLOP per CPU-second: **{core_rate:.0f}**).", "",
             "| engine | " + " | ".join(f"batch {b}" for b in sizes) +
             " | fp32: best as % of fp32 matmul ceiling | × saved_model (best vs best) | copies per CPU-second "
             "| % of a core's product rate | × saved_model per CPU-second |",
             "|---|" + "---|" * (len(sizes) + 5)]
    sm = results.get("saved_model", {})
    base = max(v[0] for v in sm.values()) if sm and "skipped" not in sm else None
    base_cpu = max(per_cpu_s["saved_model"]) if "saved_model" in per_cpu_s else None
    for label in labels:
        r = results[label]
        if "skipped" in r:
            lines.append(f"| {label} | skipped: {r['skipped']} |" + " |" * (len(sizes) + 1))
            continue
        best = max(v[0] for v in r.values())
        speed = f"{best / base:.2f}×" if base else "—"
        fp32 = ENGINES[label][1].get("precision", "fp32") == "fp32"
        gpu = ENGINES[label][1].get("device", "cpu") != "cpu"
        share = "(GPU)" if gpu else f"{100 * best * fpc / 1e9 / ceil32:.0f}%" if fp32 else "(not fp32)"
        cpu_rate = max(per_cpu_s.get(label, [float("nan")]))
        cpu_share = f"{100 * cpu_rate * fpc / 1e9 / core_rate:.0f}%" if fp32 and not gpu else "(not fp32)"
        cpu_speed = f"{cpu_rate / base_cpu:.2f}×" if base_cpu else "—"
        lines.append(f"| {label} | " + " | ".join(f"{r[b][0]:.1f} / {r[b][1]:.1f}" for b in sizes) +
                     f" | {share} | {speed} | {cpu_rate:.1f} | {cpu_share} | {cpu_speed} |")
    if ref is not None:
        lines += ["", f"Drift against {a.drift_ref} (fp32) on 64 random masked copies:", "",
                  "| path | mean abs Δ log-prob | max abs Δ log-prob | top-1 agreement |", "|---|---|---|---|"]
        for label, out in drift.items():
            if label == a.drift_ref:
                continue
            rep = drift_report(ref.log_probs, ref.top_k_ids[..., 0], out.log_probs, out.top_k_ids[..., 0],
                               drift_batch.masked_lm_positions)
            lines.append(f"| {label} | {rep['mean_abs_diff']:.2e} | {rep['max_abs_diff']:.2e} | "
                         f"{rep['top1_agreement']:.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text, encoding="utf-8")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
