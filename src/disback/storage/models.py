"""Model files: any network disback saves (teacher, path node, fake score, generator) is one safetensors file whose
header describes it (disback.storage.meta); ``load_model`` rebuilds the network from that description through its
kind (disback.storage.kinds) and loads the weights with exact keys and shapes."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from disback.errors import DisbackError
from disback.storage.kinds import kind_of
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.weights import load_weights, save_weights


def load_model(path: Path) -> tuple[nn.Module, ModelMeta]:
    """A denoiser or a one-step generator from its file; the architecture comes from the file's header."""
    path = Path(path)
    meta = read_meta(path)
    if meta.adapter_rank:
        raise DisbackError(
            f"{path} holds only the LoRA adapters (rank {meta.adapter_rank}) of a path node or fake score "
            "on its teacher; the stages that made it read it (disback backtrack), not on its own"
        )
    kind = kind_of(meta, path)
    model = kind.rebuild(meta, path.parent)
    if meta.role == "generator":
        model = kind.generator(model, meta, meta.sigma_g)
    load_weights(model, path)
    return model, meta


def save_model(model: nn.Module, path: Path, meta: ModelMeta) -> str:
    """The model's weights with its description in the header, atomically; returns the file's sha256."""
    return save_weights(model, path, meta.header())


def generator_from_teacher(teacher: nn.Module, meta: ModelMeta, sigma_g: float) -> nn.Module:
    """G_eta0: a copy of the teacher as a one-step generator (at sigma_g, or as the kind makes its generators)."""
    return kind_of(meta).generator(copy.deepcopy(teacher).requires_grad_(True), meta, sigma_g)
