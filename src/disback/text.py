"""Text-to-image: a Stable Diffusion 1.5 or SDXL pipeline's UNet distilled to one step, on the same engine.

Prompts are encoded once with the pipeline's text encoder(s) into a table (``prompts.safetensors``) and the encoders are
freed. From there a prompt is an index into that table, so the engine's class-label plumbing (labels drawn per batch,
split across processes, balanced at evaluation, checkpointed) carries prompts unchanged. The table's last row is
classifier-free guidance's unconditional input: the empty prompt for SD1.5, zeros for SDXL (as its pipeline does).

TextDenoiser  the UNet2DConditionModel as a VP denoiser D(x; sigma, prompt); with ``guidance`` > 1 it returns the
              guided D_uncond + w (D_cond - D_uncond). The target has guidance (text.guidance, 8 in the original);
              the fake score and the degrading model have none.
LCMGenerator  G(z, prompt): the UNet at one fixed timestep (text.timestep, 399) on z, computed exactly as diffusers'
              LCMScheduler does a one-step sample, so the exported pipeline reproduces the generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disback.denoiser import VPDenoiser
from disback.errors import DisbackError

PROMPTS = "prompts.safetensors"


# ---------------------------------------------------------------- prompts


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (.txt), or JSON lines with a "prompt" (or "text") field (.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise DisbackError(f"prompts file {path} does not exist; give a .txt file with one prompt per line, or .jsonl")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"] if "prompt" in row else row["text"]))
            except (ValueError, KeyError, TypeError):
                raise DisbackError(f"{path} line {i}: expected a JSON object with a \"prompt\" field, got {line[:80]!r}") from None
    else:
        prompts = lines
    if not prompts:
        raise DisbackError(f"{path} holds no prompts")
    return prompts


class Prompts:
    """The encoded prompts (and the unconditional row, last), shared by every network that reads them: copying a
    network (copy.deepcopy) does not copy the table."""

    def __init__(self, embeds: torch.Tensor, pooled: torch.Tensor | None, time_ids: torch.Tensor | None):
        self.embeds, self.pooled, self.time_ids = embeds, pooled, time_ids

    def __deepcopy__(self, memo: dict) -> "Prompts":
        return self

    def __len__(self) -> int:
        return len(self.embeds) - 1  # the prompts proper; index len(self) is the unconditional row

    def to(self, device: torch.device | str) -> "Prompts":
        self.embeds = self.embeds.to(device)
        self.pooled = None if self.pooled is None else self.pooled.to(device)
        self.time_ids = None if self.time_ids is None else self.time_ids.to(device)
        return self

    def conditions(self, index: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        """The UNet's keyword arguments for prompts ``index``; the table moves to their device once (it is shared)."""
        if self.embeds.device != index.device:
            self.to(index.device)
        out: dict[str, Any] = {"encoder_hidden_states": self.embeds[index].to(dtype)}
        if self.pooled is not None:  # SDXL's added conditions
            out["added_cond_kwargs"] = {"text_embeds": self.pooled[index].to(dtype),
                                        "time_ids": self.time_ids.to(dtype).expand(len(index), -1)}
        return out

    @classmethod
    def load(cls, path: Path) -> "Prompts":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["embeds"], t.get("pooled"), t.get("time_ids"))


