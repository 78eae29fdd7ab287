"""What verifying an export's weights costs when an engine opens it, at bert-base shape: the identity
probe the in-process engines run (three masked copies of 12 tokens, compared with the log-probs the
exporter recorded) against checksumming the files each engine loads (sha256, page cache warm and cold).

  open          creating the engine as the scorer does (load + the probe), best of --rounds, each in a
                fresh process
  probe         the probe batch alone on the open engine (median of 5), i.e. what the check adds to a
                start-up that runs a first batch anyway (it used to be a [1, 3] warm-up batch)
  warm-up       the old [1, 3] warm-up batch on the same engine (median of 5)
  length probe  ONNX only: one copy of max_seq_length tokens (median of 5), what checking the graph's
                positions by running it would cost (ONNX Runtime shows no initializer shapes); not done
  sha256 warm   hashing the weight file(s) the engine loads, just read (in the page cache)
  sha256 cold   the same after posix_fadvise(DONTNEED) drops them from the page cache

Usage: python scripts/bench_identity.py [--shape bert-base] [--rounds 3] [--no-onnx] [--record]
Run it alone: flock -x /tmp/mlm-cpu.lock python scripts/bench_identity.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, Steal, ensure_export, fmt_pct, git_rev, machine, make_checkpoint  # noqa: E402

FILES = {"saved_model": ["variables"], "torch": ["model.onnx"], "onnx": ["model.onnx"]}

CHILD = r"""
import json, sys, time, statistics
import numpy as np
t0 = time.perf_counter()
from mlm_scorer.engines.base import Batch, get_engine, INPUT_NAMES
from mlm_scorer.model_dir import ModelDir
engine = sys.argv[1]
md = ModelDir.open(sys.argv[2])
t1 = time.perf_counter()
eng = get_engine(engine, model=md)
t2 = time.perf_counter()
probe = md.manifest["identity_probe"]
pb = Batch(**{n: np.asarray(probe[n], np.int32) for n in INPUT_NAMES})
one = np.array([[md.manifest["special_token_ids"]["cls"], 0, 0]], np.int32)
wb = Batch(one, np.ones_like(one), np.zeros_like(one), np.array([[1]], np.int32), np.array([[0]], np.int32))
L = md.max_seq_length
ids = np.zeros((1, L), np.int32)
lb = Batch(ids, np.ones_like(ids), np.zeros_like(ids), np.ones((1, 1), np.int32), np.zeros((1, 1), np.int32))
def med(b):
    ts = []
    for _ in range(5):
        t = time.perf_counter(); eng.run(b); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
print(json.dumps({"open": t2 - t1, "probe": med(pb), "warmup": med(wb), "length": med(lb),
                  "weights_from": getattr(eng, "weights_from", None)}))
"""


def files_of(vdir: Path, engine: str, weights_from: str | None) -> list[Path]:
    if engine == "torch" and weights_from and not weights_from.endswith(".onnx"):
        return sorted((vdir / "variables").iterdir())
    out = []
    for name in FILES[engine]:
        p = vdir / name
        out += sorted(p.iterdir()) if p.is_dir() else [p]
    return out


def sha256_files(paths: list[Path], cold: bool) -> float:
    if cold:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    t = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bert-base", choices=["bert-base", "small"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX and torch engines (no ONNX export)")
    ap.add_argument("--work", default=str(REPO / "bench-out"))
    ap.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(args.work)
    work.mkdir(exist_ok=True)
    ckpt = make_checkpoint(work / f"{args.shape}-hf", args.shape)
    export_dir = ensure_export(ckpt, work / f"{args.shape}-export", onnx=not args.no_onnx)
    vdir = export_dir / "1"
    engines = ["saved_model"] + ([] if args.no_onnx else ["onnx", "torch"])
    rows = []
    steal = Steal().start()
    load = os.getloadavg()[0]
    for engine in engines:
        runs = []
        for _ in range(args.rounds):
            r = subprocess.run([sys.executable, "-c", CHILD, engine, str(vdir)], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
            if r.returncode:
                sys.exit(f"{engine}: {r.stderr}")
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda x: x["open"])
        paths = files_of(vdir, engine, best["weights_from"])
        size = sum(p.stat().st_size for p in paths) / 2**20
        warm = min(sha256_files(paths, cold=False) for _ in range(3))
        cold = min(sha256_files(paths, cold=True) for _ in range(2))
        rows.append((engine, best, size, warm, cold, ", ".join(p.name for p in paths)))
    steal.stop()
    m = machine()
    lines = ["| engine | open (with the checks) | probe | old warm-up | length probe | weights hashed | sha256 warm | sha256 cold |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for engine, r, size, warm, cold, names in rows:
        length = f"{r['length'] * 1e3:.1f} ms" if engine == "onnx" else "-"
        lines.append(f"| {engine} | {r['open']:.2f} s | {r['probe'] * 1e3:.1f} ms | {r['warmup'] * 1e3:.1f} ms | "
                     f"{length} | {names} ({size:.0f} MiB) | {warm * 1e3:.0f} ms | {cold * 1e3:.0f} ms |")
    table = "\n".join(lines)
    where = (f"{args.shape} (random weights, real uncased vocab, max_seq_length 512), commit {git_rev()}, "
             f"{m['date']}, {m['cpu']}, {m['cores']} cores, steal {fmt_pct(steal.pct)}, load average {load:.2f} "
             f"at start; open: best of {args.rounds} fresh processes; probe, warm-up, length: median of 5")
    print(table)
    print(where)
    if args.record:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write(f"\n{table}\n\n{where}. Command: `python scripts/bench_identity.py --rounds {args.rounds}`.\n")


if __name__ == "__main__":
    main()
