"""The degradation path on disk, and the target schedule that walks it back.

A path is a folder with ``manifest.json`` and one safetensors file per node. Node 0 is the teacher; node N fits the
initial generator. Files are found through the manifest, never by building names from numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from disback.errors import DisbackError
from disback.weights import load_weights, save_weights, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Node:
    index: int
    step: int  # stage-1 training step at which the node was saved (0 for the teacher)
    file: str  # relative to the path folder
    sha256: str


class DegradationPath:
    """Nodes psi_0 = teacher, psi_1, ..., psi_N, with the config that made them."""

    def __init__(self, root: Path, nodes: list[Node], config: dict[str, Any]):
        self.root = Path(root)
        self.nodes = nodes
        self.config = config

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def last(self) -> int:
        return self.nodes[-1].index

    # -------------------------------------------------------------- writing

    @classmethod
    def create(cls, root: Path, config: dict[str, Any]) -> "DegradationPath":
        root = Path(root)
        if (root / MANIFEST).exists():
            raise DisbackError(f"{root} already holds a degradation path; choose another --out or delete it")
        return cls(root, [], config)

    def add_node(self, model: nn.Module, step: int, metadata: dict[str, Any]) -> Node:
        """Write the model's weights as the next node, then rewrite the manifest (both atomically)."""
        index = len(self.nodes)
        file = f"node-{index:03d}.safetensors"
        sha = save_weights(model, self.root / file, {**metadata, "node": index, "step": step})
        node = Node(index, step, file, sha)
        self.nodes.append(node)
        self._write_manifest()
        return node

    def _write_manifest(self) -> None:
        write_json(self.root / MANIFEST, {"format_version": FORMAT_VERSION, "nodes": [asdict(n) for n in self.nodes], "config": self.config})

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
        return cls(root, nodes, data.get("config", {}))

    @classmethod
    def teacher_only(cls, teacher_file: Path, sha256: str) -> "DegradationPath":
        """The baseline's path: the teacher alone, so plain distillation is backtracking over one node."""
        teacher_file = Path(teacher_file)
        return cls(teacher_file.parent, [Node(0, 0, teacher_file.name, sha256)], {})

    def load_node(self, index: int, model: nn.Module) -> None:
        """Load node ``index`` into ``model``: sha256 checked against the manifest, keys and shapes exact."""
        node = self.nodes[index]
        load_weights(model, self.root / node.file, sha256=node.sha256)


class TargetSchedule:
    """Which node the target score is, generator step by generator step.

    The path is walked back: the fake score starts at node N, the target at node N-1, and the target moves one node
    toward the teacher every ``every`` generator steps until it reaches node 0, where it stays. With a one-node path
    the target is the teacher from the start (the baseline).
    """

    def __init__(self, num_nodes: int, every: int):
        if num_nodes < 1 or every < 1:
            raise ValueError("a schedule needs at least one node and a positive interval")
        self.order = list(range(num_nodes - 2, -1, -1)) if num_nodes > 1 else [0]
        self.every = every
        self.position = 0
        self.since_switch = 0

    @property
    def current(self) -> int:
        """Index of the node that is the target now."""
        return self.order[self.position]

    @property
    def at_teacher(self) -> bool:
        return self.current == 0

    def step(self) -> bool:
        """Count one generator step; return True when the target must move to the next node."""
        self.since_switch += 1
        if self.position + 1 < len(self.order) and self.since_switch >= self.every:
            self.position += 1
            self.since_switch = 0
            return True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "since_switch": self.since_switch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.since_switch = state["position"], state["since_switch"]
