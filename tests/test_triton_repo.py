"""The Triton model repository written from an export (mlm_export.triton_repo): its layout, every
config.pbtxt parsed with Triton's own model_config.proto (tritonclient), and a real tritonserver reading
the repository. Triton's onnxruntime / tensorrt / tensorflow backends are not installed here, so the server
gets as far as loading the backend: it has read, parsed and checked each configuration by then (a wrong
field, or a batching setting it refuses, stops it earlier, which the negative control shows)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from triton_fixtures import TritonProcess, export_with_onnx, free_ports, run_in_triton_venv, triton_python

from mlm_export.triton_repo import RepositoryError, config_text, main, write_triton_repo
from mlm_scorer.errors import ModelError
from mlm_scorer.model_dir import ModelDir

INPUTS = ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids"]


@pytest.fixture(scope="module")
def onnx_export(tiny_hf, tiny_export, tmp_path_factory) -> Path:
    return export_with_onnx(tiny_hf, tmp_path_factory.mktemp("trepo") / "bert", copy_of=tiny_export)


@pytest.fixture(scope="module")
def fake_plan(onnx_export, tmp_path_factory) -> Path:
    """Bytes standing for a TensorRT plan (no TensorRT here) with the manifest to_tensorrt writes beside it."""
    md = ModelDir.open(onnx_export)
    plan = tmp_path_factory.mktemp("plan") / "model.plan"
    plan.write_bytes(os.urandom(256))
    (plan.parent / "model.plan.json").write_text(json.dumps({
        "format": "mlm-scorer-tensorrt-plan", "model_checksum": md.checksum, "top_k": md.top_k,
        "profiles": [{"batch": [1, 16, 32], "seq": [1, 32, 64], "predictions": [1, 8, 64]},
                     {"batch": [1, 8, 24], "seq": [1, 16, 32], "predictions": [1, 8, 32]}]}))
    return plan


@pytest.fixture(scope="module")
def repo(onnx_export, fake_plan, tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("repo")
    write_triton_repo(onnx_export, r, name="bert_onnx", log=lambda m: None)
    write_triton_repo(onnx_export, r, name="bert_tf", backend="tensorflow", max_batch_size=32, log=lambda m: None)
    write_triton_repo(onnx_export, r, name="bert_trt", backend="tensorrt", plan=fake_plan, instance_kind="gpu",
                      log=lambda m: None)
    return r


def test_layout(repo, onnx_export):
    md = ModelDir.open(onnx_export)
    for name, model_file in (("bert_onnx", "model.onnx"), ("bert_tf", "model.savedmodel"), ("bert_trt", "model.plan")):
        assert (repo / name / "config.pbtxt").is_file()
        vdir = repo / name / "1"
        assert (vdir / model_file).exists()
        # REPO/NAME is itself an export a client can point --model at: same manifest, same tokenizer
        served = ModelDir.open(repo / name)
        assert served.checksum == md.checksum and served.path == vdir
    assert (repo / "bert_tf" / "1" / "model.savedmodel" / "saved_model.pb").is_file()
    assert (repo / "bert_tf" / "1" / "model.savedmodel" / "variables" / "variables.index").is_file()
    assert (repo / "bert_onnx" / "1" / "model.onnx").read_bytes() == (md.path / "model.onnx").read_bytes()
    assert not list(repo.glob("*/.*tmp*")), "temporary files left behind"


_PARSE = r"""
import json, sys
from pathlib import Path
from google.protobuf import text_format, json_format
from tritonclient.grpc import model_config_pb2
out = {}
for p in sorted(Path(sys.argv[1]).glob("*/config.pbtxt")):
    cfg = text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
    out[p.parent.name] = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
