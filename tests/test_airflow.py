"""The example Airflow DAG (scripts/airflow_dag.py) under a real Apache Airflow 3, in its own venv.

Airflow lives in a separate virtualenv (``scripts/airflow_test.sh`` builds ``.venv-airflow`` and runs
this file); this test, in the main venv, makes the tiny model, then drives Airflow in that venv:
``airflow db migrate`` on SQLite in a temporary AIRFLOW_HOME, then ``dag.test()`` eight times in one
process: a run; another run of the same logical date (refused: it may not overwrite the first run's
output); a run half a second later (its own key); a run whose output's lock a sibling holds
(its score task is retried and then succeeds); a run on a bad input; a run with the settings
``max_row_chars``, ``batch_tokens``, ``chunk_rows`` and ``resume=True`` whose first try times out with
rows committed and whose retry continues after them; and the quality gate with real
weights (AntiBERTy): a batch of natural antibody domains and one with corrupted domains, each checked
against a baseline of natural domains (the ``antibody_batches`` fixture; the scoring tasks read the
engine's results from its score cache, so the model runs once, in the main venv).

Skipped when the Airflow venv does not exist, unless MLM_REQUIRE_AIRFLOW=1 (the CI script sets it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_tsv

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MLM_AIRFLOW_VENV", ROOT / ".venv-airflow"))
if not VENV.is_absolute():
    VENV = ROOT / VENV
AIRFLOW_PY = VENV / "bin" / "python"
LOGICAL_DATE = "2024-01-01T00:00:00+00:00"
RUN_KEY = "2024-01-01T000000.000000Z"
HALF_DATE = "2024-01-01T00:00:00.500000+00:00"  # half a second after LOGICAL_DATE: another run, another key
HALF_KEY = "2024-01-01T000000.500000Z"
LOCKED_DATE = "2024-01-03T00:00:00+00:00"
LOCKED_KEY = "2024-01-03T000000.000000Z"

if not (VENV / "bin" / "airflow").exists():
    if os.environ.get("MLM_REQUIRE_AIRFLOW") == "1":
        raise RuntimeError(f"MLM_REQUIRE_AIRFLOW=1 but there is no Airflow venv at {VENV} (scripts/airflow_test.sh)")
    pytest.skip(f"no Airflow venv at {VENV}: run scripts/airflow_test.sh to build it and run this test",
                allow_module_level=True)

# Runs in the Airflow venv: dag.test() for each run spec, then one JSON line per run (states, XComs).
DRIVER = r'''
import json, shutil, sys, datetime, traceback
sys.path.insert(0, sys.argv[1])
import airflow_dag
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

dag = airflow_dag.dag
score = dag.task_dict["score"]
timeout = score.execution_timeout
for spec in json.loads(sys.argv[2]):
    print(f"@@RUN {spec['name']}", flush=True)
    # this run's score task may time out sooner (an interrupted try)
    score.execution_timeout = datetime.timedelta(seconds=spec["timeout_s"]) if spec.get("timeout_s") else timeout
    try:
        more = {"mark_success_pattern": spec["mark_success"]} if spec.get("mark_success") else {}
        dr = dag.test(logical_date=datetime.datetime.fromisoformat(spec["logical_date"]), run_conf=spec["conf"],
                      **more)
        tis = {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number} for ti in dr.get_task_instances()}
        with create_session() as s:
            xcoms = {x.task_id: x.value for x in s.query(XComModel).filter(
                XComModel.run_id == dr.run_id, XComModel.dag_id == dag.dag_id, XComModel.key == "return_value")}
        out = {"name": spec["name"], "state": str(dr.state), "run_id": dr.run_id, "tis": tis, "xcoms": xcoms}
        if spec.get("snapshot"):  # keep this run's files (with their mtimes) to compare with the next run's
            shutil.copytree(spec["conf"]["output_dir"], spec["snapshot"], copy_function=shutil.copy2)
    except Exception:
        out = {"name": spec["name"], "state": "driver-error", "traceback": traceback.format_exc()}
    print("@@RESULT " + json.dumps(out, default=str), flush=True)
'''


# A sibling attempt holding the output's lock (run in the main venv while the DAG runs). The run's input is
# a FIFO this process feeds, one copy per reader: when the score task (which claims its directory first)
# opens it, the lock is taken before the task gets a byte, so its first try meets the lock; the lock is
# released once Airflow has put the task up for retry.
SIBLING = r"""
import fcntl, os, sqlite3, sys, threading, time
fifo, out_dir, db, data = os.path.realpath(sys.argv[1]), sys.argv[2], sys.argv[3], open(sys.argv[4], "rb").read()
marker, lock = os.path.join(out_dir, ".mlm-score-run.json"), os.path.join(out_dir, "probs.parquet.parts", "lock")
held = []
def release_when_retried():
    while not held:
        time.sleep(0.05)
    while True:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                n = c.execute("select count(*) from task_instance where task_id = 'score' and "
                              "state = 'up_for_retry'").fetchone()[0]
        except sqlite3.Error:
            n = 0
        if n:
            print("released", flush=True)
            os.close(held[0])
            return
        time.sleep(0.2)
