"""Never silently wrong: inputs that are pipes, output names that collide with the input, SIGTERM, a full
disk, damaged committed parts. Each case runs the real CLI (in-process or as a subprocess) on the fake
engine and compares with an undisturbed run."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import read_outputs

from mlm_scorer.cli import main

WORDS = "the cat sat on a mat dog ran big small house read book people walk good bad new old".split()


def _tsv_bytes(n: int, seed: int = 0) -> bytes:
    import random

    rng = random.Random(seed)
    rows = [f"r{i}\t" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for i in range(n)]
    return ("id\ttext\n" + "\n".join(rows) + "\n").encode()


def _args(inp, out, fake_export, *extra):
    return [str(inp), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--id-column", "id",
            "--chunk-rows", "100", *map(str, extra)]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "mlm_scorer", *map(str, args)]


def _reference(tmp_path, data: bytes, fake_export):
    ref_in = tmp_path / "ref_in.tsv"
    ref_in.write_bytes(data)
    ref = tmp_path / "ref.parquet"
    assert main(_args(ref_in, ref, fake_export, "-q")) == 0
    return read_outputs(ref)


# ----------------------------------------------------------------------------------------- pipes

def test_fifo_input_gives_every_row(tmp_path, fake_export):
    data = _tsv_bytes(2000)
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=fifo.write_bytes, args=(data,), daemon=True)
    feeder.start()
    out = tmp_path / "out.parquet"
    p = subprocess.run(_cli(*_args(fifo, out, fake_export)), env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "scored 2000/2000 rows" in p.stderr
    assert read_outputs(out) == _reference(tmp_path, data, fake_export)


@pytest.mark.parametrize("how", ["dev_stdin", "process_substitution"])
def test_pipe_input_gives_every_row_with_a_progress_bar(how, tmp_path, fake_export):
    data = _tsv_bytes(2000, seed=1)
    src = tmp_path / "src.tsv"
    src.write_bytes(data)
    out = tmp_path / "out.parquet"
    env = {**_env(), "MLM_SCORER_PROGRESS": "1"}  # the progress total must not drain the pipe either
    if how == "dev_stdin":
        cmd = " ".join(_cli("/dev/stdin", "-o", out, "--model", fake_export, "--engine", "fake", "--id-column", "id"))
        p = subprocess.run(f"cat {src} | {cmd}", shell=True, env=env, capture_output=True, text=True)
    else:
        cmd = " ".join(_cli("<(cat " + str(src) + ")", "-o", out, "--model", fake_export, "--engine", "fake",
                            "--id-column", "id"))
        p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "scored 2000/2000 rows" in p.stderr
    assert read_outputs(out) == _reference(tmp_path, data, fake_export)


def test_stdin_resume_checks_the_committed_prefix(tmp_path, fake_export):
    """A stream cannot be hashed ahead, so each committed part records the sha256 of the bytes read up to
    it; --resume re-reads the stream, checks that prefix and scores only the rest."""
    data = _tsv_bytes(1500, seed=2)
    bad = data.replace(b"r1000\t", b"r1000\tzz ")  # differs after the committed rows: resumable
    out = tmp_path / "out.parquet"
    # fail at a bad row after 6 chunks were committed
    broken = data.replace(b"r650\t", b"r650\tx\ty\t")
    p = subprocess.run(_cli("-", "-o", out, "--model", fake_export, "--engine", "fake", "--id-column", "id",
                            "--chunk-rows", "100"), input=broken, env=_env(), capture_output=True)
    err = p.stderr.decode()
    assert p.returncode == 3 and "rows are committed" in err and "--resume" in err, err
    # a stream whose first rows differ from the committed ones is refused, and nothing is lost
    other = _tsv_bytes(1500, seed=3)
    p = subprocess.run(_cli("-", "-o", out, "--model", fake_export, "--engine", "fake", "--id-column", "id",
                            "--chunk-rows", "100", "--resume"), input=other, env=_env(), capture_output=True)
    assert p.returncode == 2 and "differ from those committed" in p.stderr.decode(), p.stderr.decode()
    assert (tmp_path / "out.parquet.parts" / "progress.json").is_file() and not out.exists()
    # the same first 600 rows (the rest may differ: it was never committed) resume
    p = subprocess.run(_cli("-", "-o", out, "--model", fake_export, "--engine", "fake", "--id-column", "id",
                            "--chunk-rows", "100", "--resume"), input=bad, env=_env(), capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    assert "resumed after 600 committed rows" in p.stderr.decode()
    assert read_outputs(out) == _reference(tmp_path, bad, fake_export)


# ------------------------------------------------------------------------------------ collisions

def _collision_layouts(t: Path):
    """(name, where the input lives) for every file a run on ``t/o.parquet`` replaces or deletes."""
    return {
        "sentences_output": t / "o.sentences.parquet",
        "words_output": t / "o.parquet",
        "inside_parts": t / "o.parquet.parts" / "in.tsv",
        "a_part": t / "o.parquet.parts" / "words-000000.parquet",
        "progress": t / "o.parquet.parts" / "progress.json",
        "stale_tmp_name": t / ".o.parquet.tmp-999999999",
        "sentences_tmp_name": t / ".o.sentences.parquet.tmp-999999998",
    }


@pytest.mark.parametrize("where", sorted(_collision_layouts(Path("."))))
@pytest.mark.parametrize("link", ["same_path", "hardlink", "symlink"])
def test_input_colliding_with_any_output_name_is_refused_untouched(where, link, tmp_path, fake_export, capsys):
    t = tmp_path / "t"
    t.mkdir()
    data = _tsv_bytes(50)
    target = _collision_layouts(t)[where]
    target.parent.mkdir(parents=True, exist_ok=True)
    if link == "same_path":
        inp = target
        inp.write_bytes(data)
    else:
        inp = tmp_path / "elsewhere.tsv"
        inp.write_bytes(data)
        if link == "hardlink":
            os.link(inp, target)
        else:
            target.symlink_to(inp)
    before = {p: (p.lstat().st_ino, p.read_bytes()) for p in (inp, target)}
    code = main(_args(inp, t / "o.parquet", fake_export, "-q"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "refus" in err and str(target.name) in err, err
    for p, (ino, content) in before.items():
        assert p.lstat().st_ino == ino and p.read_bytes() == content, f"{p} was touched"


def test_summary_json_and_cache_naming_the_input_are_refused(tmp_path, fake_export, capsys):
    data = _tsv_bytes(20)
    inp = tmp_path / "in.tsv"
    inp.write_bytes(data)
    code = main(_args(inp, tmp_path / "o.parquet", fake_export, "-q", "--summary-json", inp))
    assert code == 2 and "refus" in capsys.readouterr().err
    cache = tmp_path / "c"
    cache.mkdir()
    os.link(inp, cache / "scores.sqlite")
    code = main(_args(inp, tmp_path / "o.parquet", fake_export, "-q", "--cache", cache))
    assert code == 2 and "refus" in capsys.readouterr().err
    assert inp.read_bytes() == data and not (tmp_path / "o.parquet").exists()


# --------------------------------------------------------------------------------------- signals

def _committed(progress: Path) -> int:
    try:
        return sum(part["rows"] for part in json.loads(progress.read_text())["parts"])
    except (FileNotFoundError, ValueError):
        return 0


def _wait_for_commits(p, progress, n=1, timeout=60):
    deadline = time.monotonic() + timeout
    while _committed(progress) < n and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_sigterm_says_what_is_committed_and_resume_gives_the_clean_output(tmp_path, fake_export):
    data = _tsv_bytes(1500, seed=4)
    inp = tmp_path / "in.tsv"
    inp.write_bytes(data)
    out = tmp_path / "out.parquet"
    progress = tmp_path / "out.parquet.parts" / "progress.json"
    cmd = _cli(*_args(inp, out, fake_export, "--engine-option", "delay=0.02", "--max-batch-size", "16"))
    p = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_commits(p, progress, n=200)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    done = _committed(progress)
    assert 0 < done < 1500
    assert "terminated" in err and f"{done} rows are committed" in err and "--resume" in err, err
    assert "Traceback" not in err
    leftovers = [f for f in os.listdir(tmp_path) if ".tmp" in f] + \
        [f for f in os.listdir(tmp_path / "out.parquet.parts") if ".tmp" in f]
    assert not leftovers and not out.exists()
    p = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"resumed after {done} committed rows" in p.stderr
    assert read_outputs(out) == _reference(tmp_path, data, fake_export)


def test_a_second_sigterm_while_stopping_keeps_the_first_ones_message(tmp_path, fake_export):
    """SIGTERM twice (a supervisor repeating itself) while the engine thread finishes its batch: the run stops
    once, says what is committed and how to resume, and a resume gives the clean output."""
    data = _tsv_bytes(600, seed=6)
    inp = tmp_path / "in.tsv"
    inp.write_bytes(data)
    out = tmp_path / "out.parquet"
    progress = tmp_path / "out.parquet.parts" / "progress.json"
    cmd = _cli(*_args(inp, out, fake_export, "--engine-option", "delay=0.5", "--max-batch-size", "16"))
    p = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_commits(p, progress, n=100)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the engine thread is still in its 0.5 s batch
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    done = _committed(progress)
    assert f"terminated (SIGTERM); nothing was written at the output path; {done} rows are committed" in err, err
    assert "already stopping" in err and "outside the scoring loop" not in err and "Traceback" not in err
    p = subprocess.run(cmd[:-4] + ["--engine-option", "delay=0", "--max-batch-size", "16", "--resume"], env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert read_outputs(out) == _reference(tmp_path, data, fake_export)


def test_sigterm_on_stdin_says_how_to_resume_it(tmp_path, fake_export):
    data = _tsv_bytes(1500, seed=5)
    out = tmp_path / "out.parquet"
    progress = tmp_path / "out.parquet.parts" / "progress.json"
    cmd = _cli(*_args("-", out, fake_export, "--engine-option", "delay=0.02", "--max-batch-size", "16"))
    p = subprocess.Popen(cmd, env=_env(), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(data)
    p.stdin.close()
    _wait_for_commits(p, progress, n=100)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    err = p.stderr.read().decode()
    assert p.returncode == 143, err
    assert "rows are committed" in err and "same input on stdin" in err and "--resume" in err, err


# ------------------------------------------------------------------------------ disk full, parts

def test_disk_full_says_what_is_committed_and_resume_completes(tmp_path, fake_export, monkeypatch, capsys):
    import mlm_scorer.writer as writer

    data = _tsv_bytes(1000, seed=6)
    inp = tmp_path / "in.tsv"
    inp.write_bytes(data)
    out = tmp_path / "out.parquet"
    real = writer.pq.write_table
    calls = {"n": 0}

    def full(table, where, **kw):
        calls["n"] += 1
        if calls["n"] > 8:  # 4 chunks (words + sentences parts) fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, **kw)

    monkeypatch.setattr(writer.pq, "write_table", full)
    code = main(_args(inp, out, fake_export, "-q"))
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err
    assert "400 rows are committed" in err and "--resume" in err, err
    assert not [f for f in os.listdir(tmp_path / "out.parquet.parts") if ".tmp" in f]
    monkeypatch.setattr(writer.pq, "write_table", real)
    assert main(_args(inp, out, fake_export, "-q", "--resume")) == 0
    assert read_outputs(out) == _reference(tmp_path, data, fake_export)


def test_resume_validates_committed_parts_before_scoring(tmp_path, fake_export, capsys):
    """A damaged part is found before anything is scored: it and the parts after it are discarded and
    their rows scored again (said in the summary); the output equals an undisturbed run."""
    data = _tsv_bytes(1000, seed=7).replace(b"r650\t", b"r650\tx\ty\t")
    inp = tmp_path / "in.tsv"
    inp.write_bytes(data)
    out = tmp_path / "out.parquet"
    assert main(_args(inp, out, fake_export, "-q")) == 3  # a bad row under fail: 600 rows committed
    parts = tmp_path / "out.parquet.parts"
    victim = parts / "sentences-000003.parquet"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    (parts / "words-000005.parquet").unlink()  # and a later one missing: discarded too
    capsys.readouterr()
    code = main(_args(inp, out, fake_export, "--resume", "--on-bad-row", "skip"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "resumed after 300 committed rows" in err and "sentences-000003.parquet" in err and "damaged" in err
    ref = tmp_path / "ref.parquet"
    assert main(_args(inp, ref, fake_export, "-q", "--on-bad-row", "skip")) == 0
    assert read_outputs(out) == read_outputs(ref)


# --------------------------------------------------------------- property: the input is never touched

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Where the input may lie, relative to the output path OUT: every file a run writes or deletes, and some
# it must leave alone.
PLACES = {
    "words": lambda o: o,
    "sentences": lambda o: o.with_name((o.name[:-8] if o.name.endswith(".parquet") else o.name)
                                       + ".sentences.parquet"),
    "words_tmp": lambda o: o.with_name(f".{o.name}.tmp-999999999"),
    "in_parts": lambda o: Path(str(o) + ".parts") / "input.tsv",
    "part": lambda o: Path(str(o) + ".parts") / "sentences-000000.parquet",
    "progress": lambda o: Path(str(o) + ".parts") / "progress.json",
    "lock": lambda o: Path(str(o) + ".parts") / "lock",
    "summary": lambda o: o.with_name("summary.json"),
    "cache_db": lambda o: o.parent / "cache" / "scores.sqlite",
    "cache_wal": lambda o: o.parent / "cache" / "scores.sqlite-wal",
    "beside": lambda o: o.with_name("in.tsv"),
    "elsewhere": lambda o: o.parent.parent / "data" / "in.tsv",
}
SAFE = {"beside", "elsewhere"}

names = st.one_of(st.sampled_from(["o.parquet", "o", "in.sentences.parquet", ".o.parquet", "o.parquet.parts",
                                   "x.y.parquet"]),
                  st.text(alphabet="ab._-", min_size=1, max_size=10).filter(lambda s: s not in (".", "..")))


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=names, sub=st.booleans(), place=st.sampled_from(sorted(PLACES)),
       link=st.sampled_from(["direct", "hardlink", "symlink"]), give_link=st.booleans(),
       stale_parts=st.booleans(), summary=st.booleans(), cache=st.booleans(), resume=st.booleans())
def test_no_run_ever_writes_to_or_deletes_its_input(fake_export_session, name, sub, place, link, give_link,
                                                     stale_parts, summary, cache, resume):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        out = root / "w" / ("sub" if sub else "") / name
        out.parent.mkdir(parents=True, exist_ok=True)
        where = PLACES[place](out)
        if where == out.parent or where.name in ("", ".", ".."):
            return
        data = _tsv_bytes(7, seed=len(name))
        if stale_parts:  # a parts directory left by an interrupted run
            parts = Path(str(out) + ".parts")
            parts.mkdir(exist_ok=True)
            (parts / "words-000000.parquet").write_bytes(b"stale")
        where.parent.mkdir(parents=True, exist_ok=True)
        if link == "direct":
            real = given_path = where
            if real.exists():
                return
            real.write_bytes(data)
        else:
            real = root / "real" / "in.tsv"
            real.parent.mkdir()
            real.write_bytes(data)
            if where.exists():
                return
            os.link(real, where) if link == "hardlink" else where.symlink_to(real)
            given_path = where if give_link else real
        ino = real.stat().st_ino
        args = [given_path, "-o", out, "--model", fake_export_session, "--engine", "fake", "-q", "--id-column", "id"]
        if summary:
            args += ["--summary-json", PLACES["summary"](out)]
        if cache:
            args += ["--cache", out.parent / "cache"]
        if resume:
            args.append("--resume")
        code = main([str(a) for a in args])
        event(f"exit {code}")
        assert real.exists() and real.stat().st_ino == ino and real.read_bytes() == data, "the input was touched"
        assert given_path.exists() and given_path.read_bytes() == data
        collides = place not in SAFE and not (place == "summary" and not summary) and \
            not (place.startswith("cache") and not cache)
        if collides:
            assert code == 2, (place, link)
        else:
            assert code in (0, 2)
