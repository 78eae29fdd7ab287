"""Does a BERT WordPiece checkpoint lower-case its input? Decided from evidence, printed, never silent.

The weights do not say. The wrong answer is costly: an uncased vocabulary read without lower-casing
turns "The" and "Edinburgh" into [UNK]; a cased one read with it loses every capitalised piece. The
evidence, strongest first:

  1. the tokenizer files: ``tokenizer_config.json``'s ``do_lower_case``; ``tokenizer.json``'s normalizer
     (a ``BertNormalizer``'s ``lowercase``, or a ``Lowercase`` step in a ``Sequence``);
  2. the checkpoint's name, read as google-research/bert's ``validate_case_matches_checkpoint`` reads
     it: Google's release names (``uncased_L-12_H-768_A-12``, ``multilingual_L-12_H-768_A-12`` and
     ``chinese_L-12_H-768_A-12`` lower-case; ``cased_L-12_H-768_A-12`` and ``multi_cased_L-12_H-768_A-12``
     do not), and any name with the word ``uncased`` or ``cased`` in it (``bert-base-uncased``,
     ``bert-base-cased-finetuned-mrpc``, ``wwm_uncased_L-24_H-1024_A-16``);
  3. the vocabulary, judged on ASCII letters only: no token with an ASCII letter has an upper-case one
     -> uncased; upper-case ones among at least 1 % of them -> cased; a handful -> undecided. (Other
     scripts are not judged: the uncased English vocabulary holds ``ℝ``, an upper-case letter.)

Every piece of evidence found must agree, or the export is refused naming the choice to make
(``mlm-export --do-lower-case`` / ``--no-lower-case``; ``do_lower_case=True/False`` in Python). A choice
given that way wins, and the evidence it overrides is printed with it. With no evidence at all,
BERT's default (lower-casing) is taken, and said so.

``check_pieces`` then compares the export's tokenizer with transformers' tokenizer built from the source
directory with the same decision, on text with capitals, accents, CJK and punctuation.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CasingError, CheckpointError

FLAGS = ("mlm-export --do-lower-case or --no-lower-case (Python: load_checkpoint/export(..., "
         "do_lower_case=True or False))")

# google-research/bert tokenization.validate_case_matches_checkpoint
_GOOGLE_LOWER = {"uncased_L-24_H-1024_A-16", "uncased_L-12_H-768_A-12", "multilingual_L-12_H-768_A-12",
                 "chinese_L-12_H-768_A-12"}
_GOOGLE_CASED = {"cased_L-12_H-768_A-12", "cased_L-24_H-1024_A-16", "multi_cased_L-12_H-768_A-12"}
#: A vocabulary is judged cased when at least this share of its tokens with ASCII letters has upper-case ones.
CASED_VOCAB_SHARE = 0.01
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_ASCII_UPPER = re.compile(r"[A-Z]")
_BRACKETED = re.compile(r"\[[^\]]*\]|<[^>]*>")  # [CLS], [unused12], <s>: special tokens, not words


@dataclass(frozen=True)
class Evidence:
    """One piece of evidence: what it says (``lower`` None: noted, not decisive) and where it comes from."""

    lower: bool | None
    text: str

    def __str__(self) -> str:
        verdict = {True: "lower-case", False: "cased", None: "undecided"}[self.lower]
        return f"{self.text} ({verdict})"


@dataclass
class Casing:
    """The decision, what made it, and every piece of evidence seen (recorded in the manifest)."""

    do_lower_case: bool
    decided_by: str
    evidence: list[Evidence] = field(default_factory=list)
    given: bool = False  # chosen by the caller (--do-lower-case / --no-lower-case), not by the evidence
    pieces_check: dict | None = None  # check_pieces' report, filled in at export

    @property
    def overridden(self) -> list[Evidence]:
        return [e for e in self.evidence if e.lower is not None and e.lower != self.do_lower_case]

    def line(self) -> str:
        """E.g. "lower-casing: tokenizer_config.json do_lower_case=true"."""
        s = f"{'lower-casing' if self.do_lower_case else 'no lower-casing (cased)'}: {self.decided_by}"
        if self.given and self.overridden:
            s += f"; overriding the checkpoint's evidence: {'; '.join(map(str, self.overridden))}"
        others = [str(e) for e in self.evidence if e.text != self.decided_by and e not in self.overridden]
        if others:
            s += f" [also: {'; '.join(others)}]"
        return s

    def to_manifest(self) -> dict:
        return {"do_lower_case": self.do_lower_case, "decided_by": self.decided_by, "given": self.given,
                "evidence": [str(e) for e in self.evidence],
                **({"pieces_check": self.pieces_check} if self.pieces_check is not None else {})}


# ------------------------------------------------------------------------------------------ evidence


def tokenizer_files_evidence(directory: Path) -> list[Evidence]:
    """What ``tokenizer_config.json`` and ``tokenizer.json`` in ``directory`` say about lower-casing."""
    out = []
    cfg = read_tokenizer_config(directory)
    if isinstance(cfg.get("do_lower_case"), bool):
        out.append(Evidence(cfg["do_lower_case"],
                            f"tokenizer_config.json do_lower_case={json.dumps(cfg['do_lower_case'])}"))
    norm = _bert_normalizer(directory)
    if norm is not None:
        lower, what = norm
        out.append(Evidence(lower, f"tokenizer.json normalizer {what}"))
    return out


def name_evidence(name: str) -> Evidence | None:
    """google-research/bert's rule: Google's release names, else the word 'uncased' or 'cased' in the name."""
    if not name:
        return None
    if name in _GOOGLE_LOWER or name in _GOOGLE_CASED:
        return Evidence(name in _GOOGLE_LOWER, f"the name {name!r} (Google's release)")
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if ("uncased" in words) != ("cased" in words):
        return Evidence("uncased" in words, f"the name {name!r}")
    return None


def vocab_evidence(tokens: list[str], special: set[str]) -> Evidence | None:
    """The vocabulary judged on ASCII letters only (see the module docstring)."""
    alpha = [t for t in tokens if t not in special and not _BRACKETED.fullmatch(t) and _ASCII_LETTER.search(t)]
    if not alpha:
        return None
    upper = [t for t in alpha if _ASCII_UPPER.search(t)]
    n, u = len(alpha), len(upper)
    if u == 0:
        return Evidence(True, f"vocab.txt: none of its {n:,} tokens with ASCII letters has an upper-case one")
    examples = ", ".join(repr(t) for t in upper[:3])
    text = (f"vocab.txt: {u:,} of its {n:,} tokens with ASCII letters have upper-case ones "
            f"({examples}{', …' if u > 3 else ''})")
    return Evidence(False if u >= CASED_VOCAB_SHARE * n else None, text)


def checkpoint_name(path: Path, hub_id: str | None = None) -> str:
    """The name the name rule reads: the hub id's model name, a Hugging Face cache snapshot's repository
    name (``models--org--name/snapshots/<rev>``), else the directory's own name."""
    if hub_id:
        return hub_id.rstrip("/").split("/")[-1]
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


