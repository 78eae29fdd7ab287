"""int8 configurations on real weights (AntiBERTy): drift from fp32 and speed, per CPU class.

Every configuration (``mlm_export.onnx_graph.Int8Spec``) is written from AntiBERTy's weights and run with
ONNX Runtime on the masked copies of scripts/antiberty_eval.py's 84 sequences (14 natural antibody
domains, a shuffle of each, a substitution at each of their four conserved sites: 9534 copies in token
mode), batched exactly as the scorer batches them for the onnx engine (1024 padded tokens). Against ONNX
fp32 on the same batches (equal to transformers within 1e-4 on these weights, tests/test_real_weights.py):

  * per residue: mean and max |Δ log-prob|; per sequence: mean |Δ PLL| and Spearman's rank correlation
    of the sequence PLLs (all 84, and the 14 natural);
  * speed: copies per CPU-second, one thread, as a multiple of fp32's (CPU time, not wall time: the machine
    may be shared);
  * whether the file can saturate on a CPU without VNNI (``Int8Spec.saturation_free``).

``--emulate CPU`` reruns a subset of the batches (``--copies``) under ``qemu-x86_64 -cpu CPU`` (e.g.
Haswell: AVX2 and FMA, no AVX-512, no VNNI): ONNX Runtime dispatches on the emulated CPUID, so its int8
products take the AVX2 path (``vpmaddubsw``, 16-bit saturating sums). Drift only: emulated speed means
nothing. It also reports how far the emulated int8 numbers are from this machine's on the same copies
(0 to float rounding where the integers are the same).

Usage:
  python scripts/bench_int8.py --out int8.md --json int8.json
  python scripts/bench_int8.py --emulate Haswell --copies 64 --configs default,row8,qdq8 --out int8-avx2.md
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, Steal, command_line, emit, git_rev, machine  # noqa: E402

#: name -> (Int8Spec keyword arguments, what it is)
CONFIGS = {
    "default": ({}, "the default: per-row 8-bit activations, 7-bit weights (saturation-free), head fp32"),
    "row7": ({"activation_levels": 127, "weight_levels": 127},
             "per-row 7-bit activations, 8-bit weights (saturation-free)"),
    "row8": ({"weight_levels": 127}, "per-row 8-bit activations, 8-bit weights (can saturate)"),
    "tensor8-w7": ({"activations": "tensor"}, "per-tensor 8-bit activations (DynamicQuantizeLinear), 7-bit "
                   "weights: ONNX Runtime's reduce_range (saturation-free)"),
    "tensor8": ({"activations": "tensor", "weight_levels": 127}, "per-tensor 8-bit activations, 8-bit weights "
                "(can saturate)"),
    "qdq8": ({"activations": "tensor", "weight_levels": 127, "keep_fp32": ()},
             "ONNX Runtime quantize_dynamic's arithmetic, the head quantized too: the earlier default (can saturate)"),
    "default-ffn-out-fp32": ({"keep_fp32": ("head", "ffn_out")}, "the default, feed-forward outputs in fp32"),
    "row7-ffn-out-last-fp32": ({"activation_levels": 127, "weight_levels": 127, "keep_fp32": ("head", "ffn_out", "last")},
                               "row7, feed-forward outputs and the last layer in fp32"),
    "accurate": ({"activation_levels": 127, "weight_levels": 127, "activation_split": True, "weight_rounding": "gptq"},
                 "mlm-export --int8-config accurate: per-row activations in two 7-bit parts (~14 bits, twice the "
                 "integer work), 8-bit GPTQ-rounded weights (saturation-free)"),
    "act-split": ({"activation_levels": 127, "weight_levels": 127, "activation_split": True},
                  "accurate with weights rounded to nearest"),
    "weight-split": ({"weight_split": True}, "per-row 8-bit activations, weights in two 7-bit parts (~14 bits, "
                     "twice the integer work; saturation-free)"),
}
INPUTS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids")

# ------------------------------------------------------------------------------------------- worker


def run_file(model: str, data: str, every: int = 1) -> dict:
    """Run ``model`` on the batches of ``data`` (every ``every``-th), one thread. Returns log-probs [seq, residue]
    (NaN where not scored), the copies scored and the CPU seconds they took."""
    import onnxruntime as ort

    d = np.load(data)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    lens = d["seq_len"]
    out = np.full((len(lens), int(lens.max())), np.nan)
    copies, cpu = 0, 0.0
    for i in range(0, int(d["n_batches"]), every):
        feed = {k: d[f"{i}/{k}"] for k in INPUTS}
        c0 = time.process_time()
        lp = sess.run(["masked_lm_log_probs"], feed)[0]
        cpu += time.process_time() - c0
        out[d[f"{i}/sent"], d[f"{i}/piece"]] = lp[:, 0]
        copies += len(lp)
    return {"log_probs": out, "copies": copies, "cpu_seconds": cpu}


def _worker(argv: list[str]) -> None:
    model, data, every, dest = argv
    r = run_file(model, data, int(every))
    np.savez(dest, log_probs=r["log_probs"], copies=r["copies"], cpu_seconds=r["cpu_seconds"])


# ------------------------------------------------------------------------------------------- data


def evaluation_texts() -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """(sequences, the natural ones, pairs as (natural index, variant index)): antiberty_eval's 84 texts."""
    import antiberty_eval as ae

    pairs = ae.make_pairs(ae.load_antibodies(), shuffles=1, per_site=1)
    naturals = list(dict.fromkeys(p.natural for p in pairs))
    seqs = list(dict.fromkeys(naturals + [p.variant for p in pairs]))
    index = {t: i for i, t in enumerate(seqs)}
    return seqs, naturals, [(index[p.natural], index[p.variant]) for p in pairs]


