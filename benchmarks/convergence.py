"""Does backtracking pay off? Every schedule variant (and method) against the baseline, over seeds, same budgets.

    .venv/bin/python benchmarks/convergence.py --out runs/convergence            # the schedule variants, 5 seeds
    .venv/bin/python benchmarks/convergence.py --quick --out runs/convergence-q  # a few minutes
    .venv/bin/python benchmarks/convergence.py --suite methods --jobs 2 --out runs/methods   # every method, ~1 h
    .venv/bin/python benchmarks/convergence.py --suite methods --quick --out runs/methods-q  # a few minutes

Variants (VARIANTS below): the baseline (plain distillation, fake score starts at the teacher), warm start only (fake
score starts at the path's last node, target the teacher at once), DisBack as the paper does it (nodes every K_1/N
stage-1 steps, target switched every M generator steps) and DisBack with distance-spaced nodes and adaptive
switching. "baseline, reused samples" (only when asked for by --variants) is the baseline in DMD2's order
(distill.reuse_samples). One teacher per data set (trained with seed 0) is shared by every seed and variant, so that seeds vary
stage 1 and distillation only and the variants differ only by what they are.

For each data set, seed and variant it records the curve of the data set's measure; then, for 4x, 3x and 2x the
teacher's value and for the baseline's final value, the generator steps and wall-clock seconds to get there, stage
1 included. Writes results.json, summary.md (speed-ups, one column per data set: what goes into the README),
table.md (summary and the full per-threshold tables, for BENCHMARKS.md) and one curves-<data>.png per data set.
--jobs runs (data, seed, method) jobs in parallel processes, one thread each; each
writes OUT/<data>/seed-<k>/<method>/result.json when done, and --reuse rebuilds the tables from those.
benchmarks/fewstep.py runs k-step generators (1, 2, 4 steps) and LoRA generators on this machinery.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from disback import stages
from disback.config import build_config, choices, merge, parse_overrides
from disback.data import load_data
from disback.jobs.summary import curve_of, first_reaching
from disback.stages.common import metrics_for
from disback.storage.files import write_json, write_text

VARIANTS = {  # name -> (config overrides, whether it needs a degradation path)
    "baseline": ({}, False),
    "warm start": ({"distill": {"schedule": "warm_start"}}, True),  # stage 1 as the preset has it
    # the paper's recipe: 8 nodes every K_1/8 stage-1 steps, the target moved every M generator steps
    "paper (steps + fixed)": (
        {"distill": {"schedule": "fixed"}, "degrade": {"spacing": "steps", "plateau": 0.0, "nodes": 8}},
        True,
    ),
    "distance + adaptive": ({"distill": {"schedule": "adaptive"}, "degrade": {"spacing": "distance"}}, True),
    # not backtracking: the baseline in DMD2's order, its samples reused for the fake score (asked for by --variants)
    "baseline, reused samples": ({"distill": {"reuse_samples": True}}, False),
}
DEFAULT_VARIANTS = ["baseline", "warm start", "paper (steps + fixed)", "distance + adaptive"]
PRESETS = {"digits": "digits", "fashion": "fashion"}  # data sets that need another preset than toy2d
FACTORS = (4.0, 3.0, 2.0)
METHODS = list(choices.METHODS)
QUICK = {  # a few minutes on 2 CPU cores: smaller budgets, the same code
    "teacher": {"steps": 1500},
    "degrade": {"steps": 200, "nodes": 4},
    "distill": {"steps": 600, "switch_every": 50},
    "data": {"n_eval": 1000},
    "eval": {"every": 50},
}
# Named set-ups: default data, seeds and methods, and budget overrides per preset (what --set adds goes on top).
SUITES = {
    "schedules": {
        "data": ["ring8", "grid25", "moons", "checkerboard", "digits"],
        "seeds": [0, 1, 2, 3, 4],
        "methods": ["dmd"],
        "budgets": {},
    },
    "schedules-quick": {"data": ["ring8", "moons"], "seeds": [0, 1], "methods": ["dmd"], "budgets": {"toy2d": QUICK}},
    # every method with and without backtracking in about an hour on 2 CPU cores (--jobs 2): shorter budgets, and
    # switch_every shortened with them so that the paper's fixed 8-node walk reaches the teacher at 40% of the budget
    # (as the presets' full budgets have it), not after the budget ends
    "methods": {
        "data": ["ring8", "grid25", "moons", "digits"],
        "seeds": [0, 1, 2],
        "methods": METHODS,
        "budgets": {
            "toy2d": {"distill": {"steps": 400, "switch_every": 20}},
            "digits": {
                "distill": {"steps": 150, "batch": 64, "switch_every": 8},
                "data": {"n_eval": 500},
                "eval": {"every": 15},
            },
        },
    },
    "methods-quick": {"data": ["ring8"], "seeds": [0], "methods": METHODS, "budgets": {"toy2d": QUICK}},
}
# The schedule variants at the methods suite's budgets, 3 seeds: run once per generator noise level
# (--set distill.sigma_g=...), so that the start-far diagnostic spans near and far starts (start_far.py plots it).
SUITES["sigma_g"] = {
    "data": ["ring8", "grid25", "moons", "checkerboard", "digits"],
    "seeds": [0, 1, 2],
    "methods": ["dmd"],
    "budgets": SUITES["methods"]["budgets"],
}
SUITES["sigma_g-quick"] = SUITES["schedules-quick"]


def preset_of(name: str) -> str:
    return PRESETS.get(name, "toy2d")


def config(name: str, seed: int, extra: dict, budget: dict):
    """The preset of data set ``name`` with the suite's ``budget`` and the user's ``extra`` overrides on top."""
    overrides = merge(merge(budget, extra), {"seed": seed, "data": {"name": name}})
    return build_config(preset_of(name), overrides=overrides)


def teacher_job(name: str, extra: dict, budget: dict, out: str) -> str:
    torch.set_num_threads(1)
    cfg = config(name, 0, extra, budget)
    folder = Path(out) / Path(name).stem / "teacher"
    if (folder / "teacher.safetensors").is_file():
        return str(folder / "teacher.safetensors")
    return str(stages.train_teacher(cfg, load_data(cfg.data, cfg.seed), folder, show_progress=False))


def seed_job(
    name: str,
    seed: int,
    extra: dict,
    budget: dict,
    out: str,
    teacher_file: str,
    variants: list[str],
    method: str,
    prefix: bool,
) -> dict:
    """Stage 1 once per spacing, then every variant with ``method``; the result of one (data, seed, method).
    With ``prefix`` (several methods compared) the runs are named "method: variant"."""
    torch.set_num_threads(1)
    root = Path(out) / Path(name).stem / f"seed-{seed}" / method
    base = config(name, seed, extra, budget)
    data = load_data(base.data, seed)
    teacher = metrics_for(base, data)(load_samples(Path(teacher_file).parent))
    start_far = stages.start_far(base, data, teacher_file, None)  # how far the initial generator starts
    paths: dict[str, tuple] = {}
    runs = {}
    for variant in variants:
        overrides, needs_path = VARIANTS[variant]
        overrides = merge(overrides, {"distill": {"method": method}})
        if method == "dmd2":  # two time-scales: at least 2 fake-score updates per generator update
            fake_updates = config(name, seed, extra, budget).distill.fake_updates
            overrides = merge(overrides, {"distill": {"fake_updates": max(fake_updates, 2)}})
        cfg = config(name, seed, merge(extra, overrides), budget)
        path, stage1_steps, stage1_wall = None, 0, 0.0
        if needs_path:
            spacing = f"{cfg.degrade.spacing}-{cfg.degrade.nodes}-{cfg.degrade.plateau:g}"  # the same stage 1 is shared
            if spacing not in paths:
                started = time.perf_counter()
                recorded = stages.record_path(cfg, teacher_file, fresh(root / f"path-{spacing}"), show_progress=False)
                paths[spacing] = (recorded, recorded.nodes[-1].step, time.perf_counter() - started)
            path, stage1_steps, stage1_wall = paths[spacing]
        key = f"{method}: {variant}" if prefix else variant
        result = stages.distill(cfg, data, teacher_file, path, fresh(root / slug(key)), show_progress=False)
        runs[key] = {
            "method": method,
            "variant": variant,
            "curve": curve_of(result["records"]),
            "switches": result["switches"],
            "nodes": result["nodes"],
            "stage1_steps": stage1_steps,
            "stage1_wall_s": round(stage1_wall, 3),
            "node_distances": [n.distance for n in path.nodes] if path else None,
        }
    result = {
        "data": Path(name).stem,
        "seed": seed,
        "measure": data.measure,
        "teacher": teacher,
        "runs": runs,
        "sigma_g": base.distill.sigma_g,
        "start_far": start_far,
    }
    write_json(root / "result.json", result)  # a benchmark cut short keeps the jobs it finished (--reuse)
    print(f"{name} seed {seed} {method}: done", flush=True)
    return result


def merge_results(parts: list[dict]) -> list[dict]:
    """One result per (data, seed), with the runs of every method."""
    merged: dict[tuple, dict] = {}
    for part in parts:
        key = (part["data"], part["seed"])
        if key in merged:
            merged[key]["runs"].update(part["runs"])
        else:
            merged[key] = {**part, "runs": dict(part["runs"])}
    return list(merged.values())


def load_samples(folder: Path):
    import numpy as np

    return np.load(folder / "samples.npy")


def fresh(folder: Path) -> Path:
    """A rerun starts that folder again (path folders refuse to be overwritten)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return folder


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


