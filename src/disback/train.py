"""The one training loop. Every stage and method goes through ``train_loop``; they differ only in the task.

A task owns its networks and optimisers and does one iteration in ``train_step`` (for distillation: one generator
step with its fake-score updates). The loop owns what is common: the step count, timing, evaluation, the metrics
log, callbacks (such as the degradation-path recorder) and the progress bar.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol

from tqdm.auto import tqdm

from disback.errors import DisbackError


class Task(Protocol):
    stage: str  # "teacher", "degrade", "backtrack" or "distill": written into every metrics record

    def train_step(self) -> dict[str, float]: ...

    def target_node(self) -> int | None: ...


class Callback(Protocol):
    def on_step_end(self, step: int, task: Task) -> bool | None: ...  # True ends the loop after this step


class MetricsLog:
    """Appends one JSON object per evaluation to ``metrics.jsonl`` (flushed at once, so a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_loop(
    task: Task,
    steps: int,
    *,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
    log: MetricsLog | None = None,
    callbacks: Iterable[Callback] = (),
    show_progress: bool = True,
) -> list[dict]:
    """Run ``steps`` iterations of ``task`` (fewer if a callback ends it). ``wall_s`` counts training (and callbacks),
    not evaluation."""
    callbacks = list(callbacks)
    records: list[dict] = []
    wall = 0.0
    losses: dict[str, float] = {}

    def record(step: int) -> None:
        rec = {"iteration": step, "wall_s": round(wall, 4), "stage": task.stage, "target_node": task.target_node()}
        rec.update({f"loss_{k}": v for k, v in losses.items()})
        if evaluate is not None:
            rec.update(evaluate())
        records.append(rec)
        if log is not None:
            log.write(rec)

    if evaluate is not None:
        record(0)
    bar = tqdm(range(1, steps + 1), desc=task.stage, disable=not show_progress, leave=False, dynamic_ncols=True)
    for step in bar:
        start = time.perf_counter()
        losses = task.train_step()
        stop = [callback.on_step_end(step, task) for callback in callbacks]
        wall += time.perf_counter() - start
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            raise DisbackError(f"{task.stage}: loss {bad[0]} became non-finite at step {step}; lower the learning rate")
        if eval_every and (step % eval_every == 0 or step == steps):
            record(step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in records[-1].items() if k in ("swd", "loss_loss", "loss_fake")})
        if any(stop):
            break
    if not records or records[-1]["iteration"] != step:
        record(step)
    return records
