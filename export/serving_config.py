"""TF Serving configuration files written next to an export: batching parameters and a model config.

``write_serving_files(version_dir)`` writes

* ``<version_dir>/batching_parameters.txt`` — a ``BatchingParameters`` text proto for
  ``tensorflow_model_server --enable_batching --batching_parameters_file=...``;
* ``<base_dir>/models.config`` — a ``ModelServerConfig`` text proto for ``--model_config_file=...``
  (name, base_path, platform, version policy), an example to adapt to the server's paths.

Why these values, for this workload (the client already sends full batches of copies of similar length,
several requests in flight):

* ``max_batch_size`` equals the client's request size (engine option ``max_batch_size``), so one request
  is never split and two full requests are never merged; only small tail requests are merged.
* Requests differ in sequence length T and prediction slots P, so merged requests must be padded:
  ``pad_variable_length_inputs: true``. TF Serving pads each tensor with its *first element*
  (tensorflow_serving/batching/batching_util.cc: ``pad_value = input.flat<T>()(0)``), which for
  ``input_mask`` would be 1 and would change the results. The client's ``padding_row=true`` option makes
  row 0 of every request all zeros, so the server pads with 0 — the model's padding convention — and the
  client drops the extra row and slots. ``padding_row`` is on by default in the REST/gRPC engines;
  **never turn it off against a server using this file.**
* ``batch_timeout_micros`` is short (default 2 ms): requests are already large; waiting only helps merge
  tails. ``num_batch_threads`` ~ the number of batches the device runs at once (1–2 on one GPU; the number
  of cores / intra-op threads on CPU). ``max_enqueued_batches`` bounds the queue: a full queue answers
  UNAVAILABLE, which the client retries with backoff.
* ``allowed_batch_sizes`` (optional) pads the batch dimension up to fixed sizes, e.g. for XLA/TensorRT
  compiled shapes; the last entry must equal ``max_batch_size``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

BATCHING_FILE = "batching_parameters.txt"
MODELS_CONFIG_FILE = "models.config"


def batching_parameters_text(*, max_batch_size: int = 64, batch_timeout_micros: int = 2000,
                             num_batch_threads: int = 2, max_enqueued_batches: int = 64,
                             pad_variable_length_inputs: bool = True,
                             allowed_batch_sizes: Sequence[int] = ()) -> str:
    """The BatchingParameters text proto (session_bundle_config.proto; Int64Value fields use ``{ value: }``)."""
    if max_batch_size < 1 or num_batch_threads < 1 or max_enqueued_batches < 1 or batch_timeout_micros < 0:
        raise ValueError("batching sizes and thread counts must be positive, the timeout >= 0")
    sizes = [int(s) for s in allowed_batch_sizes]
    if sizes:
        if sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"allowed_batch_sizes must be strictly increasing positive numbers, got {sizes}")
        if sizes[-1] != max_batch_size:
            raise ValueError(f"the last allowed_batch_sizes entry ({sizes[-1]}) must equal max_batch_size "
                             f"({max_batch_size}), as TF Serving requires")
    lines = [
        "# TF Serving batching for the mlm-scorer BERT export (see export/serving_config.py for the reasoning).",
        "# Use the REST/gRPC engines with padding_row=true and max_batch_size equal to the value below.",
        f"max_batch_size {{ value: {int(max_batch_size)} }}",
        f"batch_timeout_micros {{ value: {int(batch_timeout_micros)} }}",
        f"max_enqueued_batches {{ value: {int(max_enqueued_batches)} }}",
        f"num_batch_threads {{ value: {int(num_batch_threads)} }}",
        f"pad_variable_length_inputs: {'true' if pad_variable_length_inputs else 'false'}",
    ]
    lines += [f"allowed_batch_sizes: {s}" for s in sizes]
    return "\n".join(lines) + "\n"


def models_config_text(*, model_name: str = "bert", base_path: str = "/models/bert",
                       versions: Sequence[int] = ()) -> str:
    """A ModelServerConfig text proto serving ``model_name`` from ``base_path``.

    ``versions`` empty: the latest version (TF Serving's default policy); otherwise exactly those versions
    (e.g. the current and the previous during a rollout), with the label ``stable`` on the highest.
    """
    if versions:
        vs = sorted({int(v) for v in versions})
        policy = "model_version_policy { specific { " + " ".join(f"versions: {v}" for v in vs) + " } }"
        labels = f'\n    version_labels {{ key: "stable" value: {vs[-1]} }}'
    else:
        policy, labels = "model_version_policy { latest { num_versions: 1 } }", ""
    return (f"model_config_list {{\n  config {{\n    name: \"{model_name}\"\n    base_path: \"{base_path}\"\n"
            f"    model_platform: \"tensorflow\"\n    {policy}{labels}\n  }}\n}}\n")


def write_serving_files(version_dir: str | Path, *, max_batch_size: int = 64, batch_timeout_micros: int = 2000,
                        num_batch_threads: int = 2, max_enqueued_batches: int = 64,
                        pad_variable_length_inputs: bool = True, allowed_batch_sizes: Sequence[int] = (),
                        model_name: str = "bert", server_base_path: str | None = None) -> tuple[Path, Path]:
    """Write ``batching_parameters.txt`` into ``version_dir`` and ``models.config`` into its parent.

    ``server_base_path``: the base directory as the server sees it (default ``/models/<model_name>``, the
    Docker image's convention). Returns the two paths.
    """
    from mlm_scorer.fsutil import atomic_write_bytes

    vdir = Path(version_dir)
    batching = vdir / BATCHING_FILE
    atomic_write_bytes(batching, batching_parameters_text(
        max_batch_size=max_batch_size, batch_timeout_micros=batch_timeout_micros,
        num_batch_threads=num_batch_threads, max_enqueued_batches=max_enqueued_batches,
        pad_variable_length_inputs=pad_variable_length_inputs, allowed_batch_sizes=allowed_batch_sizes).encode(),
        what="the batching parameters file")
    config = vdir.parent / MODELS_CONFIG_FILE
    versions = [int(vdir.name)] if vdir.name.isdigit() else []
    atomic_write_bytes(config, models_config_text(
        model_name=model_name, base_path=server_base_path or f"/models/{model_name}", versions=versions).encode(),
        what="the TF Serving model config")
    return batching, config
