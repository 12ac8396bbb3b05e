"""Networks to start from: a one-step generator distilled before (``--generator``) or a trained fake score
(``--fake``), in the formats the field publishes, converted once into a disback model file.

Accepted sources: a disback model file (generator.safetensors, fake.safetensors), a run or demo folder holding one, a
diffusers pipeline folder (its ``unet/`` or ``transformer/``), a diffusers UNet or transformer folder (config.json and
its weights), a state dict as ``.safetensors`` or ``.bin`` (the format DMD2 and the original DisBack release publish;
for an EDM teacher, with EDM's key names, as DMD2's ImageNet generator), read with ``torch.load(weights_only=True)``,
or an EDM / EDM2 network snapshot ``.pkl`` (SiD publishes its generators so), read by disback.storage.snapshot; never
a full unpickle. The network is built on the teacher's architecture, keys and shapes must match exactly, and half-
precision weights are upcast. Every check runs before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from disback.diffusion.generator import levels
from disback.errors import DisbackError
from disback.storage.files import sha256_file
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.snapshot import read_snapshot
from disback.storage.weights import check_state, load_state, read_metadata

RUN_FILES = {"generator": "generator.safetensors", "denoiser": "fake.safetensors"}  # what a run folder holds
# A UNet folder's weights in order of preference (full precision first): one file, or the index of a sharded save
# (save_pretrained splits a UNet above max_shard_size, 10 GB: an fp32 SDXL UNet), with diffusers' variant names.
UNET_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.fp16.json",
    "diffusion_pytorch_model.fp16.bin",
    "diffusion_pytorch_model.bin.index.fp16.json",
)
ACCEPTED = (
    "a disback generator.safetensors / fake.safetensors, a run folder, a diffusers pipeline folder, a diffusers "
    "UNet folder, a UNet or EDM state dict (.safetensors or .bin), or an EDM network snapshot (.pkl)"
)


def locate(source: Path, role: str) -> tuple[str, Path]:
    """What ``source`` is: ("disback", model file), ("unet-folder", folder), ("state-dict", file) or
    ("edm-snapshot", file)."""
    source = Path(source)
    if source.is_dir():
        for file in (source / RUN_FILES[role], source / "disback" / RUN_FILES[role]):
            if file.is_file():
                return "disback", file
        for folder in (source / "unet", source / "transformer", source):
            if (folder / "config.json").is_file():
                return "unet-folder", folder
        raise DisbackError(f"{source} holds no network to start from; give {ACCEPTED}")
    if not source.is_file():
        raise DisbackError(f"{source} does not exist; give {ACCEPTED}")
    if source.suffix == ".safetensors":
        return ("disback" if read_metadata(source) else "state-dict"), source
    if source.suffix in (".bin", ".pt", ".pth"):
        return "state-dict", source
    if source.suffix == ".pkl":
        return "edm-snapshot", source
    raise DisbackError(f"{source}: a network must be given as {ACCEPTED}, not a '{source.suffix}' file")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A flat dict of tensors from .safetensors, or from a .bin read with weights_only (a pickle holding anything
    but tensors is refused, not run)."""
    file = Path(file)
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that is not a safe state dict fails in many ways (KeyError for random bytes)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DisbackError(
            f"{file} is not a state dict of tensors that can be read safely ({first}); disback reads "
            ".bin files with torch.load(weights_only=True) and never unpickles other objects"
        ) from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DisbackError(
            f"{file} holds {type(state).__name__}, not a flat dict of parameter names to tensors (a UNet's state_dict)"
        )
    prefixes = sorted({k.split(".")[0] + "." for k in state if "." in k})
    if len(prefixes) > 1 and all("unet" in p for p in prefixes):  # e.g. DMD2's guidance model: real_unet., fake_unet.
        raise DisbackError(
            f"{file} holds several networks (keys under {', '.join(prefixes)}); save the one UNet you mean on "
            "its own: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}"
        )
    return state


