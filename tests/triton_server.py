"""A real Triton server for the tests: several exports behind PyTriton's tritonserver (run in .venv-triton).

    .venv-triton/bin/python tests/triton_server.py --http-port P --grpc-port Q --workspace DIR \
        --model bert=EXPORT --model other=EXPORT2 --bare other_bare=EXPORT2

``--restrict-inference`` makes inference need Triton's access-token header as well (a real header check for
the client's ``headers`` option); ``--grpc-tls-cert/--grpc-tls-key`` serve gRPC over TLS. ``--model
NAME=EXPORT`` serves an export as scripts/serve_triton.py does (its identity in the configuration's
parameters); ``--bare NAME=EXPORT`` leaves the identity out, so only the client's probes can tell the model
apart. Prints ``READY`` once every model is loaded, after writing the access token to ``--token-file``:
the token opens Triton's restricted APIs (model repository load/unload, statistics), which the tests use
to make a model not ready and to count the requests a model answered.

``--swap NAME=EXPORT`` loads EXPORT beside NAME's own export; each SIGUSR1 then switches the weights NAME
answers with (the server prints ``SWAPPED n``) while the server, its connections and the model's name,
version and configuration stay: what a client sees of a model reloaded in place on other files (Triton's
model-control mode ``poll``, or ``explicit`` with a load request). Triton itself cannot reload a PyTriton
model: loaded again in place, the new instance's proxy cannot bind the socket the running one holds
("Address already in use") and the load fails; unloaded and loaded again, the new instance refuses
PyTriton's handlers ("digest sent was rejected").
"""
from __future__ import annotations

import argparse
import logging
import signal
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
    ap.add_argument("--token-file", required=True, help="where to write the access token before READY")
    ap.add_argument("--swap", action="append", default=[], metavar="NAME=EXPORT",
                    help="each SIGUSR1 switches model NAME between its export's weights and EXPORT's")
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
    swaps = dict(item.partition("=")[::2] for item in args.swap)
    swapped = [0]  # SIGUSR1s received: odd, the swap exports answer
    with Triton(config=cfg, workspace=args.workspace, security_config=security) as triton:
        for items, identity in ((args.model, True), (args.bare, False)):
            for item in items:
                name, _, export = item.partition("=")
                infer = None
                if name in swaps:
                    infer = switching(_callable(Path(export)), _callable(Path(swaps[name])), swapped)
                serve_triton.bind_export(triton, Path(export), name=name, max_batch_size=args.max_batch_size,
                                         max_queue_delay_us=args.max_queue_delay_us, threads=1,
                                         with_identity=identity, infer=infer)
        serve_triton.stop_on_sigterm(triton)

        def swap(signum, frame):
            swapped[0] += 1
            print(f"SWAPPED {swapped[0]}", flush=True)

        signal.signal(signal.SIGUSR1, swap)
        token = Path(args.token_file)
        token.with_suffix(".part").write_text(triton.get_access_token())
        token.with_suffix(".part").replace(token)
        print("READY", flush=True)
        triton.serve()
    return 0


def _callable(export: Path):
    vdir = serve_triton.version_dir(export)
    return serve_triton.export_callable(vdir, serve_triton.read_manifest(vdir), threads=1)


def switching(own, other, swapped: list[int]):
    """A callable answering with ``own`` while ``swapped[0]`` is even, with ``other`` while it is odd. A
    merged batch runs whole on one of them: each request's rows, its verification row included, see one
    model."""
    def infer(requests: list) -> list:
        return (other if swapped[0] % 2 else own)(requests)

    return infer


if __name__ == "__main__":
    sys.exit(main())
