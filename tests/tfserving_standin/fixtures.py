"""Start, stop, kill -9 and restart the stand-in server as a separate process; set its fault knobs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVER = Path(__file__).resolve().parent / "server.py"


class StandIn:
    """One stand-in ``tensorflow_model_server`` process serving ``models`` ({name: base dir}).

    The first start picks free ports; ``restart`` reuses them, so clients can reconnect to the same address.
    """

    def __init__(self, models: dict[str, Path], log_dir: Path, *, extra_args: tuple[str, ...] = ()):
        self.models = models
        self.extra_args = tuple(extra_args)
        self.log_dir = Path(log_dir)
        self.rest_port = 0
        self.grpc_port = 0
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.scheme = "https" if "--tls-cert" in self.extra_args else "http"

    @property
    def rest_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.rest_port}"

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.scheme == 'https' else 'grpc'}://127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120.0) -> "StandIn":
        assert self.proc is None, "already running"
        self.starts += 1
        log_path = self.log_dir / f"standin-{os.getpid()}-{id(self)}-{self.starts}.log"
        args = [sys.executable, str(SERVER), "--rest-port", str(self.rest_port), "--grpc-port", str(self.grpc_port),
                *self.extra_args]
        for name, base in self.models.items():
            args += ["--model", f"{name}={base}"]
        self._log = open(log_path, "w+")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            m = re.search(r"STANDIN READY rest=(\d+) grpc=(\d+)", text)
            if m:
                self.rest_port, self.grpc_port = int(m.group(1)), int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"stand-in exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"stand-in not ready after {timeout}s:\n{log_path.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
            self._log.close()

    def restart(self) -> "StandIn":
        self.kill()
        return self.start()

    stop = kill

    # fault knobs (plain HTTP to the REST port; not part of TF Serving) ----------------------------
    def _admin(self, path: str, doc: dict | None = None) -> dict:
        import ssl

        ctx = ssl._create_unverified_context() if self.scheme == "https" else None
        data = json.dumps(doc).encode() if doc is not None else None
        req = urllib.request.Request(f"{self.rest_url}{path}", data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return json.loads(r.read())

    def faults(self, **changes) -> None:
        """E.g. ``faults(fail_next=3)``, ``faults(delay_next=-1, delay_s=2.0)``; ``reset()`` clears them."""
        self._admin("/standin/faults", changes)

    def reset(self) -> None:
        self.faults(fail_next=0, fail_code="UNAVAILABLE", delay_next=0, delay_s=0.0, predict_calls=0, failed=0,
                    max_in_flight=0, batch_sizes=[])

    def stats(self) -> dict:
        return self._admin("/standin/stats")
