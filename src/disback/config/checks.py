"""Every check of a configuration's values, with an error that names the key and the fix. A run whose settings pass
here fails later only for reasons outside the config (a missing file, data that does not fit the teacher, a launch
with too few processes)."""

from __future__ import annotations

import difflib
import importlib.util

from disback.config.choices import (
    METHODS,
    NETWORKS,
    NOISE_LEVELS,
    ON_NONFINITE,
    PRECISIONS,
    SCHEDULES,
    SPACINGS,
    STEP_INPUTS,
    TRACKER_PACKAGES,
    TRACKERS,
    described,
)
from disback.config.schema import Config
from disback.errors import DisbackError

_POSITIVE = {
    "data": ["n_eval"],
    "network": ["hidden", "depth", "emb_dim", "layers_per_block", "norm_groups"],
    "edm": ["sigma_data", "sigma_min", "sigma_max", "rho", "p_std"],
    "teacher": ["steps", "batch", "lr", "heun_steps"],
    "degrade": ["steps", "nodes", "batch", "lr"],
    "distill": ["steps", "batch", "lr_generator", "lr_fake", "switch_every", "sigma_min", "sigma_max"],
    "eval": ["every", "projections", "threshold_factor", "classifier_steps"],
    "run": ["keep", "max_skipped"],
}

_CHOICES = {
    "network.kind": NETWORKS,
    "degrade.spacing": SPACINGS,
    "distill.schedule": SCHEDULES,
    "distill.method": METHODS,
    "distill.step_input": STEP_INPUTS,
    "distill.noise": NOISE_LEVELS,
    "run.on_nonfinite": ON_NONFINITE,
    "run.precision": PRECISIONS,
    "run.log_with": TRACKERS,
}


def validate(cfg: Config) -> Config:
    """``cfg`` if every value is allowed; otherwise a DisbackError naming the first one that is not."""
    for key, table in _CHOICES.items():
        section, name = key.split(".")
        check_choice(key, getattr(getattr(cfg, section), name), table)
    for section, keys in _POSITIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if not value > 0:
                raise DisbackError(f"'{section}.{key}' must be positive, got {value}; e.g. --set {section}.{key}=...")
    e = cfg.edm
    if e.s_churn < 0 or e.s_noise <= 0 or e.s_min > e.s_max:
        raise DisbackError(
            f"the stochastic sampler needs edm.s_churn >= 0, edm.s_noise > 0 and edm.s_min <= edm.s_max; got "
            f"{e.s_churn}, {e.s_noise}, {e.s_min}, {e.s_max} (EDM's ImageNet values: 40, 1.003, 0.05, 50)"
        )
    if cfg.run.checkpoint_every < 0:
        raise DisbackError(
            f"'run.checkpoint_every' must be 0 (no checkpoints) or positive, got {cfg.run.checkpoint_every}; "
            "e.g. --set run.checkpoint_every=500"
        )
    for key in ("resolution", "max_sequence_length", "shift"):
        if getattr(cfg.text, key) < 0:
            raise DisbackError(f"'text.{key}' must be 0 (the teacher's own) or positive, got {getattr(cfg.text, key)}")
    _tracker(cfg)
    _steps(cfg)
    _teacher_and_stage1(cfg)
    _distillation(cfg)
    _network_and_data(cfg)
    return cfg


def check_choice(key: str, value: str, table: dict) -> None:
    if value not in table:
        hint = difflib.get_close_matches(value, list(table), n=1)
        raise DisbackError(
            f"'{key}' must be one of {', '.join(table)}, got '{value}'"
            + (f"; did you mean '{hint[0]}'?" if hint else f" ({described(table)})")
        )


def _tracker(cfg: Config) -> None:
    kind = cfg.run.log_with
    if kind and not any(importlib.util.find_spec(m) for m in TRACKER_PACKAGES[kind]):
        raise DisbackError(
            f"run.log_with={kind} needs the {TRACKER_PACKAGES[kind][0]} package: pip install "
            f"{TRACKER_PACKAGES[kind][0]} (or leave run.log_with empty)"
        )


def _steps(cfg: Config) -> None:
    """The generator's noise levels (distill.sigma_g) and text timesteps (text.timestep): one, or a strictly
    descending list."""
    for key, value, example in (
        ("distill.sigma_g", cfg.distill.sigma_g, "[80, 2.5, 0.6]"),
        ("text.timestep", cfg.text.timestep, "[999, 749, 499, 249]"),
    ):
        values = value if isinstance(value, list) else [value]
        if not values or any(v <= 0 for v in values[:-1]) or values[-1] < 0:
            raise DisbackError(
                f"'{key}' must be positive (a level, or a list of levels such as {example}), got {value}"
            )
        if any(a <= b for a, b in zip(values, values[1:])):
            raise DisbackError(
                f"'{key}' lists the generator's steps from the noisiest down, so it must be strictly descending, "
                f"e.g. {example}; got {value}"
            )
    levels = cfg.distill.sigma_g if isinstance(cfg.distill.sigma_g, list) else [cfg.distill.sigma_g]
    if levels[0] <= 0 or levels[0] > cfg.edm.sigma_max or (len(levels) > 1 and levels[-1] < cfg.edm.sigma_min):
        raise DisbackError(
            f"'distill.sigma_g' {cfg.distill.sigma_g} leaves the teacher's noise range [edm.sigma_min "
            f"{cfg.edm.sigma_min}, edm.sigma_max {cfg.edm.sigma_max}]; choose levels inside it"
        )
    rank = cfg.network.generator_lora_rank
    if rank < 0 or (rank and cfg.run.fsdp):
        raise DisbackError(
            f"'network.generator_lora_rank' must be 0 (a full generator) or a LoRA rank, without run.fsdp (adapters are "
            f"small: data parallel suffices); got {rank}" + (" with run.fsdp" if cfg.run.fsdp else "")
        )