# ------------------------------------------------------------------------------------------ decision


def decide_casing(*, directory: Path, name: str, vocab_tokens: list[str], special: set[str],
                  given: bool | None) -> Casing:
    """Gather the evidence in ``directory`` (tokenizer files), ``name`` and the vocabulary, and decide.

    Raises CasingError when pieces of evidence disagree and ``given`` is None.
    """
    evidence = tokenizer_files_evidence(directory)
    for e in (name_evidence(name), vocab_evidence(vocab_tokens, special)):
        if e is not None:
            evidence.append(e)
    if given is not None:
        flag = "--do-lower-case" if given else "--no-lower-case"
        return Casing(bool(given), f"given ({flag} / do_lower_case={given})", evidence, given=True)
    votes = [e for e in evidence if e.lower is not None]
    if len({e.lower for e in votes}) > 1:
        raise CasingError(f"the checkpoint's evidence about lower-casing disagrees: "
                          f"{'; '.join(map(str, votes))}. Choose one: {FLAGS}")
    if votes:
        return Casing(votes[0].lower, votes[0].text, evidence)
    return Casing(True, "no evidence (no tokenizer files, no 'cased'/'uncased' in the name, no decisive "
                        "ASCII letters in vocab.txt): BERT's default do_lower_case=true", evidence)


def tokenizer_settings(directory: Path) -> dict:
    """``strip_accents`` and ``tokenize_chinese_chars`` from the tokenizer files (None where unsaid)."""
    cfg = read_tokenizer_config(directory)
    norm = _read_json_or_none(directory / "tokenizer.json")
    bert = _find_normalizer(norm.get("normalizer") if norm else None, "BertNormalizer")
    out = {}
    for key, norm_key in (("strip_accents", "strip_accents"), ("tokenize_chinese_chars", "handle_chinese_chars")):
        if key in cfg:
            out[key] = cfg[key]
        elif bert is not None and norm_key in bert:
            out[key] = bert[norm_key]
        else:
            out[key] = None
    return out


