"""The main job: teacher -> degradation path -> DisBack and the baseline, same seeds and budgets -> report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from disback import stages
from disback.config import Config
from disback.data import load_data
from disback.errors import DisbackError
from disback.runfolder import begin_stage
from disback.train import read_metrics
from disback.weights import save_array, write_json

MARKER = "run.json"


def prepare_out(cfg: Config, out: Path, resume: bool) -> None:
    """A folder that holds anything but a demo is refused; a demo folder is continued with --resume (same config)
    and refused otherwise (--overwrite clears it first, in the CLI)."""
    if out.exists() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.is_file() or json.loads(marker.read_text()).get("kind") != "demo":
            raise DisbackError(f"{out} is not empty and was not made by `disback demo`; choose another --out")
    begin_stage(cfg, out, resume)
    write_json(out / MARKER, {"kind": "demo"})


def first_reaching(curve: list[dict], key: str, threshold: float) -> dict | None:
    return next((r for r in curve if r[key] <= threshold), None)


def curve_of(records: list[dict]) -> list[dict]:
    keep = ("iteration", "wall_s", "target_node", "swd", "mmd", "modes", "high_quality", "fid")
    return [{k: r[k] for k in keep if k in r} for r in records]


FACTORS = (4.0, 3.0, 2.0, 1.5)  # thresholds (x the teacher's SWD) reported besides the configured one


def speedup(factor: float, measure: str, teacher_value: float, disback: dict, baseline: dict) -> dict[str, Any]:
    """Iterations (generator steps) and wall time to reach ``factor`` x the teacher's value of ``measure``."""
    threshold = factor * teacher_value
    hit_d = first_reaching(disback["curve"], measure, threshold)
    hit_b = first_reaching(baseline["curve"], measure, threshold)
    out: dict[str, Any] = {
        "threshold_factor": factor,
        f"threshold_{measure}": threshold,
        "iterations_disback": hit_d["iteration"] if hit_d else None,
        "iterations_baseline": hit_b["iteration"] if hit_b else None,
        "iterations_disback_with_stage1": hit_d["iteration"] + disback["stage1_steps"] if hit_d else None,
        "wall_s_disback_with_stage1": hit_d["wall_s"] + disback["stage1_wall_s"] if hit_d else None,
        "wall_s_baseline": hit_b["wall_s"] if hit_b else None,
    }
    # A ratio needs both runs to have trained to get there (at iteration 0 the two generators are the same one).
    if hit_d and hit_b and hit_d["iteration"] > 0 and hit_b["iteration"] > 0:
        out["speedup_iterations"] = hit_b["iteration"] / hit_d["iteration"]
        out["speedup_with_stage1"] = hit_b["iteration"] / out["iterations_disback_with_stage1"]
        out["speedup_wall_with_stage1"] = hit_b["wall_s"] / out["wall_s_disback_with_stage1"]
    return out


def speedups(summary: dict[str, Any], factor: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The configured threshold's result, and the same for each of FACTORS."""
    measure = summary["measure"]
    args = (measure, summary["teacher"][measure], summary["runs"]["disback"], summary["runs"]["baseline"])
    return speedup(factor, *args), {f"{f:g}": speedup(f, *args) for f in FACTORS}


def run_demo(cfg: Config, out: Path, show_progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """The main job. With ``resume``, finished stages are read back and an interrupted one continues from its
    latest checkpoint, so a killed demo rerun with --resume ends as an uninterrupted one would have."""
    begun = time.perf_counter()
    out = Path(out)
    prepare_out(cfg, out, resume)
    data = load_data(cfg.data, cfg.seed)
    save_array(out / "reference.npy", data.reference[: cfg.data.n_eval])  # the report's "data" panel
    measure = stages.metrics_for(cfg, data)

    teacher_file = stages.train_teacher(cfg, data, out / "teacher", show_progress, resume)
    teacher = measure(np.load(out / "teacher" / "samples.npy"))

    path = stages.record_path(cfg, teacher_file, out / "path", show_progress, resume)
    stage1_wall = read_metrics(out / "path" / "metrics.jsonl")[-1]["wall_s"]  # training and probes, not evaluation
    stage1_steps = path.nodes[-1].step

    runs: dict[str, dict[str, Any]] = {}
    for name, run_path in (("disback", path), ("baseline", None)):
        result = stages.distill(cfg, data, teacher_file, run_path, out / name, show_progress, resume)
        runs[name] = {"curve": curve_of(result["records"]), "switches": result["switches"], "nodes": result["nodes"]}
        runs[name]["final"] = {k: v for k, v in runs[name]["curve"][-1].items() if k not in ("iteration", "wall_s", "target_node")}
    runs["disback"].update(stage1_steps=stage1_steps, stage1_wall_s=round(stage1_wall, 3))

    summary = {
        "data": data.name,
        "measure": data.measure,
        "seed": cfg.seed,
        "teacher": teacher,
        "initial_generator": {k: v for k, v in runs["baseline"]["curve"][0].items() if k in teacher},
        "budgets": {
            "teacher": f"pretrained '{cfg.teacher.pretrained}' (VP, imported)" if cfg.teacher.pretrained else f"an EDM denoiser ({cfg.network.kind})",
            "teacher_steps": 0 if cfg.teacher.pretrained else cfg.teacher.steps,
            "stage1_steps": stage1_steps,
            "nodes": len(path),
            "generator_steps": cfg.distill.steps,
            "fake_updates_per_generator_step": cfg.distill.fake_updates,
            "reuse_samples": cfg.distill.reuse_samples,
            "method": cfg.distill.method,
            "node_spacing": cfg.degrade.spacing,
            "target_schedule": cfg.distill.schedule,
            "switch_every": cfg.distill.switch_every if cfg.distill.schedule == "fixed" else None,
            "dwell": list(stages.dwell_bounds(cfg, len(path))) if cfg.distill.schedule == "adaptive" else None,
            "batch": cfg.distill.batch,
            "eval_every": cfg.eval.every,
            "eval_samples": cfg.data.n_eval,
        },
        "runs": runs,
    }
    if data.kind == "images":
        summary["features"] = {k: v for k, v in measure.info.items() if k != "file"}
    summary["speedup"], summary["speedup_by_factor"] = speedups(summary, cfg.eval.threshold_factor)
    summary["elapsed_s"] = round(time.perf_counter() - begun, 1)  # the whole job: teacher, both runs, evaluations
    write_json(out / "summary.json", summary)
    return summary
