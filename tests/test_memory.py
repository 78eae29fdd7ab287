"""Peak RSS does not grow with the number of rows: 1x and 10x the input within ±10 %."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

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
