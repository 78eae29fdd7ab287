"""The Airflow task's run keys and output claims, without Airflow (the DAG under a real Airflow 3 is
tests/test_airflow.py): keys that two runs never share by accident, another run's output refused, and
a sibling attempt holding the output's lock left retryable."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from helpers import write_tsv

from mlm_scorer.airflow import OWNER_FILE, OutputTaken, claim_output_dir, output_path, run_key, score_task

UTC = timezone.utc


def test_run_keys_keep_the_instant_to_the_microsecond_in_utc():
    midnight = datetime(2024, 1, 1, tzinfo=UTC)
    same_clock_at_plus2 = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    half_second = datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    keys = [run_key(d) for d in (midnight, same_clock_at_plus2, half_second)]
    assert keys == ["2024-01-01T000000.000000Z", "2023-12-31T220000.000000Z", "2024-01-01T000000.500000Z"]
    # one instant, however it is written, is one key (a retry of the run finds its own output)
    assert run_key(datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))) == keys[0]
    assert run_key(datetime(2024, 1, 1)) == keys[0]  # naive: UTC, Airflow's default time zone


def test_run_id_keys_are_injective_and_path_safe():
    ids = ["manual__2024-01-01T00:00:00+00:00", "manual__2024-01-01T00_00_00+00_00", "a/b", "a%2Fb", "..", ".",
           "run-x", "x", "é", "e\u0301", "scheduled__2024-01-01T00:00:00.500000+00:00"]
    keys = [run_key(run_id=i) for i in ids]
    assert len(set(keys)) == len(ids)
    for k in keys:
        assert k.startswith("run-") and "/" not in k and k not in (".", "..") and len(k.encode()) <= 255
    assert run_key(run_id="manual__2024-01-01T00:00:00+00:00") == "run-manual__2024-01-01T00%3A00%3A00%2B00%3A00"
    long = [run_key(run_id="x" * 250 + c) for c in "ab"]
    assert long[0] != long[1] and all(len(k) <= 200 for k in long)
    # a date key and a run-id key never meet: run-id keys start with "run-", date keys with a digit
    assert run_key(run_id="2024-01-01T000000.000000Z") != run_key(datetime(2024, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError):
        run_key()


def test_an_output_directory_belongs_to_one_run(tmp_path):
    d = tmp_path / "2024-01-01T000000.000000Z"
    claim_output_dir(d, run_id="r1", dag_id="dag", logical_date=datetime(2024, 1, 1, tzinfo=UTC))
    assert json.loads((d / OWNER_FILE).read_text())["run_id"] == "r1"
    (d / "probs.parquet").write_text("first run's output")
    claim_output_dir(d, run_id="r1", dag_id="dag")  # a retry of the run: its own
    with pytest.raises(OutputTaken, match=r"holds the output of another run \(DAG 'dag', run 'r1', logical date "
                                          r"2024-01-01T00:00:00\+00:00\); this run \(DAG 'dag', run 'r2'\) refuses"):
        claim_output_dir(d, run_id="r2", dag_id="dag")
    with pytest.raises(OutputTaken):
        claim_output_dir(d, run_id="r1", dag_id="another_dag")
    assert (d / "probs.parquet").read_text() == "first run's output"
    # files nobody claimed: refused; a crashed writer's hidden temporary file is not an output
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / ".probs.parquet.tmp-999999999").write_text("partial")
    claim_output_dir(loose, run_id="r3")
    mystery = tmp_path / "mystery"
    mystery.mkdir()
    (mystery / "probs.parquet").write_text("whose?")
    with pytest.raises(OutputTaken, match=r"already holds probs.parquet and no record of the run that wrote them"):
        claim_output_dir(mystery, run_id="r4")
    assert not (mystery / OWNER_FILE).exists()
    # the CLI form (a BashOperator): exit 2 with the reason
    p = subprocess.run([sys.executable, "-m", "mlm_scorer.airflow", "claim", str(d), "--run-id", "r9", "--dag-id",
                        "dag"], capture_output=True, text=True)
    assert p.returncode == 2 and "holds the output of another run" in p.stderr
    assert subprocess.run([sys.executable, "-m", "mlm_scorer.airflow", "claim", str(d), "--run-id", "r1",
                           "--dag-id", "dag"]).returncode == 0


def test_score_task_refuses_another_runs_output_and_leaves_a_held_lock_retryable(fake_export, tmp_path):
    from mlm_scorer.writer import OutputLocked, lock_output

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat on the mat."]])
    day = datetime(2024, 1, 1, tzinfo=UTC)
    kw = dict(model=str(fake_export), engine="fake", logical_date=day, dag_id="d", id_column="id", progress=False,
              log=None)
    s = score_task(tsv, tmp_path / "out", run_id="r1", **kw)
    out = output_path(tmp_path / "out", logical_date=day)
    assert s["output"] == str(out) and s["scored"] == 1
    before = out.stat().st_mtime_ns
    with pytest.raises(OutputTaken, match="holds the output of another run"):  # no Airflow here: as is
        score_task(tsv, tmp_path / "out", run_id="r2", **kw)
    assert out.stat().st_mtime_ns == before
    # a sibling attempt of the same run holds the output's lock: OutputLocked, not a fail-fast error
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    fd = lock_output(parts / "lock", out)
    try:
        with pytest.raises(OutputLocked, match="another mlm-score run is writing"):
            score_task(tsv, tmp_path / "out", run_id="r1", **kw)
    finally:
        import os

        os.close(fd)
    assert score_task(tsv, tmp_path / "out", run_id="r1", **kw)["scored"] == 1  # the retry, once it is free


def test_check_task_never_writes_over_what_it_reads_and_refuses_special_files_first(fake_export, tmp_path,
                                                                                    monkeypatch):
    """``check_task(json_path=...)``: the result's files, the baseline's, a symlink or a FIFO are refused
    before the check runs (no Airflow here: the scorer's error as is), and nothing is written; the default
    check.json inside a Ray output directory is still written."""
    import os

    import mlm_scorer.check as check
    from mlm_scorer.airflow import check_task
    from mlm_scorer.errors import UsageError
    from mlm_scorer.pipeline import score_file

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat on the mat."], ["b", "A dog ran home."]])
    result, base = tmp_path / "probs.parquet", tmp_path / "base.parquet"
    for out in (result, base):
        score_file(tsv, out, model=str(fake_export), engine="fake", id_column="id")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "link.json").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.json")
    files = [result, base, tmp_path / "probs.sentences.parquet", tmp_path / "base.sentences.parquet", victim]
    before = {p: p.read_bytes() for p in files}
    ran = []
    real = check.run_check
    monkeypatch.setattr(check, "run_check", lambda *a, **k: ran.append(a) or real(*a, **k))
    for dest, message in ((result, "is the result"), (tmp_path / "probs.sentences.parquet", "the result's sentences"),
                          (base, "is the baseline"), (tmp_path / "link.json", "is a symlink"),
                          (tmp_path / "fifo.json", "is a FIFO")):
        with pytest.raises(UsageError, match=message):
            check_task(result, baseline=base, json_path=dest, log=None)
    assert ran == [], "refused before the check ran"
    assert {p: p.read_bytes() for p in files} == before and (tmp_path / "fifo.json").is_fifo()
    assert check_task(result, baseline=base, log=None)["passed"]
    assert json.loads((tmp_path / "check.json").read_text())["passed"]

    ray_dir = tmp_path / "ray"  # a Ray output directory: check.json goes inside it, next to its own files
    for sub, src in (("words", result), ("sentences", tmp_path / "probs.sentences.parquet")):
        (ray_dir / sub).mkdir(parents=True)
        (ray_dir / sub / "part-00000-000000000000.parquet").write_bytes(src.read_bytes())
    assert check_task(ray_dir, log=None)["json"] == str(ray_dir / "check.json")
    with pytest.raises(UsageError, match="lies inside the result directory"):
        check_task(ray_dir, json_path=ray_dir / "sentences" / "c.json", log=None)


def test_score_task_checks_what_it_writes_before_claiming_the_directory(fake_export, tmp_path):
    """A refused run claims nothing: a score cache file that is a symlink is refused before the run's
    directory and its claim record are made (another run of that key would otherwise be refused too)."""
    from mlm_scorer.errors import UsageError

    tsv = write_tsv(tmp_path / "in.tsv", [["a", "The cat sat on the mat."]])
    day = datetime(2024, 1, 1, tzinfo=UTC)
    kw = dict(model=str(fake_export), engine="fake", logical_date=day, dag_id="d", run_id="r1", id_column="id",
              progress=False, log=None)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "scores.sqlite").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(UsageError, match="the score cache .*scores.sqlite' is a symlink"):
        score_task(tsv, tmp_path / "out", score_cache=cache, **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere.db").exists()
    assert score_task(tsv, tmp_path / "out", run_id="r2", **{k: v for k, v in kw.items() if k != "run_id"})[
        "scored"] == 1, "the key is free for another run"


def test_a_claim_record_replaced_meanwhile_is_not_deleted(tmp_path, monkeypatch):
    """The claim of a directory holding unclaimed files is withdrawn by deleting the record it made: only
    that file (device and inode), not a record another run put there since."""
    from pathlib import Path

    d = tmp_path / "mystery"
    d.mkdir()
    (d / "probs.parquet").write_text("whose?")
    real_iterdir = Path.iterdir

    def iterdir_while_another_run_claims(self):
        if self == d:  # between this call's claim and its withdrawal, the record is replaced by another run's
            (d / OWNER_FILE).unlink()
            (d / OWNER_FILE).write_text(json.dumps({"run_id": "other", "dag_id": None}))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir_while_another_run_claims)
    with pytest.raises(OutputTaken, match="already holds probs.parquet"):
        claim_output_dir(d, run_id="r4")
    assert json.loads((d / OWNER_FILE).read_text())["run_id"] == "other"
