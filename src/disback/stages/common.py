"""What the stages share: the teacher file they read, the data source, the evaluation noise, batching, and the
loop's options."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disback.config import Config
from disback.data import Data
from disback.diffusion.sampling import churn_of, heun_sample, karras_schedule
from disback.distributed import local, strided
from disback.engine.checkpoint import Checkpoints
from disback.engine.log import MetricsLog
from disback.engine.loop import Guard
from disback.engine.trackers import make_tracker
from disback.errors import DisbackError
from disback.metrics import build_metrics
from disback.storage.kinds import kind_of
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.models import load_model

TEACHER = "teacher.safetensors"


def resolve_teacher(path: Path) -> Path:
    """Accept the teacher's file or the folder that `disback teacher` wrote."""
    path = Path(path)
    return path / TEACHER if path.is_dir() else path


def teacher_meta(path: Path) -> ModelMeta:
    """The description of a teacher file (or of the folder holding one), checked without building the network."""
    path = resolve_teacher(path)
    meta = read_meta(path)
    if meta.role != "denoiser" or meta.adapter_rank:
        raise DisbackError(
            f"{path} is a {'LoRA adapter file' if meta.adapter_rank else meta.role}, not a teacher denoiser; "
            "give teacher.safetensors (or its folder) as `disback teacher` writes it"
        )
    kind_of(meta, path)
    return meta


def load_teacher(path: Path) -> tuple[torch.nn.Module, ModelMeta]:
    teacher_meta(path)
    return load_model(resolve_teacher(path))


def check_data_matches(data: Data, meta: ModelMeta, where: Path) -> None:
    """Networks see standardised data: use the teacher's standardisation, and refuse data of another shape."""
    if tuple(meta.shape) != data.shape:
        raise DisbackError(
            f"the teacher {where} takes samples of shape {tuple(meta.shape)} but the data '{data.name}' has shape {data.shape}; "
            "use data of the teacher's resolution and channels (--set data.resolution=..., data.channels=...)"
        )
    data.set_normaliser(meta.normaliser)


def fit_data(cfg: Config, shape: tuple[int, ...] | list[int]) -> Config:
    """The config with its image data read at the teacher's channels and resolution (``shape``, C x H x W): a
    folder, zip or built-in set of images is resized to fit the teacher. Point data is left as it is."""
    if len(shape) != 3 or cfg.data.resolution <= 0:
        return cfg
    data = dataclasses.replace(cfg.data, channels=int(shape[0]), resolution=int(shape[-1]))
    return dataclasses.replace(cfg, data=data)


def eval_noise(
    cfg: Config, shape: tuple[int, ...], num_classes: int = 0, device=None, steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same latent noise (and balanced class labels) for every evaluation of every run, so that curves differ
    only by the networks. With ``steps``, for a generator: N x steps x ... (its start and each step's fresh noise;
    one step draws the same numbers as no steps axis)."""
    size = (cfg.data.n_eval, *shape) if steps is None else (cfg.data.n_eval, steps, *shape)
    z = torch.randn(*size, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    labels = torch.arange(cfg.data.n_eval) % num_classes if num_classes else None
    return z.to(device), None if labels is None else labels.to(device)


@torch.no_grad()
def in_batches(fn, z: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 500) -> torch.Tensor:
    """``fn(z, labels)`` a slice at a time, so that evaluating thousands of images fits in memory."""
    return torch.cat(
        [fn(z[i : i + batch], None if labels is None else labels[i : i + batch]) for i in range(0, len(z), batch)]
    )


def generator_noise(generator: torch.nn.Module, n: int, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """Fresh noise for ``n`` samples of ``generator``: N x steps x ... (the global batch; a process takes its share)."""
    return torch.randn(n, getattr(generator, "steps", 1), *shape, device=device)


def teacher_samples(teacher: torch.nn.Module, cfg: Config, data: Data, num_classes: int = 0) -> np.ndarray:
    """The teacher's samples from the evaluation noise (EDM's Heun sampler, stochastic with edm.s_churn), in the data's
    units."""
    sigmas = karras_schedule(cfg.teacher.heun_steps, cfg.edm.sigma_min, cfg.edm.sigma_max, cfg.edm.rho)
    churn = churn_of(dataclasses.asdict(cfg.edm)) | {"seed": cfg.seed}
    z, labels = eval_noise(cfg, data.shape, num_classes, next(teacher.parameters()).device)

    def sample(zz: torch.Tensor, yy: torch.Tensor | None) -> torch.Tensor:
        return in_batches(lambda z1, y1: heun_sample(teacher.eval(), z1, sigmas, y1, **churn), zz, yy)

    return data.from_model(strided(sample, z, labels))  # shared among processes, if several


def class_labels(data: Data, num_classes: int) -> torch.Tensor | None:
    """The data's labels when the networks are class-conditional, with a clear error when it has none that fit."""
    if not num_classes:
        return None
    if data.labels is None:
        raise DisbackError(
            f"network.num_classes={num_classes} needs class labels, and '{data.name}' has none; "
            "set network.num_classes=0 or use labelled data (digits, fashion)"
        )
    if int(data.labels.max()) >= num_classes:
        raise DisbackError(
            f"'{data.name}' has labels up to {int(data.labels.max())}; set network.num_classes to at least "
            f"{int(data.labels.max()) + 1}"
        )
    return torch.as_tensor(data.labels, dtype=torch.long)


class DataSource:
    """Minibatches of the training data (and their labels when the networks are class-conditional), drawn with a
    generator of its own whose state is checkpointed, so that a resumed run sees the same data in the same order."""

    def __init__(self, data: Data, num_classes: int, device, seed: int):
        self.points = data.to_model(data.train).to(device)
        labels = class_labels(data, num_classes)
        self.labels = None if labels is None else labels.to(device)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's share of a minibatch of n (all of it in one process)."""
        idx = local(torch.randint(len(self.points), (n,), generator=self.generator))
        return self.points[idx], None if self.labels is None else self.labels[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def loop_options(cfg: Config, out: Path, resume: bool) -> dict[str, Any]:
    """Checkpointing and the non-finite guard, as train_loop takes them."""
    return {
        "checkpoints": Checkpoints(Path(out) / "checkpoints", cfg.run.keep) if cfg.run.checkpoint_every else None,
        "checkpoint_every": cfg.run.checkpoint_every,
        "resume": resume,
        "guard": Guard(cfg.run.on_nonfinite, cfg.run.max_skipped),
    }


def metrics_log(cfg: Config, out: Path, stage: str) -> MetricsLog:
    """The stage's metrics.jsonl, with run.log_with's tracker beside it."""
    return MetricsLog(Path(out) / "metrics.jsonl", make_tracker(cfg.run.log_with, Path(out), stage, cfg.to_dict()))


def metrics_for(cfg: Config, data: Data):
    """The measures of this data (disback.metrics)."""
    return build_metrics(data, cfg.eval.projections, cfg.eval.features, cfg.eval.classifier_steps, cfg.eval.ref)
