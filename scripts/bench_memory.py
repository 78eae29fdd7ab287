"""The torch engine with and without glibc keeping freed memory (``--engine-option memory=retain|system``).

    .venv/bin/python scripts/bench_memory.py --out memory.md [--work /tmp/mlm-bench-bert-base]
        [--batch-sizes 128,341] [--seq 24] [--rounds 3] [--seconds 5]

bert-base shape, the export from bench_engines.py (made there if missing). Every cell runs in a fresh
interpreter, since the malloc settings are process-wide and cannot be undone; rounds interleave the two
settings. A cell times repeated ``eng.map`` calls (one batch per stream, as the scorer feeds the engine)
and reports:

  * copies/s (wall clock, best run);
  * copies per CPU-second (user + system time of the process, best and median run): steal, the time the
    hypervisor gives other VMs, is not CPU time of this process, so this is the steadier comparison on a
    shared VM;
  * the kernel's share of that CPU time and the minor page faults per copy (``getrusage``): the cost the
    setting removes;
  * CPU steal over the cell.

Prints a markdown table and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))


def cell(work: Path, memory: str, B: int, seq: int, seconds: float) -> dict:
    """One engine, one batch size, in this process: the measurements as a dict."""
    from bench_common import Steal
    from bench_engines import make_batch

    from mlm_scorer.engines import get_engine
    from mlm_scorer.model_dir import ModelDir

    md = ModelDir.open(work / "export" / "1")
    eng = get_engine("torch", model=md, memory=memory)
    b = make_batch(int(md.manifest["vocab_size"]), B, seq, int(md.manifest["special_token_ids"]["mask"]))
    work_items = [b] * eng.streams
    list(eng.map(work_items))  # warm-up: allocations, kernel selection
    runs = []
    st = Steal().start()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(runs) < 3:
        t0, c0, f0 = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        list(eng.map(work_items))
        t1, c1, f1 = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        n, user, system = B * len(work_items), c1.user - c0.user, c1.system - c0.system
        runs.append((n / (t1 - t0), n / (user + system), system / (user + system), (f1 - f0) / n))
    st.stop()
    r = np.array(runs)
    return {"memory": memory, "retained": eng.memory_retained, "batch": B, "streams": eng.streams,
            "wall_best": float(r[:, 0].max()), "cpu_best": float(r[:, 1].max()),
            "cpu_median": float(np.median(r[:, 1])), "sys_share": float(np.median(r[:, 2])),
            "faults_per_copy": float(np.median(r[:, 3])), "steal": st.pct}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="write the markdown table here")
    ap.add_argument("--work", default="/tmp/mlm-bench-bert-base", help="bench_engines.py's cache dir")
    ap.add_argument("--batch-sizes", default="128,341", help="copies per batch (per stream); 341 x 24 = 8184 tokens")
    ap.add_argument("--seq", type=int, default=24, help="tokens per copy (default 24)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per cell")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # memory,B: run one cell here, print JSON
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.cell:
        memory, B = a.cell.split(",")
        print(json.dumps(cell(work, memory, int(B), a.seq, a.seconds)))
        return 0

    from bench_common import command_line, export_is_current, git_rev, machine
    from bench_engines import _cpu_name, flops_per_copy

    if not export_is_current(work / "export" / "1"):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_engines.py"), "--prepare-only",
                        "--work", str(work), "--out", os.devnull], check=True)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    got: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(a.rounds):
        for B in sizes:
            for memory in ("system", "retain"):
                out = subprocess.run([sys.executable, __file__, "--out", os.devnull, "--work", str(work),
                                      "--seq", str(a.seq), "--seconds", str(a.seconds), "--cell", f"{memory},{B}"],
                                     capture_output=True, text=True, check=True)
                c = json.loads(out.stdout.strip().splitlines()[-1])
                got.setdefault((memory, B), []).append(c)
                print(f"round {rnd + 1} memory={memory} batch {B}: {c['wall_best']:.1f} copies/s, "
                      f"{c['cpu_best']:.1f} per CPU-s, system {c['sys_share']:.1%}, "
                      f"{c['faults_per_copy']:.0f} faults/copy, steal {c['steal']:.0f} %", file=sys.stderr, flush=True)

    gflop = flops_per_copy(a.seq) / 1e9
    lines = [f"### torch engine: glibc keeps freed memory or not (bert-base shape, {a.seq} tokens)", "",
             f"Machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.libc_ver()[0]} "
             f"{platform.libc_ver()[1]}; {machine()['date']}; commit {git_rev()}. Command: `{command_line(argv)}`. "
             f"Each cell in a fresh process; {a.rounds} interleaved rounds; "
             f"best over rounds for the rates, median over rounds for the rest. {gflop:.2f} GFLOP per copy.", "",
             "| batch (per stream) | memory | copies/s (wall, best) | copies per CPU-s (best / median) "
             "| GFLOP/s per core (best) | system share of CPU time | page faults per copy | steal |",
             "|---|---|---|---|---|---|---|---|"]
    for B in sizes:
        for memory in ("system", "retain"):
            cs = got[(memory, B)]
            best_cpu = max(c["cpu_best"] for c in cs)
            steal = [c["steal"] for c in cs if c["steal"] is not None]
            lines.append(
                f"| {B} | {memory} | {max(c['wall_best'] for c in cs):.1f} | {best_cpu:.1f} / "
                f"{np.median([c['cpu_median'] for c in cs]):.1f} | {best_cpu * gflop:.0f} | "
                f"{np.median([c['sys_share'] for c in cs]):.1%} | "
                f"{np.median([c['faults_per_copy'] for c in cs]):.0f} | "
                + (f"{min(steal):.0f}–{max(steal):.0f} % |" if steal else "n/a |"))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