@torch.no_grad()
def encode_prompts(pipeline: str, prompts: list[str], resolution: int, xl: bool) -> dict[str, torch.Tensor]:
    """The table's tensors, from the pipeline's tokenizer(s) and text encoder(s) as its own encode_prompt computes them
    (SD1.5: the encoder's last hidden state; SDXL: both encoders' penultimate states side by side, and the second's
    pooled output)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = _load(CLIPTokenizer, pipeline, "tokenizer")
    encoder = _load(CLIPTextModel, pipeline, "text_encoder")
    texts = prompts + [""]
    if not xl:
        return {"embeds": _encode(tokenizer, encoder, texts)[0]}
    tokenizer_2 = _load(CLIPTokenizer, pipeline, "tokenizer_2")
    encoder_2 = _load(CLIPTextModelWithProjection, pipeline, "text_encoder_2")
    first = _encode(tokenizer, encoder, texts, penultimate=True)[0]
    second, pooled = _encode(tokenizer_2, encoder_2, texts, penultimate=True)
    embeds = torch.cat([first, second], dim=-1)
    embeds[-1], pooled[-1] = 0, 0  # SDXL pipelines give zeros for an empty negative prompt (force_zeros_for_empty_prompt)
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return {"embeds": embeds, "pooled": pooled, "time_ids": time_ids}


def _encode(tokenizer, encoder, texts: list[str], penultimate: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)  # 77 for CLIP, as pipelines pad
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids, output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out[0]
    return hidden.float(), (out.text_embeds.float() if hasattr(out, "text_embeds") else None)


def _load(cls, pipeline: str, subfolder: str):
    try:
        return cls.from_pretrained(pipeline, subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise DisbackError(f"cannot load {cls.__name__} from '{pipeline}' (subfolder '{subfolder}'): "
                           f"{str(exc).splitlines()[0]}; give a Stable Diffusion pipeline folder or hub id") from None


# ---------------------------------------------------------------- real images (DMD2's GAN term)

REAL = "real.safetensors"


def read_captions(path: Path) -> list[tuple[Path, str]]:
    """JSON lines with an "image" (a path, relative to the file or absolute) and a "prompt" (or "text") field."""
    path = Path(path)
    if not path.is_file():
        raise DisbackError(f"real images file {path} does not exist; give a .jsonl file of {{\"image\": ..., \"prompt\": ...}} lines")
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = Path(path.parent, row["image"]), str(row["prompt"] if "prompt" in row else row["text"])
        except (ValueError, KeyError, TypeError):
            raise DisbackError(f"{path} line {i}: expected a JSON object with \"image\" and \"prompt\" fields, got {line[:80]!r}") from None
        if not image.is_file():
            raise DisbackError(f"{path} line {i}: image {image} does not exist (relative paths are read from {path.parent})")
        pairs.append((image, caption))
    if not pairs:
        raise DisbackError(f"{path} holds no images")
    return pairs


@torch.no_grad()
def encode_images(pipeline: str, images: list[Path], resolution: int, batch: int = 8) -> torch.Tensor:
    """The pipeline's VAE latents of the images (shorter side resized to ``resolution``, centre-cropped, scaled to
    [-1, 1] as the pipelines' image processor does): the latent mean times the VAE's scaling factor, so the same
    files always give the same latents."""
    from diffusers import AutoencoderKL

    vae = _load(AutoencoderKL, pipeline, "vae")
    latents = []
    for i in range(0, len(images), batch):
        x = torch.stack([_image(p, resolution) for p in images[i:i + batch]])
        latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(latents)


def _image(path: Path, resolution: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError):
        raise DisbackError(f"cannot read image {path}; give PNG or JPEG files") from None
    scale = resolution / min(image.size)
    w, h = max(round(image.width * scale), resolution), max(round(image.height * scale), resolution)
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


# ---------------------------------------------------------------- networks


class TextDenoiser(VPDenoiser):
    """A UNet2DConditionModel as a VP denoiser whose ``labels`` are prompt indices; classifier-free guided when
    ``guidance`` > 1."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str, prompts: Prompts,
                 guidance: float = 0.0):
        super().__init__(unet, alphas_cumprod, prediction_type)
        self.prompts, self.guidance = prompts, guidance

    def call_unet(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x_t, t, **self.prompts.conditions(_prompts(labels).to(x_t.device), x_t.dtype)).sample

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.guidance <= 1:
            return super().forward(x, sigma, labels)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        uncond = torch.full_like(_prompts(labels), len(self.prompts))
        both = super().forward(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, uncond]))
        cond, free = both.chunk(2)
        return free + self.guidance * (cond - free)


