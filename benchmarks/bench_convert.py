"""Conversion benchmark: how long find_ffns + moefy take, and how much memory upcycling needs.

    python benchmarks/bench_convert.py            # both parts
    python benchmarks/bench_convert.py --part meta|upcycle [--layers N] [--json]

meta:    a Llama-shaped model (32 layers, hidden 4096, FFN 11008) on the meta device: find_ffns,
         then moefy (which captures again), 8 experts. Target: under 10 s on a 2-core machine.
upcycle: a ~350M-parameter Llama-shaped model with real fp32 weights upcycled to 8 experts: wall
         time and peak RSS against the converted model's size. Target: peak RSS <= 1.3x that size.
Each part runs in a fresh process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _llama(hidden: int, ffn: int, layers: int, heads: int, device: str):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, use_cache=False,
    )
    with torch.device(device):
        return LlamaModel(config)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def part_meta(layers: int) -> dict:
    import moefx

    model = _llama(4096, 11008, layers, 32, "meta")
    ids = torch.randint(0, 32000, (1, 16))
    t0 = time.perf_counter()
    found = moefx.find_ffns(model, (ids,))
    t1 = time.perf_counter()
    moefx.moefy(model, 8, 2, example_inputs=(ids,))
    t2 = time.perf_counter()
    return {
        "part": "meta", "layers": layers, "ffns_found": len(found), "find_ffns_s": round(t1 - t0, 2),
        "moefy_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
        "moe_layers": sum(1 for _ in moefx.moe_layers(model)),
    }


def part_upcycle(layers: int) -> dict:
    import moefx

    torch.manual_seed(0)
    model = _llama(1024, 2816, layers, 16, "cpu")
    dense = _params(model)
    ids = torch.randint(0, 32000, (1, 16))
    t0 = time.perf_counter()
    moefx.moefy(model, 8, 2, example_inputs=(ids,), init="upcycle")
    wall = time.perf_counter() - t0
    converted_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "part": "upcycle", "layers": layers, "dense_params": dense, "converted_params": _params(model),
        "converted_gib": round(converted_bytes / 2**30, 2), "peak_rss_gib": round(peak / 2**30, 2),
        "peak_over_converted": round(peak / converted_bytes, 3), "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["meta", "upcycle"])
    parser.add_argument("--layers", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.part is None:
        for part in ("meta", "upcycle"):
            subprocess.run([sys.executable, __file__, "--part", part] + (["--json"] if args.json else []), check=True)
        return
    torch.set_num_threads(2)
    if args.part == "meta":
        result = part_meta(args.layers or 32)
    else:
        result = part_upcycle(args.layers or 24)
    print(json.dumps(result) if args.json else "  ".join(f"{k}={v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
