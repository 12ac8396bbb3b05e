"""Prompts: read from a file, encoded once with the pipeline's text encoder(s) into a table (``prompts.safetensors``),
after which a prompt is an index into the table. The table's last row is classifier-free guidance's unconditional
input: the empty prompt for SD1.5 and SD3, zeros for SDXL (as their pipelines do); FLUX.1, which has no
classifier-free guidance, keeps the empty prompt's row too, unused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from disback.errors import DisbackError

PROMPTS = "prompts.safetensors"


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
                raise DisbackError(
                    f'{path} line {i}: expected a JSON object with a "prompt" field, got {line[:80]!r}'
                ) from None
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

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings and pooled embeddings of prompts ``index``; the table moves to their device once (it is
        shared)."""
        if self.embeds.device != index.device:
            self.to(index.device)
        return self.embeds[index].to(dtype), None if self.pooled is None else self.pooled[index].to(dtype)

    def conditions(self, index: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        """The UNet's keyword arguments for prompts ``index``."""
        embeds, pooled = self.rows(index, dtype)
        out: dict[str, Any] = {"encoder_hidden_states": embeds}
        if pooled is not None:  # SDXL's added conditions
            out["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": self.time_ids.to(dtype).expand(len(index), -1),
            }
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

    tokenizer = load_component(CLIPTokenizer, pipeline, "tokenizer")
    encoder = load_component(CLIPTextModel, pipeline, "text_encoder")
    texts = prompts + [""]
    if not xl:
        return {"embeds": _encode(tokenizer, encoder, texts)[0]}
    tokenizer_2 = load_component(CLIPTokenizer, pipeline, "tokenizer_2")
    encoder_2 = load_component(CLIPTextModelWithProjection, pipeline, "text_encoder_2")
    first = _encode(tokenizer, encoder, texts, penultimate=True)[0]
    second, pooled = _encode(tokenizer_2, encoder_2, texts, penultimate=True)
    embeds = torch.cat([first, second], dim=-1)
    embeds[-1], pooled[-1] = (
        0,
        0,
    )  # SDXL pipelines give zeros for an empty negative prompt (force_zeros_for_empty_prompt)
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return {"embeds": embeds, "pooled": pooled, "time_ids": time_ids}


@torch.no_grad()
def encode_flow_prompts(pipeline: str, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The table's tensors for SD3 or FLUX.1, from the pipeline's own ``encode_prompt`` (SD3: both CLIPs' penultimate
    states and T5's, side by side and in sequence, and both pooled outputs; FLUX.1: T5's states and CLIP's pooled
    output), the empty prompt last. Only the text encoders are loaded, on a GPU when there is one, and freed after."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(pipeline, transformer=None, vae=None)
    except (OSError, ValueError) as exc:
        raise DisbackError(
            f"cannot load the text encoders of '{pipeline}': {str(exc).splitlines()[0]}; give an SD3 or FLUX.1 "
            "pipeline folder or hub id"
        ) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    embeds, pooled = [], []
    for start in range(0, len(prompts) + 1, 64):  # a chunk at a time: T5's states of many prompts are large
        texts = (prompts + [""])[start : start + 64]
        if hasattr(pipe, "text_encoder_3"):  # SD3
            out = pipe.encode_prompt(
                texts,
                None,
                None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
            embed, pool = out[0], out[2]
        else:
            embed, pool, _ = pipe.encode_prompt(texts, None, device=device, max_sequence_length=max_sequence_length)
        embeds.append(embed.float().cpu())
        pooled.append(pool.float().cpu())
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}


def _encode(
    tokenizer, encoder, texts: list[str], penultimate: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)  # 77 for CLIP, as pipelines pad
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids, output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out[0]
    return hidden.float(), (out.text_embeds.float() if hasattr(out, "text_embeds") else None)


def load_component(cls, pipeline: str, subfolder: str):
    """``cls.from_pretrained`` (or ``load``, any loader taking a path and ``subfolder``) with one clear error."""
    load = cls.from_pretrained if isinstance(cls, type) else cls
    try:
        return load(pipeline, subfolder=subfolder)
    except (OSError, ValueError) as exc:
        name = getattr(cls, "__self__", cls).__name__  # a bound classmethod (e.g. load_config): its class
        raise DisbackError(
            f"cannot load {name} from '{pipeline}' (subfolder '{subfolder}'): "
            f"{str(exc).splitlines()[0]}; give a Stable Diffusion pipeline folder or hub id"
        ) from None
