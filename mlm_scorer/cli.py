"""mlm-score: word probabilities and pseudo-log-likelihoods for every sentence of a TSV, as Parquet.

A thin layer over ``mlm_scorer.score_file``: flags become arguments, errors become exit codes
(2 usage, 3 bad input, 4 model, 5 engine, 130 interrupted, 143 terminated). SIGTERM is handled like
Ctrl-C. No heavy import happens before a run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys

EPILOG = """examples:
  mlm-score input.tsv -o probs.parquet                      # default model bert-base-uncased (downloaded once)
  mlm-score input.tsv -o probs.parquet --model models/bert  # an export made by mlm-export
  mlm-score input.tsv -o probs.parquet --model ./my-hf-bert # a local checkpoint, exported once into the cache
  mlm-score sents.txt --no-header -o probs.parquet --mode token
  mlm-score input.parquet -o probs.parquet --text-column sentence --id-column id
  mlm-score input.tsv -o probs.parquet --text-column sentence --id-column id --on-bad-row skip --top-k 5
  mlm-score input.tsv -o probs.parquet --server http://localhost:8501 --model-name bert --model models/bert
  mlm-score input.tsv -o probs.parquet --server grpc://localhost:8001 --model-name bert --model models/bert  # Triton

subcommands:
  mlm-score report probs.parquet -o report.html   # a self-contained HTML data-quality report
  mlm-score check probs.parquet --baseline ref.parquet   # a quality gate: exit 0 pass, 1 fail
  mlm-score ray in1.tsv in2.parquet -o outdir/    # score with Ray Data (see mlm-score ray --help)

outputs: probs.parquet (one row per word) and probs.sentences.parquet (one row per input row), written
atomically at the end. Modes and formulas: docs/scoring.md; schemas: docs/input-output.md.

