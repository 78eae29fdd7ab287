"""Resolve ``--model``: an export directory is used as is; a checkpoint (Hugging Face directory, TF-1
directory or hub id) is exported once into a cache and reused on later runs.

What ``--model`` names, in order:
  1. an export (``mlm_scorer.json`` in it or in a numeric version directory): opened as is;
  2. an existing local path: a checkpoint directory, exported into the cache;
  3. a path that does not exist but looks like one (it starts with ``.``, ``/`` or ``~``, or its first
     component exists here, as ``models/`` for ``models/bret``): a missing directory, ModelError (exit
     4), with the nearest names; the Hub is never asked;
  4. anything else of the form ``name`` or ``org/name``: a Hugging Face hub id, downloaded (the
     needed files only) and exported into the cache.

Cache: ``$MLM_SCORER_CACHE`` or ``~/.cache/mlm-scorer``, under ``exports/<key>/1`` where the key is a
hash of the source (a local directory: its absolute path and its files' names, sizes and mtimes; a hub
id: the id). The export, and what the run's engine needs beside the SavedModel (``model.onnx`` for the
default engine ``auto`` and the onnx and torch engines, ``model.int8.onnx`` for onnx int8), are built on
first use under a file lock (``<key>.lock``, removed when done), so concurrent runs build each once. The
export is made in the run's own directory (``.<key>.tmp-*``) and renamed into place. A failed resolution
leaves nothing in the cache: an int8 file that drifts past its bound on this CPU is refused before it is
written (``mlm_export.to_onnx.write_onnx``). The cache holds only what this program made: a symlink, a
file or a directory without an export at ``exports/<key>``, and a lock that is not a regular file, are
refused (UsageError), never followed or deleted.
"""
from __future__ import annotations

import difflib
import errno
import fcntl
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import MissingDependencyError, ModelError, UsageError
from .fsutil import (check_target, default_file_mode, describe, identity, kind, lstat_or_none, make_temp_dir,
                     safe_unlink)
from .model_dir import ModelDir, is_export_dir

DEFAULT_MODEL = "bert-base-uncased"
#: The k of an implicit export (a larger --top-k on first use exports with that k).
DEFAULT_TOP_K = 5
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_like_hub_id(value: str) -> bool:
    """``name`` or ``org/name`` of word characters, dots and dashes, not a path that starts with ., / or ~
    (the Hugging Face Hub's repository ids; the exporter downloads only such a value)."""
    return bool(_HUB_ID.fullmatch(value)) and not value.startswith((".", "/", "~"))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("MLM_SCORER_CACHE") or Path.home() / ".cache" / "mlm-scorer")


def source_key(source: str) -> str:
    p = Path(source)
    h = hashlib.sha256()
    if p.exists():
        p = p.resolve()
        h.update(b"dir:" + str(p).encode())
        files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        name = p.name
    else:
        h.update(b"hub:" + source.encode())
        name = source.replace("/", "--")
    return f"{name}-{h.hexdigest()[:16]}"


def resolve_model(model: str | os.PathLike, *, version: int | None = None, cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None, engine: str | None = None,
                  precision: str | None = None, top_k: int = 0) -> ModelDir:
    """Return the export for ``model``, exporting a checkpoint into the cache on first use.

    ``engine`` / ``precision``: what the run will score with; a cached export gets what that engine needs
    built into it on first use (``engine_files``). ``top_k``: the run's --top-k, refused here (before any
    engine or TensorFlow loads) when above the export's k, naming the command that gives a larger k.

    Raises ModelError (a missing local directory, a checkpoint that cannot be exported), UsageError
    (``top_k`` above the export's k), MissingDependencyError (the exporter's extras are not installed).
    """
    model = str(model)
    local = Path(model).expanduser()
    if is_export_dir(local):
        md = ModelDir.open(local, version)
        check_top_k(md, top_k)
        return md
    _refuse_missing_local(model, local)
    target = cache_root(cache_dir) / "exports" / source_key(str(local) if local.exists() else model)
    if _cached_export(target):
        md = ModelDir.open(target)
        check_top_k(md, top_k, model=model)
        if not engine_files(md, engine, precision):
            return md
    source, hub_id = (Path(os.path.abspath(local)), None) if local.exists() else (_download(model, log), model)
    return _build(model, source, hub_id, target, engine=engine, precision=precision, top_k=top_k,
                  log=log or (lambda m: None))