print(json.dumps(out))
"""


def test_every_config_parses_with_tritons_own_protos(repo, onnx_export):
    """text_format.Parse with tritonclient's model_config_pb2 refuses any field or enum value that Triton's
    ModelConfig does not have; then the parsed values are the export's signature and the settings asked for."""
    md = ModelDir.open(onnx_export)
    cfgs = json.loads(run_in_triton_venv(triton_python(), _PARSE, str(repo)))
    assert set(cfgs) == {"bert_onnx", "bert_tf", "bert_trt"}
    expect = {"bert_onnx": ("onnxruntime_onnx", "onnxruntime", "model.onnx", 64, md.top_k),
              "bert_tf": ("tensorflow_savedmodel", "tensorflow", "model.savedmodel", 32, -1),
              "bert_trt": ("tensorrt_plan", "tensorrt", "model.plan", 24, md.top_k)}  # 24: the plan's profiles allow
    for name, (platform, backend, filename, mbs, k) in expect.items():
        c = cfgs[name]
        assert (c["name"], c["platform"], c["backend"], c["default_model_filename"]) == (name, platform, backend,
                                                                                        filename)
        assert c["max_batch_size"] == mbs
        assert [(i["name"], i["data_type"], i["dims"]) for i in c["input"]] == [(n, "TYPE_INT32", ["-1"])
                                                                               for n in INPUTS]
        assert [(o["name"], o["data_type"], o["dims"]) for o in c["output"]] == [
            ("masked_lm_log_probs", "TYPE_FP32", ["-1"]), ("top_k_ids", "TYPE_INT32", ["-1", str(k)]),
            ("top_k_log_probs", "TYPE_FP32", ["-1", str(k)])]
        assert c["dynamic_batching"] == {"max_queue_delay_microseconds": "2000"}
        params = {key: v["string_value"] for key, v in c["parameters"].items()}
        assert params == {"mlm_scorer.model_checksum": md.checksum,
                          "mlm_scorer.vocab_sha256": md.manifest["vocab_sha256"],
                          "mlm_scorer.vocab_size": str(md.manifest["vocab_size"]), "mlm_scorer.top_k": str(md.top_k)}
    assert cfgs["bert_trt"]["instance_group"] == [{"kind": "KIND_GPU"}]
    assert "instance_group" not in cfgs["bert_onnx"]


def _tritonserver(python: Path) -> Path:
    out = run_in_triton_venv(python, "import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / "
                                     "'tritonserver')")
    return Path(out.strip())


