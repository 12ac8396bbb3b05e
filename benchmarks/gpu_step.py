"""Seconds per distillation iteration, images per second and peak memory, at real network sizes, randomly initialised.

    python benchmarks/gpu_step.py --model adm64 sd15 --out runs/gpu_step.jsonl     # on a GPU
    python benchmarks/gpu_step.py --model tiny tiny-text --out runs/gpu_step.jsonl # anywhere, to check it works
    python benchmarks/gpu_step.py --switch-only --out runs/switch.jsonl           # a target switch only (a CPU is enough)
    python benchmarks/gpu_step.py --steps 0 --batch 2 --reference ...             # the work (FLOPs) of one iteration only
    python benchmarks/gpu_step.py --per-call --batch 1 --out runs/flops.jsonl     # the work of one denoiser call

One iteration is disback's own `Distillation.train_step` (the code every run uses): `ratio` fake-score updates and one
generator update, three networks (generator, fake score, frozen target). Models:

adm64      the ADM ImageNet-64 UNet as diffusers' UNet2DModel (192/384/576/768 channels, 3 layers per block,
           attention at 32/16/8, 1000 classes; about 266M parameters in this form), batch 40
sd15       Stable Diffusion 1.5's UNet2DConditionModel (860M) on 64x64x4 latents with 77x768 text embeddings, batch 8
sdxl       SDXL's UNet2DConditionModel (2.57B, benchmarks/configs/sdxl/unet.json) on 128x128x4 latents, batch 16
tiny, tiny-text   small versions of both, for a CPU

Each configuration (ratio, reused samples, torch.compile, channels-last, gradient checkpointing, LoRA rank) reports
seconds per iteration, images per second (generator samples per second), peak GPU memory and what was allocated when
it began (the teacher alone, if the configuration before it was released). The rows train over the baseline's
one-node path; DisBack's overhead, a target switch, is measured on its own (--switch-only: the time the loop waits at
a switch when the node was read ahead in the background, node_read_s being that read). ``--reference`` adds, per
ratio, the issue's reference: a plain eager loop in DMD2's order (bf16 autocast, the target in fp32, unfused AdamW, no
checks), written here and not disback's code, timed the same way on the same device. Every eager row also counts the
work of one iteration (torch's FlopCounterMode: matrix products, convolutions, attention; linear in the batch), and
with timings the TFLOP/s achieved. Results are appended as JSON lines to --out as they come, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from disback.config import DistillConfig, EDMConfig, RunConfig
from disback.diffusion.denoisers import EDMDenoiser
from disback.diffusion.generator import OneStepGenerator
from disback.diffusion.losses import dmd_generator_loss, dsm_loss, karras_sigma, lognormal_sigma
from disback.diffusion.networks.unet import NOISE_SCALE, UNetBackbone
from disback.method.distillation import Distillation
from disback.method.lora import fake_and_target, scratch
from disback.method.path import DegradationPath, NodeReader
from disback.method.schedules import FixedSchedule
from disback.stages.runtime import accelerator, speed_up
from disback.storage.meta import ModelMeta

EDM = EDMConfig(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, p_mean=-1.2, p_std=1.2)
# Node files of this benchmark are read back by it alone, into networks it builds: their description is nominal.
BENCH_META = ModelMeta(role="denoiser", kind="edm", shape=[1], normaliser={"mean": 0.0, "scale": 1.0})


class TextBackbone(nn.Module):
    """A UNet2DConditionModel as an EDM backbone, with fixed random text embeddings (this benchmark needs no prompts);
    for SDXL's UNet also the pooled embedding and the size conditions."""

    def __init__(self, unet: nn.Module, batch: int, tokens: int, width: int, pooled: int = 0):
        super().__init__()
        self.unet = unet
        self.register_buffer("context", torch.randn(batch, tokens, width), persistent=False)
        self.register_buffer("pooled", torch.randn(batch, pooled) if pooled else None, persistent=False)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        added = None
        if self.pooled is not None:
            size = 8.0 * x.shape[-1]
            ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=x.device, dtype=x.dtype).expand(len(x), -1)
            added = {"text_embeds": self.pooled[: len(x)].to(x.dtype), "time_ids": ids}
        context = self.context[: len(x)].to(x.dtype)
        return self.unet(x, c_noise * NOISE_SCALE, encoder_hidden_states=context, added_cond_kwargs=added).sample


