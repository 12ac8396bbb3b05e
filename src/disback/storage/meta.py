"""A model file's description: one ``ModelMeta`` in the safetensors header (JSON under the key "disback"), read and
written here only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disback.errors import DisbackError
from disback.storage.weights import read_metadata

FORMAT = 2  # the header's layout; a file of another format is refused with what to do


@dataclass
class ModelMeta:
    role: str  # "denoiser" (a teacher, a path node, a fake score) or "generator" (one step)
    kind: str  # how the network is rebuilt: a registered model kind (disback.storage.kinds), e.g. "edm", "vp", "text"
    shape: list[int]  # one sample: [D] for points, [C, H, W] for images and latents
    normaliser: dict[str, Any]  # model units -> data units: x * scale + mean
    spec: dict[str, Any] = field(default_factory=dict)  # what the kind needs to rebuild the network (its config)
    data: str = ""  # the data set, file or prompts the model was made for
    num_classes: int = 0  # > 0: class-conditional (for text, the prompt table's rows)
    edm: dict[str, Any] | None = None  # the EDM settings a denoiser is sampled with (Karras schedule); None for text
    sigma_g: float | list[float] | None = None  # generators: the noise level of their one denoiser call, or the
    #                                             descending levels of a k-step generator (text: spec["timestep"])
    source: str = ""  # a pretrained model's folder or hub id
    node: int | None = None  # path nodes: the node's index and the stage-1 step it was saved at
    step: int | None = None
    adapter_rank: int = 0  # > 0: the file holds only LoRA adapters of this rank (on its teacher), not a whole network
    origin: dict[str, Any] | None = None  # a network imported to start from: its source, format, weights' sha256

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_header(cls, header: dict[str, Any], where: Path) -> "ModelMeta":
        if "role" not in header and "kind" not in header:
            raise DisbackError(f"{where} was not written by disback (no model description in its header)")
        if header.get("format") != FORMAT:
            raise DisbackError(
                f"{where} is a model file of format {header.get('format', 1)}; this disback reads format "
                f"{FORMAT}: run the stage that wrote it again"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in header.items() if k in names})

    def as_generator(self, sigma_g: float | list[float] | None) -> "ModelMeta":
        """This denoiser's description for the generator made from it (one level: a number, as files always had)."""
        if isinstance(sigma_g, (list, tuple)):
            sigma_g = float(sigma_g[0]) if len(sigma_g) == 1 else [float(s) for s in sigma_g]
        return dataclasses.replace(self, role="generator", sigma_g=sigma_g, node=None, step=None)

    def as_node(self, index: int, step: int) -> "ModelMeta":
        return dataclasses.replace(self, node=index, step=step)

    def as_adapters(self, rank: int) -> "ModelMeta":
        """The description of LoRA adapters (rank > 0) on the network this describes, or of the network (rank 0)."""
        return dataclasses.replace(self, adapter_rank=rank)

    @property
    def is_images(self) -> bool:
        return len(self.shape) == 3


def read_meta(path: Path) -> ModelMeta:
    """The description in a model file's header (its tensors are not read)."""
    return ModelMeta.from_header(read_metadata(path), Path(path))
