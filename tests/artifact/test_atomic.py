"""atomic_directory: a target is fully written or not changed, whatever stops the writer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from moefx.artifact.atomic import atomic_directory


def _write(directory, text="new"):
    (directory / "a.txt").write_text(text)
    (directory / "b.txt").write_text(text)


def test_success_creates_the_target_with_every_file(tmp_path):
    with atomic_directory(tmp_path / "deep" / "out") as tmp:
        _write(tmp)
    assert sorted(p.name for p in (tmp_path / "deep" / "out").iterdir()) == ["a.txt", "b.txt"]
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["out"]


@pytest.mark.parametrize("stop", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_nothing(tmp_path, stop):
    with pytest.raises(type(stop)):
        with atomic_directory(tmp_path / "deep" / "out") as tmp:
            (tmp / "a.txt").write_text("half")
            raise stop
    assert list(tmp_path.iterdir()) == [], "the output, its temporary directory or its new parents were left"


@pytest.mark.parametrize("stop", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_never_damages_an_existing_output(tmp_path, stop):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, "old")
    with pytest.raises(type(stop)):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise stop
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "old", "b.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, force=True) as tmp:
        _write(tmp)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "new", "b.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("marker", [None, "moefx.json"])
def test_an_empty_directory_is_written_into_without_force(tmp_path, marker):
    out = Path(tempfile.mkdtemp(dir=tmp_path))  # as a user makes one for the output
    with atomic_directory(out, marker=marker) as tmp:
        _write(tmp)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "new", "b.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "a temporary directory was left"


def test_a_failure_leaves_an_empty_target_directory_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert out.is_dir() and list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("force", [False, True])
def test_a_file_in_the_way_is_refused_without_suggesting_force(tmp_path, force):
    (tmp_path / "afile").write_text("mine")
    for target, words in ((tmp_path / "afile", "afile is a file, not a directory"),
                          (tmp_path / "afile" / "sub" / "out", "afile is a file, not a directory, so")):
        with pytest.raises(FileExistsError, match="choose another output directory") as refused:
            with atomic_directory(target, force=force, marker="moefx.json"):
                pass
        assert words in str(refused.value) and "--force" not in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_force_replaces_only_an_earlier_output_of_the_same_kind(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "model.py").write_text("precious")
    with pytest.raises(FileExistsError, match="not an output of this kind"):
        with atomic_directory(project, force=True, marker="moefx.json"):
            pass
    assert (project / "model.py").read_text() == "precious"
    (project / "moefx.json").write_text("{}")
    with atomic_directory(project, force=True, marker="moefx.json") as tmp:
        _write(tmp)
    assert sorted(p.name for p in project.iterdir()) == ["a.txt", "b.txt"]


def test_output_gets_the_usual_permissions(tmp_path):
    import os
    import stat

    with atomic_directory(tmp_path / "out") as tmp:
        _write(tmp)
        os.chmod(tmp / "a.txt", 0o600)  # as safetensors creates its files
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    for name in ("a.txt", "b.txt"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask
