"""Offloaded inference (``moefx.offload``): tokens per second and peak memory against the fully
resident model, at expert budgets of 1/8, 1/4 and 1/2, with and without prefetch.

    python benchmarks/bench_offload.py [--dir /tmp/moefx-offload-bench] [--device cpu|cuda]
    python benchmarks/bench_offload.py --adopted-mixtral [--repeats 3]

``--adopted-mixtral``: a transformers Mixtral (random weights; d 512, experts of h 1792, 8 experts,
top-2, 4 layers by default) adopted by ``moefx.moefy`` instead of a converted Llama; each
configuration runs in ``--repeats`` fresh processes and the table gives medians (and the spread),
with the cache's hits, prefetch hits and misses per generated token.

It converts a Llama-shaped model (random weights) whose expert weights dwarf the rest and saves
it to ``--dir`` once. Each configuration then runs in a fresh process, so peak memory is its
own: on the CPU the experts stay in the saved file (``storage="disk"``) and the peak is the
process's resident set above what it held once the model's structure was built; on a GPU they
stay in pinned host memory (``storage="cpu"``) and the peak is the GPU's allocated memory.
Two workloads: a batch forward (prefill) and greedy token-by-token generation with the KV cache.
The limit printed beside each offloaded run: the expert bytes it moved per generated token over
the measured copy bandwidth (file to memory, or host to GPU), plus the resident model's time per
token.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

VOCAB = 2048
BUDGETS = (1 / 8, 1 / 4, 1 / 2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/moefx-offload-bench"), help="where the converted model is saved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=2048, help="hidden size of each expert")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences in the batch forward")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence in the batch forward")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated (batch of 1)")
    p.add_argument("--adopted-mixtral", action="store_true", help="an adopted transformers Mixtral (see above)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration (medians)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.adopted_mixtral and args.worker is None:  # its own sizes and directory unless given
        given = set(sys.argv)
        for flag, name, value in (("--h", "h", 1792), ("--experts", "experts", 8)):
            if flag not in given:
                setattr(args, name, value)
        if "--dir" not in given:
            args.dir = Path("/tmp/moefx-offload-bench-mixtral")
    return args


def mixtral(args):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=args.d, intermediate_size=args.h, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k, use_cache=False, tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config).eval()


def build(args):
    return mixtral(args) if args.adopted_mixtral else llama(args)


def llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.d, intermediate_size=args.h, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, use_cache=False,  # generate() turns the cache on
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def prepare(args) -> None:
    import moefx

    if (args.dir / "moefx.json").is_file():
        return
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 16))
    if args.adopted_mixtral:
        model = mixtral(args)
        with torch.no_grad():  # transformers starts routers at 0: random ones spread the tokens over the experts
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0.0, args.d ** -0.5)
        moefx.moefy(model, example_inputs=(ids,))  # adopts every block: same experts, same routing
        moefx.save(model, args.dir, force=True)
        return
    model = llama(args)
    # init="random" with a random router: experts differ, so routing spreads over them
    moefx.moefy(model, num_experts=args.experts, top_k=args.top_k, init="random", example_inputs=(ids,))
    moefx.save(model, args.dir, force=True)


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def copy_bandwidth(device: torch.device, file: Path) -> float:
    """Bytes per second of the copy offloading relies on: file reads (CPU) or pinned host to GPU."""
    size = 256 << 20
    if device.type == "cuda":
        src, dst = torch.empty(size, dtype=torch.uint8).pin_memory(), torch.empty(size, dtype=torch.uint8, device=device)
        dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return 5 * size / (time.perf_counter() - start)
    buffer = memoryview(bytearray(min(size, file.stat().st_size)))
    fd = os.open(file, os.O_RDONLY)
    try:
        os.preadv(fd, [buffer], 0)
        start = time.perf_counter()
        for _ in range(3):
            os.preadv(fd, [buffer], 0)
        return 3 * len(buffer) / (time.perf_counter() - start)
    finally:
        os.close(fd)


def worker(args, config: dict) -> dict:
    import moefx
    from moefx.offloading.store import ExpertLayout, stacked_expert_tensors

    device = torch.device(args.device)
    with torch.device("meta"):
        dense = build(args)
    gpu = device.type == "cuda"
    model = moefx.load(args.dir, dense, weights=False)  # the converted structure, every tensor on meta
    gc.collect()
    baseline = rss_bytes("VmRSS")
    reset_peak_rss()
    if gpu or config["budget"] is None:  # resident, or on a GPU the experts' host copy
        moefx.load(args.dir, model)
    layers = list(moefx.moe_layers(model))
    expert_bytes = sum(ExpertLayout.of(stacked_expert_tensors(layer.experts)).nbytes * layer.config.num_experts
                       for _, layer in layers)
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    result = {"expert_bytes": expert_bytes, "other_bytes": tensor_bytes - expert_bytes, "baseline_rss": baseline}
    if config["budget"] is None:
        model.to(device)
    else:
        budget = int(config["budget"] * expert_bytes)
        storage = {"storage": "cpu"} if gpu else {"storage": "disk", "path": args.dir}
        moefx.offload(model, device=device, budget_bytes=budget, prefetch=config["prefetch"], **storage)
        result["budget_bytes"] = budget
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)

    def timed(fn) -> float:
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g).to(device)
    prompt = torch.randint(0, VOCAB, (1, 16), generator=g).to(device)
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                   pad_token_id=0)
    with torch.no_grad():
        model(batch[:1, :8])  # warm up (and, offloaded, a first round of routing statistics)
        if config["budget"] is not None:
            moefx.offload_stats(model, reset=True)
        prefill = min(timed(lambda: model(batch)) for _ in range(2))
        if config["budget"] is not None:
            moefx.offload_stats(model, reset=True)
        decode = timed(lambda: model.generate(prompt, **options))
    result.update(prefill_tok_s=args.batch * args.seq / prefill, decode_tok_s=args.new_tokens / decode)
    if config["budget"] is not None:
        stats = moefx.offload_stats(model)
        result.update(decode_stats=stats.as_dict(), decode_bytes_per_token=stats.bytes_moved / args.new_tokens)
    result["peak"] = torch.cuda.max_memory_allocated(device) if gpu else rss_bytes("VmHWM") - baseline
    return result


def run_worker(args, config: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(config), "--dir", str(args.dir), "--device", args.device,
               *(["--adopted-mixtral"] if args.adopted_mixtral else []),
               "--layers", str(args.layers), "--d", str(args.d), "--h", str(args.h), "--experts", str(args.experts),
               "--top-k", str(args.top_k), "--batch", str(args.batch), "--seq", str(args.seq),
               "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"worker {config} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args, json.loads(args.worker))))
        return
    prepare(args)
    if args.repeats > 1 or args.adopted_mixtral:
        repeated_table(args)
        return
    mib = 1 << 20
    resident = run_worker(args, {"budget": None, "prefetch": False})
    bandwidth = copy_bandwidth(torch.device(args.device), args.dir / "model.safetensors")
    print(f"device {args.device}; expert weights {resident['expert_bytes'] / mib:.0f} MiB, other weights "
          f"{resident['other_bytes'] / mib:.0f} MiB; copy bandwidth {bandwidth / 1e9:.2f} GB/s")
    peak_name = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB (above structure)"
    header = (f"{'configuration':<28} {'prefill tok/s':>13} {'decode tok/s':>12} {peak_name:>30} "
              f"{'MiB moved/token':>15} {'decode limit tok/s':>18}")
    print(header)
    print(f"{'resident':<28} {resident['prefill_tok_s']:>13.0f} {resident['decode_tok_s']:>12.1f} "
          f"{resident['peak'] / mib:>30.0f} {'':>15} {'':>18}")
    resident_s = 1 / resident["decode_tok_s"]
    for fraction in BUDGETS:
        for prefetch in (True, False):
            r = run_worker(args, {"budget": fraction, "prefetch": prefetch})
            moved = r["decode_bytes_per_token"]
            limit = 1 / (resident_s + moved / bandwidth)
            name = f"budget 1/{round(1 / fraction)}, {'prefetch' if prefetch else 'on demand'}"
            print(f"{name:<28} {r['prefill_tok_s']:>13.0f} {r['decode_tok_s']:>12.1f} {r['peak'] / mib:>30.0f} "
                  f"{moved / mib:>15.1f} {limit:>18.1f}", flush=True)
            print(f"    budget {r['budget_bytes'] / mib:.0f} MiB; decode: {json.dumps(r['decode_stats'])}", flush=True)


def repeated_table(args) -> None:
    """Each configuration in ``args.repeats`` fresh processes: medians (min-max) of decode tok/s and
    the cache's figures per generated token, against the limit: the resident time per token plus
    the bytes the row moved per token at the measured copy bandwidth."""
    from statistics import median

    mib = 1 << 20
    runs = {}
    for fraction, prefetch in [(None, False), *((f, p) for f in BUDGETS for p in (True, False))]:
        runs[(fraction, prefetch)] = [run_worker(args, {"budget": fraction, "prefetch": prefetch})
                                      for _ in range(args.repeats)]
    bandwidth = median(copy_bandwidth(torch.device(args.device), args.dir / "model.safetensors") for _ in range(3))
    resident = runs[(None, False)]
    resident_s = 1 / median(r["decode_tok_s"] for r in resident)
    one_expert = resident[0]["expert_bytes"] / (args.layers * args.experts)
    print(f"device {args.device}; expert weights {resident[0]['expert_bytes'] / mib:.0f} MiB ({one_expert / mib:.1f} MiB "
          f"each), other weights {resident[0]['other_bytes'] / mib:.0f} MiB; copy bandwidth {bandwidth / 1e9:.2f} GB/s; "
          f"{args.repeats} processes per row, median (min-max)")
    print("| configuration | prefill tok/s | decode tok/s | MiB moved / token | hits / prefetch hits / misses per token "
          "| limit tok/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")

    def spread(values, fmt):
        return f"{median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    for (fraction, prefetch), rs in runs.items():
        prefill, decode = spread([r["prefill_tok_s"] for r in rs], ".0f"), spread([r["decode_tok_s"] for r in rs], ".1f")
        if fraction is None:
            print(f"| resident | {prefill} | {decode} | – | – | – |")
            continue
        moved = [r["decode_bytes_per_token"] for r in rs]
        per_token = [{k: r["decode_stats"][k] / args.new_tokens for k in ("hits", "prefetch_hits", "misses")} for r in rs]
        counts = " / ".join(f"{median(p[k] for p in per_token):.1f}" for k in ("hits", "prefetch_hits", "misses"))
        name = f"budget 1/{round(1 / fraction)} ({rs[0]['budget_bytes'] / mib:.0f} MiB), {'prefetch' if prefetch else 'on demand'}"
        print(f"| {name} | {prefill} | {decode} | {spread([m / mib for m in moved], '.1f')} | {counts} | "
              f"{1 / (resident_s + median(moved) / bandwidth):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
