"""k-step generators (DMD2's few-step students): the rollout, training one step at a time by backward simulation,
resuming, the data-noised alternative, and the settings' checks."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from disback import stages
from disback.cli import main
from disback.config import build_config
from disback.data import load_data
from disback.diffusion.generator import FewStepGenerator, with_steps
from disback.errors import DisbackError
from disback.storage.models import load_model
from test_resume import interrupted, same_files, same_metrics

LEVELS = [2.5, 0.8, 0.2]


class Scaled(torch.nn.Module):
    """D(x; sigma) = w x / (1 + sigma): a denoiser with one weight, whose calls are counted."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.calls = []

    def forward(self, x, sigma, labels=None):
        self.calls.append((float(sigma[0]), torch.is_grad_enabled()))
        return self.w * x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))))


def test_the_rollout_renoises_with_the_given_noise_and_returns_the_last_estimate():
    d = Scaled()
    g = FewStepGenerator(d, LEVELS)
    noise = torch.randn(5, 3, 2)
    x = 2.5 * noise[:, 0]
    for j, s in enumerate(LEVELS):  # the rollout written out
        x0 = 0.7 * x / (1 + s)
        if j + 1 < len(LEVELS):
            x = x0 + LEVELS[j + 1] * noise[:, j + 1]
    torch.testing.assert_close(with_steps(g)(noise), x0)
    assert [s for s, _ in d.calls] == pytest.approx(LEVELS)
    assert g.sigma_g == LEVELS and FewStepGenerator(d, 2.5).sigma_g == 2.5


@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_training_step_has_gradients_through_the_selected_step_only(step):
    d = Scaled()
    g = FewStepGenerator(d, LEVELS)
    noise = torch.randn(4, 3, 2)
    x0 = g(noise[:, 0], None, noise[:, 1:], step=step)
    assert [s for s, _ in d.calls] == pytest.approx(LEVELS[: step + 1])
    assert [grad for _, grad in d.calls] == [False] * step + [True]  # the earlier steps ran without gradients
    x0.sum().backward()
    with torch.no_grad():  # d/dw of the selected step alone, its input held fixed
        x_in = g.input_at(noise, None, step)
    expected = (x_in / (1 + LEVELS[step])).sum()
    torch.testing.assert_close(d.w.grad, expected)


def test_a_two_step_distillation_trains_each_step_and_resumes_bit_identically(tiny_teacher, tmp_path):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(
        network={"hidden": 64},
        distill={"sigma_g": [2.5, 0.5], "steps": 24, "schedule": "fixed", "switch_every": 4},
        run={"checkpoint_every": 5, "keep": 3},
    )
    data = load_data(cfg.data, cfg.seed)
    path = stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    seen = []

    class Steps:
        def on_step_end(self, step, task):
            seen.append(task.step)

    a = stages.distill(cfg, data, teacher_file, path, tmp_path / "a", show_progress=False, callbacks=[Steps()])
    assert set(seen) == {0, 1} and len(seen) == 24  # one step index per iteration, both drawn
    b = interrupted(
        lambda resume, cbs: stages.distill(cfg, data, teacher_file, path, tmp_path / "b", False, resume, cbs), at=13
    )
    assert a["switches"] == b["switches"]
    same_files(tmp_path / "a", tmp_path / "b", ["generator.safetensors", "fake.safetensors"])
    same_metrics(tmp_path / "a", tmp_path / "b")
    generator, meta = load_model(tmp_path / "a" / "generator.safetensors")
    assert meta.sigma_g == [2.5, 0.5] and generator.sigmas == [2.5, 0.5]


def test_steps_from_noised_data_train_and_one_step_runs_are_unchanged(tiny_teacher, tmp_path):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, distill={"sigma_g": [2.5, 0.5], "steps": 8, "step_input": "data"})
    data = load_data(cfg.data, cfg.seed)
    result = stages.distill(cfg, data, teacher_file, None, tmp_path / "data", show_progress=False)
    assert all(torch.isfinite(torch.tensor(r.get("swd", 0.0))) for r in result["records"])
    # a one-level list is the one-step generator, drawing the same random numbers as a number does
    one = tiny_config(network={"hidden": 64}, distill={"steps": 6})
    listed = tiny_config(network={"hidden": 64}, distill={"steps": 6, "sigma_g": [one.distill.sigma_g]})
    stages.distill(one, data, teacher_file, None, tmp_path / "one", show_progress=False)
    stages.distill(listed, data, teacher_file, None, tmp_path / "listed", show_progress=False)
    same_files(tmp_path / "one", tmp_path / "listed", ["generator.safetensors"])


@pytest.mark.parametrize(
    "override,message",
    [
        ({"distill": {"sigma_g": [0.5, 2.5]}}, "strictly descending"),
        ({"distill": {"sigma_g": [200.0, 2.5]}}, "leaves the teacher's noise range"),
        ({"distill": {"sigma_g": [2.5, 0.0001]}}, "leaves the teacher's noise range"),
        ({"distill": {"sigma_g": [2.5, -1.0]}}, "must be positive"),
        ({"distill": {"step_input": "dreams"}}, "'distill.step_input' must be one of simulate, data"),
        ({"text": {"timestep": [249, 999]}}, "strictly descending"),
    ],
)
def test_bad_step_settings_get_one_clear_line(override, message):
    with pytest.raises(DisbackError, match=message):
        build_config("toy2d", overrides=override)


@pytest.mark.slow
def test_a_two_step_points_demo_runs_reports_and_samples(tmp_path, capsys):
    from conftest import TINY_ARGS

    out = tmp_path / "demo"
    assert main(["demo", "--data", "moons", *TINY_ARGS, "--set", "distill.sigma_g=[2.5,0.5]", "--out", str(out)]) == 0
    assert "2 steps at sigma 2.5, 0.5" in (out / "report.md").read_text()
    assert (
        main(["sample", str(out / "disback" / "generator.safetensors"), "--n", "50", "--out", str(tmp_path / "s.npy")])
        == 0
    )
    import numpy as np

    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
