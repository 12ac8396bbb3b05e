"""Several processes (``accelerate launch`` or ``torchrun``): what makes them compute what one process would.

One process is the default and every function here is then a no-op. Under N processes (data parallel, DDP or FSDP
through Accelerate) the rules are:

- every process holds the same random state (accelerate's set_seed), draws the *global* batch of noise, noise levels,
  labels and data indices, and keeps its own contiguous share (``local``): N processes see exactly the batch that one
  process would, split N ways, and their averaged gradients are that batch's gradient;
- values that steer the run (the losses in the logs, the adaptive schedule's gap, "is this loss finite", "was SIGTERM
  received") are agreed across processes (``mean_across``, ``everyone``, ``anyone``), so that all processes take the
  same branch;
- only the main process writes files (``is_writer``; disback.storage.files and the logs check it); ``wait`` is the barrier
  placed where the others then read what it wrote.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import nn

from disback.errors import DisbackError


def state() -> PartialState:
    """Accelerate's process state, created on first use. Without a GPU the processes talk over gloo on the CPU."""
    return PartialState(cpu=not torch.cuda.is_available())


def world() -> int:
    return state().num_processes


def is_writer() -> bool:
    """Only the main process writes files; the others compute the same values and skip the write."""
    return state().is_main_process


def wait() -> None:
    """Barrier: every process waits here until all have arrived (e.g. until the main one has written a file)."""
    if world() > 1:
        state().wait_for_everyone()


def local(x: torch.Tensor | None) -> torch.Tensor | None:
    """This process's contiguous share of a batch that every process drew identically."""
    n = world()
    if x is None or n == 1:
        return x
    if len(x) % n:
        raise DisbackError(
            f"a batch of {len(x)} cannot be split over {n} processes; set the batch sizes (teacher.batch, "
            f"degrade.batch, distill.batch) to multiples of {n}"
        )
    share = len(x) // n
    return x[state().process_index * share : (state().process_index + 1) * share]


def mean_across(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the processes (one all-reduce), in the same key order everywhere."""
    if world() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=state().device)
    dist.all_reduce(t)
    return {k: v / world() for k, v in zip(keys, t.tolist())}


def everyone(flag: bool) -> bool:
    """True only if ``flag`` is true in every process."""
    if world() == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=state().device)
    dist.all_reduce(t)
    return t.item() == 0


def anyone(flag: bool) -> bool:
    """True if ``flag`` is true in at least one process."""
    return not everyone(not flag)


def strided(
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], z: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """``fn(z, labels)`` for all of z, each process taking every N-th item from its rank on, gathered back in z's order.
    Striding (not contiguous shares) keeps balanced class labels (0, 1, ..., K-1, 0, ...) balanced in every process."""
    n, rank = world(), state().process_index
    if n == 1:
        return fn(z, labels)
    per = -(-len(z) // n)  # ceil: shares differ by at most one; padded so that every process runs fn on per items
    # (a sharded network needs every process in each of its forward passes) and all_gather sees equal sizes
    mine = _pad(z[rank::n], per)
    out = fn(mine, None if labels is None else _pad(labels[rank::n], per))
    parts = [torch.empty_like(out) for _ in range(n)]
    dist.all_gather(parts, out.contiguous())
    return torch.stack(parts, dim=1).reshape(per * n, *out.shape[1:])[: len(z)]  # item j of rank r was z[j*n + r]


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([x, x[:1].expand(size - len(x), *x.shape[1:])]) if len(x) < size else x


# ---------------------------------------------------------------- run.fsdp: the trained networks sharded

# diffusers' UNet blocks, SD3's and FLUX.1's transformer blocks, and EDM's / EDM2's (disback.diffusion.networks):
# each one a unit of its own
BLOCKS = (
    "ResnetBlock2D",
    "BasicTransformerBlock",
    "JointTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "UNetBlock",
    "Block",
)


def shard(module: nn.Module) -> nn.Module:
    """Shard ``module``'s parameters across the processes with FSDP2 (``fully_shard``), in place: every UNet or transformer block is a
    unit of its own, then the rest, so that a forward pass gathers one block's parameters at a time. Each process
    keeps 1/N of the parameters, their gradients (averaged across processes, as DDP does) and their Adam states.
    Parameter names, and so state_dict keys and files, are unchanged."""
    from torch.distributed.fsdp import fully_shard

    for sub in module.modules():
        if type(sub).__name__ in BLOCKS:
            fully_shard(sub)
    fully_shard(module)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or any(isinstance(m, FSDPModule) for m in module.children())


def _whole():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()``; a sharded module's shards gathered into whole tensors on the CPU of the main process
    (the others get an empty dict, since only the main process writes). A collective: every process calls it."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_whole())


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of full_state: every key must match (strict); a sharded module takes the main process's state."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_whole())


def optimiser_state(module: nn.Module, optimiser: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict; for a sharded ``module``, whole (keyed by parameter name) on the main process."""
    if not is_sharded(module):
        return optimiser.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimiser, options=_whole())


def load_optimiser_state(module: nn.Module, optimiser: torch.optim.Optimizer, state: dict) -> None:
    if not is_sharded(module):
        optimiser.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimiser, state, options=_whole())


def from_main(value: Any) -> Any:
    """The main process's ``value`` in every process (a no-op in one process)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    """End the process group cleanly once every process is done (an exit while another process is still in gloo's
    teardown can abort it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
