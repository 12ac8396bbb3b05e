"""The process's accelerator, the speed options, and whether this launch may shard its networks."""

from __future__ import annotations

import torch
from accelerate import Accelerator, DistributedType

from disback.config import Config, RunConfig
from disback.distributed import state, world
from disback.errors import DisbackError

_ACCELERATOR: Accelerator | None = None
_PRECISION = "fp32"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp64": "no"}  # choices.PRECISIONS -> accelerate's mixed_precision
DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}  # choices.PRECISIONS -> weights' dtype


def accelerator(precision: str | None = None) -> Accelerator:
    """One Accelerator per process (Accelerate keeps global state); one process here, many under accelerate launch.
    ``precision`` (run.precision) is fixed by the first call; None: this process's, fp32 when nothing set it yet.

    fp64 makes float64 torch's default dtype for the rest of the process: every network built, every noise draw and
    every tensor made from Python numbers is float64, and so are Adam's states (they follow the weights); data comes
    in through Data.to_model, which follows the default dtype too. Files keep their tensors' dtype (safetensors F64);
    a file of either dtype loads into a network of the other (load_state_dict converts)."""
    global _ACCELERATOR, _PRECISION
    if _ACCELERATOR is None:
        _PRECISION = precision or "fp32"
        state()  # the process group first, so that a CPU-only machine runs several processes over gloo
        torch.set_default_dtype(DTYPES[_PRECISION])
        _ACCELERATOR = Accelerator(mixed_precision=MIXED_PRECISION[_PRECISION], cpu=not torch.cuda.is_available())
        # Training calls see fixed shapes, so cuDNN's search for the fastest convolution pays off after the first
        # call (NVlabs/edm trains this way too)
        torch.backends.cudnn.benchmark = torch.cuda.is_available()
    elif precision is not None and precision != _PRECISION:
        raise DisbackError(
            f"this process already runs with precision {_PRECISION}; run.precision={precision} "
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
