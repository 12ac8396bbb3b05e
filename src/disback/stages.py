"""The stages of the main job, each reading and writing files so that it can run alone:

train_teacher   data -> teacher.safetensors
record_path     teacher -> degradation path (stage 1, Degradation Recording)
distill         teacher + path -> generator.safetensors (stage 2, Distribution Backtracking; the baseline when the
                path is the teacher alone)
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from disback.config import Config
from disback.data import Data, to_units
from disback.errors import DisbackError
from disback.metrics import build_metrics
from disback.models import build_denoiser, denoiser_metadata, generator_from_teacher, import_pretrained, load_model
from disback.path import DegradationPath, make_schedule
from disback.recording import DistanceProbe, DistanceRecorder, StepRecorder, node_steps
from disback.sampling import heun_sample, karras_schedule
from disback.tasks import METHODS, Distillation, ScoreFitting, Source
from disback.train import MetricsLog, train_loop
from disback.weights import save_weights, sha256_file, write_text

_ACCELERATOR: Accelerator | None = None


def accelerator() -> Accelerator:
    """One Accelerator per process (Accelerate keeps global state); one process here, many under accelerate launch."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator()
    return _ACCELERATOR


def write_config(cfg: Config, out: Path) -> None:
    write_text(Path(out) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def eval_noise(cfg: Config, shape: tuple[int, ...], num_classes: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same latent noise (and balanced class labels) for every evaluation of every run, so that curves differ
    only by the networks."""
    z = torch.randn(cfg.data.n_eval, *shape, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    labels = torch.arange(cfg.data.n_eval) % num_classes if num_classes else None
    return z.to(device), None if labels is None else labels.to(device)


@torch.no_grad()
def in_batches(fn, z: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 500) -> torch.Tensor:
    """``fn(z, labels)`` a slice at a time, so that evaluating thousands of images fits in memory."""
    return torch.cat([fn(z[i: i + batch], None if labels is None else labels[i: i + batch]) for i in range(0, len(z), batch)])


def teacher_samples(teacher: torch.nn.Module, cfg: Config, data: Data, num_classes: int = 0) -> np.ndarray:
    sigmas = karras_schedule(cfg.teacher.heun_steps, cfg.edm.sigma_min, cfg.edm.sigma_max, cfg.edm.rho)
    z, labels = eval_noise(cfg, data.shape, num_classes, next(teacher.parameters()).device)
    return data.from_model(in_batches(lambda zz, yy: heun_sample(teacher.eval(), zz, sigmas, yy), z, labels))


def class_labels(data: Data, num_classes: int) -> torch.Tensor | None:
    """The data's labels when the networks are class-conditional, with a clear error when it has none that fit."""
    if not num_classes:
        return None
    if data.labels is None:
        raise DisbackError(f"network.num_classes={num_classes} needs class labels, and '{data.name}' has none; "
                           "set network.num_classes=0 or use labelled data (digits, fashion)")
    if int(data.labels.max()) >= num_classes:
        raise DisbackError(f"'{data.name}' has labels up to {int(data.labels.max())}; set network.num_classes to at least {int(data.labels.max()) + 1}")
    return torch.as_tensor(data.labels, dtype=torch.long)


def data_source(data: Data, num_classes: int, device, seed: int) -> Source:
    """Minibatches of the training data (and their labels when the networks are class-conditional)."""
    points = data.to_model(data.train).to(device)
    labels = class_labels(data, num_classes)
    labels = None if labels is None else labels.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def source(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(len(points), (n,), generator=gen)
        return points[idx], None if labels is None else labels[idx]

    return source


def metrics_for(cfg: Config, data: Data):
    return build_metrics(data, cfg.eval.projections, cfg.eval.features, cfg.eval.classifier_steps)


# ---------------------------------------------------------------- teacher


def train_teacher(cfg: Config, data: Data, out: Path, show_progress: bool = True) -> Path:
    """Fit a teacher D_theta to the data with L_dsm and an EMA (or import ``teacher.pretrained``); write
    teacher.safetensors and its samples."""
    out = Path(out)
    if cfg.teacher.pretrained:
        return import_teacher(cfg, data, cfg.teacher.pretrained, out)
    set_seed(cfg.seed)
    acc = accelerator()
    write_config(cfg, out)
    source = data_source(data, cfg.network.num_classes, acc.device, cfg.seed)
    denoiser = build_denoiser(cfg.network, data.shape, cfg.edm.sigma_data)
    task = ScoreFitting(denoiser, source, batch=cfg.teacher.batch, lr=cfg.teacher.lr, edm=cfg.edm, accelerator=acc,
                        stage="teacher", ema_decay=cfg.teacher.ema_decay)
    train_loop(task, cfg.teacher.steps, log=MetricsLog(out / "metrics.jsonl"), eval_every=max(cfg.teacher.steps // 20, 1),
               evaluate=lambda: {}, show_progress=show_progress)
    teacher = task.ema
    samples = teacher_samples(teacher, cfg, data, cfg.network.num_classes)
    np.save(out / "samples.npy", samples)
    meta = denoiser_metadata(cfg.network, data.shape, cfg.edm, data.normaliser(), data.name)
    path = out / "teacher.safetensors"
    save_weights(teacher, path, meta)
    return path


def resolve_teacher(path: Path) -> Path:
    """Accept the teacher's file or the folder that `disback teacher` wrote."""
    path = Path(path)
    return path / "teacher.safetensors" if path.is_dir() else path


def import_teacher(cfg: Config, data: Data, source: str, out: Path) -> Path:
    """A pretrained diffusers UNet2DModel + scheduler, converted once into a disback teacher file."""
    out = Path(out)
    teacher, meta = import_pretrained(source)
    meta.update(edm=asdict(cfg.edm), normaliser={"mean": 0.5, "scale": 0.5}, data=data.name)  # diffusers images live in [-1, 1]
    check_data_matches(data, meta, Path(source))
    class_labels(data, meta["num_classes"])
    write_config(cfg, out)
    np.save(out / "samples.npy", teacher_samples(teacher, cfg, data, meta["num_classes"]))
    path = out / "teacher.safetensors"
    save_weights(teacher, path, meta)
    return path


def load_teacher(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    path = resolve_teacher(path)
    model, meta = load_model(path)
    if meta["kind"] != "denoiser":
        raise DisbackError(f"{path} is a {meta['kind']}, not a teacher denoiser")
    return model, meta


def check_data_matches(data: Data, meta: dict[str, Any], where: Path) -> None:
    """Networks see standardised data: use the teacher's standardisation, and refuse data of another shape."""
    if tuple(meta["shape"]) != data.shape:
        raise DisbackError(
            f"the teacher {where} takes samples of shape {tuple(meta['shape'])} but the data '{data.name}' has shape {data.shape}; "
            "use data of the teacher's resolution and channels (--set data.resolution=..., data.channels=...)"
        )
    data.set_normaliser(meta["normaliser"])


# ---------------------------------------------------------------- stage 1


def record_path(cfg: Config, teacher_file: Path, out: Path, show_progress: bool = True) -> DegradationPath:
    """Degradation Recording: fine-tune a copy of the teacher on samples of the frozen initial generator, saving
    nodes as ``degrade.spacing`` places them (disback.recording)."""
    out = Path(out)
    set_seed(cfg.seed + 1)
    acc = accelerator()
    teacher_file = resolve_teacher(teacher_file)
    teacher, meta = load_teacher(teacher_file)
    teacher = teacher.to(acc.device)
    generator0 = generator_from_teacher(teacher, cfg.distill.sigma_g).requires_grad_(False)
    shape, classes = tuple(meta["shape"]), meta.get("num_classes", 0)

    def source(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = torch.randint(classes, (n,), device=acc.device) if classes else None
        with torch.no_grad():
            return generator0(torch.randn(n, *shape, device=acc.device), labels), labels

    config = {**cfg.to_dict(), "teacher_file": str(teacher_file), "teacher_sha256": sha256_file(teacher_file)}
    path = DegradationPath.create(out, config)
    probe = DistanceProbe(teacher, *source(cfg.degrade.batch), cfg.edm, seed=cfg.seed)
    degrading = copy.deepcopy(teacher).requires_grad_(True)  # psi starts at theta
    path.add_node(degrading, 0, meta, 0.0)
    task = ScoreFitting(degrading, source, batch=cfg.degrade.batch, lr=cfg.degrade.lr, edm=cfg.edm, accelerator=acc, stage="degrade")
    deg, steps = cfg.degrade, cfg.degrade.steps
    if deg.spacing == "distance":
        recorder = DistanceRecorder(path, degrading, deg.nodes, steps, deg.probes, deg.candidates, meta, probe, deg.plateau)
    else:
        at = node_steps(deg.spacing, steps, deg.nodes)
        recorder, steps = StepRecorder(path, degrading, at, meta, probe), at[-1]
    train_loop(task, steps, callbacks=[recorder], log=MetricsLog(out / "metrics.jsonl"), eval_every=max(steps // 50, 1),
               evaluate=lambda: {"distance": probe(degrading)}, show_progress=show_progress)
    recorder.finish()
    return path


def load_path_for(teacher_file: Path, path_dir: Path) -> DegradationPath:
    path = DegradationPath.load(path_dir)
    recorded = path.config.get("teacher_sha256")
    if recorded is not None and recorded != sha256_file(teacher_file):
        raise DisbackError(f"the path {path_dir} was recorded from another teacher than {teacher_file}; record it again")
    return path


# ---------------------------------------------------------------- stage 2 and the baseline


def distill(cfg: Config, data: Data, teacher_file: Path, path: DegradationPath | None, out: Path,
            show_progress: bool = True) -> dict[str, Any]:
    """Distribution Backtracking over ``path``; with ``path=None``, the baseline (the teacher is the only node)."""
    out = Path(out)
    teacher_file = resolve_teacher(teacher_file)
    stage = "distill" if path is None else "backtrack"
    if path is None:
        path = DegradationPath.teacher_only(teacher_file, sha256_file(teacher_file))
    set_seed(cfg.seed + 2)  # the same seed for DisBack and the baseline
    acc = accelerator()
    write_config(cfg, out)
    teacher, meta = load_teacher(teacher_file)
    check_data_matches(data, meta, teacher_file)
    generator = generator_from_teacher(teacher, cfg.distill.sigma_g)
    fake, target = copy.deepcopy(teacher), copy.deepcopy(teacher)
    d = cfg.distill
    schedule = make_schedule(len(path), d.schedule, every=d.switch_every, ratio=d.switch_ratio, min_dwell=d.min_dwell, max_dwell=d.max_dwell)
    classes = meta.get("num_classes", 0)
    real = data_source(data, classes, acc.device, cfg.seed + 3) if METHODS[cfg.distill.method].gan else None
    task = Distillation(generator, fake, target, path, schedule, cfg=cfg.distill, edm=cfg.edm, shape=data.shape,
                        accelerator=acc, stage=stage, num_classes=classes, real=real)
    measure = metrics_for(cfg, data)
    z, labels = eval_noise(cfg, data.shape, meta.get("num_classes", 0), acc.device)

    def evaluate() -> dict[str, float]:
        return measure(data.from_model(in_batches(generator, z, labels)))

    records = train_loop(task, cfg.distill.steps, evaluate=evaluate, eval_every=cfg.eval.every,
                         log=MetricsLog(out / "metrics.jsonl"), show_progress=show_progress)
    np.save(out / "samples.npy", data.from_model(in_batches(generator, z, labels)))
    save_weights(generator, out / "generator.safetensors", {**meta, "kind": "generator", "sigma_g": cfg.distill.sigma_g})
    save_weights(fake, out / "fake.safetensors", meta)
    return {"records": records, "switches": task.switches, "nodes": len(path)}


# ---------------------------------------------------------------- sampling a saved model


def sample_to_file(model_file: Path, n: int, steps: int, seed: int, out: Path, plot: str | None = None) -> np.ndarray:
    """Samples in the data's units: Heun for a denoiser (teacher or node), one call for a generator."""
    if n < 1 or steps < 1:
        raise DisbackError("--n and --steps must be positive")
    model, meta = load_model(Path(model_file))
    z = torch.randn(n, *meta["shape"], generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % meta["num_classes"] if meta.get("num_classes") else None  # balanced classes
    if meta["kind"] == "generator":
        x = in_batches(model, z, labels)
    else:
        edm = meta["edm"]
        sigmas = karras_schedule(steps, edm["sigma_min"], edm["sigma_max"], edm["rho"])
        x = in_batches(lambda zz, yy: heun_sample(model.eval(), zz, sigmas, yy), z, labels)
    samples = to_units(x, meta["normaliser"], images=len(meta["shape"]) == 3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, samples)
    if plot:
        from disback.report import picture

        picture(samples, Path(plot), title=f"{meta['kind']} samples ({n})")
    return samples
