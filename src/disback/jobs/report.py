"""report.md, curves.png and samples.png of a demo folder, from its summary.json and samples.npy files alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from disback.jobs.summary import Budgets, Summary
from disback.storage.files import atomic_write, write_text

RUNS = (("baseline", "baseline", "tab:blue"), ("disback", "DisBack", "tab:red"))
TITLES = {
    "swd": "sliced Wasserstein (SW1)",
    "mmd": "MMD^2",
    "modes": "modes covered",
    "fid": "Fréchet distance (own classifier, not Inception)",
}
LOG_SCALE = ("swd", "mmd", "fid")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def plot_curves(summary: Summary, path: Path) -> None:
    plt = pyplot()
    measures = [m for m in ("swd", "mmd", "modes", "fid") if m in summary.teacher]
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 3.6), squeeze=False)
    for ax, m in zip(axes[0], measures):
        for key, label, colour in RUNS:
            curve = summary.runs[key].curve
            values = [max(r[m], 1e-6) if m in LOG_SCALE else r[m] for r in curve]  # estimates can touch 0
            ax.plot([r["iteration"] for r in curve], values, label=label, color=colour)
        ax.axhline(summary.teacher[m], color="k", ls=":", label="teacher (Heun)")
        if m == summary.measure:
            ax.axhline(summary.speedup.threshold, color="gray", ls="--", label="threshold")
        if m in LOG_SCALE:
            ax.set_yscale("log")
        for s in summary.runs["disback"].switches:
            ax.axvline(s, color="tab:red", alpha=0.15, lw=0.8)
        ax.set_xlabel("generator iteration")
        ax.set_title(TITLES[m])
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{summary.data}: DisBack vs baseline (faint red lines: target switches)", fontsize=10)
    save_png(fig, path)
    plt.close(fig)


def _draw(ax, x: np.ndarray) -> None:
    """Images as a grid; points as a scatter of the first two coordinates (a histogram for 1-D points)."""
    if x.ndim == 4:
        ax.imshow(grid(x[:64]), cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    elif x.shape[1] == 1:
        ax.hist(x[:, 0], bins=80, color="k")
    else:
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="k")
        ax.set_aspect("equal", adjustable="box")
    ax.set_xticks([]), ax.set_yticks([])


def grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """N x C x H x W in [0, 1] -> one H' x W' (x 3) picture, a pixel of padding between images."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((c, rows * (h + 1) + 1, columns * (w + 1) + 1), dtype=np.float32)
    for i, im in enumerate(images):
        r, k = divmod(i, columns)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = im
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def picture(samples: np.ndarray, path: Path, title: str = "") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    _draw(ax, samples)
    ax.set_title(title)
    save_png(fig, path)
    plt.close(fig)


