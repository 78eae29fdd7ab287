"""Accuracy of a real protein masked LM (AntiBERTy) under mlm-score, and the drift of reduced precision.

The sequences are the variable domains of public therapeutic antibodies (tests/data/antibodies.tsv).
Each natural sequence is paired with variants of the same length:

  * shuffled: the same residues in a random order (seeded by the antibody and chain);
  * substituted: one residue replaced at one of the four positions that every variable domain conserves,
    found by motif in each sequence (Kabat numbers for orientation):

      site     VH           VL (kappa)   motif (0-based index of the marked residue)
      cys1     C22          C23          the first C before index 30: intradomain disulfide
      trp      W36          W35          W of W[VIYF][RKQ]Q after cys1 (framework 2)
      cys2     C92          C88          C of Y[YF]C, 50 or more residues after trp: the disulfide's partner
      j        W103         F98          W/F of [WF]G.G after cys2 (J region, framework 4)

A pair is right when the natural sequence's PLL (the sum of its residue log-probabilities, as the `pll`
column of mlm-score) is strictly greater than the variant's; a tie counts as wrong. Lengths are equal
within a pair, so the sum and the per-residue mean rank alike. Every residue is a word of one piece, so
the three PLL modes coincide: the texts are scored once per engine, in `token` mode.

Each configuration (`engine` or `engine:precision`) scores every text; the first is the baseline that
the others' drift is measured against: |Δ log-prob| per residue (mean, max), |Δ PLL| per sequence
(mean, max), Spearman's rank correlation of the sequence PLLs (all texts, and the natural ones alone),
and the share of pairs on which both decide alike.

Usage:
  python scripts/antiberty_eval.py                                   # AntiBERTy from the installed wheel
  python scripts/antiberty_eval.py --configs onnx,onnx:int8,torch:bf16 --shuffles 2 --per-site 3
  python scripts/antiberty_eval.py --model EXPORT_OR_CHECKPOINT --out antiberty.md --json antiberty.json

torch:bf16 is left out (and said so) where the CPU has no AVX512-BF16/AMX.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, Steal, emit, ensure_export, fmt_pct, git_rev, machine  # noqa: E402

DATA = REPO / "tests" / "data" / "antibodies.tsv"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
SITES = ("cys1", "trp", "cys2", "j")
KABAT = {"VH": {"cys1": "C22", "trp": "W36", "cys2": "C92", "j": "W103"},
         "VL": {"cys1": "C23", "trp": "W35", "cys2": "C88", "j": "F98"}}
DEFAULT_CONFIGS = ("onnx", "onnx:int8", "torch:bf16")


@dataclass(frozen=True)
class Antibody:
    name: str  # e.g. "trastuzumab"
    chain: str  # "VH" or "VL"
    sequence: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.chain}"


@dataclass(frozen=True)
class Pair:
    """A natural sequence and a variant of it. kind: "shuffled" or a site name of SITES."""

    parent: str  # Antibody.label
    kind: str
    label: str  # e.g. "shuffle 0", "C22S"
    natural: str
    variant: str


def load_antibodies(path: str | os.PathLike = DATA) -> list[Antibody]:
    """The sequences of a data file: tab-separated, a header naming the antibody (``antibody`` or ``name``),
    ``chain`` (VH or VL) and ``sequence`` columns, optionally ``source``; '#' lines are comments. Reads
    tests/data/antibodies.tsv and tests/data/antibodies_jain2017.tsv alike."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    header = lines[0].split("\t") if lines else []
    col = {h: i for i, h in enumerate(header)}
    name_col = col.get("antibody", col.get("name"))
    if name_col is None or "chain" not in col or "sequence" not in col:
        raise ValueError(f"{path}: expected a header with antibody (or name), chain and sequence columns, got "
                         f"{header}")
    out = []
    for n, line in enumerate(lines[1:], 2):
        f = line.split("\t")
        if len(f) != len(header):
            raise ValueError(f"{path}: data line {n}: {len(f)} fields, the header has {len(header)}")
        name, chain, seq = f[name_col], f[col["chain"]], f[col["sequence"]]
        bad = sorted(set(seq) - set(AMINO_ACIDS))
        if bad or chain not in KABAT:
            raise ValueError(f"{path}: {name} {chain}: chain must be VH or VL and residues of {AMINO_ACIDS}, "
                             f"found {bad}")
        out.append(Antibody(name, chain, seq, f[col["source"]] if "source" in col else ""))
    return out


