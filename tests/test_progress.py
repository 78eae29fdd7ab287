"""Progress: updated after every engine batch (not every chunk), a log line every ~10 s off a terminal
and one at the end, a bar on a terminal; --progress / --no-progress, and -q quiets it."""
from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

from helpers import write_tsv

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.tsv"


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_lines_off_a_terminal(caplog):
    from mlm_scorer.progress import Progress

    clock = _Clock()
    caplog.set_level(logging.INFO, logger="mlm_scorer")
    p = Progress(1000, mode="log", clock=clock)
    for _ in range(30):  # 30 batches of 25 rows, 1 s apart
        clock.t += 1
        p.add(25, 100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # at 10, 20 and 30 s
    assert lines[0] == "progress: 250/1,000 rows (25.0%), 100 copies/s, 25 rows/s, 0:10 elapsed, ETA 0:30"
    clock.t += 1
    p.add(250, 1000)
    p.close()  # the line at the end
    assert caplog.records[-1].getMessage() == ("progress: 1,000/1,000 rows (100.0%), 129 copies/s, 32 rows/s, "
                                               "0:31 elapsed")
    p.close()
    assert len(caplog.records) == 4  # once
    # no total known (standard input): no percentage, no ETA; a restarted clock leaves start-up out
    q = Progress(None, mode="log", clock=clock)
    clock.t += 50
    q.restart()
    clock.t += 2
    q.add(10, 40)
    assert q.line() == "progress: 10 rows, 20 copies/s, 5 rows/s, 0:02 elapsed"
    assert Progress.auto_mode(False) == "off" and Progress.auto_mode(None, stream=open(os.devnull, "w")) == "log"


def test_score_file_reports_every_batch(fake_export, tmp_path, monkeypatch):
    """One chunk of 30 rows in many engine batches: the count moves with every batch, in fractions of the
    chunk's rows, and adds up to the rows and copies of the run."""
    from mlm_scorer import score_file
    from mlm_scorer.progress import Progress

    calls = []
    real_add = Progress.add
    monkeypatch.setattr(Progress, "add", lambda self, rows, copies=0: (calls.append((rows, copies)),
                                                                       real_add(self, rows, copies))[1])
    s = score_file(SAMPLE, tmp_path / "o.parquet", model=str(fake_export), engine="fake", id_column="id",
                   max_batch_size=16, chunk_rows=2048, progress=True)
    assert len(calls) > 10 and all(0 < c <= 16 for _, c in calls)  # one per engine batch, not one per chunk
    assert abs(sum(r for r, _ in calls) - 30) < 1e-9 and sum(c for _, c in calls) == s.copies


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "mlm_scorer", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_progress_flags(fake_export, tmp_path):
    base = [str(SAMPLE), "-o", str(tmp_path / "o.parquet"), "--model", str(fake_export), "--engine", "fake"]
    plain = _cli(*base)  # off a terminal: the final progress line, then the summary
    assert plain.returncode == 0 and plain.stderr.splitlines()[0].startswith("progress: 30/30 rows (100.0%)")
    off = _cli(*base, "--no-progress")
    assert off.returncode == 0 and len(off.stderr.splitlines()) == 1 and off.stderr.startswith("scored 30/30")
    quiet = _cli(*base, "-q", "--progress")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_bar_on_a_terminal(fake_export, tmp_path):
    """stderr a terminal (a pty): a bar with the row count and copies/s, redrawn per batch."""
    tsv = write_tsv(tmp_path / "in.tsv", [[str(i), f"The cat number {i} sat on the mat."] for i in range(200)])
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = subprocess.Popen([sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(tmp_path / "o.parquet"), "--model",
                          str(fake_export), "--engine", "fake", "--engine-option", "delay=0.05", "--max-batch-size",
                          "64"], stderr=slave, stdout=subprocess.DEVNULL, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    assert p.wait(timeout=300) == 0
    os.close(master)
    text = out.decode("utf-8", "replace")
    assert "/200 rows" in text and "copies/s" in text, text
    assert text.count("\r") >= 3  # redrawn as batches finish
    assert "scored 200/200 rows" in text


def test_slow_rates_and_a_single_row_read_as_they_are(caplog):
    """A slow model on long rows: 3 rows in the first 10 s is 0.3 rows/s, not "0 rows/s"; before any row is
    done the line says so; one row from standard input is "1 row"."""
    from mlm_scorer.progress import Progress

    clock = _Clock()
    p = Progress(None, mode="log", clock=clock)
    clock.t += 4
    assert p.line() == "progress: 0 rows, no row done yet, 0:04 elapsed"
    clock.t += 6
    p.add(3, 12)
    assert p.line() == "progress: 3 rows, 1.2 copies/s, 0.3 rows/s, 0:10 elapsed"
    q = Progress(None, mode="log", clock=clock)
    clock.t += 2
    q.add(1, 20)
    assert q.line() == "progress: 1 row, 10 copies/s, 0.5 rows/s, 0:02 elapsed"
    r = Progress(1000, mode="log", clock=clock)
    clock.t += 100
    r.add(7, 70)
    assert r.line() == "progress: 7/1,000 rows (0.7%), 0.7 copies/s, 0.07 rows/s, 1:40 elapsed, ETA 3:56:25"
