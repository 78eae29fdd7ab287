"""What bounds the fp32 in-process engine on this CPU: the engine vs its own matrix products vs 4096².

Three things are timed in interleaved rounds, in one process, on the same batch shape:

  ceiling    fp32 4096x4096 matrix product (TensorFlow and numpy): the "machine ceiling" the peer
             benchmark divides by
  products   the model's dense products alone, in TensorFlow, at the engine's shapes and in its order:
             Q/K/V/attention-output/FFN of every layer over B*T rows (the last layer's Q, output and FFN
             over the B masked rows only, as graph revision 2 runs it), the head's transform and the
             vocabulary projection at the B masked rows. No attention, softmax, LayerNorm, GELU or
             embedding: what the engine would reach if everything but these products were free
  engine     the in-process SavedModel engine (the default) on a batch of that shape

With ``--streams S`` (default: the engine's automatic choice, one per core up to 4) the engine runs S
batches at once, one per stream, and so do the TensorFlow products and the TensorFlow 4096² product (S
concurrent calls on S threads: TensorFlow's thread pools are the engine's); numpy's 4096² product keeps
its own threads. ``--streams 1`` is the single-stream engine (one batch over all cores, as before commit
59dcbab).

"engine / products" says how close the graph runs to its own products (the rest of the graph's
cost); "products / ceiling" says how fast fp32 products of BERT's shapes (K = 768) run on this CPU
compared with a large square one. Their product is the engine's share of the ceiling.

Usage: python scripts/bench_bound.py [--batch 256] [--seq 13] [--streams auto|S] [--rounds 4] [--seconds 8]
                                    [--out FILE]
Each round also records the CPU steal (time the hypervisor gave to other VMs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (REPO, SHAPES, Steal, command_line, emit, ensure_export, executed_flops_ours,  # noqa: E402
                          fmt_pct, git_rev, machine, make_checkpoint)

V = 30522


def product_shapes(B: int, T: int, shape: str = "bert-base") -> list[tuple[int, int, int]]:
    """(M, K, N) of every dense product the engine runs for B copies of T tokens, one masked position each."""
    h, layers, _, inter = SHAPES[shape]
    full = [(B * T, h, h)] * 4 + [(B * T, h, inter), (B * T, inter, h)]  # Q, K, V, attention output, FFN in/out
    last = [(B, h, h), (B * T, h, h), (B * T, h, h), (B, h, h), (B, h, inter), (B, inter, h)]  # Q at B rows only
    head = [(B, h, h), (B, h, V)]  # transform dense, vocabulary projection
    return full * (layers - 1) + last + head


def rate(fn, seconds: float) -> float:
    """Calls per second of fn(), after one untimed call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def in_streams(fn, streams: int):
    """A callable that runs fn() once on each of ``streams`` threads at once (fn() itself for one)."""
    if streams == 1:
        return fn
    import concurrent.futures as cf

    pool = cf.ThreadPoolExecutor(streams)
    return lambda: [f.result() for f in [pool.submit(fn) for _ in range(streams)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="copies per call (the CLI's default max batch)")
    ap.add_argument("--seq", type=int, default=13, help="tokens per copy incl. [CLS]/[SEP] (BLiMP: ~13)")
    ap.add_argument("--streams", default="auto", help="engine streams (default: the engine's automatic choice)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    ap.add_argument("--work", default=str(REPO / "bench-out" / "peers"))
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    a = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work / "bert-base-hf", "bert-base")
    export_dir = ensure_export(ckpt, work / "bert-base-export", log=log)

    import numpy as np
    import tensorflow as tf

    from mlm_scorer.engines.base import Batch, get_engine
    from mlm_scorer.model_dir import ModelDir

    B, T = a.batch, a.seq
    md = ModelDir.open(export_dir)
    eng = get_engine("saved_model", model=md, **({} if a.streams == "auto" else {"streams": a.streams}))
    S = eng.streams
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, V, size=(B, T)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102
    pos = rng.integers(1, T - 1, size=(B, 1)).astype(np.int32)
    batch = Batch(ids, np.ones_like(ids), np.zeros_like(ids), pos, np.take_along_axis(ids, pos, 1).copy())

    shapes = product_shapes(B, T)
    prod_flop = sum(2 * m * k * n for m, k, n in shapes)
    # A weight matrix per product, as in the model (bert-base streams ~430 MB of them per call: shared
    # weights would stay in cache and flatter the bound); one input per shape.
    weights = [tf.Variable(tf.random.normal((k, n), stddev=0.02)) for _, k, n in shapes]
    inputs = {(m, k): tf.random.normal((m, k)) for m, k, _ in shapes}

    @tf.function
    def products():
        # Independent products (the inputs are fixed), so no value feeds the next; the sum of one
        # element of each keeps every product live for the graph optimizer.
        s = tf.constant(0.0)
        for (m, k, _), w in zip(shapes, weights):
            s += tf.matmul(inputs[(m, k)], w)[0, 0]
        return s

    sq_tf = tf.random.normal((4096, 4096))
    square_tf = tf.function(lambda: tf.matmul(sq_tf, sq_tf)[0, 0])
    sq_np = rng.standard_normal((4096, 4096), dtype=np.float32)
    sq_flop = 2 * 4096 ** 3
    exec_flop = executed_flops_ours("bert-base", T)  # per copy, incl. attention (what the engine executes)

    square_tf_s = in_streams(lambda: square_tf().numpy(), S)
    products_s = in_streams(lambda: products().numpy(), S)
    rows = []
    for r in range(a.rounds):
        with Steal() as st:
            c_tf = rate(square_tf_s, a.seconds / 2) * S * sq_flop / 1e9
            c_np = rate(lambda: sq_np @ sq_np, a.seconds / 2) * sq_flop / 1e9
            p = rate(products_s, a.seconds) * S * prod_flop / 1e9
            e = rate(lambda: list(eng.map([batch] * S)), a.seconds) * S * B
        row = {"round": r + 1, "steal": st.pct, "ceil_tf": c_tf, "ceil_np": c_np, "products": p,
               "products_cps": p * 1e9 / prod_flop * B, "engine_cps": e, "engine_gflops": e * exec_flop / 1e9}
        rows.append(row)
        log(f"round {r + 1}: steal {st}, 4096² TF {c_tf:.0f} / numpy {c_np:.0f} GFLOP/s, products {p:.0f} GFLOP/s "
            f"({row['products_cps']:.1f} copies/s), engine {e:.1f} copies/s")
    eng.close()

    m = machine()
    best = max(rows, key=lambda x: x["engine_cps"])
    ceil = max(max(x["ceil_tf"], x["ceil_np"]) for x in rows)
    lines = [
        f"### What bounds the fp32 engine: bert-base, {B} copies × {T} tokens per call, {S} stream(s)",
        "",
        f"Engine threading: {S} stream(s); TensorFlow intra-op {eng.threading['intra_op']}, inter-op "
        f"{eng.threading['inter_op']} threads (the TensorFlow rows run as {S} concurrent call(s) too).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; Python {m['python']}; TensorFlow "
        f"{tf.__version__}; {m['date']}; commit {git_rev()}; command `{command_line()}`. "
        f"{a.rounds} interleaved rounds of {a.seconds:g} s "
        f"per measurement. Dense products per call: {len(shapes)}, {prod_flop / 1e9:.1f} GFLOP "
        f"({prod_flop / B / 1e9:.3f} per copy; the engine executes {exec_flop / 1e9:.3f} per copy with attention).",
        "",
        "| round | CPU steal | 4096² TF GFLOP/s | 4096² numpy GFLOP/s | products alone GFLOP/s | products alone "
        "copies/s | engine copies/s | engine / products | products / 4096² (same round) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        c = max(x["ceil_tf"], x["ceil_np"])
        lines.append(f"| {x['round']} | {fmt_pct(x['steal'])} | "
                     f"{x['ceil_tf']:.0f} | {x['ceil_np']:.0f} | {x['products']:.0f} | {x['products_cps']:.1f} | "
                     f"{x['engine_cps']:.1f} | {x['engine_cps'] / x['products_cps']:.0%} | {x['products'] / c:.0%} |")
    lines += [
        "",
        f"Best engine round: {best['engine_cps']:.1f} copies/s = {best['engine_gflops']:.0f} GFLOP/s executed, "
        f"{best['engine_cps'] / best['products_cps']:.0%} of its own products in that round; the highest 4096² "
        f"rate of the run was {ceil:.0f} GFLOP/s.",
    ]
    emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()