def build(model: str, batch: int) -> tuple[nn.Module, tuple[int, ...], int]:
    """(denoiser, sample shape, number of classes)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if model in ("adm64", "tiny"):
        big = model == "adm64"
        unet = UNet2DModel(
            sample_size=64 if big else 16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(192, 384, 576, 768) if big else (32, 64),
            layers_per_block=3 if big else 1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
            if big
            else ("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
            if big
            else ("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=64 if big else 8,
            norm_num_groups=32 if big else 8,
            num_class_embeds=1000 if big else 10,
        )
        return (
            EDMDenoiser(UNetBackbone(unet), EDM.sigma_data),
            (3, 64 if big else 16, 64 if big else 16),
            1000 if big else 10,
        )
    if model == "sdxl":  # the published config, as benchmarks/real_size.py builds the whole pipeline
        config = json.loads((Path(__file__).parent / "configs" / "sdxl" / "unet.json").read_text())
        unet = UNet2DConditionModel.from_config(config)
        return EDMDenoiser(TextBackbone(unet, batch, 77, 2048, pooled=1280), EDM.sigma_data), (4, 128, 128), 0
    big = model == "sd15"
    unet = UNet2DConditionModel(
        sample_size=64 if big else 16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280) if big else (32, 64),
        layers_per_block=2 if big else 1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        if big
        else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3 if big else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768 if big else 32,
        attention_head_dim=8,
        norm_num_groups=32 if big else 8,
    )
    return (
        EDMDenoiser(TextBackbone(unet, batch, 77, 768 if big else 32), EDM.sigma_data),
        (4, 64 if big else 16, 64 if big else 16),
        0,
    )


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def counting():
    """torch's FlopCounterMode; on a CPU with attention through the math kernel, since the counter has no formula for
    the CPU's flash-attention kernel and would count attention as no work (on a GPU its attention kernels are counted)."""
    with contextlib.ExitStack() as stack:
        if not torch.cuda.is_available():
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield stack.enter_context(FlopCounterMode(display=False))


def count_call(model: str, batch: int) -> dict:
    """--per-call: the work of one denoiser call, forward and forward + backward (weights and input gradients), at
    ``batch``; fits a machine that cannot hold a whole distillation step of the model."""
    device = accelerator().device
    with torch.device(device):
        denoiser, shape, classes = build(model, batch)
    x = torch.randn(batch, *shape, device=device, requires_grad=True)
    sigma = torch.ones(batch, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if classes else None
    with counting() as forward, torch.no_grad():
        denoiser(x, sigma, labels)
    with counting() as both:
        denoiser(x, sigma, labels).sum().backward()
    return {
        "model": model,
        "per_call": True,
        "batch": batch,
        "GFLOP_forward_per_image": round(forward.get_total_flops() / batch / 1e9, 2),
        "GFLOP_forward_backward_per_image": round(both.get_total_flops() / batch / 1e9, 2),
    }


def measure_switch(model: str, folder: Path, repeats: int = 3) -> dict:
    """--switch-only: a target switch at full size without training (fits a CPU machine): reading the node at the
    switch against reading it ahead (disback.method.path.NodeReader, while the generator trains), so that the loop
    waits only for the copy into the target."""
    teacher, _, _ = build(model, 1)
    path = DegradationPath.create(folder / f"switch-{model}", {}, replace=True)
    path.add_node(teacher, 0, BENCH_META)
    path.add_node(teacher, 1, BENCH_META)
    bf16 = torch.cuda.is_available()  # the target as a bf16 run holds it
    target = copy.deepcopy(teacher).to(
        accelerator("bf16" if bf16 else "fp32").device, dtype=torch.bfloat16 if bf16 else None
    )
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
    return {
        "model": model,
        "params_M": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1),
        "node_MB": round((path.root / path.nodes[1].file).stat().st_size / 1e6),
        "switch_direct_s": round(min(direct), 3),
        "switch_prefetched_s": round(min(waited), 3),
        "node_read_s": round(min(read), 3),
        "repeats": repeats,
        "device": device_name(),
    }


