"""The CLIP score of text-to-image papers: 100 x the mean cosine similarity between CLIP's embeddings of each image and
of its prompt. The model comes through transformers (a local folder or a hub id, e.g. openai/clip-vit-base-patch32),
or through open_clip where it is installed (``open_clip:ViT-g-14/laion2b_s12b_b42k``, the model SDXL-Turbo and DMD2
report with)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from disback.errors import DisbackError
from disback.storage.files import sha256_file

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class ClipScore:
    """``score(images, prompts)``: images N x 3 x H x W in [0, 1], one prompt each."""

    def __init__(self, spec: str, device: torch.device | str | None = None):
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if spec.startswith("open_clip:"):
            self._open_clip(spec.split(":", 1)[1])
        else:
            self._transformers(spec)
        self.model.eval().requires_grad_(False)

    def _transformers(self, spec: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(spec).to(self.device)
            self.processor = CLIPProcessor.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            raise DisbackError(
                f"cannot load a CLIP model and processor from '{spec}' ({str(exc).splitlines()[0]}); give a "
                "folder saved with CLIPModel/CLIPProcessor.save_pretrained or a hub id"
            ) from None
        self.kind = "transformers"

    def _open_clip(self, name: str) -> None:
        try:
            import open_clip
        except ImportError:
            raise DisbackError(
                "open_clip models need the open_clip_torch package: pip install open_clip_torch"
            ) from None
        arch, _, pretrained = name.partition("/")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        except (RuntimeError, ValueError, OSError) as exc:
            raise DisbackError(f"cannot load the open_clip model '{name}' ({exc})") from None
        self.model, self.tokenizer, self.kind = self.model.to(self.device), open_clip.get_tokenizer(arch), "open_clip"

    @property
    def info(self) -> dict[str, Any]:
        folder = Path(self.spec)
        weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None) if folder.is_dir() else None
        return {"model": self.spec, "library": self.kind, "sha256": sha256_file(weights) if weights else None}

    @torch.no_grad()
    def similarities(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The cosine similarity of each image with its prompt."""
        if len(prompts) != len(images):
            raise ValueError("one prompt per image")
        from PIL import Image

        pil = [Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()) for x in images]
        if self.kind == "open_clip":
            pixels = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
            image = self.model.encode_image(pixels)
            text = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        else:
            batch = self.processor(text=prompts, images=pil, return_tensors="pt", padding=True, truncation=True)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            image = self.model.get_image_features(pixel_values=batch["pixel_values"])
            text = self.model.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
            )
        return F.cosine_similarity(_tensor(image).float(), _tensor(text).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> float:
        """100 x the mean cosine similarity, as the papers report it."""
        return 100.0 * float(self.similarities(images, prompts).mean())


def _tensor(out: Any) -> torch.Tensor:
    """Embeddings from a model call (recent transformers return an output object; older ones a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise TypeError(f"no embeddings in a {type(out).__name__}")
