"""What a run starts from: a one-step generator or a fake score distilled before (``--generator``, ``--fake``),
checked against the teacher and converted once into the run's folder; and how far that generator starts from the
teacher, measured before training (disback.method.mismatch)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disback.config import Config
from disback.data import Data
from disback.diffusion.generator import with_steps
from disback.method.lora import Adapted
from disback.method.mismatch import score_mismatch
from disback.method.path import DegradationPath
from disback.stages.common import check_data_matches, eval_noise, in_batches, load_teacher
from disback.stages.runtime import accelerator
from disback.storage.external import Start, load_start, made_for, read_start
from disback.storage.kinds import kind_of
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.models import generator_from_teacher, save_model
from disback.storage.nvlabs import import_snapshot, is_snapshot

INITIAL = {"generator": "initial-generator.safetensors", "denoiser": "initial-fake.safetensors"}  # in a run folder


@dataclass
class StartPoint:
    """A network a run starts from (``--generator``, ``--fake``), loaded into one of ours."""

    meta: ModelMeta  # its description, origin included
    in_place: Path | None  # a disback model file, used where it is; None: converted into the run folder


def start_from(
    network: torch.nn.Module, source: Path | None, role: str, teacher: ModelMeta, cfg: Config
) -> StartPoint | None:
    """Load a network to start from (``--generator``: role "generator"; ``--fake``: "denoiser") into ``network``, one
    of ours built on the teacher, after checking that it fits the teacher and the run's settings."""
    if source is None:
        return None
    start = read_start(source, role)
    rank = cfg.network.lora_rank if role == "denoiser" else 0
    meta = load_start(network, start, teacher, sigma_g=cfg.distill.sigma_g, lora_rank=rank)
    return StartPoint(meta, start.file if start.fmt == "disback" else None)


def check_start(source: Path | None, role: str, teacher: torch.nn.Module, meta: ModelMeta, cfg: Config) -> Start | None:
    """``source`` read and checked against the teacher and the run's settings, without loading it anywhere or writing
    anything (the network it is checked against shares the teacher's tensors)."""
    if source is None:
        return None
    start = read_start(source, role)
    rank = cfg.network.lora_rank if role == "denoiser" else 0
    if role == "generator":  # new modules around the teacher's own tensors: the wrapper adds its keys
        shell = copy.deepcopy(teacher, {id(t): t for t in itertools.chain(teacher.parameters(), teacher.buffers())})
        network = kind_of(meta).generator(shell, meta, cfg.distill.sigma_g)
    elif rank:
        flags = [p.requires_grad for p in teacher.parameters()]  # Adapted freezes its base: the teacher
        with torch.random.fork_rng(devices=[]):  # adapters draw their initial weights: the run's RNG stays as it is
            network = Adapted(teacher, rank)
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)
    else:
        network = teacher  # a whole fake score has the teacher's keys and shapes
    load_start(network, start, meta, sigma_g=cfg.distill.sigma_g, lora_rank=rank, check_only=True)
    return start


def check_starts(cfg: Config, teacher_file: Path | None, generator: Path | None, fake: Path | None) -> None:
    """What a job starts from (``--generator``, ``--fake``), checked before it writes anything: read, and checked
    against the teacher when it exists already (a teacher file, or an EDM snapshot to import, which costs one read);
    a teacher the job trains itself is checked against once it exists."""
    if generator is None and fake is None:
        return
    if teacher_file is not None:
        teacher, meta = load_teacher(teacher_file)
    elif is_snapshot(cfg.teacher.pretrained):
        teacher, meta = import_snapshot(cfg.teacher.pretrained, cfg.edm)
    else:
        for source, role in ((generator, "generator"), (fake, "denoiser")):
            if source is not None:
                read_start(source, role)
        return
    check_start(generator, "generator", teacher, meta, cfg)
    check_start(fake, "denoiser", teacher, meta, cfg)


def keep_start(network: torch.nn.Module, start: StartPoint | None, out: Path) -> dict[str, Any] | None:
    """Where a run's start network lies: converted once into ``out`` (safetensors, its origin and sha256 in the
    header), or used where it is when it is a disback file already. None when the run starts from the teacher."""
    if start is None:
        return None
    if start.in_place is not None:
        return {"file": str(start.in_place.resolve()), "origin": start.meta.origin}
    name = INITIAL[start.meta.role]
    save_model(network, Path(out) / name, start.meta)
    return {"file": name, "origin": start.meta.origin}


def convert_start(cfg: Config, teacher_file: Path, source: Path, role: str, out: Path) -> Path:
    """A network to start from as a disback model file: converted once into ``out`` (for a job whose stages all start
    from it), or the disback file given, which the stages check when they load it."""
    start = read_start(source, role)
    rank = cfg.network.lora_rank if role == "denoiser" else 0
    if start.fmt == "disback":  # checked against the teacher now, before any stage; loaded by the stages
        made_for(start, read_meta(teacher_file), sigma_g=cfg.distill.sigma_g, lora_rank=rank)
        return start.file
    teacher, meta = load_teacher(teacher_file)
    network = (
        generator_from_teacher(teacher, meta, cfg.distill.sigma_g) if role == "generator" else copy.deepcopy(teacher)
    )
    save_model(
        network,
        Path(out) / INITIAL[role],
        load_start(network, start, meta, sigma_g=cfg.distill.sigma_g, lora_rank=rank),
    )
    return Path(out) / INITIAL[role]


def start_far(
    cfg: Config, data: Data, teacher_file: Path, path: DegradationPath | None, generator: Path | None = None
) -> dict[str, Any]:
    """How far the initial generator (the teacher's copy, ``generator``, or the one ``path`` was recorded toward)
    starts from the teacher: the teacher's denoising loss on its samples against its loss on data, per band of noise
    levels, and the degradation path's total distance."""
    device = accelerator(cfg.run.precision).device
    teacher, meta = load_teacher(teacher_file)
    check_data_matches(data, meta, teacher_file)
    network = generator_from_teacher(teacher, meta, cfg.distill.sigma_g)
    start_from(network, generator or (path.initial_generator if path is not None else None), "generator", meta, cfg)
    teacher, network = teacher.to(device), network.to(device).eval()
    z, labels = eval_noise(cfg, data.shape, meta.num_classes, device, steps=network.steps)
    generated = in_batches(with_steps(network), z, labels)
    real = real_labels = None
    if data.kind != "latents" or data.labels is not None:  # text runs have data only with --real
        pick = np.random.default_rng(cfg.seed).permutation(len(data.train))[: cfg.data.n_eval]
        real = data.to_model(data.train[pick]).to(device)
        if meta.num_classes and data.labels is not None:
            real_labels = torch.as_tensor(data.labels[pick], dtype=torch.long, device=device)
    out = score_mismatch(
        teacher, generated, real, cfg.edm, generated_labels=labels, data_labels=real_labels, seed=cfg.seed
    )
    out["path_distance"] = path.nodes[-1].distance if path is not None and len(path) > 1 else None
    return out