class ReferenceLoop:
    """The issue's reference, for comparison on the same device: a plain eager loop in DMD2's order (one generator
    update, then ``ratio`` fake-score updates, the first on the generator's samples), bf16 autocast on a GPU, the
    frozen target in fp32 (cast at every call), unfused AdamW, no finiteness checks, nothing logged."""

    def __init__(self, teacher: nn.Module, shape: tuple[int, ...], classes: int, batch: int, ratio: int, device):
        self.generator = OneStepGenerator(copy.deepcopy(teacher), 2.5)
        self.fake, self.target = copy.deepcopy(teacher), copy.deepcopy(teacher).requires_grad_(False)
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=1e-5, weight_decay=0.0)
        self.opt_f = torch.optim.AdamW(self.fake.parameters(), lr=1e-5, weight_decay=0.0)
        self.shape, self.classes, self.batch, self.ratio, self.device = shape, classes, batch, ratio, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(self.batch, *self.shape, device=self.device)
        return z, torch.randint(self.classes, (self.batch,), device=self.device) if self.classes else None

    def train_step(self) -> None:
        autocast = torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32)
        z, labels = self.draw()
        with autocast:
            x0 = self.generator(z, labels)
            sigma = karras_sigma(self.batch, 0.002, 80.0, device=self.device)
            x_sigma = x0.detach() + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)
            with torch.no_grad():
                d_fake, d_target = self.fake(x_sigma, sigma, labels), self.target(x_sigma, sigma, labels)
            loss = dmd_generator_loss(x0, d_fake, d_target)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        x0 = x0.detach()
        for i in range(self.ratio):
            with autocast:
                if i:
                    z, labels = self.draw()
                    with torch.no_grad():
                        x0 = self.generator(z, labels)
                sigma = lognormal_sigma(self.batch, EDM.p_mean, EDM.p_std, device=self.device)
                loss = dsm_loss(self.fake, x0, sigma, torch.randn_like(x0), EDM.sigma_data, labels)
            self.opt_f.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_f.step()


def configurations(args: argparse.Namespace) -> list[dict]:
    """The configurations to time, in order: per ratio, the reference loop (with --reference), then disback's loop with
    every combination of the channels-last, compile and reuse switches asked for."""
    out = []
    for ratio in args.ratio:
        plain = {"channels_last": False, "compile": False, "checkpointing": False, "lora": 0}
        if args.reference:
            out.append({"loop": "reference", "ratio": ratio, **plain, "reuse": True})
        out += [
            {
                "loop": "disback",
                "ratio": ratio,
                "channels_last": bool(cl),
                "compile": bool(co),
                "checkpointing": bool(ck),
                "lora": lo,
                "reuse": bool(re),
            }
            for cl in args.channels_last
            for co in args.compile
            for ck in args.checkpointing
            for lo in args.lora
            for re in args.reuse
        ]
    return out