def _prompts(labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError("a text-conditional network needs prompt indices as its labels")
    return labels


class LCMGenerator(nn.Module):
    """G(z, prompt) = c_skip z + c_out x0_pred(UNet(z, t)): diffusers' LCMScheduler.step at timestep t, the last (and
    only) step, so ``pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[t])`` samples this generator."""

    def __init__(self, denoiser: TextDenoiser, timestep: int, timestep_scaling: float = 10.0):
        super().__init__()
        self.denoiser, self.timestep = denoiser, int(timestep)
        scaled = self.timestep * timestep_scaling
        self.c_skip, self.c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5  # LCM's sigma_data 0.5

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.full((len(z),), self.timestep, device=z.device)
        out = self.denoiser.call_unet(z, t, labels)
        # abar_t from the denoiser's schedule (a buffer, loaded with the weights): sigma^2 = (1 - abar) / abar
        abar = 1 / (1 + torch.exp(2 * self.denoiser.log_sigmas[self.timestep].double()))
        alpha, beta = float(abar.sqrt()), float((1 - abar).sqrt())
        kind = self.denoiser.prediction_type
        x0 = (z - beta * out) / alpha if kind == "epsilon" else (alpha * z - beta * out if kind == "v_prediction" else out)
        return self.c_skip * z + self.c_out * x0


def guide(target: nn.Module, scale: float) -> nn.Module:
    """Classifier-free guidance at ``scale`` on every text denoiser inside ``target`` (the target score only)."""
    for module in target.modules():
        if isinstance(module, TextDenoiser):
            module.guidance = scale
    return target


def rebuild_text_denoiser(meta: dict[str, Any], folder: Path) -> TextDenoiser:
    """The network a text-to-image model file describes; its prompt table is the file beside the teacher's."""
    from diffusers import UNet2DConditionModel

    # beside the model file (the teacher's folder), else where the teacher's import wrote it
    table = next((t for t in (Path(folder) / meta["prompts"], Path(meta["prompts_path"])) if t.is_file()), None)
    if table is None:
        raise DisbackError(f"{meta['prompts_path']} is missing: a text-to-image model needs the prompt table that "
                           "`disback text` wrote beside its teacher")
    unet = UNet2DConditionModel.from_config(meta["unet_config"])
    model = TextDenoiser(unet, torch.full((meta["num_timesteps"],), 0.5), meta["prediction_type"], Prompts.load(table))
    model.generator_timestep = meta["timestep"]  # the schedule is loaded with the weights
    return model


# ---------------------------------------------------------------- the teacher, and the export


def import_text_teacher(pipeline: str, prompts_file: Path, timestep: int, out: Path, real_file: Path | None = None) -> Path:
    """teacher.safetensors (the pipeline's UNet as a TextDenoiser) and prompts.safetensors (the encoded prompts); with
    ``real_file``, real.safetensors too: the images' VAE latents, labelled by their captions' rows in the table (the
    captions join the prompts, so the generator is trained on them as well, as DMD2 does)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from disback.weights import save_weights

    prompts = read_prompts(prompts_file)
    real = read_captions(real_file) if real_file else []
    rows: dict[str, int] = {}  # each text's first row in the table (a dict: a data set may hold many images)
    for i, text in enumerate(prompts):
        rows.setdefault(text, i)
    for _, caption in real:  # new captions go after the prompts, whose rows stay as they are
        if caption not in rows:
            rows[caption] = len(prompts)
            prompts.append(caption)
    unet = _load(UNet2DConditionModel, pipeline, "unet")
    scheduler = _load(DDPMScheduler, pipeline, "scheduler")
    if not 0 <= timestep < len(scheduler.alphas_cumprod):
        raise DisbackError(f"text.timestep must be in [0, {len(scheduler.alphas_cumprod)}), got {timestep}")
    size = unet.config.sample_size
    xl = unet.config.addition_embed_type == "text_time"  # SDXL's UNet: pooled text and size/crop conditions
    resolution = size * vae_scale_factor(pipeline)
    table = encode_prompts(pipeline, prompts, resolution, xl)  # time ids: the image size
    _save_tensors(table, Path(out) / PROMPTS)
    if real:
        latents = encode_images(pipeline, [image for image, _ in real], resolution)
        _save_tensors({"latents": latents, "labels": torch.tensor([rows[c] for _, c in real])}, Path(out) / REAL)
    prediction = scheduler.config.get("prediction_type", "epsilon")
    model = TextDenoiser(unet, scheduler.alphas_cumprod, prediction, Prompts(table["embeds"], table.get("pooled"), table.get("time_ids")))
    config = {k: v for k, v in json.loads(unet.to_json_string()).items() if not k.startswith("_")}
    meta = {"kind": "denoiser", "precond": "vp-text", "unet_config": config, "num_timesteps": len(scheduler.alphas_cumprod),
            "prediction_type": prediction, "source": str(pipeline), "num_classes": len(prompts), "prompts": PROMPTS,
            "prompts_path": str((Path(out) / PROMPTS).resolve()),
            "timestep": timestep, "shape": [unet.config.in_channels, size, size], "normaliser": {"mean": 0.0, "scale": 1.0},
            "edm": None, "data": str(prompts_file), "real": REAL if real else None}
    path = Path(out) / "teacher.safetensors"
    save_weights(model, path, meta)
    return path


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    from disback.weights import atomic_write

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


def export_text(generator_file: Path, out: Path) -> Path:
    """A folder that diffusers loads as the teacher's own pipeline class (StableDiffusionPipeline or
    StableDiffusionXLPipeline) with the distilled UNet and an LCMScheduler, sampled as the original DisBack README does:
    ``pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[399])``."""
    import shutil
    import tempfile

    from diffusers import DiffusionPipeline, LCMScheduler

    from disback.models import load_model
    from disback.weights import read_metadata

    meta = read_metadata(generator_file)
    if meta.get("kind") != "generator" or meta.get("precond") != "vp-text":
        raise DisbackError(f"{generator_file} is not a text-to-image generator (export it with `disback export` instead)")
    generator, _ = load_model(generator_file)
    try:
        pipe = DiffusionPipeline.from_pretrained(meta["source"], unet=generator.denoiser.unet)
    except (OSError, ValueError) as exc:
        raise DisbackError(f"cannot load the teacher's pipeline '{meta['source']}' to export into: {str(exc).splitlines()[0]}") from None
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp)
        (tmp / "DISBACK.md").write_text(
            f"One-step generator distilled by disback from {meta['source']}.\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained('{out}')\n"
            f"image = pipe(prompt, num_inference_steps=1, guidance_scale=0, timesteps=[{meta['timestep']}]).images[0]\n```\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- the job


def latent_data(meta: dict[str, Any], folder: Path):
    """The engine's Data for a text-to-image teacher in ``folder``: latents of the UNet's shape, in the UNet's own
    units, no measure; the real images' latents and caption rows as training data when the teacher has them."""
    import numpy as np

    from disback.data import Data

    empty = np.zeros((1, *meta["shape"]), dtype=np.float32)
    if not meta.get("real"):
        return Data(name=Path(meta["data"]).name, kind="latents", train=empty, reference=empty, mean=0.0, scale=1.0)
    from safetensors.torch import load_file

    real = load_file(str(Path(folder) / meta["real"]))
    return Data(name=Path(meta["data"]).name, kind="latents", train=real["latents"].numpy(), reference=empty, mean=0.0,
                scale=1.0, labels=real["labels"].numpy())


