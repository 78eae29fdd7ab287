"""A Triton Inference Server model repository from an export: ``config.pbtxt`` plus the model file.

    python -m mlm_export.triton_repo EXPORT REPO [--name bert] [--backend onnxruntime|tensorrt|tensorflow]

writes (Triton's documented layout, docs/triton.md)::

    REPO/NAME/config.pbtxt                # ModelConfig text proto (model_config.proto)
    REPO/NAME/VERSION/model.onnx          # backend onnxruntime (platform onnxruntime_onnx), or
    REPO/NAME/VERSION/model.plan          # backend tensorrt (tensorrt_plan; a plan built by mlm_export.to_tensorrt)
    REPO/NAME/VERSION/model.savedmodel/   # backend tensorflow (tensorflow_savedmodel; the export's SavedModel)
    REPO/NAME/VERSION/mlm_scorer.json     # the export's manifest (checksum, tokenizer, identity probe) ...
    REPO/NAME/VERSION/tokenizer/          # ... and tokenizer: REPO/NAME is itself an export a client reads

The configuration has the export's ``serving_default`` signature: five INT32 inputs ``input_ids``,
``input_mask``, ``segment_ids`` [B,T] and ``masked_lm_positions``, ``masked_lm_ids`` [B,P]; outputs
``masked_lm_log_probs`` FP32 [B,P], ``top_k_ids`` INT32 and ``top_k_log_probs`` FP32 [B,P,k]. B is
Triton's batch dimension (``max_batch_size`` > 0, so it is left out of ``dims``); T and P are -1. k is
the manifest's ``top_k`` for the ONNX and TensorRT graphs (a fixed dimension there) and -1 for the
SavedModel, whose signature declares it unknown.

Dynamic batching is on (``dynamic_batching { max_queue_delay_microseconds: ... }``). Triton merges only
requests whose shapes agree apart from the batch dimension (no ``allow_ragged_batch``), so no padding is
added by the server and a merged batch gives each row exactly the numbers it gives alone: unlike TF
Serving's batching (export/serving_config.py), the client needs no padding row. ``max_batch_size`` caps
the copies in one request and in one merged batch; the client reads it from the model configuration and
sends requests of at most that size.

The manifest's identity is also in the configuration's ``parameters`` (``mlm_scorer.model_checksum``,
``mlm_scorer.vocab_sha256``, ``mlm_scorer.vocab_size``, ``mlm_scorer.top_k``), which Triton returns from
its model-configuration API (``GET /v2/models/NAME/config``, gRPC ``ModelConfig``): the client refuses a
server whose checksum is not its export's before sending a copy, and runs the export's identity probe
besides.

What was checked here: every generated file parses with Triton's own ``model_config.proto`` (tritonclient's
``model_config_pb2``) and is read by a real ``tritonserver`` 2.51, which gets as far as loading the backend;
the onnxruntime, tensorrt and tensorflow backends themselves are not on these machines (docs/triton.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

INPUTS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids")
OUTPUTS = ("masked_lm_log_probs", "top_k_ids", "top_k_log_probs")

#: backend -> (Triton platform, default_model_filename). Names from Triton's model configuration docs.
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "model.plan"),
    "tensorflow": ("tensorflow_savedmodel", "model.savedmodel"),
}
#: numpy dtype name (the manifest's signature) -> Triton's TYPE_* (model_config.proto DataType).
TRITON_TYPES = {"int32": "TYPE_INT32", "int64": "TYPE_INT64", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
                "float16": "TYPE_FP16", "bool": "TYPE_BOOL"}
#: The keys of the configuration's ``parameters`` that identify the export (read by the KServe clients).
PARAM_PREFIX = "mlm_scorer."
IDENTITY_PARAMS = ("model_checksum", "vocab_sha256", "vocab_size", "top_k")
#: Files of the export copied next to the model file, so that REPO/NAME is an export a client can read.
CLIENT_FILES = ("mlm_scorer.json", "tokenizer")
#: What the SavedModel directory holds (model.savedmodel/ gets these, not the manifest or the ONNX file).
SAVEDMODEL_FILES = ("saved_model.pb", "variables", "assets", "fingerprint.pb")

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 2000


class RepositoryError(ValueError):
    """The export cannot become a Triton model of the asked kind (a file missing, a bad setting)."""


def identity_parameters(manifest: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` entries that name the export (all string values, as ModelParameter holds)."""
    return {PARAM_PREFIX + k: str(manifest[k]) for k in IDENTITY_PARAMS if k in manifest}


def _dims(shape: list[int] | None, *, rank: int, k: int | None) -> list[int]:
    """Triton ``dims`` of a [B, ...] tensor: the batch dimension dropped, the rest -1 except a known k."""
    dims = [-1] * (rank - 1)
    if k is not None and rank == 3:
        dims[-1] = int(k)
    return dims


