"""``ScoreSettings``: every option of a run, in one frozen object, validated once.

Every way in builds one and hands it on: ``mlm-score`` and ``mlm-score ray`` (``from_cli_args``),
``score_file``, ``score_frame``, ``ray_data.score_dataset`` and the Airflow task (keyword arguments, or
the object itself, or ``to_dict()`` of it from an XCom)::

    from mlm_scorer import ScoreSettings, score_file

    s = ScoreSettings(model="models/bert", mode="token", on_bad_row="skip", flag_rules=["pseudo_perplexity>p99"])
    summary = score_file("in.tsv", "probs.parquet", s)
    ScoreSettings.from_dict(s.to_dict()) == s          # JSON-safe: paths as str, flag rules as text

Fields marked ``score`` (``SCORE_FIELDS``) change what a run writes (its rows, numbers or columns): the
resume key, the outputs' metadata and the summary record them (``scoring()``). The others change how
fast, where, or how a run reports, not its results. The model and the engine are recorded by what they
resolve to (the model's checksum, the engine's numerics), not by how they were named.

Imports stay light: nothing here loads an engine runtime (the engine registry is read when a settings
object is made: ``engines.base``, numpy).
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, Iterator

from .errors import SettingError, UsageError
from .models import DEFAULT_MODEL
from .reader import MAX_ROW_CHARS

ON_BAD_ROW = ("fail", "skip")
PROTOCOLS = ("auto", "kserve", "tfserving")
_SCORE = {"score": True}


class EngineOptions(Mapping):
    """A read-only mapping of engine options (``{"threads": 2}``), picklable, equal to a dict of the same
    items."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[str, Any] | None = None):
        self._d = dict(items or {})

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return repr(self._d)

    def __reduce__(self):
        return (EngineOptions, (self._d,))

    def __hash__(self) -> int:  # (a ScoreSettings is hashable when its options' values are)
        return hash(frozenset(self._d.items()))