def residues(seq: str) -> str:
    """The text the model reads: residues separated by spaces (each residue a word of one piece)."""
    return " ".join(seq)


def conserved_sites(seq: str) -> dict[str, int]:
    """0-based indices of the four conserved residues (see the module docstring); ValueError if one is missing."""
    found: dict[str, int] = {}
    cys1 = seq.find("C", 0, 30)
    if cys1 >= 0:
        found["cys1"] = cys1
        m = re.compile(r"W[VIYF][RKQ]Q").search(seq, cys1 + 8, cys1 + 28)
        if m:
            found["trp"] = m.start()
            cs = [m2.start() + 2 for m2 in re.finditer(r"(?=Y[YF]C)", seq) if m2.start() + 2 >= m.start() + 50]
            if cs:
                found["cys2"] = cs[0]
                j = re.compile(r"[WF]G.G").search(seq, cs[0] + 3)
                if j:
                    found["j"] = j.start()
    missing = [s for s in SITES if s not in found]
    if missing:
        raise ValueError(f"no conserved {', '.join(missing)} found in {seq[:20]}...: is it a variable domain?")
    return found


def shuffled(seq: str, seed: str) -> str:
    """The same residues in a random order (deterministic for a seed), never the sequence itself."""
    rng = random.Random(seed)
    res = list(seq)
    for _ in range(100):
        rng.shuffle(res)
        out = "".join(res)
        if out != seq:
            return out
    raise ValueError(f"cannot shuffle {seq!r} into another order")


def substitutions(seq: str, site: int, n: int, seed: str) -> list[tuple[str, str]]:
    """``n`` single substitutions at ``site`` (n >= 19: all of them), as (new residue, mutant), deterministic."""
    others = [a for a in AMINO_ACIDS if a != seq[site]]
    picks = others if n >= len(others) else random.Random(seed).sample(others, n)
    return [(a, seq[:site] + a + seq[site + 1:]) for a in picks]


def make_pairs(antibodies: list[Antibody], *, shuffles: int = 1, per_site: int = 1) -> list[Pair]:
    pairs = []
    for ab in antibodies:
        seq = ab.sequence
        for k in range(shuffles):
            pairs.append(Pair(ab.label, "shuffled", f"shuffle {k}", seq, shuffled(seq, f"{ab.label}/shuffle/{k}")))
        for site, i in conserved_sites(seq).items():
            for a, mut in substitutions(seq, i, per_site, f"{ab.label}/{site}"):
                pairs.append(Pair(ab.label, site, f"{KABAT[ab.chain][site]}{a}", seq, mut))
    return pairs


