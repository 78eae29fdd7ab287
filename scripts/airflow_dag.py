"""Example Apache Airflow 3 DAG: score a TSV with mlm-scorer and gate the batch on its quality, once with
the library (TaskFlow) and once with the CLI (BashOperator). Copy it into your DAGs folder and set the
params (or trigger with a conf).

    airflow dags test mlm_score_tsv 2024-01-01 -c '{"input": "/data/in.tsv", "output_dir": "/data/scores",
                                                    "model": "/models/bert", "baseline": "/data/ref.parquet"}'

Tasks:
  score       TaskFlow @task calling mlm_scorer.airflow.score_task (-> score_file) with the run's settings
              (the params, and any other ScoreSettings field through the "settings" param). Writes
              OUTPUT_DIR/lib/<run key>/probs.parquet + probs.sentences.parquet and returns a small summary
              (paths, counts, mean PLL, the settings that change the scores) as its XCom.
  check       the quality gate on the scored batch (mlm_scorer.airflow.check_task, i.e. mlm-score check):
              against the baseline result when the "baseline" param is set (an earlier batch you trust,
              scored with the same model and mode), else the result's own flags. Writes check.json next
              to the output; a batch that fails (more than max_flagged_rate of its rows flagged, or its
              scores shifted by more than max_shift) fails the task at once, without retries, and the run
              with it: publish does not run.
  score_cli   the same scoring with the mlm-score CLI in a BashOperator (OUTPUT_DIR/cli/<run key>/...); its
              XCom is the last line it prints: a one-line JSON summary.
  check_cli   `mlm-score check` on score_cli's output (exit 1 fails the task); its XCom is the verdict line.
  publish     reads the score and check tasks' XComs (what a downstream task would do: alert, load, report).

<run key> is the run's logical date in UTC to the microsecond (2024-01-01T000000.000000Z), or its run id,
escaped, when it has none (run-manual__...). Each output directory is claimed for its run (a
.mlm-score-run.json naming the DAG and the run): a retry of the run writes the same paths and replaces
its files atomically (never a mix of two attempts), while another run of the same date is refused
rather than allowed to overwrite them. A bad input row fails the task at once (no retries) with the
scorer's file:line message; set on_bad_row to "skip" to record such rows (status "skipped") and go on.
An attempt that finds the output locked by another attempt still running fails and is retried.

The model defaults to $MLM_SCORER_MODEL (an mlm-export directory, or a checkpoint id exported once into
the cache); the scoring runs in the worker's Python, so install mlm-scorer[tf] there.
"""
from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param, get_current_context, task

from mlm_scorer.airflow import run_key

