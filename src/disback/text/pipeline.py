"""A Stable Diffusion pipeline in and out: its UNet imported once as a text teacher (with the prompt table and, for
dmd2, the real images' latents beside it), and a distilled generator exported as the same pipeline class with an
LCMScheduler, sampled in one step or at the k timesteps of a k-step generator (and a LoRA generator's adapters in
diffusers' LoRA format beside it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from disback.config import TextConfig
from disback.errors import DisbackError
from disback.stages.common import TEACHER
from disback.stages.distill import LORA_GENERATOR
from disback.storage.files import atomic_write, write_folder, write_json
from disback.storage.kinds import unet_spec
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.models import load_model, save_model
from disback.text.captions import REAL, encode_images, read_captions
from disback.text.families import FAMILIES, Family, check_guidance, family_of, flow_shift
from disback.text.networks import TIMESTEP_ALPHAS, FlowTextDenoiser, TextDenoiser
from disback.text.prompts import PROMPTS, Prompts, encode_flow_prompts, encode_prompts, load_component, read_prompts

PROMPT_TEXTS = "prompts.json"  # beside prompts.safetensors: the prompts of its rows
UNET_BIN = "disback_unet_fp16.bin"  # the distilled UNet as a state dict, beside the exported pipeline
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a LoRA generator's adapters: the name load_lora_weights looks for


def import_text_teacher(
    pipeline: str, prompts_file: Path, text: TextConfig, out: Path, real_file: Path | None = None
) -> Path:
    """teacher.safetensors (the pipeline's denoising network as a text denoiser) and prompts.safetensors (the encoded
    prompts); with ``real_file``, real.safetensors too: the images' VAE latents, labelled by their captions' rows in
    the table (the captions join the prompts, so the generator is trained on them as well, as DMD2 does). The family
    (SD1.5, SDXL, SD3, FLUX.1) is read from the pipeline's model_index.json."""
    family = family_of(pipeline)
    prompts = read_prompts(prompts_file)
    real = read_captions(real_file) if real_file else []
    rows: dict[str, int] = {}  # each text's first row in the table (a dict: a data set may hold many images)
    for i, caption in enumerate(prompts):
        rows.setdefault(caption, i)
    for _, caption in real:  # new captions go after the prompts, whose rows stay as they are
        if caption not in rows:
            rows[caption] = len(prompts)
            prompts.append(caption)
    build = _flow_teacher if family.flow else _unet_teacher
    model, table, spec, shape, resolution = build(pipeline, family, prompts, text)
    _save_tensors(table, Path(out) / PROMPTS)
    write_json(Path(out) / PROMPT_TEXTS, prompts)  # the table's rows as text, for the CLIP score
    if real:
        latents = encode_images(pipeline, [image for image, _ in real], resolution)
        _save_tensors({"latents": latents, "labels": torch.tensor([rows[c] for _, c in real])}, Path(out) / REAL)
    spec = {
        **spec,
        "prompts": PROMPTS,
        "prompts_path": str((Path(out) / PROMPTS).resolve()),
        "timestep": text.timestep,
        "real": REAL if real else None,
    }
    meta = ModelMeta(
        role="denoiser",
        kind="text",
        shape=shape,
        normaliser={"mean": 0.0, "scale": 1.0},
        spec=spec,
        data=str(prompts_file),
        num_classes=len(prompts),
        source=str(pipeline),
    )
    path = Path(out) / TEACHER
    save_model(model, path, meta)
    return path


def _unet_teacher(pipeline: str, family: Family, prompts: list[str], text: TextConfig):
    """SD1.5's or SDXL's UNet on its VP schedule, and the prompts encoded by CLIP."""
    from diffusers import DDPMScheduler, LCMScheduler, UNet2DConditionModel

    unet = load_component(UNet2DConditionModel, pipeline, "unet")
    scheduler = load_component(DDPMScheduler, pipeline, "scheduler")
    check_timesteps(family, text.timestep, len(scheduler.alphas_cumprod))
    size = unet.config.sample_size
    xl = unet.config.addition_embed_type == "text_time"  # SDXL's UNet: pooled text and size/crop conditions
    resolution = size * vae_scale_factor(pipeline)
    table = encode_prompts(pipeline, prompts, resolution, xl)  # time ids: the image size
    prediction = scheduler.config.get("prediction_type", "epsilon")
    lcm = LCMScheduler.from_config(scheduler.config)  # what the export samples with
    model = TextDenoiser(
        unet, scheduler.alphas_cumprod, prediction, Prompts(table["embeds"], table.get("pooled"), table.get("time_ids"))
    )
    spec = {
        **unet_spec(unet, scheduler, prediction),
        # the exported pipeline's scheduler's own abar at the generator's timesteps: its steps, bit for bit
        TIMESTEP_ALPHAS: [float(lcm.alphas_cumprod[t]) for t in steps_of(text.timestep)],
    }
    return model, table, spec, [unet.config.in_channels, size, size], resolution


