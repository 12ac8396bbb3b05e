"""report.md, curves.png and samples.png of a demo folder, from its summary.json and samples.npy files alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from disback.errors import DisbackError
from disback.weights import atomic_write, write_text

RUNS = (("baseline", "baseline", "tab:blue"), ("disback", "DisBack", "tab:red"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    measures = [m for m in ("swd", "mmd", "modes") if m in summary["teacher"]]
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 3.6))
    for ax, m in zip(np.atleast_1d(axes), measures):
        for key, label, colour in RUNS:
            curve = summary["runs"][key]["curve"]
            values = [max(r[m], 1e-6) if m == "mmd" else r[m] for r in curve]  # MMD^2 estimates can touch 0
            ax.plot([r["iteration"] for r in curve], values, label=label, color=colour)
        ax.axhline(summary["teacher"][m], color="k", ls=":", label="teacher (Heun)")
        if m == "swd":
            ax.axhline(summary["speedup"]["threshold_swd"], color="gray", ls="--", label="threshold")
            ax.set_yscale("log")
        if m == "mmd":
            ax.set_yscale("log")
        for s in summary["runs"]["disback"]["switches"]:
            ax.axvline(s, color="tab:red", alpha=0.15, lw=0.8)
        ax.set_xlabel("generator iteration")
        ax.set_title({"swd": "sliced Wasserstein (SW1)", "mmd": "MMD^2", "modes": "modes covered"}[m])
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"{summary['data']}: DisBack vs baseline (faint red lines: target switches)", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_samples(out: Path, summary: dict[str, Any], path: Path, reference: np.ndarray | None) -> None:
    plt = _plt()
    panels = [("data", reference)] + [
        (title, np.load(out / folder / "samples.npy")) for folder, title in (("teacher", "teacher"), ("baseline", "baseline"), ("disback", "DisBack"))
    ]
    panels = [(t, x) for t, x in panels if x is not None]
    # One frame for all panels, from the data's (or teacher's) spread, so that outliers do not shrink the picture.
    frame = panels[0][1][:, :2]
    lo, hi = np.percentile(frame, 0.5, 0), np.percentile(frame, 99.5, 0)
    pad = 0.25 * (hi - lo + 1e-9)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3))
    for ax, (title, x) in zip(axes, panels):
        _draw_points(ax, x)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        if x.shape[1] > 1:
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_title(title)
        ax.set_xticks([]), ax.set_yticks([])
    _save(fig, path)
    plt.close(fig)


def scatter(points: np.ndarray, path: Path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    _draw_points(ax, points)
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)


def _draw_points(ax, x: np.ndarray) -> None:
    """A scatter of the first two coordinates; a histogram for 1-D points."""
    if x.shape[1] == 1:
        ax.hist(x[:, 0], bins=80, color="k")
    else:
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="k")
        ax.set_aspect("equal", adjustable="box")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "never"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table(summary: dict[str, Any]) -> str:
    sp, b = summary["speedup"], summary["budgets"]
    extra = [m for m in ("modes", "high_quality") if m in summary["teacher"]]
    head = ["run", "final SWD", "final MMD^2"] + [f"final {m}" for m in extra] + ["iterations to threshold", "+ stage-1 steps", "wall s to threshold"]
    rows = [["teacher (Heun)", _fmt(summary["teacher"]["swd"]), _fmt(summary["teacher"]["mmd"])] + [_fmt(summary["teacher"][m]) for m in extra] + ["", "", ""]]
    for key, label, _ in RUNS:
        final = summary["runs"][key]["final"]
        iters = sp[f"iterations_{key}"]
        with_stage1 = sp["iterations_disback_with_stage1"] if key == "disback" else iters
        wall = sp["wall_s_disback_with_stage1"] if key == "disback" else sp["wall_s_baseline"]
        rows.append([label, _fmt(final["swd"]), _fmt(final["mmd"])] + [_fmt(final.get(m)) for m in extra] + [_fmt(iters), _fmt(with_stage1), _fmt(wall, 3)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    note = (
        f"Threshold: SWD <= {sp['threshold_factor']} x teacher = {sp['threshold_swd']:.4g}. "
        f"Stage 1 took {b['stage1_steps']} steps ({summary['runs']['disback']['stage1_wall_s']:.1f} s) for {b['nodes']} nodes."
    )
    if "speedup_iterations" in sp:
        note += (
            f" Speed-up of DisBack over the baseline (iterations to threshold): {sp['speedup_iterations']:.2f}x, "
            f"{sp['speedup_with_stage1']:.2f}x with stage-1 steps counted, {sp['speedup_wall_with_stage1']:.2f}x in wall time with stage 1."
        )
    return "\n".join(lines) + "\n\n" + note


def factor_table(summary: dict[str, Any]) -> str:
    """Iterations to several thresholds, so that a run that just misses the configured one still tells something."""
    lines = ["| threshold | baseline iters | DisBack iters | DisBack iters + stage 1 | speed-up (iters) | speed-up with stage 1 |", "|---|---|---|---|---|---|"]
    for key, sp in summary.get("speedup_by_factor", {}).items():
        ratios = [f"{sp[k]:.2f}x" if k in sp else "n/a" for k in ("speedup_iterations", "speedup_with_stage1")]
        cells = [f"{key}x teacher ({sp['threshold_swd']:.3g})", _fmt(sp["iterations_baseline"]), _fmt(sp["iterations_disback"]),
                 _fmt(sp["iterations_disback_with_stage1"]), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, reference: np.ndarray | None = None) -> str:
    """Write report.md and its PNGs into ``out``; return the table."""
    out = Path(out)
    if not (out / "summary.json").is_file():
        raise DisbackError(f"{out} has no summary.json; run `disback demo --out {out}` first")
    summary = json.loads((out / "summary.json").read_text())
    plot_curves(summary, out / "curves.png")
    plot_samples(out, summary, out / "samples.png", reference)
    b = summary["budgets"]
    text = f"""# DisBack demo on `{summary['data']}` (seed {summary['seed']})

