"""Start-up of a short run, per engine: the wall time of `mlm-score` on 10 sentences, in a fresh process.

    python scripts/bench_startup.py --shape bert-base --rounds 3

For each engine (and for a run the score cache answers whole, and `mlm-score --help`) it runs the command
in a new process, `--rounds` times interleaved, and prints the median and best wall time, the start-up the
summary reports (imports, model load, warm-up), and the import time of the engine's runtime alone
(`python -c "import X"`). CPU steal and the load average are printed with each row: read a time with them.
The model is a random bert-shaped checkpoint on the real uncased vocabulary, exported once under --work
(SavedModel, ONNX fp32 and int8).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (Steal, blimp_sentences, command_line, ensure_export, git_rev, machine,  # noqa: E402
                          make_checkpoint, write_tsv)

ENGINES = {  # name: (mlm-score options, the runtime's import)
    "auto (the default)": ([], "import onnxruntime"),
    "saved_model": (["--engine", "saved_model"], "import tensorflow"),
    "onnx fp32": (["--engine", "onnx"], "import onnxruntime"),
    "onnx int8": (["--engine", "onnx", "--precision", "int8"], "import onnxruntime"),
    "torch fp32": (["--engine", "torch"], "import torch, transformers.models.bert.modeling_bert"),
}
MLM_SCORE = [sys.executable, "-m", "mlm_scorer"]


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return wall, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="bert-base", choices=["bert-base", "small"])
    ap.add_argument("--work", default="bench-out/startup", help="models and inputs (reused by later runs)")
    ap.add_argument("--sentences", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of: {', '.join(ENGINES)}")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work / f"{a.shape}-ckpt", a.shape)
    export = ensure_export(ckpt, work / f"{a.shape}-export", onnx=True, int8=True)
    tsv = write_tsv(work / f"blimp-{a.sentences}.tsv", blimp_sentences(a.sentences))
    empty = write_tsv(work / "empty.tsv", [])
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    base = [str(tsv), "-o", str(work / "out.parquet"), "--model", str(export), "-q", "--id-column", "id"]
    cache = work / "score-cache"
    # fill the score cache once (the default engine), for the "answered by the cache" row
    timed(MLM_SCORE + base + ["--cache", str(cache)], env)

    rows = {}
    for name in a.engines.split(","):
        opts, imp = ENGINES[name]
        rows[name] = (MLM_SCORE + base + opts + ["--summary-json", str(work / "s.json")], imp)
    rows["any engine, every sentence in --cache"] = (MLM_SCORE + base + ["--cache", str(cache), "--summary-json",
                                                                          str(work / "s.json")], None)
    rows["empty input"] = (MLM_SCORE + [str(empty), "-o", str(work / "e.parquet"), "--model", str(export), "-q",
                                        "--summary-json", str(work / "s.json")], None)
    rows["mlm-score --help"] = (MLM_SCORE + ["--help"], None)

    results: dict[str, dict] = {k: {"wall": [], "startup": [], "import": [], "steal": []} for k in rows}
    for _ in range(a.rounds):  # interleaved: a disturbed minute hits every row alike
        for name, (cmd, imp) in rows.items():
            with Steal() as st:
                wall, _ = timed(cmd, env)
            results[name]["wall"].append(wall)
            results[name]["steal"].append(st.pct or 0.0)
            if "--summary-json" in cmd:
                results[name]["startup"].append(json.loads((work / "s.json").read_text())["load_seconds"])
            if imp:
                results[name]["import"].append(timed([sys.executable, "-c", imp], env)[0])

    m = machine()
    print(f"# start-up, {a.shape} shape, {a.sentences} sentences; {m['date']}, commit {git_rev()}, {m['cpu']} "
          f"({m['cpu_class']}; {' '.join(m['cpu_flags'])}), {m['cores']} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"# {command_line()}")
    print()
    print("| run | wall, median (best) | start-up in the summary, median | runtime import alone, median | steal |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        med = lambda xs: f"{statistics.median(xs):.2f} s" if xs else "–"  # noqa: E731
        print(f"| {name} | {statistics.median(r['wall']):.2f} s ({min(r['wall']):.2f} s) | {med(r['startup'])} | "
              f"{med(r['import'])} | {statistics.mean(r['steal']):.0f} % |")


if __name__ == "__main__":
    main()
