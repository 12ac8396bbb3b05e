"""The degradation path on disk, and the reader that loads its nodes into the target.

A path is a folder with ``manifest.json`` and one safetensors file per node. Node 0 is the teacher; node N fits the
initial generator. Files are found through the manifest, never by building names from numbers.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disback.errors import DisbackError
from disback.storage.files import write_json
from disback.storage.meta import ModelMeta
from disback.storage.models import save_model
from disback.storage.weights import load_state, read_weights

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Node:
    index: int
    step: int  # stage-1 training step at which the node was saved (0 for the teacher)
    file: str  # relative to the path folder
    sha256: str
    distance: float | None = None  # measured distance from the teacher (disback.method.recording.DistanceProbe)


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

    @property
    def initial_generator(self) -> Path | None:
        """The generator the path was recorded toward, when it was not the teacher's copy (``--generator``)."""
        recorded = self.config.get("initial_generator")
        return None if recorded is None else self.root / recorded["file"]

    @property
    def initial_generator_sha256(self) -> str | None:
        """The sha256 of the weights the initial generator came from (None: the teacher's copy)."""
        recorded = self.config.get("initial_generator")
        return None if recorded is None else recorded["origin"]["sha256"]

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

    def add_node(self, model: nn.Module, step: int, meta: ModelMeta, distance: float | None = None) -> Node:
        """Write the model's weights as the next node, then rewrite the manifest (both atomically)."""
        index = len(self.nodes)
        file = f"node-{index:03d}.safetensors"
        sha = save_model(model, self.root / file, meta.as_node(index, step))
        node = Node(index, step, file, sha, distance)
        self.nodes.append(node)
        self._write_manifest()
        return node

    def _write_manifest(self) -> None:
        write_json(
            self.root / MANIFEST,
            {
                "format_version": FORMAT_VERSION,
                "complete": self.complete,
                "nodes": [asdict(n) for n in self.nodes],
                "config": self.config,
            },
        )

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
