"""The fake score and the degrading model as LoRA adapters on the frozen teacher, instead of full copies
(network.lora_rank > 0; SwiftBrush's memory saver).

An ``Adapted`` network is new modules around the teacher's own weight tensors (shared, never copied) with peft's LoRA
adapters on every linear and convolution layer. Adapters start at zero, so a fresh one is the teacher exactly. Only
the adapters belong to it: its ``state_dict`` holds them alone, so degradation-path nodes, checkpoints and the saved
fake score are the adapters' few megabytes rather than a copy of the teacher. The fake score, the target and the
degrading model all share one copy of the teacher; the generator stays a full network (it is what is distilled).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Mapping

import torch
from torch import nn

from disback.errors import DisbackError


class Adapted(nn.Module):
    """``base`` with rank-``rank`` LoRA adapters; ``base`` is frozen and shared."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model  # peft imports transformers (seconds): only when asked for

        base.requires_grad_(False)
        shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
        net = copy.deepcopy(base, shared)  # new modules around the same tensors
        targets = [name for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not targets:
            raise DisbackError(
                f"network.lora_rank={rank}: the teacher's network ({type(base).__name__}) has no linear or "
                "convolution layers that LoRA adapts (EDM2's magnitude-preserving layers normalise their own "
                "weights); set network.lora_rank=0 for full copies"
            )
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), net)
        self.net, self.rank = net, rank

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.net(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """What the adapted network offers (a generator's ``steps``, ``renoise``, ...), through the adapted copy."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            net = self._modules.get("net")
            if net is None or name == "net":
                raise
            return getattr(net, name)

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapters' tensors alone (the base is the teacher, which has a file of its own)."""
        out = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in out if k.startswith(prefix) and ".lora_" not in k]:
            del out[key]
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False) -> None:
        """Adapters in: exactly this network's adapter keys (always strict), copied into its own tensors. torch's
        loader is not used because it would look for the base keys, which ``state`` rightly lacks."""
        own = self.state_dict(keep_vars=True)
        if set(state) != set(own):
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise RuntimeError(f"adapter keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)


def trainable_generator(generator: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """The generator to train: itself, or with ``rank`` > 0 LoRA adapters on its weights (which then stay frozen and
    may be the teacher's own: DMD2's LoRA generator), starting exactly where it is. The adapters' random initial
    factors come from ``seed``, so a run and its rerun start alike whatever ran before them in the process."""
    if not rank:
        return generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Adapted(generator, rank)


def merged(network: nn.Module) -> nn.Module:
    """A whole network with the adapters of an ``Adapted`` one added into a copy of its weights (the shared base is
    left as it is); any other network as it is. Its state_dict has the base network's keys, so it is saved and
    loaded as a network of that architecture."""
    if not isinstance(network, Adapted):
        return network
    from peft.tuners.lora import LoraLayer

    dtype = next(p for p in network.parameters() if p.requires_grad).dtype  # the adapters' (a bf16 base is upcast)
    net = copy.deepcopy(network.net).to(dtype)  # tensors copied too: merging writes into them
    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    return net


def fake_and_target(teacher: nn.Module, rank: int, num_nodes: int) -> tuple[nn.Module, nn.Module]:
    """The fake score and the target for distillation over a path of ``num_nodes`` nodes: full copies of the teacher,
    or with ``rank`` > 0 adapters on it (the baseline's target is then the teacher itself: it never changes)."""
    if not rank:  # trainable even when the teacher was frozen (as the base of a LoRA generator)
        return copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher)
    return Adapted(teacher, rank), (Adapted(teacher, rank) if num_nodes > 1 else teacher.requires_grad_(False))


def scratch(teacher: nn.Module, rank: int) -> nn.Module:
    """A network that path nodes load into (to verify them): a copy of the teacher, or an adapter on it."""
    return Adapted(teacher, rank) if rank else copy.deepcopy(teacher)
