"""The benchmarks' CPU-steal meter (scripts/bench_common.py): parsing /proc/stat and the share arithmetic."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_common  # noqa: E402
from bench_common import Steal, parse_proc_stat  # noqa: E402

# The first lines of a real /proc/stat (Linux 6.x, 2 vCPUs): user nice system idle iowait irq softirq
# steal guest guest_nice.
PROC_STAT = """cpu  2201954 1021 180339 1010347 4133 0 11025 70541 0 0
cpu0 1101010 512 90170 505100 2066 0 5512 35270 0 0
intr 123456 0 9 0
"""


def test_parse_proc_stat_reads_the_aggregate_line():
    steal, total = parse_proc_stat(PROC_STAT)
    assert steal == 70541
    assert total == 2201954 + 1021 + 180339 + 1010347 + 4133 + 0 + 11025 + 70541  # guest is inside user


@pytest.mark.parametrize("text", ["", "cpu0 1 2 3 4 5 6 7 8\n", "cpu  1 2 3 4\n"])
def test_parse_proc_stat_without_a_steal_field(text):
    assert parse_proc_stat(text) is None


def test_steal_share_over_a_block(monkeypatch):
    readings = iter([(1_000, 50_000), (1_300, 51_000)])  # 300 of 1,000 jiffies stolen while the block ran
    monkeypatch.setattr(bench_common, "_cpu_jiffies", lambda: next(readings))
    with Steal() as st:
        pass
    assert st.pct == pytest.approx(30.0)
    assert str(st) == "30 %"


def test_steal_is_unknown_without_proc_stat(monkeypatch):
    monkeypatch.setattr(bench_common, "_cpu_jiffies", lambda: None)
    with Steal() as st:
        pass
    assert st.pct is None and str(st) == "n/a"


def test_steal_on_this_machine_is_a_share():
    with Steal() as st:
        sum(i * i for i in range(200_000))
    if bench_common._cpu_jiffies() is None:
        pytest.skip("no /proc/stat here")
    assert st.pct is None or 0.0 <= st.pct <= 100.0  # None: no clock tick passed during the block


def test_command_line_names_the_script_relative_to_the_checkout_and_quotes_its_arguments():
    script = str(bench_common.REPO / "scripts" / "bench_e2e.py")
    assert bench_common.command_line(["--shape", "small", "--out", "a b.md"], script) == \
        "python scripts/bench_e2e.py --shape small --out 'a b.md'"