def disback_task(
    teacher: nn.Module,
    path: DegradationPath,
    shape: tuple[int, ...],
    classes: int,
    batch: int,
    steps: int,
    c: dict,
    acc,
) -> Distillation:
    """disback's own distillation task on copies of ``teacher`` (LoRA: adapters on it), as `disback distill` builds it."""
    generator = OneStepGenerator(copy.deepcopy(teacher), 2.5)
    # LoRA adapters freeze their base and the bf16 target casts it: a copy of its own, so that the next rows start from
    # the same fp32 teacher (the peak then holds one network more than a real run: allocated_before_GiB's worth)
    fake, target = fake_and_target(copy.deepcopy(teacher) if c["lora"] else teacher, c["lora"], len(path))
    speed_up(
        RunConfig(channels_last=c["channels_last"], compile=c["compile"], gradient_checkpointing=c["checkpointing"]),
        generator,
        fake,
        target,
    )
    cfg = DistillConfig(
        steps=steps,
        batch=batch,
        lr_generator=1e-5,
        lr_fake=1e-5,
        fake_updates=c["ratio"],
        sigma_g=2.5,
        switch_every=10**9,
        sigma_min=0.002,
        sigma_max=80.0,
        reuse_samples=c["reuse"],
    )
    return Distillation(
        generator,
        fake,
        target,
        path,
        FixedSchedule(len(path), 10**9),
        cfg=cfg,
        edm=EDM,
        shape=shape,
        accelerator=acc,
        stage="benchmark",
        num_classes=classes,
    )


def one_node_path(teacher: nn.Module, rank: int, folder: Path) -> DegradationPath:
    """The baseline's path (the teacher alone; LoRA: its zero adapters), so that no row spends its time loading
    nodes; a target switch is measured on its own (--switch-only)."""
    path = DegradationPath.create(folder / f"path-{rank}", {"network": {"lora_rank": rank}}, replace=True)
    path.add_node(scratch(copy.deepcopy(teacher), rank), 0, BENCH_META)
    return path


def allocated_gib() -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def timed(task, c: dict, batch: int, steps: int, warmup: int) -> dict:
    """Seconds per iteration after ``warmup`` iterations, and peak memory."""
    start = time.perf_counter()
    for _ in range(warmup):  # compilation, cuDNN's algorithm search, allocator warm-up
        task.train_step()
    sync()
    warmup_s = time.perf_counter() - start
    print(f"warm-up done in {warmup_s:.1f} s: {c}", flush=True)  # in the log, should the time limit cut the row
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        task.train_step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "s_per_iter": round(seconds, 4),
        "s_per_update": round(seconds / (c["ratio"] + 1), 4),
        "images_per_s": round(batch / seconds, 1),
        "warmup_s": round(warmup_s, 1),
        "peak_GiB": None if peak is None else round(peak, 2),
    }


def measure(model: str, batch: int, configs: list[dict], steps: int, warmup: int, folder: Path):
    """Yield one result per configuration of ``model``."""
    acc = accelerator("bf16" if torch.cuda.is_available() else "fp32")
    device = acc.device
    with torch.device(device):
        teacher, shape, classes = build(model, batch)
    params = sum(p.numel() for p in teacher.parameters())
    paths: dict[int, DegradationPath] = {}
    for c in configs:
        before = allocated_gib()  # the teacher alone, if the configuration before this one was released
        if c["loop"] == "reference":
            task = ReferenceLoop(teacher, shape, classes, batch, c["ratio"], device)
            alive = [weakref.ref(m) for m in (task.generator, task.fake, task.target)]
        else:
            if c["lora"] not in paths:
                paths[c["lora"]] = one_node_path(teacher, c["lora"], folder)
            task = disback_task(teacher, paths[c["lora"]], shape, classes, batch, steps, c, acc)
            alive = [weakref.ref(m) for m in (task.generator, task.fake, task.target)]
        row = {
            "model": model,
            "params_M": round(params / 1e6, 1),
            "batch": batch,
            **c,
            "ratio": f"{c['ratio']}:1",
            "precision": acc.mixed_precision,
            "allocated_before_GiB": None if before is None else round(before, 2),
            "device": device_name(),
        }
        if steps:
            row.update(timed(task, c, batch, steps, warmup))
        if not c["compile"]:  # the same work as eager, and counting would make the compiler start again
            with counting() as counter:  # one more iteration, its work counted
                task.train_step()
            flops = counter.get_total_flops()
            row.update({"TFLOP_per_iter": round(flops / 1e12, 3), "GFLOP_per_image": round(flops / batch / 1e9, 2)})
            if steps:
                row["TFLOP_per_s"] = round(flops / 1e12 / row["s_per_iter"], 3)
        yield row
        del task
        acc.free_memory()  # Accelerate keeps references to every prepared model and optimiser
        torch._dynamo.reset()  # compiled code holds its networks too
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if any(ref() is not None for ref in alive):
            print(
                f"warning: {model} {c}: networks still referenced after release; the next peak includes them",
                flush=True,
            )


