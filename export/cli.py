"""mlm-export: masked-LM checkpoint (BERT, RoBERTa, CamemBERT, XLM-R, DistilBERT, ELECTRA generator, ESM) ->
SavedModel at OUT/VERSION (+ manifest, tokenizer, verification)."""
from __future__ import annotations

import argparse
import sys

from mlm_scorer.errors import MlmScorerError

from .config import LAYER_NORMS  # TensorFlow-free

EPILOG = """examples:
  mlm-export ./my-bert-hf-dir models/bert          # Hugging Face dir (model.safetensors / pytorch_model.bin)
  mlm-export ./uncased_L-12_H-768_A-12 models/bert  # original Google TF-1 checkpoint directory
  mlm-export bert-base-uncased models/bert --version 2 --top-k 10   # hub id (needs network)
  mlm-export ./my-bert-hf-dir models/bert --onnx   # add model.onnx to the existing models/bert/1
  saved_model_cli show --dir models/bert/1 --all    # inspect the signatures
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlm-export", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="Hugging Face model dir or hub id (BERT, RoBERTa, CamemBERT, XLM-R, DistilBERT, "
                                   "ELECTRA generator, ESM: docs/models.md), or a TF-1 BERT checkpoint dir")
    ap.add_argument("out", help="model base directory; the SavedModel goes to OUT/VERSION")
    ap.add_argument("--version", type=int, default=1, help="numeric version subdirectory (default 1)")
    ap.add_argument("--top-k", type=int, default=None, help="predictions returned per masked position (default 5)")
    ap.add_argument("--max-seq-length", type=int, default=None,
                    help="longest copy the scorer will send (default: the model's max_position_embeddings; "
                         "RoBERTa's minus 2, its positions start at 2)")
    case = ap.add_mutually_exclusive_group()
    case.add_argument("--do-lower-case", dest="do_lower_case", action="store_true", default=None,
                      help="lower-case the input (default: decided from tokenizer_config.json / tokenizer.json, "
                           "else the checkpoint's name, else the vocabulary; contradictory evidence is refused)")
    case.add_argument("--no-lower-case", dest="do_lower_case", action="store_false",
                      help="do not lower-case (a cased model)")
    ap.add_argument("--tolerance", type=float, default=None, help="max |Δ log-prob| allowed by verification")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT/VERSION")
    ap.add_argument("--layer-norm", choices=LAYER_NORMS, default="fused",
                    help="how the SavedModel writes LayerNorm: fused (default) is the form TensorFlow's oneDNN "
                         "rewrite (default in x86-64 Linux builds) runs as one op; plain is faster on a "
                         "TensorFlow (Serving) built without oneDNN")
    onnx = ap.add_mutually_exclusive_group()
    onnx.add_argument("--onnx", action="store_true", default=None,
                      help="also write OUT/VERSION/model.onnx (same inputs and outputs), which the default engine "
                           "runs: the default whenever onnx and onnxruntime are installed (mlm-scorer[onnx]); with "
                           "--onnx their absence is an error, and when OUT/VERSION exists the file is added there "
                           "(the checkpoint must be the one it was exported from)")
    onnx.add_argument("--no-onnx", dest="onnx", action="store_false", help="write the SavedModel alone")
    ap.add_argument("--quantize", choices=["int8"], help="also write an int8 dynamically quantized "
                                                         "model.int8.onnx, with its drift report (implies --onnx)")
    ap.add_argument("--int8-config", choices=["fast", "accurate"], default=None,
                    help="how --quantize int8 quantizes (implies it). fast (default): 8-bit activations, 7-bit "
                         "weights; on AntiBERTy 2.5-2.7x ONNX fp32 per CPU-second, mean drift 0.013 nats per "
                         "token. accurate: ~14-bit activations (two 7-bit parts: twice the integer work), 8-bit "
                         "GPTQ-rounded weights; 1.2x fp32, drift 0.0048. Both compute alike on every CPU "
                         "(docs/export-format.md)")
    from mlm_scorer.logs import add_output_flags

    add_output_flags(ap, progress=False)
    args = ap.parse_args(argv)
    if args.version < 0:
        ap.error("--version must be a non-negative integer")
    if args.int8_config and not args.quantize:
        args.quantize = "int8"

    import logging
    import os
    from pathlib import Path

    from mlm_scorer.logs import configure_cli, import_tensorflow

    configure_cli("mlm-export", quiet=args.quiet, verbose=args.verbose)
    logger = logging.getLogger("mlm_export")
    log = logger.info
    final = Path(args.out) / str(args.version)
    # decided before the checkpoint is loaded (seconds to minutes): an existing version is refused, or gets the
    # ONNX files added to it
    adding = os.path.lexists(final) and not args.overwrite and bool(args.onnx or args.quantize)
    try:
        if adding:
            manifest = existing_export(final, args)
        else:
            from .saved_model import check_version_dir

            check_version_dir(args.out, args.version, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as exc:
        logger.error(str(exc))
        return 2
    except MlmScorerError as exc:  # a file the export would write that is not a regular file
        logger.error(str(exc))
        return exc.exit_code
    if not adding:
        try:
            import_tensorflow()  # first, so that its C++ start-up lines are filtered (see mlm_scorer.logs)
        except ImportError as exc:
            logger.error(f"{exc.name or exc} is not installed: pip install 'mlm-scorer[tf]'")
            return 1

    from .checkpoint import CheckpointError, load_checkpoint
    from .saved_model import DEFAULT_TOLERANCE
    from .verify import VerificationError

    tol = args.tolerance or DEFAULT_TOLERANCE
    try:
        ckpt = load_checkpoint(args.source, do_lower_case=args.do_lower_case)
        if adding:
            log(f"{final} exists: adding {'model.onnx and model.int8.onnx' if args.quantize else 'model.onnx'} to it "
                f"(top_k {manifest['top_k']}, max_seq_length {manifest['max_seq_length']} as exported)")
            path = final
        else:
            from .saved_model import export_checkpoint

            path = export_checkpoint(ckpt, args.out, version=args.version, top_k=args.top_k or 5,
                                     max_seq_length=args.max_seq_length, overwrite=args.overwrite, tolerance=tol,
                                     layer_norm=args.layer_norm, log=log)
        if args.onnx is None and not args.quantize:
            import importlib.util

            args.onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
            if not args.onnx:
                log("not writing model.onnx (pip install 'mlm-scorer[onnx]' for it): the SavedModel engine will run")
        if args.onnx or args.quantize:
            from .onnx_graph import INT8_CONFIGS
            from .to_onnx import write_onnx

            write_onnx(path, ckpt, quantize=args.quantize, tolerance=tol, log=log,
                       int8_spec=INT8_CONFIGS[args.int8_config or "fast"])
    except ImportError as exc:
        logger.error(f"{exc} (ONNX export needs: pip install 'mlm-scorer[onnx]')")
        return 1
    except (CheckpointError, VerificationError, FileExistsError, ValueError) as exc:
        logger.error(str(exc))
        return 2 if isinstance(exc, (FileExistsError, ValueError)) else 1
    except MlmScorerError as exc:  # a file the export would write that is not a regular file
        logger.error(str(exc))
        return exc.exit_code
    print(path)
    return 0


def existing_export(final, args) -> dict:
    """The manifest of the existing version ``final`` that --onnx / --quantize adds files to; ValueError if it
    is not an export, or if --top-k / --max-seq-length / --layer-norm given ask for another one (they are
    the existing export's)."""
    from mlm_scorer.errors import ModelError
    from mlm_scorer.model_dir import MANIFEST_NAME, load_manifest

    if final.is_symlink() or not final.is_dir():
        raise ValueError(f"{final} exists and is not an export directory; choose another --version")
    try:
        manifest = load_manifest(final)
    except ModelError as exc:
        raise ValueError(f"{final} exists and is not a readable mlm-export export ({exc}); choose another "
                         f"--version") from None
    asked = {"--top-k": (args.top_k, manifest.get("top_k")),
             "--max-seq-length": (args.max_seq_length, manifest.get("max_seq_length")),
             "--layer-norm": (args.layer_norm if args.layer_norm != "fused" else None, manifest.get("layer_norm"))}
    for flag, (want, have) in asked.items():
        if want is not None and want != have:
            raise ValueError(f"{final} was exported with {flag} {have} (its {MANIFEST_NAME}); adding ONNX files keeps "
                             f"it. For {flag} {want}, export a new --version")
    return manifest


if __name__ == "__main__":
    sys.exit(main())