def _flow_teacher(pipeline: str, family: Family, prompts: list[str], text: TextConfig):
    """SD3's or FLUX.1's transformer as a rectified flow, at text.resolution (the pipeline's default when 0), and the
    prompts encoded by the pipeline's own encode_prompt; the time shift the teacher samples with at that size."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_timesteps(family, text.timestep, 1000)
    network = load_component(family.network_type(), pipeline, family.network)
    scheduler = dict(load_component(FlowMatchEulerDiscreteScheduler.load_config, pipeline, "scheduler"))
    side, resolution = latent_side(family, network.config, vae_scale_factor(pipeline), text.resolution)
    length = text.max_sequence_length or family.max_sequence_length
    table = encode_flow_prompts(pipeline, prompts, length)
    check_guidance(family, text.guidance)
    embedded = float(text.guidance) if family.guidance == "embedded" else 0.0
    model = FlowTextDenoiser(network, family.name, Prompts(table["embeds"], table["pooled"], None), 0.0, embedded)
    channels = network.config.in_channels // 4 if family.packed else network.config.in_channels
    patch = 2 if family.packed else network.config["patch_size"]
    spec = {
        "family": family.name,
        "network_config": {k: v for k, v in network.config.items() if not k.startswith("_")},
        "embedded_guidance": embedded,
        "resolution": resolution,
        "max_sequence_length": length,
        "shift": flow_shift(scheduler, (side // patch) ** 2),  # the losses' noise levels follow it (text.shift 0)
    }
    return model, table, spec, [channels, side, side], resolution


def latent_side(family: Family, config: dict, scale: int, resolution: int) -> tuple[int, int]:
    """(latent side, image side) at ``resolution`` pixels (0: the pipeline's default, as its __call__ sets height:
    SD3 the transformer's sample_size, FLUX.1 128 latents, times the VAE's downsampling), checked as the pipeline
    checks height: a whole number of patches (FLUX.1: 2 x 2 tokens), within SD3's position embedding."""
    default = (config["sample_size"] if not family.packed else 128) * scale
    resolution = resolution or default
    patch = 2 if family.packed else config["patch_size"]
    side = resolution // scale
    if resolution % (scale * patch):
        raise DisbackError(
            f"text.resolution={resolution}: {family.name} needs a multiple of {scale * patch} pixels (its VAE "
            f"downsamples {scale} x, its transformer takes {patch} x {patch} patches); e.g. --set "
            f"text.resolution={default}"
        )
    largest = (config.get("pos_embed_max_size") or 0) * patch
    if not family.packed and largest and side > largest:
        raise DisbackError(
            f"text.resolution={resolution}: {family.name}'s position embedding covers at most {largest * scale} "
            f"pixels; set --set text.resolution={largest * scale} or less"
        )
    return side, resolution


def check_flow_settings(pipeline: str, family: Family, text: TextConfig) -> None:
    """A flow teacher's text settings against its network's config, before anything is written or loaded."""
    config = load_component(family.network_type().load_config, pipeline, family.network)
    latent_side(family, config, vae_scale_factor(pipeline), text.resolution)


def check_timesteps(family: Family, timestep: int | list[int], num_timesteps: int) -> None:
    """text.timestep (one, or a k-step generator's list) inside the teacher's schedule: a UNet's discrete timesteps
    [0, num_timesteps), or a flow's times (0, 1000], 1000 being pure noise."""
    steps = steps_of(timestep)
    if family.flow:
        if all(0 < t <= 1000 for t in steps):
            return
        raise DisbackError(
            f"text.timestep is the flow time t times 1000 for {family.name}, in (0, 1000]; got {timestep}; e.g. "
            "1000 (one step from pure noise) or [1000, 750, 500, 250]"
        )
    for t in steps:
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