def config_text(manifest: dict[str, Any], *, name: str, backend: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instance_kind: str | None = None,
                instance_count: int | None = None, preferred_batch_sizes: tuple[int, ...] = ()) -> str:
    """The ``config.pbtxt`` (ModelConfig text proto) of the export described by ``manifest``.

    Args:
      manifest: the export's ``mlm_scorer.json`` (its ``signature.serving_default`` gives dtypes and ranks).
      name: the model name (must equal the directory name under the repository).
      backend: "onnxruntime", "tensorrt" or "tensorflow" (``BACKENDS``).
      max_batch_size: copies per request and per merged batch (Triton's batch dimension).
      max_queue_delay_us: how long the dynamic batcher waits to merge requests.
      instance_kind: None (Triton's default: one instance per GPU, else one on the CPU), "cpu" or "gpu".
      instance_count: model instances per device (None: Triton's default, 1).
      preferred_batch_sizes: the dynamic batcher's preferred sizes (each <= max_batch_size), usually none.

    Raises RepositoryError for an unknown backend or a value Triton would refuse.
    """
    if backend not in BACKENDS:
        raise RepositoryError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if not name or any(c in name for c in "/\\ \"") or name in (".", ".."):
        raise RepositoryError(f"model name {name!r} is not a valid directory name")
    if max_batch_size < 1:
        raise RepositoryError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise RepositoryError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    bad = [s for s in preferred_batch_sizes if not 1 <= s <= max_batch_size]
    if bad:
        raise RepositoryError(f"preferred batch sizes {bad} must lie in [1, max_batch_size={max_batch_size}] "
                              f"(Triton refuses the model otherwise)")
    if instance_kind not in (None, "cpu", "gpu"):
        raise RepositoryError(f"instance kind must be cpu or gpu, not {instance_kind!r}")
    if backend == "tensorrt" and instance_kind == "cpu":
        raise RepositoryError("a TensorRT plan runs on a GPU only: leave out the instance kind or give gpu")
    if instance_count is not None and instance_count < 1:
        raise RepositoryError(f"instance count must be at least 1, got {instance_count}")
    platform, filename = BACKENDS[backend]
    sig = (manifest.get("signature") or {}).get("serving_default") or {}
    k = None if backend == "tensorflow" else int(manifest["top_k"])

    def tensor(tname: str, spec: dict[str, Any], rank: int) -> str:
        dtype = spec.get("dtype", "float32" if "log_probs" in tname else "int32")
        if dtype not in TRITON_TYPES:
            raise RepositoryError(f"{tname}: dtype {dtype!r} has no Triton data type here")
        dims = _dims(spec.get("shape"), rank=rank, k=k)
        return (f"  {{\n    name: \"{tname}\"\n    data_type: {TRITON_TYPES[dtype]}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}")

    ins = sig.get("inputs") or {}
    outs = sig.get("outputs") or {}
    missing = [n for n in INPUTS if n not in ins] + [n for n in OUTPUTS if n not in outs]
    if missing:
        raise RepositoryError(f"the export's serving_default signature lacks {', '.join(missing)}; re-export it")
    lines = [
        "# Triton model configuration for an mlm-scorer export (written by mlm_export.triton_repo).",
        "# Inputs and outputs are the export's serving_default signature; B is the batch dimension.",
        f"name: \"{name}\"",
        f"platform: \"{platform}\"",
        f"backend: \"{backend}\"",
        f"max_batch_size: {int(max_batch_size)}",
        f"default_model_filename: \"{filename}\"",
        "input [\n" + ",\n".join(tensor(n, ins[n], 2) for n in INPUTS) + "\n]",
        "output [\n" + ",\n".join(tensor(n, outs[n], 2 if n == "masked_lm_log_probs" else 3)
                                  for n in OUTPUTS) + "\n]",
        "# Requests of equal shape (same T and P) are merged up to max_batch_size; nothing is padded.",
        "dynamic_batching {",
    ]
    if preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: [ {', '.join(str(int(s)) for s in preferred_batch_sizes)} ]")
    lines += [f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}", "}"]
    if instance_kind or instance_count:
        group = []
        if instance_count:
            group.append(f"count: {int(instance_count)}")
        if instance_kind:
            group.append(f"kind: KIND_{instance_kind.upper()}")
        lines.append("instance_group [ { " + " ".join(group) + " } ]")
    lines.append("# The export's identity: the mlm-scorer client compares it with its local copy of the export.")
    for key, value in identity_parameters(manifest).items():
        lines.append(f"parameters {{\n  key: \"{key}\"\n  value: {{ string_value: \"{value}\" }}\n}}")
    return "\n".join(lines) + "\n"


