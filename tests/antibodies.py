"""Real antibody variable domains for tests with real weights (AntiBERTy), and corrupted copies of some.

``tests/data/antibodies_jain2017.tsv`` (name, chain, sequence): VH and VL domains of 33 clinical-stage
therapeutic antibodies, as published in the supplementary data of Jain T. et al. (2017), "Biophysical
properties of the clinical-stage antibody landscape", PNAS 114(5):944-949, doi:10.1073/pnas.1616408114
(Supplementary Data: VH and VL sequences of 137 clinical-stage antibodies; the sequences are those of
their International Nonproprietary Names). The names are the antibodies' INNs.

AntiBERTy reads residues separated by spaces (``as_text``). The batches:

    baseline   20 natural domains (10 VH, 10 VL)
    current    12 rows: 9 natural domains of other antibodies (5 VH, 4 VL) and 3 corrupted domains of
               three more antibodies: two with their residues shuffled (the composition of a real
               domain, the order destroyed) and one with 30 % of its residues replaced at random

Corruption is deterministic (``random.Random`` with a fixed seed per row), so the batches are the same
on every machine.
"""
from __future__ import annotations

import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "antibodies_jain2017.tsv"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"

BASELINE = [(n, "VH") for n in ("trastuzumab", "adalimumab", "bevacizumab", "rituximab", "cetuximab",
                                "pembrolizumab", "omalizumab", "ipilimumab", "secukinumab", "tocilizumab")] + \
           [(n, "VL") for n in ("adalimumab", "bevacizumab", "cetuximab", "omalizumab", "nivolumab", "daratumumab",
                                "efalizumab", "natalizumab", "eculizumab", "ipilimumab")]
# (name, chain, corruption or None), in batch order: the corrupted rows sit among the natural ones
CURRENT = [("nivolumab", "VH", None), ("abrilumab", "VL", None), ("ustekinumab", "VH", "shuffled"),
           ("natalizumab", "VH", None), ("alemtuzumab", "VL", None), ("denosumab", "VH", None),
           ("ocrelizumab", "VL", "shuffled"), ("certolizumab", "VL", None), ("golimumab", "VH", None),
           ("vedolizumab", "VH", "garbled"), ("evolocumab", "VL", None), ("belimumab", "VH", None)]


def load() -> dict[tuple[str, str], str]:
    """{(name, chain): sequence} from the data file."""
    out = {}
    lines = DATA.read_text(encoding="ascii").splitlines()
    assert lines[0].split("\t") == ["name", "chain", "sequence"], lines[0]
    for line in lines[1:]:
        name, chain, seq = line.split("\t")
        assert set(seq) <= set(AMINO_ACIDS), (name, chain)
        out[(name, chain)] = seq
    return out


def as_text(seq: str) -> str:
    """``EVQL...`` -> ``E V Q L ...``: AntiBERTy's input, one residue per word."""
    return " ".join(seq)


def shuffled(seq: str, seed: int) -> str:
    residues = list(seq)
    random.Random(seed).shuffle(residues)
    return "".join(residues)


def garbled(seq: str, seed: int, share: float = 0.3) -> str:
    """``share`` of the positions replaced by a residue drawn at random (never the same one)."""
    rng = random.Random(seed)
    residues = list(seq)
    for i in rng.sample(range(len(residues)), round(share * len(residues))):
        residues[i] = rng.choice(AMINO_ACIDS.replace(residues[i], ""))
    return "".join(residues)


def row_id(name: str, chain: str, corruption: str | None = None) -> str:
    return f"{name}-{chain}" + (f"-{corruption}" if corruption else "")


def baseline_rows() -> list[list[str]]:
    """[[id, text], ...] of the baseline batch."""
    seqs = load()
    return [[row_id(n, c), as_text(seqs[(n, c)])] for n, c in BASELINE]


def current_rows() -> list[list[str]]:
    """[[id, text], ...] of the current batch: natural domains with three corrupted ones among them."""
    seqs = load()
    rows = []
    for k, (n, c, corruption) in enumerate(CURRENT):
        seq = seqs[(n, c)]
        if corruption == "shuffled":
            seq = shuffled(seq, seed=k)
        elif corruption == "garbled":
            seq = garbled(seq, seed=k)
        rows.append([row_id(n, c, corruption), as_text(seq)])
    return rows


def corrupted_ids() -> set[str]:
    return {row_id(n, c, k) for n, c, k in CURRENT if k}
