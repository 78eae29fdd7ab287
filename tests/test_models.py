"""``--model`` resolution: a missing local directory is said so without the Hub, nothing is printed or left
in the cache before the source is found, implicit exports build what the run's engine needs (once, under
a lock), and --top-k above the export's k is refused before any engine (or TensorFlow) loads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from tiny_models import make_hf_bert

from mlm_scorer.cli import main
from mlm_scorer.errors import ModelError
from mlm_scorer.models import _cache_lock, resolve_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def no_hub(monkeypatch):
    """Any attempt to reach the Hugging Face Hub fails the test."""
    import mlm_export.checkpoint as ck

    def touched(*a, **k):
        raise AssertionError(f"the Hub was asked for {a}")
    monkeypatch.setattr(ck, "download_from_hub", touched)
    try:
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub, "snapshot_download", touched)
    except ImportError:
        pass


def _tsv(tmp_path: Path) -> Path:
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nThe cat sat on the mat.\nA dog ran home quickly.\n")
    return tsv


def _cache_contents(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


# ------------------------------------------------------------------------------- missing sources


@pytest.mark.parametrize("value", ["models/bret", "./my-bert", "~/bert-dir", "/no/such/bert", "my bert"])
def test_a_missing_local_directory_is_said_so_without_the_hub(value, tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "models" / "bert").mkdir(parents=True)
    cache = tmp_path / "cache"
    rc = main([str(_tsv(tmp_path)), "-o", "o.parquet", "--model", value, "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"model directory {value!r} does not exist" in err and "exporting" not in err
    if value == "models/bret":
        assert "did you mean 'models/bert'?" in err
    assert not cache.exists(), _cache_contents(cache)  # no lock, no partial directory


def test_a_hub_id_is_downloaded_before_anything_is_exported(tiny_hf, tmp_path, monkeypatch):
    """A value that is not a local path goes to the Hub; "exporting" comes only once the files are here,
    and the export records the hub id (the casing name rule reads it)."""
    import mlm_export.checkpoint as ck

    events = []
    cache = tmp_path / "cache"

    def offline(repo_id, cache_dir=None):
        events.append(("download", repo_id, _cache_contents(cache)))
        raise ck.CheckpointError(f"could not download {repo_id!r} (offline)")
    monkeypatch.setattr(ck, "download_from_hub", offline)
    with pytest.raises(ModelError, match="could not download 'some-org/some-bert'"):
        resolve_model("some-org/some-bert", cache_dir=cache, log=lambda m: events.append(m))
    assert events == ["downloading some-org/some-bert from the Hugging Face Hub (the files an export needs)",
                      ("download", "some-org/some-bert", [])]
    assert not cache.exists()

    monkeypatch.setattr(ck, "download_from_hub", lambda repo_id, cache_dir=None: tiny_hf)
    events.clear()
    md = resolve_model("some-org/tiny-bert-uncased", cache_dir=cache, log=events.append)
    assert events[0].startswith("downloading") and events[1].startswith("exporting some-org/tiny-bert-uncased")
    assert md.manifest["source"]["hub_id"] == "some-org/tiny-bert-uncased"
    assert "the name 'tiny-bert-uncased' (lower-case)" in md.manifest["casing"]["evidence"]
    assert _cache_contents(cache) and not any(p.endswith(".lock") for p in _cache_contents(cache))


def test_a_refused_checkpoint_leaves_nothing_in_the_cache(tiny_hf, tmp_path, capsys, no_hub):
    src = shutil.copytree(tiny_hf, tmp_path / "bert-base-cased")  # the name says cased, its tokenizer lower-cases
    cache = tmp_path / "cache"
    (cache / "exports").mkdir(parents=True)  # a cache in use: it stays, but gains nothing
    rc = main([str(_tsv(tmp_path)), "-o", str(tmp_path / "o.parquet"), "--model", str(src), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert "evidence about lower-casing disagrees" in err and "exporting" not in err
    assert f"mlm-export {src} bert-base-cased-export --do-lower-case (or --no-lower-case)" in err
    assert "--model bert-base-cased-export" in err
    assert _cache_contents(cache) == ["exports"]


def test_cache_lock_is_removed_and_waiters_lock_the_current_file(tmp_path):
    """The lock file goes when its holder is done (success or failure); a run that waited on the removed
    file locks the current one instead, so two runs never hold it at once."""
    target = tmp_path / "cache" / "exports" / "m-0123"
    inside, order = threading.Event(), []

    def first():
        with pytest.raises(RuntimeError):
            with _cache_lock(target):
                target.mkdir()  # a partial export
                inside.set()
                time.sleep(0.3)
                order.append("first done")
                raise RuntimeError("export failed")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with _cache_lock(target):
        order.append("second in")
        assert not target.exists()  # the failed run's partial directory is gone
        assert Path(str(target) + ".lock").is_file()
    t.join()
    assert order == ["first done", "second in"]
    assert not Path(str(target) + ".lock").exists()


# -------------------------------------------------------------------------------- implicit builds


def _run(capsys, tmp_path, model, cache, *extra) -> tuple[int, str, Path]:
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}.parquet"
    rc = main([str(_tsv(tmp_path)), "-o", str(out), "--model", str(model), "--cache-dir", str(cache), *extra])
    return rc, capsys.readouterr().err, out


def test_implicit_exports_build_what_each_engine_needs(tmp_path, capsys, monkeypatch):
    """--model CHECKPOINT with torch, onnx fp32 and onnx int8 on one cache: the first use of each builds
    what it lacks into the cached export, once; the scores agree; a larger --top-k on first use is honoured.
    Two runs start together on the fresh cache: one exports, the other waits and reuses."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    src = make_hf_bert(tmp_path / "my-bert")
    cache = tmp_path / "cache"
    cmd = [str(_tsv(tmp_path)), "--model", str(src), "--cache-dir", str(cache), "--engine", "torch",
           "--top-k", "7"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, "-m", "mlm_scorer", *cmd, "-o", str(tmp_path / f"c{i}.parquet")],
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    both = "".join(errs)
    assert both.count("exporting ") == 1 and both.count("building model.onnx into the cached export for "
                                                        "--engine torch (once)") == 1, errs
    vdirs = list(cache.glob("exports/*/1"))
    assert len(vdirs) == 1 and (vdirs[0] / "model.onnx").is_file() and not (vdirs[0] / "model.int8.onnx").exists()
    manifest = json.loads((vdirs[0] / "mlm_scorer.json").read_text())
    assert manifest["top_k"] == 7 and manifest["onnx"]["verification"]["max_abs_diff"] <= 1e-4
    torch_words = pd.read_parquet(tmp_path / "c0.parquet")

    rc, err, out = _run(capsys, tmp_path, src, cache, "--engine", "onnx")  # model.onnx is there: nothing to build
    assert rc == 0 and "exporting" not in err and "building" not in err, err
    onnx_words = pd.read_parquet(out)
    assert (torch_words["log_prob"] - onnx_words["log_prob"]).abs().max() < 1e-4

    rc, err, _ = _run(capsys, tmp_path, src, cache, "--engine", "onnx", "--precision", "int8")
    assert rc == 0 and "building model.int8.onnx into the cached export for --engine onnx (once)" in err, err
    assert "drift onnx-int8" in err and (vdirs[0] / "model.int8.onnx").is_file()
    rc, err, _ = _run(capsys, tmp_path, src, cache, "--engine", "onnx", "--precision", "int8")
    assert rc == 0 and "building" not in err, err
    assert not list(cache.glob("exports/*.lock"))

    # --top-k above the cached export's k: refused before any engine loads, naming the command
    monkeypatch.chdir(tmp_path)
    rc, err, _ = _run(capsys, tmp_path, src, cache, "--engine", "onnx", "--top-k", "9")
    assert rc == 2, err
    assert (f"--top-k 9 is above this export's k (7)" in err
            and f"Export it with: mlm-export {src} my-bert-export --top-k 9; then pass --model my-bert-export" in err)


