"""A Stable Diffusion pipeline in and out: its UNet imported once as a text teacher (with the prompt table and, for
dmd2, the real images' latents beside it), and a distilled generator exported as the same pipeline class with an
LCMScheduler, sampled in one step."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from disback.errors import DisbackError
from disback.stages.common import TEACHER
from disback.storage.files import atomic_write, write_folder, write_json
from disback.storage.kinds import unet_spec
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.models import load_model, save_model
from disback.text.captions import REAL, encode_images, read_captions
from disback.text.networks import TextDenoiser
from disback.text.prompts import PROMPTS, Prompts, encode_prompts, load_component, read_prompts

PROMPT_TEXTS = "prompts.json"  # beside prompts.safetensors: the prompts of its rows
UNET_BIN = "disback_unet_fp16.bin"  # the distilled UNet as a state dict, beside the exported pipeline


def import_text_teacher(
    pipeline: str, prompts_file: Path, timestep: int | list[int], out: Path, real_file: Path | None = None
) -> Path:
    """teacher.safetensors (the pipeline's UNet as a TextDenoiser) and prompts.safetensors (the encoded prompts); with
    ``real_file``, real.safetensors too: the images' VAE latents, labelled by their captions' rows in the table (the
    captions join the prompts, so the generator is trained on them as well, as DMD2 does)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    prompts = read_prompts(prompts_file)
    real = read_captions(real_file) if real_file else []
    rows: dict[str, int] = {}  # each text's first row in the table (a dict: a data set may hold many images)
    for i, text in enumerate(prompts):
        rows.setdefault(text, i)
    for _, caption in real:  # new captions go after the prompts, whose rows stay as they are
        if caption not in rows:
            rows[caption] = len(prompts)
            prompts.append(caption)
    unet = load_component(UNet2DConditionModel, pipeline, "unet")
    scheduler = load_component(DDPMScheduler, pipeline, "scheduler")
    check_timesteps(timestep, len(scheduler.alphas_cumprod))
    size = unet.config.sample_size
    xl = unet.config.addition_embed_type == "text_time"  # SDXL's UNet: pooled text and size/crop conditions
    resolution = size * vae_scale_factor(pipeline)
    table = encode_prompts(pipeline, prompts, resolution, xl)  # time ids: the image size
    _save_tensors(table, Path(out) / PROMPTS)
    write_json(Path(out) / PROMPT_TEXTS, prompts)  # the table's rows as text, for the CLIP score
    if real:
        latents = encode_images(pipeline, [image for image, _ in real], resolution)
        _save_tensors({"latents": latents, "labels": torch.tensor([rows[c] for _, c in real])}, Path(out) / REAL)
    prediction = scheduler.config.get("prediction_type", "epsilon")
    model = TextDenoiser(
        unet, scheduler.alphas_cumprod, prediction, Prompts(table["embeds"], table.get("pooled"), table.get("time_ids"))
    )
    spec = {
        **unet_spec(unet, scheduler, prediction),
        "prompts": PROMPTS,
        "prompts_path": str((Path(out) / PROMPTS).resolve()),
        "timestep": timestep,
        "real": REAL if real else None,
    }
    meta = ModelMeta(
        role="denoiser",
        kind="text",
        shape=[unet.config.in_channels, size, size],
        normaliser={"mean": 0.0, "scale": 1.0},
        spec=spec,
        data=str(prompts_file),
        num_classes=len(prompts),
        source=str(pipeline),
    )
    path = Path(out) / TEACHER
    save_model(model, path, meta)
    return path


def check_timesteps(timestep: int | list[int], num_timesteps: int) -> None:
    """text.timestep (one, or a k-step generator's list) inside the teacher's schedule."""
    for t in timestep if isinstance(timestep, list) else [timestep]:
        if not 0 <= t < num_timesteps:
            raise DisbackError(
                f"text.timestep must lie in the teacher's schedule [0, {num_timesteps}), got {timestep}; e.g. 399, "
                f"or [{num_timesteps - 1}, {3 * num_timesteps // 4 - 1}, {num_timesteps // 2 - 1}, {num_timesteps // 4 - 1}]"
            )


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def vae_scale_factor(pipeline: str) -> int:
    """How much the pipeline's VAE downsamples (8 for SD1.5 and SDXL), as the pipelines compute it."""
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(pipeline, subfolder="vae")
    except (OSError, ValueError):
        return 8
    return 2 ** (len(config["block_out_channels"]) - 1)


def sample_command(folder: Path | str, timestep: int) -> str:
    return (
        f"pipe = DiffusionPipeline.from_pretrained('{folder}'); "
        f"image = pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[{timestep}]).images[0]"
    )


def export_text(generator_file: Path, out: Path) -> Path:
    """A folder that diffusers loads as the teacher's own pipeline class (StableDiffusionPipeline or
    StableDiffusionXLPipeline) with the distilled UNet and an LCMScheduler, sampled as the original DisBack README does:
    ``pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[399])``; beside it the UNet's state dict in fp16
    (``disback_unet_fp16.bin``), which the original README's snippet loads into the base pipeline."""
    from diffusers import DiffusionPipeline, LCMScheduler

    meta = read_meta(generator_file)
    if meta.role != "generator" or meta.kind != "text":
        raise DisbackError(
            f"{generator_file} is a {meta.kind} {meta.role}, not a text-to-image generator; give the generator.safetensors "
            "of a `disback text` run"
        )
    generator, _ = load_model(generator_file)
    try:
        pipe = DiffusionPipeline.from_pretrained(meta.source, unet=generator.denoiser.unet)
    except (OSError, ValueError) as exc:
        raise DisbackError(
            f"cannot load the teacher's pipeline '{meta.source}' to export into: {str(exc).splitlines()[0]}"
        ) from None
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    out = Path(out)

    def fill(folder: Path) -> None:
        pipe.save_pretrained(folder)
        # the UNet alone as a state dict in fp16 too, as DMD2 and the original DisBack release publish theirs
        torch.save({k: v.half() for k, v in pipe.unet.state_dict().items()}, folder / UNET_BIN)
        (folder / "disback.json").write_text(
            json.dumps({"timestep": meta.spec["timestep"], "source": meta.source}) + "\n"
        )
        snippet = sample_command(out, meta.spec["timestep"]).replace("; ", "\n")
        (folder / "DISBACK.md").write_text(
            f"One-step generator distilled by disback from {meta.source}.\n\n"
            f"```python\nfrom diffusers import DiffusionPipeline\n{snippet}\n```\n"
        )

    return write_folder(out, fill)