@dataclass(frozen=True)
class ScoreSettings:
    """The options of a scoring run (see the module doc). Keyword construction; invalid values raise
    ``SettingError`` (a ``UsageError``) naming the field."""

    # what to score with
    model: str = DEFAULT_MODEL  # an export directory (mlm-export), or a checkpoint exported once into cache_dir
    model_version: int | None = None  # the export's version subdirectory (None: the highest)
    engine: str = "auto"  # an in-process engine, or a server's ("rest", "kserve_grpc", ...); "auto": chosen
    engine_options: Mapping[str, Any] = field(default_factory=EngineOptions)  # declared by each engine (OPTIONS)
    server: str | None = None  # http(s):// or grpc(s):// URL of TF Serving or a KServe v2 server (Triton)
    protocol: str | None = None  # what server speaks: auto (None: ask it), kserve or tfserving
    cache_dir: str | None = None  # where checkpoints are exported to
    # how
    mode: str = field(default="whole-word", metadata=_SCORE)
    top_k: int = field(default=0, metadata=_SCORE)
    batch_tokens: int | None = None  # padded tokens per batch (None: the engine's preference)
    max_batch_size: int | None = None  # copies per batch at most
    chunk_rows: int = 2048  # rows read and prepared at a time
    dedupe_cache: int = 20_000  # recent distinct sentences remembered to score duplicates once
    limit: int | None = field(default=None, metadata=_SCORE)  # the first N rows only
    progress: bool | None = False  # None: a bar on a terminal, lines elsewhere; True: on; False: off
    # input
    text_column: str | int | None = field(default=None, metadata=_SCORE)
    id_column: str | int | None = field(default=None, metadata=_SCORE)
    header: bool = field(default=True, metadata=_SCORE)
    on_bad_row: str = "fail"  # fail: stop at the first bad row; skip: record it as skipped and go on
    max_row_chars: int = field(default=MAX_ROW_CHARS, metadata=_SCORE)
    # data quality
    flag_rules: tuple[str, ...] = field(default=(), metadata=_SCORE)  # "min_word_prob<0.001", "pseudo_perplexity>p99"
    baseline: str | None = field(default=None, metadata=_SCORE)  # an earlier result: pNN thresholds from it
    # cache and resume
    score_cache: str | None = None  # persistent score cache directory
    resume: bool = False  # continue an interrupted run after its last committed chunk

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("model", "cache_dir", "score_cache", "baseline"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                set_(name, os.fspath(v))
            elif v is not None and not isinstance(v, str):
                raise SettingError(f"{name} must be a path (str), got {v!r}", option=name)
        if not self.model:
            raise SettingError("model must name an export directory or a checkpoint", option="model")
        opts = self.engine_options
        if opts is None:
            opts = {}
        if not isinstance(opts, Mapping):
            raise SettingError(f"engine_options must be a mapping of option names to values, got {opts!r}",
                               option="engine_options")
        opts = dict(opts)
        if "server" in opts:  # the server is a setting of its own; engine_options={"server": URL} is the same
            lifted = opts.pop("server")
            if self.server not in (None, lifted):
                raise SettingError(f"server is given twice: {self.server!r} and engine_options server={lifted!r}",
                                   option="server")
            set_("server", lifted or None)
        set_("engine_options", EngineOptions(opts))
        rules = self.flag_rules
        if isinstance(rules, str):
            rules = (rules,)
        try:
            set_("flag_rules", tuple(rule_text(r) for r in rules or ()))
        except TypeError:
            raise SettingError(f"flag_rules must be a list of rules such as 'pseudo_perplexity>p99', got {rules!r}",
                               option="flag_rules") from None
        self._check()
        set_("_rules", self._parse_rules())
        from .engines.base import check_engine_options, resolve_engine

        name = resolve_engine(self.engine, self.server, self.protocol)
        check_engine_options(name, self.engine_call_options(), server=self.server)

    # -- validation ------------------------------------------------------------------------------
    def _check(self) -> None:
        from .expand import MODES

        if self.on_bad_row not in ON_BAD_ROW:
            raise SettingError(f"on_bad_row must be one of {ON_BAD_ROW}, got {self.on_bad_row!r}", option="on_bad_row")
        if self.mode not in MODES:
            raise SettingError(f"unknown mode {self.mode!r}; modes: {', '.join(MODES)}", option="mode")
        for name in ("chunk_rows", "max_row_chars", "max_batch_size", "batch_tokens"):
            v = getattr(self, name)
            if v is not None and not _int(v, 1):
                raise SettingError(f"{name} must be a positive integer, got {v!r}", option=name,
                                   cli=f"--{_flag(name)} must be positive")
        for name in ("top_k", "dedupe_cache", "limit", "model_version"):
            v = getattr(self, name)
            if (v is not None or name in ("top_k", "dedupe_cache")) and not _int(v, 0):
                raise SettingError(f"{name} must be >= 0, got {v!r}" if _int(v, None) else
                                   f"{name} must be an integer >= 0, got {v!r}", option=name,
                                   cli=f"--{_flag(name)} must be >= 0")
        for name in ("header", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(f"{name} must be True or False, got {getattr(self, name)!r}", option=name)
        if self.progress not in (None, True, False):
            raise SettingError(f"progress must be None (automatic), True or False, got {self.progress!r}",
                               option="progress")
        for name in ("text_column", "id_column"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (str, numbers.Integral))):
                raise SettingError(f"{name} must be a column name or a 0-based index, got {v!r}", option=name)
        if not isinstance(self.engine, str) or not self.engine:
            raise SettingError(f"engine must be an engine's name, got {self.engine!r}", option="engine")
        if self.server is not None and not isinstance(self.server, str):
            raise SettingError(f"server must be a URL, got {self.server!r}", option="server")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise SettingError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}",
                               option="protocol", cli=f"--protocol must be auto, kserve or tfserving, not "
                                                      f"{self.protocol!r}")

    def _parse_rules(self) -> tuple:
        return tuple(parse_rule_text(t) for t in self.flag_rules)

    # -- what the doors use ----------------------------------------------------------------------
    @property
    def rules(self) -> list:
        """``flag_rules`` as ``quality.FlagRule`` objects, in order."""
        return list(self._rules)  # type: ignore[attr-defined]

    def engine_call_options(self) -> dict[str, Any]:
        """The options the engine is opened with: ``engine_options`` and, for a server, its ``server``."""
        opts = dict(self.engine_options)
        if self.server:
            opts["server"] = self.server
        return opts

    def scoring(self) -> dict[str, Any]:
        """The settings that change what a run writes (``SCORE_FIELDS``), JSON-safe: what the resume key, the
        outputs' metadata and the summary record."""
        d = self.to_dict()
        return {k: d[k] for k in SCORE_FIELDS}

    def changed(self) -> list[str]:
        """The fields that differ from their defaults, in field order."""
        default = ScoreSettings()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]

    # -- conversions -----------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ScoreSettings":
        """A copy with ``changes`` applied (validated again); an unknown name is a UsageError."""
        _refuse_unknown(changes, "ScoreSettings.replace")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-safe (paths as str, flag rules as written, engine options as a dict):
        ``from_dict`` gives an equal object back (Airflow's XCom, Ray's actors)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["engine_options"] = dict(self.engine_options)
        d["flag_rules"] = list(self.flag_rules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScoreSettings":
        """The settings ``to_dict`` wrote (or a subset: the rest keep their defaults). An unknown key is a
        UsageError that names it and lists the known ones."""
        if not isinstance(d, Mapping):
            raise SettingError(f"settings must be a mapping of setting names to values, got {type(d).__name__}")
        _refuse_unknown(d, "ScoreSettings.from_dict")
        return cls(**d)

    @classmethod
    def from_cli_args(cls, ns) -> "ScoreSettings":
        """The settings of an ``argparse.Namespace`` from a parser that ``cli.add_score_arguments`` built: each
        field from the flag of its name (``--no-header`` is ``header``, ``--cache`` is ``score_cache``), the
        engine's options from ``--engine-option KEY=VALUE`` and the flags named after engine options
        (``--precision``, ``--timeout``, ...: ``cli.ENGINE_OPTION_FLAGS``); ``-q`` turns progress off."""
        from .cli import ENGINE_OPTION_FLAGS, parse_engine_options
        from .quality import parse_rule

        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("engine_options", "progress", "flag_rules"):
                continue
            v = getattr(ns, f.name, None)
            if v is not None:
                kw[f.name] = v
        opts = parse_engine_options(getattr(ns, "engine_option", None) or [])
        for name in ENGINE_OPTION_FLAGS:
            v = getattr(ns, name, None)
            if v is not None:
                opts[name] = v
        kw["engine_options"] = opts
        kw["progress"] = False if getattr(ns, "quiet", False) else getattr(ns, "progress", None)
        # --flag-below rules, then --flag-above ones; each checked with the flag's own messages
        kw["flag_rules"] = [parse_rule(x, op) for op in ("below", "above") for x in getattr(ns, f"flag_{op}", [])]
        s = cls(**kw)
        if s.baseline and not any(r.relative for r in s.rules):
            raise UsageError("--baseline is where pNN thresholds are taken from, and no rule has one: add e.g. "
                               "--flag-above pseudo_perplexity=p99")
        return s


#: The settings that change what a run writes (``field(metadata={"score": True})``), listed once.
SCORE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ScoreSettings) if f.metadata.get("score"))
#: Every setting's name, in field order.
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ScoreSettings))


