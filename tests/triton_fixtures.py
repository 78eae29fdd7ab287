"""Start and stop real Triton servers (PyTriton's tritonserver, in .venv-triton) for the tests.

``triton_python()`` finds the Triton venv's interpreter (``$MLM_TRITON_VENV`` or REPO/.venv-triton, built by
scripts/triton_env.sh): without it the tests skip, or fail under ``MLM_REQUIRE_TRITON=1`` (``make test``
sets it, so a broken environment cannot pass as skipped). ``TritonProcess`` runs one server process in its
own process group on ports chosen free at start; ``kill()`` is ``kill -9`` of the whole group (the Python
process and its tritonserver), ``start()`` again reuses the ports, as a restarted server would.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def triton_python() -> Path:
    venv = Path(os.environ.get("MLM_TRITON_VENV") or REPO / ".venv-triton")
    py = venv / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", "import pytriton, tritonclient, onnxruntime"],
                                         capture_output=True).returncode == 0
    if not ok:
        msg = (f"the Triton environment {venv} is missing or incomplete (PyTriton, tritonclient, onnxruntime): "
               f"build it with: bash scripts/triton_env.sh")
        if os.environ.get("MLM_REQUIRE_TRITON") == "1":
            pytest.fail(f"MLM_REQUIRE_TRITON=1 but {msg}")
        pytest.skip(msg)
    return py


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (the OS's choice; a busy machine may still take
    one before the server binds it: ``TritonProcess.start`` then retries with new ones)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class TritonProcess:
    """One server process: ``argv(http_port, grpc_port, start_number)`` -> its command line; ready when its log has
    READY (the rest of that line is kept in ``ready_line``). The server's own log shares the file, a piece of a
    line at a time, so READY may follow the start of a line of tritonserver's, and a word after it may be cut:
    a server with a secret to tell (tests/triton_server.py's access token) writes it to LOG.token instead
    (``token``)."""

    def __init__(self, argv, log_dir: Path, name: str = "triton"):
        self.argv = argv
        self.log_dir = Path(log_dir)
        self.name = name
        self.http_port = self.grpc_port = 0
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.ready_line = ""
        self.token: str | None = None
        self.log_path: Path | None = None
        self.shm_before: set[str] = set()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 240.0) -> "TritonProcess":
        assert self.proc is None, "already running"
        fresh_ports = not self.http_port
        for attempt in range(3):
            if fresh_ports or attempt:
                self.http_port, self.grpc_port = free_ports(2)
            self.starts += 1
            self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
            self.token = None
            self.shm_before = _shm_names()
            env = dict(os.environ)
            env.pop("PYTHONPATH", None)  # the Triton venv has its own numpy; the scripts find the repo themselves
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(self.argv(self.http_port, self.grpc_port, self.starts), stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                             start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = self.log_path.read_text(errors="replace")
                for line in text.splitlines():
                    if "READY" in line:
                        self.ready_line = line[line.index("READY"):]
                        token = self.log_path.with_suffix(".token")
                        self.token = token.read_text().strip() if token.is_file() else None
                        return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
            text = self.log_path.read_text(errors="replace")
            self.kill()
            if "address already in use" in text.lower() or "failed to start" in text.lower():
                continue  # another process took a port between choosing and binding: new ports
            raise RuntimeError(f"{self.name} did not become ready within {timeout:.0f}s; log {self.log_path}:\n"
                               + "\n".join(text.splitlines()[-40:]))
        raise RuntimeError(f"{self.name}: could not bind free ports in 3 attempts; log {self.log_path}")

    def kill(self) -> None:
        """kill -9 the process group: the Python process, its tritonserver and the backend stubs."""
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
        _wait_group_gone(pid)
        _remove_orphan_shm(pid, self.shm_before)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (a clean shutdown) and ``grace`` seconds to finish, then whatever is left of the group is
        killed."""
        if self.proc is None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # the rest of the group, if any, and the shared memory PyTriton leaves even on a clean stop


def _shm_names() -> set[str]:
    try:
        return {p.name for p in Path("/dev/shm").iterdir()}
    except OSError:
        return set()


def _remove_orphan_shm(pid: int, before: set[str]) -> None:
    """Shared-memory segments a killed server leaves in /dev/shm: PyTriton's regions of that process
    (pytrtion<pid>-*) and the proxy's multiprocessing segments (psm_*) that appeared since it started and that
    no live process maps any more."""
    mapped = ""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped += maps.read_text(errors="replace")
        except OSError:
            pass
    for shm in Path("/dev/shm").glob("*"):
        mine = shm.name.startswith(f"pytrtion{pid}-")
        orphan = shm.name.startswith("psm_") and shm.name not in before and shm.name not in mapped
        if mine or orphan:
            try:
                shm.unlink()
            except OSError:
                pass


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


def serve_triton_process(python: Path, export: Path, log_dir: Path, *, name: str = "bert", threads: int = 1,
                         extra: tuple[str, ...] = ()) -> TritonProcess:
    """scripts/serve_triton.py EXPORT as a user runs it (each start in a fresh PyTriton workspace under
    ``log_dir``, so that a killed server leaves nothing elsewhere)."""
    return TritonProcess(lambda h, g, n: [str(python), str(REPO / "scripts" / "serve_triton.py"), str(export),
                                          "--name", name, "--host", "127.0.0.1", "--http-port", str(h),
                                          "--grpc-port", str(g), "--threads", str(threads),
                                          "--workspace", str(log_dir / f"ws-{name}-{n}"), *extra],
                         log_dir, name=f"serve_triton-{name}")


def test_server_process(python: Path, log_dir: Path, workspace: Path, *, models: dict[str, Path],
                        bare: dict[str, Path] = {}, max_batch_size: int = 16,  # noqa: B006
                        extra: tuple[str, ...] = ()) -> TritonProcess:
    """tests/triton_server.py: several exports, some without their identity in the configuration; its access
    token in ``token`` once started. ``models`` is read at each start: change it to restart on other exports."""
    def argv(h: int, g: int, n: int) -> list[str]:
        cmd = [str(python), str(TESTS / "triton_server.py"), "--http-port", str(h), "--grpc-port", str(g),
               "--workspace", str(workspace / f"ws-{n}"), "--max-batch-size", str(max_batch_size),
               "--token-file", str(log_dir / f"triton_server-{n}.token"), *extra]
        for n, p in models.items():
            cmd += ["--model", f"{n}={p}"]
        for n, p in bare.items():
            cmd += ["--bare", f"{n}={p}"]
        return cmd

    return TritonProcess(argv, log_dir, name="triton_server")


test_server_process.__test__ = False  # a factory, not a test


def run_in_triton_venv(python: Path, code: str, *args: str, timeout: float = 300) -> str:
    """Run ``code`` with the Triton venv's interpreter (the repository on its path); its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=REPO)
    if r.returncode != 0:
        raise AssertionError(f"Triton venv code failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def main_python() -> str:
    return sys.executable


def export_with_onnx(hf: Path, dest: Path, *, copy_of: Path | None = None, **kw) -> Path:
    """An export of the checkpoint ``hf`` with model.onnx in ``dest`` (a copy of the export ``copy_of`` when
    given, which saves a TensorFlow export); returns ``dest``."""
    import shutil

    from mlm_export import export, load_checkpoint
    from mlm_export.to_onnx import write_onnx
    from mlm_scorer.model_dir import resolve_version_dir

    if copy_of is not None:
        shutil.copytree(copy_of, dest)
        vdir = resolve_version_dir(dest)
    else:
        vdir = export(hf, dest, log=lambda m: None, **kw)
    if not (Path(vdir) / "model.onnx").is_file():
        write_onnx(vdir, load_checkpoint(str(hf)), log=lambda m: None)
    return dest
