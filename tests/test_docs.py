"""The documents' shell examples are real (sqlite-utils' test_docs idea).

Every fenced ``sh`` block of README.md, BENCHMARKS.md and docs/*.md is split into commands. For each
command of this project (``mlm-score`` and its subcommands, ``mlm-export``, ``python -m
mlm_export.to_tensorrt``, ``python scripts/NAME.py``):

* every option it uses is listed by that command's (or subcommand's) ``--help``, written in full (argparse
  would accept an abbreviation; a document should not rely on it);
* the command line parses: argparse accepts its values and finds its required arguments.

An ``mlm-score`` command whose inputs are only the sample data (``data/sample.tsv``, or what an earlier
command of the same block wrote) also runs with the documented arguments, and must exit 0 and write its
output. Each block runs in a fresh directory holding ``data/sample.tsv`` and a tiny random export at
``models/bert`` (SavedModel, ONNX fp32 and int8): the documents write ``--model models/bert`` -- the
directory ``mlm-export CHECKPOINT models/bert`` makes -- in such commands, and a sample-data command
naming another model fails here. Commands that need what a test machine lacks (a TF Serving server,
TensorRT, a GPU) are checked but not run.

Shell blocks are tagged ``sh``: a ``bash``/``shell``/``console`` block would escape these checks and fails.
Relative links between the documents must resolve.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
SAMPLE = "data/sample.tsv"
MODEL = "models/bert"
SHELL_TAGS = ("bash", "shell", "console", "zsh")
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECT = re.compile(r"(?<!\S)\d*(?:>>?|<)(?:&\d+|\s*[^\s;&|]+)")


# ------------------------------------------------------------------------------------ reading the docs

@dataclass
class Command:
    doc: Path
    line: int          # line of the command's first line in the document
    block: int         # line of the block's opening fence: commands of one block share a directory
    env: list[str]     # leading VAR=value assignments
    argv: list[str]

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def text(self) -> str:
        return shlex.join(self.env + self.argv)


def fenced_blocks(path: Path) -> list[tuple[str, int, list[tuple[int, str]]]]:
    """(info string, line of the opening fence, [(line number, text)]) for every fenced block."""
    blocks, current = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"^\s*(```+)\s*([^`\s]*)", line)
        if current is None and m:
            current = (m.group(1), m.group(2).lower(), n, [])
        elif current is not None and line.strip().startswith(current[0]) and not line.strip().strip("`"):
            blocks.append(current[1:])
            current = None
        elif current is not None:
            current[3].append((n, line))
    assert current is None, f"{path.name}:{current[2]}: unclosed code fence"
    return blocks


def split_commands(doc: Path, fence: int, lines: list[tuple[int, str]]) -> list[Command]:
    """Shell lines -> commands: continuations joined, comments dropped, split on ; && || | &."""
    out: list[Command] = []
    pending, start = "", None
    for n, text in lines:
        start = start or n
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        logical, pending = pending + text, ""
        logical = REDIRECT.sub(" ", logical)  # 2>&1, > out.log, < in.tsv: not the command's arguments
        lex = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        cur: list[str] = []
        for w in list(lex) + [";"]:
            if w in OPERATORS:
                env = []
                while cur and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cur[0]):
                    env.append(cur.pop(0))
                if cur:
                    out.append(Command(doc, start, fence, env, cur))
                cur = []
            else:
                cur.append(w)
        start = None
    return out


def all_commands() -> list[Command]:
    return [c for doc in DOCS for info, fence, lines in fenced_blocks(doc) if info == "sh"
            for c in split_commands(doc, fence, lines)]


# --------------------------------------------------------------------------------- the project's CLIs

def _mlm_score(argv):
    from mlm_scorer.cli import main

    return main(argv)


def _mlm_export(argv):
    from mlm_export.cli import main

    return main(argv)


def _to_tensorrt(argv):
    from mlm_export.to_tensorrt import main

    return main(argv)


def _script(path: Path):
    def run(argv):
        with mock.patch.object(sys, "argv", [str(path), *argv]), \
                mock.patch.object(sys, "path", [str(path.parent), *sys.path]):
            runpy.run_path(str(path), run_name="__main__")
    return run


def subcommands() -> set[str]:
    from mlm_scorer.cli import SUBCOMMANDS

    return set(SUBCOMMANDS)


def entry_point(cmd: Command):
    """(name shown in messages, entry(argv), argv for it) for a command of this project, else None."""
    argv = cmd.argv
    prog = Path(argv[0]).name
    if prog in ("mlm-score", "mlm-export"):
        rest = argv[1:]
    elif prog.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        prog, rest = argv[2], argv[3:]
    elif prog.startswith("python") and len(argv) > 1 and argv[1].startswith("scripts/") and argv[1].endswith(".py"):
        script = ROOT / argv[1]
        assert script.is_file(), f"{cmd.where}: {argv[1]} does not exist"
        return argv[1], _script(script), argv[2:]
    else:
        return None
    if prog in ("mlm-score", "mlm_scorer"):
        if rest and rest[0] in subcommands():
            return f"mlm-score {rest[0]}", (lambda a, sub=rest[0]: _mlm_score([sub, *a])), rest[1:]
        return "mlm-score", _mlm_score, rest
    if prog in ("mlm-export", "mlm_export.cli"):
        return "mlm-export", _mlm_export, rest
    if prog == "mlm_export.to_tensorrt":
        return "python -m mlm_export.to_tensorrt", _to_tensorrt, rest
    return None


class _Parsed(Exception):
    """Raised in place of running a command, with the namespace argparse made of its arguments."""


def parse_only(entry, argv) -> argparse.Namespace:
    """Run ``entry(argv)`` up to its argparse call; return the namespace (SystemExit on a parse error)."""
    original = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parsed), contextlib.redirect_stderr(err):
        try:
            entry(list(argv))
        except _Parsed as p:
            return p.args[0]
        except SystemExit as exc:
            raise AssertionError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip()
                                 else f"exit {exc.code}") from None
    raise AssertionError("the command never parsed its arguments")


_HELP: dict[str, frozenset[str]] = {}


def help_options(name: str, entry) -> frozenset[str]:
    """The options ``name --help`` lists, e.g. {"-o", "--output", "--model", ...} (computed once per name)."""
    if name not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            entry(["--help"])
        _HELP[name] = frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out.getvalue()))
    return _HELP[name]


def used_options(argv: list[str]) -> list[str]:
    opts = []
    for a in argv:
        if a == "--":
            break
        if re.match(r"--?[A-Za-z]", a):
            opts.append(a.split("=", 1)[0])
    return opts


COMMANDS = all_commands()
OURS = [c for c in COMMANDS if entry_point(c) is not None]


def test_documents_tag_shell_blocks_sh():
    wrong = [f"{doc.relative_to(ROOT)}:{fence}: ```{info}" for doc in DOCS
             for info, fence, _ in fenced_blocks(doc) if info in SHELL_TAGS]
    assert not wrong, f"shell blocks must be tagged sh so this test reads them: {wrong}"


def test_documents_have_commands():
    """Guard against a parser that silently finds nothing (the other tests would then pass vacuously)."""
    names = {entry_point(c)[0] for c in OURS}
    assert {"mlm-score", "mlm-export", "mlm-score report"} <= names, names
    assert sum(1 for c in OURS if c.doc.name == "README.md") >= 4


@pytest.mark.parametrize("cmd", OURS, ids=[c.where for c in OURS])
def test_options_exist_and_the_command_parses(cmd: Command):
    name, entry, argv = entry_point(cmd)
    known = help_options(name, entry)
    unknown = [o for o in used_options(argv) if o not in known]
    assert not unknown, f"{cmd.where}: `{name} --help` lists no {', '.join(unknown)} (in: {cmd.text})"
    try:
        parse_only(entry, argv)
    except AssertionError as exc:
        pytest.fail(f"{cmd.where}: `{cmd.text}` does not parse: {exc}")


# ------------------------------------------------------------------------------ running sample commands

#: mlm-score subcommand -> (namespace attributes holding its inputs, does it need a model)
INPUTS = {None: (("input",), True), "report": (("result",), False), "ray": (("inputs",), True)}


def _sentences_path(words: str) -> str:
    return words[: -len(".parquet")] + ".sentences.parquet" if words.endswith(".parquet") else words + ".sentences.parquet"


def plan_block(cmds: list[Command]) -> list[tuple[Command, list[str]]]:
    """The commands of one block that run on the sample data alone, each with the outputs it must write."""
    written: set[str] = set()
    plan = []
    for cmd in cmds:
        ep = entry_point(cmd)
        if ep is None or not ep[0].startswith("mlm-score"):
            continue
        name, entry, argv = ep
        sub = name.split(" ", 1)[1] if " " in name else None
        if sub not in INPUTS:
            continue
        attrs, needs_model = INPUTS[sub]
        try:
            ns = parse_only(entry, argv)
        except AssertionError:
            continue  # test_options_exist_and_the_command_parses reports it
        inputs = []
        for a in attrs:
            v = getattr(ns, a)
            inputs += v if isinstance(v, list) else [v]
        if not inputs or any(os.path.normpath(p) not in written | {SAMPLE} for p in inputs):
            continue  # reads something other than the sample data
        if getattr(ns, "server", None) or getattr(ns, "engine", None) == "tensorrt" or \
                str(getattr(ns, "device", None) or "cpu").startswith("cuda"):
            continue  # needs a server, TensorRT or a GPU
        if needs_model and ns.model != MODEL:
            pytest.fail(f"{cmd.where}: `{cmd.text}` reads the sample data with model {ns.model or 'bert-base-uncased'}"
                        f" (needs the hub); write --model {MODEL} so that this test runs it")
        outs = [ns.output] + ([_sentences_path(ns.output)] if sub is None else [])
        outs += [x for x in (getattr(ns, "summary_json", None),) if x]
        written |= {os.path.normpath(o) for o in outs}
        plan.append((cmd, outs))
    return plan


def runnable_blocks() -> list[list[Command]]:
    blocks: dict[tuple[Path, int], list[Command]] = {}
    for c in OURS:
        blocks.setdefault((c.doc, c.block), []).append(c)
    return list(blocks.values())


BLOCKS = [b for b in runnable_blocks() if any(Path(c.argv[0]).name == "mlm-score" and SAMPLE in c.argv for c in b)]


def test_sample_commands_exist():
    assert len(BLOCKS) >= 3, "expected runnable sample-data examples in the documents"


def block_id(block: list[Command]) -> str:
    return f"{block[0].doc.relative_to(ROOT)}:{block[0].block}"


@pytest.fixture(scope="module")
def sample_runs(tiny_hf, tmp_path_factory) -> dict[str, list[dict]]:
    """Run every block's sample-data commands; block id -> [{cmd, outs, cwd, rc, output} or {cmd, skipped}].

    Each block gets its own directory (``data/sample.tsv`` and a copy of a tiny random export at
    ``models/bert``, with its ONNX fp32 and int8 files). All commands run in ONE child process, one after
    the other, through ``mlm-score``'s own entry point (``mlm_scorer.cli.main``) with the documented
    argv: TensorFlow and torch are imported once, not once per command, and nothing process-wide (thread
    pools, malloc settings, Ray) leaks into this test process.
    """
    from mlm_export import export, load_checkpoint
    from mlm_export.to_onnx import write_onnx

    model = tmp_path_factory.mktemp("docs_model") / "bert"
    vdir = export(tiny_hf, model, top_k=5, log=lambda m: None)
    write_onnx(vdir, load_checkpoint(tiny_hf), quantize="int8", log=lambda m: None)
    from mlm_scorer.engines.torch_engine import cpu_has_bf16

    runs: dict[str, list[dict]] = {}
    jobs = []
    for block in BLOCKS:
        cwd = tmp_path_factory.mktemp("docs_block")
        (cwd / "data").mkdir()
        shutil.copyfile(ROOT / SAMPLE, cwd / SAMPLE)
        shutil.copytree(model, cwd / MODEL)
        runs[block_id(block)] = entries = []
        for cmd, outs in plan_block(block):
            if "bf16" in cmd.argv and not cpu_has_bf16():
                entries.append({"cmd": cmd, "skipped": "bf16 needs a CPU with AVX512-BF16 or AMX"})
                continue
            name, _, rest = entry_point(cmd)
            argv = [name.split(" ", 1)[1], *rest] if " " in name else rest
            env = dict(e.split("=", 1) for e in cmd.env)
            env.setdefault("MLM_SCORER_CACHE", str(cwd / "cache"))
            entries.append({"cmd": cmd, "outs": outs, "cwd": cwd})
            jobs.append({"cwd": str(cwd), "argv": argv, "env": env})
    plan = tmp_path_factory.mktemp("docs_plan") / "plan.json"
    plan.write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = subprocess.run([sys.executable, __file__, str(plan)], env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, f"the runner failed:\n{r.stderr[-3000:]}"
    results = iter(json.loads(plan.with_suffix(".out.json").read_text()))
    for entries in runs.values():
        for e in entries:
            if "skipped" not in e:
                e.update(next(results))
    return runs


def _run_jobs(plan: Path) -> None:
    """The child process of ``sample_runs``: ``mlm-score`` for every job, in its directory and environment."""
    from mlm_scorer.cli import main

    results = []
    for job in json.loads(plan.read_text()):
        os.chdir(job["cwd"])
        saved = {k: os.environ.get(k) for k in job["env"]}
        os.environ.update(job["env"])
        out = io.StringIO()
        try:
            with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
                rc = main(job["argv"])
        except SystemExit as exc:
            rc = exc.code
        except BaseException as exc:  # noqa: BLE001 - reported, with the others, to the test
            rc = f"{type(exc).__name__}: {exc}"
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        results.append({"rc": rc, "output": out.getvalue()[-3000:]})
    plan.with_suffix(".out.json").write_text(json.dumps(results))


@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(b) for b in BLOCKS])
def test_sample_commands_run_as_written(block: list[Command], sample_runs):
    entries = sample_runs[block_id(block)]
    assert entries, "a block that names the sample data has no command this test can run"
    skipped = []
    for e in entries:
        cmd = e["cmd"]
        if "skipped" in e:
            skipped.append(f"{cmd.where}: {e['skipped']}")
            continue
        assert e["rc"] == 0, f"{cmd.where}: `{cmd.text}` exited {e['rc']}:\n{e['output']}"
        missing = [o for o in e["outs"] if not (e["cwd"] / o).exists()]
        assert not missing, f"{cmd.where}: `{cmd.text}` did not write {missing}"
    if skipped:
        pytest.skip("; ".join(skipped))


# --------------------------------------------------------------------------------------------- links

def anchors(doc: Path) -> set[str]:
    """GitHub's anchors for a document's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_links_resolve():
    """Every relative link between the documents names a file that exists, and a heading in it."""
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, f"links to nothing: {broken}"


def test_every_page_is_in_the_indexes():
    """docs/README.md and the README's documentation list link every page of docs/."""
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    for index, prefix in ((ROOT / "docs" / "README.md", ""), (ROOT / "README.md", "docs/")):
        text = index.read_text(encoding="utf-8")
        linked = set(re.findall(r"\]\(" + re.escape(prefix) + r"([\w.-]+\.md)(?:#[^)]*)?\)", text))
        missing = sorted(pages - linked)
        assert not missing, f"{index.relative_to(ROOT)} does not link {missing}"


if __name__ == "__main__":  # the child process of the sample_runs fixture
    _run_jobs(Path(sys.argv[1]))
