"""Masked copies per second on a bert-base-shaped random model: the engine alone vs end to end.

  engine alone  the in-process SavedModel engine on the very batches the scorer builds (prepared
                beforehand, not timed): the ceiling the pipeline can reach with this engine
  end to end    `mlm-score input.tsv -o out.parquet` as a user runs it (reading, tokenizing, expanding,
                batching, inference, aggregation, Parquet), start-up (TF import, model load) excluded
                from copies/s and reported separately

Usage: python scripts/bench_e2e.py [--sentences 400] [--shape bert-base] [--mode whole-word] [--engine saved_model]
                                  [--precision fp32] [--engine-option K=V ...] [--variant K=V,K=V ...]
                                  [--rounds 3] [--record]
The paths alternate for --rounds rounds (this machine's speed drifts from minute to minute); the
table gives the best and the median round. --engine-option applies to every path; each --variant adds
an end-to-end row run with those engine options on top (e.g. ``--variant streams=1,intra_op_threads=2``,
one stream over all cores, the engine before commit 59dcbab), interleaved with the others. --record appends the table
to BENCHMARKS.md with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (REPO, Steal, blimp_sentences, command_line, ensure_export, flops_per_copy,  # noqa: E402
                          fmt_pct, git_rev, machine, make_checkpoint, write_tsv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=400)
    ap.add_argument("--shape", default="bert-base", choices=["bert-base", "small"])
    ap.add_argument("--mode", default="whole-word")
    ap.add_argument("--engine", default="saved_model")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--engine-option", action="append", default=[], metavar="K=V",
                    help="engine option for every path (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="K=V,K=V",
                    help="an extra end-to-end row with these engine options on top (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=str(REPO / "bench-out"))
    ap.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(args.work)
    work.mkdir(exist_ok=True)
    ckpt = make_checkpoint(work / f"{args.shape}-hf", args.shape)
    export_dir = work / f"{args.shape}-export"
    ensure_export(ckpt, export_dir, onnx=args.engine == "onnx", int8=args.precision == "int8")
    tsv = write_tsv(work / f"blimp-{args.sentences}.tsv", blimp_sentences(args.sentences))

    # -- engine alone ---------------------------------------------------------------------------------
    import statistics

    from mlm_scorer.cli import parse_engine_options
    from mlm_scorer.engines.base import get_engine
    from mlm_scorer.model_dir import ModelDir
    from mlm_scorer.scorer import Scorer

    md = ModelDir.open(export_dir)
    texts = [line.split("\t", 1)[1].rstrip("\n") for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    opts = {**parse_engine_options(args.engine_option, ap), **({"precision": args.precision} if args.precision else {})}
    eng = get_engine(args.engine, model=md, **opts)
    prep = Scorer(md, eng, mode=args.mode).prepare(texts)
    batches = list(prep.built)  # all built before timing (the scorer builds a large chunk's as it goes)
    eng.run(batches[0])  # warm
    n_copies = prep.n_copies
    tokens = float((prep.copies[:, 6] - prep.copies[:, 5] + 2).mean())

    def engine_alone() -> float:
        t = time.perf_counter()
        for _ in eng.map(batches):  # as the scorer calls it (several batches at once with streams)
            pass
        return n_copies / (time.perf_counter() - t)

    # -- end to end (a separate process, as a user runs it) -------------------------------------------
    summary_path = work / "summary.json"
    cmd = [sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(work / "out.parquet"), "--model", str(export_dir),
           "--id-column", "id", "--mode", args.mode, "--engine", args.engine, "-q", "--summary-json", str(summary_path)]
    if args.precision:
        cmd += ["--precision", args.precision]
    for kv in args.engine_option:
        cmd += ["--engine-option", kv]
    variants = [""] + args.variant  # "" is the plain command

    def end_to_end(variant: str) -> tuple[float, dict, float]:
        extra = [a for kv in variant.split(",") if kv for a in ("--engine-option", kv)]
        t = time.perf_counter()
        subprocess.run(cmd + extra, check=True)
        wall = time.perf_counter() - t
        s = json.loads(summary_path.read_text())
        assert s["copies"] == n_copies, (s["copies"], n_copies)
        return s["copies_per_second"], s, wall

    eng_runs, eng_steal = [], []
    e2e_runs: dict[str, list[float]] = {v: [] for v in variants}
    e2e_steal: dict[str, list[float]] = {v: [] for v in variants}
    whole = Steal().start()
    for _ in range(args.rounds):
        with Steal() as st:
            eng_runs.append(engine_alone())
        eng_steal.append(st.pct)
        for v in variants:
            with Steal() as st:
                cps, s, wall = end_to_end(v)
            e2e_runs[v].append(cps)
            e2e_steal[v].append(st.pct)
    whole.stop()
    eng.close()
    engine_cps, engine_med = max(eng_runs), statistics.median(eng_runs)

    gflop = flops_per_copy(args.shape, tokens) / 1e9
    m = machine()
    label = args.engine + (f" {args.precision}" if args.precision else "") + \
        (f" ({', '.join(args.engine_option)})" if args.engine_option else "")
    rows = [(f"engine alone ({label})", engine_cps, engine_med, "—", "—",
             fmt_pct(eng_steal[eng_runs.index(engine_cps)]))]
    for v in variants:
        best, med = max(e2e_runs[v]), statistics.median(e2e_runs[v])
        rows.append((f"end to end (mlm-score{' ' + v if v else ''})", best, med, f"{best / engine_cps:.1%}",
                     f"{med / engine_med:.1%}", fmt_pct(e2e_steal[v][e2e_runs[v].index(best)])))
    lines = [
        f"### End to end vs engine alone — {args.shape}, {label}, {args.mode}, {args.sentences} BLiMP sentences",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; Python {m['python']}; {m['date']}; "
        f"commit {git_rev()}. Command: `{command_line()}`.",
        f"{n_copies} copies, {tokens:.1f} tokens per copy on average, {gflop:.2f} GFLOP per copy, padding "
        f"efficiency {s['padding_efficiency']:.1%}. Last end-to-end run: wall time {wall:.1f} s of which start-up "
        f"{s['load_seconds']:.1f} s (excluded from copies/s). {args.rounds} interleaved rounds; load average "
        f"{os.getloadavg()[0]:.2f} at the end; CPU steal (time the hypervisor gave to other VMs) {whole} over the "
        f"rounds, and in each path's best round in the last column.",
        "",
        "| path | copies/s best | copies/s median | GFLOP/s best | vs engine alone (best) | (median) "
        "| steal (best round) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {a} | {b:.1f} | {c:.1f} | {b * gflop:.0f} | {d} | {e} | {f} |" for a, b, c, d, e, f in rows]
    table = "\n".join(lines)
    print(table)
    if args.record:
        bm = REPO / "BENCHMARKS.md"
        text = bm.read_text(encoding="utf-8") if bm.exists() else "# Benchmarks\n"
        bm.write_text(text.rstrip("\n") + "\n\n" + table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
