"""Seconds per distillation iteration, images per second and peak memory, at real network sizes, randomly initialised.

    python benchmarks/gpu_step.py --model adm64 sd15 --out runs/gpu_step.jsonl     # on a GPU
    python benchmarks/gpu_step.py --model tiny tiny-text --out runs/gpu_step.jsonl # anywhere, to check it works
    python benchmarks/gpu_step.py --switch-only --out runs/switch.jsonl           # a target switch only (a CPU is enough)

One iteration is disback's own `Distillation.train_step` (the code every run uses): `ratio` fake-score updates and one
generator update, three networks (generator, fake score, frozen target). Models:

adm64      the ADM ImageNet-64 UNet as diffusers' UNet2DModel (192/384/576/768 channels, 3 layers per block,
           attention at 32/16/8, 1000 classes; about 296M parameters in this form), batch 40
sd15       Stable Diffusion 1.5's UNet2DConditionModel (860M) on 64x64x4 latents with 77x768 text embeddings, batch 8
tiny, tiny-text   small versions of both, for a CPU

Each configuration (precision, channels-last, ratio) reports seconds per iteration, images per second (generator
samples per second) and peak GPU memory; the DisBack overhead is the time the loop waits at a target switch (the node
was read ahead in the background; node_read_s is that read) measured directly, over the time between switches. Results are appended as JSON lines to --out as they
come, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from disback import stages
from disback.config import DistillConfig, EDMConfig
from disback.denoiser import EDMDenoiser
from disback.generator import OneStepGenerator
from disback.networks.unet import NOISE_SCALE, UNetBackbone
from disback.path import DegradationPath, FixedSchedule, NodeReader
from disback.tasks import Distillation

EDM = EDMConfig(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, p_mean=-1.2, p_std=1.2)


class TextBackbone(nn.Module):
    """A UNet2DConditionModel as an EDM backbone, with fixed random text embeddings (this benchmark needs no prompts)."""

    def __init__(self, unet: nn.Module, batch: int, tokens: int, width: int):
        super().__init__()
        self.unet = unet
        self.register_buffer("context", torch.randn(batch, tokens, width), persistent=False)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, c_noise * NOISE_SCALE, encoder_hidden_states=self.context[: len(x)].to(x.dtype)).sample


def build(model: str, batch: int) -> tuple[nn.Module, tuple[int, ...], int]:
    """(denoiser, sample shape, number of classes)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if model in ("adm64", "tiny"):
        big = model == "adm64"
        unet = UNet2DModel(
            sample_size=64 if big else 16, in_channels=3, out_channels=3,
            block_out_channels=(192, 384, 576, 768) if big else (32, 64), layers_per_block=3 if big else 1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D") if big else ("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D") if big else ("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=64 if big else 8, norm_num_groups=32 if big else 8, num_class_embeds=1000 if big else 10,
        )
        return EDMDenoiser(UNetBackbone(unet), EDM.sigma_data), (3, 64 if big else 16, 64 if big else 16), 1000 if big else 10
    big = model == "sd15"
    unet = UNet2DConditionModel(
        sample_size=64 if big else 16, in_channels=4, out_channels=4,
        block_out_channels=(320, 640, 1280, 1280) if big else (32, 64), layers_per_block=2 if big else 1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",) if big else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3 if big else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768 if big else 32, attention_head_dim=8, norm_num_groups=32 if big else 8,
    )
    return EDMDenoiser(TextBackbone(unet, batch, 77, 768 if big else 32), EDM.sigma_data), (4, 64 if big else 16, 64 if big else 16), 0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def switch_cost(task: Distillation, index: int) -> tuple[float, float]:
    """A target switch as the run makes it: the node was read ahead in the background (disback.path.NodeReader) while
    the generator trained, so the loop waits only for the copy into the target. Returns (seconds the loop waits,
    seconds the background read took)."""
    t = time.perf_counter()
    task.nodes.prefetch(index)
    task.nodes.ahead[1].result()
    read_s = time.perf_counter() - t
    sync()
    t = time.perf_counter()
    task.nodes.load(index, task.target)
    sync()
    return time.perf_counter() - t, read_s


