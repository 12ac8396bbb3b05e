"""Is there a regime where backtracking pays off? DisBack's speed-up against how far the generator starts from the
teacher (the start-far diagnostic), across every run of the sigma_g suite and the refinement benchmark.

    .venv/bin/python benchmarks/start_far.py runs/sigma-2.5/results.json runs/sigma-80/results.json \\
        runs/sigma-1/results.json runs/refine/results.json --out benchmarks/results/start-far

x: the diagnostic's one number (disback.method.mismatch.mismatch_summary: exp of the mean |ln| of the teacher's loss
ratio, generator samples over data, over the bands of noise levels; 1 = the teacher sees them as data). y: the
DisBack run's wall-clock speed-up, stage 1 counted, to reach the reference run's final value (the baseline in the
sigma_g suite, (a) "continue" in the refinement benchmark); below 1 it is slower. A regime (a noise level, or a
student) counts as one where backtracking pays off when a variant's mean speed-up over 3 seeds is at least 1.3x on 3
or more data sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from disback.jobs.summary import first_reaching
from disback.method.mismatch import mismatch_summary
from disback.storage.files import write_json, write_text

BAR, DATA_SETS = 1.3, 3


def regime(result: dict) -> str:
    return f"refine K={result['K']}" if "K" in result else f"sigma_g {result['sigma_g']:g}"


def reference(result: dict) -> str:
    return result.get("reference", "baseline")


def wall_to(result: dict, variant: str, goal: float) -> float | None:
    run = result["runs"][variant]
    hit = first_reaching([p for p in run["curve"] if p["iteration"] > 0], result["measure"], goal)
    return None if hit is None else hit["wall_s"] + run.get("stage1_wall_s", 0.0)


def points(results: list[dict]) -> list[dict]:
    """One point per DisBack run: its regime, data set, seed, variant, start-far number and speed-up (None: never)."""
    out = []
    for r in results:
        ref = reference(r)
        goal = r["runs"][ref]["curve"][-1][r["measure"]]
        base = wall_to(r, ref, goal)
        for variant, run in r["runs"].items():
            if run.get("stage1_steps", 0) == 0:  # not a DisBack run
                continue
            mine = wall_to(r, variant, goal)
            out.append(
                {
                    "regime": regime(r),
                    "data": r["data"],
                    "seed": r["seed"],
                    "variant": variant.split(": ")[-1],
                    "start_far": mismatch_summary(r["start_far"]),
                    "speedup": base / mine if base and mine else None,
                }
            )
    return out


def verdicts(pts: list[dict]) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """A table of mean speed-up per (regime, variant) and data set, and the (regime, variant) pairs that clear the bar."""
    datas = list(dict.fromkeys(p["data"] for p in pts))
    lines = [
        "| regime | variant | start-far (mean) | " + " | ".join(datas) + " |",
        "|---|---|---|" + "---|" * len(datas),
    ]
    cleared = []
    for reg, variant in dict.fromkeys((p["regime"], p["variant"]) for p in pts):
        mine = [p for p in pts if (p["regime"], p["variant"]) == (reg, variant)]
        cells, good = [], []
        for data in datas:
            runs = [p for p in mine if p["data"] == data]
            got = [p["speedup"] for p in runs if p["speedup"] is not None]
            if not runs:
                cells.append("")
                continue
            mean = statistics.mean(got) if got else None
            cells.append(f"{mean:.2f} ({len(got)}/{len(runs)})" if mean is not None else f"never (0/{len(runs)})")
            if mean is not None and mean >= BAR and len(got) == len(runs) >= 3:
                good.append(data)
        far = [p["start_far"] for p in mine if p["start_far"] is not None]
        lines.append(
            f"| {reg} | {variant} | {statistics.mean(far):.2f} | " + " | ".join(cells) + " |"
            if far
            else f"| {reg} | {variant} | n/a | " + " | ".join(cells) + " |"
        )
        if len(good) >= DATA_SETS:
            cleared.append((reg, variant, good))
    return "\n".join(lines), cleared


def plot(pts: list[dict], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    regimes = list(dict.fromkeys(p["regime"] for p in pts))
    variants = list(dict.fromkeys(p["variant"] for p in pts))
    for p in pts:
        if p["start_far"] is None:
            continue
        y = p["speedup"] if p["speedup"] is not None else 0.05  # never got there: drawn at the bottom
        ax.scatter(
            p["start_far"],
            y,
            color=f"C{variants.index(p['variant'])}",
            marker="os^vDP*X"[regimes.index(p["regime"]) % 8],
            alpha=0.7,
            s=28,
        )
    for i, v in enumerate(variants):
        ax.scatter([], [], color=f"C{i}", label=v)
    for j, reg in enumerate(regimes):
        ax.scatter([], [], color="gray", marker="os^vDP*X"[j % 8], label=reg)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(BAR, color="k", ls="--", lw=0.8, label=f"{BAR}x")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="start-far: exp(mean |ln loss ratio|) (1 = the teacher sees samples as data)",
        ylabel="DisBack speed-up (wall, stage 1 counted)",
        title="Speed-up against how far the generator starts",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", nargs="+", type=Path, help="results.json of convergence.py (--suite sigma_g) or refine.py"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/start-far"), help="writes OUT.md, OUT.png and OUT.json")
    args = parser.parse_args()
    results = [r for f in args.results for r in json.loads(f.read_text())["results"]]
    pts = points(results)
    text, cleared = verdicts(pts)
    if cleared:
        found = "; ".join(f"{v} at {reg} (on {', '.join(d)})" for reg, v, d in cleared)
        text += f"\n\nBacktracking pays off (at least {BAR}x on {DATA_SETS} or more data sets, 3 seeds): {found}."
    else:
        text += (
            f"\n\nNo regime clears the bar: no variant reaches a mean speed-up of {BAR}x on {DATA_SETS} or more data "
            "sets over 3 seeds."
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out.with_suffix(".md"), text + "\n")
    write_json(args.out.with_suffix(".json"), {"points": pts, "cleared": cleared})
    plot(pts, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
