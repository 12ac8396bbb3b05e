"""What the memory savers cost and save: gradient checkpointing and a LoRA fake score, against full copies.

    .venv/bin/python benchmarks/memory.py --teacher runs/digits/teacher --out runs/memory.jsonl   # the digits preset
    .venv/bin/python benchmarks/memory.py --quick --out runs/memory-q.jsonl                     # a minute, to check it

Each variant runs in a process of its own (so that peak memory is its own): stage 1 and DisBack distillation with the
preset's settings plus the variant's overrides, from one shared teacher. It reports peak memory (GPU: torch's peak
allocation; CPU: the process's peak resident set, which includes ~0.5 GB of Python, torch and diffusers), the bytes
the networks and their optimiser states hold, the size of the degradation path on disk, the final value of the
data's measure, the steps to 2x the teacher's value, and wall seconds of training. weights_MB and trained_with_adam_MB
count what the networks hold (shared tensors once) and what training adds per trained parameter (gradient and Adam's
two moments); saved_for_backward_MB is what autograd keeps for the backward passes of one distillation step (the
activations, which gradient checkpointing trades for time). All three are exact, whatever the device. Results are
appended to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "full copies": {},
    "gradient checkpointing": {"run": {"gradient_checkpointing": True}},
    "LoRA rank 4": {"network": {"lora_rank": 4}},
    "LoRA rank 16": {"network": {"lora_rank": 16}},
    # adapters learn more slowly at the same rate; SwiftBrush trains its LoRA fake score at a higher one
    "LoRA rank 16, 5x lr": {"network": {"lora_rank": 16}, "degrade": {"lr": 1e-3}, "distill": {"lr_fake": 1e-3}},
}
QUICK = {"degrade": {"steps": 20}, "distill": {"steps": 20}, "eval": {"every": 10}, "data": {"n_eval": 200}}


def run_variant(name: str, preset: str, teacher: str, quick: bool) -> dict:
    """One variant, in this process: stage 1 and distillation; its measurements."""
    import numpy as np
    import torch

    from disback import stages
    from disback.config import build_config, merge
    from disback.data import load_data
    from disback.stages.common import metrics_for

    torch.set_num_threads(1)
    overrides = merge(QUICK, VARIANTS[name]) if quick else VARIANTS[name]
    cfg = build_config(preset, overrides=overrides)
    data = load_data(cfg.data, cfg.seed)
    teacher_value = metrics_for(cfg, data)(np.load(Path(teacher).parent / "samples.npy"))
    saved = activation_meter()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = stages.record_path(cfg, Path(teacher), Path(tmp) / "path", show_progress=False)
        stage1_s = time.perf_counter() - started
        path_bytes = sum((path.root / n.file).stat().st_size for n in path.nodes)
        result = stages.distill(cfg, data, Path(teacher), path, Path(tmp) / "run", show_progress=False)
        weights_bytes = sum(f.stat().st_size for f in (Path(tmp) / "run").glob("*.safetensors"))
    records, measure = result["records"], data.measure
    weights_MB, trained_MB = network_bytes(cfg, Path(teacher), len(path))
    reached = next((r["iteration"] for r in records if r[measure] <= 2 * teacher_value[measure]), None)
    cuda = torch.cuda.is_available()
    return {
        "variant": name,
        "preset": preset,
        "quick": quick,
        "measure": measure,
        "teacher": round(teacher_value[measure], 3),
        "final": round(records[-1][measure], 3),
        "steps_to_2x_teacher": reached,
        "peak_GiB": round((torch.cuda.max_memory_allocated() if cuda else peak_rss()) / 2**30, 3),
        "peak_kind": "cuda allocated" if cuda else "process RSS",
        "weights_MB": weights_MB,
        "trained_with_adam_MB": trained_MB,
        "saved_for_backward_MB": round(saved["bytes"] / 1e6, 3),
        "path_MB": round(path_bytes / 1e6, 3),
        "saved_generator_and_fake_MB": round(weights_bytes / 1e6, 3),
        "stage1_s": round(stage1_s, 1),
        "distill_train_s": round(records[-1]["wall_s"], 1),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }


def activation_meter() -> dict:
    """Bytes of the tensors that autograd keeps for a backward pass of the first distillation step (the largest of its
    fake-score updates and its generator update), each storage once and parameters excluded: the activation memory
    held at the step's peak, exact on any device. Under gradient checkpointing a checkpointed block keeps its inputs
    instead, outside autograd's saved tensors: those are counted by a wrapper around torch.utils.checkpoint.checkpoint
    (which diffusers binds when checkpointing is enabled, after this)."""
    import torch
    import torch.utils.checkpoint

    from disback.method import distillation

    seen: dict = {}
    storages: dict[int, int] = {}  # storage -> bytes, kept by the forward pass whose backward comes next
    totals: list[int] = []  # one per backward pass of the step
    plain, plain_update = distillation.Distillation.train_step, distillation.update
    plain_checkpoint = torch.utils.checkpoint.checkpoint
    params: set[int] = set()

    def update(accelerator, optimiser, loss):
        if not seen:  # what this backward pass frees; the next forward pass starts from nothing
            totals.append(sum(n for ptr, n in storages.items() if ptr not in params))
            storages.clear()
        return plain_update(accelerator, optimiser, loss)

    distillation.update = update  # the name Distillation calls

    def checkpoint(fn, *args, **kwargs):
        for t in args:
            if isinstance(t, torch.Tensor) and not seen:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return plain_checkpoint(fn, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = checkpoint

    def step(self):
        if seen:
            return plain(self)
        params.update(p.untyped_storage().data_ptr() for m in (*self.modules(), self.target) for p in m.parameters())
        storages.clear()  # checkpoints of earlier stages (stage 1) do not count

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = plain(self)
        seen["bytes"] = max(totals)  # the largest of the step's backward passes: what it holds at its peak
        return out

    distillation.Distillation.train_step = step
    return seen


def network_bytes(cfg, teacher: Path, num_nodes: int) -> tuple[float, float]:
    """MB held by the distillation's networks (generator, fake score, target: shared tensors counted once) and MB of
    what is trained (parameters, gradients and Adam's two moments), as the stage builds them."""
    from disback.method.lora import fake_and_target
    from disback.storage.models import generator_from_teacher, load_model

    model, meta = load_model(teacher)
    generator = generator_from_teacher(model, meta, cfg.distill.sigma_g)
    fake, target = fake_and_target(model, cfg.network.lora_rank, num_nodes)
    tensors = {id(p): p for m in (generator, fake, target) for p in m.parameters()}
    trained = [p for p in tensors.values() if p.requires_grad and not any(p is q for q in target.parameters())]
    held = sum(p.numel() * p.element_size() for p in tensors.values())
    return round(held / 1e6, 3), round(4 * sum(p.numel() * p.element_size() for p in trained) / 1e6, 3)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--teacher", help="a teacher folder or file for the preset (default: train one first)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks that every variant runs")
    parser.add_argument("--out", default="runs/memory.jsonl")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this variant in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.preset, args.teacher, args.quick)))
        return
    teacher = args.teacher or train_teacher(args.preset, args.quick, Path(args.out).with_suffix(""))
    teacher = str(Path(teacher) / "teacher.safetensors") if Path(teacher).is_dir() else teacher
    for name in args.variants:
        cmd = [sys.executable, __file__, "--one", name, "--preset", args.preset, "--teacher", teacher] + (
            ["--quick"] if args.quick else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        line = proc.stdout.strip().splitlines()[-1]
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)


def train_teacher(preset: str, quick: bool, folder: Path) -> str:
    from disback import stages
    from disback.config import build_config
    from disback.data import load_data

    cfg = build_config(preset, overrides={"teacher": {"steps": 50}} if quick else None)
    return str(
        stages.train_teacher(cfg, load_data(cfg.data, cfg.seed), folder / "teacher", show_progress=False, resume=True)
    )


if __name__ == "__main__":
    main()
