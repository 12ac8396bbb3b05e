"""The degradation path on disk, and the target schedule that walks it back.

A path is a folder with ``manifest.json`` and one safetensors file per node. Node 0 is the teacher; node N fits the
initial generator. Files are found through the manifest, never by building names from numbers.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disback.errors import DisbackError
from disback.weights import load_state, read_weights, save_weights, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Node:
    index: int
    step: int  # stage-1 training step at which the node was saved (0 for the teacher)
    file: str  # relative to the path folder
    sha256: str
    distance: float | None = None  # measured distance from the teacher (disback.recording.DistanceProbe)


class DegradationPath:
    """Nodes psi_0 = teacher, psi_1, ..., psi_N, with the config that made them."""

    def __init__(self, root: Path, nodes: list[Node], config: dict[str, Any], complete: bool = True):
        self.root = Path(root)
        self.nodes = nodes
        self.config = config
        self.complete = complete  # False while stage 1 is still recording it

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def last(self) -> int:
        return self.nodes[-1].index

    # -------------------------------------------------------------- writing

    @classmethod
    def create(cls, root: Path, config: dict[str, Any], replace: bool = False) -> "DegradationPath":
        """An empty path; ``replace`` starts an interrupted one again (a resumed recording restores its nodes)."""
        root = Path(root)
        if (root / MANIFEST).exists() and not replace:
            raise DisbackError(f"{root} already holds a degradation path; choose another --out or delete it")
        return cls(root, [], config, complete=False)

    def mark_complete(self) -> None:
        self.complete = True
        self._write_manifest()

    def node_states(self) -> list[dict[str, Any]]:
        """The nodes written so far, for a checkpoint of the recording."""
        return [asdict(n) for n in self.nodes]

    def restore_nodes(self, nodes: list[dict[str, Any]]) -> None:
        """Back to the nodes a checkpoint had: later ones are forgotten (their files are rewritten when re-recorded)."""
        self.nodes = [Node(**n) for n in nodes]
        self._write_manifest()

    def add_node(self, model: nn.Module, step: int, metadata: dict[str, Any], distance: float | None = None) -> Node:
        """Write the model's weights as the next node, then rewrite the manifest (both atomically)."""
        index = len(self.nodes)
        file = f"node-{index:03d}.safetensors"
        sha = save_weights(model, self.root / file, {**metadata, "node": index, "step": step})
        node = Node(index, step, file, sha, distance)
        self.nodes.append(node)
        self._write_manifest()
        return node

    def _write_manifest(self) -> None:
        write_json(self.root / MANIFEST, {"format_version": FORMAT_VERSION, "complete": self.complete,
                                          "nodes": [asdict(n) for n in self.nodes], "config": self.config})

    # -------------------------------------------------------------- reading

    @classmethod
    def load(cls, root: Path) -> "DegradationPath":
        root = Path(root)
        manifest = root / MANIFEST
        if not manifest.is_file():
            raise DisbackError(f"{root} is not a degradation path (no {MANIFEST}); record one with `disback degrade`")
        try:
            data = json.loads(manifest.read_text())
            version = data["format_version"]
            nodes = [Node(**n) for n in data["nodes"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DisbackError(f"{manifest} is damaged ({exc!r}); record the path again") from None
        if version != FORMAT_VERSION:
            raise DisbackError(f"{manifest} has format version {version}; this disback reads version {FORMAT_VERSION}")
        if [n.index for n in nodes] != list(range(len(nodes))) or not nodes:
            raise DisbackError(f"{manifest} must list nodes 0..N in order; it lists {[n.index for n in nodes]}")
        missing = [n.file for n in nodes if not (root / n.file).is_file()]
        if missing:
            raise DisbackError(f"{manifest} names node files that are missing: {missing}")
        return cls(root, nodes, data.get("config", {}), complete=data.get("complete", True))

    @classmethod
    def teacher_only(cls, teacher_file: Path, sha256: str) -> "DegradationPath":
        """The baseline's path: the teacher alone, so plain distillation is backtracking over one node."""
        teacher_file = Path(teacher_file)
        return cls(teacher_file.parent, [Node(0, 0, teacher_file.name, sha256)], {})

    def load_node(self, index: int, model: nn.Module) -> None:
        """Load node ``index`` into ``model``: sha256 checked against the manifest, keys and shapes exact."""
        load_state(model, self.read_node(index), self.root / self.nodes[index].file)

    def read_node(self, index: int) -> dict[str, torch.Tensor]:
        """Node ``index``'s weights on the CPU, its sha256 checked against the manifest."""
        node = self.nodes[index]
        return read_weights(self.root / node.file, sha256=node.sha256)

    def verify(self, model: nn.Module) -> None:
        """Load every node into ``model`` (a scratch copy): a damaged or mismatched node fails before training starts,
        not when the schedule reaches it."""
        for node in self.nodes:
            self.load_node(node.index, model)


class NodeReader:
    """Loads path nodes into the target, reading the next one ahead: while the generator trains against node k, node
    k-1 is read and its sha256 checked in a background thread, so that a target switch only copies weights in (for
    a UNet of a billion parameters, reading and hashing take seconds; the copy a fraction of that)."""

    def __init__(self, path: DegradationPath):
        self.path = path
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disback-node")
        self.ahead: tuple[int, Future] | None = None

    def prefetch(self, index: int | None) -> None:
        if index is not None and (self.ahead is None or self.ahead[0] != index):
            self.ahead = (index, self.pool.submit(self.path.read_node, index))

    def load(self, index: int, model: nn.Module) -> None:
        """Node ``index`` into ``model``, exactly as DegradationPath.load_node, from the prefetched copy if there is one."""
        if self.ahead is not None and self.ahead[0] == index:
            state, self.ahead = self.ahead[1].result(), None  # a bad file raises here, as a direct read would
        else:
            state = self.path.read_node(index)
        load_state(model, state, self.path.root / self.path.nodes[index].file)


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
        recent = sum(self.gaps[-self.window:]) / self.window
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


def make_schedule(num_nodes: int, kind: str, *, every: int, ratio: float, min_dwell: int, max_dwell: int) -> TargetSchedule:
    """The schedule that ``distill.schedule`` names."""
    if kind == "fixed":
        return FixedSchedule(num_nodes, every)
    if kind == "adaptive":
        return AdaptiveSchedule(num_nodes, ratio, min_dwell, max_dwell)
    if kind == "warm_start":
        return WarmStart(num_nodes)
    raise ValueError(f"unknown schedule '{kind}'")
