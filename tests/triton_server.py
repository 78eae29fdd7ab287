"""A real Triton server for the tests: several exports behind PyTriton's tritonserver (run in .venv-triton).

    .venv-triton/bin/python tests/triton_server.py --http-port P --grpc-port Q --workspace DIR \
        --model bert=EXPORT --model other=EXPORT2 --bare other_bare=EXPORT2

``--restrict-inference`` makes inference need Triton's access-token header as well (a real header check for
the client's ``headers`` option); ``--grpc-tls-cert/--grpc-tls-key`` serve gRPC over TLS. ``--model NAME=EXPORT`` serves an export as scripts/serve_triton.py does (its identity in the configuration's
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
    ap.add_argument("--restrict-inference", action="store_true",
                    help="inference needs the access token too (header triton-access-token)")
    ap.add_argument("--grpc-tls-cert", help="serve gRPC over TLS with this certificate (PEM) ...")
    ap.add_argument("--grpc-tls-key", help="... and key")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    serve_triton.prepare_environment()
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonSecurityConfig

    cfg = serve_triton.triton_config(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=None,
                                     host="127.0.0.1")
    if args.grpc_tls_cert:
        cfg.grpc_use_ssl = True
        cfg.grpc_server_cert = args.grpc_tls_cert
        cfg.grpc_server_key = args.grpc_tls_key
    restricted = list(DEFAULT_PROTECTED_ENDPOINTS) + (["inference"] if args.restrict_inference else [])
    security = TritonSecurityConfig(restricted_endpoints=restricted)
    with Triton(config=cfg, workspace=args.workspace, security_config=security) as triton:
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
