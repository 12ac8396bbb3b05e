"""One loop for every stage: the baseline and DisBack differ only in the path they are given."""

from __future__ import annotations

import math

import pytest

from disback import stages
from disback.data import load_data
from disback.path import DegradationPath
from disback.tasks import METHODS, Distillation, ScoreFitting
from disback.train import train_loop

from conftest import tiny_config


def test_baseline_and_disback_go_through_the_same_loop(tiny_teacher, tmp_path, monkeypatch):
    teacher_file, cfg = tiny_teacher
    calls = []

    def spy(task, steps, **kw):
        calls.append((type(task), task.stage, task.schedule.order if hasattr(task, "schedule") else None))
        return train_loop(task, steps, **kw)

    monkeypatch.setattr(stages, "train_loop", spy)
    data = load_data(cfg.data, cfg.seed)
    path = stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    stages.distill(cfg, data, teacher_file, path, tmp_path / "disback", show_progress=False)
    stages.distill(cfg, data, teacher_file, None, tmp_path / "baseline", show_progress=False)
    assert calls == [
        (ScoreFitting, "degrade", None),
        (Distillation, "backtrack", [3, 2, 1, 0]),
        (Distillation, "distill", [0]),
    ]


@pytest.mark.parametrize("method", ["vsd", "dmd", "dmd2", "sid"])
def test_every_method_runs_through_the_one_loop_with_and_without_backtracking(tiny_teacher, tmp_path, monkeypatch, method):
    teacher_file, cfg = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, distill={"method": method, "steps": 12, "schedule": "fixed", "switch_every": 2},
                      eval={"every": 6})
    path = DegradationPath.load(_shared_path(teacher_file, cfg, tmp_path))
    seen = []

    def spy(task, steps, **kw):
        seen.append((type(task), task.method))
        return train_loop(task, steps, **kw)

    monkeypatch.setattr(stages, "train_loop", spy)
    data = load_data(cfg.data, cfg.seed)
    for run_path in (path, None):
        result = stages.distill(cfg, data, teacher_file, run_path, tmp_path / f"{method}-{run_path is None}", show_progress=False)
        last = result["records"][-1]
        assert math.isfinite(last["swd"]) and math.isfinite(last["loss_generator"])
        assert ("loss_head" in last) == (method == "dmd2")
    assert seen == [(Distillation, METHODS[method])] * 2
    assert result["switches"] == [] and len(path) == 5


def _shared_path(teacher_file, cfg, tmp_path):
    out = tmp_path / "path"
    stages.record_path(cfg, teacher_file, out, show_progress=False)
    return out


def test_distillation_improves_the_generator(tiny_teacher, tmp_path):
    """Not a benchmark: a few hundred steps must take the initial generator most of the way to the data."""
    teacher_file, cfg = tiny_teacher
    cfg = tiny_config(distill={"steps": 300, "lr_generator": 3e-4}, eval={"every": 300})
    data = load_data(cfg.data, cfg.seed)
    records = stages.distill(cfg, data, teacher_file, None, tmp_path / "run", show_progress=False)["records"]
    assert records[-1]["swd"] < 0.5 * records[0]["swd"], (records[0]["swd"], records[-1]["swd"])
