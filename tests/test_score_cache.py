"""The persistent score cache (--cache DIR): a rerun scores nothing new and writes the same Parquet; a
run with 10 % new rows scores only those; concurrent runs share it safely; other modes never hit."""
from __future__ import annotations

import os
from pathlib import Path
import random
import subprocess
import sys

from helpers import read_outputs

from mlm_scorer import score_file
from mlm_scorer.engines.fake import FakeEngine
from mlm_scorer.engines.base import get_engine
from mlm_scorer.model_dir import ModelDir
from mlm_scorer.scorer import Scorer

WORDS = "the cat sat on a mat dog ran big small house read book people walk good bad new old".split()


def _tsv(path, texts):
    path.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def _texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + f" {seed} {i}" for i in range(n)]


def _scorer(md, cache_dir, mode="whole-word", engine=None):
    return Scorer(md, engine or FakeEngine(md), mode=mode, store_dir=str(cache_dir))


def test_rerun_scores_nothing_new_and_writes_the_same_parquet(tiny_export, tmp_path):
    md = ModelDir.open(tiny_export)
    tsv = _tsv(tmp_path / "in.tsv", _texts(60, 1))
    with get_engine("saved_model", model=md, top_k=True) as eng:
        s1 = score_file(tsv, tmp_path / "a.parquet", scorer=Scorer(md, eng, top_k=3, store_dir=str(tmp_path / "c")),
                        id_column="id")
        second = Scorer(md, eng, top_k=3, store_dir=str(tmp_path / "c"))
        s2 = score_file(tsv, tmp_path / "b.parquet", scorer=second, id_column="id")
    assert s1.cache_hits == 0 and s1.copies > 0
    assert s2.copies == 0 and s2.cache_hits == s2.cache_lookups == 60
    assert read_outputs(tmp_path / "a.parquet") == read_outputs(tmp_path / "b.parquet")


def test_ten_percent_new_rows_scores_only_those(fake_export, tmp_path):
    md = ModelDir.open(fake_export)
    old, new = _texts(90, 2), _texts(10, 3)
    score_file(_tsv(tmp_path / "day1.tsv", old), tmp_path / "d1.parquet", scorer=_scorer(md, tmp_path / "c"))
    eng = FakeEngine(md)
    day2 = old[:45] + new + old[45:]
    s = score_file(_tsv(tmp_path / "day2.tsv", day2), tmp_path / "d2.parquet", scorer=_scorer(md, tmp_path / "c", engine=eng))
    only_new = FakeEngine(md)
    Scorer(md, only_new).score(new)
    assert eng.copies == only_new.copies > 0
    assert s.cache_hits == 90 and s.cache_lookups == 100
    # and the output equals a run without any cache
    score_file(_tsv(tmp_path / "day2b.tsv", day2), tmp_path / "ref.parquet", scorer=Scorer(md, FakeEngine(md)))
    _, a = read_outputs(tmp_path / "d2.parquet")
    _, b = read_outputs(tmp_path / "ref.parquet")
    assert [r["pll"] for r in a] == [r["pll"] for r in b]


def test_other_mode_or_model_never_hits(fake_export, tmp_path):
    md = ModelDir.open(fake_export)
    tsv = _tsv(tmp_path / "in.tsv", _texts(20, 4))
    score_file(tsv, tmp_path / "a.parquet", scorer=_scorer(md, tmp_path / "c", mode="whole-word"))
    s = score_file(tsv, tmp_path / "b.parquet", scorer=_scorer(md, tmp_path / "c", mode="token"))
    assert s.cache_hits == 0 and s.copies > 0


def test_concurrent_runs_share_the_cache_safely(fake_export, tmp_path):
    texts = _texts(400, 5)
    tsv = _tsv(tmp_path / "in.tsv", texts)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(tmp_path / f"o{i}.parquet"),
                               "--model", str(fake_export), "--engine", "fake", "--engine-option", "delay=0.01",
                               "--cache", str(tmp_path / "c"), "--chunk-rows", "20", "-q", "--id-column", "id"],
                              env=env, stderr=subprocess.PIPE) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    score_file(tsv, tmp_path / "ref.parquet", model=fake_export, engine="fake", id_column="id")
    ref = read_outputs(tmp_path / "ref.parquet")
    for i in range(3):
        assert read_outputs(tmp_path / f"o{i}.parquet") == ref
    md = ModelDir.open(fake_export)
    s = score_file(tsv, tmp_path / "again.parquet", scorer=_scorer(md, tmp_path / "c"), id_column="id")
    assert s.copies == 0 and s.cache_hits == 400


# ----------------------------------------------------------------------------------------- integrity

def _patch_blob(db, blob: bytes, new: bytes) -> None:
    """Overwrite the first ``len(new)`` bytes of a stored value inside the database file, as a disk or a
    careless tool would: SQLite still reads the page happily. Every occurrence (a freed page may hold an
    old copy of the live one)."""
    raw = bytearray(db.read_bytes())
    at = raw.find(blob)
    assert at > 0, "the value is in the file"
    while at >= 0:
        raw[at:at + len(new)] = new
        at = raw.find(blob, at + 1)
    db.write_bytes(bytes(raw))