# ------------------------------------------------------------------------------------- the source


def _refuse_missing_local(model: str, local: Path) -> None:
    """A value that does not exist but names a local path is a missing directory, not a hub id."""
    if local.exists():
        return
    parts = Path(model).parts
    looks_local = not looks_like_hub_id(model) or (len(parts) > 1 and Path(parts[0]).expanduser().is_dir())
    if not looks_local:
        return
    parent = local.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    hint = ""
    if parent.is_dir():
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
        close = difflib.get_close_matches(local.name, names, n=3, cutoff=0.6)
        if close:
            hint = f"; did you mean {' or '.join(repr(str(Path(model).parent / c)) for c in close)}?"
        elif names:
            hint = f"; {str(parent)!r} holds: {', '.join(names[:10])}{' …' if len(names) > 10 else ''}"
    raise ModelError(f"model directory {model!r} does not exist{hint} (--model takes an export directory, a "
                     f"checkpoint directory, or a Hugging Face hub id such as bert-base-uncased)")


def _download(hub_id: str, log) -> Path:
    try:
        from mlm_export.checkpoint import CheckpointError, download_from_hub
    except ImportError as exc:
        raise MissingDependencyError(f"exporting {hub_id!r} needs the exporter's dependencies ({exc.name}): "
                                     f"pip install 'mlm-scorer[tf,hub]'") from None
    if log:
        log(f"downloading {hub_id} from the Hugging Face Hub (the files an export needs)")
    try:
        return download_from_hub(hub_id)
    except CheckpointError as exc:
        raise ModelError(str(exc)) from None


# ---------------------------------------------------------------------------------- the cached build


def engine_files(md: ModelDir, engine: str | None, precision: str | None) -> list[str]:
    """Files the engine needs beside the SavedModel that ``md`` lacks: ``model.onnx`` for onnx; for auto
    (fp32: it runs ONNX Runtime when model.onnx is there, see ``engines.base.choose_engine``) and torch
    (which reads its weights from it without TensorFlow) where it can be written; ``model.int8.onnx`` for
    int8 (onnx, or auto)."""
    want = []
    if engine in ("onnx", "auto") and precision == "int8":
        want = ["model.int8.onnx"]
    elif engine == "onnx":
        want = ["model.onnx"]
    elif engine in ("torch", "auto") and _can_write_onnx():
        want = ["model.onnx"]
    return [f for f in want if not (md.path / f).is_file()]


def _build(model: str, source: Path, hub_id: str | None, target: Path, *, engine, precision, top_k: int,
           log) -> ModelDir:
    try:
        from mlm_export import CasingError, CheckpointError, load_checkpoint
        from mlm_export.saved_model import export_checkpoint
        from mlm_export.verify import VerificationError
    except ImportError as exc:
        raise MissingDependencyError(f"exporting {model!r} needs the exporter's dependencies ({exc.name}): "
                                     f"pip install 'mlm-scorer[tf]'") from None
    ckpt = None

    def checkpoint():
        nonlocal ckpt
        if ckpt is None:
            try:
                ckpt = load_checkpoint(source, hub_id=hub_id)
            except CasingError as exc:
                out = shlex.quote(f"{Path(model).name}-export")
                raise ModelError(f"{exc}. For mlm-score --model {model}: export it once with your choice, e.g. "
                                 f"mlm-export {shlex.quote(model)} {out} --do-lower-case (or --no-lower-case), "
                                 f"and pass --model {out}") from None
            except CheckpointError as exc:
                raise ModelError(str(exc)) from None
        return ckpt

    try:
        with _cache_lock(target):
            if not _cached_export(target):  # checked again under the lock: another run may have made it
                k = max(DEFAULT_TOP_K, top_k)
                checkpoint()
                from .logs import import_tensorflow

                import_tensorflow()  # the exporter's TensorFlow, without its C++ start-up lines on stderr
                log(f"exporting {model} to {target} (once; later runs reuse it)")
                _export_into_cache(lambda base, say: export_checkpoint(checkpoint(), base, version=1, top_k=k,
                                                                       log=say), target, log)
            md = ModelDir.open(target)
            check_top_k(md, top_k, model=model)
            missing = engine_files(md, engine, precision)
            if missing:
                from mlm_export.to_onnx import write_onnx

                log(f"building {', '.join(missing)} into the cached export for --engine {engine or 'auto'} (once)")
                write_onnx(md.path, checkpoint(), quantize="int8" if "model.int8.onnx" in missing else None,
                           log=log)
            elif engine == "torch" and not (md.path / "model.onnx").is_file():
                log("the torch engine reads the weights from the SavedModel with TensorFlow (model.onnx, which it "
                    "reads without TensorFlow, needs pip install 'mlm-scorer[onnx]' to be written)")
    except (VerificationError, ValueError, FileExistsError) as exc:
        raise ModelError(f"exporting {model!r} failed: {exc}") from None
    except ImportError as exc:  # write_onnx names its extra; a module missing elsewhere is the exporter's
        raise MissingDependencyError(
            f"exporting {model!r} for --engine {engine or 'saved_model'}: " + (
                str(exc) if exc.name is None else f"{exc.name} is not installed: pip install 'mlm-scorer[tf]'")
        ) from None
    return ModelDir.open(target)


