"""File-system helpers shared by the scorer and the exporter: a run touches only its own files.

Every path a command writes, replaces or deletes goes through these:

* ``check_target(path, what, inputs=...)``: before anything is touched, refuse (UsageError, naming the
  path) a target that is not absent or a regular file (a symlink, whatever it points at; a device such as
  /dev/null or /dev/full; a FIFO, a socket, a directory), whose directory is missing, or that is one of
  the run's inputs (by path, through symlinks, or by inode: a hard link). ``check_distinct`` refuses two
  targets of one run that name the same file.
* ``temp_path(final)``: the run's own temporary name for ``final``, ``.NAME.tmp-PID-START-HOST-N``: the
  process id, its start time (clock ticks since boot, from /proc) and a hash of the host name say which
  run made it. ``temp_debris(final)`` finds the temporary names of runs that are gone (a run killed with
  SIGKILL leaves one); a name of any other form (``.NAME.tmp-notes``) is never taken for one.
* ``create_exclusive(path)``: a new file, never one that exists, never through a symlink.
* ``safe_unlink(path, identity=...)``: unlink a regular file (never a symlink's target, a device or a
  directory), optionally only if it is still the file the run made (device and inode).
* ``replace_file(tmp, final, what)``: ``os.replace`` after checking, again, that ``final`` is absent or
  a regular file. ``atomic_write_bytes`` combines the three for small files.
* ``OwnedDir``: a directory the run made and marked (``OwnedDir.MARKER``), refused when it is a symlink
  or holds files the run did not make; it deletes only the entries it recognises as its own.
* ``default_file_mode`` / ``default_dir_mode`` / ``make_temp_dir``: permissions from the process's umask,
  like any file it creates (``tempfile.mkdtemp`` alone gives ``drwx------``).
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

from .errors import UsageError

PathLike = str | os.PathLike


def fsync_path(path: PathLike) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- what a path is
def kind(st: os.stat_result) -> str:
    """What an ``lstat`` result is, in words: "a regular file", "a symlink", "a character device", ..."""
    m = st.st_mode
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(m):
            return name
    return "a special file"


def describe(path: PathLike, st: os.stat_result) -> str:
    """``kind(st)``, and for a symlink where it points: "a symlink (to '/etc/passwd')"."""
    return kind(st) + (f" (to {os.readlink(path)!r})" if stat.S_ISLNK(st.st_mode) else "")


def lstat_or_none(path: PathLike) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def identity(st: os.stat_result) -> tuple[int, int]:
    """(device, inode): what identifies a file whatever its names."""
    return st.st_dev, st.st_ino


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` are one file: the same path once symlinks are resolved, or the same inode
    (a hard link). Paths that do not exist compare by their resolved names."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return identity(os.stat(a)) == identity(os.stat(b))
    except OSError:
        return False


def check_target(path: PathLike, what: str, *, inputs: Iterable[tuple[PathLike, str]] = (),
                 parent_must_exist: bool = True) -> Path:
    """Refuse, before anything is touched, a path the run would write or replace unless it is absent or a
    regular file: a symlink (whatever it points at), a device (/dev/null, /dev/full), a FIFO, a socket or
    a directory raise UsageError naming ``what`` and the path. ``inputs`` ((path, what) pairs, e.g. the
    run's input) must not be the same file (by path or inode). ``parent_must_exist``: its directory too."""
    p = Path(path)
    st = lstat_or_none(p)
    if st is not None and not stat.S_ISREG(st.st_mode):
        hint = (f"give a file path such as {p / 'out.parquet'}" if stat.S_ISDIR(st.st_mode) else
                "remove it or choose another path")
        raise UsageError(f"{what} {str(p)!r} is {describe(p, st)}, not a regular file; refusing to replace it: {hint}")
    for src, src_what in inputs:
        if str(src) != "-" and os.path.lexists(src) and same_file(src, p):
            raise UsageError(f"refusing to run: {what} {str(p)!r} is {src_what} ({str(src)!r}), which this run would "
                             f"replace; choose another path for it")
    if parent_must_exist and not p.parent.is_dir():
        raise UsageError(f"the directory of {what} {str(p)!r} ({str(p.parent)!r}) does not exist; create it first")
    return p


def check_distinct(targets: Iterable[tuple[PathLike, str]]) -> None:
    """Refuse (UsageError) two targets of one run that name the same file (by resolved path or inode)."""
    seen: list[tuple[Path, str]] = []
    for path, what in targets:
        p = Path(path)
        for q, q_what in seen:
            if same_file(p, q):
                raise UsageError(f"{what} {str(p)!r} and {q_what} {str(q)!r} are the same file: one would overwrite "
                                 f"the other; choose different paths")
        seen.append((p, what))


# ------------------------------------------------------------------------------------ permissions
_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: 0o777 less the umask."""
    return 0o777 & ~umask()


def make_temp_dir(prefix: str, dir: PathLike) -> Path:
    """``tempfile.mkdtemp`` (a new, unique directory) with the umask's permissions instead of 0o700, so that
    another user (a server in a container) can read what is published by renaming it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(d, default_dir_mode())
    return d


# --------------------------------------------------------------------------------- temporary names
def _start_ticks(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_COUNTER = itertools.count()
_OWN: tuple[int, str] | None = None


def _own_stamp() -> tuple[int, str]:
    """(pid, start ticks) of this process; recomputed after a fork."""
    global _OWN
    pid = os.getpid()
    if _OWN is None or _OWN[0] != pid:
        _OWN = (pid, _start_ticks(pid) or "0")
    return _OWN


def temp_path(final: PathLike) -> Path:
    """A temporary name for ``final`` in its directory that says which run made it:
    ``.NAME.tmp-PID-START-HOST-N`` (see the module doc)."""
    p = Path(final)
    pid, start = _own_stamp()
    return p.with_name(f".{p.name}.tmp-{pid}-{start}-{_HOST}-{next(_COUNTER)}")


def _temp_pattern(name: str) -> re.Pattern:
    # the current form, and ``.NAME.tmp-PID`` of earlier versions
    return re.compile(rf"\.{re.escape(name)}\.tmp-(\d+)(?:-(\d+)-([0-9a-f]{{8}})-\d+)?")


def temp_owner(final: PathLike, candidate: PathLike) -> tuple[int, str | None, str | None] | None:
    """(pid, start ticks, host hash) when ``candidate`` is a temporary name ``temp_path`` gives ``final`` (or
    the ``.NAME.tmp-PID`` of earlier versions: start and host None), else None."""
    m = _temp_pattern(Path(final).name).fullmatch(Path(candidate).name)
    return None if m is None else (int(m.group(1)), m.group(2), m.group(3))


def temp_names(final: PathLike) -> list[Path]:
    """Every existing temporary name of ``final`` (any run's), whatever the file is."""
    p = Path(final)
    try:
        names = os.listdir(p.parent)
    except OSError:
        return []
    return sorted(p.parent / n for n in names if temp_owner(p, n) is not None)


def _alive(pid: int, start: str | None, host: str | None) -> bool:
    """Whether the run that made a temporary name may still be running (when unsure: yes)."""
    if host is not None and host != _HOST:
        return True  # another machine's run (a shared file system): not ours to judge
    if (pid, start) == _own_stamp():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if start is None or start == "0":
        return True
    now = _start_ticks(pid)
    return now is None or now == start  # a different start time: the pid was reused, the run is gone


def temp_debris(final: PathLike) -> list[Path]:
    """Temporary names of ``final`` left by runs that are gone (killed, crashed): regular files whose name
    ``temp_path`` gives and whose process no longer runs (on this host)."""
    out = []
    for t in temp_names(final):
        pid, start, host = temp_owner(final, t)
        st = lstat_or_none(t)
        if st is not None and stat.S_ISREG(st.st_mode) and not _alive(pid, start, host):
            out.append(t)
    return out


def remove_debris(final: PathLike) -> list[Path]:
    """Delete ``temp_debris(final)``; return what was deleted."""
    return [t for t in temp_debris(final) if safe_unlink(t)]


# ------------------------------------------------------------------------------ create, unlink, replace
def create_exclusive(path: PathLike, mode: int | None = None) -> int:
    """Open a new file for writing; FileExistsError if anything (a symlink included) is at ``path``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o600 if mode is None else mode)


def safe_unlink(path: PathLike, *, identity_of: tuple[int, int] | None = None) -> bool:
    """Unlink ``path`` if it is a regular file (``lstat``: a symlink, a device, a FIFO or a directory is left
    alone) and, with ``identity_of``, still the file of that (device, inode). Returns whether it was removed."""
    st = lstat_or_none(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        return False
    if identity_of is not None and identity(st) != identity_of:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def replace_file(tmp: PathLike, final: PathLike, what: str = "output") -> None:
    """``os.replace(tmp, final)``, checking again (just before) that ``final`` is absent or a regular file:
    a device, FIFO, socket, directory or symlink put there since the run started is refused (UsageError)
    and ``tmp`` is left for the caller to remove."""
    check_target(final, what, parent_must_exist=False)
    os.replace(tmp, final)


def atomic_write_bytes(path: PathLike, data: bytes, mode: int | None = None, *, what: str = "file") -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one:
    the run's own temporary name in the same directory (created exclusively), fsync, chmod (``mode``,
    default the umask's), ``replace_file``; the temporary file is removed on failure. UsageError if
    ``path`` is not absent or a regular file (``check_target``)."""
    path = Path(path)
    check_target(path, what, parent_must_exist=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = create_exclusive(tmp)
    made = identity(os.fstat(fd))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        replace_file(tmp, path, what)
    except BaseException:
        safe_unlink(tmp, identity_of=made)
        raise


# --------------------------------------------------------------------------------- owned directories
class OwnedDir:
    """A directory a run made and marked as its own (``MARKER``, a regular file inside it).

    ``open`` creates it, or takes an existing one only if it is a real directory (never followed through a
    symlink) that carries the marker, or whose every entry is a regular file ``known`` recognises as one
    the run's kind makes (a directory left by an earlier version, without a marker: it is marked then).
    Anything else is refused (UsageError naming what is in it). Deleting goes only through ``remove`` /
    ``clear``, which unlink regular files ``known`` recognises and leave everything else where it is.
    """

    MARKER = ".mlm-scorer-owned"

    def __init__(self, path: Path, what: str, known: Callable[[str], bool]):
        self.path, self.what, self._known = path, what, known

    @classmethod
    def check(cls, path: PathLike, *, what: str, known: Callable[[str], bool]) -> bool:
        """Refuse (UsageError) what ``open`` would refuse, touching nothing; True if the directory exists and
        carries the marker, False if it is absent or would be adopted."""
        p = Path(path)
        st = lstat_or_none(p)
        if st is None:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{what} {str(p)!r} is {describe(p, st)}, not a directory this run made; refusing to "
                             f"touch it: remove it or choose another output path")
        marker = lstat_or_none(p / cls.MARKER)
        if marker is not None and stat.S_ISREG(marker.st_mode):
            return True
        d = cls(p, what, known)
        foreign = [n for n in sorted(os.listdir(p))
                   if not (d.recognises(n) and stat.S_ISREG(os.lstat(p / n).st_mode))]
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:5]) + (" …" if len(foreign) > 5 else "")
            raise UsageError(f"{what} {str(p)!r} exists and was not made by this program (no {cls.MARKER} in it; it "
                             f"holds {shown}); refusing to touch it: move it away or choose another output path")
        return False

    @classmethod
    def open(cls, path: PathLike, *, what: str, known: Callable[[str], bool], owner: str) -> "OwnedDir":
        """``owner``: who makes it (written in the marker), e.g. "mlm-score parts of out.parquet"."""
        p = Path(path)
        d = cls(p, what, known)
        if lstat_or_none(p) is None:
            try:
                os.mkdir(p)
            except FileExistsError:  # made meanwhile: check it as any existing one
                return cls.open(path, what=what, known=known, owner=owner)
            d._mark(owner)
            return d
        if not cls.check(p, what=what, known=known):
            d._mark(owner)
        return d

    def _mark(self, owner: str) -> None:
        try:
            fd = create_exclusive(self.path / self.MARKER, default_file_mode())
        except FileExistsError:  # marked meanwhile by a run of the same kind
            self.check(self.path, what=self.what, known=self._known)
            return
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"made by {owner}; deleted with the files it recognises\n")

    def recognises(self, name: str) -> bool:
        """A name this directory's owner makes (or the marker)."""
        return name == self.MARKER or self._known(name)

    def clear(self, keep: Iterable[str] = ()) -> None:
        """Delete the regular files it recognises, except ``keep`` and the marker."""
        keep = set(keep) | {self.MARKER}
        for name in os.listdir(self.path):
            if name not in keep and self._known(name):
                safe_unlink(self.path / name)

    def remove(self) -> bool:
        """Delete the regular files it recognises, then the marker and the directory if nothing else is left
        (a file the run did not make stays, and the directory with it). Returns whether it is gone."""
        self.clear()
        try:
            if set(os.listdir(self.path)) <= {self.MARKER}:
                safe_unlink(self.path / self.MARKER)
                os.rmdir(self.path)
                return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
        return False
