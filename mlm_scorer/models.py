"""Resolve ``--model``: an export directory is used as is; a checkpoint (Hugging Face directory, TF-1
directory or hub id) is exported once into a cache and reused on later runs.

Cache: ``$MLM_SCORER_CACHE`` or ``~/.cache/mlm-scorer``, under ``exports/<key>/1`` where the key is a
hash of the source (a local directory: its absolute path and its files' names, sizes and mtimes; a hub
id: the id). Concurrent runs take a file lock, so a model is exported once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from .errors import MissingDependencyError, ModelError
from .model_dir import ModelDir, is_export_dir

DEFAULT_MODEL = "bert-base-uncased"


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
                  log=None) -> ModelDir:
    """Return the export for ``model``, exporting a checkpoint into the cache on first use."""
    model = str(model)
    if is_export_dir(model):
        return ModelDir.open(model, version)
    target = cache_root(cache_dir) / "exports" / source_key(model)
    if is_export_dir(target):
        return ModelDir.open(target)
    try:
        from mlm_export import CheckpointError, export
    except ImportError as exc:
        raise MissingDependencyError(f"exporting {model!r} needs the exporter's dependencies ({exc.name}): "
                                     f"pip install 'mlm-scorer[tf]'") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be exporting the same model
        if not is_export_dir(target):
            if log:
                log(f"exporting {model} to {target} (once; later runs reuse it)")
            try:
                export(model, target, version=1, log=log or (lambda m: None))
            except CheckpointError as exc:
                raise ModelError(str(exc)) from None
            except ImportError as exc:
                raise MissingDependencyError(f"exporting {model!r} needs {exc.name}: pip install "
                                             f"'mlm-scorer[tf]'") from None
    return ModelDir.open(target)
