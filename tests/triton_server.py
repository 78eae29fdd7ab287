"""A real Triton server for the tests: several exports behind PyTriton's tritonserver (run in .venv-triton).

    .venv-triton/bin/python tests/triton_server.py --http-port P --grpc-port Q --workspace DIR \
        --model bert=EXPORT --model other=EXPORT2 --bare other_bare=EXPORT2

``--model NAME=EXPORT`` serves an export as scripts/serve_triton.py does (its identity in the configuration's
parameters); ``--bare NAME=EXPORT`` leaves the identity out, so only the client's probes can tell the model
apart. Prints ``READY <access token>`` once every model is loaded: the token opens Triton's restricted
APIs (model repository load/unload, statistics), which the tests use to make a model not ready.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import serve_triton  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=EXPORT")
    ap.add_argument("--bare", action="append", default=[], metavar="NAME=EXPORT")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    serve_triton.prepare_environment()
    from pytriton.triton import Triton

    cfg = serve_triton.triton_config(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=None,
                                     host="127.0.0.1")
    with Triton(config=cfg, workspace=args.workspace) as triton:
        for items, identity in ((args.model, True), (args.bare, False)):
            for item in items:
                name, _, export = item.partition("=")
                serve_triton.bind_export(triton, Path(export), name=name, max_batch_size=args.max_batch_size,
                                         max_queue_delay_us=args.max_queue_delay_us, threads=1,
                                         with_identity=identity)
        serve_triton.stop_on_sigterm(triton)
        print(f"READY {triton.get_access_token()}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