# ---------------------------------------------------------------- tables


def baseline_of(result: dict, key: str) -> str:
    """The run of the same method without a path."""
    method = result["runs"][key]["method"]
    return next(k for k, r in result["runs"].items() if r["method"] == method and r["variant"] == "baseline")


def costs(result: dict, variant: str, threshold: float) -> tuple[float | None, float | None]:
    """(generator steps + stage-1 steps, wall seconds with stage 1) to first reach ``threshold``."""
    run = result["runs"][variant]
    hit = first_reaching(run["curve"], result["measure"], threshold)
    if hit is None:
        return None, None
    return hit["iteration"] + run["stage1_steps"], hit["wall_s"] + run["stage1_wall_s"]


def thresholds(result: dict, key: str) -> dict[str, float]:
    m = result["measure"]
    out = {f"{f:g}x teacher": f * result["teacher"][m] for f in FACTORS}
    out["baseline final"] = result["runs"][baseline_of(result, key)]["curve"][-1][m]
    return out


def mean_sd(values: list[float | None], digits: int = 0, missing: str = "never") -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"{missing} (0/{len(values)})"
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    text = f"{statistics.mean(got):.{digits}f} ± {sd:.{digits}f}"
    return text + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)})")


def ratio(base: float | None, other: float | None) -> float | None:
    """None when either run never got there, or the baseline was there before training (nothing to speed up)."""
    return base / other if base and other else None


