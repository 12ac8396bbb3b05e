"""Shared fixtures: a tiny configuration and a tiny teacher, trained once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from disback import stages
from disback.config import build_config
from disback.data import load_data

# The feature network of the image measure is cached; tests get a cache of their own (subprocesses inherit it).
os.environ["DISBACK_CACHE"] = tempfile.mkdtemp(prefix="disback-test-cache-")

TINY = {
    "data": {"n_train": 4000, "n_eval": 300},
    "network": {"hidden": 32, "depth": 2, "emb_dim": 16},
    "teacher": {"steps": 300, "batch": 128, "heun_steps": 10},
    # The paper's placement and schedule, whose node steps and switches are known in advance; the distance spacing
    # and the adaptive schedule (the presets' defaults) have tests of their own.
    "degrade": {"steps": 40, "nodes": 4, "batch": 64, "spacing": "steps", "plateau": 0.0},
    "distill": {"steps": 30, "batch": 64, "switch_every": 5, "schedule": "fixed"},
    "eval": {"every": 10, "projections": 32},
}

TINY_ARGS = [
    "--set",
    "data.n_train=4000",
    "--set",
    "data.n_eval=300",
    "--set",
    "network.hidden=32",
    "--set",
    "network.depth=2",
    "--set",
    "network.emb_dim=16",
    "--set",
    "teacher.steps=300",
    "--set",
    "teacher.batch=128",
    "--set",
    "teacher.heun_steps=10",
    "--set",
    "degrade.steps=40",
    "--set",
    "degrade.nodes=4",
    "--set",
    "degrade.batch=64",
    "--set",
    "degrade.spacing=steps",
    "--set",
    "degrade.plateau=0",
    "--set",
    "distill.steps=30",
    "--set",
    "distill.batch=64",
    "--set",
    "distill.switch_every=5",
    "--set",
    "distill.schedule=fixed",
    "--set",
    "eval.every=10",
    "--set",
    "eval.projections=32",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # small networks run faster on one thread, and results stay reproducible


def tiny_config(**overrides):
    from disback.config import merge

    return build_config("toy2d", overrides=merge(TINY, overrides))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> tuple[Path, object]:
    # A little bigger than TINY, so that distillation has a teacher worth distilling (a few seconds).
    cfg = tiny_config(network={"hidden": 64}, teacher={"steps": 1500, "lr": 5e-3})
    out = tmp_path_factory.mktemp("teacher")
    data = load_data(cfg.data, cfg.seed)
    return stages.train_teacher(cfg, data, out, show_progress=False), cfg


def in_fresh_process(code: str, *args, timeout: int = 300, cwd: Path | None = None) -> str:
    """``python -c code args...`` in a new process (plain diffusers, offline, no state of this one); its stdout, once
    it has exited cleanly (else the assertion shows its stderr)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
