"""Several processes through torch.distributed: `torchrun --nproc-per-node N -m minicpm.training.run ...`.

Each process holds a shard of every weight, gradient and optimizer state (FSDP2,
`torch.distributed.fsdp.fully_shard`, one unit per decoder layer plus the root); gloo on CPU,
NCCL on GPUs. Without torchrun's environment everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Processes:
    """Join torchrun's process group if there is one (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = device.startswith("cuda")
    if world <= 1:
        return Processes(device=torch.device(device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     device=torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"))


def teardown(procs: Processes) -> None:
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: each decoder layer is one unit (gathered for its forward and backward, then freed),
    the embedding, final norm and head the root unit."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def all_reduce_sum(values: list[float], procs: Processes) -> list[float]:
    if not procs.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=procs.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()


def full_model_state(model: torch.nn.Module, procs: Processes) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on every process (rank 0 writes it)."""
    if not procs.distributed:
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer, procs: Processes) -> dict:
    if not procs.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, procs: Processes) -> None:
    """Restore a full (unsharded) model and optimizer state, sharding it where FSDP is on."""
    if not procs.distributed:
        result = model.load_state_dict(model_state, strict=False)
        if result.unexpected_keys:
            from minicpm.errors import MiniCPMError

            raise MiniCPMError(f"the checkpoint does not fit this model: unexpected {result.unexpected_keys[:3]}")
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
