"""Several processes (``accelerate launch`` or ``torchrun``): what makes them compute what one process would.

One process is the default and every function here is then a no-op. Under N processes (data parallel, DDP or FSDP
through Accelerate) the rules are:

- every process holds the same random state (accelerate's set_seed), draws the *global* batch of noise, noise levels,
  labels and data indices, and keeps its own contiguous share (``local``): N processes see exactly the batch that one
  process would, split N ways, and their averaged gradients are that batch's gradient;
- values that steer the run (the losses in the logs, the adaptive schedule's gap, "is this loss finite", "was SIGTERM
  received") are agreed across processes (``mean_across``, ``everyone``, ``anyone``), so that all processes take the
  same branch;
- only the main process writes files (``is_writer``; disback.weights and the logs check it); ``wait`` is the barrier
  placed where the others then read what it wrote.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from accelerate import PartialState

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
        raise DisbackError(f"a batch of {len(x)} cannot be split over {n} processes; set the batch sizes (teacher.batch, "
                           f"degrade.batch, distill.batch) to multiples of {n}")
    share = len(x) // n
    return x[state().process_index * share: (state().process_index + 1) * share]


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


def strided(fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], z: torch.Tensor,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """``fn(z, labels)`` for all of z, each process taking every N-th item from its rank on, gathered back in z's order.
    Striding (not contiguous shares) keeps balanced class labels (0, 1, ..., K-1, 0, ...) balanced in every process."""
    n, rank = world(), state().process_index
    if n == 1:
        return fn(z, labels)
    mine = fn(z[rank::n], None if labels is None else labels[rank::n])
    per = -(-len(z) // n)  # ceil: shares differ by at most one; pad so that all_gather sees equal sizes
    padded = torch.cat([mine, mine[:1].expand(per - len(mine), *mine.shape[1:])]) if len(mine) < per else mine
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous())
    return torch.stack(parts, dim=1).reshape(per * n, *mine.shape[1:])[: len(z)]  # item j of rank r was z[j*n + r]


def finish() -> None:
    """End the process group cleanly once every process is done (an exit while another process is still in gloo's
    teardown can abort it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
