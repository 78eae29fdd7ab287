"""Score a TSV with minicons' MaskedLMScorer; runs INSIDE .venv-peers (scripts/peers_env.sh), not the main venv.

Used by scripts/bench_peers.py. For each PLL metric, the sentences are scored with the public API
exactly as a user would call it::

    scorer = scorer.MaskedLMScorer(checkpoint, "cpu")
    scorer.sequence_score(batch_of_sentences, reduction=..., PLL_metric=metric)

with `batch_size` sentences per call (minicons pads a call's sentences to its longest, stacks all of
their masked copies and runs them as one forward pass). The reduction returns the per-token natural-log
probabilities (minicons' default base e); their sum is the sentence PLL. One untimed warm-up call
precedes the timed loop (as mlm-score's engine warms up during its start-up).

Writes JSON (--out, and the last line of stdout): versions, settings, per-metric seconds, copies,
padded tokens, and per sentence the token ids, the fast tokenizer's word ids and per-token scores.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--tsv", required=True, help="id<TAB>text with a header line")
    ap.add_argument("--metrics", default="original,within_word_l2r")
    ap.add_argument("--batch-size", type=int, default=10, help="sentences per sequence_score call")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--cased", action="store_true",
                    help="load the tokenizer with do_lower_case=False and pass it to MaskedLMScorer (a vocabulary "
                         "without tokenizer_config.json, e.g. AntiBERTy's: transformers would lower-case it)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from minicons import scorer as mscorer

    if args.threads:
        torch.set_num_threads(args.threads)
    lines = open(args.tsv, encoding="utf-8").read().splitlines()[1:]
    texts = [ln.split("\t", 1)[1] for ln in lines]

    t = time.perf_counter()
    if args.cased:
        from transformers import AutoTokenizer

        s = mscorer.MaskedLMScorer(args.model, "cpu",
                                   tokenizer=AutoTokenizer.from_pretrained(args.model, do_lower_case=False))
    else:
        s = mscorer.MaskedLMScorer(args.model, "cpu")
    load_s = time.perf_counter() - t

    # Untimed: the tokens minicons predicts (every non-special token) and the word each belongs to.
    tok = s.tokenizer
    special = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    token_ids, word_ids = [], []
    for text in texts:
        enc = tok(text)
        ids, wids = enc["input_ids"], enc.word_ids()
        keep = [i for i, x in enumerate(ids) if x not in special]
        token_ids.append([ids[i] for i in keep])
        word_ids.append([wids[i] for i in keep])

    batches = [texts[i:i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    out = {
        "versions": {p: md.version(p) for p in ("minicons", "transformers", "torch", "tokenizers")},
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "load_seconds": load_s,
        "sentences": len(texts),
        "token_ids": token_ids,
        "word_ids": word_ids,
        "metrics": {},
    }
    for metric in args.metrics.split(","):
        s.sequence_score(batches[0][:2], reduction=lambda x: x.sum(0).item(), PLL_metric=metric)  # warm-up
        scores: list[list[float]] = []
        padded = 0
        t = time.perf_counter()
        for b in batches:
            scores += s.sequence_score(b, reduction=lambda x: x.tolist(), PLL_metric=metric)
        seconds = time.perf_counter() - t
        # what the calls computed: every copy of every sentence at its call's padded length (untimed)
        k = 0
        for b in batches:
            L = max(len(token_ids[k + j]) for j in range(len(b))) + 2
            padded += sum(len(token_ids[k + j]) for j in range(len(b))) * L
            k += len(b)
        assert [len(x) for x in scores] == [len(x) for x in token_ids], "minicons scored other tokens than expected"
        out["metrics"][metric] = {"seconds": seconds, "copies": sum(len(x) for x in scores),
                                  "padded_tokens": padded, "scores": scores}
    text = json.dumps(out)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(json.dumps({k: v for k, v in out.items() if k in ("versions", "load_seconds", "sentences")}))


if __name__ == "__main__":
    sys.exit(main())
