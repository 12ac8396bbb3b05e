"""The stages of the main job, each reading and writing files so that it can run alone:

train_teacher   data -> teacher.safetensors
record_path     teacher -> degradation path (stage 1, Degradation Recording)
distill         teacher + path -> generator.safetensors (stage 2, Distribution Backtracking; the baseline when the
                path is the teacher alone)
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed

from disback.checkpoint import Checkpoints
from disback.config import Config, RunConfig
from disback.data import Data, to_units
from disback.distributed import local, state, strided, wait, world
from disback.errors import DisbackError
from disback.lora import Adapted, fake_and_target, scratch
from disback.text import guide
from disback.metrics import build_metrics
from disback.models import build_denoiser, denoiser_metadata, generator_from_teacher, import_pretrained, load_model
from disback.path import MANIFEST, DegradationPath, make_schedule
from disback.runfolder import begin_stage, write_config
from disback.recording import DistanceProbe, DistanceRecorder, StepRecorder, node_steps
from disback.sampling import heun_sample, karras_schedule
from disback.tasks import METHODS, Distillation, ScoreFitting
from disback.train import Guard, MetricsLog, read_metrics, train_loop
from disback.weights import save_array, save_weights, sha256_file, write_json, write_text

_ACCELERATOR: Accelerator | None = None
RESULT = "result.json"  # written last by a distillation run: the run is finished


def accelerator(precision: str = "fp32") -> Accelerator:
    """One Accelerator per process (Accelerate keeps global state); one process here, many under accelerate launch."""
    global _ACCELERATOR
    mixed = {"fp32": "no", "bf16": "bf16"}[precision]
    if _ACCELERATOR is None:
        state()  # the process group first, so that a CPU-only machine runs several processes over gloo
        _ACCELERATOR = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        # Training calls see fixed shapes, so cuDNN's search for the fastest convolution pays off after the first
        # call (NVlabs/edm trains this way too)
        torch.backends.cudnn.benchmark = torch.cuda.is_available()
    elif _ACCELERATOR.mixed_precision != mixed:
        raise DisbackError(f"this process already runs with precision {_ACCELERATOR.mixed_precision}; run.precision={precision} "
                           "needs a process of its own (one command per precision)")
    return _ACCELERATOR


def sharded(cfg: Config, acc: Accelerator) -> bool:
    """Whether this stage shards its trained networks (run.fsdp), once it is clear that this launch can."""
    if acc.distributed_type == DistributedType.FSDP:
        raise DisbackError("disback shards the networks itself: launch with accelerate/fsdp.yaml (distributed_type MULTI_GPU) "
                           "and --set run.fsdp=true, not with an accelerate config of distributed_type FSDP")
    if cfg.run.fsdp and world() == 1:
        raise DisbackError("run.fsdp shards the networks across processes, and this is one process: launch several "
                           "(accelerate launch --config_file accelerate/fsdp.yaml ..., or torchrun), or set run.fsdp=false")
    return cfg.run.fsdp


def speed_up(run: RunConfig, *modules: torch.nn.Module) -> None:
    """run.channels_last, run.compile and run.gradient_checkpointing, applied in place (state_dict keys unchanged)."""
    for module in modules:
        if run.channels_last:
            module.to(memory_format=torch.channels_last)
        if run.gradient_checkpointing:
            for sub in module.modules():
                if hasattr(sub, "enable_gradient_checkpointing") and getattr(sub, "_supports_gradient_checkpointing", False):
                    sub.enable_gradient_checkpointing()
        if run.compile:
            module.compile()


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
    sample = lambda zz, yy: in_batches(lambda z1, y1: heun_sample(teacher.eval(), z1, sigmas, y1), zz, yy)
    return data.from_model(strided(sample, z, labels))  # shared among processes, if several


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
    return {"checkpoints": Checkpoints(Path(out) / "checkpoints", cfg.run.keep), "checkpoint_every": cfg.run.checkpoint_every,
            "resume": resume, "guard": Guard(cfg.run.on_nonfinite, cfg.run.max_skipped)}


def metrics_for(cfg: Config, data: Data):
    return build_metrics(data, cfg.eval.projections, cfg.eval.features, cfg.eval.classifier_steps)


# ---------------------------------------------------------------- teacher


def train_teacher(cfg: Config, data: Data, out: Path, show_progress: bool = True, resume: bool = False) -> Path:
    """Fit a teacher D_theta to the data with L_dsm and an EMA (or import ``teacher.pretrained``); write
    teacher.safetensors and its samples. With ``resume``, continue from the folder's latest checkpoint (a finished
    teacher is returned as it is)."""
    out = Path(out)
    begin_stage(cfg, out, resume)
    done = out / "teacher.safetensors"
    if resume and done.is_file():
        return done
    if cfg.teacher.pretrained:
        return import_teacher(cfg, data, cfg.teacher.pretrained, out)
    set_seed(cfg.seed)
    acc = accelerator(cfg.run.precision)
    source = DataSource(data, cfg.network.num_classes, acc.device, cfg.seed)
    denoiser = build_denoiser(cfg.network, data.shape, cfg.edm.sigma_data)
    speed_up(cfg.run, denoiser)
    task = ScoreFitting(denoiser, source, batch=cfg.teacher.batch, lr=cfg.teacher.lr, edm=cfg.edm, accelerator=acc,
                        stage="teacher", ema_decay=cfg.teacher.ema_decay)
    train_loop(task, cfg.teacher.steps, log=MetricsLog(out / "metrics.jsonl"), eval_every=max(cfg.teacher.steps // 20, 1),
               evaluate=lambda: {}, show_progress=show_progress, **loop_options(cfg, out, resume))
    teacher = task.ema
    save_array(out / "samples.npy", teacher_samples(teacher, cfg, data, cfg.network.num_classes))
    meta = denoiser_metadata(cfg.network, data.shape, cfg.edm, data.normaliser(), data.name)
    save_weights(teacher, done, meta)  # last: its presence marks the stage as finished
    wait()
    return done


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
    save_array(out / "samples.npy", teacher_samples(teacher, cfg, data, meta["num_classes"]))
    path = out / "teacher.safetensors"
    save_weights(teacher, path, meta)
    wait()
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


def record_path(cfg: Config, teacher_file: Path, out: Path, show_progress: bool = True, resume: bool = False) -> DegradationPath:
    """Degradation Recording: fine-tune a copy of the teacher on samples of the frozen initial generator, saving
    nodes as ``degrade.spacing`` places them (disback.recording). With ``resume``, continue an interrupted recording
    from its latest checkpoint (a complete path is returned as it is)."""
    out = Path(out)
    teacher_file = resolve_teacher(teacher_file)
    begin_stage(cfg, out, resume, {"teacher_sha256": sha256_file(teacher_file)})
    if resume and (out / MANIFEST).is_file():
        existing = DegradationPath.load(out)
        if existing.complete:
            return existing
    set_seed(cfg.seed + 1)
    acc = accelerator(cfg.run.precision)
    teacher, meta = load_teacher(teacher_file)
    teacher = teacher.to(acc.device)
    generator0 = generator_from_teacher(teacher, cfg.distill.sigma_g).requires_grad_(False)
    shape, classes = tuple(meta["shape"]), meta.get("num_classes", 0)

    def source(n: int, share: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples of the initial generator: this process's share of n (all n for the probe, which every process
        evaluates alike)."""
        labels = torch.randint(classes, (n,), device=acc.device) if classes else None
        z = torch.randn(n, *shape, device=acc.device)
        z, labels = (local(z), local(labels)) if share else (z, labels)
        with torch.no_grad():
            return generator0(z, labels), labels

    config = {**cfg.to_dict(), "teacher_file": str(teacher_file), "teacher_sha256": sha256_file(teacher_file)}
    path = DegradationPath.create(out, config, replace=resume)
    probe = DistanceProbe(teacher, *source(cfg.degrade.batch, share=False), cfg.edm, seed=cfg.seed)
    # psi starts at theta: a copy of the teacher, or zero LoRA adapters on it (network.lora_rank)
    degrading = Adapted(teacher, cfg.network.lora_rank) if cfg.network.lora_rank else copy.deepcopy(teacher).requires_grad_(True)
    speed_up(cfg.run, degrading)
    path.add_node(degrading, 0, meta, 0.0)
    task = ScoreFitting(degrading, source, batch=cfg.degrade.batch, lr=cfg.degrade.lr, edm=cfg.edm, accelerator=acc,
                        stage="degrade", fsdp=sharded(cfg, acc))
    deg, steps = cfg.degrade, cfg.degrade.steps
    if deg.spacing == "distance":
        recorder = DistanceRecorder(path, degrading, deg.nodes, steps, deg.probes, deg.candidates, meta, probe, deg.plateau)
    else:
        at = node_steps(deg.spacing, steps, deg.nodes)
        recorder, steps = StepRecorder(path, degrading, at, meta, probe), at[-1]
    train_loop(task, steps, callbacks=[recorder], log=MetricsLog(out / "metrics.jsonl"), eval_every=max(steps // 50, 1),
               evaluate=lambda: {"distance": probe(degrading)}, show_progress=show_progress, **loop_options(cfg, out, resume))
    recorder.finish()
    path.mark_complete()
    wait()  # the nodes are on disk before any process reads them
    return DegradationPath.load(out)  # every process holds the path as the main one wrote it


def load_path_for(teacher_file: Path, path_dir: Path) -> DegradationPath:
    path = DegradationPath.load(path_dir)
    if not path.complete:
        raise DisbackError(f"the path {path_dir} is incomplete (stage 1 was interrupted); finish it with "
                           f"`disback degrade --resume --out {path_dir} ...` (the same settings)")
    recorded = path.config.get("teacher_sha256")
    if recorded is not None and recorded != sha256_file(teacher_file):
        raise DisbackError(f"the path {path_dir} was recorded from another teacher than {teacher_file}; record it again")
    return path


# ---------------------------------------------------------------- stage 2 and the baseline


def check_lora_matches(cfg: Config, path: DegradationPath) -> None:
    """A path of LoRA nodes needs a LoRA fake score and target of the same rank, and a path of full nodes full ones."""
    recorded = path.config.get("network", {}).get("lora_rank", 0) if len(path) > 1 else cfg.network.lora_rank
    if recorded != cfg.network.lora_rank:
        raise DisbackError(f"the path {path.root} was recorded with network.lora_rank={recorded}, and this run has "
                           f"{cfg.network.lora_rank}; use --set network.lora_rank={recorded}, or record the path again")


def dwell_bounds(cfg: Config, num_nodes: int) -> tuple[int, int]:
    """The adaptive schedule's (min, max) steps per node, shrunk so that the walk reaches the teacher by half of
    distill.steps at the latest: the generator always trains against the teacher."""
    high = max(min(cfg.distill.max_dwell, cfg.distill.steps // (2 * max(num_nodes - 1, 1))), 1)
    return min(cfg.distill.min_dwell, high), high


def warn_short_walk(cfg: Config, num_nodes: int) -> None:
    """The fixed schedule is taken as given (it is the paper's recipe), but a walk that reaches the teacher only after
    the budget ends leaves a generator that never trained against the teacher: say so, and how to fix it."""
    d = cfg.distill
    arrival = (num_nodes - 1) * d.switch_every
    if d.schedule == "fixed" and num_nodes > 1 and arrival >= d.steps:
        warnings.warn(f"with distill.schedule 'fixed', the target walks {num_nodes - 1} nodes every {d.switch_every} steps and "
                      f"reaches the teacher at step {arrival}, not before distill.steps ({d.steps}) ends; lower "
                      f"distill.switch_every to at most {max(d.steps // (2 * (num_nodes - 1)), 1)} (the teacher by half of "
                      f"the budget) or raise distill.steps", stacklevel=2)


def distill(cfg: Config, data: Data, teacher_file: Path, path: DegradationPath | None, out: Path,
            show_progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Distribution Backtracking over ``path``; with ``path=None``, the baseline (the teacher is the only node).
    With ``resume``, continue from the folder's latest checkpoint (a finished run is read back as it is)."""
    out = Path(out)
    teacher_file = resolve_teacher(teacher_file)
    stage = "distill" if path is None else "backtrack"
    if path is None:
        path = DegradationPath.teacher_only(teacher_file, sha256_file(teacher_file))
    inputs = {"teacher_sha256": sha256_file(teacher_file), "nodes_sha256": [n.sha256 for n in path.nodes]}
    begin_stage(cfg, out, resume, inputs)
    if resume and (out / RESULT).is_file():
        return {**json.loads((out / RESULT).read_text()), "records": read_metrics(out / "metrics.jsonl")}
    teacher, meta = load_teacher(teacher_file)
    check_data_matches(data, meta, teacher_file)
    measure = metrics_for(cfg, data)  # before the seed: a feature network trained now must not shift the run's RNG
    set_seed(cfg.seed + 2)  # the same seed for DisBack and the baseline
    acc = accelerator(cfg.run.precision)
    check_lora_matches(cfg, path)
    generator = generator_from_teacher(teacher, cfg.distill.sigma_g)
    # every node's sha256, keys and shapes, before any training (the baseline's one node is the teacher's full file)
    path.verify(scratch(teacher, cfg.network.lora_rank if len(path) > 1 else 0))
    # With LoRA the target's base is the teacher shared with the fake score: under bf16 it is cast once, on purpose
    # (a frozen base in bf16, the adapters trained in fp32), in Distillation.
    fake, target = fake_and_target(teacher, cfg.network.lora_rank, len(path))
    guide(target, cfg.text.guidance)  # text-to-image: classifier-free guidance on the target only (no-op otherwise)
    speed_up(cfg.run, generator, fake, target)
    d = cfg.distill
    low, high = dwell_bounds(cfg, len(path))
    schedule = make_schedule(len(path), d.schedule, every=d.switch_every, ratio=d.switch_ratio, min_dwell=low, max_dwell=high)
    warn_short_walk(cfg, len(path))
    classes = meta.get("num_classes", 0)
    real = DataSource(data, classes, acc.device, cfg.seed + 3) if METHODS[cfg.distill.method].gan else None
    task = Distillation(generator, fake, target, path, schedule, cfg=cfg.distill, edm=cfg.edm, shape=data.shape,
                        accelerator=acc, stage=stage, num_classes=classes, real=real, fsdp=sharded(cfg, acc))
    z, labels = eval_noise(cfg, data.shape, meta.get("num_classes", 0), acc.device)

    def samples() -> np.ndarray:  # shared among processes, if several; every class alike in each
        return data.from_model(strided(lambda zz, yy: in_batches(generator, zz, yy), z, labels))

    records = train_loop(task, cfg.distill.steps, evaluate=lambda: measure(samples()), eval_every=cfg.eval.every,
                         log=MetricsLog(out / "metrics.jsonl"), show_progress=show_progress, **loop_options(cfg, out, resume))
    save_array(out / "samples.npy", samples())
    save_weights(generator, out / "generator.safetensors", {**meta, "kind": "generator", "sigma_g": cfg.distill.sigma_g})
    save_weights(fake, out / "fake.safetensors", meta)
    result = {"switches": task.switches, "nodes": len(path)}
    write_json(out / RESULT, result)  # last: its presence marks the run as finished
    wait()
    return {**result, "records": records}


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
    save_array(Path(out), samples)
    if plot:
        from disback.report import picture

        picture(samples, Path(plot), title=f"{meta['kind']} samples ({n})")
    return samples
