"""Progress of a run: rows done (of the total when known), masked copies per second, time left.

On a terminal, a bar on stderr, updated after every engine batch. Elsewhere (a log file, cron, Airflow's
task log, ``| tee``), a line every ``interval`` seconds and one at the end, through the ``mlm_scorer``
logger at level INFO::

    progress: 12,288/50,000 rows (24.6 %), 1,204 copies/s, 61 rows/s, 3:20 elapsed, ETA 10:17

Rows may be counted in fractions: a chunk's rows are credited as its batches finish (each batch's share
of the chunk's copies), so the count moves with every batch, not only when a chunk of 2,048 rows is done.
"""
from __future__ import annotations

import os
import sys
import time

from .logs import log

INTERVAL = 10.0  # seconds between progress lines off a terminal


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _rate(x: float) -> str:
    """A rate for people: whole numbers from 10 on, two significant digits below (0.37, not 0)."""
    return f"{x:,.0f}" if x >= 10 or x == 0 else f"{x:.2g}"


class Progress:
    """``add(rows, copies)`` as work finishes; ``close()`` at the end (a final line off a terminal).

    ``mode``: "bar" (a tqdm bar on stderr), "log" (periodic lines) or "off"; ``auto_mode`` picks.
    """

    def __init__(self, total: int | None, *, mode: str, initial: int = 0, interval: float = INTERVAL,
                 clock=time.monotonic, stream=None):
        self.total, self.mode, self.interval, self._clock = total, mode, interval, clock
        self.initial = initial
        self.rows = float(initial)
        self.copies = 0
        self.t0 = self._last = clock()
        self._logged = None  # rows at the last line logged (no repeated final line)
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            stream = stream or sys.stderr
            try:  # a terminal that reports no size (a bare pty) would get a bar 0 columns wide
                sized = os.get_terminal_size(stream.fileno()).columns > 0
            except (AttributeError, ValueError, OSError):
                sized = False
            self._bar = tqdm(total=total, initial=initial, unit="row", file=stream, leave=False,
                             **({"dynamic_ncols": True} if sized else {"ncols": 100, "nrows": 24}),
                             bar_format="{l_bar}{bar}| {n:,.0f}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]")

    @staticmethod
    def auto_mode(progress: bool | None, *, stream=None) -> str:
        """None: on, as a bar on a terminal and as log lines elsewhere; True: on; False: off."""
        if progress is False:
            return "off"
        stream = stream or sys.stderr
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return "bar" if tty else "log"

    def restart(self) -> None:
        """Start the clock now (when the work begins, after start-up): rates and ETA leave start-up out."""
        self.t0 = self._last = self._clock()

    def add(self, rows: float, copies: int = 0) -> None:
        self.rows += rows
        self.copies += copies
        now = self._clock()
        if self._bar is not None:
            self._bar.update(rows)
            el = now - self.t0
            if el > 0:
                self._bar.set_postfix_str(f"{self.copies / el:,.0f} copies/s", refresh=False)
        elif self.mode == "log" and now - self._last >= self.interval:
            self._last, self._logged = now, self.rows
            log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line as it is logged."""
        now = self._clock() if now is None else now
        el = now - self.t0
        done = self.rows
        shown = f"{done:,.0f}"
        s = f"progress: {shown}" + (f"/{self.total:,} rows ({done / self.total:.1%})" if self.total else
                                    " row" if shown == "1" else " rows")
        if el > 0:
            rate = (done - self.initial) / el
            if rate > 0 or self.copies:
                s += f", {_rate(self.copies / el)} copies/s, {_rate(rate)} rows/s"
            else:
                s += ", no row done yet"
            s += f", {_clock(el)} elapsed"
            if self.total and rate > 0 and done < self.total:
                s += f", ETA {_clock((self.total - done) / rate)}"
        return s

    def close(self, *, done: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and done and self._logged != self.rows:
            log.info(self.line())
        self.mode = "off"


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (or since /proc/self/clear_refs was reset).

    Linux's VmHWM belongs to the process's own memory map, so it starts afresh at exec. ``ru_maxrss`` does
    not: it keeps the high-water mark of the image that exec replaced, and a child spawned by a 2 GiB
    parent (pytest, a Ray raylet) reports 2 GiB before it allocates anything. ``ru_maxrss`` only where
    /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
