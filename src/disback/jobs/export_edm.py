"""`disback export` for a generator of an EDM / EDM2 teacher: a folder that samples without disback installed.

config.json           the preconditioner's class and constructor arguments, sigma_g (a number, or a k-step generator's
                      descending list of levels), shape, classes
model.safetensors     the generator's weights under EDM's own key names (``model.*``; EDM2: ``unet.*``)
pytorch_model.bin     the same state dict as torch.save writes it (DMD2 publishes its ImageNet generator so)
edm_networks/         disback's own implementation of the networks and preconditioners (torch only)
generate.py           load() and generate(), and a command line: python generate.py --n 64 --out grid.png
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from disback.errors import DisbackError
from disback.storage.files import write_folder
from disback.storage.models import load_model

SOURCES = {  # the files the folder carries, as modules of the package edm_networks
    "edm.py": "disback/diffusion/networks/edm.py",
    "edm2.py": "disback/diffusion/networks/edm2.py",
    "preconditioners.py": "disback/diffusion/preconditioners.py",
}


def export_edm(generator_file: Path, out: Path) -> Path:
    model, meta = load_model(generator_file)
    if meta.kind != "nvlabs":
        raise DisbackError(f"{generator_file} is not a generator of an EDM teacher")
    precond = model.denoiser
    state = {k: v.detach().contiguous().cpu() for k, v in precond.state_dict().items()}
    config = {
        "precond": meta.spec["precond"],
        "kwargs": {**meta.spec["kwargs"], "use_fp16": False},  # as it was trained (bf16 or fp32 autocast)
        "family": meta.spec["family"],
        "sigma_g": meta.sigma_g,  # one level, or the list a k-step generator's rollout runs through
        "shape": list(meta.shape),
        "num_classes": meta.num_classes,
        "source": meta.source,
        "exported_by": "disback",
    }

    def fill(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        package = folder / "edm_networks"
        package.mkdir()
        (package / "__init__.py").write_text(
            '"""EDM / EDM2 networks, copied from disback for sampling without it."""\n'
        )
        root = Path(__file__).resolve().parents[2]  # src/
        for name, source in SOURCES.items():
            (package / name).write_text(local_imports((root / source).read_text()))
        shutil.copy(Path(__file__).with_name("edm_generate.py"), folder / "generate.py")

    return write_folder(Path(out), fill)


def local_imports(text: str) -> str:
    """disback's imports among these three modules made relative to the copied package."""
    text = re.sub(r"\bdisback\.diffusion\.networks\.(edm2?|\w+)\b", r"edm_networks.\1", text)
    text = re.sub(r"\bdisback\.diffusion\.preconditioners\b", "edm_networks.preconditioners", text)
    if re.search(r"^\s*(from|import)\s+disback\b", text, re.MULTILINE):
        raise DisbackError("an EDM network module imports more of disback than the export carries")
    return text
