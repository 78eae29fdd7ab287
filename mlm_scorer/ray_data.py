"""Score a dataset past one machine with Ray Data: each actor of a pool reads, scores and writes its share.

    from mlm_scorer.ray_data import score_dataset
    summary = score_dataset(["a.tsv", "b.parquet"], "out/", model="models/bert")

or ``mlm-score ray a.tsv b.parquet -o out/ --model models/bert``.

Pipeline (streaming: no stage holds the dataset)::

    driver: plan splits (a TSV: byte offsets of every BATCH_ROWS-th line, one pass over the file;
            a Parquet file: its row groups' row counts, from the footer)
        --> ray.data.from_items(splits) --map_batches(actor pool)-->
    actor:  for each split: read its rows (TsvReader at the split's byte offset; Parquet: the row
            group's batches), score them in batches of BATCH_ROWS with the model it loaded once, write
            words/ and sentences/ part files for each batch, and yield one small row of counts
        --> driver: counts -> progress and the summary; at the end, summary.json and one rename.

Only split descriptions (a few hundred bytes each) and count rows travel through Ray's object store; text,
scores and words never do. Memory per actor is one batch (BATCH_ROWS rows and their masked copies), the
driver holds the split list, so the memory of a run does not grow with the dataset
(``tests/test_ray.py`` measures peak RSS and object-store use at 1x and 10x rows). The actors are the only
Ray tasks that take CPUs: no read or write task can be starved by the pool.

Defaults from the cluster (``plan_actors``): actors of up to 4 CPUs sharing every node's CPUs equally,
each running its engine's streams on its share; ``num_actors`` alone shares the cluster's CPUs among that many actors;
``num_cpus_per_actor`` alone fits as many as the nodes hold; with GPUs (``num_gpus_per_actor``), one
actor per GPU share. The engine of each actor plans its threads for its CPUs (``MLM_SCORER_CPUS``).

Output (``OUTDIR``, replaced as a whole at the end: a rerun gives the same result, never a mix)::

    OUTDIR/words/       Parquet part files: a leading ``file`` column (the input path as given), then exactly
                        the CLI's word schema (``writer.word_schema``): row, line, [id], [pass-through], ...
    OUTDIR/sentences/   ``file`` + exactly the CLI's sentence schema (``writer.sentence_schema``)
    OUTDIR/summary.json counts and settings (the same keys as the CLI's ``--summary-json`` where they apply)

Part files are named ``part-FFFFF-RRRRRRRRRRRR.parquet`` (input file number, first row), so reading a
directory with ``pyarrow.parquet.read_table`` gives the rows in input order: files in the order given,
rows in file order. ``row`` is the 0-based data row within its file and ``line`` the 1-based physical
line of a TSV (for a Parquet input: the 1-based row number in the file). Both datasets carry the CLI's
schema metadata key ``mlm_scorer`` (model, mode, engine, inputs), so ``mlm-score report`` reads them.

All inputs of one run must have the same columns (one output schema). On a multi-node cluster, every node
must see the inputs, the model and the output's parent directory at the same paths (a shared filesystem):
the actors read and write there; the driver renames the finished directory into place.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import stat
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from .errors import InputError, MlmScorerError, UsageError
from .fsutil import (OwnedDir, atomic_write_bytes, create_exclusive, default_file_mode, identity, lstat_or_none,
                     replace_file, safe_unlink, temp_owner, temp_path)
from .logs import filtered_stderr, is_ray_chatter, log, verbose
from .progress import peak_rss_bytes
from .quality import FlagRule
from .reader import (MAX_ROW_CHARS, OUTPUT_COLUMNS, Layout, Row, TsvReader, is_parquet, open_reader, parquet_rows,
                     refuse_output_names)
from .writer import sentence_schema, word_schema

__all__ = ["score_dataset", "plan_actors", "ActorPlan", "OUTPUT_MARKER", "read_marker", "check_replaceable"]

_STATS = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("rows", pa.int64()), ("scored", pa.int64()),
                    ("words", pa.int64()), ("copies", pa.int64()), ("flagged", pa.int64()),
                    ("pll_sum", pa.float64()), ("skipped_rows", pa.string()), ("actor", pa.string()),
                    ("node", pa.string()), ("max_rss", pa.int64())])
#: The largest actor the defaults make: as many CPUs as one process's engine runs streams for by default
#: (engines.base.MAX_AUTO_STREAMS); a bigger node gets several actors.
MAX_ACTOR_CPUS = 4


# ------------------------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and what each reserves and runs.

    ``min_actors`` of the ``num_actors`` fit in the cluster as it is now; the pool starts with those
    and grows as nodes join (an autoscaling cluster). ``threads``: the CPU threads of each actor's engine.
    """

    num_actors: int
    min_actors: int
    cpus: float
    gpus: float
    threads: int


def _fit(capacity: list[float], need: float) -> int:
    """Actors of ``need`` units that the nodes hold (each node holds floor(capacity / need))."""
    if need <= 0:
        return 10 ** 6
    return sum(int(c / need + 1e-9) for c in capacity)


def plan_actors(nodes: list[dict[str, float]], *, num_actors: int | None = None, cpus_per_actor: float | None = None,
                gpus_per_actor: float = 0, available: list[dict[str, float]] | None = None) -> ActorPlan:
    """Choose the actor pool from the alive nodes' resources (``[{"CPU": 16, "GPU": 2}, ...]``).

    CPU only: neither given, actors of up to ``MAX_ACTOR_CPUS`` CPUs, one model each, the node's CPUs
    shared equally (a 2-CPU node: one actor of 2 CPUs, which scored as fast as two of 1 CPU with half
    the memory, BENCHMARKS.md; 16 CPUs: four of 4), one size for every node (the smallest node's share);
    ``num_actors`` alone: the largest equal share of a node's CPUs that still places them all; ``cpus_per_actor`` alone: as many as the nodes hold. With GPUs: one actor per
    ``gpus_per_actor`` share of every node's GPUs, with an equal share of that node's CPUs.
    ``available``: the nodes' free resources now (others' work holds the rest); the pool starts with the
    actors that fit there (at least one) and grows to ``num_actors`` as resources free up.
    """
    cpus = [float(n.get("CPU", 0)) for n in nodes]
    if not any(c > 0 for c in cpus):
        raise UsageError("the Ray cluster has no CPUs (ray.cluster_resources() shows none): add a node with CPUs")
    if num_actors is not None and num_actors < 1:
        raise UsageError(f"num_actors must be positive, got {num_actors}")
    if cpus_per_actor is not None and cpus_per_actor <= 0:
        raise UsageError(f"num_cpus_per_actor must be positive, got {cpus_per_actor}")
    if gpus_per_actor < 0:
        raise UsageError(f"num_gpus_per_actor must be >= 0, got {gpus_per_actor}")
    if gpus_per_actor > 0:
        gpus = [float(n.get("GPU", 0)) for n in nodes]
        per_node = [int(g / gpus_per_actor + 1e-9) for g in gpus]
        fit_gpu = sum(per_node)
        if fit_gpu == 0:
            raise UsageError(f"no node of the Ray cluster has {gpus_per_actor:g} GPU(s) (GPUs per node: "
                             f"{[g for g in gpus]}); lower num_gpus_per_actor or add GPU nodes")
        if cpus_per_actor is None:
            shares = [c / k for c, k in zip(cpus, per_node) if k]
            c = min(shares)
            cpus_per_actor = float(int(c)) if c >= 1 else c
        n = num_actors or fit_gpu
        fit = min(fit_gpu, _fit(cpus, cpus_per_actor))
    elif num_actors is None and cpus_per_actor is None:
        whole = [c for c in cpus if c >= 1]
        cpus_per_actor = min(c / math.ceil(c / MAX_ACTOR_CPUS) for c in whole) if whole else max(cpus)
        n = fit = _fit(cpus, cpus_per_actor)
    elif cpus_per_actor is None:
        # the largest c = (a node's CPUs) / k under which all num_actors actors are placed
        cands = sorted({c / k for c in cpus if c > 0 for k in range(1, num_actors + 1)}, reverse=True)
        cpus_per_actor = next((c for c in cands if _fit(cpus, c) >= num_actors), cands[-1])
        n, fit = num_actors, _fit(cpus, cpus_per_actor)
    else:
        fit = _fit(cpus, cpus_per_actor)
        if fit == 0:
            raise UsageError(f"no node of the Ray cluster has {cpus_per_actor:g} CPUs (CPUs per node: {cpus}); "
                             f"lower num_cpus_per_actor (--cpus-per-actor) or leave it out to choose from the cluster")
        n = num_actors or fit
    # Ray's resolution for fractional resources is 1e-4; round down, or 3 actors of 2/3 CPU would not fit in 2
    cpus_per_actor = math.floor(float(cpus_per_actor) * 1e4 + 1e-6) / 1e4
    if available is not None:
        free = _fit([float(a.get("CPU", 0)) for a in available], cpus_per_actor)
        if gpus_per_actor > 0:
            free = min(free, _fit([float(a.get("GPU", 0)) for a in available], gpus_per_actor))
        fit = min(fit, free)
    return ActorPlan(num_actors=n, min_actors=max(1, min(n, fit)), cpus=cpus_per_actor,
                     gpus=float(gpus_per_actor), threads=max(1, int(cpus_per_actor + 0.5)))