threading.Thread(target=release_when_retried, daemon=True).start()
def open_elsewhere():
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == fifo for fd in os.listdir(f"/proc/{pid}/fd")):
                    return True
            except OSError:
                pass
    return False
while True:
    w = os.open(fifo, os.O_WRONLY)  # blocks until a task opens the input (to read it, or to peek at it)
    if os.path.exists(marker) and not held:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
        print("held", flush=True)
    try:
        os.write(w, data)
    except BrokenPipeError:  # a reader that only peeked and closed
        pass
    os.close(w)
    while open_elsewhere():  # one copy per reader: the next open must not find this reader still there
        time.sleep(0.01)
"""


# The input of the resume run: a FIFO this process feeds. The first try gets the header and the first
# two chunks' rows, then nothing more: once both chunks are committed (progress.json lists them) the try
# waits for rows until its execution_timeout stops it. When it has let go of the output (its lock is free),
# the FIFO is closed (the try's reader sees the end), and the retry that opens it next gets every row.
RESUMER = r"""
import fcntl, json, os, select, sys, time
fifo, parts, data, first = os.path.realpath(sys.argv[1]), sys.argv[2], open(sys.argv[3], "rb").read(), int(sys.argv[4])
head = b"".join(data.splitlines(keepends=True)[:1 + first])
def committed():
    try:
        with open(os.path.join(parts, "progress.json"), encoding="utf-8") as f:
            return sum(p["rows"] for p in json.load(f)["parts"])
    except (OSError, ValueError, KeyError):
        return 0
def lock_free():
    try:
        fd = os.open(os.path.join(parts, "lock"), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (releases it at once)
def open_elsewhere():
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == fifo for fd in os.listdir(f"/proc/{pid}/fd")):
                    return True
            except OSError:
                pass
    return False
stalled = False
while True:
    w = os.open(fifo, os.O_WRONLY)  # blocks until a try opens the input
    try:
        if not stalled:
            os.write(w, head)
            p = select.poll()
            p.register(w, select.POLLERR)
            while committed() < first and not p.poll(50):  # (POLLERR: the reader went away first)
                pass
            if committed() >= first:
                print(f"stalled after {committed()} rows", flush=True)
                stalled = True
                deadline = time.monotonic() + 180  # (a try never stopped: end its input, and the test fails)
                while not lock_free() and time.monotonic() < deadline:  # the try gave up the output: close
                    time.sleep(0.05)
                print("closed", flush=True)
        else:
            os.write(w, data)
            print("fed", flush=True)
    except BrokenPipeError:
        pass
    os.close(w)
    while open_elsewhere():  # one copy per reader
        time.sleep(0.01)