def settings_from(settings: "ScoreSettings | Mapping[str, Any] | None", options: Mapping[str, Any], *,
                  door: str) -> ScoreSettings:
    """The settings of a call to ``door`` (``score_file``, ...): ``settings`` (an object, or a dict as
    ``to_dict`` writes it, or a part of one) with the keyword ``options`` applied. ``flag_below``/
    ``flag_above`` (lists of "METRIC=VALUE", as the flags take them) are accepted for ``flag_rules``. A
    keyword that is no setting is a UsageError, and so is one that contradicts what ``settings`` sets (a
    dict's keys; an object's fields away from their defaults): each setting is given once."""
    options = dict(options)
    if "flag_below" in options or "flag_above" in options:  # METRIC=VALUE lists, as the flags take them
        from .quality import parse_rule

        if "flag_rules" in options:
            raise SettingError(f"{door}: give flag_rules, or flag_below/flag_above, not both", option="flag_rules")
        options["flag_rules"] = [parse_rule(x, op) for op in ("below", "above")
                                 for x in _strings(options.pop(f"flag_{op}", None) or (), f"flag_{op}")]
    unknown = sorted(set(options) - set(SETTING_NAMES))
    if unknown:
        raise SettingError(f"{door} does not take {', '.join(unknown)}; its settings are "
                           f"{', '.join(SETTING_NAMES)} (ScoreSettings)", option=unknown[0])
    if settings is None:
        return ScoreSettings(**options)
    if isinstance(settings, Mapping):  # a dict sets the keys it holds
        given, settings = set(settings), ScoreSettings.from_dict(settings)
    elif isinstance(settings, ScoreSettings):  # an object, the fields it sets away from their defaults
        given = set(settings.changed())
    else:
        raise SettingError(f"{door}: settings must be a ScoreSettings or a dict of settings, got "
                           f"{type(settings).__name__}")
    if not options:
        return settings
    merged = ScoreSettings(**{**settings.to_dict(), **options})
    conflicts = [k for k in options if k in given and getattr(merged, k) != getattr(settings, k)]
    if conflicts:
        shown = ", ".join(f"{k}={getattr(settings, k)!r} in settings but {options[k]!r} as a keyword"
                          for k in conflicts)
        raise SettingError(f"{door}: {shown}; give each setting once (settings.replace({conflicts[0]}=...) makes "
                           f"a changed copy)", option=conflicts[0])
    return merged


