"""Run folders: every stage writes into a folder of its own, which is never overwritten by accident.

A folder that holds a run (it has config.yaml) is continued with --resume, and only with the same settings; it is
started again with --overwrite; a folder with files that disback did not write is never touched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from disback.config import Config
from disback.distributed import is_writer, wait
from disback.errors import DisbackError
from disback.storage.files import write_json, write_text

INPUTS = "inputs.json"  # sha256 of the files a stage reads: a resumed stage must read the same ones


def write_config(cfg: Config, out: Path) -> None:
    write_text(Path(out) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def begin_stage(cfg: Config, out: Path, resume: bool, inputs: dict[str, Any] | None = None) -> None:
    """Refuse to write into a folder that holds another run; on --resume, insist that it was made by this config and
    from the same ``inputs`` (the sha256 of the teacher and path nodes it reads)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        saved = out / "config.yaml"
        if not resume:
            raise DisbackError(
                f"{out} already holds a run; pass --resume to continue it, --overwrite to start it again, "
                "or choose another --out"
            )
        if not saved.is_file():
            raise DisbackError(f"{out} holds files that disback did not write (no config.yaml); choose another --out")
        differ = config_differences(yaml.safe_load(saved.read_text()) or {}, cfg.to_dict())
        if differ:
            raise DisbackError(
                f"{out} holds a run with another config ({', '.join(differ[:5])}); resume it with the same "
                "settings, pass --overwrite to start it again, or choose another --out"
            )
        saved_inputs = out / INPUTS
        if inputs is not None and saved_inputs.is_file() and json.loads(saved_inputs.read_text()) != inputs:
            raise DisbackError(
                f"{out} was started from another teacher or path than the one given now; resume it with the "
                "same --teacher/--path, pass --overwrite to start it again, or choose another --out"
            )
    wait()  # every process has checked the folder before the main one writes into it
    write_config(cfg, out)
    if inputs is not None:
        write_json(out / INPUTS, inputs)


def clear_out(out: Path) -> None:
    """--overwrite: delete a folder that disback wrote (it holds config.yaml); anything else is left alone."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / "config.yaml").is_file():
            raise DisbackError(
                f"{out} holds files that disback did not write; refusing to delete them; choose another --out"
            )
        wait()  # every process has checked before the main one deletes
        if is_writer():
            shutil.rmtree(out)
    wait()


def config_differences(saved: dict, current: dict, where: str = "") -> list[str]:
    """Dotted keys whose values differ; the run section (checkpointing) may change between a run and its resumption."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{where}.{key}" if where else str(key)
        a, b = saved.get(key), current.get(key)
        if name == "run":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name)
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
