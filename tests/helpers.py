"""Test helpers: the independent PyTorch reference and small TSV/Parquet utilities."""
from __future__ import annotations

from pathlib import Path

from tiny_models import load_reference


class TorchReference:
    """Word log-probs computed independently: transformers' tokenizer and BertForMaskedLM, the full
    vocabulary softmax at every position, masked copies built here from the definitions."""

    def __init__(self, hf_dir: Path):
        self.model, self.tok = load_reference(hf_dir)
        self.max_len = self.model.config.max_position_embeddings
        self.cls_id, self.sep_id = self.tok.cls_token_id, self.tok.sep_token_id

    def words(self, text: str) -> tuple[list[int], list[list[int]]]:
        enc = self.tok(text, add_special_tokens=False)
        ids = enc["input_ids"]
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(enc.word_ids()):
            groups.setdefault(w, []).append(i)
        return ids, [groups[w] for w in sorted(groups)]

    def _log_probs(self, ids: list[int], window: tuple[int, int], masked: list[int], predict: list[int]) -> list[float]:
        import torch

        a, b = window
        row = [self.cls_id] + list(ids[a:b]) + [self.sep_id]
        for m in masked:
            row[1 + m - a] = self.tok.mask_token_id
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([row])).logits[0]
            lp = torch.log_softmax(logits.double(), dim=-1)
        return [float(lp[1 + p - a, ids[p]]) for p in predict]

    def word_log_probs(self, text: str, mode: str, window_fn=None) -> list[float]:
        ids, words = self.words(text)
        out = []
        for pieces in words:
            def win(masked):
                return window_fn(ids, words, masked) if window_fn else (0, len(ids))
            if mode == "whole-word":
                out.append(sum(self._log_probs(ids, win(pieces), pieces, pieces)))
            elif mode == "word-l2r":
                out.append(sum(self._log_probs(ids, win(pieces[j:]), pieces[j:], [p])[0]
                               for j, p in enumerate(pieces)))
            elif mode == "token":
                out.append(sum(self._log_probs(ids, win([p]), [p], [p])[0] for p in pieces))
            else:
                raise ValueError(mode)
        return out


def write_tsv(path: Path, rows: list[list[str]], header: list[str] | None = ("id", "text")) -> Path:
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_outputs(out: Path):
    import pyarrow.parquet as pq

    from mlm_scorer.writer import sentences_path

    return pq.read_table(out).to_pylist(), pq.read_table(sentences_path(out)).to_pylist()


def wait_for_chunks(out: Path, proc, n: int, timeout: float = 240.0) -> None:
    """Wait until the running mlm-score ``proc`` writing ``out`` has committed ``n`` chunks (its
    ``OUT.parts/progress.json`` lists them); AssertionError if the run ends first or ``timeout`` passes."""
    import json
    import time

    progress = Path(str(out) + ".parts") / "progress.json"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert time.monotonic() < deadline, f"{n} chunks were not committed within {timeout:g}s"
        try:
            if len(json.loads(progress.read_text())["parts"]) >= n:
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.02)


def committed(out: Path) -> tuple[list[dict], list[float]]:
    """What an unfinished run writing ``out`` committed: the chunks ``progress.json`` lists, and the ``pll``
    of each committed row, in input order."""
    import json

    import pyarrow.parquet as pq

    parts_dir = Path(str(out) + ".parts")
    parts = json.loads((parts_dir / "progress.json").read_text())["parts"]
    return parts, [r["pll"] for part in parts
                   for r in pq.read_table(parts_dir / part["sentences"], columns=["pll"]).to_pylist()]
