"""One loop for every stage: the baseline and DisBack differ only in the path they are given."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from disback import stages
from disback.config.choices import METHODS
from disback.data import load_data
from disback.method.distillation import Distillation
from disback.method.path import DegradationPath
from disback.method.score_fitting import ScoreFitting
from disback.storage.weights import read_weights


class Spy:
    """A loop callback that notes the task it sees (first step only) and keeps it for the test."""

    def __init__(self, note=lambda task: task):
        self.note, self.seen, self.tasks = note, [], []

    def on_step_end(self, step, task):
        if step == 1:
            self.seen.append(self.note(task))
            self.tasks.append(task)


def test_baseline_and_disback_go_through_the_same_loop(tiny_teacher, tmp_path):
    teacher_file, cfg = tiny_teacher
    spy = Spy(lambda task: (type(task), task.stage, task.schedule.order if hasattr(task, "schedule") else None))
    data = load_data(cfg.data, cfg.seed)
    path = stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False, callbacks=[spy])
    stages.distill(cfg, data, teacher_file, path, tmp_path / "disback", show_progress=False, callbacks=[spy])
    stages.distill(cfg, data, teacher_file, None, tmp_path / "baseline", show_progress=False, callbacks=[spy])
    assert spy.seen == [
        (ScoreFitting, "degrade", None),
        (Distillation, "backtrack", [3, 2, 1, 0]),
        (Distillation, "distill", [0]),
    ]


@pytest.mark.parametrize("method", ["vsd", "dmd", "dmd2", "sid"])
def test_every_method_runs_through_the_one_loop_with_and_without_backtracking(tiny_teacher, tmp_path, method):
    teacher_file, cfg = tiny_teacher
    cfg = tiny_config(
        network={"hidden": 64},
        distill={"method": method, "steps": 12, "schedule": "fixed", "switch_every": 2},
        eval={"every": 6},
    )
    path = DegradationPath.load(_shared_path(teacher_file, cfg, tmp_path))
    spy = Spy(lambda task: (type(task), task.method))
    data = load_data(cfg.data, cfg.seed)
    results = {}
    for name, run_path in (("disback", path), ("baseline", None)):
        result = stages.distill(
            cfg, data, teacher_file, run_path, tmp_path / f"{method}-{name}", show_progress=False, callbacks=[spy]
        )
        last = result["records"][-1]
        assert math.isfinite(last["swd"]) and math.isfinite(last["loss_generator"])
        assert ("loss_head" in last) == (method == "dmd2")
        results[name] = result
    assert spy.seen == [(Distillation, METHODS[method])] * 2
    assert len(path) == 5
    assert results["disback"]["switches"] == [2, 4, 6]  # the target walks 3, 2, 1, 0: one switch per node
    assert results["baseline"]["switches"] == []  # the teacher throughout


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


@pytest.mark.parametrize("method", ["dmd", "dmd2"])
def test_reused_samples_train_the_fake_score_and_save_a_generator_pass(tiny_teacher, tmp_path, monkeypatch, method):
    """distill.reuse_samples (DMD2's order): the generator step runs first, and the fake score's first update trains on
    exactly its samples, so an iteration runs the generator once fewer; the run still distills."""
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(
        network={"hidden": 64}, distill={"method": method, "steps": 4, "fake_updates": 3, "reuse_samples": True}
    )
    spy = Spy()
    stages.distill(
        cfg, load_data(cfg.data, cfg.seed), teacher_file, None, tmp_path / "run", show_progress=False, callbacks=[spy]
    )
    task = spy.tasks[0]
    drawn, trained_on = [], []
    task.generator.register_forward_hook(lambda m, i, out: drawn.append(out.detach().clone()))
    fake_step = task.fake_step
    monkeypatch.setattr(task, "fake_step", lambda samples=None: (trained_on.append(samples), fake_step(samples))[1])
    for reuse, passes in ((True, 3), (False, 4)):  # fake_updates = 3
        drawn.clear(), trained_on.clear()
        task.cfg.reuse_samples = reuse
        out = task.train_step()
        assert len(drawn) == passes and math.isfinite(out["fake"]) and math.isfinite(out["generator"])
    assert trained_on == [None] * 3  # without reuse every fake update draws its own samples
    task.cfg.reuse_samples = True
    drawn.clear(), trained_on.clear()
    task.train_step()
    x0, _ = trained_on[0]
    assert torch.equal(x0, drawn[0]) and trained_on[1:] == [None, None]  # drawn[0]: the generator step's own samples


def test_distillation_with_reused_samples_improves_the_generator(tiny_teacher, tmp_path):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(distill={"steps": 300, "lr_generator": 3e-4, "reuse_samples": True}, eval={"every": 300})
    records = stages.distill(
        cfg, load_data(cfg.data, cfg.seed), teacher_file, None, tmp_path / "run", show_progress=False
    )["records"]
    assert records[-1]["swd"] < 0.5 * records[0]["swd"], (records[0]["swd"], records[-1]["swd"])


@pytest.mark.slow
def test_compiled_networks_distill_as_eager_ones_and_switch_targets(tiny_teacher, tmp_path):
    """run.compile: the networks are compiled in place, so weight files keep their keys, node files load into the
    compiled target at each switch, and the weights end where eager ones do (up to the compiler's rounding)."""
    teacher_file, _ = tiny_teacher
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for compiled in (False, True):
        cfg = tiny_config(
            network={"hidden": 64},
            run={"compile": compiled},
            distill={"steps": 6, "switch_every": 2, "schedule": "fixed"},
            eval={"every": 6},
        )
        path = DegradationPath.load(_shared_path(teacher_file, cfg, tmp_path / str(compiled)))
        result = stages.distill(
            cfg, load_data(cfg.data, cfg.seed), teacher_file, path, tmp_path / f"run-{compiled}", show_progress=False
        )
        runs[compiled] = result["switches"], read_weights(tmp_path / f"run-{compiled}" / "generator.safetensors")
    assert counters["stats"]["unique_graphs"] > 0  # the compiler really ran (it falls back to eager silently)
    assert runs[True][0] == runs[False][0] == [2, 4, 6]
    eager, compiled = runs[False][1], runs[True][1]
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
