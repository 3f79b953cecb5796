"""Forward+backward time of one MoE layer: moefx against transformers' Mixtral block and a dense limit.

For each shape, on the same input and the same expert and router weights, it times one training
step (forward, then ``out.backward(grad)`` with a fixed random ``grad``) of:

  moefx          ``moefx.MoE`` (top-k gate over a softmax, renormalised, dropless): the fused
                 ops, gather in the first grouped linear and combine in the second
  moefx_permuted the same layer on its permuted path (permute, grouped linear, unpermute),
                 which expert parallelism runs
  moefx_ref      on CUDA, the same layer with the Triton kernels switched off: the ops' default
                 PyTorch implementations, one GEMM per expert (on CPU that is moefx itself)
  hf_eager       transformers' ``MixtralSparseMoeBlock`` with ``experts_implementation="eager"``
  hf_grouped_mm  the same block with ``experts_implementation="grouped_mm"``
  dense          a SwiGLU FFN of hidden size top_k * d_hidden: the same active FLOPs with no
                 routing, the limit an MoE layer can reach

Before timing, every implementation's output and input gradient are compared with those of the
plainest one that ran (``moefx_ref``, else ``moefx``, else ``hf_eager``): the relative error
``‖a − b‖ / ‖b‖`` is in the table, and one over the dtype's tolerance is reported as a MISMATCH
(exit status 1), so a fast but wrong kernel cannot pass unseen. Steps are interleaved
round-robin over the implementations so that drift on a shared machine hits all of them alike.
It reports the median step time, ``dense/impl`` (1.0 = as fast as the dense limit, higher is
better), moefx's speedup over each transformers implementation and, on CUDA, each step's peak
memory above what was allocated before it.

Run it as ``moefx bench`` (or ``python benchmarks/bench_layer.py``, the same code):

    moefx bench                                           # S1 and S2
    moefx bench --shapes S2 --repeats 15 --json /tmp/bench.json
    moefx bench --tokens 8192 --experts 16 --top-k 4      # a custom shape
    moefx bench --shapes S2 --processes 5                 # 5 fresh processes, and their median

Record the results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

import moefx
from moefx.kernels.cuda.registration import default_kernels


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d: int
    h: int
    experts: int
    top_k: int

    def describe(self) -> str:
        return f"T={self.tokens} d={self.d} h={self.h} E={self.experts} k={self.top_k}"


SHAPES = {
    "S1": Shape("S1", tokens=4096, d=512, h=1024, experts=8, top_k=2),
    "S2": Shape("S2", tokens=4096, d=512, h=128, experts=64, top_k=8),  # fine-grained experts
    # The GPU issue's shapes (bf16 on a GPU; far too slow for a 2-core CPU).
    "mixtral": Shape("mixtral", tokens=16384, d=4096, h=14336, experts=8, top_k=2),
    "deepseek": Shape("deepseek", tokens=16384, d=7168, h=2048, experts=64, top_k=8),
}
DEFAULT_SHAPES = ("S1", "S2")
IMPLS = ("moefx", "moefx_permuted", "moefx_ref", "hf_eager", "hf_grouped_mm", "dense")
MOEFX_VARIANTS = ("moefx_permuted", "moefx_ref")  # share moefx's module
HF_IMPLS = ("hf_eager", "hf_grouped_mm")
# The layer's targets: dense/moefx at least this (on CPU per shape, on CUDA for every shape), and
# moefx faster than every transformers impl.
CPU_RATIO_TARGETS = {"S1": 0.9, "S2": 0.75}
CUDA_RATIO_TARGET = 0.8
# The impl the others' outputs are checked against: the plainest one that ran.
CHECK_REFERENCES = ("moefx_ref", "moefx", "hf_eager")
# Largest relative error (output or input gradient) that counts as agreeing, per dtype: 16-bit
# rounding, plus a few tokens whose near-tied top-k choice may flip between implementations.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # the --dtype choices


class SkipImpl(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass
class Result:
    shape: str
    impl: str
    times_ms: list[float] = field(default_factory=list)  # forward + backward
    forward_ms: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    skipped: str | None = None
    note: str = ""
    checked_against: str | None = None  # the impl whose output and input gradient these are compared with
    out_err: float | None = None  # ‖out − out_ref‖ / ‖out_ref‖
    dx_err: float | None = None  # the same for the input gradient

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def median_forward_ms(self) -> float | None:
        return statistics.median(self.forward_ms) if self.forward_ms else None

    @property
    def median_peak_mib(self) -> float | None:
        return statistics.median(self.peak_mib) if self.peak_mib else None


# ----------------------------------------------------------------------------- implementations


class DenseSwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused in one linear."""

    def __init__(self, d: int, hidden: int, *, device, dtype) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.down = nn.Linear(hidden, d, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


def build_moefx(shape: Shape, device, dtype) -> nn.Module:
    return moefx.MoE(
        d_model=shape.d, d_hidden=shape.h, num_experts=shape.experts, top_k=shape.top_k,
        activation="silu", gated=True, bias=False, device=device, dtype=dtype,
    ).train()


def build_mixtral(shape: Shape, experts_impl: str, weights_from: nn.Module, device, dtype) -> nn.Module:
    """A Mixtral sparse MoE block with moefx's weights (same layout: gate rows, then up rows)."""
    try:
        from transformers import MixtralConfig
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        raise SkipImpl(f"transformers' Mixtral block is not importable ({e})") from e
    if experts_impl != "eager" and experts_impl not in ALL_EXPERTS_FUNCTIONS:
        raise SkipImpl(f"this transformers has no experts implementation {experts_impl!r}")
    # The experts read config._experts_implementation at each forward (integrations/moe.py,
    # @use_experts_implementation); the config's experts_implementation keyword sets it.
    config = MixtralConfig(
        hidden_size=shape.d, intermediate_size=shape.h, num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k, hidden_act="silu", router_jitter_noise=0.0,
        experts_implementation=experts_impl,
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(weights_from.router.weight)
        block.experts.gate_up_proj.copy_(weights_from.experts.in_proj)
        block.experts.down_proj.copy_(weights_from.experts.out_proj)
    return block.to(device=device, dtype=dtype).train()


def grouped_mm_note(block: nn.Module, x: Tensor) -> str:
    """Whether transformers' grouped_mm runs torch's grouped_mm kernel or its own per-expert loop."""
    weight = block.experts.down_proj.transpose(-2, -1)
    offsets = torch.zeros(weight.shape[0], dtype=torch.int32, device=x.device)
    try:  # a private helper: if it moves or changes, leave the note out
        from transformers.integrations.moe import _can_use_grouped_mm
        native = _can_use_grouped_mm(x, weight, offsets)
    except (ImportError, TypeError):
        return ""
    return "torch grouped_mm kernel" if native else "transformers' per-expert fallback loop"


def as_token_fn(module: nn.Module, impl: str, shape: Shape) -> Callable[[Tensor], Tensor]:
    """A function (tokens, d) -> (tokens, d); Mixtral takes (batch, seq, d) and may return a tuple."""
    if impl in ("moefx", *MOEFX_VARIANTS):
        def run_moefx(x_TD: Tensor) -> Tensor:
            module.fused_experts = impl != "moefx_permuted"
            return module(x_TD)

        return run_moefx
    if impl not in HF_IMPLS:
        return module

    def run(x_TD: Tensor) -> Tensor:
        out = module(x_TD.view(1, shape.tokens, shape.d))
        if isinstance(out, tuple):  # older blocks return (hidden, router_logits)
            out = out[0]
        return out.reshape(shape.tokens, shape.d)

    return run


def build_impls(shape: Shape, names: list[str], device, dtype) -> tuple[dict, list[Result]]:
    """The runnable implementations by name, and a skipped Result for each one that cannot run."""
    reference = build_moefx(shape, device, dtype)
    modules, skipped = {}, []
    for name in names:
        try:
            if name == "moefx_ref" and device.type != "cuda":
                raise SkipImpl("on CPU the default ops are moefx's kernels: the moefx row")
            if name in ("moefx", *MOEFX_VARIANTS):
                module = reference
            elif name == "dense":
                module = DenseSwiGLU(shape.d, shape.top_k * shape.h, device=device, dtype=dtype).train()
            else:
                module = build_mixtral(shape, name.removeprefix("hf_"), reference, device, dtype)
            modules[name] = module
        except SkipImpl as e:
            skipped.append(Result(shape.name, name, skipped=str(e)))
    return modules, skipped


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels_for(impl: str):
    """The context a step of ``impl`` runs in: moefx_ref switches the Triton kernels off."""
    return default_kernels() if impl == "moefx_ref" else contextlib.nullcontext()


def step(fn: Callable[[Tensor], Tensor], params: list[nn.Parameter], x: Tensor, grad: Tensor, device=None,
         impl: str = "") -> tuple[float, Tensor]:
    """One forward + backward; returns the forward's seconds (synchronised when ``device`` is given)
    and the output (the input gradient is left in ``x.grad``)."""
    for p in params:
        p.grad = None
    x.grad = None
    with kernels_for(impl):
        start = time.perf_counter()
        out = fn(x)
        if device is not None:
            sync(device)
        forward = time.perf_counter() - start
        out.backward(grad)
    return forward, out.detach()


def timed_step(fn, params, x, grad, device, impl: str = "") -> tuple[float, float, float | None]:
    """Milliseconds of one step and of its forward and, on CUDA, the step's peak MiB above what
    was allocated before it."""
    peak = None
    if device.type == "cuda":
        # Every impl's weights stay resident, so the step's own peak is measured above the baseline.
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    sync(device)
    start = time.perf_counter()
    forward, _ = step(fn, params, x, grad, device, impl)
    sync(device)
    ms = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return ms, forward * 1e3, peak


def bench_shape(shape: Shape, names: list[str], args, device: torch.device, dtype: torch.dtype) -> list[Result]:
    torch.manual_seed(args.seed)
    x = torch.randn(shape.tokens, shape.d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape.tokens, shape.d, device=device, dtype=dtype)
    modules, skipped = build_impls(shape, names, device, dtype)

    runners, results = {}, {}
    for name, module in modules.items():
        fn, params = as_token_fn(module, name, shape), list(module.parameters())
        result = Result(shape.name, name)
        try:
            for _ in range(args.warmup):  # also the availability probe: a failure here skips the impl
                step(fn, params, x, grad, impl=name)
            sync(device)
        except Exception as e:  # noqa: BLE001  (any failure of a third-party impl is a skip, not a crash)
            first_line = next(iter(str(e).splitlines()), "")[:120]
            skipped.append(Result(shape.name, name, skipped=f"{type(e).__name__}: {first_line}"))
            continue
        if name == "hf_grouped_mm":
            result.note = grouped_mm_note(module, x)
        runners[name], results[name] = (fn, params), result
    check_outputs(runners, results, x, grad)

    for _ in range(args.repeats):
        for name, (fn, params) in runners.items():
            ms, forward_ms, peak = timed_step(fn, params, x, grad, device, name)
            results[name].times_ms.append(ms)
            results[name].forward_ms.append(forward_ms)
            if peak is not None:
                results[name].peak_mib.append(peak)

    by_name = {r.impl: r for r in [*results.values(), *skipped]}
    return [by_name[name] for name in names]


def check_outputs(runners: dict, results: dict[str, Result], x: Tensor, grad: Tensor) -> None:
    """Each impl's output and input gradient against the plainest impl that ran (dense computes
    another function and is left out); the errors go into ``results``."""
    reference = next((name for name in CHECK_REFERENCES if name in runners), None)
    if reference is None:
        return
    _, want_out = step(*runners[reference], x, grad, impl=reference)
    want_dx = x.grad.detach().clone()
    for name, (fn, params) in runners.items():
        if name in (reference, "dense"):
            continue
        _, out = step(fn, params, x, grad, impl=name)
        result = results[name]
        result.checked_against = reference
        result.out_err, result.dx_err = relative_error(out, want_out), relative_error(x.grad, want_dx)


def relative_error(got: Tensor, want: Tensor) -> float:
    """‖got − want‖ / ‖want‖ in fp32 (inf where ``got`` has a NaN or an inf)."""
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


# ----------------------------------------------------------------------------- report


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


def mismatches(results: list[Result], dtype: torch.dtype) -> list[str]:
    """A line for each impl whose output or input gradient is off its reference by more than the tolerance."""
    tolerance = TOLERANCE[dtype]
    return [
        f"{r.shape} {r.impl}: MISMATCH against {r.checked_against}: relative error {r.out_err:.2e} in the output, "
        f"{r.dx_err:.2e} in the input gradient (tolerance {tolerance:g} for {str(dtype).removeprefix('torch.')})"
        for r in results
        if r.out_err is not None and not (r.out_err <= tolerance and r.dx_err <= tolerance)
    ]


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


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
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
        from moefx.cli import bench_processes

        bench_processes.main(argv, args.processes, args.json)
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


if __name__ == "__main__":
    sys.exit(main())