def _alive_nodes(ray) -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """Total and free resources of each alive node (free: None where this Ray cannot say)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import available_resources_per_node  # a DeveloperAPI of Ray 2.x

        free = available_resources_per_node()
        return [n["Resources"] for n in alive], [free.get(n["NodeID"], {}) for n in alive]
    except Exception:  # noqa: BLE001 - an optional refinement
        return [n["Resources"] for n in alive], None


# ---------------------------------------------------------------------------------------------- layout
def _layout(path: str, text_column, id_column, header: bool) -> Layout:
    with open_reader(path, text_column=text_column, id_column=id_column, header=header or is_parquet(path)) as r:
        return r.layout


def _check_layouts(inputs: list[str], layouts: list[Layout]) -> Layout:
    for path, lay in zip(inputs, layouts):  # Ray's outputs add a column "file"
        refuse_output_names(lay, path, reserved=OUTPUT_COLUMNS | {"file"})
    first = layouts[0]
    for path, lay in zip(inputs[1:], layouts[1:]):
        if (lay.id_name, lay.passthrough_names, lay.text is None) != (first.id_name, first.passthrough_names,
                                                                       first.text is None):
            raise UsageError(f"all inputs of one run need the same columns: {inputs[0]} has {first.names}, "
                             f"{path} has {lay.names} (score them in separate runs)")
    return first


# ---------------------------------------------------------------------------------------------- splits
@dataclass
class TsvPlan:
    """What the planner read of a TSV: the byte offset of data rows 0, B, 2B, ... (``starts``), the number of
    data rows, and the file's identity as read: size, mtime, sha256 of all of it, of the header (the bytes
    before data row 0) and of each batch (``starts[i]`` up to the next start, or the end)."""

    starts: list[int]
    rows: int
    size: int
    mtime_ns: int
    sha256: str
    header_sha256: str
    batch_sha256: list[str]


def tsv_plan(path: str, *, header: bool, batch_rows: int, block: int = 1 << 22) -> TsvPlan:
    """Plan a TSV in one pass (newlines counted with NumPy, about as fast as the disk), hashing what it reads.

    A row is a physical line, as ``TsvReader`` reads it: row ``i`` is line ``i + 1 + header``. Raises
    UsageError if the file changes while it is read (its size or mtime before and after differ).
    """
    import hashlib

    import numpy as np

    first_line = 2 if header else 1  # line of data row 0
    starts: list[int] = []
    want = first_line  # next line whose start offset we need
    newlines = 0  # newlines before the current block
    size = 0
    last = b"\n"
    whole = hashlib.sha256()
    segments = [hashlib.sha256()]  # the header, then one per batch start found
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        while chunk := f.read(block):
            nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            cut = 0  # where the current segment resumes in this chunk
            # line L starts after newline number L-1 (1-based); line 1 at offset 0
            while want == 1 or newlines < want - 1 <= newlines + len(nl):
                start = 0 if want == 1 else size + int(nl[want - 2 - newlines]) + 1
                starts.append(start)
                segments[-1].update(chunk[cut:start - size])
                segments.append(hashlib.sha256())
                cut = start - size
                want += batch_rows
            segments[-1].update(chunk[cut:])
            whole.update(chunk)
            newlines += len(nl)
            size += len(chunk)
            last = chunk[-1:]
        after = os.fstat(f.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or after.st_size != size:
        raise UsageError(f"{path} changed while the run was planning its splits; rerun on a file that stays as it is")
    lines = newlines + (0 if last == b"\n" or size == 0 else 1)
    rows = max(0, lines - (1 if header else 0))
    n = math.ceil(rows / batch_rows)
    # a start at the very end of the file (after its last newline) begins no row: it and its empty segment go
    kept = [s for s in starts if s < size][:n]
    return TsvPlan(starts=kept, rows=rows, size=size, mtime_ns=after.st_mtime_ns, sha256=whole.hexdigest(),
                   header_sha256=segments[0].hexdigest(), batch_sha256=[h.hexdigest() for h in segments[1:1 + n]])


def tsv_batch_starts(path: str, *, header: bool, batch_rows: int, block: int = 1 << 22) -> tuple[list[int], int]:
    """Byte offsets of data rows 0, B, 2B, ... of a TSV (B = ``batch_rows``), and its number of data rows."""
    plan = tsv_plan(path, header=header, batch_rows=batch_rows, block=block)
    return plan.starts, plan.rows


def parquet_footer_sha256(path: str) -> str:
    """sha256 of a Parquet file's footer (its metadata: schema, row groups, column chunk offsets and
    statistics, and the 8 bytes after it): what the planner reads of a Parquet input."""
    import hashlib

    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end < 12:
            raise UsageError(f"{path} is not a Parquet file (too short)")
        f.seek(end - 8)
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little")
        f.seek(max(0, end - 8 - n))
        return hashlib.sha256(f.read()).hexdigest()


def _identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _scan(inputs: list[str], *, header: bool, batch_rows: int) -> list[tuple]:
    """Every input as runs of consecutive batches: (file number, path, kind, [[(offset or row group,
    start in the group, rows, first row, sha256 of the batch or None), ...], ...], identity): one run for a
    TSV, one per Parquet row group. ``identity``: what the planner read (size, mtime, content hashes)."""
    import pyarrow.parquet as pq

    scan = []
    for i, path in enumerate(inputs):
        if is_parquet(path):
            ident = _identity(path)
            ident["footer_sha256"] = parquet_footer_sha256(path)
            md = pq.ParquetFile(path).metadata
            runs, offset = [], 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                runs.append([(g, s, min(batch_rows, n - s), offset + s, None) for s in range(0, n, batch_rows)])
                offset += n
            if _identity(path) != {k: ident[k] for k in ("path", "size", "mtime_ns")}:
                raise UsageError(f"{path} changed while the run was planning its splits; rerun on a file that "
                                 f"stays as it is")
            scan.append((i, path, "parquet", runs, ident))
        else:
            plan = tsv_plan(path, header=header, batch_rows=batch_rows)
            ident = {"path": os.path.abspath(path), "size": plan.size, "mtime_ns": plan.mtime_ns,
                     "sha256": plan.sha256, "header_sha256": plan.header_sha256,
                     "header_bytes": plan.starts[0] if plan.starts else plan.size}
            scan.append((i, path, "tsv", [[(off, 0, min(batch_rows, plan.rows - b * batch_rows), b * batch_rows,
                                            plan.batch_sha256[b]) for b, off in enumerate(plan.starts)]], ident))
    return scan


def _splits(scan: list[tuple], *, header: bool, batches_per_split: int | None, num_actors: int,
            batch_rows: int) -> list[dict]:
    """Work units for the actors, in input order: up to k consecutive batches of one TSV or of one
    Parquet row group. About four splits per actor for a small input (every actor gets work), at most 16
    batches for a large one (a lost actor costs little to redo; an actor skips to its place in a row
    group by reading the group's first batches). Each carries what the planner read of its file (size,
    mtime, the hashes of its batches), which the actor checks before it scores a row."""
    total_batches = sum(len(run) for *_, runs, _ in scan for run in runs)
    k = batches_per_split or max(1, min(16, total_batches // (4 * num_actors)))
    line0 = 2 if header else 1
    splits = []
    for i, path, kind, runs, ident in scan:
        for run in runs:
            for a in range(0, len(run), k):
                group = run[a:a + k]
                where, start, _, row, _ = group[0]
                tsv = kind == "tsv"
                splits.append({"file": i, "path": path, "kind": kind, "row": row, "rows": sum(u[2] for u in group),
                               "line": row + line0 if tsv else row + 1, "offset": where if tsv else 0,
                               "row_group": -1 if tsv else where, "start": start, "batch_rows": batch_rows,
                               "size": ident["size"], "mtime_ns": ident["mtime_ns"],
                               "check": ident.get("header_sha256") or ident.get("footer_sha256"),
                               "header_bytes": ident.get("header_bytes", 0),
                               "batches": [u[4] for u in group] if tsv else []})
    return splits


class _HashingTsvReader(TsvReader):
    """A TsvReader that hashes the bytes it reads (``digest``), to compare them with the planner's."""

    def __init__(self, *args: Any, **kwargs: Any):
        import hashlib

        self.digest = hashlib.sha256()
        super().__init__(*args, **kwargs)

    def _read(self, limit: int) -> bytes:
        block = super()._read(limit)
        self.digest.update(block)
        return block


