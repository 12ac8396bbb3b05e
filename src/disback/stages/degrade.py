"""Stage 1, Degradation Recording: a copy of the teacher fine-tuned on samples of the frozen initial generator,
its checkpoints saved as the nodes of the degradation path (placed by degrade.spacing: disback.method.recording)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from accelerate.utils import set_seed

from disback.config import Config
from disback.diffusion.generator import with_steps
from disback.distributed import local, wait
from disback.engine.loop import Callback, train_loop
from disback.errors import DisbackError
from disback.method.lora import Adapted
from disback.method.path import MANIFEST, DegradationPath
from disback.method.recording import DistanceProbe, DistanceRecorder, StepRecorder, node_steps
from disback.method.score_fitting import ScoreFitting
from disback.stages.common import generator_noise, load_teacher, loop_options, metrics_log, resolve_teacher
from disback.stages.runtime import accelerator, sharded, speed_up
from disback.stages.starts import keep_start, start_from
from disback.storage.files import sha256_file
from disback.storage.models import generator_from_teacher
from disback.storage.runfolder import begin_stage


def record_path(
    cfg: Config,
    teacher_file: Path,
    out: Path,
    show_progress: bool = True,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    generator: Path | None = None,
) -> DegradationPath:
    """Degradation Recording: fine-tune a copy of the teacher on samples of the frozen initial generator, saving
    nodes as ``degrade.spacing`` places them. The initial generator is the teacher's copy, or ``generator``: a
    one-step generator distilled before (disback.storage.external lists the formats), which the path then records
    and stage 2 starts from. With ``resume``, continue an interrupted recording from its latest checkpoint (a complete
    path is returned as it is). ``callbacks`` join the loop's, after the recorder."""
    out = Path(out)
    teacher_file = resolve_teacher(teacher_file)
    acc = accelerator(cfg.run.precision)
    fsdp = sharded(cfg, acc)  # a launch that cannot shard fails before anything is written
    teacher_sha = sha256_file(teacher_file)
    teacher, meta = load_teacher(teacher_file)
    generator0 = generator_from_teacher(teacher, meta, cfg.distill.sigma_g).requires_grad_(False)
    start = start_from(generator0, generator, "generator", meta, cfg)  # checked before anything is written
    inputs = {"teacher_sha256": teacher_sha, **({"generator_sha256": start.meta.origin["sha256"]} if start else {})}
    begin_stage(cfg, out, resume, inputs)
    if resume and (out / MANIFEST).is_file():
        existing = DegradationPath.load(out)
        if existing.complete:
            return existing
    set_seed(cfg.seed + 1)
    teacher, generator0 = teacher.to(acc.device), generator0.to(acc.device)
    shape, classes = tuple(meta.shape), meta.num_classes

    def source(n: int, share: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples of the initial generator: this process's share of n (all n for the probe, which every process
        evaluates alike)."""
        labels = torch.randint(classes, (n,), device=acc.device) if classes else None
        z = generator_noise(generator0, n, shape, acc.device)  # k steps: the final samples of the whole rollout
        z, labels = (local(z), local(labels)) if share else (z, labels)
        with torch.no_grad():
            return with_steps(generator0)(z, labels), labels

    config = {
        **cfg.to_dict(),
        "teacher_file": str(teacher_file),
        "teacher_sha256": teacher_sha,
        "initial_generator": keep_start(generator0, start, out),
    }
    path = DegradationPath.create(out, config, replace=resume)
    probe = DistanceProbe(teacher, *source(cfg.degrade.batch, share=False), cfg.edm, seed=cfg.seed)
    # psi starts at theta: a copy of the teacher, or zero LoRA adapters on it (network.lora_rank)
    degrading = (
        Adapted(teacher, cfg.network.lora_rank)
        if cfg.network.lora_rank
        else copy.deepcopy(teacher).requires_grad_(True)
    )
    speed_up(cfg.run, degrading)
    meta = meta.as_adapters(cfg.network.lora_rank)  # the nodes' description: LoRA nodes hold adapters only
    path.add_node(degrading, 0, meta, 0.0)
    task = ScoreFitting(
        degrading,
        source,
        batch=cfg.degrade.batch,
        lr=cfg.degrade.lr,
        edm=cfg.edm,
        accelerator=acc,
        stage="degrade",
        fsdp=fsdp,
    )
    deg, steps = cfg.degrade, cfg.degrade.steps
    if deg.spacing == "distance":
        recorder = DistanceRecorder(
            path, degrading, deg.nodes, steps, deg.probes, deg.candidates, meta, probe, deg.plateau
        )
    else:
        at = node_steps(deg.spacing, steps, deg.nodes)
        recorder, steps = StepRecorder(path, degrading, at, meta, probe), at[-1]
    train_loop(
        task,
        steps,
        callbacks=[recorder, *callbacks],
        log=metrics_log(cfg, out, "degrade"),
        eval_every=max(steps // 50, 1),
        evaluate=lambda: {"distance": probe(degrading)},
        show_progress=show_progress,
        **loop_options(cfg, out, resume),
    )
    recorder.finish()
    path.mark_complete()
    wait()  # the nodes are on disk before any process reads them
    return DegradationPath.load(out)  # every process holds the path as the main one wrote it


def load_path_for(teacher_file: Path, path_dir: Path) -> DegradationPath:
    """A complete path recorded from this teacher, or a clear error."""
    path = DegradationPath.load(path_dir)
    if not path.complete:
        raise DisbackError(
            f"the path {path_dir} is incomplete (stage 1 was interrupted); finish it with "
            f"`disback degrade --resume --out {path_dir} ...` (the same settings)"
        )
    recorded = path.config.get("teacher_sha256")
    if recorded is not None and recorded != sha256_file(resolve_teacher(teacher_file)):
        raise DisbackError(
            f"the path {path_dir} was recorded from another teacher than {teacher_file}; record it again"
        )
    return path
