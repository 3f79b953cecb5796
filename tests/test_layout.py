"""The house rules of docs/ARCHITECTURE.md, checked over the source: the layering of the packages
(kernels <- layer <- init <- passes <- {artifact, parallel, offloading, exporting, training} <- moefx <- cli)
and the size of a source file."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> installed package (pyproject.toml's package-dir).
FOLDERS = {"moefx": "moefx", "passes": "moefx.passes", "kernels": "moefx.kernels", "cli": "moefx.cli"}
LEVELS = [  # lowest first: a module may import from its own level and the ones before it
    ("kernels", ("moefx.kernels", "moefx.toplevel_names", "moefx.version")),
    ("layer", ("moefx.layer", "moefx.model")),
    ("init", ("moefx.init",)),
    ("passes", ("moefx.passes",)),
    ("uses of a converted model", ("moefx.artifact", "moefx.parallel", "moefx.offloading", "moefx.exporting",
                                   "moefx.training")),
    ("public API", ("moefx",)),
    ("cli", ("moefx.cli", "moefx.__main__")),
]
# (importer, imported): upward imports that are allowed, each with its reason.
ALLOWED_UPWARD = {
    # MoE.from_ffn is the README's entry to moefx.init; it imports it inside the method.
    ("moefx.layer.moe", "moefx.init.from_ffn"),
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if folder == "moefx" and len(parts) and parts[0] in ("passes", "kernels", "cli"):
                continue  # not a real folder of moefx/
            modules[name] = path
    return modules


def _level(module: str) -> int:
    best = None  # the longest matching prefix decides (moefx.layer before moefx)
    for index, (_, prefixes) in enumerate(LEVELS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    assert best is not None, f"{module} belongs to no level: add it to LEVELS"
    return best[1]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every moefx module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from moefx.x import y`: y may be a module of its own
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m == "moefx" or m.startswith("moefx.")}


def test_packages_import_only_their_own_level_and_below():
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        for imported in sorted(_imports(name, path, modules)):
            if imported == name or (name, imported) in ALLOWED_UPWARD:
                continue
            if _level(imported) > _level(name):
                upward.append(f"{name} ({LEVELS[_level(name)][0]}) imports {imported} ({LEVELS[_level(imported)][0]})")
    assert not upward, "imports against the layering of docs/ARCHITECTURE.md:\n" + "\n".join(upward)


def test_the_layering_check_sees_an_upward_import(tmp_path):
    # The check above must be able to fail: a kernel importing the layer is caught.
    fake = tmp_path / "bad.py"
    fake.write_text("from moefx.layer.moe import MoE\n")
    modules = {"moefx.kernels.bad": fake, "moefx.layer.moe": fake}
    (imported,) = _imports("moefx.kernels.bad", fake, modules)
    assert _level(imported) > _level("moefx.kernels.bad")


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_no_source_file_is_over_the_limit(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines (split them by job): {long}"


def test_every_relative_link_of_the_docs_stays_in_the_repository():
    # A clone must stand on its own: no link into a sibling folder the clone does not have.
    broken = []
    for doc in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            resolved = (doc.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, f"links that leave the repository or lead nowhere: {broken}"
