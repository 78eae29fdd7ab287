"""A run touches only its own files: never a device, a FIFO, a symlink's target, a directory it did not make,
a user's file that merely looks like a temporary name, or another output of the same command. Run as root,
as CI and containers do (devices can be made then; the cases that need it skip otherwise)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import read_outputs

from mlm_scorer.cli import main

ROOT = os.geteuid() == 0
DATA = b"id\ttext\nr1\tthe cat sat on the mat\nr2\ta dog ran\nr3\tbig house\n"


def _run(capsys, inp, out, model, *extra):
    code = main([str(inp), "-o", str(out), "--model", str(model), "--engine", "fake", "--id-column", "id", "-q",
                 *map(str, extra)])
    return code, capsys.readouterr().err


@pytest.fixture()
def inp(tmp_path) -> Path:
    p = tmp_path / "in.tsv"
    p.write_bytes(DATA)
    return p


def _special(path: Path, what: str) -> None:
    if what == "char_device":  # the numbers of /dev/null (1, 3)
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "symlink":
        path.symlink_to(path.parent / "victim.txt")
        (path.parent / "victim.txt").write_text("precious\n")
    elif what == "directory":
        path.mkdir()
        (path / "thesis.tex").write_text("precious\n")


def _unchanged(path: Path, what: str) -> None:
    st = os.lstat(path)
    test = {"char_device": stat.S_ISCHR, "fifo": stat.S_ISFIFO, "symlink": stat.S_ISLNK, "directory": stat.S_ISDIR}
    assert test[what](st.st_mode), f"{path} is no longer a {what}"
    if what == "symlink":
        assert (path.parent / "victim.txt").read_text() == "precious\n"
    if what == "directory":
        assert [p.name for p in path.iterdir()] == ["thesis.tex"]


KINDS = ["char_device", "fifo", "symlink", "directory"]


def _needs(what):
    if what == "char_device" and not ROOT:
        pytest.skip("making a device node needs root (CI runs as root)")


# ------------------------------------------------------------------------ devices and special files
@pytest.mark.parametrize("which", ["words", "sentences"])
@pytest.mark.parametrize("what", KINDS)
def test_an_output_that_is_a_device_fifo_symlink_or_directory_is_refused_before_scoring(which, what, tmp_path, inp,
                                                                                        fake_export, capsys):
    _needs(what)
    out = tmp_path / "o.parquet"
    target = out if which == "words" else tmp_path / "o.sentences.parquet"
    _special(target, what)
    code, err = _run(capsys, inp, out, fake_export)
    assert code == 2, err
    assert str(target) in err and "refusing" in err, err
    _unchanged(target, what)
    assert not (tmp_path / "o.parquet.parts").exists(), "nothing is touched before the refusal"


@pytest.mark.parametrize("what", KINDS)
def test_summary_report_and_check_json_refuse_special_files(what, tmp_path, inp, fake_export, capsys):
    _needs(what)
    out = tmp_path / "o.parquet"
    assert _run(capsys, inp, out, fake_export)[0] == 0
    before = out.read_bytes()
    target = tmp_path / "t.out"
    _special(target, what)
    code, err = _run(capsys, inp, tmp_path / "p.parquet", fake_export, "--summary-json", target)
    assert code == 2 and str(target) in err, err
    assert not (tmp_path / "p.parquet").exists(), "refused before scoring"
    _unchanged(target, what)
    assert main(["report", str(out), "-o", str(target)]) == 2
    assert str(target) in capsys.readouterr().err
    _unchanged(target, what)
    assert main(["check", str(out), "--json", str(target), "-q"]) == 2
    assert str(target) in capsys.readouterr().err
    _unchanged(target, what)
    assert out.read_bytes() == before


@pytest.mark.skipif(not ROOT, reason="making a device node needs root (CI runs as root)")
def test_summary_json_on_a_full_device_is_refused_before_scoring(tmp_path, inp, fake_export, capsys):
    full = tmp_path / "full"
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # /dev/full
    code, err = _run(capsys, inp, tmp_path / "o.parquet", fake_export, "--summary-json", full)
    assert code == 2 and "character device" in err and "Traceback" not in err, err
    assert not (tmp_path / "o.parquet").exists()


def test_summary_json_in_a_missing_directory_is_refused_before_scoring(tmp_path, inp, fake_export, capsys):
    code, err = _run(capsys, inp, tmp_path / "o.parquet", fake_export, "--summary-json", tmp_path / "nodir" / "s.json")
    assert code == 2 and "does not exist" in err and "nodir" in err, err
    assert not (tmp_path / "o.parquet").exists()


def test_a_summary_that_cannot_be_written_is_a_clear_error_after_the_outputs(tmp_path, inp, fake_export, capsys,
                                                                            monkeypatch):
    import mlm_scorer.fsutil as fsutil

    real = fsutil.atomic_write_bytes

    def full(path, data, *a, **kw):
        if str(path).endswith("s.json"):
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, *a, **kw)

    monkeypatch.setattr(fsutil, "atomic_write_bytes", full)
    code, err = _run(capsys, inp, tmp_path / "o.parquet", fake_export, "--summary-json", tmp_path / "s.json")
    assert code == 1 and "No space left on device" in err and "the outputs are written" in err, err
    assert "Traceback" not in err
    assert (tmp_path / "o.parquet").is_file() and not (tmp_path / "s.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ---------------------------------------------------------------------------- the parts directory
def test_a_symlinked_parts_directory_never_empties_its_target(tmp_path, inp, fake_export, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("x\n")
    (tmp_path / "out.parquet.parts").symlink_to(victim)
    for extra in ([], ["--resume"]):
        code, err = _run(capsys, inp, tmp_path / "out.parquet", fake_export, *extra)
        assert code == 2 and "symlink" in err and "out.parquet.parts" in err, err
        assert [p.name for p in victim.iterdir()] == ["thesis.tex"] and (victim / "thesis.tex").read_text() == "x\n"
    assert not (tmp_path / "out.parquet").exists()


def test_a_parts_directory_this_program_did_not_make_is_refused(tmp_path, inp, fake_export, capsys):
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    (parts / "thesis.tex").write_text("x\n")
    code, err = _run(capsys, inp, tmp_path / "out.parquet", fake_export)
    assert code == 2 and "was not made by this program" in err and "thesis.tex" in err, err
    assert [p.name for p in parts.iterdir()] == ["thesis.tex"]


def test_a_users_file_in_a_marked_parts_directory_survives_the_run(tmp_path, inp, fake_export, capsys):
    from mlm_scorer.fsutil import OwnedDir

    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    (parts / OwnedDir.MARKER).write_text("")
    (parts / "notes.txt").write_text("mine\n")
    code, err = _run(capsys, inp, tmp_path / "out.parquet", fake_export)
    assert code == 0, err
    assert (parts / "notes.txt").read_text() == "mine\n", "only the run's own files are deleted"


@pytest.mark.parametrize("what", ["char_device", "fifo", "symlink"])
def test_a_lock_file_that_is_not_a_regular_file_is_never_opened(what, tmp_path, inp, fake_export, capsys):
    """The lock in a parts directory this program marked: a device (opening one may act: a tape rewinds, a
    watchdog starts), a FIFO or a symlink there is refused with exit 2, never opened or deleted."""
    from mlm_scorer.fsutil import OwnedDir

    _needs(what)
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    (parts / OwnedDir.MARKER).write_text("")
    _special(parts / "lock", what)
    code, err = _run(capsys, inp, tmp_path / "out.parquet", fake_export)
    assert code == 2 and str(parts / "lock") in err and "not a regular file" in err, err
    _unchanged(parts / "lock", what)
    assert not (tmp_path / "out.parquet").exists()


def test_a_parts_directory_of_an_earlier_version_without_a_marker_still_resumes(tmp_path, inp, fake_export, capsys):
    out = tmp_path / "out.parquet"
    parts = tmp_path / "out.parquet.parts"
    parts.mkdir()
    for name in ("lock", "words-000000.parquet", ".progress.json.ab12cd34.tmp"):
        (parts / name).write_bytes(b"stale")
    code, err = _run(capsys, inp, out, fake_export)
    assert code == 0, err
    assert not parts.exists()


def test_cache_inside_or_at_the_parts_directory_is_refused(tmp_path, inp, fake_export, capsys):
    out = tmp_path / "out.parquet"
    for cache in (tmp_path / "out.parquet.parts", tmp_path / "out.parquet.parts" / "c"):
        code, err = _run(capsys, inp, out, fake_export, "--cache", cache)
        assert code == 2 and "parts directory" in err, err
        assert not (tmp_path / "out.parquet.parts").exists(), "refused before the cache was made"
    # a cache from an earlier run, then named as the parts directory: refused, not deleted
    cache = tmp_path / "out.parquet.parts"
    assert _run(capsys, inp, tmp_path / "other.parquet", fake_export, "--cache", cache)[0] == 0
    before = sorted(p.name for p in cache.iterdir())
    code, err = _run(capsys, inp, out, fake_export, "--cache", cache)
    assert code == 2, err
    assert sorted(p.name for p in cache.iterdir()) == before and "scores.sqlite" in before


def test_a_planted_cache_symlink_is_refused(tmp_path, inp, fake_export, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    elsewhere = tmp_path / "elsewhere" / "db"
    elsewhere.parent.mkdir()
    for name in ("scores.sqlite", "scores.sqlite-wal"):
        link = cache / name
        link.symlink_to(elsewhere)
        code, err = _run(capsys, inp, tmp_path / "o.parquet", fake_export, "--cache", cache)
        assert code == 2 and "symlink" in err and name in err, err
        assert not elsewhere.exists(), "nothing is created at the link's target"
        link.unlink()


# ----------------------------------------------------------------------------- temporary names
def test_a_users_file_that_looks_like_a_temporary_name_is_left_alone(tmp_path, inp, fake_export, capsys):
    out = tmp_path / "out.parquet"
    notes = [tmp_path / ".out.parquet.tmp-notes", tmp_path / ".out.sentences.parquet.tmp-old",
             tmp_path / ".out.parquet.tmp-12x"]
    for n in notes:
        n.write_text("mine\n")
    assert _run(capsys, inp, out, fake_export)[0] == 0
    for n in notes:
        assert n.read_text() == "mine\n", f"{n.name} was deleted"


def _die_leaving_temp(final: Path, how: str) -> Path:
    """A process that makes its temporary name for ``final`` and dies (exits, or is killed with SIGKILL)."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from mlm_scorer.fsutil import create_exclusive, temp_path
        t = temp_path({str(final)!r})
        os.close(create_exclusive(t))
        print(t, flush=True)
        if {how == 'sigkill'}:
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == (-signal.SIGKILL if how == "sigkill" else 0), p.stderr
    t = Path(p.stdout.strip())
    assert t.is_file()
    return t


