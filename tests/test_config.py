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
        build_config("toy2"),
    (tmp_path / "my.yaml").write_text("distill:\n  steps: 77\n")
    assert build_config("toy2d", str(tmp_path / "my.yaml")).distill.steps == 77
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(DisbackError, match="mapping"):
        build_config("toy2d", str(tmp_path / "bad.yaml"))