def pair_accuracy(pairs: list[Pair], pll: dict[str, float]) -> dict[str, float]:
    """Share of pairs with pll(natural) > pll(variant), per kind, plus "substituted" (all sites) and "all".
    A tie or a NaN counts as wrong."""
    groups: dict[str, list[bool]] = {}
    for p in pairs:
        right = bool(pll[p.natural] > pll[p.variant])  # NaN > x is False
        for g in (p.kind, "substituted" if p.kind in SITES else None, "all"):
            if g:
                groups.setdefault(g, []).append(right)
    return {g: sum(v) / len(v) for g, v in groups.items()}


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson on ranks, ties given their average rank); NaN if undefined."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size < 2:
        return float("nan")

    def ranks(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # ties: the average rank
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def drift(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], *, naturals: list[str] | None = None,
          pairs: list[Pair] | None = None) -> dict[str, float]:
    """Drift of ``got`` from ``ref`` ({text: residue log-probs}, same texts): per residue and per sequence
    |Δ| (nats), Spearman of the sequence PLLs over all texts (and over ``naturals``), and the share of
    ``pairs`` decided alike."""
    texts = sorted(ref)
    if sorted(got) != texts:
        raise ValueError("the two runs scored different texts")
    d_tok = np.concatenate([np.abs(got[t] - ref[t]) for t in texts])
    p_ref = np.array([ref[t].sum() for t in texts])
    p_got = np.array([got[t].sum() for t in texts])
    d_seq = np.abs(p_got - p_ref)
    out = {"residues": int(d_tok.size), "sequences": len(texts),
           "token_mean_abs": float(d_tok.mean()), "token_max_abs": float(d_tok.max()),
           "seq_mean_abs": float(d_seq.mean()), "seq_max_abs": float(d_seq.max()),
           "seq_mean_abs_per_residue": float(np.mean([abs(got[t].mean() - ref[t].mean()) for t in texts])),
           "spearman_all": spearman(p_ref, p_got)}
    if naturals:
        out["spearman_natural"] = spearman([ref[t].sum() for t in naturals], [got[t].sum() for t in naturals])
    if pairs:
        same = [(ref[p.natural].sum() > ref[p.variant].sum()) == (got[p.natural].sum() > got[p.variant].sum())
                for p in pairs]
        out["same_decision"] = float(np.mean(same))
    return out


# ------------------------------------------------------------------------------------------- scoring

@dataclass
class Run:
    config: str
    log_probs: dict[str, np.ndarray] = field(default_factory=dict)  # text (no spaces) -> residue log-probs
    copies: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    steal_pct: float | None = None
    skipped: str | None = None

    @property
    def pll(self) -> dict[str, float]:
        return {t: float(v.sum()) for t, v in self.log_probs.items()}


def parse_config(config: str) -> tuple[str, str | None]:
    engine, _, precision = config.partition(":")
    return engine, precision or None


def score(export: str | os.PathLike, seqs: list[str], config: str, *, log=lambda m: None) -> Run:
    """Residue log-probs of every sequence under one configuration (engine[:precision]), one model load."""
    from mlm_scorer.engines.base import get_engine
    from mlm_scorer.model_dir import ModelDir
    from mlm_scorer.scorer import Scorer

    engine, precision = parse_config(config)
    run = Run(config)
    if engine == "torch" and precision == "bf16":
        from mlm_scorer.engines.torch_engine import cpu_has_bf16

        if not cpu_has_bf16():
            run.skipped = "this CPU has no avx512_bf16/amx_bf16"
            return run
    t = time.perf_counter()
    md = ModelDir.open(export)
    eng = get_engine(engine, model=md, **({"precision": precision} if precision else {}))
    run.load_seconds = time.perf_counter() - t
    try:
        scorer = Scorer(md, eng, mode="token")
        with Steal() as st:
            t = time.perf_counter()
            results = scorer.run(scorer.prepare([residues(s) for s in seqs]))
            run.seconds = time.perf_counter() - t
        run.steal_pct = st.pct
    finally:
        eng.close()
    for s, r in zip(seqs, results):
        if r.error is not None:
            raise RuntimeError(f"{config}: {s[:20]}... could not be scored: {r.error}")
        if len(r.piece_log_probs) != len(s):
            raise RuntimeError(f"{config}: {len(r.piece_log_probs)} log-probs for {len(s)} residues")
        run.log_probs[s] = np.asarray(r.piece_log_probs, np.float64)
    run.copies = scorer.stats.copies
    log(f"{config}: {len(seqs)} sequences, {run.copies} copies in {run.seconds:.1f} s "
        f"({run.copies / max(run.seconds, 1e-9):.1f} copies/s)")
    return run


