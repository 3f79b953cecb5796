"""One shape: build the impls, warm them up (a failure skips one), check their outputs, then time
their steps round-robin so that drift on a shared machine hits all of them alike."""

from __future__ import annotations

import torch

from moefx.cli.bench.cases import Result, Shape
from moefx.cli.bench.checks import check_outputs
from moefx.cli.bench.models import as_token_fn, build_impls, grouped_mm_note
from moefx.cli.bench.timing import step, sync, timed_step


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
        except Exception as e:
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
