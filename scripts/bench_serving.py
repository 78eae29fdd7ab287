#!/usr/bin/env python
"""Copies/s in-process vs TF Serving over REST and gRPC, and the client's own share of the time.

    python scripts/bench_serving.py --shape bert-base --sentences 200       # random bert-base-shaped export
    python scripts/bench_serving.py --model EXPORT_DIR --server-rest http://h:8501 --server-grpc grpc://h:8500

Without ``--server-*`` the test stand-in (tests/tfserving_standin, TensorFlow in a Python process) serves the
export on 127.0.0.1: its server-side numbers are not those of ``tensorflow_model_server``; the client's
share (tokenizing + building arrays, encoding requests, decoding responses) is measured on the client
either way. Client share = (prepare + encode + decode seconds) / wall seconds of the whole run, where
encode/decode are timed by replaying the same requests/responses through the client's own code.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("the a of to and in is was for on that with as by at from his her it an were are which this be has "
         "had not but they their first one new after two also who its other all been more when would time "
         "year there can into only may than over most some city such made these up people many out later "
         "during under would school world house river music family three between about").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))) for _ in range(n)]


def make_export(shape: str, out: Path) -> Path:
    from mlm_export import export
    from tiny_models import UNCASED_VOCAB, make_hf_bert

    if shape == "bert-base":
        kw = dict(hidden=768, layers=12, heads=12, intermediate=3072, max_pos=512, init_range=0.02,
                  vocab=UNCASED_VOCAB)
    else:
        kw = {}
    make_hf_bert(out / "hf", **kw)
    export(out / "hf", out / "bert", log=lambda *_: None)
    return out / "bert"


def timed_map(engine, batches) -> float:
    t = time.perf_counter()
    for _ in engine.map(batches):
        pass
    return time.perf_counter() - t


def rest_codec_seconds(engine, batches) -> tuple[float, float]:
    """Encode (json of the columnar body) and decode (json, numpy, the answer's checks) seconds over the
    batches' requests (with their padding and verification rows, as the engine sends them)."""
    from mlm_scorer.engines._remote import check_output
    from mlm_scorer.engines.tf_serving_rest import ALL_OUTPUTS, json_tensor

    enc = dec = 0.0
    for b in batches:
        inputs, _, _ = engine.request(b)
        t = time.perf_counter()
        body = json.dumps({"signature_name": "serving_default", "inputs": {k: v.tolist() for k, v in inputs.items()}},
                          separators=(",", ":")).encode()
        enc += time.perf_counter() - t
        raw = engine._session.post(engine._root + ":predict", data=body, timeout=engine._timeouts).content
        t = time.perf_counter()
        doc = json.loads(raw)["outputs"]
        specs, used = engine.expect(inputs, ALL_OUTPUTS), inputs["masked_lm_positions"] != 0
        for name in engine._outputs:
            check_output(specs[name], json_tensor(doc[name], specs[name]), used=used, vocab_size=engine.vocab_size)
        dec += time.perf_counter() - t
    return enc, dec


def grpc_codec_seconds(engine, batches) -> tuple[float, float]:
    from tensorflow_serving.apis import predict_pb2

    from mlm_scorer.engines._remote import check_output
    from mlm_scorer.engines.tf_serving_grpc import from_tensor_proto, to_tensor_proto

    enc = dec = 0.0
    for b in batches:
        inputs, _, _ = engine.request(b)
        t = time.perf_counter()
        req = predict_pb2.PredictRequest(output_filter=engine._outputs)
        engine._spec(req)
        for k, v in inputs.items():
            req.inputs[k].CopyFrom(to_tensor_proto(v))
        data = req.SerializeToString()
        enc += time.perf_counter() - t
        resp = engine._predict_stub.Predict(req, timeout=engine.opts.timeout, metadata=engine._metadata)
        raw = resp.SerializeToString()
        t = time.perf_counter()
        r = predict_pb2.PredictResponse.FromString(raw)
        specs, used = engine.expect(inputs, engine._outputs), inputs["masked_lm_positions"] != 0
        for name in engine._outputs:
            check_output(specs[name], from_tensor_proto(r.outputs[name], specs[name]), used=used,
                         vocab_size=engine.vocab_size)
        dec += time.perf_counter() - t
        del data
    return enc, dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="export base dir (default: make a random one of --shape)")
    ap.add_argument("--shape", choices=("tiny", "bert-base"), default="tiny")
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--mode", default="whole-word")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-batch-size", type=int, default=64, help="rows per request (the server's max_batch_size)")
    ap.add_argument("--server-rest")
    ap.add_argument("--server-grpc")
    ap.add_argument("--engines", default="saved_model,rest,grpc")
    ap.add_argument("--json", help="write the results here as JSON")
    a = ap.parse_args()

    from mlm_scorer.batching import BatchPolicy
    from mlm_scorer.engines.fake import FakeEngine
    from mlm_scorer.model_dir import ModelDir
    from mlm_scorer.scorer import Scorer

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    base = Path(a.model) if a.model else make_export(a.shape, tmp)
    md = ModelDir.open(base)
    texts = sentences(a.sentences)
    t = time.perf_counter()
    # batches of max_batch_size - 2 copies: with the padding and verification rows, one request each
    policy = BatchPolicy(max_batch_size=a.max_batch_size - 2)
    prep = Scorer(md, FakeEngine(md), mode=a.mode, policy=policy).prepare(texts)
    batches = list(prep.built)  # all built here (the scorer builds a large chunk's as the engine takes them)
    prepare_s = time.perf_counter() - t
    copies = sum(len(b) for b in batches)
    print(f"{len(texts)} sentences -> {copies} copies in {len(batches)} batches; prepare {prepare_s:.2f}s", flush=True)

    server = None
    engines = a.engines.split(",")
    if ("rest" in engines and not a.server_rest) or ("grpc" in engines and not a.server_grpc):
        from tfserving_standin import StandIn

        server = StandIn({"bert": base}, tmp).start()
    rows = []
    try:
        for name in engines:
            opts = {"concurrency": a.concurrency, "max_batch_size": a.max_batch_size, "timeout": 600}
            if name == "saved_model":
                from mlm_scorer.engines.tf_saved_model import SavedModelEngine

                eng, opts = SavedModelEngine(md), {}
            elif name == "rest":
                from mlm_scorer.engines.tf_serving_rest import RestEngine

                eng = RestEngine(md, server=a.server_rest or server.rest_url, **opts)
            else:
                from mlm_scorer.engines.tf_serving_grpc import GrpcEngine

                eng = GrpcEngine(md, server=a.server_grpc or server.grpc_url, **opts)
            with eng:
                eng.run(batches[0])  # warm up
                wall = timed_map(eng, batches)
                enc = dec = 0.0
                if name == "rest":
                    enc, dec = rest_codec_seconds(eng, batches)
                elif name == "grpc":
                    enc, dec = grpc_codec_seconds(eng, batches)
            total = wall + prepare_s
            share = (prepare_s + enc + dec) / total
            rows.append({"engine": name, "copies": copies, "seconds": round(total, 3),
                         "copies_per_s": round(copies / total, 1), "prepare_s": round(prepare_s, 3),
                         "encode_s": round(enc, 3), "decode_s": round(dec, 3), "client_share": round(share, 4)})
            print(f"{name:12s} {copies / total:9.1f} copies/s  total {total:7.2f}s  prepare {prepare_s:5.2f}s  "
                  f"encode {enc:5.2f}s  decode {dec:5.2f}s  client share {share:6.1%}", flush=True)
    finally:
        if server is not None:
            server.stop()
    if a.json:
        Path(a.json).write_text(json.dumps({"shape": a.shape, "mode": a.mode, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
