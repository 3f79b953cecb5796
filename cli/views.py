"""Rich renderables for the ``moefx`` command: summary table, module tree, layer graph.

Colour is only decoration: every status is also a word, so plain output (not a terminal, or
``NO_COLOR`` set, which rich honours) reads the same.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.tree import Tree
from torch import nn

from moefx.cli.layer_graph import GraphStep
from moefx.layer.folded import Folded
from moefx.layer.moe import MoE
from moefx.passes.record import Conversion

_STATUS_STYLE = {"converted": "green", "adopted": "cyan", "skipped": "yellow", "rejected": "red"}


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
    status: str  # "converted", "adopted" (an existing MoE block), "skipped" (found, not chosen) or "rejected" (not an FFN)
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
        for path, record in (conversion.adopted or {}).items():  # existing MoE blocks, kept as they were
            config = record["config"]
            found[path] = Candidate(path, "adopted", detail=f"{config['num_experts']} experts, top-{config['top_k']}")
    return list(found.values())


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def module_tree(model: nn.Module, found: list[Candidate], *, full: bool = False) -> RenderableType:
    """The modules on the way to each candidate, each candidate marked; other modules counted.

    Three or more numbered siblings (``layers.0`` ... ``layers.23``) whose subtrees are the same
    (the same modules, statuses and reasons) are shown once, as ``0-23 (×24)``, unless ``full``;
    a line under the tree then says so."""
    by_path = {c.path: c for c in found}
    folded = [path for path, m in model.named_modules() if isinstance(m, Folded)]
    keep = {""}
    for path in [*by_path, *folded]:
        parts = path.split(".")
        keep.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    root = _build(model, "", _label("", model, by_path.get("")), keep, by_path)
    tree = Tree(root.label)
    if not _render(tree, root, full):
        return tree
    return Group(tree, "[dim](×N): N numbered modules with the same subtree (modules, statuses, reasons), shown "
                       "once; --full shows each[/]")


@dataclass
class _Node:
    path: str
    label: str
    children: list[_Node]
    hidden: int  # children not on the way to any candidate


def _build(module: nn.Module, path: str, label: str, keep: set[str], by_path: dict[str, Candidate]) -> _Node:
    node, hidden = _Node(path, label, [], 0), 0
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        if child_path not in keep:
            hidden += 1
            continue
        node.children.append(_build(child, child_path, _label(name, child, by_path.get(child_path)), keep, by_path))
    node.hidden = hidden
    return node


def _render(branch: Tree, node: _Node, full: bool) -> int:
    """Adds ``node``'s children to ``branch``; how many modules it left out as alike."""
    left_out = 0
    for group in [[child] for child in node.children] if full else _alike(node):
        first = group[0]
        if len(group) == 1:
            left_out += _render(branch.add(first.label), first, full)
            continue
        # One subtree stands for all: a path into the layer reads "<parent>.*.<rest>" in it.
        shown = _relabel(first, _path_pattern(first.path), f"{node.path}.*" if node.path else "*")
        name = first.path.rsplit(".", 1)[-1]
        numbers = _indices([int(c.path.rsplit(".", 1)[-1]) for c in group])
        label = f"{numbers} [bold magenta](×{len(group)})[/]{shown.label[len(name):]}"
        left_out += len(group) - 1 + _render(branch.add(label), shown, full)
    if node.hidden:
        branch.add(f"[dim]… {node.hidden} other module{'s' if node.hidden > 1 else ''}[/]")
    return left_out


MIN_ALIKE = 3  # fewer identical siblings are shown one by one: their real paths read better


def _alike(node: _Node) -> list[list[_Node]]:
    """The children in order, numbered ones with the same subtree grouped at the first of them."""
    groups: dict[object, list[_Node]] = {}
    for child in node.children:
        name = child.path.rsplit(".", 1)[-1]
        key = ("alike", _signature(child, _path_pattern(child.path))) if name.isdigit() else ("own", child.path)
        groups.setdefault(key, []).append(child)
    ordered = []
    for group in groups.values():
        ordered.extend([group] if len(group) >= MIN_ALIKE else [[child] for child in group])
    order = {id(child): i for i, child in enumerate(node.children)}
    return sorted(ordered, key=lambda group: order[id(group[0])])


def _path_pattern(path: str) -> re.Pattern:
    """``path`` where a label names a module inside it (``encoder.layer.0.intermediate``), not
    the same digits elsewhere (``top_k=2``)."""
    return re.compile(rf"(?<![\w.=]){re.escape(path)}(?=\.\w)")


