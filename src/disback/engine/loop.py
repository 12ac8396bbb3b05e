"""The one training loop. Every stage and method goes through ``train_loop``; they differ only in the task.

A task owns its networks and optimisers and does one iteration in ``train_step`` (for distillation: one generator
step with its fake-score updates). The loop owns what is common: the step count, timing, evaluation, the metrics
log, callbacks (such as the degradation-path recorder), the progress bar, checkpoints and resuming from them, and
the guard against non-finite losses.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch

from disback.distributed import anyone, wait
from disback.engine.checkpoint import Checkpoints, rng_state, set_rng_state
from disback.engine.log import MetricsLog
from disback.engine.progress import progress
from disback.errors import DisbackError


class Task(Protocol):
    stage: str  # "teacher", "degrade", "backtrack" or "distill": written into every metrics record

    def train_step(self) -> dict[str, float]: ...

    def target_node(self) -> int | None: ...

    def state_dict(self) -> dict[str, Any]: ...  # everything that determines the task's future

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def modules(self) -> list[torch.nn.Module]: ...  # the trained networks, checked for non-finite weights


class Callback(Protocol):
    def on_step_end(self, step: int, task: Task) -> bool | None: ...  # True ends the loop after this step


@dataclass(frozen=True)
class Guard:
    """What a non-finite loss does: "stop" the run (the task has not applied that update, and nothing is saved after
    it), or "skip" the update and go on, stopping after ``max_skipped`` in a row."""

    on_nonfinite: str = "stop"
    max_skipped: int = 20


STOP = Guard()  # the default: a non-finite loss stops the run


def train_loop(
    task: Task,
    steps: int,
    *,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
    log: MetricsLog | None = None,
    callbacks: Iterable[Callback] = (),
    show_progress: bool = True,
    checkpoints: Checkpoints | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    guard: Guard = STOP,
) -> list[dict]:
    """Run ``steps`` iterations of ``task`` (fewer if a callback ends it). ``wall_s`` counts training (and callbacks),
    not evaluation. With ``checkpoints``, the whole state is saved every ``checkpoint_every`` steps and at the end
    (or on SIGTERM); ``resume`` continues from the latest one, exactly where it was."""
    callbacks = list(callbacks)
    state = {"step": 0, "wall": 0.0, "records": [], "skipped": 0, "in_a_row": 0, "stopped": False}
    losses: dict[str, float] = {}

    def record(step: int) -> None:
        rec = {
            "iteration": step,
            "wall_s": round(state["wall"], 4),
            "stage": task.stage,
            "target_node": task.target_node(),
        }
        rec.update({f"loss_{k}": v for k, v in losses.items()})
        if torch.cuda.is_available():  # the stage's peak so far: what a user sizes a GPU by
            rec["gpu_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if state["skipped"]:
            rec["skipped_steps"] = state["skipped"]
        if evaluate is not None:
            rec.update(evaluate())
        state["records"].append(rec)
        if log is not None:
            log.write(rec)

    def save(step: int) -> None:
        if checkpoints is None:
            return
        if any(not torch.isfinite(p).all() for m in task.modules() for p in m.parameters()):
            raise DisbackError(f"{task.stage}: the weights became non-finite by step {step}; {_last_good(checkpoints)}")
        checkpoints.save(
            step,
            {
                "task": task.state_dict(),
                "loop": dict(state, step=step),
                "rng": rng_state(),
                "callbacks": [getattr(cb, "state_dict", lambda: None)() for cb in callbacks],
            },
        )

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # from here on, this stage's (the networks it holds included)
    start = 1
    latest = checkpoints.latest() if (checkpoints is not None and resume) else None
    if latest is not None:
        saved_step, saved = latest
        task.load_state_dict(saved["task"])
        for callback, cb_state in zip(callbacks, saved["callbacks"]):
            if cb_state is not None:
                callback.load_state_dict(cb_state)
        state.update(saved["loop"])
        set_rng_state(saved["rng"])
        if log is not None:
            log.rewrite(state["records"])
        start = saved_step + 1 if not state["stopped"] else steps + 1  # a callback had ended the loop: it stays ended
    elif evaluate is not None:
        record(0)

    step = state["step"]  # 0, or the checkpoint's step
    # SIGTERM (preemption) is noted and acted on between steps, so that the checkpoint never holds half a step.
    term: list[int] = []
    catch = checkpoints is not None and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: term.append(signum)) if catch else None
    try:
        bar = progress(range(start, steps + 1), task.stage, show_progress)
        for step in bar:
            started = time.perf_counter()
            losses = task.train_step()
            stop = [callback.on_step_end(step, task) for callback in callbacks]
            state["wall"] += time.perf_counter() - started
            _check_losses(task, losses, step, state, guard, checkpoints)
            if eval_every and (step % eval_every == 0 or step == steps):
                record(step)
                bar.set_postfix(
                    {
                        k: f"{v:.4g}"
                        for k, v in state["records"][-1].items()
                        if k in ("swd", "fid", "clip_score", "loss_dsm", "loss_fake")
                    }
                )
            if anyone(any(stop)):  # every process ends after the same step
                state["stopped"] = True
                break
            if anyone(bool(term)):  # every process stops after the same step
                save(step)
                wait()  # the main process has written the checkpoint before any process exits
                raise DisbackError(
                    f"{task.stage}: stopped by SIGTERM after step {step}; checkpoint saved, continue with --resume"
                )
            if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                save(step)
        if not state["records"] or state["records"][-1]["iteration"] != step:
            record(step)
        save(step)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if log is not None:
            log.finish()  # the tracker's files are complete, however the loop ended
    return state["records"]


def _check_losses(task: Task, losses: dict[str, float], step: int, state: dict, guard: Guard, checkpoints) -> None:
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if not bad:
        state["in_a_row"] = 0
        return
    state["skipped"] += 1
    state["in_a_row"] += 1
    if guard.on_nonfinite == "skip" and state["in_a_row"] <= guard.max_skipped:
        return  # the task did not apply the update whose loss was non-finite
    where = _last_good(checkpoints)
    if guard.on_nonfinite == "skip":
        raise DisbackError(
            f"{task.stage}: {state['in_a_row']} steps in a row had non-finite losses (up to step {step}); {where}"
        )
    raise DisbackError(
        f"{task.stage}: loss '{bad[0]}' became non-finite at step {step}; {where}. Check the data, or start again with "
        "a lower learning rate (--overwrite --set ...), or set run.on_nonfinite=skip to skip such steps"
    )


def _last_good(checkpoints: Checkpoints | None) -> str:
    entries = checkpoints.entries() if checkpoints is not None else []
    if not entries:
        return "no checkpoint was saved before it"
    return f"the last good checkpoint (step {entries[-1]['step']}) is in {checkpoints.folder}"