def test_temporary_files_of_killed_runs_are_removed_by_the_next_run_and_live_ones_kept(tmp_path, inp, fake_export,
                                                                                      capsys):
    from mlm_scorer.fsutil import create_exclusive, temp_path

    out = tmp_path / "out.parquet"
    dead = [_die_leaving_temp(out, "sigkill"), _die_leaving_temp(tmp_path / "out.sentences.parquet", "exit")]
    legacy = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old_form = tmp_path / f".out.parquet.tmp-{legacy.stdout.strip()}"  # the name of earlier versions
    old_form.write_bytes(b"debris")
    live = temp_path(out)  # this process is alive: its file is not debris
    os.close(create_exclusive(live))
    assert _run(capsys, inp, out, fake_export)[0] == 0
    for t in dead + [old_form]:
        assert not t.exists(), f"{t.name} (a dead run's) was left behind"
    assert live.exists(), "a live run's temporary file was deleted"


# ---------------------------------------------------------------- outputs overwriting each other
def test_summary_json_naming_an_output_is_refused(tmp_path, inp, fake_export, capsys):
    out = tmp_path / "b.parquet"
    for summary in (tmp_path / "b.sentences.parquet", out, tmp_path / "b.parquet.parts" / "s.json"):
        code, err = _run(capsys, inp, out, fake_export, "--summary-json", summary)
        assert code == 2 and str(summary) in err, err
        assert not out.exists() and not (tmp_path / "b.sentences.parquet").exists()