def _teacher_and_stage1(cfg: Config) -> None:
    if not 0.0 <= cfg.teacher.ema_decay < 1.0:
        raise DisbackError(f"'teacher.ema_decay' must be in [0, 1), got {cfg.teacher.ema_decay}")
    deg = cfg.degrade
    if deg.nodes > deg.steps:
        raise DisbackError(
            f"'degrade.nodes' ({deg.nodes}) cannot exceed 'degrade.steps' ({deg.steps}): each node needs at "
            "least one training step"
        )
    if not 0.0 <= deg.plateau < 1.0:
        raise DisbackError(f"'degrade.plateau' must be in [0, 1) (0 = never stop early), got {deg.plateau}")
    if deg.probes < 0:
        raise DisbackError(f"'degrade.probes' must be 0 (automatic: 16 per node) or more, got {deg.probes}")
    if deg.candidates < 2:
        raise DisbackError(f"'degrade.candidates' must be at least 2, got {deg.candidates}")


def _distillation(cfg: Config) -> None:
    d = cfg.distill
    if d.fake_updates < 0:
        raise DisbackError(f"'distill.fake_updates' must be 0 or more, got {d.fake_updates}")
    need = METHODS[d.method].min_fake_updates
    if d.fake_updates < need:
        raise DisbackError(
            f"method {d.method} updates the fake score on a faster time-scale, so distill.fake_updates must be "
            f"{need} or more (DMD2 uses 5), got {d.fake_updates}; e.g. --set distill.fake_updates={need}"
        )
    for key in ("gan_weight", "gan_head_weight"):
        if getattr(d, key) < 0:
            raise DisbackError(f"'distill.{key}' must be 0 or more, got {getattr(d, key)}")
    if not 0.0 < d.switch_ratio < 1.0:
        raise DisbackError(f"'distill.switch_ratio' must be in (0, 1), got {d.switch_ratio}")
    if not 1 <= d.min_dwell <= d.max_dwell:
        raise DisbackError(f"need 1 <= 'distill.min_dwell' ({d.min_dwell}) <= 'distill.max_dwell' ({d.max_dwell})")
    for name, section in (("edm", cfg.edm), ("distill", d)):
        if section.sigma_min >= section.sigma_max:
            raise DisbackError(
                f"'{name}.sigma_min' ({section.sigma_min}) must be below '{name}.sigma_max' ({section.sigma_max})"
            )


def _network_and_data(cfg: Config) -> None:
    net, data = cfg.network, cfg.data
    if net.lora_rank < 0:
        raise DisbackError(
            f"'network.lora_rank' must be 0 (full copies of the teacher) or a positive LoRA rank, got {net.lora_rank}"
        )
    if cfg.run.fsdp and net.lora_rank:
        raise DisbackError(
            "run.fsdp shards full networks; with network.lora_rank the trained adapters are small and the "
            "teacher is frozen: use data parallel alone (run.fsdp=false)"
        )
    if net.num_classes < 0 or (net.num_classes and net.kind != "unet"):
        raise DisbackError(
            f"'network.num_classes' must be 0, or positive with network.kind 'unet'; got {net.num_classes} "
            f"with '{net.kind}'"
        )
    if net.kind == "unet":
        if not net.channels or len(net.attention) != len(net.channels):
            raise DisbackError(
                f"'network.attention' needs one true/false per level of 'network.channels' ({net.channels})"
            )
        if any(c % net.norm_groups for c in net.channels):
            raise DisbackError(
                f"every entry of 'network.channels' ({net.channels}) must be a multiple of "
                f"'network.norm_groups' ({net.norm_groups})"
            )
        if data.resolution % 2 ** (len(net.channels) - 1):
            raise DisbackError(
                f"'data.resolution' ({data.resolution}) must be divisible by 2^(levels-1) = "
                f"{2 ** (len(net.channels) - 1)}"
            )
        if data.channels not in (1, 3):
            raise DisbackError(f"'data.channels' must be 1 or 3 for images, got {data.channels}")
    if data.n_train < 0 or (data.channels == 0 and data.n_train < 1):
        raise DisbackError(f"'data.n_train' must be positive for point data, got {data.n_train}")
    if data.n_eval < 10:
        raise DisbackError(f"'data.n_eval' must be at least 10, got {data.n_eval}")
