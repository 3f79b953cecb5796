"""Peak memory and time of converting a transformers checkpoint (``moefx.convert``, streamed), each run
in a fresh process, against the time to write the same bytes with plain file writes (the limit).

    python benchmarks/bench_checkpoint_memory.py --size 317m --runs 3
    python benchmarks/bench_checkpoint_memory.py --size 1b --runs 3 --in-memory   # + today's in-memory path once

The dense source is a Llama with random bf16 weights: its config written by ``save_pretrained``,
its tensors by moefx's streaming writer (building 0.6-2 GB of random weights in memory first
would only slow the setup). Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the OS's
count, file-backed pages of memory-mapped reads included). Everything under --workdir is deleted
at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # tied embeddings; 8 experts: 317m -> 1.73B parameters, 1b -> 5.35B
    "317m": dict(vocab_size=48000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=16),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
               num_attention_heads=16, num_key_value_heads=16),
}

CONVERT = """
import json, sys, time
t = time.perf_counter()
import moefx
moefx.convert(sys.argv[1], sys.argv[2], num_experts=int(sys.argv[3]), top_k=2, init=sys.argv[4])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

IN_MEMORY = """
import json, sys, time
t = time.perf_counter()
import torch, moefx
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
moefx.moefy(model, num_experts=int(sys.argv[3]), top_k=2, init=sys.argv[4],
            example_inputs=(torch.zeros(1, 16, dtype=torch.long),))
moefx.save(model, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

WRITE = """
import json, os, sys, time
t = time.perf_counter()
total, chunk = int(sys.argv[2]), bytearray(64 << 20)
with open(sys.argv[1], "wb") as f:
    left = total
    while left:
        left -= f.write(memoryview(chunk)[:min(left, len(chunk))])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def make_source(size: str, directory: Path) -> int:
    """The dense checkpoint (random bf16 weights); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moefx.artifact.shards import PlannedTensor, write_shards

    config = LlamaConfig(**SIZES[size], tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)

    def random(shape):
        return lambda: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    plan = [PlannedTensor(name, tuple(p.shape), torch.bfloat16, random(tuple(p.shape))) for name, p in model.named_parameters()]
    directory.mkdir(parents=True, exist_ok=True)
    write_shards(plan, directory, max_shard_bytes=2 * 10**9)
    config.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def child(script: str, *args: str) -> tuple[dict, int]:
    """Run ``script`` in a fresh interpreter; its JSON line and its peak RSS in bytes (Linux: KiB)."""
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"child failed ({process.returncode}): {script.strip().splitlines()[-3]}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024


def output_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="317m")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--init", default="upcycle")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--in-memory", action="store_true", help="also run today's in-memory path once (needs RAM)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moefx-bench-checkpoint"))
    parser.add_argument("--keep", action="store_true", help="keep the files under --workdir")
    args = parser.parse_args()
    source, out = args.workdir / f"dense-{args.size}", args.workdir / "out"
    try:
        if not (source / "config.json").is_file():
            start = time.perf_counter()
            params = make_source(args.size, source)
            print(f"source: {params / 1e6:.1f}M parameters, {output_bytes(source) / 1e9:.2f} GB "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        seconds, rss, written = [], [], 0
        for run in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            result, peak = child(CONVERT, str(source), str(out), str(args.experts), args.init)
            written = output_bytes(out)
            seconds.append(result["seconds"])
            rss.append(peak)
            print(f"run {run}: {result['seconds']:.1f} s, peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        limit = []
        for _ in range(args.runs):
            result, _ = child(WRITE, str(args.workdir / "plain.bin"), str(written))
            limit.append(result["seconds"])
            (args.workdir / "plain.bin").unlink()
        report = {
            "size": args.size, "experts": args.experts, "init": args.init, "source_bytes": output_bytes(source),
            "written_bytes": written, "convert_seconds": summary(seconds),
            "peak_rss_gib": summary([r / 2**30 for r in rss]), "plain_write_seconds": summary(limit),
        }
        if args.in_memory:
            result, peak = child(IN_MEMORY, str(source), str(out), str(args.experts), args.init)
            report["in_memory"] = {"seconds": result["seconds"], "peak_rss_gib": peak / 2**30}
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
