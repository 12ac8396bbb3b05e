"""The text-to-image plugin: a Stable Diffusion 1.5 / SDXL pipeline's UNet, or an SD3 / SD3.5 / FLUX.1 pipeline's
transformer, distilled to one step (or a few) on the same engine. A family (families.py) is a small description of
what differs between them; everything else is one code path.

Prompts are encoded once into a table (prompts.py) and are then class labels to the engine: drawn per batch, split
across processes, balanced at evaluation, checkpointed. Importing this package registers the model kind "text" with
disback.storage.kinds; the core never imports it (the entry point ``disback.model_kinds`` lets a
text model file load anywhere).
"""

from disback.storage.kinds import ModelKind, register_kind
from disback.text.captions import encode_images, read_captions
from disback.text.families import FAMILIES, Family, family_of
from disback.text.job import check_text_starts, run_text
from disback.text.networks import FlowTextDenoiser, LCMGenerator, TextDenoiser, generator, guide, rebuild
from disback.text.pipeline import call_of, export_text, import_text_teacher, sample_command, steps_name
from disback.text.prompts import Prompts, read_prompts

register_kind(
    "text",
    ModelKind(
        rebuild=rebuild,
        generator=generator,
        target=lambda target, cfg: guide(target, cfg.text.guidance),  # classifier-free guidance on the target only
        sampled_by=lambda meta: (
            f"sample its {steps_name(meta.spec['timestep'])} pipeline (`disback text` wrote one beside the run, or "
            "`disback export RUN --out PIPE` writes one): " + sample_command("PIPE", call_of(meta.spec))
        ),
        export=export_text,
    ),
)

__all__ = [
    "FAMILIES",
    "Family",
    "FlowTextDenoiser",
    "LCMGenerator",
    "call_of",
    "family_of",
    "check_text_starts",
    "Prompts",
    "TextDenoiser",
    "encode_images",
    "export_text",
    "import_text_teacher",
    "read_captions",
    "read_prompts",
    "run_text",
]
