"""What do extra generator steps buy? k-step generators (distill.sigma_g a list) against the one-step one; and a LoRA
generator (network.generator_lora_rank) against the full one. Both run on convergence.py's machinery.

    .venv/bin/python benchmarks/fewstep.py --jobs 2 --out runs/fewstep                  # 1, 2, 4 steps; ~18 min here
    .venv/bin/python benchmarks/fewstep.py --quick --out runs/fewstep-q                 # ring8, 1 seed: ~1.5 min
    .venv/bin/python benchmarks/fewstep.py --suite lora --jobs 2 --out runs/lora-generator   # ~7 min + the teacher
    .venv/bin/python benchmarks/fewstep.py --suite lora --quick --out runs/lora-generator-q  # ~4 min

--arms and --variants pick a subset (e.g. --data digits --variants baseline --set distill.steps=450: a longer look);
runs into an existing OUT reuse its teachers (OUT/<data>/teacher), so a teacher folder copied in is not retrained.

fewstep: ring8, grid25 and digits, seeds 0-2, the baseline and warm-start variants (convergence.VARIANTS) of DMD, at
the methods suite's budgets, for a generator of 1, 2 and 4 steps (LEVELS). Every step count starts at the one-step
generator's level (the preset's 2.5), so only the extra steps differ. Warm start records its own stage 1 toward the
k-step initial generator. One teacher per data set (seed 0) is shared by every run.

lora: digits, seeds 0-2, the one-step baseline with a full generator and with LoRA generators of rank 4 and 16, at the
full generator's learning rate and at a higher one (rank 16 at 5x, rank 4 at 20x).

Per run it records the curve, the final value, wall seconds per generator iteration (training only, evaluation not
counted), and the generator iterations and wall seconds (stage 1 counted) to reach 4x, 3x and 2x the teacher's value
and the one-step baseline's (the full generator's) final value of the same seed. Afterwards, in this process alone
and with one thread (as each worker has), it times sampling: seed 0's trained generator of each arm drawing 2,000
samples in eval mode under no_grad (disback's own evaluation path: ``in_batches(with_steps(generator))``), the
median of 5 repeats after a warm-up; and the teacher's Heun sampler at the preset's step count for scale. The lora
suite also counts the generator's trained parameters and the bytes of its trainable state (parameters, gradients and
Adam's two moments). OUT/results.json holds everything; OUT/table.md the tables; OUT/curves-<data>.png the curves.
--reuse rebuilds the tables (and retimes sampling) from OUT's finished jobs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # convergence.py beside this file

import convergence as cv  # noqa: E402
from disback.config import merge, parse_overrides  # noqa: E402
from disback.jobs.summary import first_reaching  # noqa: E402
from disback.storage.files import write_json, write_text  # noqa: E402

# Noise levels per step count. All start at 2.5 (the presets' one-step sigma_g). 4 steps: EDM's Karras spacing
# (rho 7) from 2.5 down to 0.1, rounded (exact: 2.5, 0.999, 0.347, 0.1). 2 steps: the second level at 0.5, the
# geometric midpoint of that range (sqrt(2.5 * 0.1)). In the networks' standardised units 2.5 is far above the 2-D
# modes' spacing (ring8 1.08, grid25 0.71) and 5 sigma_data on digits (sigma_data 0.5): the first step picks the
# mode; 0.5 is about the modes' spacing and sigma_data (a second step can still move a point between modes or strokes);
# 0.1 is above the 2-D modes' width (0.035) and is fine detail on digits.
LEVELS = {1: 2.5, 2: [2.5, 0.5], 4: [2.5, 1.0, 0.35, 0.1]}
LORA = {  # arm -> overrides (one-step baseline)
    "full generator": {},
    "LoRA rank 4": {"network": {"generator_lora_rank": 4}},
    "LoRA rank 16": {"network": {"generator_lora_rank": 16}},
    # adapters start with one factor at zero and learn slowly at the full network's rate (BENCHMARKS.md, memory
    # savers: a LoRA fake score needed 5x); this arm tells a lack of capacity from a lack of speed
    "LoRA rank 16, 5x lr": {"network": {"generator_lora_rank": 16}, "distill": {"lr_generator": 2.5e-4}},
    "LoRA rank 4, 20x lr": {"network": {"generator_lora_rank": 4}, "distill": {"lr_generator": 1e-3}},
}
METHODS_BUDGETS = cv.SUITES["methods"]["budgets"]
QUICK = merge(cv.QUICK, {"distill": {"steps": 300}})
SUITES = {
    "fewstep": {
        "data": ["ring8", "grid25", "digits"],
        "seeds": [0, 1, 2],
        "arms": {f"{k} step{'s' if k > 1 else ''}": {"distill": {"sigma_g": s}} for k, s in LEVELS.items()},
        "variants": ["baseline", "warm start"],
        # the methods suite's budgets; 2-D evaluated every 25 steps instead of 50 (finer thresholds, same training)
        "budgets": merge(METHODS_BUDGETS, {"toy2d": {"eval": {"every": 25}}}),
    },
    "lora": {
        "data": ["digits"],
        "seeds": [0, 1, 2],
        "arms": LORA,
        "variants": ["baseline"],
        "budgets": METHODS_BUDGETS,
    },
}
SUITES["fewstep-quick"] = {**SUITES["fewstep"], "data": ["ring8"], "seeds": [0], "budgets": {"toy2d": QUICK}}
SUITES["lora-quick"] = {
    **SUITES["lora"],
    "seeds": [0],
    "budgets": {"digits": merge(METHODS_BUDGETS["digits"], {"teacher": {"steps": 300}, "distill": {"steps": 30}})},
}
SAMPLES, REPEATS = 2000, 5  # sampling time: samples, timed repeats
TIMING, ROUNDS = {"toy2d": 100, "digits": 20}, 5  # cost per iteration measured apart: iterations per run, rounds


# ---------------------------------------------------------------- jobs


def arm_job(
    name: str,
    seed: int,
    arm: str,
    arm_overrides: dict,
    extra: dict,
    budget: dict,
    out: str,
    teacher: str,
    variants: list[str],
) -> dict:
    """convergence.seed_job for one arm (a step count, or a generator kind) in a folder of its own; its runs named
    "arm: variant", the arm's settings and start-far diagnostic kept per run."""
    part = cv.seed_job(
        name, seed, merge(extra, arm_overrides), budget, str(Path(out) / cv.slug(arm)), teacher, variants, "dmd", False
    )
    runs = {}
    for variant, run in part["runs"].items():
        run.update(arm=arm, sigma_g=part["sigma_g"], start_far=part["start_far"])
        run["folder"] = str(Path(out) / cv.slug(arm) / part["data"] / f"seed-{seed}" / "dmd" / cv.slug(variant))
        runs[f"{arm}: {variant}"] = run
    result = {**{k: v for k, v in part.items() if k not in ("sigma_g", "start_far")}, "runs": runs}
    write_json(Path(out) / part["data"] / f"seed-{seed}" / f"{cv.slug(arm)}.json", result)
    return result


