"""Train a tiny Llama, upcycled to MoE, expert-parallel over every process (CPU/gloo or GPU/NCCL).

    torchrun --nproc_per_node 2 examples/train_ep.py [--ep-size 2] [--steps 5] [--experts 4] [--fsdp]
        [--optimizer {sgd,adamw}] [--checkpoint-dir DIR --save-every K] [--dtype {float32,float64}]
        [--overlap-chunks N] [--ranks-per-node R] [--shadowing [--link-bytes-per-s B --flops-per-s F]]

Each rank converts the same model (same seed) with ``moefx.moefy``, then ``moefx.parallelize``
keeps E/ep experts per rank, sends tokens to their experts with all-to-all, and wraps the rest
of the model in DDP. Each rank trains on its own batch; rank 0 prints the mean loss per step.
With ``--ep-size 1`` every rank keeps every expert (plain data parallelism): same losses.
With ``--fsdp`` the rest of the model is sharded by FSDP2 (``fully_shard`` per decoder layer and
at the root, over every rank) instead of DDP, the experts left out of it: same losses again.
``--overlap-chunks``, ``--ranks-per-node`` and ``--shadowing`` pass parallelize's faster exchanges
(the cost model's link and FLOP rate with ``--link-bytes-per-s``/``--flops-per-s``): same losses
as the plain exchange (in float64, ``--dtype float64``, to the last digits); with ``--shadowing``
rank 0 also prints how many (layer, step) pairs shadowed an expert.

With ``--checkpoint-dir DIR`` it starts from the newest complete checkpoint in DIR (if any) and,
with ``--save-every K``, saves the model, the optimizer state, the step and the data position
there every K steps (``moefx.save_training_state``, collective). Under ``torchrun --max-restarts
3`` a run whose rank dies restarts from the last checkpoint and prints the losses of the run that
never stopped (deterministic algorithms, data drawn in a fixed order that the position replays).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

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


def next_batch(data: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-size", type=int, help="experts are split over this many ranks (default: all)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 for the non-expert weights instead of DDP")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--overlap-chunks", type=int, default=1, metavar="N", help="parallelize(overlap_chunks=N)")
    parser.add_argument("--ranks-per-node", type=int, metavar="R", help="parallelize(ranks_per_node=R)")
    parser.add_argument("--shadowing", action="store_true", help="parallelize(shadowing=...): replicate hot experts")
    defaults = moefx.parallel.ShadowingCostModel()
    parser.add_argument("--link-bytes-per-s", type=float, default=defaults.link_bytes_per_s, help="shadowing's cost model")
    parser.add_argument("--flops-per-s", type=float, default=defaults.flops_per_s, help="shadowing's cost model")
    parser.add_argument("--checkpoint-dir", type=Path, help="resume from the newest checkpoint here; save here")
    parser.add_argument("--save-every", type=int, metavar="K", help="save a checkpoint every K steps (needs --checkpoint-dir)")
    parser.add_argument("--keep", type=int, help="keep only the newest KEEP checkpoints")
    # Tests only: rank 1 kills itself (SIGKILL) before this step, once per checkpoint directory.
    parser.add_argument("--test-kill-rank1-at", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_every is not None and (args.checkpoint_dir is None or args.save_every < 1):
        parser.error("--save-every K needs K >= 1 and --checkpoint-dir DIR")

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    # Deterministic kernels, so that a resumed run repeats the losses of one that never stopped. On
    # CUDA some ops have no deterministic kernel (and cuBLAS needs CUBLAS_WORKSPACE_CONFIG): warn there.
    torch.use_deterministic_algorithms(True, warn_only=backend == "nccl")

    torch.manual_seed(0)  # the same dense model and conversion on every rank
    model = tiny_llama().to(device, getattr(torch, args.dtype))
    sample = torch.randint(0, VOCAB, (2, 16), device=device)
    moefx.moefy(model, num_experts=args.experts, top_k=args.top_k, example_inputs=(sample,))
    mesh = moefx.expert_parallel_mesh(ep_size=args.ep_size or world)
    shadowing = args.shadowing and moefx.parallel.ShadowingCostModel(args.link_bytes_per_s, args.flops_per_s)
    model = moefx.parallelize(model, mesh, data_parallel=not args.fsdp, overlap_chunks=args.overlap_chunks,
                              ranks_per_node=args.ranks_per_node, shadowing=shadowing)
    layers = [layer for _, layer in moefx.moe_layers(model)]
    shadowed_layer_steps = 0
    if args.fsdp:
        shard_with_fsdp2(model, device)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: a wrong gradient scale would show
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    start = 0
    if args.checkpoint_dir is not None:
        resumed = moefx.resume_training_state(args.checkpoint_dir, model, optimizer)
        if resumed is not None:
            start = resumed.step
            for _ in range(resumed.data_position):  # replay the data stream to where it was
                next_batch(data)
            if rank == 0:
                print(f"resumed from {resumed.directory.name}", flush=True)
    for step in range(start, args.steps):
        if args.test_kill_rank1_at == step and rank == 1:
            marker = args.checkpoint_dir / f".test-killed-at-{step}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        tokens = next_batch(data).to(device)
        loss = model(tokens, labels=tokens).loss + moefx.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        shadowed_layer_steps += sum(bool(exchange.shadowed_experts) for layer in layers
                                    if (exchange := layer.stats().exchange) is not None)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: loss {mean.item() / world:.12f}", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            # Steps done and batches drawn: the loop goes on from there after a restart.
            moefx.save_training_state(args.checkpoint_dir, model, optimizer, step=step + 1, data_position=step + 1,
                                      keep=args.keep)
    if args.shadowing and rank == 0:
        print(f"shadowed: {shadowed_layer_steps} layer-steps", flush=True)
    # Free the DDP wrapper and the expert groups' users before the groups themselves, on every
    # rank at the same point: tearing gloo down in a different order per rank can hang at exit.
    del model, optimizer
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
