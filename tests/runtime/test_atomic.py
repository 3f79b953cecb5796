"""atomic_directory: a target is fully written or not changed, whatever stops the writer."""

from __future__ import annotations

import pytest

from moefx.atomic import atomic_directory


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
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, force=True) as tmp:
        _write(tmp)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "new", "b.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


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
