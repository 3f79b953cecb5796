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


def refuse_existing(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists: choose another output directory, or pass --force (force=True) to replace it")


@contextmanager
def atomic_directory(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory; when the block ends without error it becomes ``target``."""
    target = Path(target).absolute()
    refuse_existing(target, force)
    created = [p for p in reversed(target.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _swap_in(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):  # parents this call made, deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _swap_in(tmp: Path, target: Path, force: bool) -> None:
    refuse_existing(target, force)  # it may have appeared while we were writing
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
    if backup.is_dir():
        shutil.rmtree(backup)
    else:
        backup.unlink()
