"""The process's accelerator, the speed options, and whether this launch may shard its networks."""

from __future__ import annotations

import torch
from accelerate import Accelerator, DistributedType

from disback.config import Config, RunConfig
from disback.distributed import state, world
from disback.errors import DisbackError

_ACCELERATOR: Accelerator | None = None
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16"}  # choices.PRECISIONS -> accelerate's mixed_precision


def accelerator(precision: str = "fp32") -> Accelerator:
    """One Accelerator per process (Accelerate keeps global state); one process here, many under accelerate launch."""
    global _ACCELERATOR
    mixed = MIXED_PRECISION[precision]
    if _ACCELERATOR is None:
        state()  # the process group first, so that a CPU-only machine runs several processes over gloo
        _ACCELERATOR = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        # Training calls see fixed shapes, so cuDNN's search for the fastest convolution pays off after the first
        # call (NVlabs/edm trains this way too)
        torch.backends.cudnn.benchmark = torch.cuda.is_available()
    elif _ACCELERATOR.mixed_precision != mixed:
        raise DisbackError(
            f"this process already runs with precision {_ACCELERATOR.mixed_precision}; run.precision={precision} "
            "needs a process of its own (one command per precision)"
        )
    return _ACCELERATOR


def sharded(cfg: Config, acc: Accelerator) -> bool:
    """Whether this stage shards its trained networks (run.fsdp), once it is clear that this launch can."""
    if acc.distributed_type == DistributedType.FSDP:
        raise DisbackError(
            "disback shards the networks itself: launch with accelerate/fsdp.yaml (distributed_type MULTI_GPU) "
            "and --set run.fsdp=true, not with an accelerate config of distributed_type FSDP"
        )
    if cfg.run.fsdp and world() == 1:
        raise DisbackError(
            "run.fsdp shards the networks across processes, and this is one process: launch several "
            "(python -m torch.distributed.run --nproc_per_node N -m disback ..., or accelerate launch on GPUs), "
            "or set run.fsdp=false"
        )
    return cfg.run.fsdp


def speed_up(run: RunConfig, *modules: torch.nn.Module) -> None:
    """run.channels_last, run.compile and run.gradient_checkpointing, applied in place (state_dict keys unchanged)."""
    for module in modules:
        if run.channels_last:
            module.to(memory_format=torch.channels_last)
        if run.gradient_checkpointing:
            for sub in module.modules():
                if hasattr(sub, "enable_gradient_checkpointing") and getattr(
                    sub, "_supports_gradient_checkpointing", False
                ):
                    sub.enable_gradient_checkpointing()
        if run.compile:
            module.compile()