@pytest.mark.parametrize("target", ["o.parquet", "o.sentences.parquet", "base.parquet", "base.sentences.parquet"])
def test_report_and_check_never_overwrite_what_they_read(target, tmp_path, inp, fake_export, capsys):
    out, base = tmp_path / "o.parquet", tmp_path / "base.parquet"
    assert _run(capsys, inp, out, fake_export)[0] == 0
    assert _run(capsys, inp, base, fake_export)[0] == 0
    before = {p: p.read_bytes() for p in tmp_path.glob("*.parquet")}
    dest = tmp_path / target
    uses_base = target.startswith("base")
    b = ["--baseline", str(base)] if uses_base else []
    assert main(["report", str(out), "-o", str(dest), *b]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and str(dest) in err, err
    assert main(["check", str(out), "--json", str(dest), "-q", *b]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and str(dest) in err, err
    assert {p: p.read_bytes() for p in tmp_path.glob("*.parquet")} == before


def test_report_into_a_ray_result_directory_is_refused(tmp_path, capsys):
    d = tmp_path / "ray"
    (d / "words").mkdir(parents=True)
    (d / "sentences").mkdir()
    assert main(["report", str(d), "-o", str(d / "sentences" / "r.html")]) == 2
    assert "inside the result directory" in capsys.readouterr().err


def test_outputs_are_written_with_the_umasks_permissions(tmp_path, inp, fake_export, capsys):
    out = tmp_path / "o.parquet"
    old = os.umask(0o027)
    try:
        assert _run(capsys, inp, out, fake_export, "--summary-json", tmp_path / "s.json")[0] == 0
        assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    finally:
        os.umask(old)
    for name in ("o.parquet", "o.sentences.parquet", "s.json", "r.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == 3
    assert read_outputs(out)[1][0]["status"] == "ok"


# ------------------------------------------------------------------------------------------ the exporter
def test_export_overwrite_replaces_only_a_real_export(tiny_hf, tiny_export, tmp_path, capsys, monkeypatch):
    """``mlm-export --overwrite`` replaces OUT/VERSION only when it is an export this program wrote: a
    directory whose manifest is a symlink (even to a real export's), is not this program's format, or is
    not JSON is refused with exit 2 before the checkpoint is loaded, and every file in it stays."""
    import mlm_export.checkpoint as checkpoint
    from mlm_export.cli import main as export_main
    from mlm_scorer.model_dir import MANIFEST_NAME

    def never(*a, **k):
        raise AssertionError("the checkpoint was loaded before the refusal")

    monkeypatch.setattr(checkpoint, "load_checkpoint", never)
    real_manifest = tiny_export / "1" / MANIFEST_NAME
    for name, make in (("link", lambda m: m.symlink_to(real_manifest)),
                       ("other_format", lambda m: m.write_text(json.dumps({"name": "my app", "format": "web"}))),
                       ("not_json", lambda m: m.write_text("precious\n"))):
        v = tmp_path / name / "1"
        v.mkdir(parents=True)
        (v / "thesis.tex").write_text("precious\n")
        make(v / MANIFEST_NAME)
        before = sorted(p.name for p in v.iterdir())
        assert export_main([str(tiny_hf), str(v.parent), "--overwrite", "-q"]) == 2
        err = capsys.readouterr().err
        assert "is not an export made by mlm-export" in err and str(v) in err, err
        assert sorted(p.name for p in v.iterdir()) == before and (v / "thesis.tex").read_text() == "precious\n"
    assert json.loads(real_manifest.read_text())["format"] == "mlm-scorer-export"


def test_export_overwrite_replaces_a_real_export_whole(tiny_hf, tiny_export, tmp_path):
    import shutil

    from mlm_export import export
    from mlm_scorer.model_dir import MANIFEST_NAME

    base = tmp_path / "base"
    shutil.copytree(tiny_export, base)
    (base / "1" / "stale.txt").write_text("from the replaced export\n")
    before = json.loads((base / "1" / MANIFEST_NAME).read_text())["created"]
    assert export(tiny_hf, base, top_k=3, overwrite=True, log=lambda m: None) == base / "1"
    manifest = json.loads((base / "1" / MANIFEST_NAME).read_text())
    assert manifest["top_k"] == 3 and not (base / "1" / "stale.txt").exists(), (before, manifest["created"])
    assert sorted(p.name for p in base.iterdir()) == ["1", "models.config"], "nothing of the old one is left"


@pytest.mark.parametrize("what", ["symlink", "fifo", "directory"])
def test_export_refuses_a_models_config_that_is_not_a_regular_file_before_exporting(what, tiny_hf, tmp_path,
                                                                                    capsys, monkeypatch):
    """OUT/models.config (written after the export, for TF Serving) is checked before the checkpoint is
    loaded: a symlink, a FIFO or a directory there is refused (exit 2) and no version directory is made."""
    import mlm_export.checkpoint as checkpoint
    from mlm_export.cli import main as export_main

    def never(*a, **k):
        raise AssertionError("the checkpoint was loaded before the refusal")

    monkeypatch.setattr(checkpoint, "load_checkpoint", never)
    base = tmp_path / "base"
    base.mkdir()
    _special(base / "models.config", what)
    assert export_main([str(tiny_hf), str(base), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(base / "models.config") in err and "not a regular file" in err and "Traceback" not in err, err
    _unchanged(base / "models.config", what)
    assert not (base / "1").exists()


def test_triton_repo_replaces_only_its_own_version_directory_and_config(tiny_export, tmp_path, capsys):
    """``python -m mlm_export.triton_repo --overwrite`` replaces REPO/NAME/VERSION only when this program
    wrote it; a config.pbtxt that is a symlink is refused before anything is written; an export inside the
    version directory it would replace is refused; temporary names are its own (a user's look-alike and a
    live run's file stay)."""
    from mlm_export.triton_repo import RepositoryError, main as triton_main, write_triton_repo
    from mlm_scorer.fsutil import create_exclusive, temp_path
    from mlm_scorer.model_dir import MANIFEST_NAME

    repo = tmp_path / "repo"
    kw = dict(backend="tensorflow", log=lambda m: None)
    model_dir = write_triton_repo(tiny_export, repo, **kw)
    notes = model_dir / ".config.pbtxt.tmp-notes"
    notes.write_text("mine\n")
    live = temp_path(model_dir / "config.pbtxt")  # this process is alive: not debris
    os.close(create_exclusive(live))
    write_triton_repo(tiny_export, repo, overwrite=True, max_batch_size=8, **kw)  # its own: replaced
    assert "max_batch_size: 8" in (model_dir / "config.pbtxt").read_text()
    assert notes.read_text() == "mine\n" and live.exists()
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".config")) == ["1", "config.pbtxt"]

    foreign = repo / "other" / "1"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("precious\n")
    with pytest.raises(RepositoryError, match="is not a version directory written by this program"):
        write_triton_repo(tiny_export, repo, name="other", overwrite=True, **kw)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]

    plan = model_dir / "1" / "model.plan"  # a plan kept in the version directory it would replace
    plan.write_bytes(b"a TensorRT plan")
    with pytest.raises(RepositoryError, match=r"the model file .*model.plan' lies in .*repo/bert/1, which this run "
                                              r"replaces"):
        write_triton_repo(tiny_export, repo, backend="tensorrt", plan=plan, overwrite=True, log=lambda m: None)
    assert plan.read_bytes() == b"a TensorRT plan" and (model_dir / "1" / MANIFEST_NAME).is_file()

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    cfg = repo / "linked" / "config.pbtxt"
    cfg.parent.mkdir()
    cfg.symlink_to(victim)
    assert triton_main([str(tiny_export), str(repo), "--name", "linked", "--backend", "tensorflow"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "is a symlink" in err and "Traceback" not in err, err
    assert cfg.is_symlink() and victim.read_text() == "precious\n"
    assert [p.name for p in cfg.parent.iterdir()] == ["config.pbtxt"], "nothing written before the refusal"


def test_tensorrt_plan_paths_are_checked_before_tensorrt_is_loaded(tiny_export, tmp_path, capsys):
    """``python -m mlm_export.to_tensorrt --out``: the export's manifest, the workload file, a symlink or a
    FIFO are refused (exit 2) before TensorRT is loaded or a plan is built (minutes), and stay as they were."""
    from mlm_export.to_tensorrt import main as trt_main
    from mlm_scorer.model_dir import MANIFEST_NAME

    manifest = tiny_export / "1" / MANIFEST_NAME
    workload = tmp_path / "workload.txt"
    workload.write_text("the cat sat\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "link.plan").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.plan")
    before = {p: p.read_bytes() for p in (manifest, workload, victim)}
    for out, message in ((manifest, "is the export's manifest"), (workload, "is the workload file"),
                         (tmp_path / "link.plan", "is a symlink"), (tmp_path / "fifo.plan", "is a FIFO")):
        assert trt_main([str(tiny_export), "--out", str(out), "--workload", str(workload)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(out) in err and "TensorRT" not in err, err
    assert {p: p.read_bytes() for p in before} == before and (tmp_path / "fifo.plan").is_fifo()
