"""`disback export`: a trained one-step (or k-step) image generator as a diffusers pipeline folder."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from disback.diffusion.denoisers import EDMDenoiser, VPDenoiser
from disback.diffusion.generator import levels
from disback.errors import DisbackError
from disback.storage.files import write_folder
from disback.storage.kinds import kind_of
from disback.storage.meta import read_meta
from disback.storage.models import load_model


def find_generator(run: Path) -> Path:
    """A generator file, a distillation run folder, or a demo folder (its DisBack run)."""
    for candidate in (run, run / "generator.safetensors", run / "disback" / "generator.safetensors"):
        if candidate.is_file():
            return candidate
    raise DisbackError(
        f"no generator.safetensors in {run}; give a run folder of `disback backtrack`, `distill` or `demo`"
    )


def build_pipeline(generator_file: Path):
    from disback.jobs.pipeline_onestep import OneStepPipeline

    model, meta = load_model(generator_file)
    if not meta.is_images:
        raise DisbackError(f"{generator_file} generates points, not images; use `disback sample` for point generators")
    if meta.normaliser.get("scale") != 0.5 or meta.normaliser.get("mean") != 0.5:
        raise DisbackError(
            f"{generator_file} does not map images to [-1, 1]; it cannot be exported as a diffusers pipeline"
        )
    denoiser, sigmas = model.denoiser, levels(model.sigma_g)
    if isinstance(denoiser, EDMDenoiser):
        return OneStepPipeline(
            unet=denoiser.backbone.unet,
            preconditioning="edm",
            sigma_g=per_step(sigmas),
            sigma_data=denoiser.sigma_data,
            timestep=per_step([edm_timestep(s) for s in sigmas]),
        )
    if isinstance(denoiser, VPDenoiser):
        return OneStepPipeline(
            unet=denoiser.unet,
            preconditioning="vp",
            sigma_g=per_step(sigmas),
            timestep=per_step([float(denoiser.sigma_to_t(torch.tensor([s]))[0]) for s in sigmas]),
            prediction_type=denoiser.prediction_type,
        )
    raise DisbackError(f"{generator_file}: cannot export a {type(denoiser).__name__}")


def edm_timestep(sigma: float) -> float:
    """The UNet's time input at ``sigma`` under EDM preconditioning (c_noise, scaled as our UNet backbone does)."""
    from disback.diffusion.networks.unet import NOISE_SCALE

    return math.log(sigma) / 4 * NOISE_SCALE


def per_step(values: list[float]) -> float | list[float]:
    """A setting of each step: a number for a one-step generator, so that its config stays what one-step exports
    have always written (and older pipeline.py files read); a list for a k-step one."""
    return values[0] if len(values) == 1 else values


def export(run: Path, out: Path) -> Path:
    """Write the pipeline to a temporary folder beside ``out``, then rename it into place; a generator of a plugin's
    kind is exported as its kind says (disback.storage.kinds)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DisbackError(f"{out} is not empty; choose another --out or delete it")
    generator_file = find_generator(Path(run))
    meta = read_meta(generator_file)
    if meta.role != "generator":
        raise DisbackError(f"{generator_file} is a {meta.role}, not a generator; export a generator.safetensors")
    own = kind_of(meta, generator_file).export
    if own is not None:
        return own(generator_file, out)
    if meta.kind == "nvlabs":  # EDM's networks are not diffusers models: a folder with the network code instead
        from disback.jobs.export_edm import export_edm

        return export_edm(generator_file, out)
    pipe = build_pipeline(generator_file)

    def fill(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        shutil.copy(Path(__file__).with_name("pipeline_onestep.py"), folder / "pipeline.py")

    return write_folder(out, fill)
