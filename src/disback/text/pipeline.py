"""A Stable Diffusion pipeline in and out: its UNet imported once as a text teacher (with the prompt table and, for
dmd2, the real images' latents beside it), and a distilled generator exported as the same pipeline class with an
LCMScheduler, sampled in one step or at the k timesteps of a k-step generator (and a LoRA generator's adapters in
diffusers' LoRA format beside it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from disback.errors import DisbackError
from disback.stages.common import TEACHER
from disback.stages.distill import LORA_GENERATOR
from disback.storage.files import atomic_write, write_folder, write_json
from disback.storage.kinds import unet_spec
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.models import load_model, save_model
from disback.text.captions import REAL, encode_images, read_captions
from disback.text.networks import TIMESTEP_ALPHAS, TextDenoiser
from disback.text.prompts import PROMPTS, Prompts, encode_prompts, load_component, read_prompts

PROMPT_TEXTS = "prompts.json"  # beside prompts.safetensors: the prompts of its rows
UNET_BIN = "disback_unet_fp16.bin"  # the distilled UNet as a state dict, beside the exported pipeline
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a LoRA generator's adapters: the name load_lora_weights looks for
LORA_PREFIX = "net.denoiser.unet."  # the UNet's modules inside a LoRA generator's adapters (Adapted(LCMGenerator))


def import_text_teacher(
    pipeline: str, prompts_file: Path, timestep: int | list[int], out: Path, real_file: Path | None = None
) -> Path:
    """teacher.safetensors (the pipeline's UNet as a TextDenoiser) and prompts.safetensors (the encoded prompts); with
    ``real_file``, real.safetensors too: the images' VAE latents, labelled by their captions' rows in the table (the
    captions join the prompts, so the generator is trained on them as well, as DMD2 does)."""
    from diffusers import DDPMScheduler, LCMScheduler, UNet2DConditionModel

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
    lcm = LCMScheduler.from_config(scheduler.config)  # what the export samples with
    model = TextDenoiser(
        unet, scheduler.alphas_cumprod, prediction, Prompts(table["embeds"], table.get("pooled"), table.get("time_ids"))
    )
    spec = {
        **unet_spec(unet, scheduler, prediction),
        "prompts": PROMPTS,
        "prompts_path": str((Path(out) / PROMPTS).resolve()),
        "timestep": timestep,
        # the exported pipeline's scheduler's own abar at the generator's timesteps: its steps, bit for bit
        TIMESTEP_ALPHAS: [float(lcm.alphas_cumprod[t]) for t in steps_of(timestep)],
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


def steps_of(timestep: int | list[int]) -> list[int]:
    """text.timestep as the list of the generator's timesteps (one for a one-step generator)."""
    return [int(t) for t in timestep] if isinstance(timestep, (list, tuple)) else [int(timestep)]


def steps_name(timestep: int | list[int]) -> str:
    """ "one-step", or "4-step" for a k-step generator: how the pipeline is described to the user."""
    k = len(steps_of(timestep))
    return "one-step" if k == 1 else f"{k}-step"


def sample_command(folder: Path | str, timestep: int | list[int]) -> str:
    """The call that samples the exported pipeline: LCMScheduler at the generator's timesteps, no guidance (a k-step
    generator: DMD2's call, e.g. ``num_inference_steps=4, ..., timesteps=[999, 749, 499, 249]``)."""
    return f"pipe = DiffusionPipeline.from_pretrained('{folder}'); image = {pipe_call(timestep)}"


def pipe_call(timestep: int | list[int]) -> str:
    steps = steps_of(timestep)
    return f"pipe(prompt, num_inference_steps={len(steps)}, guidance_scale=0, timesteps={steps}).images[0]"


def export_text(generator_file: Path, out: Path) -> Path:
    """A folder that diffusers loads as the teacher's own pipeline class (StableDiffusionPipeline or
    StableDiffusionXLPipeline) with the distilled UNet and an LCMScheduler, sampled as the original DisBack README does:
    ``pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[399])`` (a k-step generator as DMD2's README
    does: ``num_inference_steps=4, ..., timesteps=[999, 749, 499, 249]``); beside it the UNet's state dict in fp16
    (``disback_unet_fp16.bin``), which the original README's snippet (and DMD2's) loads into the base pipeline. A run
    with network.generator_lora_rank also gets its adapters in diffusers' LoRA format
    (``pytorch_lora_weights.safetensors``), which the base pipeline's ``load_lora_weights`` reads."""
    from diffusers import DiffusionPipeline, LCMScheduler

    meta = read_meta(generator_file)
    if meta.role != "generator" or meta.kind != "text":
        raise DisbackError(
            f"{generator_file} is a {meta.kind} {meta.role}, not a text-to-image generator; give the generator.safetensors "
            "of a `disback text` run"
        )
    lora_file = Path(generator_file).with_name(LORA_GENERATOR)
    lora = lora_layers(lora_file, meta) if lora_file.is_file() else None  # checked before anything is loaded
    generator, _ = load_model(generator_file)
    try:
        pipe = DiffusionPipeline.from_pretrained(meta.source, unet=generator.denoiser.unet)
    except (OSError, ValueError) as exc:
        raise DisbackError(
            f"cannot load the teacher's pipeline '{meta.source}' to export into: {str(exc).splitlines()[0]}"
        ) from None
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    out, timestep = Path(out), meta.spec["timestep"]

    def fill(folder: Path) -> None:
        pipe.save_pretrained(folder)
        # the UNet alone as a state dict in fp16 too, as DMD2 and the original DisBack release publish theirs
        torch.save({k: v.half() for k, v in pipe.unet.state_dict().items()}, folder / UNET_BIN)
        record = {"timestep": timestep, "source": meta.source}
        if lora is not None:
            weights, config = lora
            # diffusers' own writer: "unet."-prefixed peft keys, and the LoraConfig (lora_alpha = rank: scale 1)
            type(pipe).save_lora_weights(folder, unet_lora_layers=weights, unet_lora_adapter_metadata=config)
            record["lora"] = {"file": LORA_WEIGHTS, "rank": config["r"], "lora_alpha": config["lora_alpha"]}
        (folder / "disback.json").write_text(json.dumps(record) + "\n")
        (folder / "DISBACK.md").write_text(readme(out, meta, lora is not None))

    return write_folder(out, fill)


def lora_layers(lora_file: Path, meta: ModelMeta) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA generator's adapters (``generator-lora.safetensors``: disback's keys, e.g.
    ``net.denoiser.unet.<module>.lora_A.default.weight``) as diffusers saves a UNet's LoRA: keys by the UNet's own
    module paths in peft's format without the adapter's name (``<module>.lora_A.weight``), and their LoraConfig."""
    from safetensors.torch import load_file

    adapters = read_meta(lora_file)
    if adapters.role != "generator" or adapters.kind != "text" or not adapters.adapter_rank:
        raise DisbackError(
            f"{lora_file} is not a text generator's LoRA adapters (a {adapters.kind} {adapters.role}, adapter rank "
            f"{adapters.adapter_rank}); remove it, or run the distillation again with network.generator_lora_rank"
        )
    if adapters.source != meta.source or adapters.spec.get("timestep") != meta.spec.get("timestep"):
        raise DisbackError(
            f"{lora_file} belongs to another run than the generator beside it (pipeline {adapters.source}, timesteps "
            f"{adapters.spec.get('timestep')}); run the distillation again"
        )
    weights = {}
    for key, value in load_file(str(lora_file)).items():
        module, _, rest = key.removeprefix(LORA_PREFIX).partition(".lora_")
        if not key.startswith(LORA_PREFIX) or rest not in ("A.default.weight", "B.default.weight"):
            raise DisbackError(
                f"{lora_file}: key {key} is not a LoRA adapter on the UNet ({LORA_PREFIX}<module>.lora_A.default.weight)"
                "; run the distillation again"
            )
        weights[f"{module}.lora_{rest.replace('.default', '')}"] = value
    rank = adapters.adapter_rank
    targets = sorted({k.partition(".lora_")[0] for k in weights})
    return weights, {"r": rank, "lora_alpha": rank, "target_modules": targets}  # Adapted's: lora_alpha = rank


def readme(out: Path, meta: ModelMeta, lora: bool) -> str:
    """DISBACK.md: what the folder holds and the calls that sample it."""
    timestep = meta.spec["timestep"]
    snippet = sample_command(out, timestep).replace("; ", "\n")
    text = (
        f"{steps_name(timestep).capitalize()} generator distilled by disback from {meta.source}.\n\n"
        f"```python\nfrom diffusers import DiffusionPipeline\n{snippet}\n```\n"
    )
    if len(steps_of(timestep)) > 1:
        text += (
            f"\nThe UNet alone is `{UNET_BIN}` (fp16), which DMD2's snippet loads into the base pipeline:\n\n"
            "```python\nimport torch\nfrom diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel\n\n"
            f"unet = UNet2DConditionModel.from_config('{meta.source}', subfolder='unet')\n"
            f"unet.load_state_dict(torch.load('{Path(out) / UNET_BIN}'))\n"
            f"pipe = DiffusionPipeline.from_pretrained('{meta.source}', unet=unet)\n"
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
            f"image = {pipe_call(timestep)}\n```\n"
        )
    if lora:
        text += (
            f"\nThe generator was trained as LoRA adapters on the base pipeline's UNet. `{LORA_WEIGHTS}` holds them "
            "in diffusers' LoRA format. Load them into the **base** pipeline (this folder's UNet has them merged "
            "already):\n\n"
            "```python\nfrom diffusers import DiffusionPipeline, LCMScheduler\n\n"
            f"pipe = DiffusionPipeline.from_pretrained('{meta.source}')\n"
            f"pipe.load_lora_weights('{out}')\npipe.fuse_lora()\n"
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
            f"image = {pipe_call(timestep)}\n```\n"
        )
    return text
