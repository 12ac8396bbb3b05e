"""`disback text`: a text-to-image pipeline's denoising network (the UNet of Stable Diffusion 1.5 / SDXL, the
transformer of SD3 / SD3.5 / FLUX.1) distilled to one step (or a few) on a prompts file, by the same stages as every
other teacher: import, stage 1, stage 2 (or the baseline), export."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from disback import stages
from disback.config import Config
from disback.config.choices import METHODS
from disback.data import Data
from disback.distributed import is_writer, wait
from disback.errors import DisbackError
from disback.stages.common import TEACHER
from disback.stages.runtime import accelerator, sharded
from disback.storage.files import write_json
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.runfolder import begin_stage, write_config
from disback.text.captions import read_captions
from disback.text.families import check_guidance, family_of
from disback.text.measure import LatentClip
from disback.text.pipeline import PROMPT_TEXTS, check_flow_settings, check_timesteps, export_text, import_text_teacher
from disback.text.prompts import load_component, read_prompts
from disback.text.report import write_text_report


def latent_data(meta: ModelMeta, folder: Path) -> Data:
    """The engine's Data for a text-to-image teacher in ``folder``: latents of the UNet's shape, in the UNet's own
    units, no measure; the real images' latents and caption rows as training data when the teacher has them."""
    empty = np.zeros((1, *meta.shape), dtype=np.float32)
    name = Path(meta.data).name
    if not meta.spec.get("real"):
        return Data(name=name, kind="latents", train=empty, reference=empty, mean=0.0, scale=1.0)
    from safetensors.torch import load_file

    real = load_file(str(Path(folder) / meta.spec["real"]))
    return Data(
        name=name,
        kind="latents",
        train=real["latents"].numpy(),
        reference=empty,
        mean=0.0,
        scale=1.0,
        labels=real["labels"].numpy(),
    )


def check_text_starts(cfg: Config, pipeline: str, generator: Path | None, fake: Path | None) -> None:
    """``--generator`` and ``--fake`` read and, when they are UNet or transformer folders or state dicts, checked
    against the pipeline's network (built from its config on the meta device: no weights, no memory) before anything
    is written or imported. A disback model file is checked against the teacher once it is imported, before any
    stage runs."""
    import torch

    from disback.storage.external import fit_unet, read_start

    if generator is None and fake is None:
        return
    family = family_of(pipeline)
    kind = family.network_type()
    config = load_component(kind.load_config, pipeline, family.network)
    with torch.device("meta"):
        unet = kind.from_config(config)
    for source, role in ((generator, "generator"), (fake, "denoiser")):
        start = read_start(source, role) if source is not None else None
        if start is not None and start.fmt != "disback":
            rank = cfg.network.lora_rank if role == "denoiser" else 0
            fit_unet(unet, start, sigma_g=cfg.distill.sigma_g, lora_rank=rank, check_only=True)
        del start  # one state dict in memory at a time


