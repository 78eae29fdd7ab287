"""Peak RSS does not grow with the number of rows (1x and 10x the input within ±10 %) nor with their
length: a row past --max-row-chars is a bad row before it is tokenized, and rows below it are scored in
bounded memory."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from helpers import read_outputs

PROBE = Path(__file__).resolve().parents[1] / "scripts" / "rss_probe.py"


def _peak_rss(tsv, out, fake_export) -> float:
    r = subprocess.run([sys.executable, str(PROBE), str(tsv), "-o", str(out), "--model", str(fake_export),
                        "--engine", "fake", "-q", "--chunk-rows", "500", "--dedupe-cache", "1000"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip().splitlines()[-1])


def _tsv(path, n):
    rng = random.Random(n)
    words = "the cat sat on a mat dog ran big small house read book people walk good bad new old".split()
    with open(path, "w") as f:
        f.write("text\n")
        for _ in range(n):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + "\n")
    return path


def test_peak_rss_flat_from_1x_to_10x_rows(tmp_path, fake_export):
    n = 4000
    small = _peak_rss(_tsv(tmp_path / "1x.tsv", n), tmp_path / "1x.parquet", fake_export)
    large = _peak_rss(_tsv(tmp_path / "10x.tsv", 10 * n), tmp_path / "10x.parquet", fake_export)
    assert abs(large - small) / small <= 0.10, f"peak RSS {small:.0f} MiB at 1x, {large:.0f} MiB at 10x"


def _probe(args, timeout=600):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(PROBE), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return r, float(r.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def test_a_20_mb_one_line_row_is_a_bad_row_in_seconds_with_bounded_memory(tmp_path, fake_export):
    huge = "the cat sat on the mat " * (20_000_000 // 23)
    tsv = tmp_path / "in.tsv"
    tsv.write_text(f"id\ttext\nr1\ta short one\nr2\t{huge}\nr3\tanother short one\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    r, rss, seconds = _probe([tsv, "-o", out, "--model", fake_export, "--engine", "fake", "--id-column", "id",
                              "--on-bad-row", "skip"])
    assert r.returncode == 0, r.stderr
    assert seconds < 60 and rss < 2048, f"{seconds:.1f} s, peak RSS {rss:.0f} MiB"
    _, sents = read_outputs(out)
    assert [(s["id"], s["status"]) for s in sents] == [("r1", "ok"), ("r2", "skipped"), ("r3", "ok")]
    assert "more than --max-row-chars 100000" in sents[1]["error"] and sents[1]["text"] is None
    assert "line 3 (row_too_long)" in r.stderr
    # under fail: the file, line and column of the first character past the limit
    r, _, _ = _probe([tsv, "-o", tmp_path / "f.parquet", "--model", fake_export, "--engine", "fake"])
    assert r.returncode == 3 and f"{tsv}:3:100001: the row is" in r.stderr and "--max-row-chars N" in r.stderr
    # the limit can be raised
    small = tmp_path / "small.tsv"
    small.write_text("text\n" + "word " * 30_000 + "\n", encoding="utf-8")
    r, _, _ = _probe([small, "-o", tmp_path / "s.parquet", "--model", fake_export, "--engine", "fake"])
    assert r.returncode == 3 and "150000 characters long" in r.stderr
    r, _, _ = _probe([small, "-o", tmp_path / "s.parquet", "--model", fake_export, "--engine", "fake",
                      "--max-row-chars", "200000"])
    assert r.returncode == 0, r.stderr


def test_rows_just_below_the_limit_keep_memory_bounded(tmp_path, fake_export):
    """Rows of 90,000 characters with 512-token windows: each copy is a full window, so building all the
    batches of 8 such rows at once would take over a gigabyte. Chunks are cut by characters and batches
    built as the engine takes them: peak RSS stays within 400 MiB of a one-sentence run."""
    model = tmp_path / "model"
    shutil.copytree(fake_export, model)
    man = model / "1" / "mlm_scorer.json"
    man.write_text(man.read_text().replace('"max_seq_length": 32', '"max_seq_length": 512'))
    row = ("the cat sat on the mat " * 4000)[:90_000]

    def run(rows):
        tsv = tmp_path / f"{len(rows)}.tsv"
        tsv.write_text("text\n" + "".join(f"{r}\n" for r in rows), encoding="utf-8")
        r, rss, _ = _probe([tsv, "-o", tmp_path / f"{len(rows)}.parquet", "--model", model, "--engine", "fake", "-q"])
        assert r.returncode == 0, r.stderr
        return rss

    base = run(["one short sentence"])
    long = run([f"{row[:-6]} {i:05d}" for i in range(8)])
    assert long - base < 400, f"peak RSS {base:.0f} MiB for one sentence, {long:.0f} MiB for 8 rows of 90,000 chars"


def test_peak_rss_is_the_childs_own_not_its_parents():
    """The memory tests spawn the probe from pytest, which holds GiBs late in a run: a child's peak RSS must
    not inherit the parent's high-water mark (``ru_maxrss`` does across exec; it reported 2.5 GiB for a
    run that used 140 MiB)."""
    ballast = bytearray(768 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page
    r = subprocess.run([sys.executable, "-c", "from mlm_scorer.progress import peak_rss_bytes as p; print(p())"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    child = int(r.stdout)
    del ballast
    assert child < 256 * 2**20, f"child's peak RSS {child / 2**20:.0f} MiB: the parent's 768 MiB leaked in"


def test_a_parquet_decompression_bomb_is_bad_rows_in_bounded_memory(tmp_path, fake_export):
    """A Parquet file of a few kilobytes whose 120 rows decode to 5 MB each (one dictionary value): rows are
    measured (bytes, from the dictionary) before any is decoded, and row groups are read in batches sized by
    their uncompressed size, so the rows past --max-row-chars are bad rows and memory stays near that of a
    one-row file (decoding whole batches first took 1.2 GB more). A plain-encoded file of large rows (40
    rows of 5 MB, compressed) is read a few rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = "ab" * 2_500_000
    bomb = tmp_path / "bomb.parquet"
    text = pa.DictionaryArray.from_arrays(pa.array([0] * 120, pa.int32()), pa.array([big]))
    pq.write_table(pa.table({"text": text}), bomb, compression="zstd")
    assert bomb.stat().st_size < 64 * 1024
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"text": [big] * 40}), plain, compression="zstd", use_dictionary=False)
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"text": ["one short sentence"]}), small)

    def run(path):
        r, rss, _ = _probe([path, "-o", tmp_path / f"{path.stem}.out.parquet", "--model", fake_export, "--engine",
                            "fake", "-q", "--on-bad-row", "skip"])
        assert r.returncode == 0, r.stderr
        return rss

    base = run(small)
    for path, n in ((bomb, 120), (plain, 40)):
        rss = run(path)
        assert rss - base < 250, f"peak RSS {base:.0f} MiB for one row, {rss:.0f} MiB for {path.name}"
        _, sents = read_outputs(tmp_path / f"{path.stem}.out.parquet")
        assert len(sents) == n and {s["status"] for s in sents} == {"skipped"}
        assert "the text is 5,000,000 bytes long, more than --max-row-chars 100000" in sents[0]["error"]
