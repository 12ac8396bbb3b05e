"""The text-to-image families disback distils, each a small description of what differs: the pipeline class and its
denoising network, whether the network is a rectified flow, how guidance enters, and the preset that fits. What they
share (the prompt table, the stages, the export's shape) is one code path.

    family        pipeline                      network                  guidance
    sd15          StableDiffusionPipeline       UNet2DConditionModel     classifier-free, on the target
    sdxl          StableDiffusionXLPipeline     UNet2DConditionModel     classifier-free, on the target
    sd3           StableDiffusion3Pipeline      SD3Transformer2DModel    classifier-free, on the target
    flux-dev      FluxPipeline (guidance_embeds) FluxTransformer2DModel  embedded: a number every network is given
    flux-schnell  FluxPipeline                  FluxTransformer2DModel   none

The family is read from the pipeline's ``model_index.json`` (and, for FLUX.1, its transformer's
``guidance_embeds``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from disback.errors import DisbackError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # the diffusers pipeline class
    network: str  # the pipeline's component (subfolder) that denoises
    network_class: str
    flow: bool  # a rectified-flow transformer (velocity), or a UNet on a discrete VP schedule
    guidance: str  # "cfg" (classifier-free, on the target score), "embedded" (every network's input), "none"
    preset: str  # the preset made for it
    max_sequence_length: int = 0  # T5 tokens of its prompts (flow families), as its pipeline's default

    @property
    def packed(self) -> bool:
        """FLUX.1 sees its latents as 2 x 2 patches packed into tokens."""
        return self.name.startswith("flux")

    @property
    def time_scale(self) -> float:
        """What the network's ``timestep`` is in flow time t: SD3's transformer takes 1000 t (its pipeline passes
        the scheduler's timesteps), FLUX.1's takes t (and multiplies by 1000 itself)."""
        return 1.0 if self.packed else 1000.0

    def network_type(self) -> type:
        """The diffusers class of the denoising network."""
        import diffusers

        return getattr(diffusers, self.network_class)


FAMILIES = {
    f.name: f
    for f in (
        Family("sd15", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", False, "cfg", "sd"),
        Family("sdxl", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", False, "cfg", "sd"),
        Family("sd3", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", True, "cfg", "sd3", 256),
        Family("flux-dev", "FluxPipeline", "transformer", "FluxTransformer2DModel", True, "embedded", "flux-dev", 512),
        Family(
            "flux-schnell", "FluxPipeline", "transformer", "FluxTransformer2DModel", True, "none", "flux-schnell", 256
        ),
    )
}


def family_of(pipeline: str) -> Family:
    """The family of a pipeline folder or hub id, from its model_index.json; one clear line for any other."""
    index = _config(pipeline, "model_index.json")
    name = index.get("_class_name", "")
    if name == "FluxPipeline":
        dev = bool(_config(pipeline, "transformer/config.json").get("guidance_embeds", False))
        return FAMILIES["flux-dev" if dev else "flux-schnell"]
    for family in FAMILIES.values():
        if family.pipeline == name:
            return family
    known = ", ".join(sorted({f.pipeline for f in FAMILIES.values()}))
    raise DisbackError(
        f"'{pipeline}' is a {name or 'pipeline without a _class_name'}, a family disback does not distil; "
        f"give one of: {known}"
    )


def _config(pipeline: str, name: str) -> dict:
    """A JSON file of a local pipeline folder, or of a hub id (through huggingface_hub's cache)."""
    local = Path(pipeline) / name
    if Path(pipeline).exists() and not local.is_file():
        raise DisbackError(f"{pipeline} is not a diffusers pipeline folder (it has no {name}); give one, or a hub id")
    try:
        if local.is_file():
            return json.loads(local.read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(pipeline, name)).read_text())
    except Exception as exc:  # missing file, no network, bad JSON: one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DisbackError(
            f"cannot read {name} of '{pipeline}' ({first}); give a diffusers pipeline folder or hub id"
        ) from None


def flow_shift(scheduler: dict, tokens: int) -> float:
    """The time shift s with which a flow teacher samples (t' = s t / (1 + (s - 1) t)) at ``tokens`` image tokens:
    the scheduler's static ``shift``, or with ``use_dynamic_shifting`` exp(mu), mu linear in the token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as FluxPipeline computes it."""
    if not scheduler.get("use_dynamic_shifting", False):
        return float(scheduler.get("shift", 1.0))
    lo, hi = scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 4096)
    base, top = scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15)
    mu = base + (top - base) / (hi - lo) * (tokens - lo)
    if scheduler.get("time_shift_type", "exponential") == "linear":
        return float(mu)
    return float(math.exp(mu))


def check_guidance(family: Family, guidance: float) -> None:
    """FLUX.1-schnell was distilled without guidance, and takes none."""
    if family.guidance == "none" and guidance not in (0.0, 1.0):
        raise DisbackError(
            f"{family.name} takes no guidance (it was distilled to sample without it), and text.guidance is "
            f"{guidance}; set --set text.guidance=0 (the {family.preset} preset does)"
        )
