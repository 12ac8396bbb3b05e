"""Checkpoints from which any stage resumes exactly.

A checkpoint is ONE safetensors file: every tensor of the run's state (networks, optimiser moments, EMA, RNG states,
candidate nodes) under a dotted key, and the rest (steps, schedule position, optimiser settings, metrics so far) as
JSON in the header, where each tensor is replaced by a reference to its key. No pickles. It is written to a temporary
name and renamed, and ``index.json`` (also replaced atomically) names the complete checkpoints, newest last; older
ones are deleted only after a newer one is complete, so a kill at any moment leaves the last good one usable.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from disback.distributed import is_writer
from disback.errors import DisbackError
from disback.storage.files import atomic_write, sha256_file, write_json

log = logging.getLogger(__name__)
INDEX = "index.json"
TENSOR = "__tensor__"


def flatten(state: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Nested dicts / lists / tuples of tensors and JSON values -> a JSON skeleton; tensors go into ``tensors``."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().to("cpu").contiguous().clone()
        return {TENSOR: prefix}
    if isinstance(state, dict):
        return {
            "__dict__": [
                [_key(k), flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))] for k, v in state.items()
            ]
        }
    if isinstance(state, (list, tuple)):
        return {
            "__list__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(state)],
            "tuple": isinstance(state, tuple),
        }
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot checkpoint a {type(state).__name__} at '{prefix}'")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if TENSOR in skeleton:
            return tensors[skeleton[TENSOR]]
        if "__dict__" in skeleton:
            return {_unkey(k): unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [unflatten(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton["tuple"] else items
    return skeleton


def _key(k: Any) -> Any:
    """Optimiser states are keyed by int; JSON keys are strings, so the type is kept."""
    return ["int", k] if isinstance(k, int) else k


def _unkey(k: Any) -> Any:
    return k[1] if isinstance(k, list) else k


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        # this process's device only: under several processes each draws the same stream on its own GPU, and the main
        # process's checkpoint restores that stream on every process's device
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


class Checkpoints:
    """The checkpoints of one stage in ``folder``: save, prune to the newest ``keep``, load the latest."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder, self.keep = Path(folder), max(keep, 1)

    def entries(self) -> list[dict[str, Any]]:
        index = self.folder / INDEX
        if not index.is_file():
            return []
        try:
            return json.loads(index.read_text())["checkpoints"]
        except (ValueError, KeyError) as exc:
            raise DisbackError(
                f"{index} is damaged ({exc!r}); delete the folder {self.folder} to start the stage again"
            ) from None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        name = f"checkpoint-{step:09d}.safetensors"
        if not is_writer():  # every process holds the same state; the main one saves it
            return self.folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(state, tensors)
        metadata = {"state": json.dumps(skeleton), "step": str(step)}
        atomic_write(self.folder / name, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        entry = {"step": step, "file": name, "sha256": sha256_file(self.folder / name)}
        entries = [e for e in self.entries() if e["step"] != step] + [entry]
        old, entries = entries[: -self.keep], entries[-self.keep :]
        write_json(self.folder / INDEX, {"checkpoints": entries})
        for entry in old:  # only now that the newer one is complete and indexed
            (self.folder / entry["file"]).unlink(missing_ok=True)
        return self.folder / name

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that reads back whole; a damaged newest one falls back to the one before, loudly."""
        entries = self.entries()
        for i in range(len(entries) - 1, -1, -1):
            file = self.folder / entries[i]["file"]
            try:
                state = read(file, entries[i].get("sha256"))
            except DisbackError as exc:
                log.warning("%s; trying an older checkpoint", exc)
                continue
            if i < len(entries) - 1:  # forget the damaged newer ones, so that pruning never deletes this good one
                write_json(self.folder / INDEX, {"checkpoints": entries[: i + 1]})
                for bad in entries[i + 1 :] if is_writer() else ():
                    (self.folder / bad["file"]).unlink(missing_ok=True)
            return entries[i]["step"], state
        if entries:
            raise DisbackError(
                f"no checkpoint in {self.folder} can be read; delete that folder to start the stage again"
            )
        return None


def read(file: Path, sha256: str | None = None) -> dict[str, Any]:
    if not file.is_file():
        raise DisbackError(f"checkpoint {file} is missing")
    if sha256 is not None and sha256_file(file) != sha256:
        raise DisbackError(f"checkpoint {file} does not match its sha256 in {INDEX} (corrupted)")
    try:
        with safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(file))
        return unflatten(json.loads(meta["state"]), tensors)
    except (OSError, SafetensorError, ValueError, KeyError) as exc:
        raise DisbackError(
            f"checkpoint {file} is damaged or not a disback checkpoint ({type(exc).__name__}: {exc})"
        ) from None
