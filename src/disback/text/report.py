"""report.md and curves.png of a `disback text` run: how many steps the generator takes, the CLIP score (with eval.clip)
and the losses against generator steps, the run's settings, and how far the generator started from the teacher."""

from __future__ import annotations

import json
from pathlib import Path

from disback.engine.log import read_metrics
from disback.jobs.report import fmt, pyplot, save_png
from disback.stages.distill import LORA_GENERATOR
from disback.storage.files import write_text
from disback.storage.meta import read_meta
from disback.text.pipeline import steps_name, steps_of

CURVES = ("clip_score", "loss_generator", "loss_fake")


def write_text_report(out: Path, run: Path) -> Path:
    """The report of the text run in ``out`` whose distillation ran in ``run`` (disback/ or baseline/)."""
    records = read_metrics(run / "metrics.jsonl")
    shown = [k for k in CURVES if any(k in r for r in records)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.4), squeeze=False)
    switches = json.loads((run / "result.json").read_text())["switches"] if (run / "result.json").is_file() else []
    for ax, key in zip(axes[0], shown):
        points = [(r["iteration"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), color="tab:red" if run.name == "disback" else "tab:blue")
        for s in switches:
            ax.axvline(s, color="tab:red", alpha=0.15, lw=0.8)
        ax.set(xlabel="generator iteration", title=key.replace("_", " "))
    fig.suptitle(
        f"{run.name}: {'DisBack' if run.name == 'disback' else 'baseline'} (faint lines: target switches)", fontsize=10
    )
    save_png(fig, out / "curves.png")
    plt.close(fig)
    last = records[-1]
    clip = (
        f"CLIP score {fmt(last['clip_score'])} at step {last['iteration']} (first {fmt(records[0]['clip_score'])})"
        if "clip_score" in last
        else "no CLIP score (set eval.clip to a CLIP model to measure one at each evaluation)"
    )
    far = json.loads((out / "start_far.json").read_text()) if (out / "start_far.json").is_file() else None
    rows = (
        "\n".join(f"| {lo:.3g} to {hi:.3g} | {fmt(g)} |" for (lo, hi), g in zip(far["bands"], far["generator"]))
        if far
        else ""
    )
    distance = f"{fmt(far['path_distance'])}" if far and far.get("path_distance") is not None else "no path"
    spec = read_meta(run / "generator.safetensors").spec
    timestep = spec["timestep"]
    generator = generator_line(timestep, (run / LORA_GENERATOR).is_file(), "family" in spec)
    text = f"""# disback text: `{out}`

{generator}

{clip}; {len(switches)} target switch(es) at steps {switches or "none"}.

![curves](curves.png)

## How far the generator started from the teacher

The teacher's denoising loss on the initial generator's samples, per band of noise levels (no data to compare with
unless --real images were given); the degradation path's total distance from the teacher: {distance}.

| noise levels σ | teacher's loss on generator samples |
|---|---|
{rows}

The {steps_name(timestep)} pipeline is in `pipeline/` (see its DISBACK.md for the calls that sample it).
"""
    write_text(out / "report.md", text)
    return out / "report.md"


def generator_line(timestep: int | list[int], lora: bool, flow: bool = False) -> str:
    """How many steps the generator takes, at which timesteps, and whether it was trained as LoRA adapters."""
    steps = steps_of(timestep)
    scheduler = "FlowMatchEulerDiscreteScheduler's stochastic sampling" if flow else "LCMScheduler"
    what = (
        f"The generator takes one step, at timestep {steps[0]}"
        if len(steps) == 1
        else f"The generator takes {len(steps)} steps, at timesteps {steps} (re-noised between steps, as {scheduler} does)"
    )
    network = "transformer" if flow else "UNet"
    return what + (f", trained as LoRA adapters on the teacher's {network}." if lora else ".")
