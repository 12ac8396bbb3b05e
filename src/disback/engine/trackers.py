"""Live trackers (``run.log_with``): every metric the loop records also goes to accelerate's TensorBoard or Weights &
Biases tracker, with the resolved config. metrics.jsonl stays the record; a tracker is a view of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disback.distributed import is_writer


def make_tracker(kind: str, folder: Path, name: str, config: dict[str, Any]) -> Any | None:
    """A started tracker of ``kind`` ("" for none) writing under ``folder``, with ``config`` as its hyperparameters;
    None in processes other than the main one. Its package is there: config checks say which to install if not."""
    if not kind or not is_writer():
        return None
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    if kind == "tensorboard":
        tracker = TensorBoardTracker(name, Path(folder) / "tensorboard")
    else:
        tracker = WandBTracker("disback", name=f"{folder}:{name}", dir=str(folder))
    if hasattr(tracker, "start"):  # recent accelerate starts a tracker in start(), older releases in __init__
        tracker.start()
    tracker.store_init_configuration(flat(config))
    return tracker


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys with scalar values, as trackers take hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
