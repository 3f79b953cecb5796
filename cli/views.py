"""Rich renderables for the ``moefx`` command: summary table, module tree, layer graph.

Colour is only decoration: every status is also a word, so plain output (not a terminal, or
``NO_COLOR`` set, which rich honours) reads the same.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.tree import Tree
from torch import nn

from moefx.cli.layer_graph import GraphStep
from moefx.folded import Folded
from moefx.layer import MoE
from moefx.record import Conversion

_STATUS_STYLE = {"converted": "green", "skipped": "yellow", "rejected": "red"}


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    plain = bool(os.environ.get("NO_COLOR"))  # no styles at all, not just no colours
    # Off a terminal rich would wrap at 80 columns; module paths read better on one line.
    return Console(
        stderr=stderr, width=None if stream.isatty() else 160, highlight=False,
        color_system=None if plain else "auto",
    )


@dataclass(frozen=True)
class Candidate:
    path: str
    status: str  # "converted", "skipped" (found, not chosen) or "rejected" (not an FFN)
    reason: str = ""
    detail: str = ""  # "glu 128→256 (silu)"


def candidates(recorded: tuple[Conversion, ...]) -> list[Candidate]:
    """Every candidate of the conversions, its latest status winning (a later moefy may convert
    what an earlier one skipped)."""
    found: dict[str, Candidate] = {}
    for conversion in recorded:
        for path, reason in conversion.rejected:
            found.setdefault(path, Candidate(path, "rejected", reason))
        for path, reason in conversion.skipped:
            found[path] = Candidate(path, "skipped", reason)
        for c in conversion.converted:
            detail = f"{c.kind} {c.d_model}→{c.d_hidden} ({c.activation}, {c.placement})"
            found[c.path] = Candidate(c.path, "converted", detail=detail)
    return list(found.values())


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def module_tree(model: nn.Module, found: list[Candidate]) -> Tree:
    """The modules on the way to each candidate, each candidate marked; other modules counted."""
    by_path = {c.path: c for c in found}
    folded = [path for path, m in model.named_modules() if isinstance(m, Folded)]
    keep = {""}
    for path in [*by_path, *folded]:
        parts = path.split(".")
        keep.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    tree = Tree(_label("", model, by_path.get("")))
    _grow(tree, model, "", keep, by_path)
    return tree


def _grow(node: Tree, module: nn.Module, path: str, keep: set[str], by_path: dict[str, Candidate]) -> None:
    hidden = 0
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        if child_path not in keep:
            hidden += 1
            continue
        branch = node.add(_label(name, child, by_path.get(child_path)))
        _grow(branch, child, child_path, keep, by_path)
    if hidden:
        node.add(f"[dim]… {hidden} other module{'s' if hidden > 1 else ''}[/]")


def _label(name: str, module: nn.Module, candidate: Candidate | None) -> str:
    kind = type(module).__name__
    if isinstance(module, MoE):
        c = module.config
        kind = f"MoE(experts={c.num_experts}, top_k={c.top_k}, d_hidden={c.d_hidden}, gate={c.gate})"
    elif isinstance(module, Folded):
        kind = f"Folded (computed by {module.into})"
    label = f"{name or '(model)'} [dim]{kind}[/]"
    if candidate is not None:
        style = _STATUS_STYLE[candidate.status]
        note = candidate.detail or candidate.reason
        label += f"  [{style}]{candidate.status}[/]" + (f": {_escape(note)}" if note else "")
    return label


def graph_table(path: str, steps: list[GraphStep]) -> Table:
    table = Table(title=f"MoE layer {path}: one forward, T tokens", title_justify="left")
    for column in ("#", "node", "op", "output shapes", "reads"):
        table.add_column(column, style="bold cyan" if column == "op" else None)
    for i, step in enumerate(steps, 1):
        style = "bold" if step.op.startswith("moefx::") else None
        table.add_row(str(i), step.name, step.op, " ".join(step.shapes), ", ".join(step.inputs), style=style)
    return table


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
