"""The teacher: a denoiser D_theta fitted to the data (EDM, with an EMA), a pretrained diffusers UNet2DModel imported
once, or a teacher file made before; in every case a teacher.safetensors and the teacher's samples."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from accelerate.utils import set_seed

from disback.config import Config
from disback.data import Data
from disback.diffusion.denoisers import build_denoiser
from disback.distributed import wait
from disback.engine.loop import Callback, train_loop
from disback.method.score_fitting import ScoreFitting
from disback.stages.common import (
    TEACHER,
    DataSource,
    check_data_matches,
    class_labels,
    load_teacher,
    loop_options,
    metrics_log,
    resolve_teacher,
    teacher_samples,
)
from disback.stages.runtime import accelerator, speed_up
from disback.storage.files import save_array, sha256_file
from disback.storage.kinds import edm_meta, import_pretrained
from disback.storage.models import save_model
from disback.storage.nvlabs import import_snapshot, is_snapshot
from disback.storage.runfolder import begin_stage


def train_teacher(
    cfg: Config,
    data: Data,
    out: Path,
    show_progress: bool = True,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Fit a teacher D_theta to the data with L_dsm and an EMA (or import ``teacher.pretrained``); write
    teacher.safetensors and its samples. With ``resume``, continue from the folder's latest checkpoint (a finished
    teacher is returned as it is). ``callbacks`` join the loop's."""
    out = Path(out)
    begin_stage(cfg, out, resume)
    done = out / TEACHER
    if resume and done.is_file():
        return done
    if cfg.teacher.pretrained:
        return import_teacher(cfg, data, cfg.teacher.pretrained, out)
    set_seed(cfg.seed)
    acc = accelerator(cfg.run.precision)
    source = DataSource(data, cfg.network.num_classes, acc.device, cfg.seed)
    denoiser = build_denoiser(cfg.network, data.shape, cfg.edm.sigma_data)
    speed_up(cfg.run, denoiser)
    # data parallel under several processes, also with run.fsdp: the EMA is not sharded
    task = ScoreFitting(
        denoiser,
        source,
        batch=cfg.teacher.batch,
        lr=cfg.teacher.lr,
        edm=cfg.edm,
        accelerator=acc,
        stage="teacher",
        ema_decay=cfg.teacher.ema_decay,
    )
    train_loop(
        task,
        cfg.teacher.steps,
        log=metrics_log(cfg, out, "teacher"),
        eval_every=max(cfg.teacher.steps // 20, 1),
        evaluate=lambda: {},
        callbacks=callbacks,
        show_progress=show_progress,
        **loop_options(cfg, out, resume),
    )
    teacher = task.ema
    save_array(out / "samples.npy", teacher_samples(teacher, cfg, data, cfg.network.num_classes))
    save_model(
        teacher, done, edm_meta(cfg.network, data.shape, cfg.edm, data.normaliser(), data.name)
    )  # last: the stage is done
    wait()
    return done


def import_teacher(cfg: Config, data: Data, source: str, out: Path) -> Path:
    """A pretrained teacher converted once into a disback teacher file: an EDM / EDM2 network snapshot (a path or a
    URL), or a diffusers UNet2DModel + scheduler."""
    out = Path(out)
    if is_snapshot(source):
        teacher, meta = import_snapshot(source, cfg.edm)
        meta = dataclasses.replace(meta, data=data.name)
    else:
        teacher, meta = import_pretrained(source)
        meta = dataclasses.replace(meta, edm=asdict(cfg.edm), data=data.name)
    check_data_matches(data, meta, Path(source))
    if data.labels is not None:  # labels that do not fit the teacher's classes are refused; none are needed unless
        class_labels(data, meta.num_classes)  # real data feeds dmd2's GAN term, which asks for them then
    teacher = teacher.to(accelerator(cfg.run.precision).device)  # its samples are drawn where training runs
    save_array(out / "samples.npy", teacher_samples(teacher, cfg, data, meta.num_classes))
    path = out / TEACHER
    save_model(teacher, path, meta)
    wait()
    return path


def adopt_teacher(cfg: Config, data: Data, teacher: Path, out: Path, resume: bool = False) -> Path:
    """A teacher made before (by `disback teacher`, or imported), used where it is: its samples from the evaluation
    noise are written into ``out`` for the measures. Returns the teacher's file."""
    teacher_file = resolve_teacher(teacher)
    model, meta = load_teacher(teacher_file)
    check_data_matches(data, meta, teacher_file)
    begin_stage(cfg, out, resume, {"teacher_sha256": sha256_file(teacher_file)})
    if not (resume and (Path(out) / "samples.npy").is_file()):
        model = model.to(accelerator(cfg.run.precision).device)
        save_array(Path(out) / "samples.npy", teacher_samples(model, cfg, data, meta.num_classes))
        wait()
    return teacher_file