def unet_weights(folder: Path) -> tuple[Path, list[Path]]:
    """A diffusers UNet folder's weights: (the file that names them, the files that hold them): one file, or the
    index of a sharded save and its shards."""
    for name in UNET_WEIGHTS:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".json"):
            return file, [file]
        try:
            names = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise DisbackError(f"{file} is not a shard index with a weight_map ({exc})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DisbackError(f"{file} names shards that are not in {folder}: {', '.join(missing[:3])}")
        return file, [folder / n for n in names]
    raise DisbackError(f"{folder} has a config.json but no weights ({', '.join(UNET_WEIGHTS)})")


def unet_of(network: nn.Module, where: Path) -> nn.Module:
    """The diffusers UNet inside one of our networks (a generator or a denoiser), which a UNet state dict loads into."""
    from diffusers import ModelMixin

    found = next((m for m in network.modules() if isinstance(m, ModelMixin)), None)
    if found is None:
        raise DisbackError(
            f"{where} is a UNet, and the teacher's network has none (it is a {type(network).__name__}); "
            "give a disback model file"
        )
    return found


def check_unet_config(folder: Path, unet: nn.Module) -> None:
    """A diffusers UNet folder's config against the teacher's UNet: the sizes that weights alone do not show."""
    config = json.loads((folder / "config.json").read_text())
    kind = config.get("_class_name")
    if kind and kind != type(unet).__name__:
        raise DisbackError(
            f"{folder} is a {kind}, and the teacher's network is a {type(unet).__name__}; give one of those"
        )
    differ = [
        f"{k}: {config[k]!r} here, {unet.config[k]!r} for the teacher"
        for k in (
            "sample_size",
            "in_channels",
            "out_channels",
            "num_class_embeds",
            "cross_attention_dim",
            "addition_embed_type",
            "patch_size",
            "num_layers",
            "num_single_layers",
            "joint_attention_dim",
            "guidance_embeds",
        )
        if k in config and k in unet.config and config[k] != unet.config[k]
    ]
    if differ:
        raise DisbackError(f"{folder} is a network of another architecture than the teacher's ({'; '.join(differ)})")


def upcast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Half-precision weights (DMD2 publishes fp16) as fp32, for training."""
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float64 else v for k, v in state.items()}


@dataclass
class Start:
    """A network to start from, read and its format known, not yet loaded into one of ours."""

    source: Path
    role: str  # "generator", or "denoiser" for a fake score
    fmt: str  # "disback", "unet-folder" or "state-dict"
    file: Path  # the weights read
    state: dict[str, torch.Tensor]  # upcast to fp32
    meta: ModelMeta | None  # a disback file's own description
    origin: dict[
        str, Any
    ]  # recorded in the converted file: source, format, weights file, its sha256, dtypes (a disback
    #                         file converted from elsewhere keeps its own origin)


def read_start(source: Path, role: str) -> Start:
    """``source`` read as a ``role`` to start from (format, weights and where they came from); nothing is written."""
    fmt, found = locate(source, role)
    meta = read_meta(found) if fmt == "disback" else None
    if meta is not None and meta.role != role:
        raise DisbackError(f"{found} is a {meta.role}, and a {role} is wanted here")
    weights, shards = (found, [found]) if fmt != "unet-folder" else unet_weights(found)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(read_snapshot(shard).state if fmt == "edm-snapshot" else read_state_dict(shard))
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    origin = {
        "source": str(Path(source).resolve()),
        "format": fmt,
        "file": str(Path(weights).resolve()),
        "sha256": sha256_file(weights),
        "dtype": dtypes,
    }
    if shards != [weights]:  # sharded: the index names the shards, and the shards' own digests identify the weights
        origin["shards"] = {p.name: sha256_file(p) for p in shards}
        listing = "".join(f"{name}:{digest}\n" for name, digest in sorted(origin["shards"].items()))
        origin["sha256"] = hashlib.sha256(listing.encode()).hexdigest()
    if meta is not None and meta.origin:  # a file converted before keeps the origin of what it was converted from
        origin = meta.origin
    return Start(Path(source), role, fmt, Path(found if fmt == "unet-folder" else weights), upcast(state), meta, origin)


def load_start(
    network: nn.Module,
    start: Start,
    teacher_meta: ModelMeta,
    *,
    sigma_g: float,
    lora_rank: int = 0,
    check_only: bool = False,
) -> ModelMeta:
    """Load ``start`` into ``network`` (a generator or a fake score built on the teacher) after checking that it was made
    for this teacher and these settings; returns the description of the loaded network, its origin included. With
    ``check_only``, every check runs and nothing is copied."""
    wanted = made_for(start, teacher_meta, sigma_g=sigma_g, lora_rank=lora_rank)
    if start.fmt == "disback":
        (check_state if check_only else load_state)(network, start.state, start.file)
    elif teacher_meta.kind == "nvlabs":
        fit_edm(network, start, lora_rank=lora_rank, check_only=check_only)
    else:
        fit_unet(unet_of(network, start.file), start, sigma_g=sigma_g, lora_rank=lora_rank, check_only=check_only)
    return replace(wanted, origin=start.origin)


def made_for(start: Start, teacher_meta: ModelMeta, *, sigma_g: float, lora_rank: int = 0) -> ModelMeta:
    """The description ``start`` must have to start this run's ``start.role`` on this teacher; a disback file's own
    description is checked against it here (kind, shape, classes, sigma_g, LoRA rank), from metadata alone."""
    wanted = teacher_meta.as_generator(sigma_g) if start.role == "generator" else teacher_meta.as_adapters(lora_rank)
    if start.fmt == "disback":
        _check_same_teacher(start, wanted)
    return wanted


def fit_edm(network: nn.Module, start: Start, *, lora_rank: int = 0, check_only: bool = False) -> None:
    """An EDM snapshot or a state dict with EDM's key names (DMD2's ImageNet generator) into the teacher's
    preconditioned network inside ``network``, key by key."""
    from disback.diffusion.preconditioners import PRECONDITIONERS

    if start.fmt == "unet-folder":
        raise DisbackError(
            f"{start.source} is a diffusers UNet, and the teacher is an EDM network; give its .pkl or state dict"
        )
    if start.role == "denoiser" and lora_rank:
        raise DisbackError(
            f"{start.source} is a whole network, and with network.lora_rank={lora_rank} the fake score is LoRA "
            "adapters on the teacher; set network.lora_rank=0 to start the fake score from it"
        )
    kinds = tuple(PRECONDITIONERS.values())
    precond = next((m for m in network.modules() if isinstance(m, kinds)), None)
    if precond is None:
        raise DisbackError(f"{start.source}: the teacher's network holds no EDM preconditioner to load it into")
    try:
        (check_state if check_only else load_state)(precond, start.state, Path(start.origin["file"]))
    except DisbackError as exc:
        raise DisbackError(f"{exc} Is this a network of another EDM architecture than the teacher's?") from None


def fit_unet(unet: nn.Module, start: Start, *, sigma_g: float, lora_rank: int = 0, check_only: bool = False) -> None:
    """A UNet folder or state dict into the teacher's diffusers UNet (``unet`` may live on the meta device when
    ``check_only``). A bare state dict does not record its resolution (a UNet's weights do not depend on it); a UNet
    folder's config does, and is checked."""
    if start.role == "denoiser" and lora_rank:
        raise DisbackError(
            f"{start.source} is a whole UNet, and with network.lora_rank={lora_rank} the fake score is LoRA "
            "adapters on the teacher; give the fake.safetensors of a LoRA run of that rank, or set "
            "network.lora_rank=0"
        )
    if start.fmt == "unet-folder":
        check_unet_config(start.file, unet)
        _check_pipeline(start.file.parent if start.file.name == "unet" else start.file, start.role, sigma_g)
    try:
        (check_state if check_only else load_state)(unet, start.state, Path(start.origin["file"]))
    except DisbackError as exc:
        raise DisbackError(
            f"{exc} The teacher's UNet is a {type(unet).__name__}: is this a UNet of another model?"
        ) from None


def _check_same_teacher(start: Start, wanted: ModelMeta) -> None:
    meta, file = start.meta, start.file
    for name in ("kind", "shape", "num_classes"):
        if getattr(meta, name) != getattr(wanted, name):
            raise DisbackError(
                f"{file} has {name} {getattr(meta, name)!r} and the teacher {getattr(wanted, name)!r}: it was "
                "made for another teacher"
            )
    if meta.role == "generator" and meta.sigma_g != wanted.sigma_g:
        raise DisbackError(
            f"{file} is a generator at sigma_g {meta.sigma_g}, and this run's distill.sigma_g is "
            f"{wanted.sigma_g}; set --set distill.sigma_g={meta.sigma_g}"
        )
    if meta.adapter_rank != wanted.adapter_rank:
        raise DisbackError(
            f"{file} holds {'LoRA adapters of rank ' + str(meta.adapter_rank) if meta.adapter_rank else 'a whole network'}"
            f", and this run's fake score is {'LoRA rank ' + str(wanted.adapter_rank) if wanted.adapter_rank else 'a whole network'}; "
            f"use --set network.lora_rank={meta.adapter_rank}"
        )


def _check_pipeline(folder: Path, role: str, sigma_g: float) -> None:
    """An exported disback pipeline records its generator's sigma_g: it must be this run's."""
    index = folder / "model_index.json"
    if role != "generator" or not index.is_file():
        return
    config: dict[str, Any] = json.loads(index.read_text())
    if "sigma_g" in config and levels(config["sigma_g"]) != levels(sigma_g):
        raise DisbackError(
            f"{folder} is a generator pipeline at sigma_g {config['sigma_g']}, and this run's distill.sigma_g "
            f"is {sigma_g}; set --set distill.sigma_g={config['sigma_g']}"
        )
