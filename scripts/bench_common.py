"""Shared pieces of the benchmarks: the machine, the BLiMP sentences, bert-shaped random checkpoints."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The benchmark data beside the checkout (BLiMP, the bert-base-uncased vocabulary); $MLM_SHARED elsewhere.
SHARED = Path(os.environ.get("MLM_SHARED") or REPO.parent / "shared")
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
    from mlm_scorer.engines.cpu import cpu_flags, int8_class

    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "date": _dt.date.today().isoformat(), "cpu_flags": sorted(cpu_flags()), "cpu_class": int8_class()}


def parse_proc_stat(text: str) -> tuple[int, int] | None:
    """(steal, total) CPU time from /proc/stat's aggregate "cpu" line; None if it has no steal field."""
    f = text.split("\n", 1)[0].split()
    if len(f) < 9 or f[0] != "cpu":
        return None
    v = [int(x) for x in f[1:9]]  # user nice system idle iowait irq softirq steal (guest is inside user)
    return v[7], sum(v)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU time since boot, summed over all CPUs; None where /proc/stat is unreadable."""
    try:
        return parse_proc_stat(Path("/proc/stat").read_text())
    except OSError:
        return None


class Steal:
    """CPU steal while a block runs: the share of this VM's CPU time its hypervisor gave to other guests.

    On a shared VM this is what makes the same run 1.5x slower from one minute to the next; the
    benchmarks print it next to each rate so a disturbed measurement shows as one. ``pct`` is None
    where /proc/stat is unavailable (not Linux).

        with Steal() as st:
            run()
        print(st.pct)
    """

    def __init__(self) -> None:
        self.pct: float | None = None
        self._start: tuple[int, int] | None = None

    def start(self) -> "Steal":
        self._start = _cpu_jiffies()
        return self

    def stop(self) -> float | None:
        end = _cpu_jiffies()
        if self._start and end and end[1] > self._start[1]:
            self.pct = 100.0 * (end[0] - self._start[0]) / (end[1] - self._start[1])
        return self.pct

    def __enter__(self) -> "Steal":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def __str__(self) -> str:
        return fmt_pct(self.pct)


def fmt_pct(x: float | None) -> str:
    """A share in percent as the tables print it; "n/a" for an unknown one."""
    return "n/a" if x is None else f"{x:.0f} %"


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


#: Vocabulary sizes of the benchmarks' checkpoints: bert-base-uncased's, and roberta-base's.
VOCAB = {"bert": 30522, "roberta": 50265}
#: The RoBERTa benchmark checkpoint's tokenizer: a byte-level BPE of this many tokens trained on BLiMP (so
#: that longer words have several pieces), padded with unused tokens to roberta-base's vocabulary size.
ROBERTA_BPE = 2000


def make_checkpoint(out: Path, shape: str = "bert-base", seed: int = 0, family: str = "bert") -> Path:
    """A random masked LM of the given shape in Hugging Face format: BertForMaskedLM on the real uncased
    vocab, or (``family="roberta"``) RobertaForMaskedLM with a BPE trained on BLiMP (``ROBERTA_BPE``),
    the vocabulary padded to roberta-base's 50,265 tokens."""
    if (out / "config.json").is_file():
        return out
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    h, layers, heads, inter = SHAPES[shape]
    if family == "roberta":
        from tiny_families import make_family

        return make_family("roberta", out, hidden=h, layers=layers, heads=heads, intermediate=inter, max_pos=512,
                           seed=seed, init_range=0.02, bpe_vocab=ROBERTA_BPE,
                           bpe_lines=tuple(blimp_sentences(134_000)), vocab_size=VOCAB["roberta"])
    from tiny_models import make_hf_bert

    return make_hf_bert(out, vocab=BERT_VOCAB, hidden=h, layers=layers, heads=heads, intermediate=inter,
                        max_pos=512, seed=seed, init_range=0.02)


