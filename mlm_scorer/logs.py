"""Our messages go through ``logging`` (logger ``mlm_scorer``); other libraries' chatter stays off stderr.

The library only logs: without a handler configured, Python shows its warnings and errors and nothing
else. The command lines (``mlm-score``, ``mlm-score ray``, ``mlm-export``) call ``configure_cli``:

    -q        warnings and errors only (no progress, no summary)
    (default) information: the summary line, progress lines off a terminal, "exporting ..." notes
    -v        debug, plus TensorFlow's C++ log lines and Ray's own logging

TensorFlow 2.21 writes lines such as ``I0000 ... port.cc:153] oneDNN custom operations are on`` and
``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR`` from C++
while it is imported, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. ``import_tensorflow`` imports it with
file descriptor 2 going through a filter that drops those information and warning lines (errors and
anything else pass), unless debug logging is on or the user set ``TF_CPP_MIN_LOG_LEVEL`` themselves.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Callable, Iterator, TextIO

LOGGER = "mlm_scorer"
log = logging.getLogger(LOGGER)

# absl's line format: severity letter, MMDD, time, thread id, file:line]  (I and W only; E and F pass)
_ABSL_INFO = re.compile(rb"^[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.+-]+:\d+\] ")
_TF_CHATTER = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
               b"To enable the following instructions:")  # second line of cpu_feature_guard's message


def is_tf_chatter(line: bytes) -> bool:
    """True for a TensorFlow/absl information or warning line (one line of stderr, as bytes)."""
    return bool(_ABSL_INFO.match(line)) or line.startswith(_TF_CHATTER)


# Ray's C++ log lines: [2026-11-24 04:13:27,643 E 14143 14143] core_worker.cc:2465: ...  (all but fatal)
_RAY_CPP = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWE] \d+ \d+\] ")


def is_ray_chatter(line: bytes) -> bool:
    """True for a line Ray's C++ core writes to the driver's stderr (it also goes to Ray's log files)."""
    return bool(_RAY_CPP.match(line))


def verbose() -> bool:
    """Debug logging is on for ``mlm_scorer`` (``-v``): show other libraries' own log lines too."""
    return log.isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[bytes], bool]) -> Iterator[TextIO]:
    """Route file descriptor 2 (C/C++ writes included) through ``drop``: lines it accepts are discarded,
    everything else reaches the real stderr as it comes (a partial line at once, unless it could be the
    start of a dropped one). Yields a text stream on the real stderr, for a progress bar."""
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        buf = b""
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            buf += data
            while (cut := buf.find(b"\n")) >= 0:
                line, buf = buf[:cut + 1], buf[cut + 1:]
                if not drop(line.rstrip(b"\r\n")):
                    os.write(saved, line)
            if buf and not _could_be_dropped(buf):  # e.g. a progress bar's "\r 40%|####  |"
                os.write(saved, buf)
                buf = b""
        if buf and not drop(buf):
            os.write(saved, buf)
        os.close(r)

    t = threading.Thread(target=pump, name="mlm-scorer-stderr-filter", daemon=True)
    t.start()
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                     errors="backslashreplace")
    try:
        yield real
    finally:
        try:
            sys.stderr.flush()
            real.flush()
        except (AttributeError, ValueError):
            pass
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to the end and stops
        t.join(timeout=5)
        real.close()
        os.close(saved)


def _could_be_dropped(partial: bytes) -> bool:
    """A partial line that may grow into a line a filter drops (those begin with these)."""
    return partial[:1] in (b"[", b"I", b"W", b"T")


def import_tensorflow():
    """``import tensorflow``, without its C++ start-up chatter on stderr (see the module docstring)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or verbose():  # the user chose what TensorFlow shows
        import tensorflow as tf

        return tf
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # its later information and warning lines too
    with filtered_stderr(is_tf_chatter):
        import tensorflow as tf
    return tf


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if getattr(record, "bare", False):  # "mlm-score: interrupted; ..." rather than "error: interrupted"
            return f"{self.prog}: {msg}"
        if record.levelno >= logging.ERROR:
            return f"{self.prog}: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"{self.prog}: warning: {msg}"
        return msg


def add_output_flags(group, *, progress: bool = True, others: str = "TensorFlow's") -> None:
    """-q, -v (and --progress / --no-progress) on an argparse group, the same for every command."""
    import argparse

    group.add_argument("-q", "--quiet", action="store_true",
                       help="warnings and errors only" + (": no progress, no summary" if progress else ""))
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help=f"debug messages, and {others} own log lines (hidden otherwise)")
    if progress:
        group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                           help="rows done, copies/s and ETA, after every batch: a bar on a terminal, a line "
                                "every 10 s elsewhere (default on; -q turns it off)")


def configure_cli(prog: str, *, quiet: bool = False, verbose: int = 0) -> None:
    """Send ``mlm_scorer`` (and ``mlm_export``) log records to stderr, prefixed with ``prog`` for
    warnings and errors. Replaces the handler an earlier call installed (tests call main repeatedly)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for name in (LOGGER, "mlm_export"):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, "_mlm_cli", False)]:
            lg.removeHandler(h)
        h = _Stderr()
        h._mlm_cli = True  # type: ignore[attr-defined]
        h.setFormatter(_Format(prog))
        lg.addHandler(h)
        lg.setLevel(level)
        lg.propagate = False
