"""A real-text corpus available offline: the documentation shipped with the installed Python
packages, read as bytes (English prose and markdown; no download).

Files are deduplicated by content and split by a hash of it, about 10% held out, so the split
does not depend on where packages are installed.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

DOC_PATTERNS = ("*.md", "*.rst", "LICENSE*", "COPYING*")
WITH_METADATA = DOC_PATTERNS + ("METADATA",)  # + the packages' long descriptions: about 2.5x the bytes


def documentation_bytes(patterns: tuple[str, ...] = DOC_PATTERNS) -> tuple[bytes, bytes]:
    """(train, held-out) bytes of the files matching ``patterns`` (over 1 KiB each)."""
    root = Path(sysconfig.get_paths()["purelib"])
    texts = {}
    for pattern in patterns:
        for path in root.rglob(pattern):
            if path.is_file() and path.stat().st_size > 1024:
                data = path.read_bytes()
                texts[hashlib.sha1(data).hexdigest()] = data
    ordered = [texts[k] for k in sorted(texts)]
    cut = len(ordered) * 9 // 10
    return b"\n".join(ordered[:cut]), b"\n".join(ordered[cut:])