def export_is_current(version_dir: Path, onnx: bool = False, int8: bool = False, top_k: int | None = None) -> bool:
    """True if ``version_dir`` holds an export (and, with ``onnx``, an ONNX model; with ``int8`` also its
    int8 file; with ``top_k``, that k) written by the graph revision this checkout writes. Benchmark caches
    are rebuilt otherwise: an old graph is slower."""
    from mlm_export.config import GRAPH_REVISION

    try:
        m = json.loads((Path(version_dir) / "mlm_scorer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if m.get("graph_revision") != GRAPH_REVISION or (top_k is not None and m.get("top_k") != top_k):
        return False
    if (onnx or int8) and (m.get("onnx") or {}).get("graph_revision") != GRAPH_REVISION:
        return False
    return not int8 or (Path(version_dir) / "model.int8.onnx").is_file()


def ensure_export(ckpt: Path, export_dir: Path, *, onnx: bool = False, int8: bool = False, top_k: int = 5,
                  log=print) -> Path:
    """Export ``ckpt`` to ``export_dir/1`` (with ``top_k``) unless a current one is there
    (``export_is_current``); with ``onnx``/``int8`` also write its ONNX fp32 + int8 files. Each step runs in a
    child process, so this process has not started TensorFlow (whose thread pools cannot be set once it
    has). Returns export_dir."""
    if not export_is_current(export_dir / "1", top_k=top_k):
        log(f"exporting {ckpt} -> {export_dir}")
        subprocess.run([sys.executable, "-c", "import sys; from mlm_export import export; "
                        "export(sys.argv[1], sys.argv[2], top_k=int(sys.argv[3]), overwrite=True, log=print)",
                        str(ckpt), str(export_dir), str(top_k)], check=True)
    if (onnx or int8) and not export_is_current(export_dir / "1", onnx=True, int8=int8):
        log(f"writing ONNX fp32{' + int8' if int8 else ''} into {export_dir / '1'}")
        subprocess.run([sys.executable, "-c", "import sys, mlm_export; from mlm_export.to_onnx import write_onnx; "
                        "write_onnx(sys.argv[2], mlm_export.load_checkpoint(sys.argv[1]), "
                        "quantize=sys.argv[3] or None, log=print)",
                        str(ckpt), str(export_dir / "1"), "int8" if int8 else ""], check=True)
    return export_dir


def emit(text: str, out: str | None = None, json_path: str | None = None, data=None) -> None:
    """Print a benchmark's table; with ``out``, also write it there; with ``json_path``, write ``data`` as
    JSON there (the numbers behind the table)."""
    print(text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """The benchmark's command as run, ``python scripts/NAME.py ARGS``, for the header of its table.

    ``argv`` defaults to ``sys.argv[1:]`` and ``script`` to ``sys.argv[0]``, shown relative to the checkout.
    """
    path = Path(script or sys.argv[0]).resolve()
    try:
        name = str(path.relative_to(REPO))
    except ValueError:
        name = str(path)
    return shlex.join(["python", name, *(sys.argv[1:] if argv is None else argv)])


def flops_per_copy(shape: str, tokens: float, vocab: int = VOCAB["bert"]) -> float:
    """FLOPs of one copy: encoder over `tokens` tokens + the MLM head at one position (2 per MAC)."""
    h, layers, _, inter = SHAPES[shape]
    V = vocab
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)
    attn = 2 * 2 * tokens * h  # QK^T and AV per token per layer
    head = 2 * (h * h + h * V)
    return layers * tokens * (per_token_layer + attn) + head


def executed_flops_ours(shape: str, tokens: float, vocab: int = VOCAB["bert"]) -> float:
    """FLOPs mlm-score's graphs execute for one copy of ``tokens`` (padded) tokens with one prediction:
    like ``flops_per_copy`` except that the last layer computes keys and values for every token but its
    query, attention output and feed-forward only at the masked position (export/bert_mlm.py): the
    other tokens - 1 rows of those, and of the last layer's attention, are not computed."""
    h, _, _, inter = SHAPES[shape]
    skipped_per_row = 2 * (2 * h * h + 2 * h * inter) + 2 * 2 * tokens * h  # Q, output, FFN; QK^T and AV
    return flops_per_copy(shape, tokens, vocab) - (tokens - 1) * skipped_per_row