def read_tokenizer_config(directory: Path) -> dict:
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    cfg = _read_json_or_none(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return cfg


def _read_json_or_none(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _find_normalizer(norm, kind: str) -> dict | None:
    if not isinstance(norm, dict):
        return None
    if norm.get("type") == kind:
        return norm
    if norm.get("type") == "Sequence":
        for n in norm.get("normalizers") or []:
            found = _find_normalizer(n, kind)
            if found is not None:
                return found
    return None


def _bert_normalizer(directory: Path) -> tuple[bool, str] | None:
    """(lower-cases?, how it says so) from tokenizer.json's normalizer, or None if it has none we read."""
    tj = _read_json_or_none(Path(directory) / "tokenizer.json")
    norm = tj.get("normalizer") if isinstance(tj, dict) else None
    if not isinstance(norm, dict):
        return None
    bert = _find_normalizer(norm, "BertNormalizer")
    if bert is not None and isinstance(bert.get("lowercase"), bool):
        return bert["lowercase"], f"BertNormalizer lowercase={json.dumps(bert['lowercase'])}"
    if _find_normalizer(norm, "Lowercase") is not None:
        return True, "has a Lowercase step"
    if norm.get("type") == "Sequence":
        return False, "is a Sequence without a Lowercase step"
    return None


# ------------------------------------------------------------------------------ check against transformers

#: Capitals, accents, CJK, other scripts and punctuation; check_pieces adds words from the vocabulary.
SAMPLE_TEXTS = (
    "The Quick Brown Fox jumps over the lazy dog in Edinburgh.",
    "Photosynthesis: naïve café owners' résumés, Ångström, Øresund and São Paulo!",
    "東京タワーと北京の天気は晴れです。한국어 문장도 있습니다.",
    "HELLO, World? (e-mail: x.y@example.com) — “quotes” «guillemets» 3.14 ½ ℝ ß",
    "Σίσυφος ΑΘΗΝΑ Москва İstanbul ǅemal ﬁne Ⅻ",
    "Don't stop-believing... #hashtag @user $100 50% {brace} ~tilde~ under_score\tTAB",
)


def sample_texts(vocab_tokens: list[str], special: set[str], n: int = 48) -> list[str]:
    """SAMPLE_TEXTS plus words from the vocabulary itself, as they are, capitalised and upper-cased."""
    words = [t[2:] if t.startswith("##") else t for t in vocab_tokens
             if t not in special and not _BRACKETED.fullmatch(t) and t.strip()]
    step = max(1, len(words) // n)
    picked = words[::step][:n]
    return [*SAMPLE_TEXTS, " ".join(picked), " ".join(w.capitalize() for w in picked),
            " ".join(w.upper() for w in picked)]


def check_pieces(tokenizer_json: Path, source_dir: Path, *, do_lower_case: bool, strip_accents: bool | None,
                 tokenize_chinese_chars: bool, vocab_tokens: list[str], special: set[str]) -> dict:
    """Compare the export's tokenizer with transformers' ``BertTokenizerFast`` built from ``source_dir``
    with the same settings, on ``sample_texts``: pieces and ids must be equal.

    Returns a report (recorded in the manifest). Raises VerificationError on the first text that differs.
    Without transformers the check is skipped, and the report says so.
    """
    from .verify import VerificationError

    try:
        import transformers
        from transformers import BertTokenizerFast
    except ImportError:
        return {"skipped": "transformers is not installed"}
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tokenizer_json))
    ours.no_truncation()
    ours.no_padding()
    kw = {"do_lower_case": do_lower_case, "tokenize_chinese_chars": tokenize_chinese_chars,
          "strip_accents": strip_accents}
    try:
        ref = BertTokenizerFast.from_pretrained(str(source_dir), **kw)
    except Exception as exc:  # a directory transformers cannot read: say so, do not fail the export
        return {"skipped": f"transformers could not build a tokenizer from {source_dir}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    texts = sample_texts(vocab_tokens, special)
    n_pieces = 0
    for text in texts:
        enc = ours.encode(text, add_special_tokens=False)
        want = ref(text, add_special_tokens=False)
        want_tokens = ref.convert_ids_to_tokens(want["input_ids"])
        if enc.tokens != want_tokens or enc.ids != want["input_ids"]:
            raise VerificationError(
                f"the export's tokenizer and transformers' BertTokenizerFast (built from {source_dir} with "
                f"{', '.join(f'{k}={v}' for k, v in kw.items())}) split {text!r} differently: ours "
                f"{list(zip(enc.tokens, enc.ids))[:24]}, transformers {list(zip(want_tokens, want['input_ids']))[:24]}")
        n_pieces += len(enc.ids)
    return {"reference": f"transformers {transformers.__version__} BertTokenizerFast from the source directory",
            "settings": kw, "texts": len(texts), "pieces": n_pieces, "equal": True}