def _changed(spec: dict, what: str) -> UsageError:
    return UsageError(f"{spec['path']} changed after the run planned its splits ({what}); nothing of this run is "
                      f"published: rerun on a file that stays as it is")


def _read_split(spec: dict, lay: Layout, *, text_column, id_column, header: bool,
                max_row_chars: int = MAX_ROW_CHARS) -> Iterator[list[Row]]:
    """The split's rows, in the planner's batches, each checked against what the planner read of the file
    before it is yielded: the file's size and mtime, then the sha256 of the header and of each batch's
    bytes (TSV) or of the footer (Parquet). A file rewritten after planning raises UsageError."""
    import hashlib

    path, want, batch_rows = spec["path"], spec["rows"], spec["batch_rows"]
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != (spec["size"], spec["mtime_ns"]):
        raise _changed(spec, f"size {st.st_size:,} and mtime {st.st_mtime_ns} instead of {spec['size']:,} and "
                             f"{spec['mtime_ns']}")
    if spec["kind"] == "tsv":
        from itertools import islice

        with open(path, "rb") as f:  # the header first: a changed one would fail the reader's own checks
            if hashlib.sha256(f.read(spec["header_bytes"])).hexdigest() != spec["check"]:
                raise _changed(spec, "its header line differs")
        with _HashingTsvReader(path, text_column=text_column, id_column=id_column, header=header,
                               max_row_chars=max_row_chars) as reader:
            if header and reader.digest.hexdigest() != spec["check"]:
                raise _changed(spec, "its header line differs")
            reader.seek(spec["offset"], line=spec["line"], index=spec["row"])
            it = iter(reader)
            for b, planned in enumerate(spec["batches"]):
                reader.digest = hashlib.sha256()
                rows = list(islice(it, min(batch_rows, want)))
                first = spec["line"] + b * batch_rows
                if reader.digest.hexdigest() != planned:
                    raise _changed(spec, f"the bytes of lines {first}-{first + min(batch_rows, want) - 1} differ")
                want -= len(rows)
                yield rows
        return
    import pyarrow.parquet as pq

    if parquet_footer_sha256(path) != spec["check"]:
        raise _changed(spec, "its Parquet footer differs")
    start, pos = spec["start"], 0  # rows of the row group before the split, before the current batch
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, row_groups=[spec["row_group"]]):
        a, b = max(start - pos, 0), min(start + spec["rows"] - pos, batch.num_rows)
        if a < b:
            yield parquet_rows(batch.slice(a, b - a), lay, path, first=spec["row"] + pos + a - start,
                               max_row_chars=max_row_chars)
        pos += batch.num_rows
        if pos >= start + spec["rows"]:
            return


