"""Does backtracking pay off when refining a generator distilled before (the original DisBack release's recipe)?

    .venv/bin/python benchmarks/refine.py --jobs 2 --out runs/refine            # ring8 grid25 moons digits, 3 seeds
    .venv/bin/python benchmarks/refine.py --quick --out runs/refine-q           # a few minutes

A student is distilled with the baseline for K generator steps. Then, for the same further budget (stage 1 counted),
from that student:
  (a) continue: plain distillation with the student's own fake score;
  (b) restart fake: plain distillation with the fake score restarted at the teacher;
  (c) DisBack, stage 1 recorded toward the student's samples: the paper's recipe (8 nodes every K_1/8 steps, target
      moved every M steps), distance + adaptive, and warm start.
Each (data, seed, K) also records the start-far diagnostic of the student (stages.start_far). The tables give each
run's final value over (a)'s, and its steps and wall time (stage 1 included) to reach (a)'s final value, mean ± sd over
seeds; a speed-up below 1 or a final above 1 is a negative result and is reported as such.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from convergence import PRESETS, config, fresh, mean_sd, ratio, schedule, slug, write_results
from disback import stages
from disback.config import merge, parse_overrides
from disback.data import load_data
from disback.jobs.summary import curve_of, first_reaching
from disback.stages.common import metrics_for
from disback.storage.files import write_json, write_text

# name -> (config overrides, whether it records a path, whether the fake score starts from the student's)
VARIANTS = {
    "continue": ({}, False, True),
    "restart fake": ({}, False, False),
    "paper (steps + fixed)": (
        {"distill": {"schedule": "fixed"}, "degrade": {"spacing": "steps", "plateau": 0.0, "nodes": 8}},
        True,
        False,
    ),
    "distance + adaptive": ({"distill": {"schedule": "adaptive"}, "degrade": {"spacing": "distance"}}, True, False),
    "warm start": ({"distill": {"schedule": "warm_start"}, "degrade": {"spacing": "distance"}}, True, False),
}
REFERENCE = "continue"
SUITE = {  # data -> student steps K (an early and a converged student on the 2-D sets), and the further budgets
    "data": {"ring8": [100, 1000], "grid25": [100, 1000], "moons": [100, 1000], "digits": [150]},
    "seeds": [0, 1, 2],
    "budgets": {
        "toy2d": {"distill": {"steps": 600, "switch_every": 30}},  # the paper's 8-node walk ends at 40% of the budget
        "digits": {
            "distill": {"steps": 150, "batch": 64, "switch_every": 8},
            "data": {"n_eval": 500},
            "eval": {"every": 15},
        },
    },
}
QUICK = {
    "data": {"ring8": [100, 400]},
    "seeds": [0],
    "budgets": {
        "toy2d": {
            "teacher": {"steps": 1500},
            "degrade": {"steps": 200, "nodes": 4},
            "distill": {"steps": 300, "switch_every": 15},
            "data": {"n_eval": 1000},
            "eval": {"every": 30},
        }
    },
}


def refine_job(name: str, seed: int, student_steps: int, extra: dict, budget: dict, out: str, teacher: str) -> dict:
    """The student, then every variant from it; the result of one (data, seed, K)."""
    torch.set_num_threads(1)
    root = Path(out) / Path(name).stem / f"seed-{seed}" / f"K-{student_steps}"
    base = config(name, seed, extra, budget)
    data = load_data(base.data, seed)
    teacher_value = metrics_for(base, data)(np.load(Path(teacher).parent / "samples.npy"))
    student_cfg = config(name, seed, merge(extra, {"distill": {"steps": student_steps}}), budget)
    student = stages.distill(student_cfg, data, teacher, None, fresh(root / "student"), show_progress=False)
    far = stages.start_far(base, data, teacher, None, generator=root / "student")
    runs, paths = {}, {}
    for variant, (overrides, needs_path, own_fake) in VARIANTS.items():
        cfg = config(name, seed, merge(extra, overrides), budget)
        path, stage1_steps, stage1_wall = None, 0, 0.0
        if needs_path:
            key = f"{cfg.degrade.spacing}-{cfg.degrade.nodes}-{cfg.degrade.plateau:g}"  # one stage 1 per spacing
            if key not in paths:
                begun = time.perf_counter()
                recorded = stages.record_path(
                    cfg, teacher, fresh(root / f"path-{key}"), show_progress=False, generator=root / "student"
                )
                paths[key] = (recorded, recorded.nodes[-1].step, time.perf_counter() - begun)
            path, stage1_steps, stage1_wall = paths[key]
        result = stages.distill(
            cfg,
            data,
            teacher,
            path,
            fresh(root / slug(variant)),
            show_progress=False,
            generator=root / "student",
            fake=root / "student" if own_fake else None,
        )
        runs[variant] = {
            "variant": variant,
            "curve": curve_of(result["records"]),
            "switches": result["switches"],
            "stage1_steps": stage1_steps,
            "stage1_wall_s": round(stage1_wall, 3),
            "path_distance": path.nodes[-1].distance if path else None,
        }
    result = {
        "data": Path(name).stem,
        "seed": seed,
        "K": student_steps,
        "measure": data.measure,
        "teacher": teacher_value,
        "student": curve_of(student["records"])[-1],
        "start_far": far,
        "reference": REFERENCE,
        "runs": runs,
    }
    write_json(root / "result.json", result)
    print(f"{name} seed {seed} K {student_steps}: done", flush=True)
    return result


def cost(result: dict, variant: str, threshold: float) -> tuple[float | None, float | None]:
    """(generator steps + stage-1 steps, wall seconds with stage 1) to first reach ``threshold`` after step 0."""
    run = result["runs"][variant]
    hit = first_reaching([p for p in run["curve"] if p["iteration"] > 0], result["measure"], threshold)
    return (
        (None, None) if hit is None else (hit["iteration"] + run["stage1_steps"], hit["wall_s"] + run["stage1_wall_s"])
    )


def table(results: list[dict]) -> str:
    """Per (data, K): each variant's final over (a)'s, and its cost and speed-up to reach (a)'s final value."""
    lines = []
    for data, k in dict.fromkeys((r["data"], r["K"]) for r in results):
        rows = [r for r in results if (r["data"], r["K"]) == (data, k)]
        m = rows[0]["measure"]
        student = mean_sd([r["student"][m] for r in rows], 3)
        lines += [
            f"### {data}, student after K = {k} steps ({len(rows)} seeds; student {m} {student}, teacher "
            f"{mean_sd([r['teacher'][m] for r in rows], 3)})",
            "",
            f"| run | final {m} | final / (a)'s | steps incl. stage 1 to (a)'s final | wall s incl. stage 1 | "
            "speed-up (steps) | speed-up (wall) |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            finals, rel, steps, walls, sp, sw = [], [], [], [], [], []
            for r in rows:
                goal = r["runs"][REFERENCE]["curve"][-1][m]
                s, w = cost(r, variant, goal)
                bs, bw = cost(r, REFERENCE, goal)
                finals.append(r["runs"][variant]["curve"][-1][m]), rel.append(finals[-1] / goal)
                steps.append(s), walls.append(w), sp.append(ratio(bs, s)), sw.append(ratio(bw, w))
            label = "(a) continue" if variant == REFERENCE else variant
            same = variant == REFERENCE
            lines.append(
                f"| {label} | {mean_sd(finals, 3)} | {mean_sd(rel, 2)} | {mean_sd(steps)} | {mean_sd(walls, 1)} | "
                f"{'' if same else mean_sd(sp, 2, 'n/a')} | {'' if same else mean_sd(sw, 2, 'n/a')} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(args, out: Path) -> list[dict]:
    """Every teacher, then each data set's (seed, K) jobs as soon as its teacher is ready (images, then the longest
    students first)."""
    extra = parse_overrides(args.overrides)
    budget = {name: args.budgets.get(PRESETS.get(name, "toy2d"), {}) for name in args.data}

    def jobs_for(name: str, teacher: str) -> list[tuple]:
        return [
            ((name not in PRESETS, -k), refine_job, (name, seed, k, extra, budget[name], str(out), teacher))
            for seed in args.seeds
            for k in args.data[name]
        ]

    return schedule(list(args.data), extra, budget, out, args.jobs, jobs_for)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ring8, one seed, small budgets: a few minutes")
    parser.add_argument("--data", nargs="+", help="default: ring8 grid25 moons digits (with their K values)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default="runs/refine")
    parser.add_argument("--reuse", action="store_true", help="rebuild the tables from the results in OUT")
    args = parser.parse_args()
    suite = QUICK if args.quick else SUITE
    if args.data:  # the suite's K values for its data sets; an image set not in it takes digits', 2-D data ring8's
        fallback = lambda n: SUITE["data"]["digits"] if n in PRESETS else next(iter(suite["data"].values()))  # noqa: E731
        args.data = {n: suite["data"].get(n) or fallback(n) for n in args.data}
    else:
        args.data = suite["data"]
    args.seeds, args.budgets = args.seeds or suite["seeds"], suite["budgets"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    if args.reuse:
        results = [json.loads(f.read_text()) for f in sorted(out.glob("*/seed-*/K-*/result.json"))]
    else:
        results = run(args, out)
    results.sort(key=lambda r: (r["data"], r["K"], r["seed"]))
    write_results(out, results, begun)
    text = table(results)
    write_text(out / "table.md", text + "\n")
    print(text)
    print(f"elapsed {time.perf_counter() - begun:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
