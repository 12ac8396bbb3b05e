"""Model kinds: how the networks of each kind of model file are rebuilt, made one-step generators, and used as a
target score. The core knows two kinds:

edm     our backbones (MLP, UNet2DModel) under EDM preconditioning, trained by `disback teacher`
vp      a pretrained diffusers UNet2DModel on a discrete VP schedule (epsilon, v or x0 prediction)
nvlabs  NVIDIA's EDM / EDM2 networks with their preconditioners, imported from a network snapshot
        (disback.storage.nvlabs)

A plugin registers its own kind with ``register_kind`` when it is imported, and names the module that does so under
the entry-point group ``disback.model_kinds`` (disback.text registers "text" this way), so that a file of its kind
loads wherever it is read, and nothing in the core imports the plugin.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from disback.config import Config, EDMConfig, NetworkConfig
from disback.diffusion.denoisers import VPDenoiser, build_denoiser
from disback.diffusion.generator import OneStepGenerator
from disback.errors import DisbackError
from disback.storage.meta import ModelMeta

ENTRY_POINTS = "disback.model_kinds"


def one_step(denoiser: nn.Module, meta: ModelMeta, sigma_g: float) -> nn.Module:
    """G(z) = D(sigma_g z; sigma_g)."""
    return OneStepGenerator(denoiser, sigma_g)


def as_is(target: nn.Module, cfg: Config) -> nn.Module:
    return target


@dataclass(frozen=True)
class ModelKind:
    """How the files of one kind become networks. ``rebuild`` gets the file's folder too, for files that sit beside it
    (a text model's prompt table). ``target`` adapts a target score in place (its state_dict keys unchanged: node files
    are loaded into what it returns). ``sampled_by`` says how a kind that `disback sample` cannot draw is sampled
    instead; ``export`` writes a generator of this kind when the core's export does not fit it."""

    rebuild: Callable[[ModelMeta, Path], nn.Module]
    generator: Callable[[nn.Module, ModelMeta, float], nn.Module] = one_step
    target: Callable[[nn.Module, Config], nn.Module] = as_is
    sampled_by: Callable[[ModelMeta], str] | None = None
    export: Callable[[Path, Path], Path] | None = None


KINDS: dict[str, ModelKind] = {}


def register_kind(name: str, kind: ModelKind) -> None:
    KINDS[name] = kind


_plugins_loaded = False


def kind_of(meta: ModelMeta, where: Path | str = "") -> ModelKind:
    """The registered kind of a model file, loading the installed plugins (once) if it is not known yet."""
    global _plugins_loaded
    if meta.kind not in KINDS and not _plugins_loaded:
        _plugins_loaded = True
        for entry in entry_points(group=ENTRY_POINTS):
            try:
                entry.load()  # the plugin's module registers its kinds when imported
            except Exception as exc:  # a broken plugin must not hide which one it is
                raise DisbackError(f"the disback plugin '{entry.name}' ({entry.value}) failed to load: {exc}") from exc
    if meta.kind not in KINDS:
        raise DisbackError(
            f"{where or 'the model'} is a model of kind '{meta.kind}', which no installed disback plugin "
            f"provides (known kinds: {', '.join(sorted(KINDS))}); plugins register through the entry "
            f"point group {ENTRY_POINTS}, so disback must be installed (pip install -e .)"
        )
    return KINDS[meta.kind]


# ---------------------------------------------------------------- edm: our own networks


def edm_meta(
    network: NetworkConfig, shape: tuple[int, ...], edm: EDMConfig, normaliser: dict[str, Any], data: str
) -> ModelMeta:
    """A teacher trained here: everything needed to rebuild it, sample it, and map its outputs to the data's units."""
    return ModelMeta(
        role="denoiser",
        kind="edm",
        shape=list(shape),
        normaliser=normaliser,
        data=data,
        num_classes=network.num_classes,
        edm=asdict(edm),
        spec={"network": asdict(network), "sigma_data": edm.sigma_data},
    )


