"""plan: which of the found FFNs convert (``include``/``exclude`` globs over paths, ``every=n``).

    matches: [layers.0.mlp, layers.1.mlp, layers.2.mlp, layers.3.mlp]
    plan(matches, exclude=["layers.0.*"], every=2)
      convert: [layers.2.mlp]          (of the three left, the 2nd, 4th, ...)
      skipped: layers.0.mlp (excluded by 'layers.0.*'), layers.1.mlp, layers.3.mlp (every=2)
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from moefx.passes.find_ffn import FFNMatch


@dataclass(frozen=True)
class Plan:
    convert: tuple[FFNMatch, ...]
    skipped: tuple[tuple[FFNMatch, str], ...]  # (match, why it does not convert)


def plan(matches, include=None, exclude=None, every: int = 1) -> Plan:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} is invalid: it must be an integer >= 1 (1 converts every FFN)")
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    chosen, skipped = [], []
    for m in matches:
        if include and not any(fnmatchcase(m.path, g) for g in include):
            skipped.append((m, f"not matched by include={include}"))
        elif any(fnmatchcase(m.path, g) for g in exclude):
            skipped.append((m, f"excluded by {next(g for g in exclude if fnmatchcase(m.path, g))!r}"))
        else:
            chosen.append(m)
    convert = []
    for i, m in enumerate(chosen):
        if (i + 1) % every == 0:
            convert.append(m)
        else:
            skipped.append((m, f"every={every} converts the {_ordinal(every)}, {_ordinal(2 * every)}, ... FFN only"))
    return Plan(tuple(convert), tuple(skipped))


def _globs(value, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    globs = list(value) if isinstance(value, (list, tuple, set, frozenset)) else None
    if globs is None or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{name}={value!r} must be a glob string or a list of them, e.g. 'layers.*.mlp'")
    return globs


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