def _can_write_onnx() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


_FIX = "remove it (the next run exports the model again) or pass --cache-dir DIR (or set MLM_SCORER_CACHE)"


def _cached_export(target: Path) -> bool:
    """Whether the cache entry ``target`` holds an export. False if it is absent or an empty directory (the
    export is made there); UsageError for anything this program did not make as it is: a symlink (never
    followed), a file, a device, or a directory that holds no export (its files are never touched)."""
    st = lstat_or_none(target)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"the cached export {str(target)!r} is {describe(target, st)}, not a directory this program "
                         f"made; refusing to follow or replace it: {_FIX}")
    if is_export_dir(target):
        return True
    names = sorted(os.listdir(target))
    if not names:
        return False
    shown = ", ".join(repr(n) for n in names[:5]) + (" …" if len(names) > 5 else "")
    raise UsageError(f"the cached export {str(target)!r} holds no export (it holds {shown}): this program did not "
                     f"leave it so; refusing to touch it: move it away (the next run exports the model again) or "
                     f"pass --cache-dir DIR (or set MLM_SCORER_CACHE)")


def _export_into_cache(export: Callable[[Path, Callable[[str], None]], object], target: Path,
                       log: Callable[[str], None]) -> None:
    """Make the export in the run's own new directory beside ``target`` (``export(base, log)``), then rename
    it to ``target``: the entry appears whole or not at all. The rename never follows a symlink and never
    replaces a directory that holds anything (refused, as ``_cached_export`` says); on failure only the
    run's own directory is removed. Lines logged name ``target``, where the files will be."""
    tmp = make_temp_dir(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        export(tmp, lambda m: log(m.replace(str(tmp), str(target))))
        try:
            os.rename(tmp, target)  # replaces at most an empty directory
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            _cached_export(target)  # raises, saying what is there now
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a directory this run made (rmtree never follows a symlink)
        raise


@contextmanager
def _cache_lock(target: Path) -> Iterator[None]:
    """Hold ``<target>.lock`` exclusively; on exit remove it, and on failure remove what this call made:
    ``target`` if it made it and it is still empty, the cache directories it created (if empty). A file
    anyone else put there stays.

    The lock is a regular file: a symlink (never followed), a device, a FIFO or a directory at its path is
    refused (UsageError, naming it), and so is a lock file that cannot be created (permission denied, a
    read-only file system), with the fix. Safe to remove while others wait: a waiter that gets the lock
    checks that the path still names the file it locked, and starts over if not.
    """
    lock_path = Path(str(target) + ".lock")
    made, d = [], target.parent  # the cache directories this call creates, innermost first
    while not os.path.lexists(d) and d != d.parent:
        made.append(d)
        d = d.parent
    target_existed = os.path.lexists(target)
    fd = None
    try:
        while True:
            check_target(lock_path, "the cache's lock file", parent_must_exist=False)
            try:
                lock_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file where a directory should be, permission denied, read-only
                raise UsageError(f"cannot create the cache directory {str(lock_path.parent)!r}: "
                                 f"{exc.strerror or exc}; pass --cache-dir DIR (or set MLM_SCORER_CACHE) for a "
                                 f"cache this user can write") from None
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             default_file_mode())
            except FileNotFoundError:  # the directory was removed between the two calls
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a symlink put there since the check
                    check_target(lock_path, "the cache's lock file", parent_must_exist=False)
                raise UsageError(f"cannot create the cache's lock file {str(lock_path)!r}: "
                                 f"{exc.strerror or exc}; make {str(lock_path.parent)!r} writable, or pass "
                                 f"--cache-dir DIR (or set MLM_SCORER_CACHE) for a cache this user can write") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # put there since the check: opened, but never locked or removed
                os.close(fd)
                fd = None
                raise UsageError(f"the cache's lock file {str(lock_path)!r} is {kind(st)}, not a regular file; "
                                 f"refusing to use it: {_FIX}")
            fcntl.flock(fd, fcntl.LOCK_EX)  # another run may be exporting the same model
            cur = lstat_or_none(lock_path)
            if cur is not None and identity(cur) == identity(st):
                break
            os.close(fd)  # the holder before us removed that file: lock the current one
            fd = None
    except BaseException:
        if fd is None:
            _remove_empty(made)
        raise
    locked = identity(os.fstat(fd))
    ok = False
    try:
        yield
        ok = True
    finally:
        try:
            if not ok and not target_existed:
                _remove_empty([target])  # a directory left by this call, if nothing is in it
            safe_unlink(lock_path, identity_of=locked)  # the file this call locked, never another
        finally:
            os.close(fd)
        if not ok:
            _remove_empty(made)