def make_data(export: Path, dest: Path, batch_tokens: int) -> dict:
    """The evaluation's copies as the scorer batches them (token mode), saved for the workers."""
    import antiberty_eval as ae

    from mlm_scorer.engines.base import BatchResult, Engine
    from mlm_scorer.model_dir import ModelDir
    from mlm_scorer.scorer import Scorer

    class Recorder(Engine):
        name = "recorder"
        preferred_batch_tokens = batch_tokens

        def __init__(self):
            self.batches = []

        def score_batch(self, batch):
            self.batches.append(batch)
            return BatchResult(log_probs=np.zeros(batch.masked_lm_positions.shape, np.float32))

    seqs, naturals, _ = evaluation_texts()
    rec = Recorder()
    scorer = Scorer(ModelDir.open(export), rec, mode="token")
    prep = scorer.prepare([ae.residues(s) for s in seqs])
    scorer.run(prep)
    arrays = {"n_batches": np.array(len(rec.batches)), "seq_len": np.array([len(s) for s in seqs]),
              "natural": np.array([s in naturals for s in seqs])}
    for i, (b, idx) in enumerate(zip(rec.batches, prep.batches)):
        arrays.update({f"{i}/{k}": v for k, v in b.as_dict().items()})
        arrays[f"{i}/sent"] = prep.copies[idx, 0]
        arrays[f"{i}/piece"] = prep.copies[idx, 1]
    np.savez(dest, **arrays)
    return {"sequences": len(seqs), "copies": int(len(prep.copies)), "batches": len(rec.batches),
            "naturals": len(naturals)}


