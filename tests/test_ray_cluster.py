"""Ray Data runner on a local two-node Ray cluster (``ray.cluster_utils.Cluster``: two raylets of 1 CPU
each on this machine), with the defaults: one actor per node, output equal to ``score_file`` row by row."""
from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'mlm-scorer[ray]')")
pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install 'mlm-scorer[ray]')")

from test_ray import _compare, _inputs, _rows  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_node_cluster_with_defaults_equals_score_file(two_nodes, tiny_export, tmp_path):
    from mlm_scorer.ray_data import score_dataset

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    sample, extra, pq_in, cases = _inputs(tmp_path)
    kw = dict(model=str(tiny_export), id_column="id", on_bad_row="skip")
    out = tmp_path / "out"
    summary = score_dataset([str(sample), str(extra), str(pq_in)], out, batch_rows=4, **kw)
    # the pool from the cluster: one actor of 1 CPU on each node (a node's share), both used
    assert (summary["num_actors"], summary["cpus_per_actor"], summary["nodes"], summary["actors"]) == (2, 1.0, 2, 2)
    words, _ = _rows(out, "words")
    sents, _ = _rows(out, "sentences")
    # float32 SavedModel: batches composed differently move the last bits (see test_ray.py)
    diffs = _compare(sents, words, cases, tmp_path, kw, rel=1e-6)
    print(f"two nodes vs score_file: {len(diffs)} floats, max relative difference {max(diffs):.2e}")
    assert (summary["rows"], summary["scored"], summary["skipped"]) == (39, 36, 3)
    assert json.loads((out / "summary.json").read_text()) == summary
