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

The scoring flags are mlm-score's (the same settings, the same defaults); --resume, --limit, --chunk-rows
and --cache do not apply here and are refused, with the reason.

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

    doc = __doc__.replace("``", "")  # the docstring's reST literals, as plain text for --help
    ap = argparse.ArgumentParser(prog="mlm-score ray", description=doc.split("\n\n")[0],
                                 epilog="\n\n".join(doc.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="TSV (header line unless --no-header) or Parquet "
                                                               "(.parquet) files, all with the same columns")
    ap.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                    help="output directory (words/, sentences/, summary.json); replaced as a whole at the end, "
                         "if mlm-score ray wrote it")
    from .cli import add_score_arguments

    add_score_arguments(ap)  # the settings, as mlm-score's (those that do not apply here are refused, with why)
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
    from .cli import internal_error, read_settings, sigterm_as_interrupt

    for flag in ("num_actors", "batch_rows"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be positive")

    from .errors import Interrupted, MlmScorerError
    from .logs import configure_cli, log

    configure_cli("mlm-score ray", quiet=args.quiet, verbose=args.verbose)
    init = {"num_cpus": args.num_cpus} if args.num_cpus and not args.address else {}
    try:
        settings = read_settings(args, ap)
        if args.summary_json:  # before the run: a file it may not write is refused now, not after hours
            check_summary_target(args.summary_json, args.inputs, args.output, settings.baseline)
        with sigterm_as_interrupt():  # Airflow, Kubernetes, `timeout`: stop as Ctrl-C does
            from .ray_data import score_dataset

            summary = score_dataset(
                args.inputs, args.output, settings, num_actors=args.num_actors,
                num_cpus_per_actor=args.cpus_per_actor, num_gpus_per_actor=args.gpus_per_actor,
                batch_rows=args.batch_rows, ray_address=args.address, ray_init_options=init, log=log.info)
    except ImportError as exc:
        log.error(f"{exc.name or exc} is not installed: pip install 'mlm-scorer[ray]'")
        return 2
    except MlmScorerError as exc:
        log.error(getattr(exc, "cli", None) or str(exc))  # a SettingError in the flags' terms
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