def _signature(node: _Node, own: re.Pattern) -> tuple:
    """The subtree without its own name, and its own path written as ``*`` in labels."""
    label = own.sub("*", node.label.split(" ", 1)[1] if " " in node.label else "")
    return label, node.hidden, tuple((c.path.rsplit(".", 1)[-1], _signature(c, own)) for c in node.children)


def _relabel(node: _Node, own: re.Pattern, replacement: str) -> _Node:
    return _Node(node.path, own.sub(replacement, node.label), [_relabel(c, own, replacement) for c in node.children],
                 node.hidden)


def _indices(numbers: list[int], width: int = 48) -> str:
    """``0-23``; ``0-3, 8-11``; ``0, 2, …, 22`` (a constant step); a long irregular list cut."""
    numbers = sorted(numbers)
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    text = [str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs]
    if len(runs) > 3 and len({b - a for a, b in zip(numbers, numbers[1:])}) == 1:
        return f"{numbers[0]}, {numbers[1]}, …, {numbers[-1]}"
    shown = ", ".join(text)
    while len(shown) > width and len(text) > 2:
        text = text[:-2] + text[-1:]
        shown = ", ".join(text[:-1]) + ", …, " + text[-1]
    return shown


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


def graph_table(path: str, steps: list[GraphStep], *, layer: MoE | None = None, full: bool = False) -> Table:
    """One row per op, its outputs and what it reads named in the layer's terms; casts and
    reshapes that change no shape are left out unless ``full``."""
    about = "T tokens"
    if layer is not None:
        c = layer.config
        about = f"x (T, {c.d_model}) → out (T, {c.d_model}), T tokens, {c.num_experts} experts, top-{c.top_k}"
    table = Table(title=f"MoE layer {path}: one forward of {about}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("op", style="bold cyan")
    table.add_column("outputs")
    table.add_column("reads")
    shown = [step for step in steps if full or step.shown]
    for i, step in enumerate(shown, 1):
        style = "bold" if step.op.startswith("moefx::") else None if step.shown else "dim"
        names = step.outputs or (step.name,) * len(step.shapes)
        outputs = "\n".join(f"{_escape(name)} {shape}" for name, shape in zip(names, step.shapes))
        reads = ", ".join(_escape(name) for name in (step.reads or step.inputs))
        table.add_row(str(i), step.op, outputs, reads, style=style)
    return table


def inspect_summary(summary: dict) -> Table:
    """``moefx inspect``'s first table: what was looked at, with which options, what converted."""
    source, counts, params = summary["source"], summary["ffns"], summary["parameters"]
    rows = [("model", f"{summary['model']} from {_escape(source['description'])}")]
    if summary["options"] is not None:
        rows.append(("options", _escape(options_text(summary["options"], summary.get("router_calibration")))))
    rows.append(("FFNs", f"{counts['found']} found, {counts['converted']} converted"
                         + (f", {counts['skipped']} skipped" if counts["skipped"] else "")
                         + f"; {counts['rejected']} other candidates rejected"))
    if summary["moe_layers"]:
        rows.append(("parameters", f"{count_text(params['before'])} before → {count_text(params['after'])} after"))
        share = f" ({params['active_per_token'] / params['after']:.0%} of all)" if params["after"] else ""
        rows.append(("active per token", count_text(params["active_per_token"]) + share))
    else:
        rows.append(("parameters", count_text(params["before"]) + " (nothing converted)"))
    return summary_table("moefx inspect", rows)


def options_text(options: dict, calibration: str | None = None) -> str:
    """``8 experts, top-2, gate topk, init upcycle, dropless`` and what else was given."""
    parts = [f"{options['num_experts']} experts", f"top-{options['top_k']}", f"gate {options.get('gate', 'topk')}",
             f"init {options.get('init', 'upcycle')}"]
    capacity = options.get("capacity_factor")
    parts.append("dropless" if capacity is None else f"capacity factor {capacity}")
    if options.get("router_init"):
        parts.append(f"router init {options['router_init']}" + (f" ({calibration})" if calibration else ""))
    for key in ("include", "exclude"):
        if options.get(key):
            parts.append(f"{key} {' '.join(options[key])}")
    if options.get("every", 1) != 1:
        parts.append(f"every {options['every']}")
    for key in ("expert_groups", "topk_groups", "bias_update_rate"):
        if key in options:
            parts.append(f"{key.replace('_', ' ')} {options[key]}")
    return ", ".join(parts)


def count_text(n: int) -> str:
    """``30.48M (30,480,000)``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