def run_text(cfg, pipeline: str, prompts_file: Path, out: Path, show_progress: bool = True, resume: bool = False,
             backtrack: bool = True, real_file: Path | None = None) -> Path:
    """Import the teacher and encode the prompts (and the real images, if given), record the degradation path (unless
    ``backtrack`` is False: the baseline), distill over it, and export the pipeline; each part in its own folder
    under ``out``."""
    from disback import stages
    from disback.distributed import is_writer, wait
    from disback.runfolder import begin_stage
    from disback.tasks import METHODS

    if METHODS[cfg.distill.method].gan and real_file is None:
        raise DisbackError(f"method {cfg.distill.method} needs real images for its GAN term: give --real captions.jsonl "
                           "(lines {\"image\": ..., \"prompt\": ...}), or use --method dmd, vsd or sid")
    out = Path(out)
    real = [(str(image), caption) for image, caption in read_captions(real_file)] if real_file else []
    begin_stage(cfg, out / "teacher", resume, {"pipeline": str(pipeline), "prompts": read_prompts(prompts_file), "real": real})
    teacher_file = out / "teacher" / "teacher.safetensors"
    if is_writer() and not (resume and teacher_file.is_file()):  # one process encodes; the others read its files
        import_text_teacher(pipeline, prompts_file, cfg.text.timestep, out / "teacher", real_file)
    wait()
    _, meta = stages.load_teacher(teacher_file)
    path = stages.record_path(cfg, teacher_file, out / "path", show_progress, resume) if backtrack else None
    run = out / ("disback" if backtrack else "baseline")
    stages.distill(cfg, latent_data(meta, teacher_file.parent), teacher_file, path, run, show_progress, resume)
    if is_writer():
        export_text(run / "generator.safetensors", out / "pipeline")
    wait()
    return out / "pipeline"

