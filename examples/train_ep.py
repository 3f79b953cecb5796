"""Train a tiny Llama, upcycled to MoE, expert-parallel over every process (CPU/gloo or GPU/NCCL).

    torchrun --nproc_per_node 2 examples/train_ep.py [--ep-size 2] [--steps 5] [--experts 4] [--fsdp]

Each rank converts the same model (same seed) with ``moefx.moefy``, then ``moefx.parallelize``
keeps E/ep experts per rank, sends tokens to their experts with all-to-all, and wraps the rest
of the model in DDP. Each rank trains on its own batch; rank 0 prints the mean loss per step.
With ``--ep-size 1`` every rank keeps every expert (plain data parallelism): same losses.
With ``--fsdp`` the rest of the model is sharded by FSDP2 (``fully_shard`` per decoder layer and
at the root, over every rank) instead of DDP, the experts left out of it: same losses again.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

import moefx

VOCAB = 256


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    return LlamaForCausalLM(config)


def shard_with_fsdp2(model: LlamaForCausalLM, device: torch.device) -> None:
    """FSDP2 over every rank for all but the experts, which ``parallelize`` has already sharded and
    whose gradients its hooks synchronise."""
    from torch.distributed.fsdp import fully_shard

    world_mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    experts = moefx.parallel.parallelize.expert_parameters(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=world_mesh, ignored_params=experts)
    fully_shard(model, mesh=world_mesh, ignored_params=experts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-size", type=int, help="experts are split over this many ranks (default: all)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 for the non-expert weights instead of DDP")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.use_deterministic_algorithms(True, warn_only=True)

    torch.manual_seed(0)  # the same dense model and conversion on every rank
    model = tiny_llama().to(device)
    sample = torch.randint(0, VOCAB, (2, 16), device=device)
    moefx.moefy(model, num_experts=args.experts, top_k=args.top_k, example_inputs=(sample,))
    mesh = moefx.expert_parallel_mesh(ep_size=args.ep_size or world)
    model = moefx.parallelize(model, mesh, data_parallel=not args.fsdp)
    if args.fsdp:
        shard_with_fsdp2(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: a wrong gradient scale would show

    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    for step in range(args.steps):
        tokens = torch.randint(0, VOCAB, (4, 32), generator=data).to(device)
        loss = model(tokens, labels=tokens).loss + moefx.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: loss {mean.item() / world:.8f}", flush=True)
    # Free the DDP wrapper and the expert groups' users before the groups themselves, on every
    # rank at the same point: tearing gloo down in a different order per rank can hang at exit.
    del model, optimizer
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