exit codes: 0 ok, 1 other error (disk full, ...), 2 bad usage, 3 bad input row, 4 model problem, 5 engine
failure, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); both keep committed chunks for --resume
"""


#: Flags named after an engine option (a shortcut for ``--engine-option NAME=VALUE``): each is declared by
#: an engine (``OPTIONS``); ``tests/test_settings.py`` checks it.
ENGINE_OPTION_FLAGS = ("model_name", "concurrency", "timeout", "retry_budget", "engine_file", "precision", "device")


def add_score_arguments(ap: argparse.ArgumentParser) -> None:
    """The run's settings as flags (``mlm-score`` and ``mlm-score ray``): each flag's ``dest`` is the name of a
    ``ScoreSettings`` field (``--no-header`` sets ``header``, ``--cache`` ``score_cache``) or an engine option
    (``ENGINE_OPTION_FLAGS``); ``ScoreSettings.from_cli_args`` reads them back. Defaults are the settings'
    (None: the field's default)."""
    from .reader import MAX_ROW_CHARS

    m = ap.add_argument_group("model and engine")
    m.add_argument("--model", default=None,
                   help="export directory (mlm-export), or a checkpoint: Hugging Face dir, TF-1 dir or hub id, "
                        "exported once into the cache (default: bert-base-uncased)")
    m.add_argument("--model-version", type=int, default=None, help="version subdirectory (default: the highest)")
    m.add_argument("--engine", default=None,
                   help="auto (default: ONNX Runtime on the export's model.onnx, else the SavedModel; --precision "
                        "int8 runs onnx, bf16 torch), saved_model, onnx, torch, tensorrt; with --server: rest, grpc "
                        "(TF Serving), kserve_http, kserve_grpc (Triton), picked from the URL and the protocol")
    m.add_argument("--server", help="server URL: http(s)://host:port (REST) or grpc(s)://host:port (gRPC) of TF "
                                    "Serving (8501/8500) or Triton / another KServe v2 server (8000/8001)")
    m.add_argument("--protocol", choices=["auto", "kserve", "tfserving"], default=None,
                   help="what --server speaks: auto (default: ask the server), kserve (KServe v2: Triton), "
                        "tfserving")
    m.add_argument("--model-name", help="model name on the server (TF Serving's --model_name, Triton's model)")
    m.add_argument("--concurrency", type=int, help="requests in flight to a server")
    m.add_argument("--timeout", type=float, help="seconds per request to a server")
    m.add_argument("--retry-budget", type=float, help="seconds to keep retrying a failing request")
    m.add_argument("--engine-file", help="TensorRT engine (plan) file")
    m.add_argument("--precision", help="fp32 (default), bf16, fp16, int8 where the engine supports it")
    m.add_argument("--device", help="cpu or cuda (torch engine)")
    m.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other engine option (repeatable), e.g. threads=4; each engine declares its own "
                        "(docs/engines.md)")
    m.add_argument("--cache-dir", help="where checkpoints are exported to (default $MLM_SCORER_CACHE or "
                                       "~/.cache/mlm-scorer)")
    s = ap.add_argument_group("scoring")
    s.add_argument("--mode", default="whole-word", choices=["whole-word", "word-l2r", "token"],
                   help="whole-word (default): mask each word whole; word-l2r: Kauf & Ivanova 2023; "
                        "token: Salazar et al. 2020")
    s.add_argument("--top-k", type=int, default=0, help="also write the K most likely tokens at each word's "
                                                        "first piece (K <= the export's k)")
    s.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per batch (default: the engine's preference: 1024 for onnx on CPU, "
                        "else 8192)")
    s.add_argument("--max-batch-size", type=int, default=None, help="copies per batch at most (default 256)")
    s.add_argument("--chunk-rows", type=int, default=2048, help="rows read and prepared at a time (default 2048)")
    s.add_argument("--cache", metavar="DIR", dest="score_cache",
                   help="persistent score cache: sentences scored before with the same model and mode are read "
                        "from DIR, not scored again (safe for concurrent runs)")
    s.add_argument("--dedupe-cache", type=int, default=20_000,
                   help="recent distinct sentences remembered to score duplicates once (default 20000; bounds memory)")
    i = ap.add_argument_group("input")
    i.add_argument("--text-column", help="column with the text, by name or 0-based index (default: 'text', or "
                                         "the only column; with --no-header the whole line)")
    i.add_argument("--id-column", help="column with a row id, by name or 0-based index")
    i.add_argument("--no-header", action="store_false", dest="header",
                   help="the first line is data (one sentence per line)")
    i.add_argument("--on-bad-row", choices=["fail", "skip"], default="fail",
                   help="fail (default): stop at the first bad row, naming file and line; skip: record it with "
                        "status 'skipped' and go on")
    i.add_argument("--limit", type=int, help="score only the first N rows (quick trials)")
    i.add_argument("--max-row-chars", type=int, default=MAX_ROW_CHARS, metavar="N",
                   help=f"longest row in characters (default {MAX_ROW_CHARS}); a longer one is a bad row (row_too_long), "
                        "decided before it is tokenized")
    i.add_argument("--resume", action="store_true",
                   help="continue an interrupted run after its last committed chunk (refused if the input or "
                        "the settings changed); without it a rerun starts over and replaces the output")
    q = ap.add_argument_group("data quality")
    q.add_argument("--flag-below", action="append", default=[], metavar="METRIC=VALUE",
                   help="flag sentences whose METRIC is below VALUE: min_word_prob, min_word_log_prob, "
                        "mean_word_log_prob, pll (repeatable; adds the flag and flag_reason columns). VALUE is "
                        "a number or a percentile pNN: p1 is the run's 1st percentile (or the baseline's)")
    q.add_argument("--flag-above", action="append", default=[], metavar="METRIC=VALUE",
                   help="flag sentences whose METRIC is above VALUE: pseudo_perplexity (e.g. =2000, or =p99), "
                        "unknown_words (words the vocabulary does not know; =0 flags any)")
    q.add_argument("--baseline", metavar="RESULT",
                   help="take pNN thresholds from this earlier result (probs.parquet or a mlm-score ray "
                        "directory, scored with the same model and mode) instead of this run")


def build_parser() -> argparse.ArgumentParser:
    from .logs import add_output_flags

    ap = argparse.ArgumentParser(prog="mlm-score", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="TSV file (UTF-8, tab-separated, header line unless --no-header; '-' for stdin), "
                                  "or a Parquet file (.parquet: --text-column/--id-column by name, the other "
                                  "columns passed through)")
    ap.add_argument("-o", "--output", required=True, help="output Parquet path for word rows; sentence rows go "
                                                          "next to it as STEM.sentences.parquet")
    add_score_arguments(ap)
    o = ap.add_argument_group("output")
    add_output_flags(o)
    o.add_argument("--summary-json", help="also write the run summary as JSON to this path")
    return ap


def parse_engine_options(items: list[str], ap: argparse.ArgumentParser | None = None) -> dict:
    """``--engine-option KEY=VALUE`` items -> {key: "value"} (engines coerce the types). A malformed item is
    ``ap.error`` where a parser is given, else a SettingError."""
    from .errors import SettingError

    opts: dict = {}
    for item in items:
        if "=" not in item:
            msg = f"--engine-option expects KEY=VALUE, got {item!r}"
            if ap is not None:
                ap.error(msg)
            raise SettingError(msg, option="engine_options")
        k, v = item.split("=", 1)
        opts[k.strip().replace("-", "_")] = v
    return opts


