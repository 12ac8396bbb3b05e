"""What every task's update shares: this process's share of a batch's noise, Adam, and an update that is skipped
(in every process) when its loss is not finite."""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate import Accelerator

from disback.distributed import everyone, local

# n -> (x0, class labels or None): this process's share of a batch of n
Source = Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]


def shares(sigma: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of a global batch's noise levels ``sigma`` and of noise drawn for the whole batch (every
    process draws all of it, so that the random streams stay in step); x0 is this process's share of the data."""
    return local(sigma), local(torch.randn(len(sigma), *x0.shape[1:], device=x0.device))


def adam(params, lr: float, accelerator: Accelerator) -> torch.optim.Optimizer:
    """Adam, fused into one kernel per step on a GPU."""
    return torch.optim.Adam(params, lr=lr, fused=accelerator.device.type == "cuda")


def update(accelerator: Accelerator, optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
    """Backward and step, unless the loss is not finite in any process: then nothing changes (the loop decides to stop
    or go on)."""
    optimiser.zero_grad(set_to_none=True)
    if not everyone(bool(torch.isfinite(loss))):
        return False
    accelerator.backward(loss)
    optimiser.step()
    return True


def state_of(source: Any) -> Any:
    """A data source's random state (the order of the data), if it has one."""
    return source.state_dict() if hasattr(source, "state_dict") else None


def load_state_of(source: Any, state: Any) -> None:
    if state is not None:
        source.load_state_dict(state)
