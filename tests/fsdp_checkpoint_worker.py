"""One process of tests/test_checkpoint.py's FSDP check (started by torch.distributed.run with gloo on the CPU).

Trains a tiny Llama sharded with FSDP2 for two steps, checkpoints with the hf backend's checkpoint module,
takes two more steps, then builds the model afresh, loads the checkpoint and takes them again: the losses must
be the same (the third needs the weights and every process's RNG state, the fourth the optimizer's too). Process 0 writes what it saw to OUT as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

from ftplan.backends.hf import checkpoint

CONFIG = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def build():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, rank: int, n: int) -> float:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 * n + rank))
    ids = ids + torch.randint(0, 2, ids.shape)  # consumes the global RNG, which the checkpoint must restore
    loss = model(input_ids=ids.clamp(max=127), labels=ids.clamp(max=127)).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def main(out: Path, ckpt_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    def gather(obj):
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    procs = checkpoint.Processes(rank=rank, count=dist.get_world_size(), barrier=dist.barrier, gather=gather)
    model, optimizer, scheduler = build()
    torch.manual_seed(1234 + rank)  # each process its own stream, as accelerate's set_seed + rank would
    for n in (1, 2):
        step(model, optimizer, scheduler, rank, n)
    saved = checkpoint.save(ckpt_dir, 2, model=model, full=True, optimizer=optimizer, scheduler=scheduler,
                            scaler=None, state={"tokens": 0}, procs=procs)
    third = [step(model, optimizer, scheduler, rank, n) for n in (3, 4)]  # the 4th depends on the optimizer state
    fresh, fresh_optimizer, fresh_scheduler = build()
    torch.manual_seed(999)  # wrong on purpose: the checkpoint's RNG state must replace it
    checkpoint.load(saved, model=fresh, full=True, optimizer=fresh_optimizer, scheduler=fresh_scheduler,
                    scaler=None, device="cpu", procs=procs)
    again = [step(fresh, fresh_optimizer, fresh_scheduler, rank, n) for n in (3, 4)]
    if rank == 0:
        out.write_text(json.dumps({"third": third, "again": again, "damage": checkpoint.damage(saved),
                                   "files": sorted(p.name for p in saved.iterdir())}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
