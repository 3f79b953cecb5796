"""``moefx bench``: the arguments, and the run over the chosen shapes."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch

from moefx.cli.bench.cases import DEFAULT_SHAPES, IMPLS, SHAPES, Shape
from moefx.cli.bench.checks import mismatches
from moefx.cli.bench.report import print_table, print_targets, write_json
from moefx.cli.bench.runner import bench_shape


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    from moefx.cli import bench  # the package's docstring describes the benchmark

    p = argparse.ArgumentParser(prog=prog, description=bench.__doc__.split("\n\n")[0])
    shapes_help = "; ".join(f"{s.name}: {s.describe()}" for s in SHAPES.values())
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(DEFAULT_SHAPES),
                   help=f"default: {' '.join(DEFAULT_SHAPES)}. " + shapes_help)
    custom = p.add_argument_group("custom shape (any of these runs one shape 'custom'; the rest default to S1)")
    custom.add_argument("--tokens", type=int)
    custom.add_argument("--d", type=int)
    custom.add_argument("--h", type=int)
    custom.add_argument("--experts", type=int)
    custom.add_argument("--top-k", type=int)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="default: all")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per impl (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per impl first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run the whole benchmark in N fresh processes, one after another, and report the "
                        "median over them as well as each one (a shared machine varies from process to process)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.processes < 1:
        p.error("--repeats and --processes must be >= 1 and --warmup >= 0")
    for name in ("tokens", "d", "h", "experts", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value} must be >= 1 (leave it out for S1's value)")
    custom = chosen_shapes(args)[0] if args.top_k is not None or args.experts is not None else None
    if custom is not None and custom.top_k > custom.experts:
        p.error(f"--top-k {custom.top_k} must be at most the number of experts ({custom.experts})")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    return args


def chosen_shapes(args) -> list[Shape]:
    overrides = {k: getattr(args, k) for k in ("tokens", "d", "h", "experts", "top_k") if getattr(args, k) is not None}
    if not overrides:
        return [SHAPES[name] for name in args.shapes]
    base = asdict(SHAPES["S1"]) | overrides | {"name": "custom"}
    return [Shape(**base)]


def main(argv=None, prog: str | None = None) -> int:
    """Runs the benchmark; the exit status is 1 when an impl's output disagrees with its reference."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    if args.processes > 1:
        from moefx.cli.bench import processes

        processes.main(argv, args.processes, args.json)
        return 0
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = chosen_shapes(args)
    impls = [name for name in IMPLS if name in args.impls]
    print(f"device={device} dtype={str(dtype).removeprefix('torch.')} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} warmup={args.warmup} torch={torch.__version__}")
    for shape in shapes:
        print(f"{shape.name}: {shape.describe()}")
    print()

    results = []
    for shape in shapes:
        results += bench_shape(shape, impls, args, device, dtype)
    print_table(results, device)
    print()
    for shape in shapes:
        print_targets(shape, results, device)
    wrong = mismatches(results, dtype)
    for line in wrong:
        print(line)
    if args.json:
        write_json(args.json, results, shapes, args, device, dtype)
        print(f"\nwrote {args.json}")
    return 1 if wrong else 0