def tables(results: list[dict]) -> str:
    """Per data set: for each run (method and variant) and threshold, the cost to get there with stage 1, and the
    speed-up over the same method's baseline (mean ± sd over seeds; (k/n) when only k of n seeds got there)."""
    lines = []
    for data in dict.fromkeys(r["data"] for r in results):
        rows = [r for r in results if r["data"] == data]
        m = rows[0]["measure"]
        lines += [
            f"### {data} ({len(rows)} seeds, measure {m}; a run on fewer seeds says so as (k/n))",
            "",
            "| run | threshold | generator steps | steps incl. stage 1 | wall s incl. stage 1 | speed-up (generator steps) "
            "| speed-up (steps incl. stage 1) | speed-up (wall incl. stage 1) | final |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant in dict.fromkeys(k for r in rows for k in r["runs"]):
            have = [r for r in rows if variant in r["runs"]]  # a benchmark cut short may lack some runs
            for label in thresholds(have[0], variant):
                gen, steps, walls, sg, sp, sw = [], [], [], [], [], []
                for r in have:
                    s, w = costs(r, variant, thresholds(r, variant)[label])
                    bs, bw = costs(r, baseline_of(r, variant), thresholds(r, variant)[label])
                    g = None if s is None else s - r["runs"][variant]["stage1_steps"]  # stage 1 not counted
                    gen.append(g), steps.append(s), walls.append(w)
                    sg.append(ratio(bs, g)), sp.append(ratio(bs, s)), sw.append(ratio(bw, w))
                finals = [r["runs"][variant]["curve"][-1][m] for r in have]
                final = mean_sd(finals, 3) if label == "baseline final" else ""
                same = have[0]["runs"][variant]["variant"] == "baseline"
                name = variant + (f" [{len(have)} seeds]" if len(have) < len(rows) else "")
                speedups = ["" if same else mean_sd(v, 2, "n/a") for v in (sg, sp, sw)]
                cells = [name, label, mean_sd(gen), mean_sd(steps), mean_sd(walls, 1), *speedups, final]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summary(results: list[dict], label: str = "2x teacher") -> str:
    """One line per run, one column per data set: the speed-up over the same method's baseline in wall-clock and in
    steps, both with stage 1 counted, to reach ``label``; and the final value relative to the baseline's."""
    datas = list(dict.fromkeys(r["data"] for r in results))
    keys = list(dict.fromkeys(k for r in results for k in r["runs"]))
    lines = [
        f"Speed-up to {label} over the same method's baseline, wall-clock / steps, stage 1 counted (mean over "
        "seeds where both got there, k/n when not all did); then final value / baseline's final value.",
        "",
        "| run | " + " | ".join(datas) + " |",
        "|---|" + "---|" * len(datas),
    ]
    for key in keys:
        cells = []
        for data in datas:
            rows = [r for r in results if r["data"] == data and key in r["runs"]]
            if not rows:
                cells.append("")
                continue
            cells.append(cell([speedup_of(r, key, label) for r in rows]))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedup_of(result: dict, key: str, label: str) -> tuple[float | None, float | None, float]:
    """Run ``key`` against its method's baseline at threshold ``label``: (wall-clock speed-up, step speed-up, both with
    stage 1 counted; None if either never got there) and its final value over the baseline's."""
    m, base = result["measure"], baseline_of(result, key)
    threshold = thresholds(result, key)[label]
    (s, w), (bs, bw) = costs(result, key, threshold), costs(result, base, threshold)
    return ratio(bw, w), ratio(bs, s), result["runs"][key]["curve"][-1][m] / result["runs"][base]["curve"][-1][m]


def cell(values: list[tuple[float | None, float | None, float]]) -> str:
    """'wall / steps (k/n); final' averaged over the runs where both got there."""
    got = [(w, s) for w, s, _ in values if w is not None and s is not None]
    speed = (
        (
            f"{statistics.mean(w for w, _ in got):.2f} / {statistics.mean(s for _, s in got):.2f}"
            + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)})")
        )
        if got
        else f"n/a (0/{len(values)})"
    )
    return f"{speed}; {statistics.mean(f for _, _, f in values):.2f}"


