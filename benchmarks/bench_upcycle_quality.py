"""Upcycling quality on real text: does continuing as an MoE beat continuing dense, and which init?

    python benchmarks/bench_upcycle_quality.py                 # everything, ~15 min on 2 cores
    python benchmarks/bench_upcycle_quality.py --steps 50 --seeds 0 --variants dense upcycle/random   # a quick look

The corpus is the documentation that ships with the installed Python packages (``METADATA`` long
descriptions, ``*.md``, ``*.rst``, licence texts), read as bytes: English prose and markdown, no
download. Files are deduplicated and split by a hash of their content: about 10% held out.

1. A small Llama-shaped decoder (bytes as tokens) trains dense for ``--pretrain-steps`` (once,
   cached in ``--out``).
2. From that checkpoint, each variant continues for ``--steps`` with a fresh AdamW, per seed:
   ``dense``, or the model converted by ``moefx.moefy`` with an ``init``/``router_init`` pair,
   trained on ``loss + moefx.aux_loss(model)``.
Reported: held-out loss in nats per byte every ``--eval-every`` steps, the median step time, and
the load across experts (max/mean tokens per expert over the held-out batches) at step 0 and at
the end. Figures go to ``OUT/results.json`` and ``OUT/upcycle_quality.png`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from text_corpus import WITH_METADATA, documentation_bytes

import moefx

VARIANTS = (
    "dense", "upcycle/random", "upcycle/kmeans", "split/random", "split/weights", "split/kmeans",
    "drop-upcycle/random", "drop-upcycle/weights", "drop-upcycle/kmeans",
)
SEQ, BATCH, EXPERTS, TOP_K = 128, 16, 8, 2


def batches(data: bytes, count: int, seed: int) -> list[torch.Tensor]:
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - SEQ - 1, (count, BATCH), generator=g)
    return [torch.stack([tokens[s:s + SEQ] for s in row.tolist()]) for row in starts]


def dense_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train(model, data: list[torch.Tensor], *, lr: float, moe: bool, evaluate=None, eval_every: int = 0) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve, times = [], []
    for step, ids in enumerate(data):
        if evaluate is not None and step % eval_every == 0:
            curve.append((step, evaluate()))
        model.train()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        if moe:
            loss = loss + moefx.aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    if evaluate is not None:
        curve.append((len(data), evaluate()))
    return {"curve": curve, "step_s": statistics.median(times) if times else None}


@torch.no_grad()
def held_out(model, data: list[torch.Tensor]) -> tuple[float, float | None]:
    """Mean loss (nats per byte) and the load across experts (max/mean tokens per expert, summed
    over layers and batches)."""
    model.eval()
    losses, load = [], None
    for ids in data:
        losses.append(float(model(input_ids=ids, labels=ids).loss))
        for _, layer in moefx.moe_layers(model):
            counts = layer.stats().tokens_per_expert.double()
            load = counts if load is None else load + counts
    balance = None if load is None else float(load.max() / load.mean())
    return statistics.fmean(losses), balance


def run_variant(variant: str, seed: int, dense_state: dict, train_data, eval_data, args) -> dict:
    model = dense_model()
    model.load_state_dict(dense_state)
    moe = variant != "dense"
    if moe:
        init, router_init = variant.split("/")
        moefx.moefy(model, num_experts=EXPERTS, top_k=TOP_K, init=init, router_init=router_init, seed=seed,
                    example_inputs=(train_data[0],))
    torch.manual_seed(seed)
    balance_0 = held_out(model, eval_data)[1]
    result = train(model, train_data, lr=args.lr, moe=moe, evaluate=lambda: held_out(model, eval_data)[0],
                   eval_every=args.eval_every)
    return {"variant": variant, "seed": seed, "balance_step0": balance_0, "balance_end": held_out(model, eval_data)[1],
            "parameters": sum(p.numel() for p in model.parameters()), **result}


def plot(results: list[dict], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in results)):
        runs = [r for r in results if r["variant"] == variant]
        steps = [s for s, _ in runs[0]["curve"]]
        mean = [statistics.fmean(r["curve"][j][1] for r in runs) for j in range(len(steps))]
        style = "-" if variant == "dense" else "--" if variant.startswith("upcycle/") else ":"
        ax.plot(steps, mean, label=variant, color=f"C{i}", linestyle=style)
    ax.set_xlabel("steps after the dense checkpoint")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title("Continuing dense vs as an 8-expert top-2 MoE (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores stalls)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/upcycle_quality"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_bytes, eval_bytes = documentation_bytes(WITH_METADATA)
    print(f"corpus: {len(train_bytes) / 1e6:.2f} MB train, {len(eval_bytes) / 1e6:.2f} MB held out")
    eval_data = batches(eval_bytes, args.eval_batches, seed=12345)
    checkpoint = args.out / f"dense-{args.pretrain_steps}.pt"
    if checkpoint.exists():
        dense_state = torch.load(checkpoint, weights_only=True)
    else:
        model = dense_model()
        result = train(model, batches(train_bytes, args.pretrain_steps, seed=999), lr=args.lr, moe=False)
        dense_state = model.state_dict()
        torch.save(dense_state, checkpoint)
        print(f"dense pretraining: {args.pretrain_steps} steps, {result['step_s'] * 1e3:.0f} ms/step, "
              f"held-out {held_out(model, eval_data)[0]:.4f} nats/byte")
    results = []
    for seed in args.seeds:
        train_data = batches(train_bytes, args.steps, seed=seed)
        for variant in args.variants:
            r = run_variant(variant, seed, dense_state, train_data, eval_data, args)
            results.append(r)
            print(f"{variant:22s} seed {seed}: {r['curve'][0][1]:.4f} -> {r['curve'][-1][1]:.4f} nats/byte, "
                  f"{r['step_s'] * 1e3:.0f} ms/step, load max/mean {r['balance_step0'] or 1:.2f} -> {r['balance_end'] or 1:.2f}",
                  flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "upcycle_quality.png")


if __name__ == "__main__":
    main()
