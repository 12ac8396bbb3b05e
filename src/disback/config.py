"""Typed configuration. Values live in YAML presets (``disback/presets``); this module only gives them types
and checks them, so a misspelt key or an out-of-range value fails before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from disback.errors import DisbackError


@dataclass
class DataConfig:
    name: str  # built-in (`disback list`), or a file / folder of the user's: .npy/.csv points, .npz or a folder of images
    n_train: int  # points drawn once from a built-in 2-D distribution (ignored by data sets of fixed size)
    n_eval: int  # generator samples per evaluation (and reference points for built-in 2-D data)
    root: str = ""  # where a built-in image data set lives, if not in its usual place
    resolution: int = 0  # images: side in pixels that every image is resized to (0 for point data)
    channels: int = 0  # images: 1 (grayscale) or 3 (RGB) (0 for point data)


@dataclass
class NetworkConfig:
    kind: str  # "mlp" for points, "unet" (diffusers UNet2DModel) for images
    hidden: int = 128  # mlp
    depth: int = 3  # mlp
    emb_dim: int = 32  # mlp
    channels: list[int] = field(default_factory=lambda: [32, 64])  # unet: block_out_channels
    layers_per_block: int = 1  # unet
    attention: list[bool] = field(default_factory=lambda: [False, True])  # unet: self-attention in each level
    norm_groups: int = 8  # unet
    num_classes: int = 0  # unet: > 0 makes every network class-conditional (UNet2DModel's num_class_embeds)
    lora_rank: int = 0  # > 0: the fake score and the degrading model are LoRA adapters on the frozen teacher (disback.lora)


@dataclass
class EDMConfig:
    sigma_data: float  # data are standardised to unit scale, so 1.0 fits every point set
    sigma_min: float
    sigma_max: float
    rho: float
    p_mean: float  # ln(sigma) ~ N(p_mean, p_std^2) in the denoising score matching loss
    p_std: float


@dataclass
class TeacherConfig:
    steps: int
    batch: int
    lr: float
    ema_decay: float
    heun_steps: int  # steps of the EDM Heun sampler when the teacher is sampled
    pretrained: str = ""  # a diffusers UNet2DModel folder or hub id to distil instead of training a teacher


@dataclass
class DegradeConfig:
    steps: int  # K_1: fine-tuning steps of the teacher copy on initial-generator samples
    nodes: int  # N: nodes after the teacher; the path holds N + 1
    batch: int
    lr: float
    spacing: str = "distance"  # where nodes go: "steps" (every K_1/N steps, the paper), "geometric", "distance"
    probes: int = 0  # distance measurements during stage 1 (dense early); 0 = 16 per node
    candidates: int = 4  # "distance": checkpoints per node held in CPU memory until the nodes are chosen
    plateau: float = 0.05  # "distance" only: end stage 1 once the distance grew < this fraction over the last half


@dataclass
class DistillConfig:
    steps: int  # generator steps ("iterations")
    batch: int
    lr_generator: float
    lr_fake: float
    fake_updates: int  # fake-score updates per generator update
    sigma_g: float  # the generator is one denoiser call at this noise level
    switch_every: int  # M: generator steps between target switches ("fixed" schedule)
    sigma_min: float  # noise levels of the generator loss, spread on the Karras schedule
    sigma_max: float
    method: str = "dmd"  # generator loss: "vsd" (Diff-Instruct), "dmd", "dmd2" (DMD + GAN term), "sid"
    sid_alpha: float = 1.2  # sid: the alpha of SiD's loss (1.2 in the SiD paper)
    gan_weight: float = 0.003  # dmd2: weight of the GAN term in the generator's loss (DMD2's ImageNet value)
    gan_head_weight: float = 0.01  # dmd2: weight of the GAN head's loss in the fake score's loss (DMD2's)
    schedule: str = "warm_start"  # how the target walks back: "fixed" (every switch_every steps, the paper),
    #                             "adaptive" (when the generator has caught up), "warm_start" (teacher at once)
    switch_ratio: float = 0.5  # adaptive: advance when the fake-target gap falls to this fraction of its start
    min_dwell: int = 10  # adaptive: generator steps on a node before it may advance (both bounds shrink so that
    #                      the walk reaches the teacher by half of distill.steps)
    max_dwell: int = 100  # adaptive: generator steps after which it advances regardless
    reuse_samples: bool = False  # DMD2's order: the generator step first, and its samples (detached) train the fake
    #                              score's first update, which so skips a generator forward pass


@dataclass
class EvalConfig:
    every: int  # evaluate every this many iterations
    projections: int  # directions of the sliced Wasserstein distance
    threshold_factor: float  # "converged" = the measure at most this times the teacher's
    features: str = "classifier"  # images: "classifier" (trained on the data, cached) or "module:function"
    classifier_steps: int = 1500  # images: training steps of that classifier


@dataclass
class RunConfig:
    checkpoint_every: int = 500  # steps between checkpoints of every stage (and one at its end); resume with --resume
    keep: int = 2  # checkpoints kept per stage; older ones are deleted only once a newer one is complete
    on_nonfinite: str = "stop"  # a non-finite loss: "stop" (clear error, last good checkpoint kept) or "skip" the update
    max_skipped: int = 20  # "skip": stop after this many consecutive skipped steps
    precision: str = "fp32"  # "bf16": autocast in bf16 with fp32 master weights, and the frozen target held in bf16
    channels_last: bool = False  # UNets in channels-last memory format (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the networks' forward (state_dict keys unchanged)
    gradient_checkpointing: bool = False  # UNets recompute activations in the backward pass: less memory, more time
    fsdp: bool = False  # several processes: stages 1 and 2 shard their trained networks and Adam states (FSDP2);
    #                     a teacher trained here is data parallel (docs/scaling.md)


@dataclass
class TextConfig:
    """Text-to-image runs (`disback text`): the pipeline's UNet distilled on a prompts file."""

    guidance: float = 8.0  # classifier-free guidance scale of the target score (the original's 8); none on the fake score
    timestep: int = 399  # the generator is the UNet at this timestep on pure noise, as LCMScheduler samples in one step