def _rebuild_edm(meta: ModelMeta, folder: Path) -> nn.Module:
    return build_denoiser(NetworkConfig(**meta.spec["network"]), tuple(meta.shape), meta.edm["sigma_data"])


# ---------------------------------------------------------------- vp: pretrained diffusers UNet2DModel


def unet_spec(unet: nn.Module, scheduler: Any, prediction: str) -> dict[str, Any]:
    """A diffusers UNet's config, its schedule's length and prediction type: what a VP kind rebuilds it from (the
    schedule itself is a buffer, loaded with the weights)."""
    config = {k: v for k, v in json.loads(unet.to_json_string()).items() if not k.startswith("_")}
    return {"unet_config": config, "num_timesteps": len(scheduler.alphas_cumprod), "prediction_type": prediction}


def _rebuild_vp(meta: ModelMeta, folder: Path) -> nn.Module:
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(meta.spec["unet_config"])
    return VPDenoiser(unet, torch.full((meta.spec["num_timesteps"],), 0.5), meta.spec["prediction_type"])


def import_pretrained(source: str) -> tuple[VPDenoiser, ModelMeta]:
    """A diffusers UNet2DModel and its scheduler, from a local folder or a hub id, as a VP denoiser.

    Accepts a pipeline folder (``unet/`` and ``scheduler/`` subfolders) or a model folder (the UNet's config.json and
    scheduler_config.json side by side), as the hub's DDPM models are laid out. Its images live in [-1, 1] (the
    normaliser); the EDM sampling settings and the data's name are the caller's to fill in.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    unet = _from_pretrained(UNet2DModel, source, "unet")
    scheduler = _from_pretrained(DDPMScheduler, source, "scheduler")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    meta = ModelMeta(
        role="denoiser",
        kind="vp",
        shape=[unet.config.in_channels, unet.config.sample_size, unet.config.sample_size],
        normaliser={"mean": 0.5, "scale": 0.5},
        spec=unet_spec(unet, scheduler, prediction),
        source=str(source),
        num_classes=unet.config.num_class_embeds or 0,
    )  # diffusers images live in [-1, 1]
    return VPDenoiser(unet, scheduler.alphas_cumprod, prediction), meta


def _from_pretrained(cls, source: str, subfolder: str):
    """``cls.from_pretrained`` (or a loader such as ``load_config``) from the subfolder, else the top level."""
    load = cls.from_pretrained if isinstance(cls, type) else cls
    errors = []
    for sub in (subfolder, None):
        try:
            return load(source, subfolder=sub) if sub else load(source)
        except (OSError, ValueError, EnvironmentError) as exc:
            errors.append(str(exc).splitlines()[0])
    name = getattr(cls, "__self__", cls).__name__  # a bound classmethod such as load_config: its class
    raise DisbackError(
        f"cannot load a diffusers {name} from '{source}' (tried '{subfolder}/' and the top level): {errors[-1]}"
    )


def pretrained_shape(source: str) -> tuple[int, int, int]:
    """(channels, resolution, classes) of a pretrained teacher, read from its snapshot or its UNet's config, so that
    the data can be read at its size before the teacher is imported."""
    from disback.storage.nvlabs import is_snapshot, shape_of

    if is_snapshot(source):
        return shape_of(source)
    from diffusers import UNet2DModel

    config = _from_pretrained(UNet2DModel.load_config, source, "unet")
    return int(config["in_channels"]), int(config["sample_size"]), int(config.get("num_class_embeds") or 0)


def _rebuild_nvlabs(meta: ModelMeta, folder: Path) -> nn.Module:
    from disback.storage.nvlabs import rebuild

    return rebuild(meta, folder)


register_kind("edm", ModelKind(rebuild=_rebuild_edm))
register_kind("vp", ModelKind(rebuild=_rebuild_vp))
register_kind("nvlabs", ModelKind(rebuild=_rebuild_nvlabs))