def call_of(spec: dict) -> dict:
    """The keyword arguments with which the exported pipeline samples the generator that ``spec`` (a text model
    file's) describes. UNets: LCMScheduler at the generator's timesteps, no guidance (DMD2's call for k steps:
    ``num_inference_steps=4, ..., timesteps=[999, 749, 499, 249]``). Flow transformers: one Euler step from pure
    noise (k steps: the flow times as ``sigmas``), at the teacher's resolution and T5 length, with FLUX.1-dev's
    embedded guidance value (SD3 and schnell: none)."""
    steps = steps_of(spec["timestep"])
    if "family" not in spec:
        return {"num_inference_steps": len(steps), "guidance_scale": 0, "timesteps": steps}
    call = {
        "num_inference_steps": len(steps),
        "guidance_scale": spec["embedded_guidance"],
        "height": spec["resolution"],
        "width": spec["resolution"],
        "max_sequence_length": spec["max_sequence_length"],
    }
    if len(steps) > 1:
        call["sigmas"] = [t / 1000 for t in steps]
    return call


def pipe_call(call: dict) -> str:
    """``call`` as the Python that samples one image."""
    return "pipe(prompt, " + ", ".join(f"{k}={v!r}" for k, v in call.items()) + ").images[0]"


def sample_command(folder: Path | str, call: dict) -> str:
    """The lines that load the exported pipeline and sample it."""
    return f"pipe = DiffusionPipeline.from_pretrained('{folder}'); image = {pipe_call(call)}"


def flow_scheduler(config: dict, steps: int):
    """The exported flow pipeline's scheduler: the teacher's FlowMatchEulerDiscreteScheduler with no time shift (the
    generator's times are given as they are: custom sigmas would be shifted too) and, for k steps, its stochastic
    sampling, which re-noises x0 with fresh noise to the next time as the generator does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = dict.fromkeys(("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"), False)
    return FlowMatchEulerDiscreteScheduler.from_config(
        config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, stochastic_sampling=steps > 1, **plain
    )


def export_text(generator_file: Path, out: Path) -> Path:
    """A folder that diffusers loads as the teacher's own pipeline class (no custom code) with the distilled network
    and a scheduler that samples it: the UNet families with an LCMScheduler, as the original DisBack README does
    (``pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[399])``), with the UNet's state dict in fp16
    beside it (``disback_unet_fp16.bin``, which the original README's and DMD2's snippets load into the base
    pipeline); the flow families with a FlowMatchEulerDiscreteScheduler (``num_inference_steps=1``). The call is
    recorded in ``disback.json``. A run with network.generator_lora_rank also gets its adapters in diffusers' LoRA
    format (``pytorch_lora_weights.safetensors``), which the base pipeline's ``load_lora_weights`` reads."""
    from diffusers import DiffusionPipeline, LCMScheduler

    meta = read_meta(generator_file)
    if meta.role != "generator" or meta.kind != "text":
        raise DisbackError(
            f"{generator_file} is a {meta.kind} {meta.role}, not a text-to-image generator; give the generator.safetensors "
            "of a `disback text` run"
        )
    family = FAMILIES[meta.spec.get("family", "sd15")]  # sd15 stands for both UNet families here
    lora_file = Path(generator_file).with_name(LORA_GENERATOR)
    lora = lora_layers(lora_file, meta, family) if lora_file.is_file() else None  # checked before anything is loaded
    generator, _ = load_model(generator_file)
    network = getattr(generator.denoiser, family.network)
    try:
        pipe = DiffusionPipeline.from_pretrained(meta.source, **{family.network: network})
    except (OSError, ValueError) as exc:
        raise DisbackError(
            f"cannot load the teacher's pipeline '{meta.source}' to export into: {str(exc).splitlines()[0]}"
        ) from None
    call = call_of(meta.spec)
    if family.flow:
        pipe.scheduler = flow_scheduler(pipe.scheduler.config, call["num_inference_steps"])
    else:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    out = Path(out)

    def fill(folder: Path) -> None:
        pipe.save_pretrained(folder)
        if not family.flow:  # the UNet alone in fp16 too, as DMD2 and the original DisBack release publish theirs
            torch.save({k: v.half() for k, v in pipe.unet.state_dict().items()}, folder / UNET_BIN)
        record = {"timestep": meta.spec["timestep"], "source": meta.source, "call": call}
        if lora is not None:
            weights, config = lora
            # diffusers' own writer: "unet."/"transformer."-prefixed peft keys, and the LoraConfig (scale 1)
            save = {f"{family.network}_lora_layers": weights, f"{family.network}_lora_adapter_metadata": config}
            type(pipe).save_lora_weights(folder, **save)
            record["lora"] = {"file": LORA_WEIGHTS, "rank": config["r"], "lora_alpha": config["lora_alpha"]}
        (folder / "disback.json").write_text(json.dumps(record) + "\n")
        (folder / "DISBACK.md").write_text(readme(out, meta, lora is not None))

    return write_folder(out, fill)


