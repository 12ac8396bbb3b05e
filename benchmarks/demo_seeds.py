"""Run `disback demo` over several seeds and data sets, and tabulate DisBack against the baseline.

    .venv/bin/python benchmarks/demo_seeds.py --data ring8 moons --seeds 0 1 2 --out runs/bench

Each run is a full demo folder, runs/bench/<data>/seed-<k>/. The Markdown tables (printed, and saved as
runs/bench/table.md) go into BENCHMARKS.md and the README. --reuse recomputes the tables from demo folders that
already hold a summary.json instead of training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch

from disback.config import build_config, parse_overrides
from disback.jobs.demo import run_demo
from disback.jobs.report import write_report
from disback.jobs.summary import FACTORS, Summary
from disback.storage.files import write_text


def fmt(v, digits=3):
    return "never" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def mean_sd(values):
    """'mean ± sd (k/n)' over the values that are not None; k/n says how many runs reached the threshold."""
    got = [v for v in values if v is not None]
    if not got:
        return f"never (0/{len(values)})"
    mean, sd = statistics.mean(got), statistics.stdev(got) if len(got) > 1 else 0.0
    text = f"{mean:.0f} ± {sd:.0f}" if mean >= 100 else f"{mean:.3g} ± {sd:.2g}"
    return f"{text} ({len(got)}/{len(values)})"


def run_all(args) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for name in args.data:
        for seed in args.seeds:
            overrides = parse_overrides(args.overrides)
            overrides.update(seed=seed, data={**overrides.get("data", {}), "name": name})
            cfg = build_config(args.preset, overrides=overrides)
            out = Path(args.out) / Path(name).stem / f"seed-{seed}"
            if args.reuse and (out / "summary.json").is_file():
                summary = Summary.read(out).with_speedups(cfg.eval.threshold_factor)
                summary.write(out)
            else:
                summary = run_demo(cfg, out, show_progress=False)
            write_report(out)
            results.setdefault(Path(name).stem, []).append(dataclasses.asdict(summary))
            print(f"{name} seed {seed}: done", flush=True)
    return results


def tables(results: dict[str, list[dict]]) -> str:
    m = next(iter(results.values()))[0]["measure"]  # "swd" for points, "fid" for images
    M = m.upper()
    head = [
        "data",
        "seed",
        f"teacher {M}",
        f"baseline final {M}",
        f"DisBack final {M}",
        "baseline iters",
        "DisBack iters",
        "DisBack iters + stage 1",
        "baseline wall s",
        "DisBack wall s + stage 1",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        for s in runs:
            sp = s["speedup"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        str(s["seed"]),
                        fmt(s["teacher"][m]),
                        fmt(s["runs"]["baseline"]["final"][m]),
                        fmt(s["runs"]["disback"]["final"][m]),
                        fmt(sp["iterations_baseline"]),
                        fmt(sp["iterations_disback"]),
                        fmt(sp["iterations_disback_with_stage1"]),
                        fmt(sp["wall_s_baseline"]),
                        fmt(sp["wall_s_disback_with_stage1"]),
                    ]
                )
                + " |"
            )
    factor = next(iter(results.values()))[0]["speedup"]["threshold_factor"]
    text = f"Per run, threshold {M} <= {factor:g} x the teacher's:\n\n" + "\n".join(lines)

    head = [
        "data",
        "threshold",
        "baseline iters",
        "DisBack iters",
        "DisBack iters + stage 1",
        "baseline wall s",
        "DisBack wall s + stage 1",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        for f in FACTORS:
            sps = [s["speedup_by_factor"][f"{f:g}"] for s in runs]
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        f"{f:g}x teacher",
                        *(
                            mean_sd([x[k] for x in sps])
                            for k in (
                                "iterations_baseline",
                                "iterations_disback",
                                "iterations_disback_with_stage1",
                                "wall_s_baseline",
                                "wall_s_disback_with_stage1",
                            )
                        ),
                    ]
                )
                + " |"
            )
    text += "\n\nMean ± sd over seeds (k/n: runs that reached the threshold within the budget):\n\n" + "\n".join(lines)

    extra = [k for k in ("mmd",) if k in next(iter(results.values()))[0]["teacher"]]
    head = ["data", f"teacher {M}", f"baseline final {M}", f"DisBack final {M}"] + [
        f"{r} final {k.upper()}" for k in extra for r in ("baseline", "DisBack")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    mean_sd([s["teacher"][m] for s in runs]),
                    *(mean_sd([s["runs"][r]["final"][m] for s in runs]) for r in ("baseline", "disback")),
                    *(
                        mean_sd([s["runs"][r]["final"][k] for s in runs])
                        for k in extra
                        for r in ("baseline", "disback")
                    ),
                ]
            )
            + " |"
        )
    return text + "\n\nFinal quality, mean ± sd over seeds:\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["ring8"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="toy2d")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--reuse", action="store_true", help="reuse demo folders that already hold a summary.json")
    args = ap.parse_args()
    started = time.time()
    text = tables(run_all(args))
    text += (
        f"\n\nPreset {args.preset}, overrides: {' '.join(args.overrides) or 'none'}. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. This command took {time.time() - started:.0f} s.\n"
    )
    write_text(Path(args.out) / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