def test_top_k_above_the_exports_k_is_refused_before_tensorflow_loads(tiny_export, tmp_path):
    code = ("import sys; from mlm_scorer.cli import main; rc = main(sys.argv[1:]); "
            "print('tensorflow loaded' if 'tensorflow' in sys.modules else 'tensorflow not loaded'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(_tsv(tmp_path)), "-o", str(tmp_path / "o.parquet"),
                           "--model", str(tiny_export), "--top-k", "9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "tensorflow not loaded"
    src = json.loads((tiny_export / "1" / "mlm_scorer.json").read_text())["source"]["path"]
    assert (f"--top-k 9 is above this export's k (5): the export returns at most 5 predictions per word. Export it "
            f"with: mlm-export {src} {tiny_export} --version 2 --top-k 9; then --model {tiny_export} uses version 2"
            in proc.stderr)
    assert not (tmp_path / "o.parquet").exists()


def test_onnx_engine_on_an_export_without_onnx_names_the_command(tiny_export, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    rc = main([str(_tsv(tmp_path)), "-o", str(tmp_path / "o.parquet"), "--model", str(tiny_export), "--engine", "onnx"])
    err = capsys.readouterr().err
    src = json.loads((tiny_export / "1" / "mlm_scorer.json").read_text())["source"]["path"]
    assert rc == 4 and "model.onnx is missing (this export was made without it)" in err, err
    assert f"Export it with: mlm-export {src} {tiny_export} --version 1 --onnx; it adds the file to " \
           f"{tiny_export / '1'}" in err


def test_what_each_engine_needs_beside_the_saved_model(tiny_export, monkeypatch):
    import mlm_scorer.models as models
    from mlm_scorer.model_dir import ModelDir

    md = ModelDir.open(tiny_export)  # a SavedModel export without ONNX files
    monkeypatch.setattr(models, "_can_write_onnx", lambda: True)
    assert models.engine_files(md, "saved_model", None) == []
    assert models.engine_files(md, "onnx", None) == ["model.onnx"]
    assert models.engine_files(md, "onnx", "int8") == ["model.int8.onnx"]
    assert models.engine_files(md, "torch", "bf16") == ["model.onnx"]
    monkeypatch.setattr(models, "_can_write_onnx", lambda: False)  # torch then reads the SavedModel
    assert models.engine_files(md, "torch", None) == []
    assert models.engine_files(md, "onnx", None) == ["model.onnx"]  # onnx cannot do without: its error says why
