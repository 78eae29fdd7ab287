"""The persistent score cache (--cache DIR): a rerun scores nothing new and writes the same Parquet; a
run with 10 % new rows scores only those; concurrent runs share it safely; other modes never hit."""
from __future__ import annotations

import os
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