def measure_switch(model: str, folder: Path, repeats: int = 3) -> dict:
    """--switch-only: a target switch at full size without training (fits a CPU machine): reading the node directly at
    the switch (as the loop did before NodeReader) against reading it ahead and only copying it in at the switch."""
    teacher, _, _ = build(model, 1)
    path = DegradationPath.create(folder / f"switch-{model}", {}, replace=True)
    path.add_node(teacher, 0, {})
    path.add_node(teacher, 1, {})
    target = copy.deepcopy(teacher).to(stages.accelerator().device)
    direct, waited, read = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        path.load_node(1, target)
        sync()
        direct.append(time.perf_counter() - t)
        reader = NodeReader(path)
        t = time.perf_counter()
        reader.prefetch(1)
        reader.ahead[1].result()
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        reader.load(1, target)
        sync()
        waited.append(time.perf_counter() - t)
    return {"model": model, "params_M": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1),
            "node_MB": round((path.root / path.nodes[1].file).stat().st_size / 1e6), "switch_direct_s": round(min(direct), 3),
            "switch_prefetched_s": round(min(waited), 3), "node_read_s": round(min(read), 3), "repeats": repeats,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def measure(model: str, batch: int, ratios: list[int], layouts: list[bool], steps: int, warmup: int, folder: Path):
    """Yield one result per (ratio, channels-last) configuration of ``model``."""
    acc = stages.accelerator("bf16" if torch.cuda.is_available() else "fp32")
    device = acc.device
    with torch.device(device):
        teacher, shape, classes = build(model, batch)
    params = sum(p.numel() for p in teacher.parameters())
    path = DegradationPath.create(folder / f"path-{model}", {}, replace=True)
    path.add_node(teacher, 0, {})
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1.001)
    path.add_node(teacher, 1, {})  # a second node, so that a switch really loads different weights
    for ratio in ratios:
        for channels_last in layouts:
            generator = OneStepGenerator(copy.deepcopy(teacher), 2.5)
            fake, target = copy.deepcopy(teacher), copy.deepcopy(teacher)
            for module in (generator, fake, target):
                if channels_last:
                    module.to(memory_format=torch.channels_last)
            cfg = DistillConfig(steps=steps, batch=batch, lr_generator=1e-5, lr_fake=1e-5, fake_updates=ratio, sigma_g=2.5,
                                switch_every=10**9, sigma_min=0.002, sigma_max=80.0)
            task = Distillation(generator, fake, target, path, FixedSchedule(len(path), 10**9), cfg=cfg, edm=EDM,
                                shape=shape, accelerator=acc, stage="benchmark", num_classes=classes)
            for _ in range(warmup):
                task.train_step()
            sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(steps):
                task.train_step()
            sync()
            seconds = (time.perf_counter() - start) / steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            switch_s, read_s = switch_cost(task, 1)
            yield {"model": model, "params_M": round(params / 1e6, 1), "batch": batch, "ratio": f"{ratio}:1",
                   "precision": acc.mixed_precision, "channels_last": channels_last, "s_per_iter": round(seconds, 4),
                   "s_per_update": round(seconds / (ratio + 1), 4), "images_per_s": round(batch / seconds, 1), "peak_GiB": None if peak is None else round(peak, 2),
                   "switch_s": round(switch_s, 3), "node_read_s": round(read_s, 3),
                   "overhead_switch_every_100": round(switch_s / (100 * seconds), 4),
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
            del task, generator, fake, target
            acc.free_memory()  # Accelerate keeps references to every prepared model and optimiser
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["adm64", "sd15"], choices=["adm64", "sd15", "tiny", "tiny-text"])
    parser.add_argument("--ratio", nargs="+", type=int, default=[1, 5], help="fake-score updates per generator update")
    parser.add_argument("--channels-last", nargs="+", type=int, default=[0, 1], help="0 and/or 1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="runs/gpu_step.jsonl")
    parser.add_argument("--switch-only", action="store_true", help="only the cost of a target switch, no training")
    args = parser.parse_args()
    batches = {"adm64": 40, "sd15": 8, "tiny": 8, "tiny-text": 4}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            layouts = [bool(c) for c in args.channels_last]
            results = ([measure_switch(model, Path(tmp))] if args.switch_only else
                       measure(model, batches[model], args.ratio, layouts, args.steps, args.warmup, Path(tmp)))
            for result in results:
                with open(out, "a") as fh:
                    fh.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