def run(args, suite: dict, out: Path) -> list[dict]:
    extra = parse_overrides(args.overrides)
    budget = {name: suite["budgets"].get(cv.preset_of(name), {}) for name in args.data}
    arms = list(suite["arms"])

    def jobs_for(name: str, teacher: str) -> list[tuple]:
        return [
            (
                (name not in cv.PRESETS, -i),  # images first, then the longest arm (the most steps) first
                arm_job,
                (name, seed, arm, suite["arms"][arm], extra, budget[name], str(out), teacher, suite["variants"]),
            )
            for seed in args.seeds
            for i, arm in enumerate(arms)
        ]

    return cv.merge_results(cv.schedule(args.data, extra, budget, out, args.jobs, jobs_for))


# ---------------------------------------------------------------- measurements


def reference_key(result: dict) -> str:
    """The first arm's baseline: the one-step generator, or the full one."""
    return next(k for k, r in result["runs"].items() if r["variant"] == "baseline")


def run_stats(result: dict, key: str) -> dict:
    """What one run reached, and when: per threshold the generator iterations, and the wall seconds with stage 1."""
    run, m = result["runs"][key], result["measure"]
    curve = run["curve"]
    levels = {f"{f:g}x teacher": f * result["teacher"][m] for f in cv.FACTORS}
    levels["1-step final"] = result["runs"][reference_key(result)]["curve"][-1][m]
    reach = {}
    for label, value in levels.items():
        hit = first_reaching(curve, m, value)
        reach[label] = (
            {"iteration": None, "wall_s": None}
            if hit is None
            else {"iteration": hit["iteration"], "wall_s": round(hit["wall_s"] + run["stage1_wall_s"], 3)}
        )
    return {
        "initial": curve[0][m],
        "final": curve[-1][m],
        "best": min(p[m] for p in curve),
        "wall_per_iteration_ms": 1000 * curve[-1]["wall_s"] / curve[-1]["iteration"],
        "stage1_wall_s": run["stage1_wall_s"],
        "reach": reach,
    }


