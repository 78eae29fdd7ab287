"""Run `mlm-score` in this process and print its peak RSS (MiB) as the last line: for memory tests.

Usage: python scripts/rss_probe.py MLM-SCORE-ARGS...
"""
import resource
import sys

from mlm_scorer.cli import main

code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
sys.exit(code)
