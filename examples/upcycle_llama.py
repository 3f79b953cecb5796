"""Upcycle a tiny Llama (random weights) into an MoE model with moefx, check it, train it briefly.

    python examples/upcycle_llama.py [--experts 8] [--top-k 2] [--steps 5]

``moefx.moefy`` finds the feed-forward blocks on the model's graph (captured with torch.export
from the example tokens). Upcycled with renormalised top-k, the converted model's logits equal
the dense model's, which the script checks before training.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moefx


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
    )
    return LlamaForCausalLM(config)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = tiny_llama()
    tokens = torch.randint(0, 512, (4, 64))
    with torch.no_grad():
        dense_logits = model(tokens).logits
    dense_params = count(model)

    moefx.moefy(model, num_experts=args.experts, top_k=args.top_k, example_inputs=(tokens,))
    converted = [path for path, _ in moefx.moe_layers(model)]
    with torch.no_grad():
        moe_logits = model(tokens).logits
    print(f"converted {len(converted)} feed-forward blocks to MoE (E={args.experts}, k={args.top_k}):")
    for path in converted:
        print(f"  {path}: MoE({model.get_submodule(path).extra_repr()})")
    print(f"parameters: {dense_params:,} dense -> {count(model):,} MoE")
    print(f"max |logits difference| vs the dense model: {(moe_logits - dense_logits).abs().max():.2e} (fp32 rounding only)")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.steps):
        out = model(tokens, labels=tokens)
        aux = moefx.aux_loss(model)
        (out.loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {out.loss.item():.4f}  aux {aux.item():.4f}")
    first_path, first = next(moefx.moe_layers(model))
    print(f"tokens per expert in {first_path} (last step): {first.stats().tokens_per_expert.tolist()}")


if __name__ == "__main__":
    main()
