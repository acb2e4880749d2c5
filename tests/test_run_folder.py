"""Run folders: a run is written into a staging folder and moved into place only when complete, so an
interrupted or failing run never leaves new files beside an earlier run's."""

from __future__ import annotations

import json

import pytest

from laftr.errors import LaftrError
from laftr.report import OutDirError, RunFolder


def _old_run(path):
    path.mkdir()
    (path / "results.json").write_text('{"run": "old"}')
    (path / "figure.png").write_bytes(b"old figure")


def test_fresh_run_is_moved_into_place(tmp_path):
    run = RunFolder(tmp_path / "out")
    out = run.open()
    assert out == tmp_path / ".out.partial" and not (tmp_path / "out").exists()
    (out / "results.json").write_text("{}")
    assert run.commit() == tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "results.json").read_text() == "{}"


def test_interrupted_forced_run_leaves_the_earlier_run_untouched(tmp_path):
    _old_run(tmp_path / "out")
    run = RunFolder(tmp_path / "out", force=True)
    out = run.open()
    (out / "results.json").write_text('{"run": "new, unfinished"}')
    # ... interrupted here: commit never runs
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"run": "old"}
    assert (tmp_path / "out" / "figure.png").read_bytes() == b"old figure"
    with pytest.raises(OutDirError, match="exists and is not empty"):  # the next run without --force
        RunFolder(tmp_path / "out")


def test_unfinished_run_alone_is_refused_without_force(tmp_path):
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "results.json").write_text("{}")
    with pytest.raises(OutDirError, match="unfinished run of .*out is in .*\\.out\\.partial; pass --force"):
        RunFolder(tmp_path / "out")
    run = RunFolder(tmp_path / "out", force=True)  # --force discards it
    out = run.open()
    assert list(out.iterdir()) == []
    run.commit()
    assert not (tmp_path / ".out.partial").exists()


def test_forced_complete_run_replaces_every_file_of_the_earlier_one(tmp_path):
    _old_run(tmp_path / "out")
    run = RunFolder(tmp_path / "out", force=True)
    (run.open() / "results.json").write_text('{"run": "new"}')
    run.commit()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json"]  # no stale figure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copies left


def test_resume_continues_the_staging_folder_or_a_copy_of_an_in_place_run(tmp_path):
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "results.json").write_text('{"part": 1}')
    run = RunFolder(tmp_path / "out", resume=True)
    assert json.loads((run.open() / "results.json").read_text()) == {"part": 1}
    run.commit()
    # an interrupted run that an earlier laftr wrote in place: resumed on a copy, the original kept until commit
    _old_run(tmp_path / "legacy")
    run = RunFolder(tmp_path / "legacy", resume=True)
    out = run.open()
    (out / "results.json").write_text('{"run": "resumed"}')
    assert json.loads((tmp_path / "legacy" / "results.json").read_text()) == {"run": "old"}
    run.commit()
    assert json.loads((tmp_path / "legacy" / "results.json").read_text()) == {"run": "resumed"}


def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(OutDirError, match="exists and is not a folder"):
        RunFolder(tmp_path / "out", force=True)
    assert issubclass(OutDirError, LaftrError)


def test_interrupted_fsd_bench_keeps_the_earlier_run(tmp_path, monkeypatch):
    from laftr.bench import fsd

    _old_run(tmp_path / "run")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsd, "_train_theta0", interrupt)  # the first step after the staging folder is opened
    cfg = fsd.FsdBenchConfig.for_arch("mlp", quick=True, progress=False)
    with pytest.raises(KeyboardInterrupt):
        fsd.run_fsd_bench(cfg, tmp_path / "run", force=True)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"run": "old"}
    assert (tmp_path / "run" / "figure.png").exists() and (tmp_path / ".run.partial").is_dir()


def test_force_never_replaces_a_folder_of_other_files_or_the_working_folder(tmp_path, monkeypatch):
    """--force replaces a previous run's folder; a folder of the user's own files (an audit lost notes.txt and
    src/ to `laftr demo --out myproject --force`) and the working folder (`--out .`, which failed only after the
    run) are refused before any work."""
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutDirError, match="not empty|not a laftr run"):
            RunFolder(project, force=force)
    assert (project / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path / "myproject" / "src")
    for target in (".", "..", str(tmp_path / "myproject" / "src")):
        with pytest.raises(OutDirError, match="working folder"):
            RunFolder(target, force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(OutDirError, match="working folder"):
        RunFolder(".")


def test_empty_staging_folder_of_a_failed_run_does_not_block_the_rerun(tmp_path):
    # a run that failed on a user error before writing anything left only its empty staging folder
    (tmp_path / ".out.partial").mkdir()
    run = RunFolder(tmp_path / "out")  # no --force needed: there is nothing to lose
    (run.open() / "results.json").write_text('{"run": "new"}')
    run.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unfinished_run_message_offers_resume_only_where_the_command_can_resume(tmp_path):
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "results.json").write_text("{}")
    with pytest.raises(OutDirError) as plain:
        RunFolder(tmp_path / "out")
    assert "--resume" not in str(plain.value)
    with pytest.raises(OutDirError, match="--force to discard it or --resume to continue it"):
        RunFolder(tmp_path / "out", resume=False)