def _remove_empty(dirs: list[Path]) -> None:
    """rmdir each of ``dirs`` (innermost first) that is a real directory and empty; anything else stays."""
    for d in dirs:
        st = lstat_or_none(d)
        if st is None or not stat.S_ISDIR(st.st_mode):
            continue
        try:
            os.rmdir(d)  # only if empty
        except OSError:
            pass


# ------------------------------------------------------------------------------- --top-k and commands


def check_top_k(md: ModelDir, top_k: int, *, model: str | None = None) -> None:
    """Refuse ``top_k`` above the export's k, naming the mlm-export command that gives a larger one."""
    if top_k <= md.top_k:
        return
    raise UsageError(f"--top-k {top_k} is above this export's k ({md.top_k}): the export returns at most "
                     f"{md.top_k} predictions per word. {rebuild_hint(md, model, f'--top-k {top_k}')}")


def rebuild_hint(md: ModelDir, model: str | None, *flags: str) -> str:
    """The exact mlm-export command that makes an export like ``md`` with ``flags`` added, and how to use it.

    ``model``: the --model value when ``md`` is the cache's export of a checkpoint (then the command writes
    a new directory); None when ``md`` is the user's own export (then a new version beside it)."""
    m = md.manifest
    src = m.get("source") or {}
    source = src.get("hub_id") or src.get("path")
    if src.get("kind") == "tf1" and source:
        source = str(Path(source).parent)
    if not source:
        return f"Export the checkpoint again with mlm-export CHECKPOINT OUT {' '.join(flags)}"
    args = ["mlm-export", shlex.quote(str(source))]
    if model is None and md.version is None:  # an export directory without version directories
        out = f"{md.path}-2"
        args += [shlex.quote(out)]
        use = f"then pass --model {shlex.quote(out)}"
    elif model is None and set(flags) <= {"--onnx", "--quantize int8"}:  # added to this version, not a copy
        args += [shlex.quote(str(md.path.parent)), "--version", str(md.version)]
        use = f"it adds the file to {md.path}"
    elif model is None:
        base = md.path.parent
        version = max((int(p.name) for p in base.iterdir() if p.name.isdigit()), default=0) + 1
        args += [shlex.quote(str(base)), "--version", str(version)]
        use = f"then --model {shlex.quote(str(base))} uses version {version}"
    else:
        out = f"{Path(str(source)).name}-export"
        args += [shlex.quote(out)]
        use = f"then pass --model {shlex.quote(out)}"
    flag_names = {f.split()[0] for f in flags}
    if m.get("top_k", DEFAULT_TOP_K) != DEFAULT_TOP_K and "--top-k" not in flag_names:
        args += ["--top-k", str(m["top_k"])]
    if m.get("layer_norm", "fused") != "fused":
        args += ["--layer-norm", str(m["layer_norm"])]
    cfg_max = (m.get("config") or {}).get("max_position_embeddings")
    if cfg_max and m.get("max_seq_length") != cfg_max:
        args += ["--max-seq-length", str(m["max_seq_length"])]
    if (m.get("casing") or {}).get("given"):
        args += ["--do-lower-case" if m.get("do_lower_case") else "--no-lower-case"]
    return f"Export it with: {' '.join(args + list(flags))}; {use}"