"""
RESUME_DATE = "2024-01-05T00:00:00+00:00"
RESUME_KEY = "2024-01-05T000000.000000Z"
RESUME_SETTINGS = {"max_row_chars": 50, "batch_tokens": 64, "chunk_rows": 4, "resume": True}


def _resume_rows() -> list[list[str]]:
    """24 rows, the third longer than max_row_chars (50): a bad row, skipped (1 of 24 is under the gate's
    5 % skipped rate)."""
    words = ["cat", "dog", "mat", "home", "sat", "ran", "read", "book", "people", "walked"]
    rows = [[f"r{i}", f"The {words[i % 10]} {words[(i * 3) % 10]} on the {words[(i * 7) % 10]} {i}."]
            for i in range(24)]
    rows[2][1] = "A sentence much longer than fifty characters, so it is a bad row here."
    return rows


def _env(home: Path, dags: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VIRTUAL_ENV", "PYTHON"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__UNIT_TEST_MODE="False", TF_CPP_MIN_LOG_LEVEL="2", MLM_SCORER_RETRIES="1",
               MLM_SCORER_RETRY_DELAY_S="1", PATH=f"{VENV / 'bin'}:{env.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def airflow_runs(tiny_export, tmp_path_factory, request):
    """Run the DAG under Airflow (five runs, three without AntiBERTy); return ({name: result}, paths, logs)."""
    tmp = tmp_path_factory.mktemp("airflow")
    home, dags, out = tmp / "home", tmp / "dags", tmp / "out"
    for d in (home, dags, out):
        d.mkdir()
    shutil.copyfile(ROOT / "scripts" / "airflow_dag.py", dags / "airflow_dag.py")
    good = write_tsv(tmp / "in.tsv", [["a", "The cat sat on the mat."], ["b", "A dog ran home."],
                                      ["c", "The cat sat on the mat."]])
    bad = write_tsv(tmp / "bad.tsv", [["a", "The cat sat on the mat."], ["b", "two\ttabs"]])
    env = _env(home, dags)
    mig = subprocess.run([str(VENV / "bin" / "airflow"), "db", "migrate"], env=env, cwd=tmp, capture_output=True,
                         text=True, timeout=300)
    assert mig.returncode == 0, mig.stdout[-3000:] + mig.stderr[-3000:]

    fifo = tmp / "sibling.fifo"
    os.mkfifo(fifo)
    # every run states on_bad_row and settings: dag.test() in one process keeps what a run's conf set in the
    # DAG's params for the runs after it (the resume run's would reach the gate's)
    conf = {"output_dir": str(out), "model": str(tiny_export), "id_column": "id", "on_bad_row": "fail",
            "settings": {}}
    runs = [{"name": "first", "logical_date": LOGICAL_DATE, "conf": {**conf, "input": str(good)},
             "snapshot": str(tmp / "first")},
            {"name": "again", "logical_date": LOGICAL_DATE, "conf": {**conf, "input": str(good)}},
            {"name": "half", "logical_date": HALF_DATE, "conf": {**conf, "input": str(good)}},
            {"name": "locked", "logical_date": LOCKED_DATE, "conf": {**conf, "input": str(fifo)}},
            {"name": "bad", "logical_date": "2024-01-02T00:00:00+00:00", "conf": {**conf, "input": str(bad)}},
            # first try: 40 s to commit two chunks (8 rows) and stall; the retry then has every row. The CLI
            # tasks would read the FIFO too: marked done, not run.
            {"name": "resume", "logical_date": RESUME_DATE, "timeout_s": 40, "mark_success": "^(score_cli|check_cli)$",
             "conf": {**conf, "input": str(tmp / "resume.fifo"), "on_bad_row": "skip", "settings": RESUME_SETTINGS}}]
    gate = {}
    try:
        ab = request.getfixturevalue("antibody_batches")
    except pytest.skip.Exception:
        ab = None  # no AntiBERTy: the gate tests skip, the others run
    if ab is not None:
        from antibodies import current_rows

        rows = {r[0]: r for r in current_rows()}
        # 6 natural domains; then 4 of them with 2 corrupted ones among them (a third of the batch)
        gate["clean"] = write_tsv(tmp / "clean.tsv", [rows[k] for k in (
            "nivolumab-VH", "abrilumab-VL", "natalizumab-VH", "alemtuzumab-VL", "denosumab-VH", "certolizumab-VL")])
        gate["corrupted"] = write_tsv(tmp / "corrupted.tsv", [rows[k] for k in (
            "nivolumab-VH", "ustekinumab-VH-shuffled", "natalizumab-VH", "alemtuzumab-VL", "ocrelizumab-VL-shuffled",
            "denosumab-VH")])
        gconf = {"output_dir": str(out / "gate"), "model": str(ab.model), "id_column": "id", "on_bad_row": "fail",
                 "settings": {},
                 "baseline": str(ab.baseline), "cache": str(ab.cache)}
        runs += [{"name": "gate-clean", "logical_date": "2024-02-01T00:00:00+00:00",
                  "conf": {**gconf, "input": str(gate["clean"])}},
                 {"name": "gate-corrupted", "logical_date": "2024-02-02T00:00:00+00:00",
                  "conf": {**gconf, "input": str(gate["corrupted"])}}]
    # a crashed earlier attempt's leftover: a dead pid's temporary file where the outputs go; the next
    # attempt must clean it up and never let it reach a final path
    lib_dir = out / "lib" / RUN_KEY
    lib_dir.mkdir(parents=True)
    stale = lib_dir / ".probs.parquet.tmp-999999999"
    stale.write_bytes(b"partial")
    sibling = subprocess.Popen([sys.executable, "-c", SIBLING, str(fifo), str(out / "lib" / LOCKED_KEY),
                                str(home / "airflow.db"), str(good)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    resume_tsv = write_tsv(tmp / "resume.tsv", _resume_rows())
    os.mkfifo(tmp / "resume.fifo")
    resumer = subprocess.Popen([sys.executable, "-c", RESUMER, str(tmp / "resume.fifo"),
                                str(out / "lib" / RESUME_KEY / "probs.parquet.parts"), str(resume_tsv), "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc = subprocess.run([str(AIRFLOW_PY), "-c", DRIVER, str(dags), json.dumps(runs)], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=1200)
    finally:
        sibling.kill()
        sibling_log = sibling.communicate()[0]
        resumer.kill()
        resumer_log = resumer.communicate()[0]
    log = proc.stdout + proc.stderr
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            r = json.loads(line[len("@@RESULT "):])
            results[r["name"]] = r
    assert proc.returncode == 0 and len(results) == len(runs), log[-6000:]
    for r in results.values():
        assert r["state"] != "driver-error", r.get("traceback")
    # the log of each run: between its @@RUN marker and the next
    parts = {}
    for chunk in proc.stdout.split("@@RUN ")[1:]:
        name, _, body = chunk.partition("\n")
        parts[name] = body
    return results, {"out": out, "good": good, "bad": bad, "stale": stale, "first": tmp / "first",
                     "sibling_log": sibling_log, "resume_tsv": resume_tsv, "resumer_log": resumer_log,
                     "model": tiny_export, **gate}, parts, proc.stderr


def test_dag_scores_and_passes_a_small_summary(airflow_runs):
    from helpers import read_outputs

    from mlm_scorer.writer import sentences_path

    results, paths, _, _ = airflow_runs
    r = results["first"]
    assert r["state"] == "success", r
    assert {t: v["state"] for t, v in r["tis"].items()} == {"score": "success", "check": "success",
                                                           "score_cli": "success", "check_cli": "success",
                                                           "publish": "success"}
    summary = r["xcoms"]["score"]
    # one small XCom (a dict of paths, counts, scores), not the data and not one XCom per key
    assert isinstance(summary, dict) and len(json.dumps(summary)) < 4096
    assert set(r["xcoms"]) == {"score", "check", "score_cli", "check_cli"}
    # no baseline and no flag rules: the gate checks what it can (rows scored, none skipped) and passes
    gate = r["xcoms"]["check"]
    assert gate["passed"] and gate["flagged"] is None and gate["skipped_rate"] == 0.0
    assert r["xcoms"]["check_cli"].startswith("PASS: ")
    lib_out = paths["out"] / "lib" / RUN_KEY / "probs.parquet"
    assert summary["output"] == str(lib_out) and summary["sentences_output"] == str(sentences_path(lib_out))
    assert (summary["rows"], summary["scored"], summary["skipped"]) == (3, 3, 0)
    assert summary["duplicates"] == 1 and summary["mean_pll"] < 0
    words, sents = read_outputs(lib_out)
    assert [s["id"] for s in sents] == ["a", "b", "c"] and all(s["status"] == "ok" for s in sents)
    assert summary["words"] == len(words) == sum(s["n_words"] for s in sents) == 7 + 5 + 7  # "." is a word
    assert abs(summary["mean_pll"] - sum(s["pll"] for s in sents) / 3) < 1e-9
    # the CLI form (BashOperator) wrote the same numbers; its XCom is the last line: the JSON summary
    cli = json.loads(r["xcoms"]["score_cli"])
    cli_out = paths["out"] / "cli" / RUN_KEY / "probs.parquet"
    assert cli["output"] == str(cli_out) and cli["scored"] == 3
    cw, cs = read_outputs(cli_out)
    assert [w["log_prob"] for w in cw] == [w["log_prob"] for w in words]
    assert [s["pll"] for s in cs] == [s["pll"] for s in sents]


def test_another_run_of_the_same_date_is_refused_not_overwritten(airflow_runs):
    """Airflow 3 allows two runs of one logical date: the second maps to the first's paths, finds them
    claimed by another run, and fails at once (no retry for the library task) with both runs named;
    the first run's files are untouched. A run half a second later (the same key once, when keys
    stopped at seconds) has its own key and its own output."""
    from mlm_scorer.writer import sentences_path

    results, paths, logs, stderr = airflow_runs
    first, again = results["first"], results["again"]
    assert again["state"] == "failed" and again["run_id"] != first["run_id"], again
    assert again["tis"]["score"] == {"state": "failed", "try_number": 1}  # AirflowFailException: not retried
    assert again["tis"]["score_cli"]["state"] == "failed"  # the claim step of the CLI form: exit 2
    assert {again["tis"][t]["state"] for t in ("check", "check_cli", "publish")} == {"upstream_failed"}
    log = logs["again"] + stderr
    assert f"holds the output of another run (DAG 'mlm_score_tsv', run '{first['run_id']}'" in log, log[-4000:]
    assert f"this run (DAG 'mlm_score_tsv', run '{again['run_id']}') refuses to overwrite it" in log
    for sub in ("lib", "cli"):
        d, d1 = paths["out"] / sub / RUN_KEY, paths["first"] / sub / RUN_KEY
        # only the final files and the claim: no temporary file left, no second copy under another name
        expected = [".mlm-score-run.json", "check.json", "probs.parquet", "probs.sentences.parquet"] + \
            (["summary.json"] if sub == "cli" else [])
        assert sorted(p.name for p in d.iterdir()) == expected
        assert json.loads((d / ".mlm-score-run.json").read_text())["run_id"] == first["run_id"]
        out, out1 = d / "probs.parquet", d1 / "probs.parquet"
        for p, p1 in ((out, out1), (sentences_path(out), sentences_path(out1))):
            assert p.stat().st_mtime_ns == p1.stat().st_mtime_ns and p.read_bytes() == p1.read_bytes(), p
    assert not paths["stale"].exists(), "the dead attempt's temporary file was not cleaned up"
    half = results["half"]
    assert half["state"] == "success", half
    assert half["xcoms"]["score"]["output"] == str(paths["out"] / "lib" / HALF_KEY / "probs.parquet")
    assert json.loads(half["xcoms"]["score_cli"])["output"] == str(paths["out"] / "cli" / HALF_KEY / "probs.parquet")
    for k in ("rows", "scored", "words", "mean_pll", "model_checksum"):
        assert half["xcoms"]["score"][k] == first["xcoms"]["score"][k], k


def test_a_sibling_holding_the_output_lock_is_waited_for_by_retrying(airflow_runs):
    """The score task's first try meets the output's lock, held by another attempt still running: it
    fails as a retryable error (not AirflowFailException), Airflow retries it, and the second try, once
    the lock is free, scores the run."""
    results, paths, logs, stderr = airflow_runs
    r = results["locked"]
    assert paths["sibling_log"].split() == ["held", "released"], paths["sibling_log"]
    assert r["state"] == "success", r
    assert r["tis"]["score"] == {"state": "success", "try_number": 2}
    log = logs["locked"] + stderr
    assert "OutputLocked: another mlm-score run is writing" in log, log[-4000:]
    s = r["xcoms"]["score"]
    assert s["output"] == str(paths["out"] / "lib" / LOCKED_KEY / "probs.parquet") and s["scored"] == 3


def test_settings_reach_the_task_and_a_retry_resumes_after_the_committed_rows(airflow_runs):
    """The score task with max_row_chars, batch_tokens, chunk_rows and resume=True (the DAG's "settings"
    param): its first try commits two chunks (8 rows), then times out waiting for input (execution_timeout:
    AirflowTaskTimeout, retried); the retry continues after the 8 committed rows instead of scoring them
    again. The output is the same, row by row and bit for bit, as one uninterrupted run with the same
    settings; the row longer than max_row_chars is skipped as row_too_long."""
    from helpers import read_outputs

    from mlm_scorer import score_file
    from mlm_scorer.settings import ScoreSettings

    results, paths, logs, stderr = airflow_runs
    r = results["resume"]
    log = logs["resume"] + stderr
    assert r["state"] == "success", (r, paths["resumer_log"], log[-6000:])
    assert paths["resumer_log"].splitlines()[:3] == ["stalled after 8 rows", "closed", "fed"], paths["resumer_log"]
    assert r["tis"]["score"] == {"state": "success", "try_number": 2}
    assert r["tis"]["check"]["state"] == r["tis"]["publish"]["state"] == "success"
    assert "AirflowTaskTimeout" in log, log[-4000:]
    assert "8 rows are committed in" in log and "rerun with --resume" in log  # what the first try said it kept
    s = r["xcoms"]["score"]
    assert (s["resumed_rows"], s["rows"], s["scored"], s["skipped"]) == (8, 24, 23, 1)
    assert s["skipped_rows"][0]["reason"] == "row_too_long" and s["skipped_rows"][0]["line"] == 4
    assert s["batch_tokens"] == 64
    assert {k: s["settings"][k] for k in ("max_row_chars", "id_column")} == {"max_row_chars": 50, "id_column": "id"}
    out = paths["out"] / "lib" / RESUME_KEY / "probs.parquet"
    assert s["output"] == str(out) and not Path(str(out) + ".parts").exists()
    # one run, never interrupted, with the same settings: the same rows and numbers
    ref = out.parent.parent.parent / "resume-ref.parquet"
    settings = ScoreSettings(model=str(paths["model"]), id_column="id", on_bad_row="skip",
                             **{k: v for k, v in RESUME_SETTINGS.items() if k != "resume"})
    score_file(paths["resume_tsv"], ref, settings)
    words, sents = read_outputs(out)
    ref_words, ref_sents = read_outputs(ref)
    fifo = str(paths["resume_tsv"].parent / "resume.fifo")
    for x in sents:  # the skipped row's message names the input it was read from
        x["error"] = x["error"] and x["error"].replace(fifo, str(paths["resume_tsv"]))
    assert [x["id"] for x in sents] == [f"r{i}" for i in range(24)]  # none lost, none twice
    assert sents == ref_sents and words == ref_words


def test_bad_input_fails_the_task_with_file_and_line(airflow_runs):
    results, paths, logs, stderr = airflow_runs
    r = results["bad"]
    assert r["state"] == "failed", r
    # library task: AirflowFailException, so no retry was spent on a row that cannot change
    assert r["tis"]["score"] == {"state": "failed", "try_number": 1}
    # the CLI task has no such signal: it fails on every try (exit code 3), using its retries
    assert r["tis"]["score_cli"]["state"] == "failed" and r["tis"]["score_cli"]["try_number"] == 2
    assert r["tis"]["publish"]["state"] == "upstream_failed"
    assert r["tis"]["check"]["state"] == r["tis"]["check_cli"]["state"] == "upstream_failed"
    assert "score" not in r["xcoms"]
    log = logs["bad"] + stderr
    where = f"{paths['bad']}:3:"
    assert f"InputError: {where}" in log, log[-4000:]
    assert "expected 2 tab-separated fields (id, text), found 3" in log
    assert f"mlm-score: error: {where}" in log  # the CLI's message, in the BashOperator's log
    # nothing written for the failed date
    assert not (paths["out"] / "lib" / "2024-01-02T000000.000000Z" / "probs.parquet").exists()


def test_the_gate_passes_a_clean_batch_and_fails_a_corrupted_one(airflow_runs):
    """Real weights: the check task fails the DAG run on a batch with corrupted antibody domains (no
    retry, publish does not run), and passes the run on natural domains; so does check_cli."""
    results, paths, logs, stderr = airflow_runs
    if "gate-clean" not in results:
        pytest.skip("antiberty is not installed (the antibody_batches fixture needs it)")
    clean, bad = results["gate-clean"], results["gate-corrupted"]
    assert clean["state"] == "success", clean
    assert {t: v["state"] for t, v in clean["tis"].items()} == dict.fromkeys(
        ("score", "check", "score_cli", "check_cli", "publish"), "success")
    assert clean["xcoms"]["score"]["cache_hits"] == 6  # the scores came from the fixture's run of AntiBERTy
    gate = clean["xcoms"]["check"]
    assert gate["passed"] and gate["flagged"] == 0 and gate["scored"] == 6 and gate["failures"] == []
    assert clean["xcoms"]["check_cli"].startswith("PASS: ")

    assert bad["state"] == "failed", bad
    tis = {t: (v["state"], v["try_number"]) for t, v in bad["tis"].items()}
    assert tis["score"][0] == "success" and tis["score_cli"][0] == "success"
    assert tis["check"] == ("failed", 1) and tis["check_cli"] == ("failed", 1)  # a bad batch is not retried
    assert tis["publish"][0] == "upstream_failed"
    assert "check" not in bad["xcoms"]
    failure = "flagged 2 of 6 scored rows (33.3 %) > 5.0 % (--max-flagged-rate)"
    log = logs["gate-corrupted"] + stderr
    assert f"failed the quality gate: {failure}" in log, log[-4000:]
    assert "FAIL: " in log and f"fails 1 of 6 criteria: {failure}" in log  # check_cli's verdict line
    for sub in ("lib", "cli"):  # the statistics stay next to the output, for whoever looks into the failure
        r = json.loads((paths["out"] / "gate" / sub / "2024-02-02T000000.000000Z" / "check.json").read_text())
        assert not r["passed"] and r["flagged"] == 2 and r["failures"] == [failure]
        assert r["metrics"]["pseudo_perplexity"]["rows_beyond"] == 2
