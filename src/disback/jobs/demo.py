"""The main job: teacher -> degradation path -> DisBack and the baseline, same seeds and budgets -> summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from disback import stages
from disback.config import Config
from disback.data import load_data
from disback.diffusion.generator import levels
from disback.distributed import wait
from disback.engine.log import read_metrics
from disback.errors import DisbackError
from disback.jobs.summary import Budgets, RunSummary, Summary
from disback.stages.common import metrics_for
from disback.stages.distill import dwell_bounds
from disback.stages.runtime import accelerator, sharded
from disback.storage.files import save_array, write_json
from disback.storage.runfolder import begin_stage

MARKER = "run.json"


def prepare_out(cfg: Config, out: Path, resume: bool) -> None:
    """A folder that holds anything but a demo is refused; a demo folder is continued with --resume (same config)
    and refused otherwise (--overwrite clears it first, in the CLI)."""
    if out.exists() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.is_file() or json.loads(marker.read_text()).get("kind") != "demo":
            raise DisbackError(f"{out} is not empty and was not made by `disback demo`; choose another --out")
    begin_stage(cfg, out, resume)
    write_json(out / MARKER, {"kind": "demo"})


def run_demo(
    cfg: Config,
    out: Path,
    show_progress: bool = True,
    resume: bool = False,
    teacher: Path | None = None,
    generator: Path | None = None,
    fake: Path | None = None,
) -> Summary:
    """The main job. ``teacher``: a teacher file made before (else one is trained, or imported with
    teacher.pretrained). ``generator``, ``fake``: a one-step generator and a fake score distilled before, which both
    runs start from (converted once into ``out``; disback.storage.external lists the formats). With ``resume``,
    finished stages are read back and an interrupted one continues from its latest checkpoint, so a killed demo
    rerun with --resume ends as an uninterrupted one would have."""
    begun = time.perf_counter()
    out = Path(out)
    sharded(cfg, accelerator(cfg.run.precision))  # a launch that cannot shard fails before the teacher is trained
    stages.check_starts(cfg, teacher, generator, fake)  # against the teacher when it was made before
    data = load_data(cfg.data, cfg.seed)  # a data name or file that does not load fails before anything is written
    prepare_out(cfg, out, resume)
    save_array(out / "reference.npy", data.reference[: cfg.data.n_eval])  # the report's "data" panel
    measure = metrics_for(cfg, data)
    if teacher is not None:
        teacher_file = stages.adopt_teacher(cfg, data, teacher, out / "teacher", resume)
    else:
        teacher_file = stages.train_teacher(cfg, data, out / "teacher", show_progress, resume)
    teacher_value = measure(np.load(out / "teacher" / "samples.npy"))
    starts = {
        role: stages.convert_start(cfg, teacher_file, source, role, out)
        for role, source in (("generator", generator), ("denoiser", fake))
        if source is not None
    }
    wait()  # the main process has written them before any process reads them

    path = stages.record_path(cfg, teacher_file, out / "path", show_progress, resume, generator=starts.get("generator"))
    start_far = stages.start_far(cfg, data, teacher_file, path)  # before stage 2: how far the generator starts
    stage1 = {
        "stage1_steps": path.nodes[-1].step,  # training and probes, not evaluation
        "stage1_wall_s": round(read_metrics(out / "path" / "metrics.jsonl")[-1]["wall_s"], 3),
    }
    runs = {}
    for name, run_path in (("disback", path), ("baseline", None)):
        result = stages.distill(
            cfg,
            data,
            teacher_file,
            run_path,
            out / name,
            show_progress,
            resume,
            generator=starts.get("generator"),
            fake=starts.get("denoiser"),
        )
        runs[name] = RunSummary.from_records(
            result["records"], result["switches"], result["nodes"], **(stage1 if name == "disback" else {})
        )
    summary = Summary(
        data=data.name,
        measure=data.measure,
        seed=cfg.seed,
        teacher=teacher_value,
        initial_generator={k: v for k, v in runs["baseline"].curve[0].items() if k in teacher_value},
        budgets=budgets(cfg, teacher, stage1["stage1_steps"], len(path), generator, fake),
        runs=runs,
        features={k: v for k, v in measure.info.items() if k != "file"} if data.kind == "images" else None,
        start_far=start_far,
    ).with_speedups(cfg.eval.threshold_factor)
    summary.elapsed_s = round(time.perf_counter() - begun, 1)
    summary.write(out)
    return summary


def budgets(
    cfg: Config,
    teacher: Path | None,
    stage1_steps: int,
    nodes: int,
    generator: Path | None = None,
    fake: Path | None = None,
) -> Budgets:
    d = cfg.distill
    if teacher is not None:
        made, steps = f"the teacher file {teacher}", 0
    elif cfg.teacher.pretrained:
        made, steps = f"pretrained '{cfg.teacher.pretrained}' (VP, imported)", 0
    else:
        made, steps = f"an EDM denoiser ({cfg.network.kind})", cfg.teacher.steps
    return Budgets(
        teacher=made,
        teacher_steps=steps,
        stage1_steps=stage1_steps,
        nodes=nodes,
        generator_steps=d.steps,
        fake_updates_per_generator_step=d.fake_updates,
        reuse_samples=d.reuse_samples,
        method=d.method,
        node_spacing=cfg.degrade.spacing,
        target_schedule=d.schedule,
        switch_every=d.switch_every if d.schedule == "fixed" else None,
        dwell=list(dwell_bounds(cfg, nodes)) if d.schedule == "adaptive" else None,
        batch=d.batch,
        eval_every=cfg.eval.every,
        eval_samples=cfg.data.n_eval,
        initial_generator=None if generator is None else str(generator),
        initial_fake=None if fake is None else str(fake),
        generator_levels=levels(d.sigma_g),
        step_input=d.step_input,
    )
