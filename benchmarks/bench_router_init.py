"""Load across experts at step 0, for each init x router init (issue 24, router initialisation).

    python benchmarks/bench_router_init.py                       # pretrained 150 steps and random weights, 3 seeds
    python benchmarks/bench_router_init.py --pretrain-steps 0 --seeds 0   # a quick look

A small Llama-shaped decoder (bytes as tokens, transformers' config class) is built with random
weights and, unless ``--pretrain-steps 0``, trained dense for a few hundred steps on text that
ships with the installed Python packages (their ``*.md``/``*.rst``/licence files; no download), so
its hidden states have the structure of real text. Then, for each ``init`` and ``router_init``, a
copy is converted (8 experts, top-2, capacity factor 1.25, ``kmeans`` calibrated on training
text) and run in eval mode on held-out text (files the training never saw). Reported per layer and
then over layers: max/mean tokens per expert (choices routed before capacity; 1.0 is perfect
balance, E/k = 4.0 means every token picks the same two experts) and the fraction of choices
dropped at capacity factor 1.25. Seeds change the router's random init and drop-upcycle's redraws
(moefy's ``seed``); the k-means start is fixed (seed 0), so ``kmeans`` on ``upcycle`` and ``split``
gives one figure. The table gives the median over seeds and the range.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from text_corpus import documentation_bytes

import moefx

INITS = ("upcycle", "split", "drop-upcycle")
ROUTER_INITS = ("random", "weights", "kmeans")
SEQ, BATCH, EXPERTS, TOP_K, CAPACITY = 128, 16, 8, 2, 1.25


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) bytes of the installed packages' documentation, as token ids."""
    return tuple(torch.frombuffer(bytearray(part), dtype=torch.uint8).long() for part in documentation_bytes())


def batch(tokens: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - SEQ - 1, (rows,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tokens[s:s + SEQ] for s in starts.tolist()])


def dense_model(pretrain_steps: int, train_tokens: torch.Tensor) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, use_cache=False,
    ))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(pretrain_steps):
        ids = batch(train_tokens, BATCH, 1000 + step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == pretrain_steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f} nats/byte", flush=True)
    return model.eval()


def measure(dense, init: str, router_init: str, seed: int, held_out: torch.Tensor, calibration: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model = copy.deepcopy(dense)
    moefx.moefy(model, EXPERTS, TOP_K, example_inputs=(held_out[:2],), init=init, router_init=router_init,
                capacity_factor=CAPACITY, calibration=calibration if router_init == "kmeans" else None, seed=seed)
    model.eval()
    with torch.no_grad():
        model(held_out)
    balance, dropped = [], []
    for _, layer in moefx.moe_layers(model):
        stats = layer.stats()
        routed = stats.routed_per_expert.double()
        balance.append(float(routed.max() / routed.mean()))
        dropped.append(int(stats.dropped) / (held_out.numel() * TOP_K))
    return {"max_over_mean": balance, "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, nargs="+", default=[150, 0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    train_tokens, held_tokens = corpus()
    held_out, calibration = batch(held_tokens, BATCH, 7), batch(train_tokens, 8, 8)
    print(f"corpus: {len(train_tokens):,} training bytes, {len(held_tokens):,} held out; "
          f"held-out batch {tuple(held_out.shape)}, calibration {tuple(calibration.shape)}")
    results = []
    for steps in args.pretrain_steps:
        dense = dense_model(steps, train_tokens)
        rows = []
        for init in INITS:
            for router_init in ROUTER_INITS:
                runs = [measure(dense, init, router_init, seed, held_out, calibration) for seed in args.seeds]
                results.append({"pretrain_steps": steps, "init": init, "router_init": router_init, "runs": runs})
                rows.append(_row(init, router_init, runs))
        weights = f"pretrained {steps} steps on text" if steps else "random weights"
        print(f"\n{weights}; E={EXPERTS}, k={TOP_K}, {held_out.numel()} held-out tokens, "
              f"median over seeds {args.seeds} [min-max]\n")
        print("| init | router init | max/mean tokens per expert, mean over layers | worst layer | "
              "dropped at capacity 1.25 |")
        print("| --- | --- | ---: | ---: | ---: |")
        print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _row(init: str, router_init: str, runs: list[dict]) -> str:
    def cell(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    mean_balance = [statistics.mean(r["max_over_mean"]) for r in runs]
    worst = [max(r["max_over_mean"]) for r in runs]
    dropped = [statistics.mean(r["dropped"]) for r in runs]
    return (f"| {init} | {router_init} | {cell(mean_balance, '.2f')} | {cell(worst, '.2f')} | "
            f"{cell([100 * d for d in dropped], '.1f')}% |")


if __name__ == "__main__":
    main()