def drift(ref: np.ndarray, got: np.ndarray, natural: np.ndarray, pairs=()) -> dict:
    """Per residue and per sequence, over what both scored (a sequence counts when every residue was); with
    ``pairs`` (natural, variant) indices, the share decided alike (natural's PLL above the variant's)."""
    from antiberty_eval import spearman

    both = ~np.isnan(ref) & ~np.isnan(got)
    d = np.abs(got - ref)[both]
    out = {"residues": int(both.sum()), "token_mean_abs": float(d.mean()), "token_max_abs": float(d.max())}
    whole = both.sum(1) == (~np.isnan(ref)).sum(1)
    if whole.sum() >= 2:
        pr, pg = np.nansum(ref, 1)[whole], np.nansum(got, 1)[whole]
        out.update({"sequences": int(whole.sum()), "seq_mean_abs": float(np.abs(pg - pr).mean()),
                    "seq_max_abs": float(np.abs(pg - pr).max()), "spearman_all": spearman(pr, pg)})
        nat = whole & natural
        if nat.sum() >= 2:
            out["spearman_natural"] = spearman(np.nansum(ref, 1)[nat], np.nansum(got, 1)[nat])
        both_whole = [(a, b) for a, b in pairs if whole[a] and whole[b]]
        if both_whole:
            r, g = np.nansum(ref, 1), np.nansum(got, 1)
            out["same_decision"] = float(np.mean([(r[a] > r[b]) == (g[a] > g[b]) for a, b in both_whole]))
    return out


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return {}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--work", default=str(REPO / "bench-out" / "int8"))
    ap.add_argument("--batch-tokens", type=int, default=1024, help="padded tokens a batch (the onnx engine's default)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (fp32, then each config); speed: the best")
    ap.add_argument("--emulate", default=None, metavar="CPU", help="run under qemu-x86_64 -cpu CPU (drift only)")
    ap.add_argument("--copies", type=int, default=64, help="with --emulate: about this many copies (a spread subset)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the log-probs of an earlier run of the same unchanged file (its speed is then the "
                         "earlier run's): to remake the tables")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import copy_antiberty

    from mlm_export import export, load_checkpoint
    from mlm_export.onnx_graph import Int8Spec
    from mlm_export.to_onnx import write_graph, write_onnx
    from mlm_scorer.model_dir import ModelDir

    hf = work / "antiberty-hf"
    if not (hf / "config.json").is_file():
        copy_antiberty(hf)
    ckpt = load_checkpoint(hf)
    exp = work / "antiberty-export"
    if not (exp / "1" / "model.onnx").is_file():
        log(f"exporting AntiBERTy -> {exp}")
        shutil.rmtree(exp, ignore_errors=True)
        write_onnx(export(hf, exp, top_k=5, log=log), ckpt, log=log)
    data = work / f"batches-{a.batch_tokens}.npz"
    info = make_data(exp, data, a.batch_tokens) if not data.is_file() else None
    d = np.load(data)
    if info is None:
        info = {"sequences": int(len(d["seq_len"])), "batches": int(d["n_batches"]), "naturals": int(d["natural"].sum())}
    natural = d["natural"]
    n_batches = int(d["n_batches"])
    every = max(1, n_batches * 9 // max(1, a.copies)) if a.emulate else 1  # ~8-9 copies a batch

    names = [c for c in a.configs.split(",") if c]
    files = {"fp32": str(exp / "1" / "model.onnx")}
    for name in names:
        kw, _ = CONFIGS[name]
        files[name] = str(work / f"int8-{name}.onnx")
        if not Path(files[name]).is_file():
            log(f"writing {files[name]}")
            mask_id = (ModelDir.open(exp).manifest.get("special_token_ids") or {}).get("mask")
            write_graph(ckpt.config, ckpt.weights, 5, files[name], int8=Int8Spec(**kw), mask_id=mask_id)

    def run(name: str, emulate: str | None) -> dict:
        if not emulate:
            # log-probs kept beside the file they came from (reused while the file is unchanged; speed is
            # measured again in every round)
            st_ = Path(files[name]).stat()
            cache = work / f"logprobs-{Path(files[name]).stem}-{st_.st_size}-{st_.st_mtime_ns}-{every}.npz"
            if a.reuse and cache.is_file():
                z = np.load(cache)
                return {"log_probs": z["log_probs"], "copies": int(z["copies"]), "cpu_seconds": float(z["cpu_seconds"])}
            r = run_file(files[name], str(data), every)
            np.savez(cache, **r)
            return r
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            sys.exit("--emulate needs qemu-x86_64 (apt-get install qemu-user)")
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / "out.npz"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "scripts")] + sys.path)}
            subprocess.run([qemu, "-cpu", emulate, sys.executable, __file__, "--worker", files[name], str(data),
                            str(every), str(dest)], check=True, env=env, stderr=subprocess.DEVNULL)
            z = np.load(dest)
            return {"log_probs": z["log_probs"], "copies": int(z["copies"]), "cpu_seconds": float(z["cpu_seconds"])}

    results: dict[str, dict] = {}
    with Steal() as st:
        for rnd in range(a.rounds):
            for name in ["fp32"] + names:
                if a.emulate and name == "fp32":
                    r = run(name, None)  # fp32 agrees on every CPU to ~1e-6 (measured): run it natively
                else:
                    log(f"[round {rnd + 1}/{a.rounds}] {name}{' under qemu -cpu ' + a.emulate if a.emulate else ''} ...")
                    r = run(name, a.emulate)
                r["copies_per_cpu_second"] = r["copies"] / r["cpu_seconds"]
                best = results.get(name)
                if best is None or r["copies_per_cpu_second"] > best["copies_per_cpu_second"]:
                    results[name] = r
    ref = results["fp32"]["log_probs"]
    rows = []
    for name in names:
        r = results[name]
        row = {"config": name, "what": CONFIGS[name][1],
               "saturation_free": Int8Spec(**CONFIGS[name][0]).saturation_free,
               **drift(ref, r["log_probs"], natural, evaluation_texts()[2]),
               "copies": r["copies"]}
        if a.emulate:
            native = run(name, None)["log_probs"]
            both = ~np.isnan(native) & ~np.isnan(r["log_probs"])
            row["max_abs_vs_native"] = float(np.abs(native - r["log_probs"])[both].max())
            row["native_token_mean_abs"] = drift(ref, native, natural)["token_mean_abs"]
        else:
            row["copies_per_cpu_second"] = r["copies_per_cpu_second"]
            row["speedup"] = r["copies_per_cpu_second"] / results["fp32"]["copies_per_cpu_second"]
        rows.append(row)

    m = machine()
    if a.emulate:
        cpu = f"qemu-x86_64 -cpu {a.emulate} (emulated; {m['cpu']} underneath)"
        flags = subprocess.run([shutil.which("qemu-x86_64"), "-cpu", a.emulate, sys.executable, "-c",
                                "from mlm_scorer.engines.cpu import cpu_flags, int8_class; "
                                "print(int8_class() + ': ' + ' '.join(sorted(cpu_flags())))"],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip()
    else:
        cpu, flags = m["cpu"], f"{m['cpu_class']}: {' '.join(m['cpu_flags'])}"
    lines = [f"int8 on AntiBERTy, {info['sequences']} sequences ({info['naturals']} natural), {results['fp32']['copies']} "
             f"copies{' (a spread subset)' if a.emulate else ''}, batches of {a.batch_tokens} padded tokens; "
             f"{cpu}; CPU flags {flags}; {m['date']}, commit {git_rev()}, steal {st}. Command: `{command_line()}`",
             ""]
    if a.emulate:
        lines += ["| config | saturation-free | residue mean \\|Δ\\|, this machine | emulated | max | max \\|emulated − "
                  "this machine's int8\\| | copies |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['config']} | {'yes' if r['saturation_free'] else 'no'} | "
                         f"{r['native_token_mean_abs']:.4f} | {r['token_mean_abs']:.4f} | "
                         f"{r['token_max_abs']:.3f} | {r['max_abs_vs_native']:.2g} | {r['copies']} |")
    else:
        fp = results["fp32"]
        lines += [f"fp32: {fp['copies_per_cpu_second']:.1f} copies per CPU-second.", "",
                  "| config | saturation-free | residue mean \\|Δ\\| | max | sequence mean \\|Δ PLL\\| | max | Spearman all "
                  "/ natural | same decisions | copies/CPU-s | × fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['config']} | {'yes' if r['saturation_free'] else 'no'} | {r['token_mean_abs']:.4f} | "
                         f"{r['token_max_abs']:.3f} | {r['seq_mean_abs']:.3f} | {r['seq_max_abs']:.3f} | "
                         f"{r['spearman_all']:.4f} / {r.get('spearman_natural', float('nan')):.4f} | "
                         f"{100 * r.get('same_decision', float('nan')):.1f} % | "
                         f"{r['copies_per_cpu_second']:.1f} | {r['speedup']:.2f} |")
    lines += ["", "Configurations: " + "; ".join(f"**{n}**: {CONFIGS[n][1]}" for n in names) + "."]
    out = {"machine": m, "emulate": a.emulate, "rows": rows, "info": info,
           "fp32_copies_per_cpu_second": results["fp32"]["copies_per_cpu_second"]}
    emit("\n".join(lines), a.out, a.json, out)
    return out


if __name__ == "__main__":
    main()