# ---------------------------------------------------------------------------------------------- actors
class _ScoreActor:
    """One model per actor, loaded in ``__init__``; ``__call__`` reads, scores and writes its splits."""

    def __init__(self, *, settings: dict, layout: Layout, flag_rules: list[FlagRule], out_dir: str,
                 status_dir: str, meta: dict, threads: int | None, log_level: int):
        """``settings``: ``ScoreSettings.to_dict()`` as the driver resolved it (the model's version directory,
        the engine that runs and its options); ``flag_rules``: the rules with a baseline's thresholds taken."""
        if threads:  # the engine plans its threads for this actor's share of the node
            os.environ["MLM_SCORER_CPUS"] = str(threads)
        log.setLevel(log_level)  # quiet or verbose as the driver (TensorFlow's start-up lines follow it)
        import ray

        from .settings import ScoreSettings

        s = ScoreSettings.from_dict(settings)
        self.layout, self.on_bad_row, self.flag_rules = layout, s.on_bad_row, flag_rules
        self.read_kw = {"text_column": s.text_column, "id_column": s.id_column, "header": s.header,
                        "max_row_chars": s.max_row_chars}
        self.out = Path(out_dir)
        self.schemas = _out_schemas(layout, s.top_k, bool(flag_rules), meta)
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"
        self.node_id = ray.get_runtime_context().get_node_id()
        self.status = Path(status_dir) / f"{os.uname().nodename}-{os.getpid()}.json"
        _set_status(self.status, f"loading the model with engine {s.engine}")
        # An error here (a model a node cannot see, an engine option, a missing package) is raised by the
        # first call instead: Ray would otherwise restart the actor over and over, and the run would end
        # in a bare ActorDiedError rather than our message.
        self.error: MlmScorerError | None = None
        try:
            self._open(s)
        except MlmScorerError as exc:
            self.error = exc
        _set_status(self.status, "failed" if self.error else "ready")

    def _open(self, s) -> None:
        from .batching import BatchPolicy
        from .engines.base import get_engine
        from .model_dir import ModelDir
        from .scorer import Scorer

        md = ModelDir.open(s.model)
        eng = get_engine(s.engine, model=md, top_k=s.top_k > 0, **s.engine_call_options())
        policy = BatchPolicy.for_engine(eng, s.batch_tokens, s.max_batch_size)
        self.scorer = Scorer(md, eng, mode=s.mode, top_k=s.top_k, policy=policy, cache_size=s.dedupe_cache)
        self.vocab = ([self.scorer.tokenizer.id_to_token(i) for i in range(self.scorer.tokenizer.vocab_size)]
                      if s.top_k else None)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        if self.error is not None:
            raise _Shipped(self.error)
        for spec in batch.to_pylist():
            try:
                for rows in _read_split(spec, self.layout, **self.read_kw):
                    yield self._score(spec, rows)
            except _Shipped:
                raise
            except MlmScorerError as exc:
                raise _Shipped(exc) from None

    def _score(self, spec: dict, rows: list[Row]) -> pa.Table:
        from .pipeline import ScoreSummary, build_columns

        sc, path = self.scorer, spec["path"]
        try:
            prepared = sc.prepare([r.text for r in rows if r.error is None])
            results = sc.run(prepared)
            W, S, st = build_columns(rows, results, path=path, on_bad_row=self.on_bad_row, scorer=sc,
                                     layout=self.layout, vocab=self.vocab, flag_rules=self.flag_rules)
        except MlmScorerError as exc:
            raise _Shipped(exc) from None
        name = f"part-{spec['file']:05d}-{rows[0].index:012d}.parquet"
        _write_part(self.out / "sentences" / name, {"file": [path] * len(S["row"]), **S}, self.schemas["sentences"])
        _write_part(self.out / "words" / name, {"file": [path] * len(W["row"]), **W}, self.schemas["words"])
        skipped = [{"file": path, **sk} for sk in st["skipped"][:ScoreSummary.MAX_LISTED]]
        return pa.Table.from_pylist([{
            "file": spec["file"], "row": rows[0].index, "rows": len(rows), "scored": st["scored"],
            "words": st["words"], "copies": prepared.n_copies, "flagged": st["flagged"], "pll_sum": st["pll_sum"],
            "skipped_rows": json.dumps(skipped), "actor": self.actor_id, "node": self.node_id,
            "max_rss": peak_rss_bytes()}], schema=_STATS)


def _set_status(path: Path, phase: str) -> None:
    """What an actor is doing, for the driver's start-up report (best effort: a report, not a result). Written
    under the actor's own temporary name, then renamed; never into a directory made again once the run has
    removed its workspace."""
    try:
        tmp = temp_path(path)
        fd = create_exclusive(tmp, default_file_mode())
    except OSError:
        return
    made = identity(os.fstat(fd))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps({"phase": phase, "since": time.time(), "pid": os.getpid()}).encode())
        replace_file(tmp, path, "an actor's status file")
    except (OSError, MlmScorerError):
        safe_unlink(tmp, identity_of=made)


def _out_schemas(lay: Layout, top_k: int, flag: bool, meta: dict) -> dict[str, pa.Schema]:
    md = {"mlm_scorer": json.dumps(meta, sort_keys=True)}
    file_field = pa.field("file", pa.string())
    return {"words": pa.schema([file_field] + list(word_schema(lay.id_name, lay.passthrough_names, top_k > 0)),
                               metadata=md),
            "sentences": pa.schema([file_field] + list(sentence_schema(lay.id_name, lay.passthrough_names, flag)),
                                   metadata=md)}


def _write_part(final: Path, columns: dict, schema: pa.Schema) -> None:
    """Write one part file under the actor's own hidden temporary name (``fsutil.temp_path``, created
    exclusively), then rename it: a retried batch replaces it whole, and readers (which skip names starting
    with '.') never see a partial file."""
    from .quality import atomic_write_parquet

    atomic_write_parquet(pa.Table.from_pydict(columns, schema=schema), final, what="a part file")


# ------------------------------------------------------------------------------------------ ownership
#: The file ``mlm-score ray`` writes into every output directory (no other command writes this name): the
#: run's identity. A directory is replaced only when it carries one, and holds nothing else foreign.
OUTPUT_MARKER = "_mlm_score_ray.json"
WRITTEN_BY = "mlm-score ray"
#: what an output directory may hold besides its parts: the marker, the summary, and ``check.json``
#: (``mlm-score check --json``, the Airflow check task)
_OWN_FILES = {OUTPUT_MARKER, "summary.json", "check.json"}
_PART = re.compile(r"part-\d{5}-\d{12}\.parquet")


def read_marker(out: Path) -> dict | None:
    """The marker of an output directory ``mlm-score ray`` wrote, or None (absent, not a regular file, or
    not a marker of ours)."""
    path = out / OUTPUT_MARKER
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("written_by") == WRITTEN_BY and doc.get("run_id") else None