def plot_samples(out: Path, path: Path) -> None:
    plt = pyplot()
    panels = [
        (title, np.load(out / file))
        for file, title in (
            ("reference.npy", "data"),
            ("teacher/samples.npy", "teacher"),
            ("baseline/samples.npy", "baseline"),
            ("disback/samples.npy", "DisBack"),
        )
        if (out / file).is_file()
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3))
    frame = panels[0][1]
    for ax, (title, x) in zip(axes, panels):
        _draw(ax, x)
        if x.ndim == 2 and x.shape[1] > 1:
            # One frame for all panels, from the first panel's spread, so that outliers do not shrink the picture.
            lo, hi = np.percentile(frame[:, :2], 0.5, 0), np.percentile(frame[:, :2], 99.5, 0)
            pad = 0.25 * (hi - lo + 1e-9)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_title(title)
    save_png(fig, path)
    plt.close(fig)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "never"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table(summary: Summary) -> str:
    sp, b, m = summary.speedup, summary.budgets, summary.measure
    cols = [k for k in ("swd", "mmd", "modes", "high_quality", "fid") if k in summary.teacher]
    head = (
        ["run"] + [f"final {c}" for c in cols] + ["iterations to threshold", "+ stage-1 steps", "wall s to threshold"]
    )
    rows = [["teacher (Heun)"] + [fmt(summary.teacher[c]) for c in cols] + ["", "", ""]]
    for key, label, _ in RUNS:
        final = summary.runs[key].final
        iters = getattr(sp, f"iterations_{key}")
        with_stage1 = sp.iterations_disback_with_stage1 if key == "disback" else iters
        wall = sp.wall_s_disback_with_stage1 if key == "disback" else sp.wall_s_baseline
        rows.append([label] + [fmt(final.get(c)) for c in cols] + [fmt(iters), fmt(with_stage1), fmt(wall, 3)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    note = (
        f"Threshold: {m} <= {sp.threshold_factor:g} x teacher = {sp.threshold:.4g}. "
        f"Stage 1 took {b.stage1_steps} steps ({summary.runs['disback'].stage1_wall_s:.1f} s) for {b.nodes} nodes."
    )
    if sp.speedup_iterations is not None:
        note += (
            f" Speed-up of DisBack over the baseline (iterations to threshold): {sp.speedup_iterations:.2f}x, "
            f"{sp.speedup_with_stage1:.2f}x with stage-1 steps counted, {sp.speedup_wall_with_stage1:.2f}x in wall time with stage 1."
        )
    if summary.features:
        note += "\n\n" + features_note(summary.features, summary.budgets.eval_samples)
    return "\n".join(lines) + "\n\n" + note


def features_note(f: dict[str, Any], samples: int) -> str:
    """What the run's fid is: Inception FID, a plugged feature network's, or the offline classifier's."""
    if f.get("task") == "inception":
        return (
            f"fid is Inception FID (the TorchScript network of sha256 {str(f.get('sha256'))[:12]}...) against the held-out "
            f"images, from {samples} samples: the papers use 50,000 (`disback eval`), and FID from fewer is biased upward."
        )
    if f.get("task") == "plugged":
        return f"fid is a Fréchet distance on the features of {f.get('spec')} (eval.features), against the held-out images."
    return (
        f"fid is a Fréchet distance on the features of a small CNN trained on this data set ({f.get('task')}, held-out "
        f"accuracy {f.get('accuracy', float('nan')):.3f}); it is NOT Inception FID and compares only with itself."
    )


def factor_table(summary: Summary) -> str:
    """Iterations to several thresholds, so that a run that just misses the configured one still tells something."""
    lines = [
        "| threshold | baseline iters | DisBack iters | DisBack iters + stage 1 | speed-up (iters) | speed-up with stage 1 |",
        "|---|---|---|---|---|---|",
    ]
    for key, sp in summary.speedup_by_factor.items():
        ratios = [f"{r:.2f}x" if r is not None else "n/a" for r in (sp.speedup_iterations, sp.speedup_with_stage1)]
        cells = [
            f"{key}x teacher ({sp.threshold:.3g})",
            fmt(sp.iterations_baseline),
            fmt(sp.iterations_disback),
            fmt(sp.iterations_disback_with_stage1),
            *ratios,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


REUSED = " (the first on the generator step's own samples: distill.reuse_samples, DMD2's order)"
MEASURES_TEXT = {
    "points": """- swd: sliced Wasserstein-1 distance to a held-out reference set, in the data's own units (lower is better).
- mmd: squared maximum mean discrepancy with a sum of Gaussian kernels (lower is better).
- modes / high_quality (mixtures only): share of modes holding at least 20% of their fair share of samples within
  3 std of a mode; share of samples within 3 std of a mode.""",
    "images": """- fid: Fréchet distance between generator samples and held-out images, on the 128 features of a small CNN trained
  on this data set (class labels where the data has them, else rotation prediction), trained once and cached. It is
  NOT Inception FID: compare it only with numbers from the same data and feature network.""",
}


def start_far_text(summary: Summary) -> str:
    """The start-far diagnostic as a table: the teacher's denoising loss on the initial generator's samples against its
    loss on data, per band of noise levels, and the path's total distance."""
    d = summary.start_far
    if not d:
        return "Not measured for this run."
    lines = ["| noise levels σ | teacher's loss on generator samples | on data | ratio |", "|---|---|---|---|"]
    for k, (low, high) in enumerate(d["bands"]):
        on_data = d["data"][k] if d.get("data") else None
        ratio = d["ratio"][k] if d.get("ratio") else None
        lines.append(
            f"| {low:.3g} to {high:.3g} | {fmt(d['generator'][k])} | {fmt(on_data) if on_data is not None else 'n/a'} "
            f"| {fmt(ratio, 3) if ratio is not None else 'n/a'} |"
        )
    distance = d.get("path_distance")
    sp = summary.speedup
    tail = (
        f"The degradation path's total distance from the teacher: {fmt(distance)}."
        if distance is not None
        else "No degradation path was recorded."
    )
    if sp is not None and sp.speedup_wall_with_stage1 is not None:
        tail += f" DisBack's speed-up at this start (wall time, stage 1 counted): {sp.speedup_wall_with_stage1:.2f}x."
    return "\n".join(lines) + "\n\n" + tail


def generator_text(b: Budgets) -> str:
    levels = b.generator_levels or []
    if len(levels) <= 1:
        return f"one step at sigma {levels[0]:g}" if levels else "one step"
    made = (
        "its input simulated from pure noise by the steps before it (DMD2's backward simulation)"
        if b.step_input == "simulate"
        else "its input real data noised to its level (FastGen's)"
    )
    return (
        f"{len(levels)} steps at sigma {', '.join(f'{s:g}' for s in levels)}, re-noised with fresh noise between steps; "
        f"each iteration trains one step, drawn uniformly, {made}"
    )


def schedule_text(b: Budgets) -> str:
    kind = b.target_schedule
    if kind == "fixed":
        return f"the target walks the path back one node every {b.switch_every} generator steps to the teacher"
    if kind == "adaptive":
        low, high = b.dwell
        return (
            f"the target walks the path back one node whenever the generator has caught up with it (the fake-target "
            f"gap fell to a set fraction of its start), after {low} to {high} generator steps per node"
        )
    return "the target is the teacher from the first step (warm start: the path's end only)"


def write_report(out: Path) -> str:
    """Write report.md and its PNGs into ``out``; return the table."""
    out = Path(out)
    summary = Summary.read(out)
    plot_curves(summary, out / "curves.png")
    plot_samples(out, out / "samples.png")
    b = summary.budgets
    kind = "images" if summary.measure == "fid" else "points"
    measures = MEASURES_TEXT[kind]
    if kind == "images" and (summary.features or {}).get("task") in ("inception", "plugged"):
        measures = "- " + features_note(summary.features, b.eval_samples)
    text = f"""# DisBack demo on `{summary.data}` (seed {summary.seed})

{table(summary)}

Generator iterations to other thresholds ({summary.measure} at most k x the teacher's):

{factor_table(summary)}

![curves](curves.png)

![samples](samples.png)

## How far the generator starts from the teacher

Measured before training, the "score mismatch" that backtracking is meant to cure: the teacher's denoising loss on the
initial generator's samples over its loss on data. A ratio of 1 means the teacher sees them as it sees data; above 1
it denoises them worse, below 1 better (samples collapsed where its density is high).

{start_far_text(summary)}

## What ran
- **Teacher**: {b.teacher}, {b.teacher_steps} training steps; sampled with the EDM Heun sampler.
- **Generator**: {generator_text(b)}.
- **Initial generator**: {b.initial_generator or "a copy of the teacher"}; **initial fake score**: {
        b.initial_fake or "the path's last node (DisBack), the teacher (baseline)"
    }.
- **Stage 1, Degradation Recording**: a copy of the teacher fine-tuned for {b.stage1_steps} steps on samples of the
  frozen initial generator, saving {b.nodes} nodes (node 0 = teacher) to `path/`, placed by {b.node_spacing}.
- **Stage 2, Distribution Backtracking** (`disback/`): fake score starts {
        "from the given critic" if b.initial_fake else "at the last node"
    }; {schedule_text(b)}.
- **Baseline** (`baseline/`): the same loop with the teacher as the only node (fake score starts {
        "from the given critic" if b.initial_fake else "at the teacher"
    }).
- Both: {b.generator_steps} generator steps, batch {b.batch}, {b.fake_updates_per_generator_step} fake-score
  update(s) per generator step{REUSED if b.reuse_samples else ""}, generator loss `{
        b.method
    }`, same seeds; evaluated every {b.eval_every}
  iterations on {b.eval_samples} samples from fixed noise.

## Measures
{measures}
- "Iterations to threshold" is the first evaluated generator iteration whose {summary.measure} is at most the threshold;
  "never" means not within the budget. Wall time counts training only (not evaluation), stage 1 included for DisBack.
"""
    write_text(out / "report.md", text)
    return table(summary)
