"""summary.json: the result of a demo (DisBack against the baseline), one typed schema that the demo writes and the
report and the benchmarks read; and the arithmetic of "how fast did each run get there"."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disback.errors import DisbackError
from disback.storage.files import write_json

SUMMARY = "summary.json"
FACTORS = (4.0, 3.0, 2.0, 1.5)  # thresholds (x the teacher's value) reported besides the configured one
CURVE_KEYS = ("iteration", "wall_s", "target_node", "swd", "mmd", "modes", "high_quality", "fid")


@dataclass
class RunSummary:
    """One distillation run: its evaluation curve, target switches, path length and final measures."""

    curve: list[dict[str, Any]]  # one point per evaluation: iteration, wall_s (training only), target_node, measures
    switches: list[int]
    nodes: int
    final: dict[str, float]  # the last evaluation's measures
    stage1_steps: int = 0  # DisBack: stage 1's cost, counted in its speed-up
    stage1_wall_s: float = 0.0

    @classmethod
    def from_records(cls, records: list[dict], switches: list[int], nodes: int, **stage1: Any) -> "RunSummary":
        curve = curve_of(records)
        final = {k: v for k, v in curve[-1].items() if k not in ("iteration", "wall_s", "target_node")}
        return cls(curve, list(switches), nodes, final, **stage1)


@dataclass
class Budgets:
    """What ran: the budgets and choices of both runs."""

    teacher: str
    teacher_steps: int
    stage1_steps: int
    nodes: int
    generator_steps: int
    fake_updates_per_generator_step: int
    reuse_samples: bool
    method: str
    node_spacing: str
    target_schedule: str
    switch_every: int | None
    dwell: list[int] | None
    batch: int
    eval_every: int
    eval_samples: int
    initial_generator: str | None = None  # --generator: where the generator came from (None: the teacher's copy)
    initial_fake: str | None = None  # --fake: where the fake score came from (None: the path's last node / teacher)
    generator_levels: list[float] | None = None  # the generator's noise levels: one (a one-step generator) or k
    step_input: str = "simulate"  # k steps: how a trained step's input was made (distill.step_input)


@dataclass
class Speedup:
    """Generator steps and wall time for each run to first reach ``threshold`` (factor x the teacher's value), and
    the baseline's cost over DisBack's (above 1: DisBack is faster; stage 1 counted where it says so)."""

    threshold_factor: float
    threshold: float
    iterations_disback: int | None
    iterations_baseline: int | None
    iterations_disback_with_stage1: int | None
    wall_s_disback_with_stage1: float | None
    wall_s_baseline: float | None
    speedup_iterations: float | None = None
    speedup_with_stage1: float | None = None
    speedup_wall_with_stage1: float | None = None


@dataclass
class Summary:
    data: str
    measure: str  # the headline measure: "swd" for points, "fid" for images
    seed: int
    teacher: dict[str, float]  # the teacher's measures (EDM Heun sampler)
    initial_generator: dict[str, float]
    budgets: Budgets
    runs: dict[str, RunSummary]  # "disback" and "baseline"
    speedup: Speedup | None = None  # at eval.threshold_factor
    speedup_by_factor: dict[str, Speedup] = field(default_factory=dict)  # at each of FACTORS
    elapsed_s: float = 0.0  # the whole job: teacher, both runs, evaluations
    features: dict[str, Any] | None = None  # images: the feature network of the Fréchet distance
    start_far: dict[str, Any] | None = None  # how far the generator starts from the teacher (stages.start_far)

    def with_speedups(self, factor: float) -> "Summary":
        """This summary with its speed-ups computed at ``factor`` and at each of FACTORS."""
        args = (self.measure, self.teacher[self.measure], self.runs["disback"], self.runs["baseline"])
        return dataclasses.replace(
            self, speedup=speedup(factor, *args), speedup_by_factor={f"{f:g}": speedup(f, *args) for f in FACTORS}
        )

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / SUMMARY, dataclasses.asdict(self))

    @classmethod
    def read(cls, folder: Path) -> "Summary":
        file = Path(folder) / SUMMARY
        if not file.is_file():
            raise DisbackError(f"{folder} has no {SUMMARY}; run `disback demo --out {folder}` first")
        try:
            raw = json.loads(file.read_text())
            raw["budgets"] = Budgets(**raw["budgets"])
            raw["runs"] = {name: RunSummary(**run) for name, run in raw["runs"].items()}
            raw["speedup"] = Speedup(**raw["speedup"]) if raw.get("speedup") else None
            raw["speedup_by_factor"] = {k: Speedup(**v) for k, v in raw.get("speedup_by_factor", {}).items()}
            return cls(**raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise DisbackError(f"{file} is not a summary this disback reads ({exc}); run the demo again") from None


def curve_of(records: list[dict]) -> list[dict]:
    """The evaluation records of metrics.jsonl, cut to what curves show (losses left out)."""
    return [{k: r[k] for k in CURVE_KEYS if k in r} for r in records]


def first_reaching(curve: list[dict], key: str, threshold: float) -> dict | None:
    """The first evaluation whose ``key`` is at most ``threshold``."""
    return next((r for r in curve if r[key] <= threshold), None)


def speedup(factor: float, measure: str, teacher_value: float, disback: RunSummary, baseline: RunSummary) -> Speedup:
    """Iterations (generator steps) and wall time to reach ``factor`` x the teacher's value of ``measure``."""
    threshold = factor * teacher_value
    hit_d, hit_b = first_reaching(disback.curve, measure, threshold), first_reaching(baseline.curve, measure, threshold)
    out = Speedup(
        threshold_factor=factor,
        threshold=threshold,
        iterations_disback=hit_d["iteration"] if hit_d else None,
        iterations_baseline=hit_b["iteration"] if hit_b else None,
        iterations_disback_with_stage1=hit_d["iteration"] + disback.stage1_steps if hit_d else None,
        wall_s_disback_with_stage1=hit_d["wall_s"] + disback.stage1_wall_s if hit_d else None,
        wall_s_baseline=hit_b["wall_s"] if hit_b else None,
    )
    # A ratio needs both runs to have trained to get there (at iteration 0 the two generators are the same one).
    if hit_d and hit_b and hit_d["iteration"] > 0 and hit_b["iteration"] > 0:
        out.speedup_iterations = hit_b["iteration"] / hit_d["iteration"]
        out.speedup_with_stage1 = hit_b["iteration"] / out.iterations_disback_with_stage1
        out.speedup_wall_with_stage1 = hit_b["wall_s"] / out.wall_s_disback_with_stage1
    return out
