"""Resume: a run killed with SIGKILL at random points and resumed each time ends with the same output
as an undisturbed run, row by row (no row lost, none duplicated); changed input or settings are refused."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import read_outputs

from mlm_scorer.cli import main


def _input(path, n=1200, seed=0):
    rng = random.Random(seed)
    words = "the cat sat on a mat dog ran big small house read book people walk good bad new old".split()
    lines = ["id\ttext"]
    for i in range(n):
        lines.append(f"r{i}\t" + " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))))
    lines.insert(500, "bad\t")  # an empty text: skipped, must survive resumes too
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _args(tsv, out, fake_export, *extra, on_bad_row="skip"):
    return [str(tsv), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--id-column", "id",
            "--on-bad-row", on_bad_row, "--chunk-rows", "50", *extra]


def test_sigkill_at_random_points_then_resume_equals_undisturbed_run(tmp_path, fake_export):
    tsv = _input(tmp_path / "in.tsv")
    ref = tmp_path / "ref.parquet"
    assert main(_args(tsv, ref, fake_export)) == 0
    ref_words, ref_sents = read_outputs(ref)

    out = tmp_path / "out.parquet"
    progress = tmp_path / "out.parquet.parts" / "progress.json"
    cmd = [sys.executable, "-m", "mlm_scorer", *_args(tsv, out, fake_export, "--engine-option", "delay=0.02",
                                                      "--max-batch-size", "32", "--resume")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng = random.Random(42)
    committed = [0]
    def committed_rows() -> int:
        try:
            return sum(part["rows"] for part in json.loads(progress.read_text())["parts"])
        except FileNotFoundError:
            return 0

    for _ in range(4):  # kill -9 at random points: after the run made progress, at a random moment
        p = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while committed_rows() <= committed[-1] and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():  # it finished before the signal: then it must be complete, parts cleaned up
            assert not progress.exists()
            break
        done = committed_rows()
        assert done >= committed[-1], "committed work is never lost"
        committed.append(done)
    assert any(0 < c for c in committed), "the test must interrupt the run after some commits"
    assert committed[-1] < 1201, "and before the end"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)  # ...then let it finish
    assert p.returncode == 0, p.stderr
    assert "resumed after" in p.stderr or out.exists()
    words, sents = read_outputs(out)
    assert sents == ref_sents
    assert words == ref_words
    assert not (tmp_path / "out.parquet.parts").exists()
    assert [s["row"] for s in sents] == list(range(len(sents))), "each input row exactly once, in order"


def test_resume_refuses_changed_input_or_settings(tmp_path, fake_export, capsys):
    tsv = _input(tmp_path / "in.tsv", n=300)
    out = tmp_path / "out.parquet"
    # interrupt with a bad row (fail mode) after some chunks were committed
    lines = tsv.read_text().splitlines()
    lines.insert(250, "x\ty\tz")
    tsv.write_text("\n".join(lines) + "\n")
    code = main(_args(tsv, out, fake_export, "-q", on_bad_row="fail"))
    err = capsys.readouterr().err
    assert code == 3 and "rerun with --resume" in err and "rows are committed" in err
    assert (tmp_path / "out.parquet.parts" / "progress.json").is_file() and not out.exists()

    # a different mode is refused
    code = main(_args(tsv, out, fake_export, "--resume", "--mode", "token"))
    err = capsys.readouterr().err
    assert code == 2 and "setting mode changed" in err

    # resuming with --on-bad-row skip is allowed (it does not change committed rows) and completes
    code = main(_args(tsv, out, fake_export, "--resume"))
    assert code == 0
    words, sents = read_outputs(out)
    ref = tmp_path / "ref.parquet"
    assert main(_args(tsv, ref, fake_export)) == 0
    assert (words, sents) == read_outputs(ref)

    # a changed input is refused
    lines.insert(260, "x\ty\tz")
    tsv.write_text("\n".join(lines) + "\n")
    code = main(_args(tsv, tmp_path / "o2.parquet", fake_export, "-q", on_bad_row="fail"))
    assert code == 3
    tsv.write_text("\n".join(lines[:-1]) + "\n")
    code = main(_args(tsv, tmp_path / "o2.parquet", fake_export, "--resume"))
    assert code == 2 and "input size changed" in capsys.readouterr().err


def test_second_concurrent_run_on_same_output_is_refused(tmp_path, fake_export, capsys):
    import fcntl

    tsv = _input(tmp_path / "in.tsv", n=10)
    out = tmp_path / "out.parquet"
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    fd = os.open(parts / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code = main(_args(tsv, out, fake_export))
        assert code == 2 and "another mlm-score run is writing" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert main(_args(tsv, out, fake_export)) == 0


def test_rerun_without_resume_starts_over_and_replaces(tmp_path, fake_export):
    tsv = _input(tmp_path / "in.tsv", n=120)
    out = tmp_path / "out.parquet"
    assert main(_args(tsv, out, fake_export)) == 0
    first = read_outputs(out)
    assert main(_args(tsv, out, fake_export)) == 0
    assert read_outputs(out) == first