def read_settings(args, ap: argparse.ArgumentParser):
    """``ScoreSettings.from_cli_args(args)``; a value out of range or flags that cannot go together end the
    command as argparse does (usage, exit 2). Other refusals (an unknown engine, a flag rule) are raised."""
    from .errors import SettingError
    from .settings import ScoreSettings

    try:
        return ScoreSettings.from_cli_args(args)
    except SettingError as exc:
        ap.error(exc.cli)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM (what Airflow, Kubernetes and ``timeout`` send) raises ``Interrupted``
    in the main thread, as Ctrl-C raises KeyboardInterrupt: the run stops the same way, keeps what is
    committed and says so. Off the main thread (where handlers cannot be set) nothing changes."""
    from .errors import Interrupted

    received = []

    def handler(signum, frame):
        if received:  # again while stopping: the first one is being handled; say so, do not start over
            os.write(2, b"mlm-score: already stopping (SIGTERM received again); committed chunks are kept\n")
            return
        received.append(signum)
        raise Interrupted("terminated (SIGTERM)", signum=signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def committed_rows(output: str) -> str:
    """What an interrupted run on ``output`` left for --resume, read from its parts directory."""
    try:
        with open(f"{output}.parts/progress.json", encoding="utf-8") as f:
            n = sum(int(part["rows"]) for part in json.load(f)["parts"])
    except (OSError, ValueError, KeyError, TypeError):
        n = 0
    if not n:
        return "no rows were committed"
    return f"{n} rows are committed in {output}.parts; rerun with --resume (same command and input) to continue " \
           f"after them"


def internal_error(exc: Exception) -> int:
    """A bug: say so plainly, without a traceback (re-raised with MLM_SCORER_DEBUG=1); exit code 1."""
    from .logs import log

    if os.environ.get("MLM_SCORER_DEBUG"):
        raise exc
    kept = getattr(exc, "mlm_committed", None)
    log.critical(f"internal error: {type(exc).__name__}: {exc} (set MLM_SCORER_DEBUG=1 for the traceback, "
                 f"and please report it)" + (f" [{kept}]" if kept else ""), extra={"bare": True})
    return 1


SUBCOMMANDS = {
    "report": "mlm_scorer.report",  # mlm-score report RESULT.parquet -o report.html
    "ray": "mlm_scorer.ray_cli",  # mlm-score ray INPUT... -o OUTDIR (Ray Data, past one machine)
    "check": "mlm_scorer.check",  # mlm-score check RESULT [--baseline B]: a quality gate (exit 0/1)
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)

    from .errors import Interrupted, MlmScorerError
    from .fsutil import check_target
    from .logs import configure_cli, log
    from .pipeline import score_file
    from .writer import check_output_path

    configure_cli("mlm-score", quiet=args.quiet, verbose=args.verbose)
    try:
        settings = read_settings(args, ap)
        if args.model is None and settings.server:
            ap.error("a server engine needs --model pointing at a local copy of the export (for its tokenizer)")
        if args.summary_json:
            check_target(args.summary_json, "the --summary-json file")
            check_output_path(args.output, args.input, also=[(args.summary_json, "the --summary-json file")])
        with sigterm_as_interrupt():
            summary = score_file(args.input, args.output, settings, log=log.info)
    except MlmScorerError as exc:
        log.error(getattr(exc, "cli", None) or str(exc))  # a SettingError in the flags' terms
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (sigterm_as_interrupt)
        if isinstance(exc, Interrupted) and exc.explained:  # the pipeline says what is committed
            log.error(str(exc), extra={"bare": True})
            return exc.exit_code
        what = "terminated (SIGTERM)" if isinstance(exc, Interrupted) else "interrupted"
        log.error(f"{what} while starting or closing; {committed_rows(args.output)}", extra={"bare": True})
        return exc.exit_code if isinstance(exc, Interrupted) else 130
    except OSError as exc:  # disk full, permission denied while writing...
        log.error(str(exc))
        return 1
    except Exception as exc:  # a bug: say so plainly; the traceback on request
        return internal_error(exc)
    log.info(summary.line())
    if args.summary_json:
        from .fsutil import atomic_write_bytes

        try:
            atomic_write_bytes(args.summary_json, (json.dumps(summary.to_dict(), indent=2) + "\n").encode(),
                               what="the --summary-json file")
        except (OSError, MlmScorerError) as exc:
            log.error(f"the outputs are written ({summary.output}, {summary.sentences_output}), but the summary "
                      f"could not be written to {args.summary_json}: {exc}")
            return getattr(exc, "exit_code", 1) if isinstance(exc, MlmScorerError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