def lora_layers(lora_file: Path, meta: ModelMeta, family: Family) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA generator's adapters (``generator-lora.safetensors``: disback's keys, e.g.
    ``net.denoiser.unet.<module>.lora_A.default.weight``) as diffusers saves a network's LoRA: keys by the UNet's (or
    transformer's) own module paths in peft's format without the adapter's name (``<module>.lora_A.weight``), and
    their LoraConfig."""
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
    prefix = f"net.denoiser.{family.network}."  # the network's modules inside Adapted(generator)
    weights = {}
    for key, value in load_file(str(lora_file)).items():
        module, _, rest = key.removeprefix(prefix).partition(".lora_")
        if not key.startswith(prefix) or rest not in ("A.default.weight", "B.default.weight"):
            raise DisbackError(
                f"{lora_file}: key {key} is not a LoRA adapter on the {family.network} "
                f"({prefix}<module>.lora_A.default.weight); run the distillation again"
            )
        weights[f"{module}.lora_{rest.replace('.default', '')}"] = value
    rank = adapters.adapter_rank
    targets = sorted({k.partition(".lora_")[0] for k in weights})
    return weights, {"r": rank, "lora_alpha": rank, "target_modules": targets}  # Adapted's: lora_alpha = rank


def readme(out: Path, meta: ModelMeta, lora: bool) -> str:
    """DISBACK.md: what the folder holds and the calls that sample it."""
    timestep, call = meta.spec["timestep"], call_of(meta.spec)
    snippet = sample_command(out, call).replace("; ", "\n")
    text = (
        f"{steps_name(timestep).capitalize()} generator distilled by disback from {meta.source}.\n\n"
        f"```python\nfrom diffusers import DiffusionPipeline\n{snippet}\n```\n"
    )
    if len(steps_of(timestep)) > 1 and "family" not in meta.spec:
        text += (
            f"\nThe UNet alone is `{UNET_BIN}` (fp16), which DMD2's snippet loads into the base pipeline:\n\n"
            "```python\nimport torch\nfrom diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel\n\n"
            f"unet = UNet2DConditionModel.from_config('{meta.source}', subfolder='unet')\n"
            f"unet.load_state_dict(torch.load('{Path(out) / UNET_BIN}', weights_only=True))\n"
            f"pipe = DiffusionPipeline.from_pretrained('{meta.source}', unet=unet)\n"
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
            f"image = {pipe_call(call)}\n```\n"
        )
    if lora:
        flow = "family" in meta.spec
        stochastic = call["num_inference_steps"] > 1
        scheduler = (
            "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0, "
            f"use_dynamic_shifting=False, stochastic_sampling={stochastic})\n"
            if flow
            else "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
        )
        text += (
            f"\nThe generator was trained as LoRA adapters on the base pipeline's {'transformer' if flow else 'UNet'}. "
            f"`{LORA_WEIGHTS}` holds them in diffusers' LoRA format. Load them into the **base** pipeline (this "
            "folder's network has them merged already):\n\n"
            f"```python\nfrom diffusers import DiffusionPipeline, {'FlowMatchEulerDiscreteScheduler' if flow else 'LCMScheduler'}\n\n"
            f"pipe = DiffusionPipeline.from_pretrained('{meta.source}')\n"
            f"pipe.load_lora_weights('{out}')\npipe.fuse_lora()\n"
            f"{scheduler}"
            f"image = {pipe_call(call)}\n```\n"
        )
    return text