def sampling_times(results: list[dict], out: Path, arms: list[str], extra: dict, budgets: dict) -> list[dict]:
    """Seed 0's trained baseline generator of each arm, per data set: seconds per sample over SAMPLES, one thread;
    and the teacher's Heun sampler at its config's step count."""
    from disback.diffusion.generator import with_steps
    from disback.diffusion.sampling import churn_of, karras_schedule
    from disback.stages.common import in_batches
    from disback.storage.models import load_model

    torch.set_num_threads(1)
    rows = []
    for data in dict.fromkeys(r["data"] for r in results):
        first = min((r for r in results if r["data"] == data), key=lambda r: r["seed"])
        for arm in arms:
            run = first["runs"].get(f"{arm}: baseline")
            if run is None:
                continue
            model, meta = load_model(Path(run["folder"]) / "generator.safetensors")
            model.eval()
            k = getattr(model, "steps", 1)
            z = torch.randn(SAMPLES, k, *meta.shape, generator=torch.Generator().manual_seed(0))
            labels = torch.arange(SAMPLES) % meta.num_classes if meta.num_classes else None
            seconds = timed(in_batches, REPEATS, with_steps(model), z, labels)
            rows.append(row(data, arm, k, seconds))
        model, meta = load_model(out / data / "teacher" / "teacher.safetensors")
        model.eval()
        edm = meta.edm
        heun = cv.config(data, 0, extra, budgets.get(cv.preset_of(data), {})).teacher.heun_steps
        sigmas = karras_schedule(heun, edm["sigma_min"], edm["sigma_max"], edm["rho"])
        z = torch.randn(SAMPLES, *meta.shape, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(SAMPLES) % meta.num_classes if meta.num_classes else None
        churn = churn_of(edm) | {"seed": 0}
        seconds = timed(in_batches, 1, partial(heun_batch, model, sigmas, churn), z, labels)
        rows.append(row(data, f"teacher (Heun, {heun} steps)", 2 * heun - 1, seconds))
    return rows


def iteration_costs(results: list[dict], out: Path, arms: dict, extra: dict, budgets: dict) -> list[dict]:
    """Wall ms per generator iteration of each arm's baseline, measured apart from the suite: short runs (TIMING
    iterations) in this process, one thread, the arms interleaved for ROUNDS rounds and the fastest round kept, so
    that load from other work on the machine disturbs every arm alike and the least."""
    import tempfile

    from disback import stages
    from disback.data import load_data

    torch.set_num_threads(1)
    times: dict[tuple[str, str], list[float]] = {}
    datas = list(dict.fromkeys(r["data"] for r in results))
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(ROUNDS):
            for data in datas:
                n = TIMING[cv.preset_of(data)]
                short = {"distill": {"steps": n}, "eval": {"every": n}, "run": {"checkpoint_every": 0}}
                for arm, overrides in arms.items():
                    cfg = cv.config(data, 0, merge(merge(extra, overrides), short), budgets.get(cv.preset_of(data), {}))
                    teacher = out / data / "teacher" / "teacher.safetensors"
                    folder = Path(tmp) / f"{data}-{cv.slug(arm)}-{round_}"
                    result = stages.distill(cfg, load_data(cfg.data, 0), teacher, None, folder, show_progress=False)
                    last = result["records"][-1]
                    times.setdefault((data, arm), []).append(1000 * last["wall_s"] / last["iteration"])
    return [
        {
            "data": d,
            "arm": a,
            "iterations": TIMING[cv.preset_of(d)],
            "ms_per_iteration": round(min(t), 2),
            "rounds_ms": [round(x, 2) for x in t],
        }
        for (d, a), t in times.items()
    ]


def heun_batch(model, sigmas: torch.Tensor, churn: dict, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    from disback.diffusion.sampling import heun_sample

    return heun_sample(model, z, sigmas, labels, **churn)


def timed(fn, repeats: int, *args) -> float:
    with torch.no_grad():
        fn(*args)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def row(data: str, arm: str, calls: int, seconds: float) -> dict:
    return {
        "data": data,
        "sampler": arm,
        "network_calls": calls,
        "samples": SAMPLES,
        "seconds": round(seconds, 4),
        "us_per_sample": round(1e6 * seconds / SAMPLES, 2),
    }


def generator_state(results: list[dict], out: Path, arms: dict, extra: dict, budgets: dict) -> list[dict]:
    """The generator's trained parameters and the bytes of its trainable state (parameters + gradients + Adam's two
    moments, float32), built as the distillation stage builds it; and the fake score's, for the whole step's state."""
    from disback.method.lora import fake_and_target, trainable_generator
    from disback.stages.common import load_teacher
    from disback.storage.kinds import kind_of
    from disback.storage.models import generator_from_teacher

    rows = []
    for data in dict.fromkeys(r["data"] for r in results):
        first = min((r for r in results if r["data"] == data), key=lambda r: r["seed"])
        for arm, overrides in arms.items():
            run = first["runs"].get(f"{arm}: baseline")
            if run is None:
                continue
            cfg = cv.config(data, 0, merge(extra, overrides), budgets.get(cv.preset_of(data), {}))
            teacher, meta = load_teacher(out / data / "teacher" / "teacher.safetensors")
            rank = cfg.network.generator_lora_rank
            if rank:
                gen = trainable_generator(kind_of(meta).generator(teacher, meta, cfg.distill.sigma_g), rank, 0)
            else:
                gen = generator_from_teacher(teacher, meta, cfg.distill.sigma_g)
            fake, _ = fake_and_target(teacher, cfg.network.lora_rank, 1)
            trained = [p for p in gen.parameters() if p.requires_grad]
            fake_trained = [p for p in fake.parameters() if p.requires_grad]
            nbytes = sum(p.numel() * p.element_size() for p in trained)
            rows.append(
                {
                    "data": data,
                    "arm": arm,
                    "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
                    "generator_trained_parameters": sum(p.numel() for p in trained),
                    "generator_state_bytes": 4 * nbytes,  # parameters, gradients, Adam's two moments
                    "fake_state_bytes": 4 * sum(p.numel() * p.element_size() for p in fake_trained),
                }
            )
    return rows


# ---------------------------------------------------------------- tables


def fmt(values: list, digits: int = 0, missing: str = "never") -> str:
    return cv.mean_sd(values, digits, missing)


def run_table(results: list[dict]) -> str:
    lines = []
    for data in dict.fromkeys(r["data"] for r in results):
        rows = [r for r in results if r["data"] == data]
        m = rows[0]["measure"]
        teacher = statistics.mean(r["teacher"][m] for r in rows)
        lines += [
            f"### {data} ({len(rows)} seed{'s' if len(rows) > 1 else ''}, measure {m}; teacher {teacher:.4g}; "
            "mean ± sd over seeds, (k/n) when only k of n runs got there)",
            "",
            f"| run | levels | initial {m} | final {m} | best {m} | ms / iteration (in the suite) | stage 1 s "
            "| iterations to 2x teacher | wall s to 2x teacher | iterations to 1-step final "
            "| wall s to 1-step final |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key in dict.fromkeys(k for r in rows for k in r["runs"]):
            have = [r for r in rows if key in r["runs"]]
            stats = [run_stats(r, key) for r in have]
            levels = have[0]["runs"][key].get("sigma_g")
            cells = [
                key,
                str(levels),
                fmt([s["initial"] for s in stats], 3),
                fmt([s["final"] for s in stats], 3),
                fmt([s["best"] for s in stats], 3),
                fmt([s["wall_per_iteration_ms"] for s in stats], 1),
                fmt([s["stage1_wall_s"] for s in stats], 1),
                fmt([s["reach"]["2x teacher"]["iteration"] for s in stats]),
                fmt([s["reach"]["2x teacher"]["wall_s"] for s in stats], 1),
                fmt([s["reach"]["1-step final"]["iteration"] for s in stats]),
                fmt([s["reach"]["1-step final"]["wall_s"] for s in stats], 1),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"To 4x and 3x the teacher ({data}): generator iterations; wall s with stage 1", ""]
        lines += [
            "| run | iterations to 4x | wall s to 4x | iterations to 3x | wall s to 3x |",
            "|---|---|---|---|---|",
        ]
        for key in dict.fromkeys(k for r in rows for k in r["runs"]):
            stats = [run_stats(r, key) for r in rows if key in r["runs"]]
            cells = [key]
            for label in ("4x teacher", "3x teacher"):
                cells += [
                    fmt([s["reach"][label]["iteration"] for s in stats]),
                    fmt([s["reach"][label]["wall_s"] for s in stats], 1),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    lines = [
        f"Wall ms per generator iteration, measured apart (baseline variant, {ROUNDS} interleaved rounds of short runs "
        "in one process, one thread; the fastest round, then every round's):",
        "",
        "| data | run | iterations per round | ms / iteration (fastest) | x the first arm's | every round |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = next(x for x in rows if x["data"] == r["data"])
        lines.append(
            f"| {r['data']} | {r['arm']} | {r['iterations']} | {r['ms_per_iteration']:.1f} "
            f"| {r['ms_per_iteration'] / first['ms_per_iteration']:.2f} | {', '.join(f'{x:.1f}' for x in r['rounds_ms'])} |"
        )
    return "\n".join(lines)


def sampling_table(rows: list[dict]) -> str:
    lines = [
        f"Sampling, seed 0's trained generator: {SAMPLES} samples in batches of 500, eval mode, no_grad, one thread; "
        f"median of {REPEATS} after a warm-up (the teacher's Heun sampler: one timed run).",
        "",
        "| data | sampler | network calls per sample | s for 2,000 | µs per sample |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['sampler']} | {r['network_calls']} | {r['seconds']:.3f} | {r['us_per_sample']:.1f} |"
        )
    return "\n".join(lines)


def state_table(rows: list[dict]) -> str:
    lines = [
        "Trained state (float32; parameters + gradients + Adam's two moments = 4 x 4 bytes per trained parameter):",
        "",
        "| data | generator | teacher parameters | generator's trained parameters | generator state KB "
        "| fake score state KB | generator + fake state KB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['arm']} | {r['teacher_parameters']:,} | {r['generator_trained_parameters']:,} "
            f"| {r['generator_state_bytes'] / 1e3:.1f} | {r['fake_state_bytes'] / 1e3:.1f} "
            f"| {(r['generator_state_bytes'] + r['fake_state_bytes']) / 1e3:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], out: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for data in dict.fromkeys(r["data"] for r in results):
        rows = [r for r in results if r["data"] == data]
        m = rows[0]["measure"]
        keys = list(dict.fromkeys(k for r in rows for k in r["runs"]))
        arms = list(dict.fromkeys(k.split(": ")[0] for k in keys))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key in keys:
            arm, variant = key.split(": ")
            style = {"color": f"C{arms.index(arm)}", "ls": "-" if variant == "baseline" else "--", "alpha": 0.7}
            for j, r in enumerate(r for r in rows if key in r["runs"]):
                run = r["runs"][key]
                x = [p["iteration"] for p in run["curve"]]
                w = [p["wall_s"] + run["stage1_wall_s"] for p in run["curve"]]
                y = [p[m] for p in run["curve"]]
                axes[0].plot(x, y, label=key if j == 0 else None, **style)
                axes[1].plot(w, y, **style)
        for ax, xlabel in zip(axes, ("generator iterations", "wall s (training, stage 1 counted)")):
            ax.axhline(2 * statistics.mean(r["teacher"][m] for r in rows), color="k", ls=":", label="2x teacher")
            ax.set(yscale="log", xlabel=xlabel, ylabel=m)
        axes[0].set_title(f"{data}: every seed")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        name = f"{prefix}curves-{data}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="fewstep", choices=["fewstep", "lora"])
    parser.add_argument("--quick", action="store_true", help="one seed, small budgets: a few minutes")
    parser.add_argument("--data", nargs="+", help="default: the suite's")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the suite's")
    parser.add_argument("--arms", nargs="+", help="default: all the suite's (fewstep: '1 step' '2 steps' '4 steps')")
    parser.add_argument("--variants", nargs="+", choices=list(cv.VARIANTS), help="default: the suite's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=1, help="jobs in parallel processes, one thread each")
    parser.add_argument("--out", default="runs/fewstep")
    parser.add_argument("--reuse", action="store_true", help="rebuild the tables from the finished jobs in OUT")
    args = parser.parse_args()
    suite = SUITES[args.suite + ("-quick" if args.quick else "")]
    if args.arms:
        unknown = set(args.arms) - set(suite["arms"])
        if unknown:
            parser.error(f"--arms: {sorted(unknown)} not in {list(suite['arms'])}")
        suite = {**suite, "arms": {a: suite["arms"][a] for a in args.arms}}
    if args.variants:
        suite = {**suite, "variants": ["baseline"] + [v for v in args.variants if v != "baseline"]}
    args.data, args.seeds = args.data or suite["data"], args.seeds or suite["seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    if args.reuse:
        parts = [json.loads(f.read_text()) for f in sorted(out.glob("*/seed-*/*.json"))]
        order = {cv.slug(a): i for i, a in enumerate(suite["arms"])}
        parts.sort(key=lambda p: order.get(cv.slug(next(iter(p["runs"].values()))["arm"]), 99))
        results = cv.merge_results(parts)
    else:
        results = run(args, suite, out)
    trained_s = round(time.perf_counter() - begun)
    results = [{**r, "runs": dict(sorted(r["runs"].items(), key=lambda kv: order_key(kv[0], suite)))} for r in results]
    results.sort(key=lambda r: (args.data.index(r["data"]) if r["data"] in args.data else 99, r["seed"]))
    extra = parse_overrides(args.overrides)
    sampling = sampling_times(results, out, list(suite["arms"]), extra, suite["budgets"])
    state = generator_state(results, out, suite["arms"], extra, suite["budgets"]) if args.suite == "lora" else []
    cost = iteration_costs(results, out, suite["arms"], extra, suite["budgets"])
    for r in results:
        for key in r["runs"]:
            r["runs"][key]["stats"] = run_stats(r, key)
    text = "\n\n".join(
        [run_table(results), cost_table(cost), sampling_table(sampling)]
        + ([state_table(state)] if args.suite == "lora" else [])
    )
    write_text(out / "table.md", text + "\n")
    write_json(
        out / "results.json",
        {
            "command": " ".join(sys.argv),
            "machine": cv.machine(),
            "date": time.strftime("%Y-%m-%d"),
            "elapsed_s": round(time.perf_counter() - begun),
            "training_s": trained_s,
            "levels": {str(k): v for k, v in LEVELS.items()} if args.suite == "fewstep" else None,
            "budgets": suite["budgets"],
            "iteration_cost": cost,
            "sampling": sampling,
            "generator_state": state if args.suite == "lora" else None,
            "results": results,
        },
    )
    plot(results, out, "")
    print(text)


def order_key(key: str, suite: dict) -> tuple:
    arm, variant = key.split(": ")
    arms, variants = list(suite["arms"]), suite["variants"]
    return (arms.index(arm) if arm in arms else 99, variants.index(variant) if variant in variants else 99)


if __name__ == "__main__":
    main()