def _foreign(out: Path) -> list[str]:
    """Entries of an output directory that ``mlm-score ray`` does not write (relative paths)."""
    found = []
    for e in sorted(os.scandir(out), key=lambda e: e.name):
        if e.name in ("words", "sentences") and e.is_dir(follow_symlinks=False):
            found += [f"{e.name}/{f.name}" for f in sorted(os.scandir(e.path), key=lambda f: f.name)
                      if not (_PART.fullmatch(f.name) and f.is_file(follow_symlinks=False))]
        elif not (e.name in _OWN_FILES and e.is_file(follow_symlinks=False)):
            found.append(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
    return found


def check_replaceable(out: Path, *, overwrite: bool = True) -> None:
    """Raise UsageError (exit 2) unless ``out`` may become this run's output: absent, an empty directory, or
    a directory written by ``mlm-score ray`` (its marker) holding nothing it did not write."""
    if out.is_symlink():
        raise UsageError(f"output {str(out)!r} is a symbolic link; the ray runner replaces a directory of its own: "
                         f"give the real path, or another directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"output {str(out)!r} is not a directory; the ray runner writes a directory (words/, "
                         f"sentences/)")
    try:
        if not any(out.iterdir()):
            return
    except OSError as exc:
        raise UsageError(f"output directory {str(out)!r} cannot be read ({exc.strerror})") from None
    owner = read_marker(out)
    if owner is None:
        raise UsageError(f"output directory {str(out)!r} is not empty and was not written by mlm-score ray (it has "
                         f"no {OUTPUT_MARKER}); refusing to replace it. Choose a new or empty directory")
    if not overwrite:
        raise UsageError(f"output directory {str(out)!r} exists (written by mlm-score ray, run {owner['run_id']}); "
                         f"pass overwrite=True to replace it")
    foreign = _foreign(out)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UsageError(f"output directory {str(out)!r} was written by mlm-score ray but now also holds "
                         f"{', '.join(foreign[:5])}{more}, which it did not write; refusing to replace it (they "
                         f"would be lost). Move them out, or choose another directory")


def _own_name(name: str, finals: Callable[[str], bool]) -> bool:
    """A name the runner writes (``finals``), or a temporary name of one: ``fsutil.temp_path``'s, or the
    ``.NAME.tmp`` and ``.NAME.tmp-PID`` of earlier versions."""
    if finals(name):
        return True
    m = re.fullmatch(r"\.(.+)\.tmp(-.*)?", name)
    return m is not None and finals(m[1]) and (m[2] is None or temp_owner(m[1], name) is not None)


def _is_part(name: str) -> bool:
    return _own_name(name, lambda n: _PART.fullmatch(n) is not None)


def _real_dir(path: Path) -> bool:
    st = lstat_or_none(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _remove_run_dir(d: Path) -> bool:
    """Delete a run directory (``run-ID`` in the workspace: what a run's actors wrote; ``old-ID``: the output
    a run replaced; ``.OUT.tmp-PID``: an earlier version's) as far as it is the runner's own: the part files
    of words/ and sentences/, the summary, the marker, check.json and their temporary names (regular files:
    ``fsutil.OwnedDir``, ``safe_unlink``), never through a symlink. Anything else stays, and the directories
    holding it. Returns whether it is gone."""
    if not _real_dir(d):
        return False
    for sub in ("words", "sentences"):
        if _real_dir(d / sub):
            OwnedDir(d / sub, f"the run directory {d / sub}", _is_part).remove()
    return OwnedDir(d, f"the run directory {d}", lambda n: _own_name(n, _OWN_FILES.__contains__)).remove()


def _left_in(d: Path, skip: set[str]) -> list[str]:
    """What is in ``d`` (files and empty directories, relative paths; symlinks not followed), but ``skip``."""
    found = []
    for root, dirs, files in os.walk(d):
        rel = os.path.relpath(root, d)
        if rel == ".":
            dirs[:] = [x for x in dirs if x not in skip]
            files = [f for f in files if f not in skip]
        names = files + [x for x in dirs if os.path.islink(os.path.join(root, x))]
        found += [os.path.normpath(os.path.join(rel, n)) for n in names]
        if not names and not dirs and rel != ".":
            found.append(rel + "/")
    return sorted(found)


def workspace_path(out: Path) -> Path:
    """The run's own directory beside its output (``_Workspace``)."""
    return out.with_name(f".{out.name}.mlm-score-ray")


def check_inputs_kept(inputs: Iterable[str | os.PathLike], out: Path) -> None:
    """Raise UsageError (exit 2), before anything is touched, if an input lies in the output directory (which
    the run replaces as a whole) or in the runner's workspace beside it, through symlinks or as a hard link
    to a file there."""
    places = [(out, "the output directory"), (workspace_path(out), "the runner's workspace")]
    there: dict[tuple[int, int], str] = {}  # (device, inode) of the files in those places
    for d, _ in places:
        if _real_dir(d):
            for root, _dirs, files in os.walk(d):
                for f in files:
                    st = lstat_or_none(os.path.join(root, f))
                    if st is not None and stat.S_ISREG(st.st_mode):
                        there.setdefault(identity(st), os.path.join(root, f))
    for p in map(str, inputs):
        real = os.path.realpath(p)
        for d, what in places:
            if real.startswith(os.path.realpath(d) + os.sep):
                raise UsageError(f"refusing to run: the input {p!r} lies inside {what} {str(d)!r}, which this run "
                                 f"replaces or deletes; move the input out of it or choose another output directory")
        try:
            st = os.stat(p)
        except OSError:
            continue
        if identity(st) in there:
            raise UsageError(f"refusing to run: the input {p!r} is the file {there[identity(st)]!r} (a hard link), "
                             f"which this run would replace; copy the input or choose another output directory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Workspace:
    """The run's own directory beside its output, ``.OUT.mlm-score-ray/``::

        lock          flock'ed by the live run for all of it (writer.lock_output, as mlm-score's own output
                      lock): a second run on OUT is refused (OutputLocked, exit 2)
        owner.json    this run: id, host, pid, start
        run-ID/       what the actors write (words/, sentences/), renamed to OUT when complete
        actors/       what each actor is doing (the start-up report)

    A run removes it when it ends, whatever the outcome. A driver killed with SIGKILL leaves it behind;
    the next run on OUT takes the free lock and removes what the dead run left (its Ray processes are
    ended by ``_Reaper`` when its driver dies). Entries it does not know are refused, never deleted; in
    those it knows, only the regular files the runner writes are deleted (never through a symlink), and
    anything else left there is refused as well.
    """

    def __init__(self, out: Path, run_id: str):
        self.out, self.run_id = out, run_id
        self.dir = workspace_path(out)
        self.stage = self.dir / f"run-{run_id}"
        self.actors = self.dir / "actors"
        self.debris: str | None = None  # what a dead run left, when there was something
        self._fd: int | None = None

    def __enter__(self) -> "_Workspace":
        from .writer import lock_output

        for _ in range(10):  # a run that ends removes the directory: make it again
            if os.path.lexists(self.dir) and not _real_dir(self.dir):
                raise UsageError(f"{self.dir} is not a directory of mlm-score ray's; move it away")
            self.dir.mkdir(exist_ok=True)
            try:
                self._fd = lock_output(self.dir / "lock", self.out)
                break
            except FileNotFoundError:
                continue
        else:
            raise UsageError(f"cannot take the lock {self.dir / 'lock'}: its directory keeps disappearing")
        try:
            self._clear()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        try:
            info = {"written_by": WRITTEN_BY, "run_id": self.run_id, "host": os.uname().nodename,
                    "pid": os.getpid(), "started": time.time(), "output": str(self.out.absolute())}
            with os.fdopen(create_exclusive(self.dir / "owner.json", default_file_mode()), "w", encoding="utf-8") as f:
                json.dump(info, f)
            for sub in ("sentences", "words"):
                (self.stage / sub).mkdir(parents=True)
            self.actors.mkdir()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _refusal(self, names: list[str]) -> UsageError:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return UsageError(f"{self.dir} holds {shown}, which mlm-score ray did not write; move them away (the "
                          f"directory is the runner's own workspace for {self.out})")

    def _remove_entry(self, e: Path) -> None:
        """Delete an entry of the workspace as far as it is the runner's own (regular files it writes)."""
        if e.name == "owner.json":
            safe_unlink(e)
        elif e.name == "actors":
            if _real_dir(e):
                OwnedDir(e, f"the actors' status directory {e}", lambda n: _own_name(n, lambda x: x.endswith(".json"))
                         ).remove()
        elif e.name.startswith(("run-", "old-")):
            _remove_run_dir(e)

    def _clear(self) -> None:
        """Remove what a dead run left here (the lock is free, so its run is gone): only the files the runner
        writes, never through a symlink; anything else is refused (UsageError), and stays."""
        entries = [e for e in self.dir.iterdir() if e.name != "lock"]
        unknown = [e.name for e in entries if e.name not in ("owner.json", "actors") and
                   not e.name.startswith(("run-", "old-"))]
        if unknown:
            raise self._refusal(sorted(unknown))
        if entries:
            try:
                dead = json.loads((self.dir / "owner.json").read_text(encoding="utf-8"))
                self.debris = f"run {dead.get('run_id')}, pid {dead.get('pid')} on {dead.get('host')}"
            except (OSError, ValueError, AttributeError):
                self.debris = "an earlier run"
        for e in entries:
            self._remove_entry(e)
        left = _left_in(self.dir, {"lock"})
        if left:
            raise self._refusal(left)
        # the temporary directories of older versions (.OUT.tmp-PID) whose process is gone
        for e in self.out.parent.glob(f".{glob.escape(self.out.name)}.tmp-*"):
            pid = e.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)) and _real_dir(e) and \
                    {c.name for c in e.iterdir()} <= {"words", "sentences", "summary.json"}:
                _remove_run_dir(e)

    def publish(self, *, overwrite: bool) -> None:
        """Rename the complete stage to OUT. The earlier output, checked again, is moved into the workspace
        first and checked once more there: what was moved is what was checked (a symlink or a foreign
        directory put at OUT in between is moved back, and the run refused)."""
        check_replaceable(self.out, overwrite=overwrite)
        if os.path.lexists(self.out):
            old = self.dir / f"old-{self.run_id}"
            os.replace(self.out, old)
            try:
                check_replaceable(old, overwrite=overwrite)
            except UsageError:
                os.replace(old, self.out)
                check_replaceable(self.out, overwrite=overwrite)  # says what it is, naming OUT
                raise
        os.replace(self.stage, self.out)

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            for e in list(self.dir.iterdir()):
                self._remove_entry(e)
            safe_unlink(self.dir / "lock")
            os.rmdir(self.dir)
        except OSError:
            pass  # left for the next run, which removes what is its own
        finally:
            os.close(self._fd)
            self._fd = None


_REAPER = r"""
import os, signal, sys, time
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
procs = {}
for line in sys.stdin:  # "PID START" lines, until the driver closes the pipe: it ended, or was killed
    pid, start = line.split()
    procs[int(pid)] = start
time.sleep(float(sys.argv[1]))  # a driver that ended normally has shut its Ray down by now
for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = [p for p, s in procs.items() if started(p) == s]
    for p in alive:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    if not alive:
        break
    time.sleep(2)
"""


class _Reaper:
    """Ends the Ray processes a driver started (``ray.init`` without an address) once the driver is gone.

    Ray's gcs, raylet and workers die with the driver, but its dashboard and runtime-env agents, orphaned
    by a driver killed with SIGKILL, keep running for about a minute (they try to report the raylet's death
    to a GCS that is gone). A small process, in a session of its own, holds a pipe from the driver and
    learns the driver's descendants (pid and start time, so a reused pid is never hit); when the pipe
    closes it waits ``grace`` seconds and ends those still running. Linux only (/proc); elsewhere a no-op.
    """

    def __init__(self, grace: float = 3.0):
        self.proc = None
        if not Path("/proc/self/stat").exists():
            return
        import subprocess
        import sys

        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _REAPER, str(grace)], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                         text=True)
        except OSError:
            self.proc = None
        self._sent: set[tuple[int, str]] = set()

    def watch_descendants(self) -> None:
        """Send the driver's descendants not sent yet (call again as Ray starts more processes)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children: dict[int, list[int]] = {}
        starts: dict[int, str] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(d))
            starts[int(d)] = fields[19]
        todo, found = [os.getpid()], []
        while todo:
            for c in children.get(todo.pop(), []):
                if c != self.proc.pid:
                    found.append(c)
                    todo.append(c)
        new = {(p, starts[p]) for p in found if p in starts} - self._sent
        try:
            self.proc.stdin.write("".join(f"{p} {s}\n" for p, s in sorted(new)))
            self.proc.stdin.flush()
            self._sent |= new
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ main
#: Settings that do not apply to the Ray runner: {setting: why}.
NOT_HERE = {
    "resume": "its output directory is published whole at the end, and no committed parts are kept to resume "
              "from; run it again",
    "limit": "it plans its splits over whole files; score a shorter file, or use mlm-score",
    "chunk_rows": "an actor reads batch_rows rows at a time (--batch-rows)",
    "score_cache": "the score cache is a SQLite database on one machine, and the actors may run on several",
}


def score_dataset(inputs: list[str] | str, output_dir: str | os.PathLike, settings=None, *,
                  num_actors: int | None = None, num_cpus_per_actor: float | None = None,
                  num_gpus_per_actor: float = 0, batch_rows: int = 512, batches_per_split: int | None = None,
                  ray_address: str | None = None, ray_init_options: dict[str, Any] | None = None,
                  overwrite: bool = True, wait_for_actors_s: float = 600,
                  log: Callable[[str], None] | None = None, **options: Any) -> dict:
    """Score TSV and/or Parquet files with a Ray actor pool; write ``output_dir/{words,sentences}``.

    ``settings`` and keyword ``options`` are ``score_file``'s (a ``ScoreSettings``, or the same by name);
    those that cannot apply here (``NOT_HERE``: resume, limit, chunk_rows, score_cache) are refused with
    the reason. The pool comes from the cluster's resources unless given (``plan_actors``): ``num_actors``
    actors, each loading the model once and reserving ``num_cpus_per_actor`` CPUs and ``num_gpus_per_actor``
    GPUs; the actors that fit must start within ``wait_for_actors_s``. An actor scores ``batch_rows`` rows
    at a time and writes them as one part file per output. Connects to Ray at ``ray_address`` (or starts a
    local Ray, quiet unless debug logging is on) unless Ray is already initialized. The ``progress``
    setting: None (a bar on a terminal, log lines elsewhere), True or False (the default).

    Raises InputError (with file:line) for a bad row under ``on_bad_row="fail"``, UsageError for bad
    arguments; on any error ``output_dir`` is left as it was. Returns the summary dict also written to
    ``summary.json``. Percentile flag rules (``pseudo_perplexity=p99``) take the percentile from
    ``baseline`` when given, else from this run: a second pass over the written sentence files before
    the output is published.
    """
    from .engines.base import numerics
    from .settings import refuse, settings_from

    t0 = time.perf_counter()
    s = settings_from(settings, options, door="score_dataset")
    refuse(s, NOT_HERE, "the ray runner")
    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    if not inputs:
        raise UsageError("no input files given")
    for name, v in (("num_actors", num_actors), ("batch_rows", batch_rows), ("batches_per_split", batches_per_split)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be positive, got {v}")
    for p in inputs:
        if p == "-":
            raise UsageError("the ray runner reads files, not stdin")
        if not Path(p).is_file():
            raise UsageError(f"input file {p!r} does not exist" if not Path(p).exists() else
                             f"input {p!r} is not a file")
    out = Path(output_dir)
    check_replaceable(out, overwrite=overwrite)  # before anything is touched
    check_inputs_kept(inputs, out)
    if not out.parent.is_dir():
        raise UsageError(f"the parent of the output directory, {str(out.parent)!r}, does not exist")
    flag_rules = s.rules
    lay = _check_layouts(inputs, [_layout(p, s.text_column, s.id_column, s.header) for p in inputs])

    # the engine and the model are resolved once here (a server asked what it speaks, a checkpoint exported
    # into the cache) so the actors only open them
    from .pipeline import resolve_run

    md, engine, opts = resolve_run(s, log=log)
    opts.pop("server", None)
    resolved = s.replace(model=str(md.path), model_version=None, engine=engine, engine_options=opts, protocol=None)
    if s.baseline is not None and any(r.relative for r in flag_rules):
        from .quality import baseline_rules

        flag_rules = baseline_rules(flag_rules, s.baseline, model_checksum=md.checksum, mode=s.mode)
    run_id = uuid.uuid4().hex
    meta = {"model": str(md.path), "model_checksum": md.checksum, "mode": s.mode, "engine": engine,
            "numerics": numerics(engine, opts, md),
            "input": inputs[0] if len(inputs) == 1 else ", ".join(inputs), "inputs": inputs,
            "flag_rules": [str(r) for r in flag_rules], "runner": "ray", "run_id": run_id,
            **({"baseline": s.baseline} if s.baseline else {}), "settings": s.scoring()}
    summary: dict[str, Any] = {
        "inputs": inputs, "output": str(out), "words_output": str(out / "words"),
        "sentences_output": str(out / "sentences"), "engine": engine, "mode": s.mode, "model": str(md.path),
        "model_checksum": md.checksum, "rows": 0, "scored": 0, "skipped": 0, "flagged": 0, "words": 0,
        "copies": 0, "mean_pll": None, "skipped_rows": [], "runner": "ray", "run_id": run_id,
        "flag_rules": meta["flag_rules"], "actors": 0, "nodes": 0, "num_actors": 0, "cpus_per_actor": None,
        "gpus_per_actor": num_gpus_per_actor, "threads_per_actor": None, "batch_rows": batch_rows,
        "max_actor_rss_bytes": 0, "settings": s.scoring()}
    header, top_k = s.header, s.top_k

    with _Workspace(out, run_id) as ws:  # the output's lock, and what a killed run left removed
        if ws.debris and log:
            log(f"removed what a killed earlier run on {out} left behind ({ws.debris})")
        tmp = ws.stage
        scan = _scan(inputs, header=header, batch_rows=batch_rows)
        total = sum(u[2] for _, _, _, runs, _ in scan for run in runs for u in run)
        if total:  # an empty input starts no Ray, no actor and no engine
            _run_ray(
                scan, total, summary, inputs=inputs, header=header, batch_rows=batch_rows,
                batches_per_split=batches_per_split, status_dir=ws.actors, actor_kw=dict(
                    settings=resolved.to_dict(), layout=lay, flag_rules=flag_rules, out_dir=str(tmp),
                    status_dir=str(ws.actors), meta=meta),
                num_actors=num_actors, num_cpus_per_actor=num_cpus_per_actor,
                num_gpus_per_actor=num_gpus_per_actor, ray_address=ray_address,
                ray_init_options=ray_init_options, wait_for_actors_s=wait_for_actors_s, progress=s.progress)
        schemas = _out_schemas(lay, top_k, bool(flag_rules), meta)
        for sub in ("sentences", "words"):  # no rows: no part file; write an empty one so readers get the schema
            if not any((tmp / sub).glob("part-*.parquet")):
                _write_part(tmp / sub / "part-00000-000000000000.parquet",
                            {f.name: [] for f in schemas[sub]}, schemas[sub])
            for stray in (tmp / sub).glob(".*"):  # a killed attempt's temporary file
                if _is_part(stray.name):
                    safe_unlink(stray)
        parts = sorted((tmp / "sentences").glob("part-*.parquet"))
        from .quality import RunQuantiles  # percentiles of the run itself: a second pass over its sentences

        second = RunQuantiles.fit(flag_rules, parts)
        if second is not None:
            second.rewrite(parts, {"flag_rules": second.rule_strings})
            summary["flagged"], summary["flag_rules"] = second.flagged, second.rule_strings
        summary["seconds"] = time.perf_counter() - t0
        atomic_write_bytes(tmp / "summary.json", (json.dumps(summary, indent=2) + "\n").encode(), what="the summary")
        marker = {"written_by": WRITTEN_BY, "format": 1, "run_id": run_id, "output": str(out.absolute()),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model_checksum": md.checksum,
                  "inputs": [ident for *_, ident in scan], "settings": s.scoring()}
        atomic_write_bytes(tmp / OUTPUT_MARKER, (json.dumps(marker, indent=2) + "\n").encode(), what="the marker")
        ws.publish(overwrite=overwrite)
    return summary


@contextlib.contextmanager
def _keep_sigterm_handler():
    """``ray.init`` replaces the process's SIGTERM handler with ``sys.exit(15)``: the CLI's (SIGTERM stops
    the run as Ctrl-C does, exit 143 with a message) or an Airflow task runner's would be lost. A Python
    handler set before is put back; the default disposition is left to Ray."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before) and signal.getsignal(signal.SIGTERM) is not before:
            signal.signal(signal.SIGTERM, before)