def table(rows: list[dict]) -> str:
    """A markdown table of --out's results: per model and ratio, each configuration against the reference loop."""
    lines = [
        "| network | batch | fake:gen | loop | reuse | compile | channels-last | checkpointing | LoRA | s / iteration | "
        "vs reference | images / s | peak GiB | before GiB | warm-up s | GFLOP / image | TFLOP/s |",
        "|" + "---|" * 17,
    ]
    for r in (r for r in rows if "model" in r and "ratio" in r):
        ref = next(
            (
                q
                for q in rows
                if q.get("loop") == "reference"
                and q.get("s_per_iter")
                and (q["model"], q["ratio"]) == (r["model"], r["ratio"])
            ),
            None,
        )
        speed = f"{ref['s_per_iter'] / r['s_per_iter']:.2f}x" if ref and r.get("s_per_iter") else ""
        cells = (
            [r["model"], r["batch"], r["ratio"], r.get("loop", "disback")]
            + [r.get(k) for k in ("reuse", "compile", "channels_last", "checkpointing", "lora", "s_per_iter")]
            + [speed]
            + [
                r.get(k)
                for k in (
                    "images_per_s",
                    "peak_GiB",
                    "allocated_before_GiB",
                    "warmup_s",
                    "GFLOP_per_image",
                    "TFLOP_per_s",
                )
            ]
        )
        lines.append("| " + " | ".join("" if v is None else str(v) for v in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", nargs="+", default=["adm64", "sd15"], choices=["adm64", "sd15", "sdxl", "tiny", "tiny-text"]
    )
    parser.add_argument("--ratio", nargs="+", type=int, default=[1, 5], help="fake-score updates per generator update")
    parser.add_argument("--channels-last", nargs="+", type=int, default=[0], help="0 and/or 1")
    parser.add_argument("--compile", nargs="+", type=int, default=[0], help="torch.compile the networks: 0 and/or 1")
    parser.add_argument("--checkpointing", nargs="+", type=int, default=[0], help="gradient checkpointing: 0 and/or 1")
    parser.add_argument(
        "--lora", nargs="+", type=int, default=[0], help="LoRA ranks of the fake score (0: a full copy)"
    )
    parser.add_argument("--reuse", nargs="+", type=int, default=[0, 1], help="distill.reuse_samples: 0 and/or 1")
    parser.add_argument("--reference", action="store_true", help="also time the plain reference loop (see above)")
    parser.add_argument(
        "--steps", type=int, default=5, help="timed iterations; 0: count the work of one iteration only"
    )
    parser.add_argument("--batch", type=int, help="another batch than the model's (e.g. 1, to count work on a CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="runs/gpu_step.jsonl")
    parser.add_argument("--switch-only", action="store_true", help="only the cost of a target switch, no training")
    parser.add_argument("--per-call", action="store_true", help="only the work of one denoiser call (a CPU is enough)")
    parser.add_argument("--table", metavar="JSONL", help="print a markdown table of earlier results and stop")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in open(args.table) if line.strip()]))
        return
    batches = {"adm64": 40, "sd15": 8, "sdxl": 16, "tiny": 8, "tiny-text": 4}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            batch = args.batch or batches[model]
            if args.switch_only:
                results = [measure_switch(model, Path(tmp))]
            elif args.per_call:
                results = [count_call(model, batch)]
            else:
                results = measure(model, batch, configurations(args), args.steps, args.warmup, Path(tmp))
            for result in results:
                with open(out, "a") as fh:
                    fh.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