@dataclass
class Evaluation:
    model: str
    model_checksum: str
    antibodies: list[Antibody]
    pairs: list[Pair]
    shuffles: int
    per_site: int
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def baseline(self) -> Run:
        return next(r for r in self.runs.values() if r.skipped is None)

    def accuracy(self, config: str) -> dict[str, float]:
        return pair_accuracy(self.pairs, self.runs[config].pll)

    def drift(self, config: str) -> dict[str, float]:
        return drift(self.baseline.log_probs, self.runs[config].log_probs,
                     naturals=[a.sequence for a in self.antibodies], pairs=self.pairs)


def evaluate(export: str | os.PathLike, *, configs=DEFAULT_CONFIGS, antibodies: list[Antibody] | None = None,
             shuffles: int = 1, per_site: int = 1, log=lambda m: None) -> Evaluation:
    from mlm_scorer.model_dir import ModelDir

    antibodies = antibodies if antibodies is not None else load_antibodies()
    pairs = make_pairs(antibodies, shuffles=shuffles, per_site=per_site)
    seqs = list(dict.fromkeys([a.sequence for a in antibodies] + [p.variant for p in pairs]))
    md = ModelDir.open(export)
    ev = Evaluation(str(export), md.checksum, antibodies, pairs, shuffles, per_site)
    for c in configs:
        ev.runs[c] = score(export, seqs, c, log=log)
        if ev.runs[c].skipped:
            log(f"{c}: skipped ({ev.runs[c].skipped})")
    return ev


# ------------------------------------------------------------------------------------------- report

def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def accuracy_table(ev: Evaluation) -> str:
    heads = ["natural > shuffled"] + [f"{KABAT['VH'][s]}/{KABAT['VL'][s]}" for s in SITES] + ["all substitutions"]
    n = {k: sum(1 for p in ev.pairs if p.kind == k) for k in ("shuffled", *SITES)}
    lines = ["| engine | " + " | ".join(heads) + " | mean PLL per residue: natural / shuffled / substituted "
             "| copies/s |",
             "|---|" + "---:|" * (len(heads) + 2),
             "| pairs | " + " | ".join(str(x) for x in [n["shuffled"], *(n[s] for s in SITES),
                                                       sum(n[s] for s in SITES)])
             + " | | |"]
    for c, r in ev.runs.items():
        if r.skipped:
            lines.append(f"| {c} | skipped: {r.skipped} |" + " |" * (len(heads) + 1))
            continue
        acc = ev.accuracy(c)

        def mean_per_residue(texts):
            return np.mean([r.log_probs[t].mean() for t in texts]) if texts else float("nan")

        nat = mean_per_residue([a.sequence for a in ev.antibodies])
        shf = mean_per_residue([p.variant for p in ev.pairs if p.kind == "shuffled"])
        sub = mean_per_residue([p.variant for p in ev.pairs if p.kind in SITES])
        lines.append(f"| {c} | " + " | ".join(_pct(acc.get(k)) for k in ("shuffled", *SITES, "substituted"))
                     + f" | {nat:.3f} / {shf:.3f} / {sub:.3f} | {r.copies / max(r.seconds, 1e-9):.1f} |")
    return "\n".join(lines)


