"""The report: the table, moefx's targets per shape, and the JSON file."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict

import torch

import moefx
from moefx.cli.bench.cases import HF_IMPLS, Result, Shape

# The layer's targets: dense/moefx at least this (on CPU per shape, on CUDA for every shape), and
# moefx faster than every transformers impl.
CPU_RATIO_TARGETS = {"S1": 0.9, "S2": 0.75}
CUDA_RATIO_TARGET = 0.8


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result], device: torch.device) -> None:
    cuda = device.type == "cuda"
    header = (f"{'shape':<9}{'impl':<15}{'fwd ms':>9}{'bwd ms':>9}{'fwd+bwd':>10}{'dense/impl':>12}"
              + (f"{'peak MiB':>11}" if cuda else "") + f"{'err out/dx':>18}")
    print(header + "  note")
    print("-" * (len(header) + 30))
    for r in results:
        if r.skipped:
            print(f"{r.shape:<9}{r.impl:<15}  skipped: {r.skipped}")
            continue
        dense = next((d.median_ms for d in results if d.shape == r.shape and d.impl == "dense"), None)
        backward = statistics.median(t - f for t, f in zip(r.times_ms, r.forward_ms))
        row = (f"{r.shape:<9}{r.impl:<15}{fmt(r.median_forward_ms, '.1f'):>9}{fmt(backward, '.1f'):>9}"
               f"{fmt(r.median_ms, '.1f'):>10}{fmt(ratio(dense, r.median_ms), '.3f'):>12}")
        if cuda:
            row += f"{fmt(r.median_peak_mib, '.0f'):>11}"
        row += f"{error_cell(r, results):>18}"
        print(row + (f"  {r.note}" if r.note else ""))


def error_cell(r: Result, results: list[Result]) -> str:
    if r.out_err is not None:
        return f"{r.out_err:.1e}/{r.dx_err:.1e}"
    is_reference = any(o.shape == r.shape and o.checked_against == r.impl for o in results)
    return "(reference)" if is_reference else "-"


def print_targets(shape: Shape, results: list[Result], device: torch.device) -> None:
    times = {r.impl: r.median_ms for r in results if r.shape == shape.name and not r.skipped}
    moefx_ms = times.get("moefx")
    if moefx_ms is None:
        print(f"{shape.name}: moefx did not run, no targets to check")
        return
    speedups = {hf: ratio(times.get(hf), moefx_ms) for hf in HF_IMPLS}
    print(target_checks(shape.name, ratio(times.get("dense"), moefx_ms), speedups, device.type))


def target_checks(shape: str, dense_ratio: float | None, speedups: dict[str, float | None], device_type: str) -> str:
    """One line: moefx's speedup over each transformers impl and its dense/moefx against the target
    (on CPU the shape's, on CUDA the same for every shape)."""
    checks = [
        f"{speedup:.3f}x vs {hf} [{'met' if speedup > 1 else 'MISSED'}]"
        for hf, speedup in speedups.items() if speedup is not None
    ]
    target = CUDA_RATIO_TARGET if device_type == "cuda" else CPU_RATIO_TARGETS.get(shape)
    if target is not None and dense_ratio is not None:
        where = "" if device_type in ("cpu", "cuda") else " (a CPU target; this run is on " + device_type + ")"
        verdict = "met" if dense_ratio >= target else "MISSED"
        checks.append(f"dense/moefx {dense_ratio:.3f} >= {target} [{verdict}]{where}")
    elif dense_ratio is not None:
        checks.append(f"dense/moefx {dense_ratio:.3f} (no target for this shape)")
    return f"{shape} moefx targets: " + ("; ".join(checks) or "nothing to compare against")


def write_json(path: str, results: list[Result], shapes: list[Shape], args, device, dtype) -> None:
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    rows = []
    for r in results:
        dense = next((d.median_ms for d in results if d.shape == r.shape and d.impl == "dense"), None)
        moefx_ms = next((m.median_ms for m in results if m.shape == r.shape and m.impl == "moefx"), None)
        rows.append({
            **asdict(r), "median_ms": r.median_ms, "median_peak_mib": r.median_peak_mib,
            "dense_over_impl": ratio(dense, r.median_ms), "moefx_speedup": ratio(r.median_ms, moefx_ms),
        })
    meta = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
        "warmup": args.warmup, "seed": args.seed, "torch": torch.__version__, "transformers": hf_version,
        "moefx": moefx.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "shapes": [asdict(s) for s in shapes], "results": rows}, f, indent=2)
