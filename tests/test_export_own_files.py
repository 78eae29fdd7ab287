"""The exporter's ONNX writer, the drift record and the scorer's export cache touch only their own files:
a symlink, a device, a FIFO or a directory where they would write is refused (naming it) before any work,
never followed, replaced or deleted; their temporary names say which run made them (a dead run's are
removed, a user's look-alike stays); the manifest is replaced atomically; and a file a user put in the
cache's export directory is never deleted. Run as root, as CI does (device nodes need it; those cases
skip otherwise)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlm_scorer.errors import ModelError, UsageError
from mlm_scorer.model_dir import MANIFEST_NAME, ModelDir

ROOT = os.geteuid() == 0
KINDS = ["char_device", "fifo", "symlink", "directory"]


def _special(path: Path, what: str) -> None:
    """Put ``what`` at ``path``: a device node with /dev/null's numbers, a FIFO, a symlink to a precious
    file beside it, or a directory holding one."""
    if what == "char_device":
        if not ROOT:
            pytest.skip("making a device node needs root (CI runs as root)")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "symlink":
        victim = path.parent / f"victim-{path.name}"
        victim.write_text("precious\n")
        path.symlink_to(victim)
    elif what == "directory":
        path.mkdir()
        (path / "thesis.tex").write_text("precious\n")


def _unchanged(path: Path, what: str) -> None:
    st = os.lstat(path)
    test = {"char_device": stat.S_ISCHR, "fifo": stat.S_ISFIFO, "symlink": stat.S_ISLNK, "directory": stat.S_ISDIR}
    assert test[what](st.st_mode), f"{path} is no longer a {what}"
    if what == "symlink":
        assert (path.parent / f"victim-{path.name}").read_text() == "precious\n"
    if what == "directory":
        assert [p.name for p in path.iterdir()] == ["thesis.tex"]
        assert (path / "thesis.tex").read_text() == "precious\n"


def _needs_onnx():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mlm-scorer[onnx]')")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'mlm-scorer[onnx]')")


@pytest.fixture()
def vdir(tiny_export, tmp_path) -> Path:
    """A copy of the tiny export's version directory (SavedModel, tokenizer, manifest; no ONNX files)."""
    d = tmp_path / "export" / "1"
    shutil.copytree(ModelDir.open(tiny_export).path, d)
    return d


@pytest.fixture(scope="module")
def ckpt(tiny_hf):
    from mlm_export import load_checkpoint

    return load_checkpoint(tiny_hf)