@dataclass
class Config:
    seed: int
    data: DataConfig
    network: NetworkConfig
    edm: EDMConfig
    teacher: TeacherConfig
    degrade: DegradeConfig
    distill: DistillConfig
    eval: EvalConfig
    run: RunConfig = field(default_factory=RunConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        _check(self)
        return self


# ---------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("disback.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (``toy2d``) or a YAML file the user wrote."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DisbackError(f"config file {path} does not exist")
        return _read_yaml(path.read_text(), str(path))
    names = preset_names()
    if name_or_path not in names:
        hint = difflib.get_close_matches(name_or_path, names, n=1)
        raise DisbackError(
            f"unknown preset '{name_or_path}'"
            + (f"; did you mean '{hint[0]}'?" if hint else "")
            + f" Presets: {', '.join(names)}, or a path to a .yaml file."
        )
    return _read_yaml(resources.files("disback.presets").joinpath(f"{name_or_path}.yaml").read_text(), name_or_path)


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise DisbackError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DisbackError(f"{where} must hold a mapping of sections (data:, teacher:, ...), not {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["distill.steps=500", "seed=3"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DisbackError(f"--set expects KEY=VALUE (e.g. distill.steps=500), got '{item}'")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def build_config(preset: str = "toy2d", config_file: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Preset, then the user's YAML file, then command-line overrides; typed and validated."""
    raw = load_preset(preset)
    if config_file:
        raw = merge(raw, load_preset(config_file))
    if overrides:
        raw = merge(raw, overrides)
    return from_dict(Config, raw, "").validate()


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, naming any unknown, missing or mistyped key."""
    label = where or "the config"
    if not isinstance(raw, dict):
        raise DisbackError(f"{label} must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            raise DisbackError(
                f"unknown key '{_join(where, key)}'"
                + (f"; did you mean '{_join(where, hint[0])}'?" if hint else "")
                + f" Valid keys here: {', '.join(names)}."
            )
    values = {}
    optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], _join(where, name))
        elif name not in optional:
            raise DisbackError(f"missing key '{_join(where, name)}' in the config")
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if get_origin(kind) is list:
        if not isinstance(value, list):
            raise DisbackError(f"'{where}' must be a list, e.g. [32, 64], got {value!r}")
        return [_coerce(get_args(kind)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise DisbackError(f"'{where}' must be {kind.__name__}, got {value!r}")


# ---------------------------------------------------------------- range checks

SPACINGS = ("steps", "geometric", "distance")
SCHEDULES = ("fixed", "adaptive", "warm_start")
METHODS = ("vsd", "dmd", "dmd2", "sid")  # disback.tasks.METHODS holds what they do


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        raise DisbackError(f"'{key}' must be one of {', '.join(choices)}, got '{value}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))

_POSITIVE = {
    "data": ["n_eval"],
    "network": ["hidden", "depth", "emb_dim", "layers_per_block", "norm_groups"],
    "edm": ["sigma_data", "sigma_min", "sigma_max", "rho", "p_std"],
    "teacher": ["steps", "batch", "lr", "heun_steps"],
    "degrade": ["steps", "nodes", "batch", "lr"],
    "distill": ["steps", "batch", "lr_generator", "lr_fake", "sigma_g", "switch_every", "sigma_min", "sigma_max"],
    "eval": ["every", "projections", "threshold_factor", "classifier_steps"],
}


def _check(cfg: Config) -> None:
    for section, keys in _POSITIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if not value > 0:
                raise DisbackError(f"'{section}.{key}' must be positive, got {value}; e.g. --set {section}.{key}=...")
    if not 0.0 <= cfg.teacher.ema_decay < 1.0:
        raise DisbackError(f"'teacher.ema_decay' must be in [0, 1), got {cfg.teacher.ema_decay}")
    if cfg.distill.fake_updates < 0:
        raise DisbackError(f"'distill.fake_updates' must be 0 or more, got {cfg.distill.fake_updates}")
    if cfg.degrade.nodes > cfg.degrade.steps:
        raise DisbackError(
            f"'degrade.nodes' ({cfg.degrade.nodes}) cannot exceed 'degrade.steps' ({cfg.degrade.steps}): "
            "each node needs at least one training step"
        )
    _check_choice("degrade.spacing", cfg.degrade.spacing, SPACINGS)
    _check_choice("distill.schedule", cfg.distill.schedule, SCHEDULES)
    _check_choice("distill.method", cfg.distill.method, METHODS)
    _check_choice("run.on_nonfinite", cfg.run.on_nonfinite, ("stop", "skip"))
    _check_choice("run.precision", cfg.run.precision, ("fp32", "bf16"))
    for key in ("checkpoint_every", "keep", "max_skipped"):
        if getattr(cfg.run, key) < 1:
            raise DisbackError(f"'run.{key}' must be positive, got {getattr(cfg.run, key)}")
    if cfg.distill.method == "dmd2" and cfg.distill.fake_updates < 2:
        raise DisbackError(f"method dmd2 updates the fake score on a faster time-scale, so distill.fake_updates must be 2 or more "
                           f"(DMD2 uses 5), got {cfg.distill.fake_updates}; e.g. --set distill.fake_updates=2")
    for key in ("gan_weight", "gan_head_weight"):
        if getattr(cfg.distill, key) < 0:
            raise DisbackError(f"'distill.{key}' must be 0 or more, got {getattr(cfg.distill, key)}")
    if not 0.0 <= cfg.degrade.plateau < 1.0:
        raise DisbackError(f"'degrade.plateau' must be in [0, 1) (0 = never stop early), got {cfg.degrade.plateau}")
    if cfg.degrade.probes < 0:
        raise DisbackError(f"'degrade.probes' must be 0 (automatic: 16 per node) or more, got {cfg.degrade.probes}")
    if cfg.degrade.candidates < 2:
        raise DisbackError(f"'degrade.candidates' must be at least 2, got {cfg.degrade.candidates}")
    if not 0.0 < cfg.distill.switch_ratio < 1.0:
        raise DisbackError(f"'distill.switch_ratio' must be in (0, 1), got {cfg.distill.switch_ratio}")
    if not 1 <= cfg.distill.min_dwell <= cfg.distill.max_dwell:
        raise DisbackError(f"need 1 <= 'distill.min_dwell' ({cfg.distill.min_dwell}) <= 'distill.max_dwell' ({cfg.distill.max_dwell})")
    for name, section in (("edm", cfg.edm), ("distill", cfg.distill)):
        if section.sigma_min >= section.sigma_max:
            raise DisbackError(f"'{name}.sigma_min' ({section.sigma_min}) must be below '{name}.sigma_max' ({section.sigma_max})")
    net = cfg.network
    if net.kind not in ("mlp", "unet"):
        raise DisbackError(f"'network.kind' must be 'mlp' (points) or 'unet' (images), got '{net.kind}'")
    if cfg.run.fsdp and net.lora_rank:
        raise DisbackError("run.fsdp shards full networks; with network.lora_rank the trained adapters are small and the "
                           "teacher is frozen: use data parallel alone (run.fsdp=false)")
    if net.lora_rank < 0:
        raise DisbackError(f"'network.lora_rank' must be 0 (full copies of the teacher) or a positive LoRA rank, got {net.lora_rank}")
    if net.num_classes < 0 or (net.num_classes and net.kind != "unet"):
        raise DisbackError(f"'network.num_classes' must be 0, or positive with network.kind 'unet'; got {net.num_classes} with '{net.kind}'")
    if net.kind == "unet":
        if not net.channels or len(net.attention) != len(net.channels):
            raise DisbackError(f"'network.attention' needs one true/false per level of 'network.channels' ({net.channels})")
        if any(c % net.norm_groups for c in net.channels):
            raise DisbackError(f"every entry of 'network.channels' ({net.channels}) must be a multiple of 'network.norm_groups' ({net.norm_groups})")
        if cfg.data.resolution % 2 ** (len(net.channels) - 1):
            raise DisbackError(f"'data.resolution' ({cfg.data.resolution}) must be divisible by 2^(levels-1) = {2 ** (len(net.channels) - 1)}")
        if cfg.data.channels not in (1, 3):
            raise DisbackError(f"'data.channels' must be 1 or 3 for images, got {cfg.data.channels}")
    if cfg.data.n_train < 0 or (cfg.data.channels == 0 and cfg.data.n_train < 1):
        raise DisbackError(f"'data.n_train' must be positive for point data, got {cfg.data.n_train}")
    if cfg.data.n_eval < 10:
        raise DisbackError(f"'data.n_eval' must be at least 10, got {cfg.data.n_eval}")
