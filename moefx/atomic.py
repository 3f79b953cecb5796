"""Write a directory all at once: fully there, or not changed at all.

Files go to a hidden temporary directory next to the target, which is renamed into place only
when everything has been written. A failure or Ctrl-C removes the temporary directory; an
existing target is replaced (with ``force``) by two renames, and put back if the second fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def refuse_existing(target: Path, force: bool, marker: str | None = None) -> None:
    """Raise unless ``target`` may be written: absent, or ``force`` and replaceable. With a
    ``marker`` file name, only an empty directory or one holding that file is replaceable, so a
    mistyped target (``-o .``) is never wiped."""
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{target} already exists: choose another output directory, or pass --force (force=True) to replace it")
    if marker is not None and not (target.is_dir() and (not any(target.iterdir()) or (target / marker).is_file())):
        raise FileExistsError(
            f"{target} exists and is not an output of this kind (no {marker} in it): refusing to replace it even with "
            "--force; choose another output directory"
        )


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
    if not target.exists():
        os.rename(tmp, target)
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
