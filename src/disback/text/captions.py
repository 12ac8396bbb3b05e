"""Real images with captions for DMD2's GAN term: read from a JSON-lines file and encoded once by the pipeline's VAE."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from disback.errors import DisbackError
from disback.text.prompts import load_component

REAL = "real.safetensors"


def read_captions(path: Path) -> list[tuple[Path, str]]:
    """JSON lines with an "image" (a path, relative to the file or absolute) and a "prompt" (or "text") field."""
    path = Path(path)
    if not path.is_file():
        raise DisbackError(
            f'real images file {path} does not exist; give a .jsonl file of {{"image": ..., "prompt": ...}} lines'
        )
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = Path(path.parent, row["image"]), str(row["prompt"] if "prompt" in row else row["text"])
        except (ValueError, KeyError, TypeError):
            raise DisbackError(
                f'{path} line {i}: expected a JSON object with "image" and "prompt" fields, got {line[:80]!r}'
            ) from None
        if not image.is_file():
            raise DisbackError(
                f"{path} line {i}: image {image} does not exist (relative paths are read from {path.parent})"
            )
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

    vae = load_component(AutoencoderKL, pipeline, "vae")
    latents = []
    for i in range(0, len(images), batch):
        x = torch.stack([_image(p, resolution) for p in images[i : i + batch]]).to(vae.dtype)  # fp64 under fp64
        shift = vae.config.get("shift_factor") or 0.0  # SD3's and FLUX's VAEs; none for SD1.5 / SDXL
        latents.append((vae.encode(x).latent_dist.mean - shift) * vae.config.scaling_factor)
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
