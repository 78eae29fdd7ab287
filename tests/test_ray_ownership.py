"""``mlm-score ray`` touches only what is its own: it replaces an output directory only when it carries the
runner's marker and nothing foreign, takes the output's lock, checks that every input is still what it
planned before scoring a row of it, and what a killed driver leaves (files, Ray processes) does not
outlive it. Most checks run before Ray starts; two tests run a local Ray."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_tsv

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'mlm-scorer[ray]')")
pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install 'mlm-scorer[ray]')")

from mlm_scorer.errors import UsageError  # noqa: E402
from mlm_scorer.ray_data import (OUTPUT_MARKER, _read_split, _scan, _splits, _StartReport,  # noqa: E402
                                 _Workspace, check_replaceable, score_dataset)
from mlm_scorer.writer import OutputLocked  # noqa: E402

pytestmark = pytest.mark.ray

ROWS = [[f"r{i}", f"the cat sat on mat number {i}"] for i in range(40)]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlm_scorer", *args], capture_output=True, text=True, env=_env(),
                          timeout=600, **kw)


# ------------------------------------------------------------------------------------------ the output

def test_a_directory_it_did_not_write_is_never_replaced(fake_export, tmp_path):
    """A directory holding a summary.json that `mlm-score --summary-json` wrote (and a user's notes) is
    not a ray output: refused with exit 2 before anything is touched. So is a forged marker, a symlink,
    and a ray output a user has added files to."""
    a = write_tsv(tmp_path / "a.tsv", ROWS[:3])
    mine = tmp_path / "mine"
    mine.mkdir()
    p = _cli(str(a), "-o", str(mine / "probs.parquet"), "--model", str(fake_export), "--engine", "fake",
             "--id-column", "id", "--summary-json", str(mine / "summary.json"))
    assert p.returncode == 0, p.stderr
    (mine / "NOTES.txt").write_text("x")
    before = {f.name: f.read_bytes() for f in mine.iterdir()}
    p = _cli("ray", str(a), "-o", str(mine), "--model", str(fake_export), "--engine", "fake")
    assert p.returncode == 2, p.stderr
    assert f"is not empty and was not written by mlm-score ray (it has no {OUTPUT_MARKER})" in p.stderr
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == before
    assert not list(tmp_path.glob(".mine*")), "nothing of the run's own was made either"

    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / OUTPUT_MARKER).write_text(json.dumps({"written_by": "someone else", "run_id": "1"}))
    with pytest.raises(UsageError, match="was not written by mlm-score ray"):
        check_replaceable(forged)
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(UsageError, match="is a symbolic link"):
        check_replaceable(link)
    own = tmp_path / "own"
    (own / "words").mkdir(parents=True)
    (own / "sentences").mkdir()
    (own / "words" / "part-00000-000000000000.parquet").write_bytes(b"x")
    (own / OUTPUT_MARKER).write_text(json.dumps({"written_by": "mlm-score ray", "run_id": "abc"}))
    (own / "summary.json").write_text("{}")
    check_replaceable(own)  # its own: may be replaced
    with pytest.raises(UsageError, match=r"exists \(written by mlm-score ray, run abc\); pass overwrite=True"):
        check_replaceable(own, overwrite=False)
    (own / "sentences" / "notes.txt").write_text("x")
    (own / "NOTES.txt").write_text("x")
    with pytest.raises(UsageError, match=r"now also holds NOTES.txt, sentences/notes.txt, which it did not write"):
        check_replaceable(own)
    check_replaceable(tmp_path / "new")  # absent: fine


def test_a_second_run_on_the_same_output_is_refused(fake_export, tmp_path):
    """While a run holds the output's lock (the same lock mlm-score takes: writer.lock_output), another
    run on that output is refused (OutputLocked, exit 2) and changes nothing."""
    a = write_tsv(tmp_path / "a.tsv", ROWS[:3])
    out = tmp_path / "r"
    with _Workspace(out, "live") as ws:
        assert ws.stage.is_dir()
        with pytest.raises(OutputLocked, match=r"another mlm-score run is writing .*r \(lock .*\.r\.mlm-score-ray/lock"):
            score_dataset([str(a)], out, model=str(fake_export), engine="fake")
        p = _cli("ray", str(a), "-o", str(out), "--model", str(fake_export), "--engine", "fake")
        assert p.returncode == 2 and "another mlm-score run is writing" in p.stderr, p.stderr
        assert ws.stage.is_dir() and (ws.dir / "owner.json").is_file()
    assert not ws.dir.exists() and not out.exists()  # a run removes its workspace when it ends


def test_what_a_killed_run_left_is_removed_but_nothing_foreign(tmp_path):
    out = tmp_path / "r"
    ws_dir = tmp_path / ".r.mlm-score-ray"
    (ws_dir / "run-dead" / "words").mkdir(parents=True)
    (ws_dir / "actors").mkdir()
    (ws_dir / "owner.json").write_text(json.dumps({"run_id": "dead", "pid": 1, "host": "h"}))
    (ws_dir / "lock").write_text("")
    old_style = tmp_path / ".r.tmp-999999999"  # an older version's temporary directory, its process gone
    (old_style / "words").mkdir(parents=True)
    with _Workspace(out, "new") as ws:
        assert ws.debris == "run dead, pid 1 on h"
        assert sorted(p.name for p in ws_dir.iterdir()) == ["actors", "lock", "owner.json", "run-new"]
        assert not old_style.exists()
    ws_dir.mkdir()
    (ws_dir / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match="holds mine.txt, which mlm-score ray did not write"):
        _Workspace(out, "new2").__enter__()
    assert (ws_dir / "mine.txt").read_text() == "x"


def test_a_foreign_workspace_loses_nothing(tmp_path):
    """A directory at the workspace's name holding files the runner did not write (in its run and actor
    directories too), or a lock that is not a regular file: refused, exit 2, and every file stays."""
    out = tmp_path / "r"
    ws_dir = tmp_path / ".r.mlm-score-ray"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("x")
    (ws_dir / "run-dead" / "words").mkdir(parents=True)
    (ws_dir / "run-dead" / "words" / "part-00000-000000000000.parquet").write_bytes(b"a dead run's part")
    (ws_dir / "run-dead" / "words" / "thesis.tex").write_text("x")
    (ws_dir / "old-dead").symlink_to(victim)
    (ws_dir / "actors").mkdir()
    (ws_dir / "actors" / "notes.txt").write_text("x")
    (ws_dir / "owner.json").write_text(json.dumps({"run_id": "dead", "pid": 1, "host": "h"}))
    with pytest.raises(UsageError, match=r"holds actors/notes.txt, old-dead, run-dead/words/thesis.tex, which "
                                         r"mlm-score ray did not write"):
        _Workspace(out, "new").__enter__()
    assert (ws_dir / "run-dead" / "words" / "thesis.tex").read_text() == "x"
    assert (ws_dir / "actors" / "notes.txt").read_text() == "x"
    assert (ws_dir / "old-dead").is_symlink() and [p.name for p in victim.iterdir()] == ["thesis.tex"]
    assert not (ws_dir / "run-dead" / "words" / "part-00000-000000000000.parquet").exists(), "its own: removed"
    assert not out.exists()

    fresh = tmp_path / "fresh"
    (tmp_path / ".fresh.mlm-score-ray").mkdir()
    os.mkfifo(tmp_path / ".fresh.mlm-score-ray" / "lock")
    with pytest.raises(UsageError, match=r"the lock file .*\.fresh\.mlm-score-ray/lock' is a FIFO"):
        _Workspace(fresh, "new").__enter__()
    assert (tmp_path / ".fresh.mlm-score-ray" / "lock").is_fifo()


def test_parts_and_status_files_are_written_under_the_runs_own_names(tmp_path):
    """An actor's part and status files: a symlink planted at the temporary name earlier versions used
    (``.NAME.tmp-PID``, ``.NAME.tmp``) is never written through; one at the final name is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlm_scorer.ray_data import _set_status, _write_part

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    schema = pa.schema([pa.field("row", pa.int64())])
    part = tmp_path / "part-00000-000000000000.parquet"
    (tmp_path / f".{part.name}.tmp-{os.getpid()}").symlink_to(victim)
    status = tmp_path / "h-1.json"
    (tmp_path / ".h-1.json.tmp").symlink_to(victim)
    _write_part(part, {"row": [1, 2]}, schema)
    _set_status(status, "ready")
    assert victim.read_text() == "precious\n"
    assert pq.read_table(part).column("row").to_pylist() == [1, 2]
    assert json.loads(status.read_text())["phase"] == "ready"
    part.unlink()
    part.symlink_to(victim)
    with pytest.raises(UsageError, match=r"a part file .*part-00000-000000000000.parquet' is a symlink"):
        _write_part(part, {"row": [3]}, schema)
    assert part.is_symlink() and victim.read_text() == "precious\n"
    status.unlink()
    status.symlink_to(victim)
    _set_status(status, "failed")  # best effort: not written, and nothing left behind
    assert status.is_symlink() and victim.read_text() == "precious\n"
    _set_status(tmp_path / "gone" / "h-2.json", "ready")  # the workspace was removed: not made again
    assert not (tmp_path / "gone").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p and not p.endswith(f"-{os.getpid()}")]


