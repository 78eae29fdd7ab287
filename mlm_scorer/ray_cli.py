"""``mlm-score ray``: score TSV/Parquet files with a Ray Data actor pool (see ``mlm_scorer.ray_data``).

    mlm-score ray a.tsv b.tsv -o out/ --model models/bert       # actors and CPUs chosen from the cluster
    mlm-score ray a.tsv b.tsv -o out/ --model models/bert --num-actors 4 --cpus-per-actor 2
    mlm-score ray part-*.parquet -o out/ --text-column sentence --address auto --gpus-per-actor 1

Install: pip install 'mlm-scorer[ray]' (Ray Data). Without --num-actors and --cpus-per-actor, every
node's CPUs are shared equally among actors of up to 4 CPUs (one model each); with --num-actors alone,
the CPUs are shared among that many; with --cpus-per-actor alone, as many actors as the nodes hold.
Each actor reads, scores and writes its own batches, so memory does not grow with the dataset. While
the actors start (loading the model can take minutes), a line every 10 s says what they are doing.
Ray's own log lines stay off stderr unless -v.

Writes out/words/ and out/sentences/ (Parquet datasets: a "file" column, then the single-machine
schemas), out/summary.json and out/_mlm_score_ray.json (the run's identity). An existing out/ is
replaced only if mlm-score ray wrote it and it holds nothing else; one run at a time per output (a
second is refused while the first holds the lock). The actors check that each input is still what the
run planned (size, mtime, the hash of every batch) before they score it. Exit codes as mlm-score:
2 bad usage, 3 bad input row, 4 model, 5 engine, 130 interrupted, 143 terminated (SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .logs import add_output_flags
    from .reader import MAX_ROW_CHARS

    doc = __doc__.replace("``", "")  # the docstring's reST literals, as plain text for --help
    ap = argparse.ArgumentParser(prog="mlm-score ray", description=doc.split("\n\n")[0],
                                 epilog="\n\n".join(doc.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="TSV (header line unless --no-header) or Parquet "
                                                               "(.parquet) files, all with the same columns")
    ap.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                    help="output directory (words/, sentences/, summary.json); replaced as a whole at the end, "
                         "if mlm-score ray wrote it")
    m = ap.add_argument_group("model and engine")
    m.add_argument("--model", default=None, help="export directory (mlm-export) or checkpoint (default "
                                                 "bert-base-uncased); every node must see the path")
    m.add_argument("--model-version", type=int, default=None)
    m.add_argument("--engine", default="saved_model", help="saved_model (default), onnx, torch, ...")
    m.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option (repeatable), e.g. intra_op_threads=4")
    m.add_argument("--cache-dir", help="where checkpoints are exported to")
    s = ap.add_argument_group("scoring")
    s.add_argument("--mode", default="whole-word", choices=["whole-word", "word-l2r", "token"])
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per batch (default: the engine's preference, else 8192)")
    s.add_argument("--max-batch-size", type=int, default=None)
    i = ap.add_argument_group("input")
    i.add_argument("--text-column")
    i.add_argument("--id-column")
    i.add_argument("--no-header", action="store_true", help="TSV inputs have no header line")
    i.add_argument("--on-bad-row", choices=["fail", "skip"], default="fail")
    i.add_argument("--max-row-chars", type=int, default=MAX_ROW_CHARS, metavar="N",
                   help=f"longer rows are bad rows (row_too_long), as mlm-score (default {MAX_ROW_CHARS})")
    q = ap.add_argument_group("data quality")
    q.add_argument("--flag-below", action="append", default=[], metavar="METRIC=VALUE")
    q.add_argument("--flag-above", action="append", default=[], metavar="METRIC=VALUE",
                   help="as mlm-score: a number or a percentile pNN of the run (of --baseline when given)")
    q.add_argument("--baseline", metavar="RESULT", help="take pNN thresholds from this earlier result")
    r = ap.add_argument_group("ray")
    r.add_argument("--num-actors", type=int, default=None,
                   help="actors in the pool, each holding one model (default: from the cluster, see above)")
    r.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs reserved per actor; its engine runs that many threads (default: from the cluster)")
    r.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")
    r.add_argument("--batch-rows", type=int, default=512,
                   help="rows an actor scores and writes (one part file per output) at a time (default 512)")
    r.add_argument("--address", help="Ray cluster address ('auto' for the running cluster); default: start a local Ray")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started when no --address is given")
    o = ap.add_argument_group("output")
    add_output_flags(o, others="Ray's and TensorFlow's")
    o.add_argument("--summary-json", help="also write the summary to this path")
    return ap


def check_summary_target(path: str | os.PathLike, inputs: list[str], output: str | os.PathLike,
                         baseline: str | os.PathLike | None = None) -> Path:
    """Refuse (UsageError), before the run, a --summary-json that is not absent or a regular file in an existing
    directory (``fsutil.check_target``), that is one of the inputs or the baseline's files, or that is the
    output directory or lies in it or in the runner's workspace beside it (replaced or deleted by the run)."""
    from .errors import UsageError
    from .fsutil import check_target
    from .ray_data import workspace_path
    from .report import check_report_target

    what = "the --summary-json file"
    out = Path(output)
    real = os.path.realpath(path)
    for d, d_what in ((out, "the output directory"), (workspace_path(out), "the runner's workspace")):
        if real == os.path.realpath(d) or real.startswith(os.path.realpath(d) + os.sep):
            raise UsageError(f"{what} {str(path)!r} {'is' if real == os.path.realpath(d) else 'lies inside'} {d_what} "
                             f"{str(d)!r}, which this run replaces or deletes; choose a path outside it")
    if baseline is not None:
        check_report_target(path, what, None, baseline)
    return check_target(path, what, inputs=[(p, "an input") for p in inputs])


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from .cli import flag_rules, internal_error, parse_engine_options, sigterm_as_interrupt

    opts = parse_engine_options(args.engine_option, ap)
    for flag in ("num_actors", "batch_rows", "batch_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    if args.top_k < 0:
        ap.error("--top-k must be >= 0")
    if args.max_row_chars < 1:
        ap.error("--max-row-chars must be positive")

    from .errors import Interrupted, MlmScorerError
    from .logs import configure_cli, log
    from .models import DEFAULT_MODEL

    configure_cli("mlm-score ray", quiet=args.quiet, verbose=args.verbose)
    init = {"num_cpus": args.num_cpus} if args.num_cpus and not args.address else {}
    try:
        if args.summary_json:  # before the run: a file it may not write is refused now, not after hours
            check_summary_target(args.summary_json, args.inputs, args.output, args.baseline)
        with sigterm_as_interrupt():  # Airflow, Kubernetes, `timeout`: stop as Ctrl-C does
            from .ray_data import score_dataset

            rules = flag_rules(args)
            summary = score_dataset(
                args.inputs, args.output, model=args.model or DEFAULT_MODEL, model_version=args.model_version,
                engine=args.engine, engine_options=opts, mode=args.mode, text_column=args.text_column,
                id_column=args.id_column, header=not args.no_header, on_bad_row=args.on_bad_row, top_k=args.top_k,
                flag_rules=rules, num_actors=args.num_actors, num_cpus_per_actor=args.cpus_per_actor,
                num_gpus_per_actor=args.gpus_per_actor, batch_rows=args.batch_rows, batch_tokens=args.batch_tokens,
                max_batch_size=args.max_batch_size, cache_dir=args.cache_dir, ray_address=args.address,
                ray_init_options=init, progress=args.progress, baseline=args.baseline,
                max_row_chars=args.max_row_chars, log=log.info)
    except ImportError as exc:
        log.error(f"{exc.name or exc} is not installed: pip install 'mlm-scorer[ray]'")
        return 2
    except MlmScorerError as exc:
        log.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (sigterm_as_interrupt)
        what = "terminated (SIGTERM)" if isinstance(exc, Interrupted) else "interrupted"
        log.error(f"{what}; the output directory was left as it was (nothing partial is published: run again)",
                  extra={"bare": True})
        return exc.exit_code if isinstance(exc, Interrupted) else 130
    except OSError as exc:
        log.error(str(exc))
        return 1
    except Exception as exc:  # a bug: as mlm-score, no traceback unless MLM_SCORER_DEBUG=1
        return internal_error(exc)
    if args.summary_json:
        from .fsutil import atomic_write_bytes

        try:
            atomic_write_bytes(args.summary_json, (json.dumps(summary, indent=2) + "\n").encode(),
                               what="the --summary-json file")
        except (OSError, MlmScorerError) as exc:
            log.error(f"--summary-json {args.summary_json}: {getattr(exc, 'strerror', None) or exc} (the output "
                      f"{args.output} is complete)")
            return exc.exit_code if isinstance(exc, MlmScorerError) else 1
    log.info(f"scored {summary['scored']}/{summary['rows']} rows ({summary['words']} words, {summary['copies']} "
             f"copies) with {summary['actors']} actor(s) on {summary['nodes']} node(s) in {summary['seconds']:.1f}s; "
             f"skipped {summary['skipped']}" + (f", flagged {summary['flagged']}" if summary["flagged"] else "")
             + f" -> {summary['words_output']}, {summary['sentences_output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
