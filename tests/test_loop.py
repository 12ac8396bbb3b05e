"""One loop for every stage: the baseline and DisBack differ only in the path they are given."""

from __future__ import annotations

from disback import stages
from disback.data import load_data
from disback.tasks import Distillation, ScoreFitting
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


def test_distillation_improves_the_generator(tiny_teacher, tmp_path):
    """Not a benchmark: a few hundred steps must take the initial generator most of the way to the data."""
    teacher_file, cfg = tiny_teacher
    cfg = tiny_config(distill={"steps": 300, "lr_generator": 3e-4}, eval={"every": 300})
    data = load_data(cfg.data, cfg.seed)
    records = stages.distill(cfg, data, teacher_file, None, tmp_path / "run", show_progress=False)["records"]
    assert records[-1]["swd"] < 0.5 * records[0]["swd"], (records[0]["swd"], records[-1]["swd"])
