"""Shared pieces of the benchmarks: the machine, the BLiMP sentences, bert-shaped random checkpoints."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import subprocess
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BLIMP_ZIP = SHARED / "benchmarks" / "blimp" / "BLiMP.zip"
BERT_VOCAB = SHARED / "vocab" / "bert-base-uncased" / "vocab.txt"

SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "bert-base": (768, 12, 12, 3072),
    "small": (256, 4, 4, 1024),
}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    except (OSError, ValueError, IndexError):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "date": _dt.date.today().isoformat()}


def blimp_sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences (good and bad halves of minimal pairs) drawn evenly from BLiMP's 67 paradigms."""
    with zipfile.ZipFile(BLIMP_ZIP) as z:
        names = sorted(x for x in z.namelist() if x.startswith("data/") and x.endswith(".jsonl"))
        pairs = []
        per = max(1, n // (2 * len(names)) + 1)
        for name in names:
            lines = z.read(name).decode("utf-8").splitlines()[:per]
            for line in lines:
                d = json.loads(line)
                pairs.append((d["sentence_good"], d["sentence_bad"]))
    random.Random(seed).shuffle(pairs)
    out = [s for p in pairs for s in p]
    return out[:n]


def write_tsv(path: Path, sentences: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\n")
        for i, s in enumerate(sentences):
            f.write(f"{i}\t{s}\n")
    return path


def make_checkpoint(out: Path, shape: str = "bert-base", seed: int = 0) -> Path:
    """A random BertForMaskedLM of the given shape on the real uncased vocab, in Hugging Face format."""
    if (out / "config.json").is_file():
        return out
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_hf_bert

    h, layers, heads, inter = SHAPES[shape]
    return make_hf_bert(out, vocab=BERT_VOCAB, hidden=h, layers=layers, heads=heads, intermediate=inter,
                        max_pos=512, seed=seed, init_range=0.02)


def export_is_current(version_dir: Path, onnx: bool = False, int8: bool = False) -> bool:
    """True if ``version_dir`` holds an export (and, with ``onnx``, an ONNX model; with ``int8`` also its
    int8 file) written by the graph revision this checkout writes. Benchmark caches are rebuilt
    otherwise: an old graph is slower."""
    from mlm_export.config import GRAPH_REVISION

    try:
        m = json.loads((Path(version_dir) / "mlm_scorer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if m.get("graph_revision") != GRAPH_REVISION:
        return False
    if (onnx or int8) and (m.get("onnx") or {}).get("graph_revision") != GRAPH_REVISION:
        return False
    return not int8 or (Path(version_dir) / "model.int8.onnx").is_file()


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flops_per_copy(shape: str, tokens: float) -> float:
    """FLOPs of one copy: encoder over `tokens` tokens + the MLM head at one position (2 per MAC)."""
    h, layers, _, inter = SHAPES[shape]
    V = 30522
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)
    attn = 2 * 2 * tokens * h  # QK^T and AV per token per layer
    head = 2 * (h * h + h * V)
    return layers * tokens * (per_token_layer + attn) + head


def executed_flops_ours(shape: str, tokens: float) -> float:
    """FLOPs mlm-score's graphs execute for one copy of ``tokens`` (padded) tokens with one prediction:
    like ``flops_per_copy`` except that the last layer computes keys and values for every token but its
    query, attention output and feed-forward only at the masked position (export/bert_mlm.py)."""
    h, layers, _, inter = SHAPES[shape]
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)
    attn = 2 * 2 * tokens * h
    last = tokens * 2 * (2 * h * h) + 2 * (2 * h * h + 2 * h * inter) + attn
    head = 2 * (h * h + h * 30522)
    return (layers - 1) * tokens * (per_token_layer + attn) + last + head
