"""Run `mlm-score` in this process and print its peak RSS (MiB, VmHWM: this
process's own, not its parent's) as the last line: for memory tests.

Usage: python scripts/rss_probe.py MLM-SCORE-ARGS...
"""
import sys

from mlm_scorer.cli import main
from mlm_scorer.progress import peak_rss_bytes

code = main(sys.argv[1:])
print(peak_rss_bytes() / 2**20)
sys.exit(code)