def by_method(results: list[dict], label: str) -> str:
    """One row per method, one column per variant, pooled over every data set and seed (the README's table)."""
    keys = [k for k in dict.fromkeys(k for r in results for k in r["runs"]) if ": " in k]
    methods = list(dict.fromkeys(k.split(": ")[0] for k in keys))
    variants = [v for v in dict.fromkeys(k.split(": ")[1] for k in keys) if v != "baseline"]
    lines = [
        f"To {label}, pooled over data sets and seeds: wall-clock / steps speed-up over the method's baseline "
        "(stage 1 counted; k/n when not all got there); final value / baseline's.",
        "",
        "| method | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for method in methods:
        cells = [
            cell([speedup_of(r, f"{method}: {v}", label) for r in results if f"{method}: {v}" in r["runs"]])
            for v in variants
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for data in dict.fromkeys(r["data"] for r in results):
        rows = [r for r in results if r["data"] == data]
        m = rows[0]["measure"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, variant in enumerate(dict.fromkeys(k for r in rows for k in r["runs"])):
            for j, r in enumerate(r for r in rows if variant in r["runs"]):
                run = r["runs"][variant]
                x = [p["iteration"] + run["stage1_steps"] for p in run["curve"]]
                ax.plot(x, [p[m] for p in run["curve"]], color=f"C{i}", alpha=0.6, label=variant if j == 0 else None)
        ax.axhline(2 * statistics.mean(r["teacher"][m] for r in rows), color="k", ls=":", label="2x teacher")
        ax.set(yscale="log", xlabel="generator steps + stage-1 steps", ylabel=m, title=f"{data}: every seed")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"curves-{data}.png", dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite",
        default="schedules",
        choices=[k for k in SUITES if not k.endswith("-quick")],
        help="schedules: dmd, 5 data sets, 5 seeds; methods: every method, ring8 grid25 moons digits, "
        "3 seeds, shorter budgets (about an hour here with --jobs 2); sigma_g: the schedules at the methods "
        "suite's budgets, 3 seeds, for one --set distill.sigma_g=... at a time",
    )
    parser.add_argument("--quick", action="store_true", help="the suite in a few minutes: 2-D data, small budgets")
    parser.add_argument("--data", nargs="+", help="default: the suite's")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the suite's")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="generator losses (default: the suite's); each is compared with its own baseline",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=1, help="(data, seed) pairs run in parallel, one thread each")
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--reuse", action="store_true", help="rebuild the tables from the (data, seed) results in OUT")
    args = parser.parse_args()
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")
    suite = SUITES[args.suite + ("-quick" if args.quick else "")]
    args.data, args.seeds = args.data or suite["data"], args.seeds or suite["seeds"]
    args.methods, args.budgets = args.methods or suite["methods"], suite["budgets"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    if args.reuse:
        results = merge_results([json.loads(f.read_text()) for f in sorted(out.glob("*/seed-*/*/result.json"))])
    else:
        results = run(args, out)
    write_results(out, results, begun)
    labels = ("3x teacher", "2x teacher", "baseline final")
    text = "\n\n".join(summary(results, label) for label in labels)
    if len(args.methods) > 1 or args.reuse:
        text = "\n\n".join(
            [by_method(results, label) for label in labels if any(": " in k for r in results for k in r["runs"])]
            + [text]
        )
    write_text(out / "summary.md", text + "\n")
    text += "\n\n" + tables(results)
    write_text(out / "table.md", text + "\n")
    plot(results, out)
    print(text)


COST = {
    "dmd2": 0,
    "sid": 1,
    "dmd": 2,
    "vsd": 3,
}  # the order in which jobs start: dmd2 (two fake updates and a GAN) first


def schedule(names: list[str], extra: dict, budget: dict, out: Path, workers: int, jobs_for) -> list[dict]:
    """Every data set's teacher, then the jobs ``jobs_for(name, teacher file)`` returns ((sort key, function, arguments)
    each) as soon as that teacher is ready. Workers are handed one job at a time, the lowest key first (the longest:
    images first), so that no worker idles at the end behind a long job. Returns the jobs' results."""
    ready: list[tuple] = []
    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {
            pool.submit(teacher_job, name, extra, budget[name], str(out)): name
            for name in sorted(names, key=lambda n: n not in PRESETS)
        }  # the long (image) teachers first
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                if name is None:
                    results.append(future.result())
                else:
                    ready += jobs_for(name, future.result())
            ready.sort(key=lambda job: job[0])
            while ready and len(running) < workers:
                _, fn, job_args = ready.pop(0)
                running[pool.submit(fn, *job_args)] = None
    return results


def run(args, out: Path) -> list[dict]:
    """Every teacher, then each data set's (seed, method) jobs as soon as its teacher is ready (images, then dmd2)."""
    extra = parse_overrides(args.overrides)
    budget = {name: args.budgets.get(preset_of(name), {}) for name in args.data}
    prefix = len(args.methods) > 1

    def jobs_for(name: str, teacher: str) -> list[tuple]:
        return [
            (
                (name not in PRESETS, COST.get(method, 0)),
                seed_job,
                (name, seed, extra, budget[name], str(out), teacher, args.variants, method, prefix),
            )
            for seed in args.seeds
            for method in args.methods
        ]

    return merge_results(schedule(args.data, extra, budget, out, args.jobs, jobs_for))


def write_results(out: Path, results: list[dict], begun: float) -> None:
    """OUT/results.json: the command, the machine, the date, the time it took and every result."""
    write_json(
        out / "results.json",
        {
            "command": " ".join(sys.argv),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "elapsed_s": round(time.perf_counter() - begun),
            "results": results,
        },
    )


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.node()}: {device}, {multiprocessing.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