{table(summary)}

Generator iterations to other thresholds (SWD at most k x the teacher's):

{factor_table(summary)}

![curves](curves.png)

![samples](samples.png)

## What ran
- **Teacher**: an EDM denoiser (MLP) trained for {b['teacher_steps']} steps; sampled with the EDM Heun sampler.
- **Stage 1, Degradation Recording**: a copy of the teacher fine-tuned for {b['stage1_steps']} steps on samples of the
  frozen initial generator, saving {b['nodes']} nodes (node 0 = teacher) to `path/`.
- **Stage 2, Distribution Backtracking** (`disback/`): fake score starts at the last node, the target walks the path back
  one node every {b['switch_every']} generator steps to the teacher.
- **Baseline** (`baseline/`): the same loop with the teacher as the only node (fake score starts at the teacher).
- Both: {b['generator_steps']} generator steps, batch {b['batch']}, {b['fake_updates_per_generator_step']} fake-score
  update(s) per generator step, DMD-weighted generator loss, same seeds; evaluated every {b['eval_every']} iterations on
  {b['eval_samples']} samples from fixed noise.

## Measures
- SWD: sliced Wasserstein-1 distance to a held-out reference set, in the data's own units (lower is better).
- MMD^2: squared maximum mean discrepancy with a sum of Gaussian kernels (lower is better).
- modes / high_quality (mixtures only): share of modes holding at least 20% of their fair share of samples within
  3 std of a mode; share of samples within 3 std of a mode.
- "Iterations to threshold" is the first evaluated generator iteration whose SWD is at most the threshold; "never" means
  not within the budget. Wall time counts training only (not evaluation), stage 1 included for DisBack.
"""
    write_text(out / "report.md", text)
    return table(summary)
