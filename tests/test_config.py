from __future__ import annotations

import pytest

from disback.config import build_config, parse_overrides, preset_names
from disback.errors import DisbackError


def test_presets_load_and_validate():
    assert "toy2d" in preset_names()
    cfg = build_config("toy2d")
    assert cfg.data.name == "ring8" and cfg.distill.steps > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.stpes=5", "did you mean 'distill.steps'"),
        ("distill.steps=-1", "'distill.steps' must be positive"),
        ("teacher.lr=abc", "'teacher.lr' must be float"),
        ("teacher.ema_decay=1.5", "ema_decay"),
        ("degrade.nodes=5000", "cannot exceed"),
        ("distill.sigma_min=20", "sigma_min"),
        ("teachr.steps=5", "did you mean 'teacher'"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(DisbackError, match=message):
        build_config("toy2d", overrides=parse_overrides([override]))


def test_unknown_preset_and_user_yaml(tmp_path):
    with pytest.raises(DisbackError, match="did you mean 'toy2d'"):
        (build_config("toy2"),)
    (tmp_path / "my.yaml").write_text("distill:\n  steps: 77\n")
    assert build_config("toy2d", str(tmp_path / "my.yaml")).distill.steps == 77
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(DisbackError, match="mapping"):
        build_config("toy2d", str(tmp_path / "bad.yaml"))


def test_every_named_choice_has_its_implementation_and_no_other_exists():
    from disback.config import choices
    from disback.data import builtin_names
    from disback.diffusion.losses import GENERATOR_LOSSES
    from disback.engine.loop import Guard
    from disback.method.recording import node_steps
    from disback.method.schedules import SCHEDULE_CLASSES
    from disback.stages.runtime import MIXED_PRECISION

    assert set(SCHEDULE_CLASSES) == set(choices.SCHEDULES)
    assert set(MIXED_PRECISION) == set(choices.PRECISIONS)
    assert set(choices.ON_NONFINITE) == {"stop", "skip"} and Guard().on_nonfinite in choices.ON_NONFINITE
    assert {m.loss for m in choices.METHODS.values()} == set(GENERATOR_LOSSES)
    assert set(builtin_names()) == set(choices.DATASETS)
    for spacing in set(choices.SPACINGS) - {"distance"}:  # distance spacing is the DistanceRecorder's
        assert node_steps(spacing, 100, 4)[-1] == 100
    for table, key in (
        (choices.METHODS, "distill.method"),
        (choices.SCHEDULES, "distill.schedule"),
        (choices.SPACINGS, "degrade.spacing"),
        (choices.PRECISIONS, "run.precision"),
        (choices.ON_NONFINITE, "run.on_nonfinite"),
        (choices.NETWORKS, "network.kind"),
    ):
        for name in table:
            section, field = key.split(".")
            extra = {"fake_updates": 2} if key == "distill.method" else {}
            preset = "digits" if (key, name) == ("network.kind", "unet") else "toy2d"
            cfg = build_config(preset, overrides={section: {field: name, **extra}})
            assert getattr(getattr(cfg, section), field) == name
        with pytest.raises(DisbackError, match=f"'{key}' must be one of {', '.join(table)}"):
            build_config("toy2d", overrides={section: {field: "nonsense"}})


def test_the_cli_and_the_readme_offer_every_method_and_schedule():
    from pathlib import Path

    from disback.cli import build_parser, listing
    from disback.config import choices

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    method = next(a for a in demo._actions if a.dest == "method")
    assert list(method.choices) == list(choices.METHODS)
    text = listing()
    assert all(
        name in text
        for table in (choices.METHODS, choices.SCHEDULES, choices.SPACINGS, choices.DATASETS)
        for name in table
    )
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert all(f"`{name}`" in readme for table in (choices.METHODS, choices.SCHEDULES) for name in table)