def drift_table(ev: Evaluation) -> str:
    base = ev.baseline.config
    lines = [f"| engine vs {base} | residue mean abs Δ | residue max abs Δ | sequence mean abs Δ PLL | "
             "sequence max abs Δ PLL | Spearman, all sequences | Spearman, natural | same decision |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c, r in ev.runs.items():
        if r.skipped or c == base:
            continue
        d = ev.drift(c)
        lines.append(f"| {c} | {d['token_mean_abs']:.4f} | {d['token_max_abs']:.3f} | {d['seq_mean_abs']:.3f} | "
                     f"{d['seq_max_abs']:.3f} | {d['spearman_all']:.4f} | {d['spearman_natural']:.4f} | "
                     f"{_pct(d['same_decision'])} % |")
    return "\n".join(lines)


def report(ev: Evaluation) -> str:
    m = machine()
    n_seq = len(ev.baseline.log_probs)
    n_res = sum(len(t) for t in ev.baseline.log_probs)
    timing = "; ".join(f"{c} {r.copies} copies in {r.seconds:.1f} s, CPU steal {fmt_pct(r.steal_pct)}"
                       for c, r in ev.runs.items() if not r.skipped)
    others = [c for c, r in ev.runs.items() if not r.skipped and c != ev.baseline.config]
    drift_part = ["", f"Drift from {ev.baseline.config} (natural log; a sequence's PLL is the sum over its residues):",
                  "", drift_table(ev)] if others else []
    return "\n".join([
        "### AntiBERTy: natural antibody sequences against shuffled and substituted ones",
        "",
        f"Model {ev.model} (checksum {ev.model_checksum[:12]}); {len(ev.antibodies)} variable domains "
        f"(tests/data/antibodies.tsv), {ev.shuffles} shuffle(s) of each and {ev.per_site} substitution(s) at each "
        f"of its four conserved sites: {len(ev.pairs)} pairs, {n_seq} sequences, {n_res} residues. "
        f"Accuracy: % of pairs with PLL(natural) > PLL(variant). Machine: {m['cpu']}, {m['cores']} cores; "
        f"{m['date']}; commit {git_rev()}. {timing}.",
        "",
        accuracy_table(ev),
        *drift_part,
    ])


def to_json(ev: Evaluation) -> dict:
    return {
        "model": ev.model, "model_checksum": ev.model_checksum, "shuffles": ev.shuffles, "per_site": ev.per_site,
        "baseline": ev.baseline.config,
        "runs": {c: {"skipped": r.skipped} if r.skipped else
                 {"accuracy": ev.accuracy(c), "drift": None if c == ev.baseline.config else ev.drift(c),
                  "copies": r.copies, "seconds": r.seconds, "load_seconds": r.load_seconds, "steal_pct": r.steal_pct,
                  "pll": r.pll}
                 for c, r in ev.runs.items()},
        "pairs": [vars(p) for p in ev.pairs],
    }


def default_export(work: Path, log) -> Path:
    """AntiBERTy's three files from the installed antiberty==0.1.3 wheel, copied as a user would and exported
    (top-k = its 25-token vocabulary, with ONNX fp32 and int8) under ``work``; reused while current."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import copy_antiberty

    hf = work / "antiberty-hf"
    if not (hf / "pytorch_model.bin").is_file():
        copy_antiberty(hf)
    return ensure_export(hf, work / "antiberty-export", onnx=True, int8=True, top_k=25, log=log)


def main(argv: list[str] | None = None) -> Evaluation:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="an mlm-export directory of AntiBERTy with model.onnx/model.int8.onnx as the configs need "
                         "(default: export the installed wheel's files under --work)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma-separated engine[:precision]; the first is the drift baseline")
    ap.add_argument("--data", default=str(DATA), help="the sequences (antibody, chain, sequence, source)")
    ap.add_argument("--shuffles", type=int, default=1, help="shuffled variants of each sequence")
    ap.add_argument("--per-site", type=int, default=1, help="substitutions at each conserved site (19: all)")
    ap.add_argument("--work", default=str(REPO / "bench-out" / "antiberty"))
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--json", default=None, help="write accuracies, drift and every sequence's PLL here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    model = args.model
    if model is None:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        model = default_export(work, log)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    ev = evaluate(model, configs=configs, antibodies=load_antibodies(args.data), shuffles=args.shuffles,
                  per_site=args.per_site, log=log)
    text = report(ev)
    emit(text, args.out, args.json, to_json(ev) if args.json else None)
    return ev


if __name__ == "__main__":
    main()
