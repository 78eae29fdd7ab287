"""BLiMP accuracy of a masked LM under mlm-score's PLL modes, per paradigm and overall.

A pair is right when the sentence_good's PLL (sum of word log-probabilities, as mlm-score writes in
the `pll` column) is strictly greater than sentence_bad's; a tie counts as wrong. A paradigm's
accuracy is the share of its pairs that are right; the overall accuracy is the mean over paradigms,
as in the published tables (../shared/benchmarks/blimp/SOURCE.md; Kauf & Ivanova 2023):

    | model | PLL-original (one token masked) | PLL-word-l2r | PLL-whole-word |
    mode:     token                             word-l2r       whole-word

The model is opened once (mlm_scorer.Scorer on the chosen engine) and every paradigm and mode is
scored with it; identical sentences are scored once per mode.

Usage:
  python scripts/blimp_eval.py --model EXPORT_OR_CHECKPOINT [--modes token,word-l2r,whole-word]
         [--pairs-per-paradigm 1000] [--label BERT-base] [--out blimp.md] [--json blimp.json]
  python scripts/blimp_eval.py --shape bert-base --pairs-per-paradigm 10     (random weights: ~50 %)

With real bert-base-uncased weights and all 1000 pairs, the numbers are comparable with the published
BERT-base row (84.2 / 84.7 / 83.1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import BLIMP_ZIP, REPO, emit, git_rev, machine  # noqa: E402

MODES = ("token", "word-l2r", "whole-word")
COLUMN = {"token": "PLL-original (one token masked)", "word-l2r": "PLL-word-l2r", "whole-word": "PLL-whole-word"}
SHORT = {"token": "original", "word-l2r": "word-l2r", "whole-word": "whole-word"}


@dataclass
class Paradigm:
    uid: str
    field: str
    term: str
    good: list[str]
    bad: list[str]


@dataclass
class ModeResult:
    mode: str
    accuracy: dict[str, float]  # paradigm uid -> accuracy in [0, 1]
    pll_good: dict[str, list[float]]
    pll_bad: dict[str, list[float]]
    errors: int = 0  # pairs where a sentence could not be scored (counted wrong)
    copies: int = 0
    seconds: float = 0.0

    @property
    def overall(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else float("nan")


@dataclass
class Evaluation:
    label: str
    model: str
    model_checksum: str
    engine: str
    pairs_per_paradigm: int | None
    paradigms: list[Paradigm]
    results: dict[str, ModeResult] = field(default_factory=dict)
    load_seconds: float = 0.0


def load_paradigms(zip_path: str | os.PathLike = BLIMP_ZIP, pairs_per_paradigm: int | None = None,
                   only: list[str] | None = None) -> list[Paradigm]:
    """The paradigms of BLiMP.zip (data/*.jsonl; __MACOSX entries ignored), first N pairs of each."""
    out = []
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.startswith("data/") and n.endswith(".jsonl")
                       and "__MACOSX" not in n and not Path(n).name.startswith("._"))
        for name in names:
            uid = Path(name).stem
            if only and uid not in only:
                continue
            good, bad, fld, term = [], [], "", ""
            for line in z.read(name).decode("utf-8").splitlines():
                if not line.strip():
                    continue
                if pairs_per_paradigm is not None and len(good) >= pairs_per_paradigm:
                    break
                d = json.loads(line)
                good.append(d["sentence_good"])
                bad.append(d["sentence_bad"])
                fld, term = d.get("field", fld), d.get("linguistics_term", term)
            out.append(Paradigm(uid, fld, term, good, bad))
    if only:
        missing = sorted(set(only) - {p.uid for p in out})
        if missing:
            raise SystemExit(f"no such paradigm(s) in {zip_path}: {', '.join(missing)}")
    return out


def accuracy(pll_good: list[float], pll_bad: list[float]) -> float:
    """Share of pairs with pll(good) > pll(bad); NaN (unscorable) and ties count as wrong."""
    if not pll_good:
        return float("nan")
    right = sum(1 for g, b in zip(pll_good, pll_bad) if g > b)  # NaN > x is False
    return right / len(pll_good)


def evaluate(model: str | os.PathLike, *, modes=MODES, pairs_per_paradigm: int | None = None,
             zip_path: str | os.PathLike = BLIMP_ZIP, paradigms: list[str] | None = None, engine: str = "saved_model",
             label: str | None = None, chunk: int = 4096, batch_tokens: int | None = None, cache_dir=None,
             log=lambda m: None) -> Evaluation:
    """Score every pair of the chosen paradigms under each mode with one model load."""
    from mlm_scorer.batching import BatchPolicy
    from mlm_scorer.engines.base import get_engine
    from mlm_scorer.models import resolve_model
    from mlm_scorer.scorer import Scorer

    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    pars = load_paradigms(zip_path, pairs_per_paradigm, paradigms)
    t = time.perf_counter()
    md = resolve_model(model, cache_dir=cache_dir, log=log)
    eng = get_engine(engine, model=md)
    load_s = time.perf_counter() - t
    ev = Evaluation(label=label or Path(str(model)).name, model=str(model), model_checksum=md.checksum,
                    engine=engine, pairs_per_paradigm=pairs_per_paradigm, paradigms=pars, load_seconds=load_s)
    # One flat list of texts: all good sentences, then all bad ones, paradigm by paradigm.
    texts: list[str] = []
    where = []
    for p in pars:
        where.append((len(texts), len(p.good)))
        texts += p.good + p.bad
    policy = BatchPolicy.for_engine(eng, batch_tokens)
    try:
        for mode in modes:
            scorer = Scorer(md, eng, mode=mode, policy=policy)
            t = time.perf_counter()
            plls: list[float] = []
            chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
            with ThreadPoolExecutor(1) as pool:  # prepare the next chunk while the engine runs this one
                fut = pool.submit(scorer.prepare, chunks[0]) if chunks else None
                for k in range(len(chunks)):
                    prep = fut.result()
                    if k + 1 < len(chunks):
                        fut = pool.submit(scorer.prepare, chunks[k + 1])
                    plls += [float("nan") if r.error is not None else r.pll for r in scorer.run(prep)]
                    log(f"  {mode}: {min(len(texts), (k + 1) * chunk)}/{len(texts)} sentences")
            res = ModeResult(mode, {}, {}, {}, copies=scorer.stats.copies, seconds=time.perf_counter() - t)
            for p, (start, n) in zip(pars, where):
                g, b = plls[start:start + n], plls[start + n:start + 2 * n]
                res.pll_good[p.uid], res.pll_bad[p.uid] = g, b
                res.accuracy[p.uid] = accuracy(g, b)
            res.errors = sum(1 for p in pars for g, b in zip(res.pll_good[p.uid], res.pll_bad[p.uid])
                             if g != g or b != b)
            ev.results[mode] = res
            log(f"{mode}: {100 * res.overall:.1f} % over {len(pars)} paradigms, {res.copies} copies in "
                f"{res.seconds:.1f} s ({res.copies / max(res.seconds, 1e-9):.1f} copies/s)")
    finally:
        eng.close()
    return ev


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def summary_table(ev: Evaluation) -> str:
    """The published tables' layout: one row, the three PLL variants (modes not run: —)."""
    cells = [_pct(ev.results[m].overall) if m in ev.results else "—" for m in MODES]
    return "\n".join(["| model | " + " | ".join(COLUMN[m] for m in MODES) + " |",
                      "|---|---|---|---|",
                      f"| {ev.label} | " + " | ".join(cells) + " |"])


def paradigm_table(ev: Evaluation) -> str:
    modes = [m for m in MODES if m in ev.results]
    head = "| paradigm | field | pairs | " + " | ".join(SHORT[m] for m in modes) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(modes)]
    for p in ev.paradigms:
        lines.append(f"| {p.uid} | {p.field} | {len(p.good)} | "
                     + " | ".join(_pct(ev.results[m].accuracy[p.uid]) for m in modes) + " |")
    lines.append(f"| **mean over {len(ev.paradigms)} paradigms** | | {sum(len(p.good) for p in ev.paradigms)} | "
                 + " | ".join(f"**{_pct(ev.results[m].overall)}**" for m in modes) + " |")
    return "\n".join(lines)


def report(ev: Evaluation) -> str:
    m = machine()
    n_pairs = sum(len(p.good) for p in ev.paradigms)
    per = "all" if ev.pairs_per_paradigm is None else f"first {ev.pairs_per_paradigm}"
    timing = "; ".join(f"{r.mode} {r.copies} copies in {r.seconds:.1f} s "
                       f"({r.copies / max(r.seconds, 1e-9):.1f} copies/s)"
                       + (f", {r.errors} pairs unscorable (counted wrong)" if r.errors else "")
                       for r in ev.results.values())
    return "\n".join([
        f"### BLiMP accuracy — {ev.label}",
        "",
        f"Model {ev.model} (checksum {ev.model_checksum[:12]}), engine {ev.engine}; {len(ev.paradigms)} paradigms, "
        f"{per} pairs of each ({n_pairs} pairs). Accuracy: % of pairs with PLL(good) > PLL(bad), mean over "
        f"paradigms. Machine: {m['cpu']}, {m['cores']} cores; {m['date']}; commit {git_rev()}. "
        f"Model load {ev.load_seconds:.1f} s; {timing}.",
        "",
        summary_table(ev),
        "",
        "<details><summary>per paradigm</summary>",
        "",
        paradigm_table(ev),
        "",
        "</details>",
    ])


def to_json(ev: Evaluation) -> dict:
    return {
        "label": ev.label, "model": ev.model, "model_checksum": ev.model_checksum, "engine": ev.engine,
        "pairs_per_paradigm": ev.pairs_per_paradigm, "load_seconds": ev.load_seconds,
        "modes": {m: {"overall": r.overall, "accuracy": r.accuracy, "copies": r.copies, "seconds": r.seconds,
                      "errors": r.errors, "pll_good": r.pll_good, "pll_bad": r.pll_bad}
                  for m, r in ev.results.items()},
        "paradigms": [{"uid": p.uid, "field": p.field, "linguistics_term": p.term, "sentence_good": p.good,
                       "sentence_bad": p.bad} for p in ev.paradigms],
    }


def main(argv: list[str] | None = None) -> Evaluation:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an mlm-export directory or a checkpoint (exported once into the cache)")
    src.add_argument("--shape", choices=["bert-base", "small"],
                     help="a random-weight checkpoint of this shape (bench_common.make_checkpoint) instead")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--pairs-per-paradigm", type=int, default=1000, help="first N pairs of each paradigm (all: 1000)")
    ap.add_argument("--paradigms", default=None, help="comma-separated paradigm UIDs (default: all 67)")
    ap.add_argument("--engine", default="saved_model")
    ap.add_argument("--label", default=None, help="the model's name in the table")
    ap.add_argument("--blimp-zip", default=str(BLIMP_ZIP))
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="padded tokens per batch (default: the engine's preference, else 8192)")
    ap.add_argument("--cache-dir", default=None, help="where a checkpoint's export is cached")
    ap.add_argument("--work", default=str(REPO / "bench-out" / "blimp"), help="for --shape: where the checkpoint goes")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--json", default=None, help="write accuracies and every pair's PLLs here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    model, label = args.model, args.label
    if args.shape:
        from bench_common import make_checkpoint

        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = make_checkpoint(work / f"{args.shape}-hf", args.shape)
        model = work / f"{args.shape}-export"
        if not (model / "1").is_dir():
            from mlm_export import export

            export(ckpt, model, log=log)
        label = label or f"{args.shape} shape, random weights"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    only = [p.strip() for p in args.paradigms.split(",")] if args.paradigms else None
    ev = evaluate(model, modes=modes, pairs_per_paradigm=args.pairs_per_paradigm, zip_path=args.blimp_zip,
                  paradigms=only, engine=args.engine, label=label, batch_tokens=args.batch_tokens,
                  cache_dir=args.cache_dir, log=log)
    text = report(ev)
    emit(text, args.out, args.json, to_json(ev) if args.json else None)
    return ev


if __name__ == "__main__":
    main()