def _ray_output(d: Path, rows: list) -> Path:
    """A directory as mlm-score ray writes it (marker, summary, one part per output), made by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("words", "sentences"):
        (d / sub).mkdir(parents=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}),
                   d / "sentences" / "part-00000-000000000000.parquet")
    pq.write_table(pa.table({"row": [0]}), d / "words" / "part-00000-000000000000.parquet")
    (d / OUTPUT_MARKER).write_text(json.dumps({"written_by": "mlm-score ray", "run_id": "earlier"}))
    (d / "summary.json").write_text("{}")
    return d / "sentences" / "part-00000-000000000000.parquet"


def test_an_input_inside_the_output_directory_is_refused_before_anything_is_touched(fake_export, tmp_path,
                                                                                     monkeypatch):
    """The output directory is replaced as a whole: an input in it (directly, through a symlink, or a hard
    link to a file in it) or in the workspace beside it would be deleted. Refused, exit 2, before Ray."""
    import mlm_scorer.ray_data as rd

    monkeypatch.setattr(rd, "_run_ray", lambda *a, **k: None)  # never reached once refused
    out = tmp_path / "out"
    part = _ray_output(out, ROWS[:3])
    (tmp_path / "link.parquet").symlink_to(part)
    os.link(part, tmp_path / "hard.parquet")
    before = (part.read_bytes(), part.stat().st_ino)
    for given, message in ((part, "lies inside the output directory"), (tmp_path / "link.parquet", "lies inside"),
                           (tmp_path / "hard.parquet", "(a hard link)")):
        with pytest.raises(UsageError, match=re.escape(message)):
            score_dataset([str(given)], out, model=str(fake_export), engine="fake", text_column="text",
                          id_column="id")
        assert (part.read_bytes(), part.stat().st_ino) == before
    ws_part = tmp_path / ".out.mlm-score-ray" / "run-dead" / "sentences" / part.name
    ws_part.parent.mkdir(parents=True)
    ws_part.write_bytes(part.read_bytes())
    with pytest.raises(UsageError, match="lies inside the runner's workspace"):
        score_dataset([str(ws_part)], out, model=str(fake_export), engine="fake", text_column="text", id_column="id")
    assert ws_part.read_bytes() == before[0]
    p = _cli("ray", str(part), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--text-column",
             "text")
    assert p.returncode == 2 and "lies inside the output directory" in p.stderr and "Traceback" not in p.stderr
    assert (part.read_bytes(), part.stat().st_ino) == before


def test_publish_moves_back_what_appeared_at_the_output_after_its_check(tmp_path, monkeypatch):
    """The output is checked, then moved into the workspace and checked again there: a symlink put at its
    path in between is moved back (not deleted with the replaced output), and the run refused."""
    import mlm_scorer.ray_data as rd

    out = tmp_path / "out"
    _ray_output(out, ROWS[:3])
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("x")
    real = rd.check_replaceable

    def check_then_swap(path, **kw):
        real(path, **kw)
        if path == out and not out.is_symlink():  # the user's link appears just after the check
            os.rename(out, tmp_path / "moved")
            out.symlink_to(victim)

    monkeypatch.setattr(rd, "check_replaceable", check_then_swap)
    with _Workspace(out, "new") as ws:
        (ws.stage / "sentences" / "part-00000-000000000000.parquet").write_bytes(b"new")
        with pytest.raises(UsageError, match="is a symbolic link"):
            ws.publish(overwrite=True)
    assert out.is_symlink() and os.readlink(out) == str(victim)
    assert [p.name for p in victim.iterdir()] == ["thesis.tex"]
    assert not (tmp_path / ".out.mlm-score-ray").exists()


def test_summary_json_is_checked_before_the_run_and_never_replaces_what_the_run_reads(fake_export, tmp_path,
                                                                                       monkeypatch, capsys):
    """``mlm-score ray --summary-json``: an input, the baseline, the output directory or a path in it, a
    symlink, a FIFO or a device are refused (exit 2) before the run starts; a symlink put there during the
    run is a clear error (the output is complete), not a traceback."""
    import stat

    import mlm_scorer.ray_data as rd
    from mlm_scorer.ray_cli import main

    a = write_tsv(tmp_path / "a.tsv", ROWS[:3])
    base = tmp_path / "base"
    _ray_output(base, ROWS[:3])
    calls = []

    def fake_run(inputs, output_dir, settings=None, **kw):
        calls.append(output_dir)
        return {"scored": 3, "rows": 3, "words": 9, "copies": 9, "actors": 1, "nodes": 1, "seconds": 0.1,
                "skipped": 0, "flagged": 0, "words_output": "w", "sentences_output": "s"}

    monkeypatch.setattr(rd, "score_dataset", fake_run)
    out = tmp_path / "out"
    _ray_output(out, ROWS[:3])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "link.json").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.json")
    devices = [(tmp_path / "null.json", "is a character device")] if os.geteuid() == 0 else []  # mknod needs root
    for dev, _ in devices:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    before = {p: p.read_bytes() for p in (a, victim, *base.rglob("*.parquet"), *out.rglob("*.parquet"))}
    for target, message in ((a, "is an input"), (out, "is the output directory"),
                            (out / "summary.json", "lies inside the output directory"),
                            (tmp_path / ".out.mlm-score-ray" / "s.json", "lies inside the runner's workspace"),
                            (base / "sentences" / "part-00000-000000000000.parquet", "inside the baseline directory"),
                            (tmp_path / "link.json", "is a symlink"), (tmp_path / "fifo.json", "is a FIFO"),
                            (tmp_path / "nodir" / "s.json", "does not exist"), *devices):
        code = main([str(a), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--baseline", str(base),
                     "--flag-above", "pseudo_perplexity=p90", "--summary-json", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and str(target) in err and "Traceback" not in err, (target, err)
    assert calls == [], "refused before the run"
    assert {p: p.read_bytes() for p in before} == before
    assert (tmp_path / "fifo.json").is_fifo() and all(dev.is_char_device() for dev, _ in devices)

    summary = tmp_path / "s.json"

    def run_then_plant(inputs, output_dir, settings=None, **kw):
        summary.symlink_to(victim)  # appears while the run scores
        return fake_run(inputs, output_dir, settings, **kw)

    monkeypatch.setattr(rd, "score_dataset", run_then_plant)
    code = main([str(a), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--summary-json",
                 str(summary)])
    err = capsys.readouterr().err
    assert code == 2 and "is a symlink" in err and f"the output {out} is complete" in err and "Traceback" not in err
    assert victim.read_text() == "precious\n" and summary.is_symlink()


# ------------------------------------------------------------------------------------------ the inputs

def _plan(path: Path, **kw) -> list[dict]:
    return _splits(_scan([str(path)], header=True, batch_rows=8), header=True, batches_per_split=16,
                   num_actors=1, batch_rows=8, **kw)


def _read(spec: dict) -> list:
    from mlm_scorer.reader import Layout

    lay = Layout(names=["id", "text"], text=1, id=0, passthrough=[])  # as the driver found it when planning
    return [row for rows in _read_split(spec, lay, text_column=None, id_column="id", header=True) for row in rows]


def test_an_input_rewritten_after_planning_is_refused_before_a_row_is_read(tmp_path):
    """The actor checks size and mtime, then the hash of the header and of each batch as it reads it:
    a rewrite of the same size with its mtime put back is caught as well as an append; a Parquet input
    by its footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tsv = write_tsv(tmp_path / "in.tsv", ROWS)
    spec = _plan(tsv)[0]
    assert len(_read(spec)) == 40  # unchanged: read whole
    st = tsv.stat()
    raw = tsv.read_bytes()
    tsv.write_bytes(raw.replace(b"number 30", b"NUMBER 30"))  # same size, in the fourth batch
    os.utime(tsv, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(UsageError, match=r"in.tsv changed after the run planned its splits \(the bytes of lines "
                                         r"26-33 differ\); nothing of this run is published"):
        _read(spec)
    tsv.write_bytes(raw.replace(b"id\ttext", b"ID\ttext"))
    os.utime(tsv, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(UsageError, match="its header line differs"):
        _read(spec)
    tsv.write_bytes(raw + b"r40\tone more\n")
    with pytest.raises(UsageError, match=r"\(size [\d,]+ and mtime \d+ instead of [\d,]+ and \d+\)"):
        _read(spec)

    pqf = tmp_path / "in.parquet"
    t = pa.table({"id": [r[0] for r in ROWS], "text": [r[1] for r in ROWS]})
    pq.write_table(t, pqf, compression="none")
    spec = _plan(pqf)[0]
    assert len(_read(spec)) == 40
    st = pqf.stat()
    pq.write_table(pa.table({"id": [r[0] for r in ROWS], "text": [r[1].upper() for r in ROWS]}), pqf,
                   compression="none")
    os.utime(pqf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pqf.stat().st_size == st.st_size
    with pytest.raises(UsageError, match="its Parquet footer differs"):
        _read(spec)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for this module's tests, shut down after them if they started it (a later test's
    ``ray.init`` would fail on one left running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def test_a_run_whose_input_changes_after_planning_publishes_nothing(local_ray, fake_export, tmp_path, monkeypatch):
    """Through the actors: the input is rewritten between planning and scoring; under ``skip`` no row is
    recorded as skipped, the run fails with the input named, and no output appears."""
    import mlm_scorer.ray_data as rd

    tsv = write_tsv(tmp_path / "in.tsv", ROWS)
    plan = rd._splits

    def plan_then_rewrite(*a, **kw):
        splits = plan(*a, **kw)
        tsv.write_text(tsv.read_text().replace("mat number", "rug number"))
        return splits

    monkeypatch.setattr(rd, "_splits", plan_then_rewrite)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"in.tsv changed after the run planned its splits"):
        score_dataset([str(tsv)], out, model=str(fake_export), engine="fake", id_column="id", on_bad_row="skip",
                      num_actors=1, num_cpus_per_actor=0.5, batch_rows=8)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------------------------------ a killed driver

def _descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below ``pid`` (from /proc)."""
    children, starts = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(d))
            starts[int(d)] = fields[19]
    todo, found = [pid], {}
    while todo:
        for c in children.get(todo.pop(), []):
            found[c] = starts[c]
            todo.append(c)
    return found


def _running(procs: dict[int, str]) -> list[int]:
    alive = []
    for p, start in procs.items():
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[19] == start:
                alive.append(p)
        except OSError:
            pass
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_killed_driver_leaves_no_ray_process_and_the_next_run_cleans_up(fake_export, tmp_path):
    """A run on ``out`` is scoring; a second run on ``out`` is refused (its lock). The first driver is
    killed with SIGKILL: none of the processes it started outlives it by more than a few seconds (Ray's
    agents used to linger a minute), and the next run on ``out`` removes what it left and publishes."""
    big = write_tsv(tmp_path / "big.tsv", [[f"r{i}", f"the cat sat on the mat {i}"] for i in range(3000)])
    small = write_tsv(tmp_path / "small.tsv", ROWS[:5])
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "mlm_scorer", "ray", str(big), "-o", str(out), "--model",
                          str(fake_export), "--engine", "fake", "--engine-option", "delay=0.3", "--batch-rows", "64",
                          "--id-column", "id", "--no-progress"], stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.mlm-score-ray/run-*/sentences/part-*.parquet")):  # scoring has begun
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    second = _cli("ray", str(small), "-o", str(out), "--model", str(fake_export), "--engine", "fake")
    assert second.returncode == 2 and "another mlm-score run is writing" in second.stderr, second.stderr
    started = _descendants(p.pid)
    assert any("raylet" in Path(f"/proc/{q}/cmdline").read_text(errors="replace") for q in _running(started))
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 20
    while _running(started) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {q: Path(f"/proc/{q}/cmdline").read_text(errors="replace")[:80] for q in _running(started)}
    assert not left, f"still running 20 s after the driver was killed: {left}"
    assert (tmp_path / ".out.mlm-score-ray").is_dir() and not out.exists()  # what the dead run left
    third = _cli("ray", str(small), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--id-column",
                 "id")
    assert third.returncode == 0, third.stderr
    assert "removed what a killed earlier run on" in third.stderr
    assert not (tmp_path / ".out.mlm-score-ray").exists()
    assert json.loads((out / "summary.json").read_text())["rows"] == 5
    assert json.loads((out / OUTPUT_MARKER).read_text())["run_id"] == json.loads((out / "summary.json").read_text())[
        "run_id"]


# ------------------------------------------------------------------------------------------ start-up report

def test_the_start_up_report_says_what_the_actors_do(tmp_path):
    status = tmp_path / "actors"
    status.mkdir()
    rep = _StartReport(status, 3, first=3600)
    try:
        now = time.time()
        (status / "h-1.json").write_text(json.dumps({"phase": "loading the model with engine saved_model",
                                                     "since": now - 42, "pid": 1}))
        (status / "h-2.json").write_text(json.dumps({"phase": "ready", "since": now, "pid": 2}))
        line, ready = rep.describe()
        assert not ready
        assert line.startswith("actors: 1 of 3 ready after ")
        assert line.endswith(": 1 loading the model with engine saved_model (42 s), 1 waiting for Ray to start its "
                             "process")
        (status / "h-1.json").write_text(json.dumps({"phase": "ready", "since": now, "pid": 1}))
        (status / "h-3.json").write_text(json.dumps({"phase": "ready", "since": now, "pid": 3}))
        assert rep.describe()[1]
    finally:
        rep.stop()


def test_help_is_plain_text():
    from mlm_scorer.ray_cli import build_parser

    text = build_parser().format_help()
    assert "``" not in text and text.count("mlm-score ray: score TSV/Parquet files") == 1
    assert "a line every 10 s says what they are doing" in " ".join(text.split())