def rule_text(rule) -> str:
    """A flag rule as ``flag_rules`` holds it: "METRIC<VALUE" (flag when below) or "METRIC>VALUE" (above), VALUE
    a number or a percentile pNN. A ``quality.FlagRule`` (as ``parse_rule`` makes it) becomes text that parses
    back to an equal rule; a percentile rule whose threshold was already taken is refused (its text would
    take it again). A text is checked (``parse_rule_text``) and written the same way."""
    from .quality import FlagRule

    if isinstance(rule, str):  # checked, and written the one way its rule is (0.0001 for 1e-4, p99.5 for p99.50)
        rule = parse_rule_text(rule)
    if not isinstance(rule, FlagRule):
        raise SettingError(f"a flag rule is a text such as 'pseudo_perplexity>p99' or a quality.FlagRule, got "
                           f"{rule!r}", option="flag_rules")
    if rule.relative:
        if rule.value is not None:
            raise SettingError(f"flag rule {rule} has its percentile taken already; give the rule as written "
                               f"(quality.parse_rule)", option="flag_rules")
        value = f"p{_exact(rule.percentile)}"
    else:
        value = repr(float(rule.value))
    return f"{rule.metric}{'<' if rule.op == 'below' else '>'}{value}"


def parse_rule_text(text: str):
    """"METRIC<VALUE" / "METRIC>VALUE" -> ``quality.FlagRule`` (UsageError with the reason otherwise)."""
    from .quality import parse_rule

    metric, op, value = _split_rule(text)
    return parse_rule(f"{metric}={value}", op)


def _split_rule(text: str) -> tuple[str, str, str]:
    from .quality import METRICS

    cut = min((i for i in (text.find("<"), text.find(">")) if i >= 0), default=-1)
    if cut < 0:
        raise SettingError(f"flag rule {text!r}: write METRIC<VALUE (flag below) or METRIC>VALUE (flag above), "
                           f"e.g. pseudo_perplexity>p99 (metrics: {', '.join(METRICS)})", option="flag_rules")
    op = "below" if text[cut] == "<" else "above"
    return text[:cut].strip().replace("-", "_"), op, text[cut + 1:].strip()


def _strings(v, name: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    v = list(v)  # an iterator is read once
    if not all(isinstance(x, str) for x in v):
        raise SettingError(f"{name} must be a list of METRIC=VALUE rules (str), got {v!r}", option=name)
    return list(v)


def refuse(settings: ScoreSettings, names: Mapping[str, str], door: str) -> None:
    """UsageError when ``settings`` sets (away from its default) one of ``names``: {field: why it does not
    apply at ``door``}."""
    given = [n for n in settings.changed() if n in names]
    if given:
        raise SettingError("; ".join(f"{door} does not take {n}: {names[n]}" for n in given), option=given[0],
                           cli="; ".join(f"{door} does not take --{_flag(n)}: {names[n]}" for n in given))


def _exact(p: Fraction) -> str:
    """A percentile as a decimal that ``Fraction(text)`` reads back exactly (a float's repr otherwise)."""
    if p.denominator == 1:
        return str(p.numerator)
    d, twos, fives = p.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return repr(float(p))
    digits = max(twos, fives)
    scaled = p * 10 ** digits
    s = str(scaled.numerator).rjust(digits + 1, "0")
    return f"{s[:-digits]}.{s[-digits:]}"


def _int(v: Any, minimum: int | None) -> bool:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        return False
    return minimum is None or v >= minimum


def _flag(name: str) -> str:
    return {"score_cache": "cache", "header": "no-header"}.get(name, name.replace("_", "-"))


def _refuse_unknown(d: Mapping[str, Any], what: str) -> None:
    unknown = sorted(set(d) - set(SETTING_NAMES))
    if unknown:
        raise SettingError(f"{what}: unknown setting(s) {', '.join(map(repr, unknown))}; the settings are "
                           f"{', '.join(SETTING_NAMES)}", option=str(unknown[0]))