def test_corrupted_entries_are_rescored_counted_and_the_output_is_clean(fake_export, tmp_path):
    import sqlite3
    import struct

    import numpy as np

    md = ModelDir.open(fake_export)
    texts = _texts(40, 6)
    tsv = _tsv(tmp_path / "in.tsv", texts)
    cache = tmp_path / "c"
    sc = _scorer(md, cache)
    score_file(tsv, tmp_path / "ref.parquet", scorer=sc, id_column="id")
    sc.store.close()  # the last connection checkpoints the WAL into the database file
    db = cache / "scores.sqlite"
    with sqlite3.connect(db) as con:
        blobs = [r[0] for r in con.execute("SELECT piece_log_probs FROM scores ORDER BY key LIMIT 2")]
    con.close()
    assert not (cache / "scores.sqlite-wal").exists()
    _patch_blob(db, blobs[0], struct.pack("<d", 1.4e-144))  # an impossible positive log-prob
    first = np.frombuffer(blobs[1], np.float64)[0]
    _patch_blob(db, blobs[1], struct.pack("<d", first + 0.25))  # a plausible one: only the checksum sees it
    eng = FakeEngine(md)
    s = score_file(tsv, tmp_path / "again.parquet", scorer=_scorer(md, cache, engine=eng), id_column="id")
    assert s.cache_rejected == 2 and s.cache_hits == 38 and s.cache_lookups == 40
    assert eng.copies > 0 and "2 damaged cache entries dropped and scored again" in s.line()
    assert read_outputs(tmp_path / "again.parquet") == read_outputs(tmp_path / "ref.parquet")
    # the damaged entries were replaced: a third run hits everything
    s = score_file(tsv, tmp_path / "third.parquet", scorer=_scorer(md, cache), id_column="id")
    assert s.cache_hits == 40 and s.cache_rejected == 0


def test_an_unreadable_cache_names_the_file_and_the_fix(fake_export, tmp_path, capsys):
    from mlm_scorer.cli import main

    tsv = _tsv(tmp_path / "in.tsv", _texts(30, 7))
    args = [str(tsv), "-o", str(tmp_path / "o.parquet"), "--model", str(fake_export), "--engine", "fake", "-q",
            "--id-column", "id", "--cache"]
    assert main(args + [str(tmp_path / "c")]) == 0
    db = tmp_path / "c" / "scores.sqlite"
    raw = bytearray(db.read_bytes())
    page = int.from_bytes(raw[16:18], "big")
    raw[page:] = b"\x5a" * (len(raw) - page)  # every page after the first is garbage; the header is intact
    db.write_bytes(bytes(raw))
    junk = tmp_path / "j"
    junk.mkdir()
    (junk / "scores.sqlite").write_bytes(b"this is not a database" * 100)
    for cache in (tmp_path / "c", junk):
        code = main(args + [str(cache)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"{cache / 'scores.sqlite'}" in err and "rm " in err and "--cache" in err, err
        assert "internal error" not in err and "Traceback" not in err


def _without_root_powers(cmd: list[str]) -> list[str]:
    """``cmd`` so that it obeys file permissions: as root, drop CAP_DAC_OVERRIDE (root writes anywhere)."""
    if os.geteuid() != 0:
        return cmd
    import shutil

    import pytest

    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be made here")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]


def test_read_only_cache_directory_is_used_read_only_or_refused(fake_export, tmp_path):
    texts = _texts(30, 8)
    tsv = _tsv(tmp_path / "in.tsv", texts)
    cache = tmp_path / "cache"
    md = ModelDir.open(fake_export)
    sc = _scorer(md, cache)
    score_file(tsv, tmp_path / "ref.parquet", scorer=sc, id_column="id")
    sc.store.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    for d in (cache, empty):
        os.chmod(d, 0o555)
    os.chmod(cache / "scores.sqlite", 0o444)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def cli(cache_dir, out):
        return subprocess.run(_without_root_powers(
            [sys.executable, "-m", "mlm_scorer", str(tsv), "-o", str(out), "--model", str(fake_export), "--engine",
             "fake", "--id-column", "id", "--cache", str(cache_dir)]), env=env, capture_output=True, text=True)

    try:
        p = cli(cache, tmp_path / "a.parquet")
        assert p.returncode == 0, p.stderr
        assert "hit rate 100.0% (30/30)" in p.stderr and "cache read-only" in p.stderr
        assert read_outputs(tmp_path / "a.parquet") == read_outputs(tmp_path / "ref.parquet")
        assert sorted(os.listdir(cache)) == ["scores.sqlite"], "nothing written into a read-only cache"
        p = cli(empty, tmp_path / "b.parquet")
        assert p.returncode == 2 and "cannot be written" in p.stderr and "Permission denied" in p.stderr, p.stderr
        assert "holds no cache" in p.stderr
    finally:
        for d in (cache, empty):
            os.chmod(d, 0o755)