_bin = os.path.join(os.path.dirname(sys.executable), "mlm-score")
MLM_SCORE = _bin if os.path.exists(_bin) else (shutil.which("mlm-score") or "mlm-score")
# Retries are for transient failures (a worker lost, a model server down); a bad row fails at once.
RETRIES = int(os.environ.get("MLM_SCORER_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("MLM_SCORER_RETRY_DELAY_S", "60")))

with DAG(
    dag_id="mlm_score_tsv",
    description="Score a TSV with a BERT masked LM (mlm-scorer): word and sentence Parquet",
    schedule=None,  # e.g. "@daily" with an input path per date
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["mlm-scorer", "example"],
    user_defined_macros={"mlm_run_key": run_key},
    params={
        "input": Param(os.environ.get("MLM_SCORER_INPUT", "data/sample.tsv"), type="string",
                       description="TSV file to score (UTF-8, header line)"),
        "output_dir": Param(os.environ.get("MLM_SCORER_OUTPUT_DIR", "/tmp/mlm-scores"), type="string"),
        "model": Param(os.environ.get("MLM_SCORER_MODEL", "bert-base-uncased"), type="string",
                       description="export directory (mlm-export) or checkpoint"),
        "mode": Param("whole-word", enum=["whole-word", "word-l2r", "token"]),
        "id_column": Param("", type="string", description="column with a row id ('' for none)"),
        "text_column": Param("", type="string", description="column with the text ('' for the default)"),
        "on_bad_row": Param("fail", enum=["fail", "skip"]),
        "flag_below": Param([], type="array", description="e.g. ['min_word_prob=0.001']"),
        "flag_above": Param([], type="array", description="e.g. ['pseudo_perplexity=500'] or ['pseudo_perplexity=p99']"),
        "baseline": Param(os.environ.get("MLM_SCORER_BASELINE", ""), type="string",
                          description="an earlier result to compare with (probs.parquet or a ray output directory); "
                                      "'' to check the batch's own flags only"),
        "max_flagged_rate": Param(0.05, type="number", minimum=0, maximum=1,
                                  description="fail the batch when more than this share of its rows is flagged"),
        "max_shift": Param(0.1, type="number", minimum=0, maximum=1,
                           description="fail the batch when its score distribution moved by more than this "
                                       "(two-sample KS statistic against the baseline, when significant)"),
        "cache": Param(os.environ.get("MLM_SCORER_CACHE_DIR", ""), type="string",
                       description="persistent score cache directory ('' for none): sentences scored before "
                                   "(by an earlier run, or by the other scoring task) are not scored again"),
        "settings": Param({}, type="object",
                          description="any other run settings for the score task (mlm_scorer.ScoreSettings "
                                      "fields, the CLI's flags), e.g. {\"max_row_chars\": 2000, \"batch_tokens\": "
                                      "4096, \"chunk_rows\": 512, \"resume\": true}: with resume, a retry "
                                      "continues after the rows an interrupted try committed"),
    },
) as dag:

    # multiple_outputs=False: one XCom (the summary dict), not one per key
    @task(retries=RETRIES, retry_delay=RETRY_DELAY, execution_timeout=timedelta(hours=12), multiple_outputs=False)
    def score() -> dict:
        from mlm_scorer.airflow import score_task

        ctx = get_current_context()
        p = ctx["params"]
        dag_run = ctx["dag_run"]
        # the settings: the params above by name, the rest from the "settings" param (a dict of ScoreSettings
        # fields; the same setting in both, with two values, is refused)
        return score_task(
            p["input"], os.path.join(p["output_dir"], "lib"), p["settings"] or None,
            logical_date=getattr(dag_run, "logical_date", None), run_id=ctx["run_id"], dag_id=dag_run.dag_id,
            model=p["model"], mode=p["mode"], id_column=p["id_column"], text_column=p["text_column"],
            on_bad_row=p["on_bad_row"], flag_below=p["flag_below"], flag_above=p["flag_above"],
            baseline=p["baseline"], score_cache=p["cache"])

    # The gate. retries=0: a bad batch stays bad (check_task raises AirflowFailException anyway).
    @task(retries=0, multiple_outputs=False)
    def check(summary: dict) -> dict:
        from mlm_scorer.airflow import check_task

        p = get_current_context()["params"]
        return check_task(summary["output"], baseline=p["baseline"] or None,
                          max_flagged_rate=p["max_flagged_rate"], max_shift=p["max_shift"])

    # The CLI form. Values reach the shell through env (never pasted into the command line), and the last
    # line printed, a one-line JSON summary, becomes the XCom; progress (a line every ~10 s) and the summary
    # line go to stderr, into the task log. Exit codes: 3 bad input row, 2 bad usage,
    # 4 model problem (all fail the task; see `mlm-score --help`).
    score_cli = BashOperator(
        task_id="score_cli",
        retries=RETRIES,
        retry_delay=RETRY_DELAY,
        env={
            "MLM_SCORE": MLM_SCORE,
            "PY": sys.executable,
            "IN": "{{ params.input }}",
            "OUT_DIR": "{{ params.output_dir }}/cli/{{ mlm_run_key(dag_run.logical_date, run_id) }}",
            "RUN_ID": "{{ run_id }}",
            "DAG_ID": "{{ dag.dag_id }}",
            "MODEL": "{{ params.model }}",
            "MODE": "{{ params.mode }}",
            "ID_COLUMN": "{{ params.id_column }}",
            "ON_BAD_ROW": "{{ params.on_bad_row }}",
            "CACHE": "{{ params.cache }}",
        },
        append_env=True,
        bash_command=(
            'set -euo pipefail; "$PY" -m mlm_scorer.airflow claim "$OUT_DIR" --run-id "$RUN_ID" --dag-id "$DAG_ID"; '
            '"$MLM_SCORE" "$IN" -o "$OUT_DIR/probs.parquet" --model "$MODEL" --mode "$MODE" '
            '--on-bad-row "$ON_BAD_ROW" ${ID_COLUMN:+--id-column "$ID_COLUMN"} ${CACHE:+--cache "$CACHE"} '
            '--summary-json "$OUT_DIR/summary.json"; '
            '"$PY" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(\',\', \':\')))" '
            '"$OUT_DIR/summary.json"'
        ),
    )

    # `mlm-score check` exits 1 when the batch fails the gate, 2 on bad usage: either fails the task.
    check_cli = BashOperator(
        task_id="check_cli",
        retries=0,
        env={
            "MLM_SCORE": MLM_SCORE,
            "OUT_DIR": "{{ params.output_dir }}/cli/{{ mlm_run_key(dag_run.logical_date, run_id) }}",
            "BASELINE": "{{ params.baseline }}",
            "MAX_FLAGGED_RATE": "{{ params.max_flagged_rate }}",
            "MAX_SHIFT": "{{ params.max_shift }}",
        },
        append_env=True,
        bash_command=(
            'set -euo pipefail; "$MLM_SCORE" check "$OUT_DIR/probs.parquet" ${BASELINE:+--baseline "$BASELINE"} '
            '--max-flagged-rate "$MAX_FLAGGED_RATE" --max-shift "$MAX_SHIFT" --json "$OUT_DIR/check.json"'
        ),
    )

    @task
    def publish(summary: dict, gate: dict) -> None:
        print(f"scored {summary['scored']}/{summary['rows']} rows, skipped {summary['skipped']}, flagged "
              f"{summary['flagged']}, mean PLL {summary['mean_pll']} -> {summary['output']}; quality gate passed "
              f"(flagged rate {gate['flagged_rate']}, statistics in {gate['json']})")

    scored = score()
    publish(scored, check(scored))
    score_cli >> check_cli  # independent of the TaskFlow branch: the same job, the CLI way
