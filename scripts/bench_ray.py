"""`mlm-score ray` with the defaults, one actor or two, against single-process `mlm-score`, on this machine.

    python scripts/bench_ray.py --shape bert-base --sentences 200 --rounds 2

Each configuration runs in a fresh process (Ray started by the command itself, as a user runs it) on N
BLiMP sentences and on 2 sentences; the difference of the two wall times is the time spent scoring the
rest, so `scoring copies/s` leaves out the fixed cost (starting Ray, the actors, loading the model),
which is reported apart. Configurations alternate over the rounds. CPU steal is printed with each row.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (Steal, blimp_sentences, command_line, ensure_export, git_rev, machine,  # noqa: E402
                          make_checkpoint, write_tsv)

CONFIGS = {  # name: command after the input and output
    "mlm-score (one process)": None,
    "mlm-score ray, defaults": [],
    "mlm-score ray --num-actors 1": ["--num-actors", "1"],
    "mlm-score ray --num-actors 2": ["--num-actors", "2"],
}


def run(tsv: Path, out: Path, export: Path, extra: list[str] | None, env: dict) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    summary = out.with_suffix(".json")
    if extra is None:
        cmd = [sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(out) + ".parquet"]
    else:
        cmd = [sys.executable, "-m", "mlm_scorer", "ray", str(tsv), "-o", str(out)] + extra
    cmd += ["--model", str(export), "--id-column", "id", "-q", "--summary-json", str(summary)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return wall, json.loads(summary.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="bert-base", choices=["bert-base", "small"])
    ap.add_argument("--work", default="bench-out/startup", help="models and inputs (shared with bench_startup.py)")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    export = ensure_export(make_checkpoint(work / f"{a.shape}-ckpt", a.shape), work / f"{a.shape}-export")
    big = write_tsv(work / f"blimp-{a.sentences}.tsv", blimp_sentences(a.sentences))
    small = write_tsv(work / "blimp-2.tsv", blimp_sentences(2))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RAY_ADDRESS")}
    res = {k: {"big": [], "small": [], "steal": [], "summary": None} for k in CONFIGS}
    for _ in range(a.rounds):
        for name, extra in CONFIGS.items():
            with Steal() as st:
                wall, s = run(big, work / "ray-out", export, extra, env)
            res[name]["big"].append(wall)
            res[name]["steal"].append(st.pct or 0.0)
            res[name]["summary"] = s
            res[name]["small"].append(run(small, work / "ray-out-small", export, extra, env)[0])

    m = machine()
    print(f"# mlm-score ray vs one process, {a.shape} shape, {a.sentences} BLiMP sentences; {m['date']}, commit "
          f"{git_rev()}, {m['cpu']}, {m['cores']} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"# {command_line()}")
    print()
    print("| run | actors × CPUs (threads) | wall, best | fixed cost (2 sentences), best | scoring copies/s, best "
          "(median) | steal |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in res.items():
        s = r["summary"]
        copies = s["copies"]
        rates = [copies / (b - t) for b, t in zip(r["big"], r["small"]) if b > t]
        shape = ("1 process" if "num_actors" not in s else
                 f"{s['actors']} × {s['cpus_per_actor']:g} ({s['threads_per_actor']})")
        print(f"| {name} | {shape} | {min(r['big']):.1f} s | {min(r['small']):.1f} s | "
              f"{max(rates):.1f} ({statistics.median(rates):.1f}) | {statistics.mean(r['steal']):.0f} % |")


if __name__ == "__main__":
    main()