_reaper: _Reaper | None = None  # held for the life of the process: its pipe closing is the driver's death


class _StartReport:
    """While the actors start (Ray starts their processes, each loads the model: minutes for a large model
    on a busy node), a line every ``every`` seconds says what they are doing, from the status each actor
    writes (``_set_status``); stops at the first scored batch."""

    def __init__(self, status_dir: Path, planned: int, *, first: float = 5.0, every: float = 10.0):
        import threading

        self.status_dir, self.planned, self.first, self.every = Path(status_dir), planned, first, every
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mlm-ray-start", daemon=True)
        self._thread.start()

    def describe(self) -> tuple[str, bool]:
        """The report line now, and whether every planned actor is ready."""
        now = time.time()
        phases: dict[str, list[float]] = {}
        for f in self.status_dir.glob("*.json"):
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
                phases.setdefault(str(doc["phase"]), []).append(now - float(doc["since"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        ready = len(phases.pop("ready", []))
        parts = [f"{len(ages)} {phase} ({max(ages):.0f} s)" for phase, ages in sorted(phases.items())]
        waiting = self.planned - ready - sum(len(a) for a in phases.values())
        if waiting > 0:
            parts.append(f"{waiting} waiting for Ray to start {'its' if waiting == 1 else 'their'} process")
        line = f"actors: {ready} of {self.planned} ready after {time.monotonic() - self._t0:.0f} s"
        return line + (": " + ", ".join(parts) if parts else ""), ready >= self.planned

    def _run(self) -> None:
        wait = self.first
        while not self._stop.wait(wait):
            if _reaper is not None:
                _reaper.watch_descendants()  # the agents and workers Ray started meanwhile
            line, all_ready = self.describe()
            log.info(line)
            if all_ready:
                return
            wait = self.every

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            if _reaper is not None:
                _reaper.watch_descendants()  # everything Ray started for this run is up by the first batch


def _run_ray(scan: list[tuple], total: int, summary: dict, *, inputs, header, batch_rows, batches_per_split,
             status_dir: Path, actor_kw: dict, num_actors, num_cpus_per_actor, num_gpus_per_actor, ray_address,
             ray_init_options, wait_for_actors_s, progress) -> None:
    global _reaper
    import ray

    if not ray.is_initialized():
        quiet = not verbose()
        if quiet:
            logging.getLogger("ray").setLevel(logging.ERROR)  # its notes at start-up (token file, dashboard, ...)
        opts = {"include_dashboard": False, "log_to_driver": not quiet,
                "logging_level": logging.ERROR if quiet else logging.INFO, **(ray_init_options or {})}
        local = ray_address is None and not os.environ.get("RAY_ADDRESS")
        with _keep_sigterm_handler():
            ray.init(address=ray_address, **opts)
        if local and _reaper is None:  # a Ray of our own: its processes must not outlive a killed driver
            _reaper = _Reaper()
    if _reaper is not None:
        _reaper.watch_descendants()
    import ray.data

    deadline = time.monotonic() + 5  # the actors of a run that just ended free their CPUs within a second or two
    while True:
        total_res, free_res = _alive_nodes(ray)
        plan = plan_actors(total_res, num_actors=num_actors, cpus_per_actor=num_cpus_per_actor,
                           gpus_per_actor=num_gpus_per_actor, available=free_res)
        if plan.min_actors >= plan.num_actors or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if plan.min_actors < plan.num_actors:
        log.warning(f"{plan.num_actors} actors of {plan.cpus:g} CPU(s) planned, {plan.min_actors} fit in the "
                    f"cluster's free resources now: starting with {plan.min_actors}, adding the others as "
                    f"resources free up or nodes join")
    if sum(len(run) for _, _, _, runs, _ in scan for run in runs) < min(plan.num_actors, total):
        # a small input: batches small enough that every actor gets one
        batch_rows = math.ceil(total / plan.num_actors)
        scan = _scan(inputs, header=header, batch_rows=batch_rows)
    splits = _splits(scan, header=header, batches_per_split=batches_per_split, num_actors=plan.num_actors,
                     batch_rows=batch_rows)
    summary.update(num_actors=plan.num_actors, cpus_per_actor=plan.cpus, gpus_per_actor=plan.gpus,
                   threads_per_actor=plan.threads)
    log.info(f"scoring {total:,} rows in {len(splits)} splits with {plan.num_actors} actor(s) of {plan.cpus:g} "
             f"CPU(s)" + (f" and {plan.gpus:g} GPU(s)" if plan.gpus else "") + f", {plan.threads} thread(s) each")

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.raise_original_map_exception,
             ctx.wait_for_min_actors_s)
    ctx.execution_options.preserve_order = False  # the part files' names carry the order
    ctx.enable_progress_bars = False  # ours counts rows, not blocks
    ctx.raise_original_map_exception = True  # an actor's InputError comes back as itself, not as a UDF failure
    # start scoring once the actors that fit hold their model; a cluster that cannot place one fails
    # with a timeout instead of waiting forever
    ctx.wait_for_min_actors_s = int(wait_for_actors_s)
    console = [h for h in logging.getLogger("ray.data").handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in console]
    if not verbose():
        # "Starting execution of Dataset ...", and a failed task's traceback logged before the exception we
        # report anyway (Ray Data's log file keeps them all)
        for h in console:
            h.setLevel(logging.CRITICAL + 1)
    from .pipeline import ScoreSummary
    from .progress import Progress

    mode = Progress.auto_mode(progress) if log.isEnabledFor(logging.INFO) else "off"
    actors, nodes, skipped, seen, pll_sum = set(), set(), [], set(), 0.0
    with contextlib.ExitStack() as stack:
        real_stderr = None
        if not verbose():  # Ray's C++ core and Ray Data's warnings, in this process
            real_stderr = stack.enter_context(filtered_stderr(is_ray_chatter))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
        bar = Progress(total, mode=mode, stream=real_stderr)
        stack.callback(bar.close, done=False)
        ds = ray.data.from_items(splits, override_num_blocks=len(splits)).map_batches(
            _ScoreActor, fn_constructor_kwargs={**actor_kw, "threads": plan.threads if not plan.gpus else None,
                                                "log_level": log.getEffectiveLevel()},
            batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.num_actors),
            num_cpus=plan.cpus, num_gpus=plan.gpus or None)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        # closed on any exit: an exception's traceback would otherwise keep the iterator, its execution
        # and its actors alive (holding their CPUs) for as long as the caller keeps the exception
        stack.callback(getattr(batches, "close", lambda: None))
        starting = _StartReport(status_dir, plan.num_actors)
        stack.callback(starting.stop)
        failure: MlmScorerError | None = None
        try:
            for t in batches:
                starting.stop()
                for r in t.to_pylist():
                    if (r["file"], r["row"]) in seen:  # a batch redone after a lost actor: count it once
                        continue
                    seen.add((r["file"], r["row"]))
                    for k in ("rows", "scored", "words", "copies", "flagged"):
                        summary[k] += r[k]
                    pll_sum += r["pll_sum"]
                    summary["max_actor_rss_bytes"] = max(summary["max_actor_rss_bytes"], r["max_rss"])
                    actors.add(r["actor"])
                    nodes.add(r["node"])
                    skipped = sorted(skipped + [((r["file"], s["line"]), s) for s in json.loads(r["skipped_rows"])],
                                     key=lambda x: x[0])[:ScoreSummary.MAX_LISTED]
                    bar.add(r["rows"], r["copies"])
            bar.close()
        except ray.exceptions.GetTimeoutError:
            failure = UsageError(f"the Ray cluster did not start {plan.min_actors} actor(s) of {plan.cpus:g} "
                                 f"CPU(s)" + (f" and {plan.gpus:g} GPU(s)" if plan.gpus else "")
                                 + f" within {wait_for_actors_s:g} s: lower --num-actors / --cpus-per-actor, or "
                                 f"add nodes")
        except Exception as exc:  # Ray wraps the actor's exception: hand back ours (file:line message)
            failure = _find_own_error(exc)
            if failure is None:
                raise
        finally:
            (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.raise_original_map_exception,
             ctx.wait_for_min_actors_s) = saved
            for h, lvl in zip(console, levels):
                h.setLevel(lvl)
    if failure is not None:
        # The failed execution's actors are released when its objects are collected, and they sit in
        # reference cycles: collect them now, or the actors keep their CPUs until some later collection
        # (a second run in the same process would wait for them). Raised afresh, outside the except block.
        del ds, batches
        failure.__cause__ = failure.__context__ = failure.__traceback__ = None
        import gc

        gc.collect()
        raise failure
    if summary["rows"] != total:  # every batch came back, or the output is not complete
        raise MlmScorerError(f"internal error: {summary['rows']} of {total} rows came back from the actors")
    summary["skipped"] = summary["rows"] - summary["scored"]
    summary["mean_pll"] = pll_sum / summary["scored"] if summary["scored"] else None
    summary["skipped_rows"] = [s for _, s in skipped]
    summary["actors"], summary["nodes"] = len(actors), len(nodes)


def _rebuild_error(cls, args, state):
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class _Shipped(Exception):
    """Carries one of our errors out of an actor whole: it unpickles as the original class with all its
    attributes (InputError's path, line, column; plain pickling would keep only the message)."""

    def __init__(self, exc: MlmScorerError):
        super().__init__(str(exc))
        self.exc = exc

    def __reduce__(self):
        return _rebuild_error, (type(self.exc), self.exc.args, dict(self.exc.__dict__))


def _find_own_error(exc: BaseException) -> MlmScorerError | None:
    """Our error inside a Ray exception chain (RayTaskError / UserCodeException wrap it), as a plain one."""
    seen, stack, found = set(), [exc], None
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MlmScorerError):
            if type(e).__module__.startswith("mlm_scorer"):
                return e  # the original object, unpickled from the actor
            found = found or e  # Ray's RayTaskError(InputError) hybrid: rebuild it below
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    if isinstance(found, InputError):
        return InputError(found.detail, path=found.path, line=found.line, column=found.column, reason=found.reason)
    return found
