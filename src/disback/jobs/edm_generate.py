"""Sample a one-step (or k-step) generator exported by disback from an EDM / EDM2 teacher.

This file is self-contained (torch, numpy, safetensors; Pillow to write PNGs): `disback export` copies it into the
exported folder as generate.py, beside the network code (``edm_networks/``), so the folder samples without disback:

    python generate.py --n 64 --out samples.png            # a grid (or samples.npz: uint8 N x C x H x W)
    python generate.py --n 50000 --batch 500 --out images/   # one PNG per image, for FID tools

or from Python:

    from generate import load, generate
    net, config = load("path/to/folder")
    images = generate(net, config, n=16, seed=0)           # uint8 N x C x H x W

The generator is x0 = D(sigma_g z; sigma_g, class) with D the network under its preconditioner (EDM's convention:
images in [-1, 1]). A k-step generator (DMD2's few-step students; ``sigma_g`` a descending list in config.json)
denoises, re-noises with fresh unit noise at the next level, and so on; its sample is the last step's estimate:

    x = sigma_0 z;  x0_j = D(x; sigma_j, class);  x = x0_j + sigma_{j+1} n_j

``model.safetensors`` and ``pytorch_model.bin`` hold its weights under EDM's own key names, so tools of the EDM
ecosystem load them into their own networks (``EDMPrecond(**config["kwargs"])``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def load(folder: str | Path = HERE, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The generator's network with its weights, and the folder's config.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    sys.path.insert(0, str(folder))
    from edm_networks.preconditioners import build_precond

    config = json.loads((folder / "config.json").read_text())
    net = build_precond(config["precond"], dict(config["kwargs"]))
    net.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return net.eval().requires_grad_(False).to(device), config


@torch.no_grad()
def generate(
    net: torch.nn.Module, config: dict, n: int, seed: int = 0, labels: torch.Tensor | None = None, batch: int = 256
) -> np.ndarray:
    """``n`` images as uint8 N x C x H x W, from noise seeded with ``seed``; class-conditional generators draw the
    classes in turn (0, 1, ..., K-1, 0, ...) unless ``labels`` (class indices) are given.

    The noise is drawn at once as ``torch.randn(n, steps, *shape)`` from a generator seeded with ``seed``: image i's
    starting noise z, then its fresh noise n_1, n_2, ... of each later step (for one step, ``torch.randn(n, *shape)``
    gives the same numbers, as before k steps). They are the draws of ``disback sample --seed`` on the generator file,
    so that both give the same images."""
    device = next(net.parameters()).device
    sigmas = noise_levels(config)
    noise = torch.randn(n, len(sigmas), *config["shape"], generator=torch.Generator().manual_seed(seed))
    classes = config["num_classes"]
    if classes and labels is None:
        labels = torch.arange(n) % classes
    out = []
    for i in range(0, n, batch):
        y = None if not classes else torch.nn.functional.one_hot(labels[i : i + batch], classes).float().to(device)
        x = rollout(net, noise[i : i + batch].to(device), sigmas, y)
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out).numpy()


def noise_levels(config: dict) -> list[float]:
    """The generator's noise levels: config.json's ``sigma_g`` is one number (one step) or a descending list."""
    sigma_g = config["sigma_g"]
    return [float(s) for s in sigma_g] if isinstance(sigma_g, list) else [float(sigma_g)]


def rollout(net: torch.nn.Module, noise: torch.Tensor, sigmas: list[float], y: torch.Tensor | None) -> torch.Tensor:
    """The last step's estimate from ``noise`` (N x steps x C x H x W: the start, then each step's fresh noise)."""
    x = noise[:, 0] * sigmas[0]
    for j, sigma in enumerate(sigmas):
        x0 = net(x, torch.full((len(x),), sigma, device=x.device), y)
        if j + 1 < len(sigmas):  # no noise after the last step: its estimate is the sample
            x = x0 + sigmas[j + 1] * noise[:, j + 1]
    return x0


def save(images: np.ndarray, out: Path) -> None:
    """A folder of PNGs, one grid PNG, or an .npz of the uint8 array."""
    from PIL import Image

    pictures = [Image.fromarray(im.transpose(1, 2, 0).squeeze()) for im in images]
    if out.suffix == ".npz":
        np.savez(out, images=images)
    elif out.suffix == ".png":
        side = int(np.ceil(np.sqrt(len(images))))
        height, width = images.shape[2:]
        grid = Image.new(pictures[0].mode, (side * width, side * height))
        for i, picture in enumerate(pictures):
            grid.paste(picture, ((i % side) * width, (i // side) * height))
        grid.save(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            picture.save(out / f"{i:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description="sample the exported generator")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="a .png grid, an .npz, or a folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    net, config = load(HERE, args.device)
    save(generate(net, config, args.n, args.seed, batch=args.batch), args.out)
    print(f"{args.n} images: {args.out}")


if __name__ == "__main__":
    main()
