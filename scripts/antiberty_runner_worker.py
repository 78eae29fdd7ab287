"""Score sequences with AntiBERTy's own runner; runs INSIDE .venv-peers (scripts/peers_env.sh), not the main venv.

AntiBERTy (antiberty==0.1.3) needs transformers < 5. This calls its public API as its README shows::

    runner = antiberty.AntiBERTyRunner()
    runner.pseudo_log_likelihood(sequences, batch_size=...)

which masks each residue in turn, sets the logits of the special tokens to -inf and returns, per sequence,
minus the mean cross-entropy over its residues (a per-residue average, natural log). The weights it loads
are the wheel's own (antiberty/trained_models/AntiBERTy_md_smooth); their sha256 is reported so a caller
can check they are the files it scored with mlm-score.

Input: a text file, one sequence per line (residues, no spaces). Writes JSON (--out): versions, weights
sha256, load seconds, scoring seconds (after an untimed warm-up call on a short prefix), and per
sequence its PLL.
Used by tests/test_real_weights.py and scripts/bench_antiberty.py.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata as md
import io
import json
import os
import sys
import time


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", required=True, help="one sequence per line")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=0,
                    help="masked copies per forward pass (0: the runner's default, all copies of a sequence at once)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = [s.strip() for s in open(args.sequences, encoding="utf-8") if s.strip()]
    t = time.perf_counter()
    import antiberty
    from antiberty import AntiBERTyRunner
    from antiberty.AntiBERTyRunner import CHECKPOINT_PATH

    runner = AntiBERTyRunner()
    load_s = time.perf_counter() - t
    bs = args.batch_size or None
    quiet = contextlib.redirect_stderr(io.StringIO())  # its tqdm bar, one per sequence
    with quiet:
        runner.pseudo_log_likelihood([seqs[0][:8]], batch_size=bs)  # warm-up (a short prefix), untimed
        t = time.perf_counter()
        plls = runner.pseudo_log_likelihood(seqs, batch_size=bs)
        seconds = time.perf_counter() - t
    out = {
        "versions": {p: md.version(p) for p in ("antiberty", "transformers", "torch")},
        "antiberty_path": os.path.dirname(antiberty.__file__),
        "weights_sha256": sha256(os.path.join(CHECKPOINT_PATH, "pytorch_model.bin")),
        "torch_threads": torch.get_num_threads(),
        "batch_size": bs,
        "load_seconds": load_s,
        "seconds": seconds,
        "copies": sum(len(s) for s in seqs),
        "sequences": seqs,
        "pll": [float(x) for x in plls],
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f)
    print(json.dumps({k: out[k] for k in ("versions", "load_seconds", "seconds", "copies")}))


if __name__ == "__main__":
    sys.exit(main())
