"""Weights on disk: safetensors only, written atomically, loaded with exact key and shape matching.

The original DisBack release loaded node files without key checking into a model whose keys did not match, so nothing
was loaded and no error was raised. Here every load compares keys and shapes first and names what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from disback.distributed import from_main, full_state, is_sharded, is_writer
from disback.errors import DisbackError
from disback.storage.files import atomic_write, sha256_file


def save_weights(module: nn.Module, path: Path, metadata: dict[str, Any] | None = None) -> str:
    """Save a module's state dict as safetensors; metadata (JSON) goes in the file's header. Returns its sha256."""
    whole = full_state(module)  # gathered from its shards when sharded (run.fsdp): then the main process alone has it
    if is_sharded(module) and not is_writer():
        return from_main(None)
    state = {k: v.detach().contiguous().cpu() for k, v in whole.items()}
    data = save(state, metadata={"disback": json.dumps(metadata or {})})
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
    digest = hashlib.sha256(data).hexdigest()  # from the bytes: every process knows it, though only one writes the file
    return from_main(digest) if is_sharded(module) else digest


def read_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise DisbackError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DisbackError(f"{path} is not a readable safetensors file ({exc})") from None
    return json.loads(meta.get("disback", "{}"))


def load_weights(module: nn.Module, path: Path, sha256: str | None = None) -> None:
    """Load ``path`` into ``module`` exactly: the sha256 (when given), every key and every shape must match."""
    load_state(module, read_weights(path, sha256), path)


def read_weights(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU), after checking its sha256 when one is given."""
    path = Path(path)
    if not path.is_file():
        raise DisbackError(f"weights file {path} does not exist")
    if sha256 is not None and (actual := sha256_file(path)) != sha256:  # streamed: never two copies in memory
        raise DisbackError(f"{path} is corrupted or was replaced: sha256 {actual[:12]}... != recorded {sha256[:12]}...")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DisbackError(f"{path} is not a readable safetensors file ({exc})") from None


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``state`` (read from ``path``) into ``module``: every key and every shape must match."""
    check_state(module, state, path)
    module.load_state_dict(state, strict=True)


def check_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """That ``state`` (read from ``path``) has exactly ``module``'s keys and shapes; nothing is copied, so ``module``
    may live on the meta device."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise DisbackError(
            f"{path} does not match the model: "
            + "; ".join(
                part
                for part in (
                    f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "",
                    f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "",
                    f"shape mismatch ({'; '.join(shapes[:3])})" if shapes else "",
                )
                if part
            )
            + ". Was it written for a different network config?"
        )