def run_text(
    cfg: Config,
    pipeline: str,
    prompts_file: Path,
    out: Path,
    show_progress: bool = True,
    resume: bool = False,
    backtrack: bool = True,
    real_file: Path | None = None,
    generator: Path | None = None,
    fake: Path | None = None,
) -> Path:
    """Import the teacher and encode the prompts (and the real images, if given), record the degradation path (unless
    ``backtrack`` is False: the baseline), distill over it, and export the pipeline; each part in its own folder
    under ``out``. ``generator`` and ``fake``: a one-step generator (e.g. DMD2's UNet state dict) and a fake score
    distilled before to start from (the original DisBack's recipe), converted once into ``out``."""
    from diffusers import DDPMScheduler

    family = family_of(pipeline)  # an unknown pipeline class fails here, with the families disback knows
    check_guidance(family, cfg.text.guidance)
    if isinstance(cfg.distill.sigma_g, list):
        raise DisbackError(
            f"distill.sigma_g={cfg.distill.sigma_g}: a text generator's steps are text.timestep, not noise levels; "
            "leave distill.sigma_g a number and give the timesteps, e.g. --set text.timestep=[999,749,499,249]"
        )
    sharded(cfg, accelerator(cfg.run.precision))  # a launch that cannot shard fails before the teacher is imported
    if METHODS[cfg.distill.method].gan and real_file is None:
        raise DisbackError(
            f"method {cfg.distill.method} needs real images for its GAN term: give --real captions.jsonl "
            '(lines {"image": ..., "prompt": ...}), or use --method dmd, vsd or sid'
        )
    steps = len(cfg.text.timestep) if isinstance(cfg.text.timestep, list) else 1
    if steps > 1 and cfg.distill.step_input == "data" and real_file is None:
        raise DisbackError(
            "distill.step_input 'data' trains the steps on real latents noised to their timesteps: give --real "
            "captions.jsonl, or leave distill.step_input at 'simulate' (DMD2's backward simulation)"
        )
    check_text_starts(cfg, pipeline, generator, fake)
    scheduler = load_component(DDPMScheduler.load_config, pipeline, "scheduler")
    # before anything is written
    check_timesteps(family, cfg.text.timestep, int(scheduler.get("num_train_timesteps", 1000)))
    if family.flow:
        check_flow_settings(pipeline, family, cfg.text)
    out = Path(out)
    real = [(str(image), caption) for image, caption in read_captions(real_file)] if real_file else []
    if resume and is_writer() and (out / "teacher" / "config.yaml").is_file() and not (out / "config.yaml").is_file():
        write_config(cfg, out)  # a run begun before the run folder had a config of its own
    wait()
    begin_stage(cfg, out, resume)  # the run's own config.yaml: the folder is disback's (--overwrite may delete it)
    begin_stage(
        cfg, out / "teacher", resume, {"pipeline": str(pipeline), "prompts": read_prompts(prompts_file), "real": real}
    )
    teacher_file = out / "teacher" / TEACHER
    if is_writer() and not (resume and teacher_file.is_file()):  # one process encodes; the others read its files
        import_text_teacher(pipeline, prompts_file, cfg.text, out / "teacher", real_file)
    wait()
    meta = read_meta(teacher_file)
    cfg = shifted(cfg, meta)
    data = latent_data(meta, teacher_file.parent)
    starts = {
        role: stages.convert_start(cfg, teacher_file, source, role, out)
        for role, source in (("generator", generator), ("denoiser", fake))
        if source is not None
    }
    wait()
    path = (
        stages.record_path(cfg, teacher_file, out / "path", show_progress, resume, generator=starts.get("generator"))
        if backtrack
        else None
    )
    write_json(out / "start_far.json", stages.start_far(cfg, data, teacher_file, path, starts.get("generator")))
    run = out / ("disback" if backtrack else "baseline")
    measure = clip_measure(cfg, pipeline, teacher_file.parent)
    stages.distill(
        cfg,
        data,
        teacher_file,
        path,
        run,
        show_progress,
        resume,
        generator=starts.get("generator"),
        fake=starts.get("denoiser"),
        measure=measure,
    )
    if is_writer():
        export_text(run / "generator.safetensors", out / "pipeline")
        write_text_report(out, run)
    wait()
    return out / "pipeline"


def shifted(cfg: Config, meta: ModelMeta) -> Config:
    """A flow teacher's losses draw ln(sigma) = logit(t) ~ N(edm.p_mean + ln s, edm.p_std^2): the logit-normal
    centred where the teacher samples, s being its time shift (text.shift, or 0 for the one its scheduler applies at
    this resolution, recorded at import). The run's config records the shifted p_mean. UNet teachers: unchanged."""
    if "family" not in meta.spec:
        return cfg
    shift = cfg.text.shift or meta.spec["shift"]
    return replace(cfg, edm=replace(cfg.edm, p_mean=cfg.edm.p_mean + math.log(shift)))


def clip_measure(cfg: Config, pipeline: str, teacher_folder: Path) -> LatentClip | None:
    """eval.clip's CLIP score of the evaluation's latents against their prompts, or None (losses only)."""
    if not cfg.eval.clip:
        return None
    return LatentClip(pipeline, cfg.eval.clip, json.loads((teacher_folder / PROMPT_TEXTS).read_text()))
