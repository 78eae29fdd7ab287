"""Peer benchmark: mlm-score end to end vs minicons' MaskedLMScorer, same TSV, same random checkpoint
(BERT, or with --family roberta a RoBERTa: bench_common.make_checkpoint).

1. Agreement first. Our `token` mode is scored against minicons' PLL_metric="original" and our
   `word-l2r` against its "within_word_l2r": per sentence (our `pll` vs the sum of minicons' per-token
   log-probs) and per word (our word `log_prob` vs the sum of minicons' scores over the word's tokens);
   the word-piece ids are compared too. Differences are reported, never hidden.
2. Then speed: words/s, copies/s, GFLOP/s and the ratio mlm-score/minicons, and this machine's fp32
   matrix-product ceiling (torch and numpy, 4096x4096, best of N) measured in the same run, before and
   after the tools, with the load average (the machine is shared).

minicons runs in its own environment (.venv-peers, built by scripts/peers_env.sh: it needs
transformers < 5) through scripts/peers_minicons_worker.py; mlm-score runs as a user runs it
(`python -m mlm_scorer IN.tsv -o OUT.parquet --model EXPORT --mode M`), start-up excluded from rates.

GFLOP/s columns:
  useful    copies/s x bench_common.flops_per_copy(shape, tokens per copy): the encoder over the real
            tokens and the MLM head at the masked position only. Same FLOPs per copy for both tools,
            so it is proportional to copies/s; compare it with the ceiling.
  executed  what the tool actually computes: the encoder over the padded length and the head at
            every position for minicons (it projects all positions onto the vocabulary); for mlm-score
            the encoder over the padded length (1 / padding efficiency), with its last layer run in
            full only at the masked position (keys/values everywhere), and the head there: less than
            "useful" (about 7 % less on bert-base), since the other rows of the last layer are never read.

Usage:
  bash scripts/peers_env.sh                      # once
  python scripts/bench_peers.py --shape small --sentences 200 --out bench-out/peers-small.md
  python scripts/bench_peers.py --shape bert-base --sentences 200 --out bench-out/peers-bert-base.md
  python scripts/bench_peers.py --shape bert-base --engine onnx --precision int8 --out bench-out/peers-int8.md
  python scripts/bench_peers.py --shape bert-base --family roberta --out bench-out/peers-roberta.md
  options: --minicons-batch 10 (sentences per minicons call), --rounds R (interleaved; fastest kept:
  use 2-3 when the machine is shared), --json FILE (all numbers), --work DIR (checkpoints, outputs).
  Exits non-zero when the scores do not agree (--tol, on the sentence PLL).
"""
from __future__ import annotations

import argparse
import importlib.metadata as imd
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (REPO, ROBERTA_BPE, SHAPES, VOCAB, Steal, blimp_sentences, command_line, emit,  # noqa: E402
                          ensure_export, executed_flops_ours, flops_per_copy, fmt_pct, git_rev, machine,
                          make_checkpoint, write_tsv)

PEERS_PY = REPO / ".venv-peers" / "bin" / "python"
WORKER = Path(__file__).resolve().parent / "peers_minicons_worker.py"
PAIRS = (("token", "original"), ("word-l2r", "within_word_l2r"))


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def matmul_ceiling(n: int = 4096, repeats: int = 5) -> dict:
    """Best-of-N fp32 n x n matrix products, GFLOP/s (2 n^3 per product), with torch and numpy."""
    import numpy as np

    out = {}
    flop = 2.0 * n ** 3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    a @ b
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    out["numpy"] = flop / best / 1e9
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.inference_mode():
            ta @ tb
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                ta @ tb
                best = min(best, time.perf_counter() - t)
        out["torch"] = flop / best / 1e9
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    out["best"] = max(v for k, v in out.items() if k in ("numpy", "torch"))
    return out


def executed_flops_minicons(shape: str, padded_len: float, V: int = VOCAB["bert"]) -> float:
    """One minicons copy: the encoder over the padded length and the vocabulary head at every position."""
    h, layers, _, inter = SHAPES[shape]
    L = padded_len
    return layers * L * (2 * (4 * h * h + 2 * h * inter) + 4 * L * h) + L * 2 * (h * h + h * V)