def _die_leaving_temp(final: Path) -> Path:
    """A process that makes its temporary name for ``final`` (``fsutil.temp_path``) and exits."""
    code = textwrap.dedent(f"""
        import os
        from mlm_scorer.fsutil import create_exclusive, temp_path
        t = temp_path({str(final)!r})
        os.close(create_exclusive(t))
        print(t, flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 0, p.stderr
    t = Path(p.stdout.strip())
    assert t.is_file()
    return t


# ------------------------------------------------------------------------------------ write_onnx
@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
@pytest.mark.parametrize("what", KINDS)
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_write_onnx_refuses_a_target_that_is_not_a_regular_file_before_any_work(name, what, quantize, vdir, ckpt,
                                                                               monkeypatch):
    """model.onnx and model.int8.onnx (written with --quantize int8, deleted as stale without it) are
    checked before the graph is built: a symlink, a device, a FIFO or a directory there is refused with
    a UsageError naming it, and stays what it was; nothing is written."""
    _needs_onnx()
    from mlm_export import to_onnx

    def never(*a, **k):
        raise AssertionError("a graph was built before the refusal")

    monkeypatch.setattr(to_onnx, "build_graph", never)
    _special(vdir / name, what)
    manifest = (vdir / MANIFEST_NAME).read_bytes()
    before = sorted(p.name for p in vdir.iterdir())
    with pytest.raises(UsageError) as exc:
        to_onnx.write_onnx(vdir, ckpt, quantize=quantize, log=lambda m: None)
    msg = str(exc.value)
    assert str(vdir / name) in msg and "not a regular file" in msg and "refusing" in msg, msg
    _unchanged(vdir / name, what)
    assert sorted(p.name for p in vdir.iterdir()) == before
    assert (vdir / MANIFEST_NAME).read_bytes() == manifest


def test_mlm_export_onnx_into_an_export_with_a_symlinked_model_onnx_is_a_clear_error(tiny_hf, tiny_export, tmp_path,
                                                                                     capsys):
    """``mlm-export SRC OUT --onnx`` adding to an existing version: the refusal is exit code 2 and one line
    naming the path, never a traceback, and the symlink's target is untouched."""
    _needs_onnx()
    from mlm_export.cli import main as export_main

    base = tmp_path / "base"
    shutil.copytree(tiny_export, base)
    _special(base / "1" / "model.onnx", "symlink")
    assert export_main([str(tiny_hf), str(base), "--onnx", "-q"]) == 2
    err = capsys.readouterr().err
    assert str(base / "1" / "model.onnx") in err and "is a symlink" in err and "Traceback" not in err, err
    _unchanged(base / "1" / "model.onnx", "symlink")


def test_write_onnx_uses_its_own_temporary_names_and_removes_a_dead_runs(vdir, ckpt, monkeypatch):
    """The files being verified carry the run's temporary names (``.model.onnx.tmp-PID-START-HOST-N``), so a
    run killed meanwhile leaves debris the next run recognises: a dead run's temporary files are removed,
    a user's look-alike and a live run's file stay, and the published files are the umask's mode."""
    _needs_onnx()
    from mlm_export import to_onnx
    from mlm_scorer.fsutil import create_exclusive, default_file_mode, temp_owner, temp_path

    dead = [_die_leaving_temp(vdir / "model.onnx"), _die_leaving_temp(vdir / "model.int8.onnx")]
    looks_alike = [vdir / ".model.onnx.tmp-notes", vdir / ".model.int8.onnx.tmp-12x"]
    for n in looks_alike:
        n.write_text("mine\n")
    live = temp_path(vdir / "model.onnx")  # this process is alive: its file is not debris
    os.close(create_exclusive(live))
    seen = []
    verify, drift = to_onnx.verify_onnx, to_onnx.int8_drift

    def spy_verify(path, *a, **k):
        seen.append(("model.onnx", Path(path)))
        return verify(path, *a, **k)

    def spy_drift(fp32_path, int8_path, **k):
        seen.append(("model.int8.onnx", Path(int8_path)))
        return drift(fp32_path, int8_path, **k)

    monkeypatch.setattr(to_onnx, "verify_onnx", spy_verify)
    monkeypatch.setattr(to_onnx, "int8_drift", spy_drift)
    to_onnx.write_onnx(vdir, ckpt, quantize="int8", log=lambda m: None)
    assert [name for name, _ in seen] == ["model.onnx", "model.int8.onnx"]
    for name, path in seen:
        assert path.parent == vdir and temp_owner(vdir / name, path) is not None, path.name
        assert not path.exists(), f"{path.name} was left behind"
    for t in dead:
        assert not t.exists(), f"{t.name} (a dead run's) was left behind"
    for n in looks_alike:
        assert n.read_text() == "mine\n", f"{n.name} was deleted"
    assert live.exists(), "a live run's temporary file was deleted"
    for name in ("model.onnx", "model.int8.onnx"):
        assert stat.S_IMODE((vdir / name).stat().st_mode) == default_file_mode(), name
    manifest = json.loads((vdir / MANIFEST_NAME).read_text())
    assert manifest["onnx"]["int8"]["file"] == "model.int8.onnx" and "onnx-int8" in manifest["reduced_precision"]


def test_write_onnx_without_int8_removes_only_a_regular_stale_int8_file(vdir, ckpt):
    """A stale model.int8.onnx (a regular file) no longer matches a rewritten model.onnx and is deleted;
    a hard link to it elsewhere keeps its bytes (the name is unlinked, nothing is truncated)."""
    _needs_onnx()
    from mlm_export.to_onnx import write_onnx

    stale = vdir / "model.int8.onnx"
    stale.write_bytes(b"an earlier int8 file")
    keep = vdir.parent / "kept.onnx"
    os.link(stale, keep)
    write_onnx(vdir, ckpt, log=lambda m: None)
    assert not stale.exists() and (vdir / "model.onnx").is_file()
    assert keep.read_bytes() == b"an earlier int8 file"


@pytest.mark.parametrize("recorded", ["scheme 1", "no scheme"])
def test_write_onnx_accepts_an_export_made_with_the_earlier_checksum_scheme(recorded, vdir, ckpt, tiny_hf, tmp_path):
    """An export whose manifest records checksum scheme 1 (or, older still, no scheme: 1) is compared with
    the checkpoint's scheme-1 checksum, not refused as other weights; other weights are still refused."""
    _needs_onnx()
    from mlm_export import load_checkpoint
    from mlm_export.to_onnx import write_onnx
    from tiny_models import make_hf_bert

    old = ckpt.checksum(scheme=1)
    assert old != ckpt.checksum(), "the two schemes must differ for this test to mean anything"
    manifest = json.loads((vdir / MANIFEST_NAME).read_text())
    manifest["model_checksum"] = old
    if recorded == "scheme 1":
        manifest["checksum_scheme"] = 1
    else:
        del manifest["checksum_scheme"]
    (vdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    write_onnx(vdir, ckpt, log=lambda m: None)
    after = json.loads((vdir / MANIFEST_NAME).read_text())
    assert after["model_checksum"] == old and after["onnx"]["file"] == "model.onnx"
    assert (vdir / "model.onnx").is_file()

    other = load_checkpoint(make_hf_bert(tmp_path / "other", seed=5))
    with pytest.raises(ValueError, match="model_checksum"):
        write_onnx(vdir, other, log=lambda m: None)


# ----------------------------------------------------------------------------- the drift record
def test_update_manifest_replaces_the_manifest_atomically(vdir):
    """The manifest is written to the run's temporary name and renamed over the old one: a hard link to
    the old manifest keeps the old bytes (it was not rewritten in place), and no temporary file is left."""
    from mlm_export.drift import update_manifest

    path = vdir / MANIFEST_NAME
    old = path.read_bytes()
    os.link(path, vdir.parent / "old-manifest.json")
    new = update_manifest(vdir, {"note": "added"}, what="the export's manifest")
    assert json.loads(path.read_text()) == new and new["note"] == "added"
    assert (vdir.parent / "old-manifest.json").read_bytes() == old
    assert sorted(p.name for p in vdir.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("what", ["symlink", "fifo", "directory"])
def test_update_manifest_refuses_a_manifest_that_is_not_a_regular_file(what, tmp_path):
    from mlm_export.drift import update_manifest

    vdir = tmp_path / "1"
    vdir.mkdir()
    _special(vdir / MANIFEST_NAME, what)
    with pytest.raises(UsageError) as exc:
        update_manifest(vdir, {"note": "added"}, what="the export's manifest")
    msg = str(exc.value)
    assert msg.startswith("the export's manifest") and str(vdir / MANIFEST_NAME) in msg and "refusing" in msg, msg
    _unchanged(vdir / MANIFEST_NAME, what)
    assert sorted(p.name for p in vdir.iterdir()) == [MANIFEST_NAME] + (["victim-" + MANIFEST_NAME]
                                                                        if what == "symlink" else [])


def test_update_manifest_names_a_manifest_that_is_not_json(tmp_path):
    from mlm_export.drift import update_manifest

    vdir = tmp_path / "1"
    vdir.mkdir()
    (vdir / MANIFEST_NAME).write_text("precious\n")
    with pytest.raises(ModelError, match=r"^the export's manifest '.*mlm_scorer.json' is not valid JSON"):
        update_manifest(vdir, {"note": "added"}, what="the export's manifest")
    with pytest.raises(ModelError, match=r"^the export's manifest '.*mlm_scorer.json' is missing"):
        update_manifest(tmp_path / "2", {"note": "added"}, what="the export's manifest")
    assert (vdir / MANIFEST_NAME).read_text() == "precious\n"


def test_record_drift_reports_a_refused_manifest_as_a_warning_not_a_traceback(vdir):
    """record_drift stores a report that was measured anyway: a manifest it must not replace (a symlink) is
    said in one warning naming the path (returns False), and the symlink's target is untouched."""
    from mlm_export.drift import record_drift

    path = vdir / MANIFEST_NAME
    target = vdir.parent / "real-manifest.json"
    shutil.move(path, target)
    path.symlink_to(target)
    before = target.read_bytes()
    logged = []
    report = {"mean_abs_diff": 0.01, "max_abs_diff": 0.1, "top1_agreement": 1.0, "n_predictions": 3}
    assert record_drift(vdir, "x-test", report, log=logged.append) is False
    assert logged[0].startswith("drift x-test vs fp32"), logged
    assert logged[1].startswith(f"warning: could not record the drift report in {path}: the export's manifest "), logged
    assert "is a symlink" in logged[1], logged
    assert path.is_symlink() and target.read_bytes() == before


# ------------------------------------------------------------------------------- the export cache
def _tsv(tmp_path: Path) -> Path:
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\nThe cat sat on the mat.\n")
    return tsv


def _score(capsys, tmp_path, model, cache) -> tuple[int, str]:
    from mlm_scorer.cli import main

    rc = main([str(_tsv(tmp_path)), "-o", str(tmp_path / "o.parquet"), "--model", str(model), "--cache-dir",
               str(cache), "--engine", "saved_model", "-q"])
    return rc, capsys.readouterr().err


@pytest.fixture()
def src(tiny_hf, tmp_path) -> Path:
    return shutil.copytree(tiny_hf, tmp_path / "my-bert")


def _key_dir(cache: Path, src: Path) -> Path:
    from mlm_scorer.models import source_key

    return cache / "exports" / source_key(str(src))


@pytest.fixture()
def no_export(monkeypatch):
    """Fail the test if the cache starts exporting (the refusals come first)."""
    import mlm_export.saved_model as saved_model

    def never(*a, **k):
        raise AssertionError("the checkpoint was exported before the refusal")

    monkeypatch.setattr(saved_model, "export_checkpoint", never)


def test_a_users_file_in_the_caches_export_directory_is_never_deleted(src, tmp_path, capsys, no_export):
    """``cache/exports/<key>/1/thesis.tex`` (a directory the program did not make as it is): refused with
    exit code 2 naming the directory and what it holds; the file stays, nothing is added."""
    cache = tmp_path / "cache"
    key = _key_dir(cache, src)
    (key / "1").mkdir(parents=True)
    (key / "1" / "thesis.tex").write_text("precious\n")
    rc, err = _score(capsys, tmp_path, src, cache)
    assert rc == 2, err
    assert str(key) in err and "'1'" in err and "refusing" in err and "Traceback" not in err, err
    assert (key / "1" / "thesis.tex").read_text() == "precious\n"
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == \
        sorted(str(p.relative_to(cache)) for p in (key.parent, key, key / "1", key / "1" / "thesis.tex"))
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("what", ["symlink_to_directory", "file"])
def test_a_symlink_or_file_in_place_of_the_caches_export_directory_is_never_followed(what, src, tmp_path, capsys,
                                                                                     no_export):
    cache = tmp_path / "cache"
    key = _key_dir(cache, src)
    key.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("precious\n")
    if what == "file":
        key.write_text("precious\n")
    else:
        key.symlink_to(elsewhere)
    rc, err = _score(capsys, tmp_path, src, cache)
    assert rc == 2, err
    assert str(key) in err and ("is a symlink" if what != "file" else "is a regular file") in err, err
    assert "Traceback" not in err, err
    assert [p.name for p in elsewhere.iterdir()] == ["thesis.tex"], "nothing written at the link's target"
    assert key.is_symlink() if what != "file" else key.read_text() == "precious\n"
    assert sorted(p.name for p in key.parent.iterdir()) == [key.name], "no lock, no temporary directory left"


@pytest.mark.parametrize("what", ["char_device", "fifo", "symlink", "directory"])
def test_the_caches_lock_file_is_refused_when_not_a_regular_file(what, src, tmp_path, capsys, no_export):
    cache = tmp_path / "cache"
    key = _key_dir(cache, src)
    key.parent.mkdir(parents=True)
    lock = Path(str(key) + ".lock")
    _special(lock, what)
    rc, err = _score(capsys, tmp_path, src, cache)
    assert rc == 2, err
    assert str(lock) in err and "not a regular file" in err and "Traceback" not in err, err
    _unchanged(lock, what)
    assert not os.path.lexists(key)


def test_a_lock_file_that_cannot_be_created_is_a_clear_error(src, tmp_path, capsys, monkeypatch, no_export):
    """Permission denied on the lock (a cache another user owns): exit code 2 naming the lock file and the
    fix (another --cache-dir), not a traceback; the cache directories the run made are removed again."""
    import mlm_scorer.models as models

    cache = tmp_path / "cache"
    lock = Path(str(_key_dir(cache, src)) + ".lock")
    real_open = os.open

    def denied(path, *a, **k):
        if Path(path) == lock:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(models.os, "open", denied)
    rc, err = _score(capsys, tmp_path, src, cache)
    assert rc == 2, err
    assert str(lock) in err and "Permission denied" in err and "--cache-dir" in err and "Traceback" not in err, err
    assert not cache.exists()


def test_a_failed_build_deletes_only_what_it_made(tmp_path):
    """On failure the lock removes the export directory only if this run made it and it is empty: a file a
    user put in it meanwhile stays, with its directory."""
    from mlm_scorer.models import _cache_lock

    target = tmp_path / "cache" / "exports" / "m-0123"
    with pytest.raises(RuntimeError):
        with _cache_lock(target):
            target.mkdir()
            (target / "thesis.tex").write_text("precious\n")
            raise RuntimeError("export failed")
    assert (target / "thesis.tex").read_text() == "precious\n"
    assert not Path(str(target) + ".lock").exists()


def test_a_fresh_cache_gets_a_whole_export_and_nothing_else(src, tmp_path, capsys):
    """A first use exports into the run's own temporary directory and renames it into place: afterwards the
    cache holds the export and nothing else (no lock, no temporary directory); the second use reuses it."""
    cache = tmp_path / "cache"
    rc, err = _score(capsys, tmp_path, src, cache)
    assert rc == 0, err
    key = _key_dir(cache, src)
    assert sorted(p.name for p in key.parent.iterdir()) == [key.name]
    assert sorted(p.name for p in key.iterdir()) == ["1", "models.config"]
    assert (key / "1" / MANIFEST_NAME).is_file()
    created = json.loads((key / "1" / MANIFEST_NAME).read_text())["created"]
    rc, err = _score(capsys, tmp_path, src, cache)
    assert rc == 0, err
    assert json.loads((key / "1" / MANIFEST_NAME).read_text())["created"] == created


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_onnx_into_a_version_without_a_readable_manifest_is_a_model_error(content, tmp_path):
    """``write_onnx`` on a directory whose manifest is missing, not JSON or not an object: a ModelError that
    names the manifest (the CLI's clear message and exit code), not a traceback; nothing is written."""
    from mlm_scorer.errors import ModelError
    from mlm_scorer.model_dir import MANIFEST_NAME
    from mlm_export.to_onnx import write_onnx

    vdir = tmp_path / "1"
    vdir.mkdir()
    if content is not None:
        (vdir / MANIFEST_NAME).write_text(content)
    with pytest.raises(ModelError, match=MANIFEST_NAME):
        write_onnx(vdir, ckpt=None)
    assert sorted(p.name for p in vdir.iterdir()) == ([MANIFEST_NAME] if content is not None else [])