def _place(src: Path, dst: Path, link: bool) -> None:
    """Hard-link (same file system, no copy) or copy a file or a directory tree."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=(_link_or_copy if link else shutil.copy2))
    elif link:
        _link_or_copy(src, dst)
    else:
        shutil.copy2(src, dst)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _plan_max_batch(plan: Path) -> int | None:
    """The largest batch every optimization profile of a plan accepts (its ``<plan>.json``), or None."""
    meta = Path(str(plan) + ".json")
    if not meta.is_file():
        return None
    try:
        profiles = json.loads(meta.read_text(encoding="utf-8")).get("profiles") or []
        return min(int(p["batch"][2]) for p in profiles) if profiles else None
    except (ValueError, KeyError, TypeError, IndexError):
        raise RepositoryError(f"{meta} is malformed; rebuild the plan with python -m mlm_export.to_tensorrt") from None


def write_triton_repo(export_dir: str | os.PathLike, repo: str | os.PathLike, *, name: str = "bert",
                      backend: str = "onnxruntime", version: int | None = None, plan: str | os.PathLike | None = None,
                      max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      instance_kind: str | None = None, instance_count: int | None = None, link: bool = True,
                      overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/VERSION/<model file>`` from an export; return REPO/NAME.

    ``export_dir``: an export (base or version directory). ``version``: the repository's version directory
    (default: the export's). ``plan``: the TensorRT plan for backend tensorrt (default: ``model.plan`` in the
    export's version directory); ``max_batch_size`` is lowered to what every profile of the plan accepts.
    ``link``: hard-link the model files where the file system allows (else copy). The model file is checked
    against the manifest first (ONNX: the sha256 it records; plan: the model_checksum of its ``.json``).
    Files are written under a temporary name and renamed into place; ``overwrite`` replaces an existing
    REPO/NAME/VERSION that this program wrote (it holds an export's manifest; other versions and models in
    the repository are left alone). Before anything is written: ``config.pbtxt`` must be absent or a regular
    file, and neither the export nor the plan may lie in the version directory it replaces.
    Raises RepositoryError (a ValueError) with the fix, FileExistsError without ``overwrite``, UsageError
    for a ``config.pbtxt`` that is not a regular file.
    """
    from mlm_scorer.fsutil import atomic_write_bytes, check_target, make_temp_dir, remove_debris
    from mlm_scorer.model_dir import MANIFEST_NAME, ModelDir, sha256_file

    from .saved_model import is_export

    try:
        md = ModelDir.open(export_dir)
    except Exception as exc:  # ModelError: not an export
        raise RepositoryError(str(exc)) from None
    manifest = md.manifest
    if backend not in BACKENDS:
        raise RepositoryError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    version = md.version if version is None else int(version)
    if version is None or version < 1:
        raise RepositoryError("Triton needs a positive numeric version directory: give --version N (N >= 1)")
    _, filename = BACKENDS[backend]
    if backend == "onnxruntime":
        src = md.path / "model.onnx"
        if not src.is_file():
            raise RepositoryError(f"{src} is missing: export with mlm-export --onnx (ONNX needs the source checkpoint)")
        want = (manifest.get("onnx") or {}).get("sha256")
        if want and sha256_file(src) != want:
            raise RepositoryError(f"{src} does not match the sha256 its manifest records: it was replaced after "
                                  f"export; re-export with mlm-export --onnx")
    elif backend == "tensorrt":
        src = Path(plan) if plan else md.path / "model.plan"
        if not src.is_file():
            raise RepositoryError(f"{src} is missing: build a plan on the serving GPU with "
                                  f"python -m mlm_export.to_tensorrt {md.path} (TensorRT plans are per GPU model)")
        meta = Path(str(src) + ".json")
        if meta.is_file():
            try:
                plan_checksum = json.loads(meta.read_text(encoding="utf-8")).get("model_checksum")
            except ValueError:
                raise RepositoryError(f"{meta} is not JSON; rebuild the plan") from None
            if plan_checksum and plan_checksum != md.checksum:
                raise RepositoryError(f"{src} was built from another export (model_checksum in {meta.name} "
                                      f"differs from {md.path / MANIFEST_NAME})")
        cap = _plan_max_batch(src)
        if cap is not None and max_batch_size > cap:
            log(f"max_batch_size {max_batch_size} lowered to {cap}: the largest batch every profile of {src.name} "
                f"accepts")
            max_batch_size = cap
    else:
        src = md.path
        if not (src / "saved_model.pb").is_file():
            raise RepositoryError(f"{src / 'saved_model.pb'} is missing: not a SavedModel export")
    text = config_text(manifest, name=name, backend=backend, max_batch_size=max_batch_size,
                       max_queue_delay_us=max_queue_delay_us, instance_kind=instance_kind,
                       instance_count=instance_count)

    model_dir = Path(repo) / name
    vdir = model_dir / str(version)
    config = model_dir / "config.pbtxt"

    def check_vdir() -> None:
        if not os.path.lexists(vdir):
            return
        if not overwrite:
            raise FileExistsError(f"{vdir} exists; pass --overwrite to replace it")
        if not is_export(vdir):
            raise RepositoryError(f"{vdir} exists and is not a version directory written by this program (a "
                                  f"symlink, a file, or a directory without an mlm-export {MANIFEST_NAME}); refusing "
                                  f"to replace it: move it away or give another --version")

    check_vdir()
    check_target(config, "the model configuration", parent_must_exist=False)
    for read, what in ((md.path, "the export"), (src, "the model file")):
        real, v = os.path.realpath(read), os.path.realpath(vdir)
        if real == v or real.startswith(v + os.sep):
            raise RepositoryError(f"{what} {str(read)!r} lies in {vdir}, which this run replaces; give an export "
                                  f"outside the repository entry, or another --version")
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_debris(config)  # the temporary files of runs that were killed
    tmp = make_temp_dir(prefix=f".{version}.tmp-", dir=model_dir)
    try:
        if backend == "tensorflow":
            (tmp / filename).mkdir()
            for part in SAVEDMODEL_FILES:
                if (src / part).exists():
                    _place(src / part, tmp / filename / part, link)
        else:
            _place(src, tmp / filename, link)
        for part in CLIENT_FILES:
            _place(md.path / part, tmp / part, link=False)  # small; a copy keeps the repository self-contained
        check_vdir()
        if os.path.lexists(vdir):  # set aside, checked again (what was moved is what was checked), removed
            old = make_temp_dir(prefix=f".{version}.old-", dir=model_dir)
            os.replace(vdir, old / "version")
            if not is_export(old / "version"):
                os.replace(old / "version", vdir)
                os.rmdir(old)
                check_vdir()
                raise RepositoryError(f"{vdir} changed while it was replaced; refusing to replace it")
            os.replace(tmp, vdir)
            shutil.rmtree(old, ignore_errors=True)  # a directory this run made, holding the version checked above
        else:
            os.replace(tmp, vdir)
        atomic_write_bytes(config, text.encode("utf-8"), what="the model configuration")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # this run's own (make_temp_dir); gone once renamed
    log(f"wrote Triton model {name!r} version {version} ({backend}, max_batch_size {max_batch_size}) to {model_dir}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mlm_export.triton_repo",
        description="Write a Triton Inference Server model repository entry (config.pbtxt + model file) from an "
                    "mlm-export export.",
        epilog="examples:\n"
               "  python -m mlm_export.triton_repo models/bert triton-repo --name bert           # ONNX Runtime\n"
               "  python -m mlm_export.triton_repo models/bert triton-repo --name bert_tf --backend tensorflow\n"
               "  python -m mlm_export.triton_repo models/bert triton-repo --backend tensorrt --plan model.plan\n"
               "then: tritonserver --model-repository=triton-repo   (docs/triton.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="export directory written by mlm-export (base or version directory)")
    ap.add_argument("repo", help="model repository directory (created if missing; other models are kept)")
    ap.add_argument("--name", default="bert", help="model name in the repository (default bert)")
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="onnxruntime",
                    help="onnxruntime (default; needs model.onnx: mlm-export --onnx), tensorflow (the SavedModel), "
                         "tensorrt (a plan from python -m mlm_export.to_tensorrt)")
    ap.add_argument("--version", type=int, help="version directory in the repository (default: the export's)")
    ap.add_argument("--plan", help="TensorRT plan file (default: model.plan in the export)")
    ap.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                    help=f"copies per request and per merged batch (default {DEFAULT_MAX_BATCH_SIZE})")
    ap.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                    help=f"dynamic batcher's wait to merge requests, microseconds (default {DEFAULT_QUEUE_DELAY_US})")
    ap.add_argument("--instance-kind", choices=["cpu", "gpu"], help="where model instances run (default: Triton's "
                                                                    "choice: each GPU, else the CPU)")
    ap.add_argument("--instances", type=int, help="model instances per device (default 1)")
    ap.add_argument("--copy", action="store_true", help="copy the model files instead of hard-linking them")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing REPO/NAME/VERSION")
    args = ap.parse_args(argv)
    from mlm_scorer.errors import MlmScorerError

    try:
        write_triton_repo(args.export, args.repo, name=args.name, backend=args.backend, version=args.version,
                          plan=args.plan, max_batch_size=args.max_batch_size,
                          max_queue_delay_us=args.max_queue_delay_us, instance_kind=args.instance_kind,
                          instance_count=args.instances, link=not args.copy, overwrite=args.overwrite,
                          log=lambda m: print(m, file=sys.stderr))
    except (RepositoryError, FileExistsError, MlmScorerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(args.repo) / args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
