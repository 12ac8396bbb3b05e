"""The target schedule: which path node the target score is, generator step by generator step, and when it moves
one node back toward the teacher (choices.SCHEDULES names the schedules; ``make_schedule`` builds one)."""

from __future__ import annotations

import math
from typing import Any


class TargetSchedule:
    """Which node the target score is, generator step by generator step.

    The path is walked back: the fake score starts at node N, the target at node N-1, and the target moves one node
    toward the teacher at a time, never skipping one, until it reaches node 0, where it stays. With a one-node path
    the target is the teacher from the start (the baseline). Subclasses decide *when* it moves.
    """

    def __init__(self, num_nodes: int):
        if num_nodes < 1:
            raise ValueError("a schedule needs at least one node")
        self.order = list(range(num_nodes - 2, -1, -1)) if num_nodes > 1 else [0]
        self.position = 0
        self.since_switch = 0

    @property
    def current(self) -> int:
        """Index of the node that is the target now."""
        return self.order[self.position]

    @property
    def upcoming(self) -> int | None:
        """The node the target moves to next (None at the teacher)."""
        return self.order[self.position + 1] if self.position + 1 < len(self.order) else None

    @property
    def at_teacher(self) -> bool:
        return self.current == 0

    def step(self, gap: float | None = None) -> bool:
        """Count one generator step (``gap``: the fake-target gap it measured); True when the target must move on."""
        self.since_switch += 1
        if self.position + 1 < len(self.order) and self.ready(gap):
            self.position += 1
            self.since_switch = 0
            return True
        return False

    def ready(self, gap: float | None) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "since_switch": self.since_switch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.since_switch = state["position"], state["since_switch"]


class FixedSchedule(TargetSchedule):
    """The paper's schedule: the target moves every ``every`` generator steps."""

    def __init__(self, num_nodes: int, every: int):
        super().__init__(num_nodes)
        if every < 1:
            raise ValueError("the switching interval must be positive")
        self.every = every

    def ready(self, gap: float | None) -> bool:
        return self.since_switch >= self.every


class AdaptiveSchedule(TargetSchedule):
    """The target moves when the generator has caught up with it.

    The signal is the gap between the fake and the target denoisers on generator samples, which the generator step
    computes anyway: the fake score tracks the generator, so the gap measures how far the generator is from the
    target node. Its mean over the first ``window`` steps on a node is the reference; the target moves on when the
    mean of the last ``window`` steps has fallen to ``ratio`` times the reference (after at least ``min_dwell``
    steps), or after ``max_dwell`` steps whatever the gap.
    """

    def __init__(self, num_nodes: int, ratio: float, min_dwell: int, max_dwell: int):
        super().__init__(num_nodes)
        if not 0 < ratio < 1 or not 1 <= min_dwell <= max_dwell:
            raise ValueError("need 0 < ratio < 1 and 1 <= min_dwell <= max_dwell")
        self.ratio, self.min_dwell, self.max_dwell = ratio, min_dwell, max_dwell
        self.window = max(min_dwell // 2, 1)
        self.gaps: list[float] = []  # gaps measured on the current node

    def ready(self, gap: float | None) -> bool:
        if gap is None:
            raise ValueError("the adaptive schedule needs the fake-target gap of every generator step")
        if math.isfinite(gap):  # a skipped (non-finite) step says nothing about the generator
            self.gaps.append(gap)
        if self.since_switch >= self.max_dwell:
            return self._advance()
        if self.since_switch < self.min_dwell or len(self.gaps) < 2 * self.window:
            return False
        reference = sum(self.gaps[: self.window]) / self.window
        recent = sum(self.gaps[-self.window :]) / self.window
        return recent <= self.ratio * reference and self._advance()

    def _advance(self) -> bool:
        self.gaps = []
        return True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gaps": list(self.gaps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gaps = list(state.get("gaps", []))


class WarmStart(TargetSchedule):
    """The fake score starts at the path's last node but the target is the teacher from the first step: the path's
    end alone, without walking back through the nodes between (the ablation that separates the two effects)."""

    def __init__(self, num_nodes: int):
        super().__init__(1)

    def ready(self, gap: float | None) -> bool:
        return False


SCHEDULE_CLASSES: dict[str, type[TargetSchedule]] = {
    "fixed": FixedSchedule,
    "adaptive": AdaptiveSchedule,
    "warm_start": WarmStart,
}


def make_schedule(
    num_nodes: int, kind: str, *, every: int, ratio: float, min_dwell: int, max_dwell: int
) -> TargetSchedule:
    """The schedule that ``distill.schedule`` names (a key of choices.SCHEDULES), with its settings."""
    settings = {"fixed": {"every": every}, "adaptive": {"ratio": ratio, "min_dwell": min_dwell, "max_dwell": max_dwell}}
    return SCHEDULE_CLASSES[kind](num_nodes, **settings.get(kind, {}))