def version(*names: str) -> str:
    for n in names:
        try:
            return imd.version(n)
        except imd.PackageNotFoundError:
            continue
    return "?"


def run_mlm_score(tsv: Path, export_dir: Path, mode: str, work: Path, engine: str = "auto",
                  precision: str | None = None, engine_options: list[str] = ()) -> tuple[dict, float]:
    out = work / f"mlm-{mode}.parquet"
    summ = work / f"mlm-{mode}.summary.json"
    cmd = [sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(out), "--model", str(export_dir), "--id-column", "id",
           "--mode", mode, "-q", "--summary-json", str(summ), "--engine", engine]
    if precision:
        cmd += ["--precision", precision]
    for kv in engine_options:
        cmd += ["--engine-option", kv]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wall = time.perf_counter() - t
    return json.loads(summ.read_text()), wall


def agreement(mode: str, metric: str, mini: dict, work: Path, texts: list[str], export_dir: Path) -> dict:
    """Per-sentence and per-word differences between our parquet outputs and minicons' token scores."""
    import numpy as np
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    sents = pq.read_table(work / f"mlm-{mode}.sentences.parquet", columns=["row", "pll", "n_words", "n_pieces"]) \
        .to_pandas().sort_values("row")
    words = pq.read_table(work / f"mlm-{mode}.parquet", columns=["row", "word_index", "n_pieces", "log_prob"]) \
        .to_pandas().sort_values(["row", "word_index"])
    scores = mini["metrics"][metric]["scores"]
    # tokenization: the export's tokenizer vs the HF fast tokenizer minicons used
    tok = Tokenizer.from_file(str(next(export_dir.glob("*/tokenizer/tokenizer.json"))))
    ours_ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    same_tokens = sum(a == b for a, b in zip(ours_ids, mini["token_ids"]))
    d_sent = np.array(sents["pll"].to_numpy()) - np.array([sum(s) for s in scores])
    # per word: group minicons' token scores by the fast tokenizer's word ids
    mw, mw_pieces = [], []
    for sc, wid in zip(scores, mini["word_ids"]):
        cur, cur_w, n = 0.0, None, 0
        for x, w in zip(sc, wid):
            if w != cur_w and cur_w is not None:
                mw.append(cur)
                mw_pieces.append(n)
                cur, n = 0.0, 0
            cur_w, cur, n = w, cur + x, n + 1
        if cur_w is not None:
            mw.append(cur)
            mw_pieces.append(n)
    same_words = len(mw) == len(words) and list(words["n_pieces"]) == mw_pieces
    res = {"mode": mode, "metric": metric, "sentences": len(texts), "same_tokenization": same_tokens,
           "max_abs_sentence": float(np.abs(d_sent).max()),
           "mean_abs_sentence": float(np.abs(d_sent).mean()),
           "max_rel_sentence": float(np.abs(d_sent / np.array([sum(s) for s in scores])).max()),
           "words": len(words), "same_word_split": same_words,
           "token_score_std": float(np.std([x for s in scores for x in s]))}
    if same_words:
        d_word = words["log_prob"].to_numpy() - np.array(mw)
        res["max_abs_word"] = float(np.abs(d_word).max())
        res["multi_piece_words"] = int(sum(1 for n in mw_pieces if n > 1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--shape", default="bert-base", choices=sorted(SHAPES))
    ap.add_argument("--family", default="bert", choices=sorted(VOCAB),
                    help="the checkpoint: BERT on the uncased vocabulary (default), or RoBERTa with a BPE trained "
                         "on BLiMP, its vocabulary padded to roberta-base's")
    ap.add_argument("--minicons-batch", type=int, default=10, help="sentences per minicons sequence_score call")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the fastest of each tool is kept")
    ap.add_argument("--repeats", type=int, default=5, help="matrix products per ceiling measurement")
    ap.add_argument("--tol", type=float, default=1e-3, help="max |difference| in a sentence's PLL to call it agreeing")
    ap.add_argument("--work", default=str(REPO / "bench-out" / "peers"))
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--engine", default="auto", help="mlm-score's engine (default: auto, what mlm-score runs "
                                                      "without --engine)")
    ap.add_argument("--engine-option", action="append", default=[], metavar="K=V",
                    help="mlm-score --engine-option (repeatable), e.g. streams=1")
    ap.add_argument("--precision", default=None,
                    help="mlm-score's reduced precision (e.g. int8 with --engine onnx): the agreement table then "
                         "states its drift from minicons' fp32 scores instead of gating the run")
    args = ap.parse_args()
    if not PEERS_PY.is_file():
        sys.exit(f"{PEERS_PY} is missing: run `bash scripts/peers_env.sh` first")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_before = load_average()
    whole = Steal().start()

    name = args.shape if args.family == "bert" else f"{args.family}-{args.shape}"
    ckpt = make_checkpoint(work / f"{name}-hf", args.shape, family=args.family)
    export_dir = work / f"{name}-export"
    V = VOCAB[args.family]
    ensure_export(ckpt, export_dir, onnx=args.engine in ("onnx", "auto"), int8=args.precision == "int8", log=log)
    texts = list(dict.fromkeys(blimp_sentences(args.sentences)))  # no duplicates: both tools score every row
    tsv = write_tsv(work / f"blimp-{len(texts)}.tsv", texts)

    log("fp32 ceiling (before) ...")
    ceil_before = matmul_ceiling(repeats=args.repeats)

    # Interleaved (minicons metric, then the matching mlm-score mode) so that a change in the shared
    # machine's load hits both sides of a ratio alike; with --rounds R, the fastest of R runs of each.
    mini: dict = {}
    ours: dict = {}
    for rnd in range(args.rounds):
        for mode, metric in PAIRS:
            log(f"[round {rnd + 1}/{args.rounds}] minicons {metric} ({args.minicons_batch} sentences per call) ...")
            mini_json = work / f"minicons-{name}-{metric}.json"
            with Steal() as st:
                t_proc = time.perf_counter()
                subprocess.run([str(PEERS_PY), str(WORKER), "--model", str(ckpt), "--tsv", str(tsv), "--out",
                                str(mini_json), "--batch-size", str(args.minicons_batch), "--metrics", metric],
                               check=True, stdout=subprocess.DEVNULL)
                t_proc = time.perf_counter() - t_proc
            part = json.loads(mini_json.read_text())
            part["metrics"][metric]["steal_pct"] = st.pct
            part["metrics"][metric]["process_seconds"] = t_proc  # the whole process: python, imports, load, scoring
            if not mini:
                mini = part
            elif part["metrics"][metric]["seconds"] < mini["metrics"].get(metric, {"seconds": float("inf")})["seconds"]:
                mini["metrics"][metric] = part["metrics"][metric]
            log(f"[round {rnd + 1}/{args.rounds}] mlm-score --mode {mode} ...")
            with Steal() as st:
                res = run_mlm_score(tsv, export_dir, mode, work, args.engine, args.precision, args.engine_option)
            res[0]["steal_pct"] = st.pct
            if mode not in ours or res[0]["copies_per_second"] > ours[mode][0]["copies_per_second"]:
                ours[mode] = res

    log("fp32 ceiling (after) ...")
    ceil_after = matmul_ceiling(repeats=args.repeats)
    load_after = load_average()
    whole.stop()

    # ---- agreement -------------------------------------------------------------------------------
    agree = [agreement(mode, metric, mini, work, texts, export_dir) for mode, metric in PAIRS]
    for a in agree:
        a["ok"] = bool(a["same_word_split"] and a["same_tokenization"] == a["sentences"]
                       and (args.precision is not None or a["max_abs_sentence"] <= args.tol))

    # ---- speed -----------------------------------------------------------------------------------
    n_pieces = [len(x) for x in mini["token_ids"]]
    copies = sum(n_pieces)
    tokens_per_copy = sum(n * (n + 2) for n in n_pieces) / copies  # sequence length incl. [CLS], [SEP]
    gflop = flops_per_copy(args.shape, tokens_per_copy, V) / 1e9
    n_words = ours["token"][0]["words"]
    ceiling = max(ceil_before["best"], ceil_after["best"])
    rows = []
    for mode, metric in PAIRS:
        m = mini["metrics"][metric]
        m_cps = m["copies"] / m["seconds"]
        pad_len = m["padded_tokens"] / m["copies"]
        s, wall = ours[mode]
        busy = s["seconds"] - s["load_seconds"]
        o_cps = s["copies"] / busy
        eff = s.get("padding_efficiency") or 1.0
        o_exec = executed_flops_ours(args.shape, tokens_per_copy / eff, V) / 1e9
        rows.append({"tool": f"minicons {metric}", "words_s": n_words / m["seconds"], "copies_s": m_cps,
                     "process_seconds": m.get("process_seconds"),
                     "useful": m_cps * gflop, "executed": m_cps * executed_flops_minicons(args.shape, pad_len, V) / 1e9,
                     "ratio": None, "seconds": m["seconds"], "copies": m["copies"], "startup": mini["load_seconds"],
                     "padding_efficiency": tokens_per_copy / pad_len, "steal_pct": m.get("steal_pct")})
        rows.append({"tool": f"mlm-score {mode}", "words_s": s["words"] / busy, "copies_s": o_cps,
                     "process_seconds": wall, "engine": s.get("engine"),
                     "useful": o_cps * gflop, "executed": o_cps * o_exec, "ratio": o_cps / m_cps, "seconds": busy,
                     "copies": s["copies"], "startup": s["load_seconds"], "padding_efficiency": eff,
                     "steal_pct": s.get("steal_pct"), "batch_tokens": s.get("batch_tokens")})

    mach = machine()
    h, layers, heads, inter = SHAPES[args.shape]
    model = ("BERT" if args.family == "bert" else
             f"RoBERTa (positions from padding_idx + 1; a byte-level BPE of {ROBERTA_BPE:,} tokens trained on BLiMP, "
             f"the vocabulary padded with unused tokens to roberta-base's {V:,})")
    tf_version = version("tensorflow", "tensorflow-cpu", "tf-nightly")
    ran = ours["token"][0].get("engine", args.engine)
    engine_label = (f"{args.engine}{f' (ran {ran})' if ran != args.engine else ''} {args.precision or 'fp32'}"
                    + "".join(f", {kv}" for kv in args.engine_option)
                    + (f", TensorFlow {tf_version}" if ran == "saved_model" else
                       f", ONNX Runtime {version('onnxruntime')}" if ran == "onnx" else ""))
    mv = mini["versions"]
    lines = [
        f"### Peers — {model}, {args.shape} shape ({h} hidden, {layers} layers, {heads} heads, {inter} intermediate; "
        f"random weights), {len(texts)} BLiMP sentences",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB, no GPU; Python {mach['python']}; "
        f"{mach['date']}; commit {git_rev()}. Command: `{command_line()}`. Best of {args.rounds} interleaved "
        f"round(s). Shared machine: load average {load_before} before, {load_after} "
        f"after (1/5/15 min); CPU steal (time the hypervisor gave to other VMs) over the whole run {whole}, "
        f"and per kept run in the last column.",
        f"Input: {len(texts)} sentences, {n_words} words, {copies} copies per mode (one per word piece), "
        f"{tokens_per_copy:.1f} tokens per copy incl. [CLS]/[SEP], {gflop:.3f} GFLOP per copy (useful).",
        f"fp32 ceiling (4096x4096 matmul, best of {args.repeats}): torch {ceil_before.get('torch', 0):.0f} / "
        f"{ceil_after.get('torch', 0):.0f} GFLOP/s, numpy {ceil_before['numpy']:.0f} / {ceil_after['numpy']:.0f} "
        f"GFLOP/s (before / after); ceiling used: {ceiling:.0f} GFLOP/s.",
        f"mlm-score {version('mlm-scorer')} (commit {git_rev()}), engine {engine_label}, "
        f"CLI defaults (batch_tokens {', '.join(sorted({str(r['batch_tokens']) for r in rows if r['ratio']}))}"
        f" (the engine's choice), max batch 256), start-up (imports, model load) excluded from rates: "
        + ", ".join(f"{r['tool'].split()[-1]} {r['startup']:.1f} s" for r in rows if r["ratio"] is not None) + ".",
        f"minicons {mv['minicons']} (transformers {mv['transformers']}, torch {mv['torch']}, "
        f"{mini['torch_threads']} threads), MaskedLMScorer(ckpt, 'cpu').sequence_score with "
        f"{mini['batch_size']} sentences per call (one forward pass over all their copies, padded to the "
        f"call's longest), one untimed warm-up call, model load ({mini['load_seconds']:.1f} s) excluded.",
        "",
        "| tool, PLL | words/s | copies/s | useful GFLOP/s | % of fp32 ceiling | executed GFLOP/s | padding eff. "
        "| mlm-score / minicons | CPU steal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['words_s']:.1f} | {r['copies_s']:.1f} | {r['useful']:.0f} | "
                     f"{100 * r['useful'] / ceiling:.0f} % | {r['executed']:.0f} | {100 * r['padding_efficiency']:.0f} % | "
                     + (f"**{r['ratio']:.2f}×**" if r["ratio"] is not None else "—")
                     + f" | {fmt_pct(r.get('steal_pct'))} |")
    lines += ["", "Whole processes (what a user waits for: interpreter, imports, model load, scoring, writing; "
              "minicons' worker as a script that loads the model and scores the file):", "",
              "| tool, PLL | whole process (s) | of which outside scoring (s) | mlm-score / minicons, whole process |",
              "|---|---:|---:|---:|"]
    for i in range(0, len(rows), 2):
        mrow, orow = rows[i], rows[i + 1]
        for r in (mrow, orow):
            ratio = (f"**{mrow['process_seconds'] / orow['process_seconds']:.2f}×**"
                     if r is orow and mrow.get("process_seconds") else "—")
            lines.append(f"| {r['tool']} | {r['process_seconds'] or float('nan'):.1f} | "
                         f"{(r['process_seconds'] or float('nan')) - r['seconds']:.1f} | {ratio} |")
    lines += [
        "",
        "Agreement (checked before timing is reported; natural log, sums over word pieces):",
        "",
        "| mlm-score vs minicons | same word pieces | same word split | max abs Δ sentence PLL | mean abs Δ | "
        "max rel Δ | max abs Δ word | token log-prob std | agree |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in agree:
        lines.append(f"| {a['mode']} vs {a['metric']} | {a['same_tokenization']}/{a['sentences']} | "
                     f"{'yes' if a['same_word_split'] else 'NO'} ({a['words']} words, "
                     f"{a.get('multi_piece_words', '?')} multi-piece) | {a['max_abs_sentence']:.2e} | "
                     f"{a['mean_abs_sentence']:.2e} | {a['max_rel_sentence']:.1e} | "
                     f"{a.get('max_abs_word', float('nan')):.2e} | {a['token_score_std']:.3f} | "
                     f"{'yes' if a['ok'] else '**NO**'} |")
    emit("\n".join(lines), args.out, args.json,
         {"rows": rows, "agreement": agree, "ceiling_before": ceil_before, "ceiling_after": ceil_after,
          "load_before": load_before, "steal_pct": whole.pct, "load_after": load_after, "machine": mach,
          "shape": args.shape, "family": args.family, "sentences": len(texts), "tokens_per_copy": tokens_per_copy,
          "minicons_versions": mv})
    log(f"total {time.perf_counter() - t_start:.0f} s")
    if args.precision:
        print(f"\n{args.precision} is reduced precision: the Δ columns above are its drift from minicons' fp32 "
              f"scores (the same weights), not a disagreement; 'agree' checks the tokenization and word split.")
    if not all(a["ok"] for a in agree):
        sys.exit("the scores do not agree: see the agreement table")


if __name__ == "__main__":
    main()