@pytest.fixture(scope="module")
def repo_server(repo, tmp_path_factory):
    """The real tritonserver (the binary PyTriton ships) on the repository, plus a broken copy of one model
    as a negative control: a preferred batch size above max_batch_size, which Triton refuses."""
    python = triton_python()
    root = _tritonserver(python)
    broken = repo / "broken"
    shutil.copytree(repo / "bert_onnx", broken)
    text = (broken / "config.pbtxt").read_text().replace('name: "bert_onnx"', 'name: "broken"')
    (broken / "config.pbtxt").write_text(text.replace("dynamic_batching {", "dynamic_batching {\n  preferred_batch_size: [ 128 ]"))
    libdir = run_in_triton_venv(python, "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))").strip()
    log_dir = tmp_path_factory.mktemp("repo_server")

    def argv(h, g, n):
        return [str(root / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={root / 'backends'}",
                f"--http-port={h}", f"--grpc-port={g}", "--allow-metrics=false", "--exit-on-error=false",
                "--strict-readiness=false", "--log-verbose=0"]

    env_before = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{env_before}" if env_before else libdir
    srv = TritonProcess(argv, log_dir, name="tritonserver-repo")
    try:
        _start_plain(srv)
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(broken, ignore_errors=True)
        if env_before is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = env_before


def _start_plain(srv: TritonProcess, timeout: float = 120) -> None:
    """Start a bare tritonserver (no READY line of ours): ready when /v2/health/live answers."""
    for _ in range(3):
        srv.http_port, srv.grpc_port = free_ports(2)
        srv.starts += 1
        srv.log_path = srv.log_dir / f"{srv.name}-{srv.starts}.log"
        with open(srv.log_path, "wb") as log:
            srv.proc = subprocess.Popen(srv.argv(srv.http_port, srv.grpc_port, srv.starts), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and srv.proc.poll() is None:
            try:
                if requests.get(f"{srv.http_url}/v2/health/live", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        srv.kill()
    raise RuntimeError(f"tritonserver did not start; log {srv.log_path}:\n{srv.log_path.read_text()[-3000:]}")


def test_real_tritonserver_reads_every_config(repo_server):
    """Each generated model reaches the backend-loading step (state UNAVAILABLE: the backend library is not
    installed here); the broken control never gets a version or a state: Triton refused its configuration."""
    index = requests.post(f"{repo_server.http_url}/v2/repository/index", json={}, timeout=10).json()
    by_name = {m["name"]: m for m in index}
    for name, backend in (("bert_onnx", "onnxruntime"), ("bert_tf", "tensorflow"), ("bert_trt", "tensorrt")):
        m = by_name[name]
        assert m.get("version") == "1" and m.get("state") == "UNAVAILABLE", m
        assert f"unable to find backend library for backend '{backend}'" in m.get("reason", ""), m
    assert "state" not in by_name["broken"], by_name["broken"]
    log = repo_server.log_path.read_text(errors="replace")
    assert "dynamic batching preferred size must be <= max batch size for broken" in log


@pytest.mark.parametrize("kind", ["kserve_http", "kserve_grpc"])
def test_a_model_that_failed_to_load_is_refused_with_the_servers_reason(kind, repo_server, onnx_export):
    """A loaded-but-not-ready model: the client reads its state and reason from the repository index and
    stops at once (no point waiting out the retry budget for a model that failed to load)."""
    from mlm_scorer.engines.base import get_engine

    md = ModelDir.open(onnx_export)
    url = repo_server.http_url if kind == "kserve_http" else repo_server.grpc_url
    t = time.monotonic()
    with pytest.raises(ModelError, match=r"model 'bert_onnx' version 1 is not ready \(state UNAVAILABLE: .*unable "
                                         r"to find backend library for backend 'onnxruntime'.*will not become ready"):
        get_engine(kind, model=md, server=url, model_name="bert_onnx", retry_budget=30)
    assert time.monotonic() - t < 10


# ------------------------------------------------------------------------------------------ refusals

def test_checks_before_writing(onnx_export, fake_plan, tmp_path):
    no_onnx = tmp_path / "no_onnx"
    shutil.copytree(onnx_export, no_onnx)
    (ModelDir.open(no_onnx).path / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match=r"model.onnx is missing: export with mlm-export --onnx"):
        write_triton_repo(no_onnx, tmp_path / "r", log=lambda m: None)
    with pytest.raises(RepositoryError, match="model.plan is missing: build a plan"):
        write_triton_repo(onnx_export, tmp_path / "r", backend="tensorrt", log=lambda m: None)
    tampered = tmp_path / "tampered"
    shutil.copytree(onnx_export, tampered)
    vdir = ModelDir.open(tampered).path
    (vdir / "model.onnx").write_bytes((vdir / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(RepositoryError, match="does not match the sha256 its manifest records"):
        write_triton_repo(tampered, tmp_path / "r", log=lambda m: None)
    other_plan = tmp_path / "other.plan"
    other_plan.write_bytes(b"plan")
    (tmp_path / "other.plan.json").write_text(json.dumps({"model_checksum": "0" * 64, "profiles": []}))
    with pytest.raises(RepositoryError, match="was built from another export"):
        write_triton_repo(onnx_export, tmp_path / "r", backend="tensorrt", plan=other_plan, log=lambda m: None)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("config.pbtxt"))
    write_triton_repo(onnx_export, tmp_path / "r", name="m", log=lambda m: None)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_triton_repo(onnx_export, tmp_path / "r", name="m", log=lambda m: None)
    write_triton_repo(onnx_export, tmp_path / "r", name="m", overwrite=True, max_batch_size=8, log=lambda m: None)
    assert "max_batch_size: 8" in (tmp_path / "r" / "m" / "config.pbtxt").read_text()


@pytest.mark.parametrize("kw,message", [
    ({"backend": "pytorch"}, "backend must be one of"),
    ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
    ({"preferred_batch_sizes": (128,)}, r"preferred batch sizes \[128\] must lie in \[1, max_batch_size=64\]"),
    ({"backend": "tensorrt", "instance_kind": "cpu"}, "runs on a GPU only"),
    ({"name": "a/b"}, "not a valid directory name"),
])
def test_config_refuses_what_triton_would(onnx_export, kw, message):
    md = ModelDir.open(onnx_export)
    kw = {"name": "bert", "backend": "onnxruntime", **kw}
    with pytest.raises(RepositoryError, match=message):
        config_text(md.manifest, **kw)


def test_command_line(onnx_export, tmp_path, capsys):
    assert main([str(onnx_export), str(tmp_path / "r"), "--name", "bert", "--max-batch-size", "16", "--copy"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "bert")
    assert not os.path.samefile(tmp_path / "r" / "bert" / "1" / "model.onnx", ModelDir.open(onnx_export).path / "model.onnx")
    assert main([str(onnx_export), str(tmp_path / "r"), "--name", "bert"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
