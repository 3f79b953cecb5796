"""``moefx bench --processes N``: the layer benchmark in N fresh processes, one after another.

On a shared machine a whole process can run 10-25% slower or faster than the next one (where its
memory landed, what the neighbours on the host do), and interleaving the implementations step
by step within one process does not remove that. So each child runs the ordinary benchmark with
``--json``, and this reports per shape and implementation every process's median and
``dense/impl`` (both measured within that process) and their medians over the processes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from moefx.cli.bench.cases import HF_IMPLS
from moefx.cli.bench.report import fmt, ratio, target_checks


def child_argv(argv: list[str], json_path: str) -> list[str]:
    """``argv`` without ``--processes`` and ``--json`` (and their values), writing to ``json_path``
    in one process: the trailing options win over any abbreviation argparse accepted (``--proc 3``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--processes", "--json"):
            skip = True
            continue
        if arg.startswith(("--processes=", "--json=")):
            continue
        out.append(arg)
    return [*out, "--json", json_path, "--processes", "1"]


def run_children(argv: list[str], processes: int) -> list[dict]:
    """Each child's JSON report, in order; a child that fails stops the run with its output."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="moefx-bench-") as tmp:
        for i in range(processes):
            path = os.path.join(tmp, f"run{i}.json")
            cmd = [sys.executable, "-m", "moefx.cli.bench", *child_argv(argv, path)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"benchmark process {i + 1}/{processes} failed:\n{done.stdout}{done.stderr}")
            targets = [line for line in done.stdout.splitlines() if " moefx targets: " in line]
            print(f"process {i + 1}/{processes}: " + (" | ".join(targets) or "done"), flush=True)
            with open(path) as f:
                runs.append(json.load(f))
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """Per (shape, impl), in the children's order: each process's median ms and dense/impl, and
    the medians of both over the processes (an impl skipped in some process counts where it ran)."""
    rows: dict[tuple[str, str], dict] = {}
    for run in runs:
        for r in run["results"]:
            row = rows.setdefault((r["shape"], r["impl"]), {
                "shape": r["shape"], "impl": r["impl"], "ms": [], "dense_over_impl": [], "skipped": r["skipped"],
            })
            if r["median_ms"] is not None:
                row["ms"].append(r["median_ms"])
                row["dense_over_impl"].append(r["dense_over_impl"])
                row["skipped"] = None
    for row in rows.values():
        ratios = [x for x in row["dense_over_impl"] if x is not None]
        row["median_ms"] = statistics.median(row["ms"]) if row["ms"] else None
        row["median_dense_over_impl"] = statistics.median(ratios) if ratios else None
    return list(rows.values())


def speedups_by_shape(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per shape, moefx's speedup over each transformers impl: the median over processes of the
    within-process ratio."""
    per: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        times = {(r["shape"], r["impl"]): r["median_ms"] for r in run["results"]}
        for (shape, impl), ms in times.items():
            speedup = ratio(ms, times.get((shape, "moefx"))) if impl in HF_IMPLS else None
            if speedup is not None:
                per.setdefault(shape, {}).setdefault(impl, []).append(speedup)
    return {shape: {hf: statistics.median(v) for hf, v in hfs.items()} for shape, hfs in per.items()}


def print_summary(summary: list[dict], runs: list[dict]) -> None:
    n = len(runs)
    print(f"\nmedian over {n} processes (each process's own dense/impl in brackets)")
    print(f"{'shape':<9}{'impl':<15}{'fwd+bwd ms':>11}{'dense/impl':>12}  per process")
    for row in summary:
        if row["median_ms"] is None:
            print(f"{row['shape']:<9}{row['impl']:<15}  skipped: {row['skipped']}")
            continue
        each = " ".join(fmt(x, ".3f") for x in row["dense_over_impl"])
        print(f"{row['shape']:<9}{row['impl']:<15}{row['median_ms']:>11.1f}"
              f"{fmt(row['median_dense_over_impl'], '.3f'):>12}  [{each}]")
    print()
    device_type = runs[0]["meta"]["device"].split(":")[0]
    speedups = speedups_by_shape(runs)
    for shape in dict.fromkeys(row["shape"] for row in summary):
        moefx_row = next((r for r in summary if r["shape"] == shape and r["impl"] == "moefx"), None)
        dense_ratio = moefx_row["median_dense_over_impl"] if moefx_row else None
        print(target_checks(shape, dense_ratio, speedups.get(shape, {}), device_type) + f" (median of {n})")


def main(argv: list[str], processes: int, json_path: str | None) -> None:
    runs = run_children(argv, processes)
    summary = summarize(runs)
    print_summary(summary, runs)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"processes": runs, "summary": summary}, f, indent=2)
        print(f"\nwrote {json_path}")
