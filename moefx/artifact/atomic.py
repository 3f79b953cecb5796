"""Write a directory all at once: fully there, or not changed at all.

Files go to a hidden temporary directory next to the target, which is renamed into place only
when everything has been written. A failure or Ctrl-C removes the temporary directory; an
existing empty directory is replaced by one rename (as if it were absent), any other existing
target (with ``force``) by two renames, and put back if the second fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_existing(target: Path, force: bool, marker: str | None = None) -> None:
    """Raise ``FileExistsError`` unless ``target`` may be written: absent, an empty directory, or
    ``force`` and replaceable. With a ``marker`` file name, only a directory holding that file is
    replaceable, so a mistyped target (``-o .``) is never wiped. A target, or a parent of it, that
    is a file is refused whatever ``force``."""
    _refuse_files(target)
    if not (target.exists() or target.is_symlink()) or _is_empty_directory(target):
        return
    if marker is not None and not (target.is_dir() and (target / marker).is_file()):
        # Named before --force: suggesting a flag that would then refuse sends the user in a circle.
        raise FileExistsError(
            f"{target} already exists and is not an output of this kind (no {marker} in it): choose another output "
            "directory (--force replaces only an earlier output)"
        )
    if not force:
        raise FileExistsError(f"{target} already exists: choose another output directory, or pass --force (force=True) to replace it")


def _refuse_files(target: Path) -> None:
    """A file where the directory or one of its parents should be: no ``force`` can help."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a directory: choose another output directory (-o)")
    parent = next((p for p in target.parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise FileExistsError(
            f"{parent} is a file, not a directory, so {target} cannot be made in it: choose another output directory (-o)"
        )


def _is_empty_directory(path: Path) -> bool:
    """A real (not symlinked) empty directory, which rename(2) replaces atomically, like an absent one."""
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextmanager
def atomic_directory(target: str | Path, *, force: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yields an empty temporary directory; when the block ends without error it becomes ``target``
    (see ``refuse_existing`` for ``force`` and ``marker``)."""
    target = Path(target).absolute()
    refuse_existing(target, force, marker)
    created = [p for p in reversed(target.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should not be
        for file in tmp.rglob("*"):  # nor its files (safetensors creates them owner-only)
            if file.is_file() and not file.is_symlink():
                os.chmod(file, 0o666 & ~umask)
        _swap_in(tmp, target, force, marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # parents this call made, deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _swap_in(tmp: Path, target: Path, force: bool, marker: str | None) -> None:
    refuse_existing(target, force, marker)  # it may have appeared while we were writing
    if not (target.exists() or target.is_symlink()) or _is_empty_directory(target):
        os.rename(tmp, target)  # onto an empty directory too: rename(2) replaces it in one step
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()  # only its unique name is wanted
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    # The new output is in place: removing the old one is best effort, never a failed write.
    try:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup)
        else:
            backup.unlink()
    except OSError:
        pass
