"""The command line on tiny budgets: every stage, the demo, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_ARGS
from disback.cli import main
from disback.method.path import DegradationPath


def test_each_stage_runs_from_the_command_line(tmp_path, capsys):
    t, p = tmp_path / "teacher", tmp_path / "path"
    assert main(["teacher", "--out", str(t), *TINY_ARGS]) == 0
    assert (t / "teacher.safetensors").is_file() and (t / "config.yaml").is_file()
    assert main(["degrade", "--teacher", str(t), "--out", str(p), *TINY_ARGS]) == 0
    assert len(DegradationPath.load(p)) == 5
    assert main(["backtrack", "--teacher", str(t), "--path", str(p), "--out", str(tmp_path / "b"), *TINY_ARGS]) == 0
    assert main(["distill", "--teacher", str(t / "teacher.safetensors"), "--out", str(tmp_path / "d"), *TINY_ARGS]) == 0
    for run, stage, last_node in (("b", "backtrack", 0), ("d", "distill", 0)):
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert {r["stage"] for r in records} == {stage}
        assert records[-1]["iteration"] == 30 and records[-1]["target_node"] == last_node
        assert {"wall_s", "swd", "mmd", "modes"} <= records[-1].keys()
    assert (
        main(
            [
                "sample",
                str(tmp_path / "b" / "generator.safetensors"),
                "--n",
                "100",
                "--out",
                str(tmp_path / "g.npy"),
                "--plot",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "g.npy").shape == (100, 2) and (tmp_path / "g.png").stat().st_size > 0
    assert (
        main(["sample", str(t / "teacher.safetensors"), "--n", "50", "--steps", "5", "--out", str(tmp_path / "t.npy")])
        == 0
    )
    assert np.isfinite(np.load(tmp_path / "t.npy")).all()


def test_demo_writes_report_plots_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--data", "moons", *TINY_ARGS]) == 0
    for name in ("report.md", "curves.png", "samples.png", "summary.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["data"] == "moons" and s["measure"] == "swd"
    assert set(s["runs"]) == {"disback", "baseline"}
    assert s["runs"]["disback"]["stage1_steps"] == 40
    assert s["runs"]["disback"]["switches"] == [5, 10, 15]  # 5 nodes: targets 3, 2, 1, 0
    for run in s["runs"].values():
        assert [r["iteration"] for r in run["curve"]] == [0, 10, 20, 30]
        assert all({"iteration", "wall_s", "swd", "mmd"} <= r.keys() for r in run["curve"])
    assert s["speedup"]["threshold"] == pytest.approx(s["speedup"]["threshold_factor"] * s["teacher"]["swd"])
    assert set(s["speedup_by_factor"]) == {"4", "3", "2", "1.5"}
    assert "| DisBack |" in capsys.readouterr().out
    # A finished demo is read back with --resume, refused without it, started again with --overwrite; a folder
    # that holds something else is refused whatever the flags.
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--data", "moons", *TINY_ARGS]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--data", "moons", "--resume", *TINY_ARGS]) == 0
    assert json.loads((out / "summary.json").read_text())["runs"] == s["runs"]
    assert main(["demo", "--out", str(out), "--resume", *TINY_ARGS]) == 2  # ring8 now: another config
    assert "data.name: 'moons' -> 'ring8'" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--overwrite", *TINY_ARGS]) == 0
    assert json.loads((out / "summary.json").read_text())["data"] == "ring8"
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    for flag in ([], ["--resume"], ["--overwrite"]):
        assert main(["demo", "--out", str(other), *flag, *TINY_ARGS]) == 2
    assert (other / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_demo_on_a_users_points_as_a_real_process(tmp_path):
    """The installed entry point, in a fresh process, on points it has never seen (3-D, far from unit scale)."""
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(size=(300, 3)) * 0.2 + 50, rng.normal(size=(300, 3)) * 0.2 - 50])
    np.save(tmp_path / "mine.npy", pts)
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "disback", "demo", "--data", str(tmp_path / "mine.npy"), "--out", str(out), *TINY_ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["data"].endswith("mine.npy")
    assert np.load(out / "disback" / "samples.npy").shape == (300, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "rign8"], "did you mean 'ring8'"),
        (["--set", "distill.steps=0"], "must be positive"),
        (["--set", "distill.stpes=10"], "did you mean 'distill.steps'"),
        (["--set", "distill.steps"], "KEY=VALUE"),
        (["--preset", "nope"], "unknown preset"),
        # distance spacing that cannot place its nodes: refused before the teacher trains, not after
        (["--set", "degrade.steps=4"], "distinct probe steps"),
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path, capsys, args, message):
    assert main(["demo", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_data_files_from_the_command_line(tmp_path, capsys):
    bad = np.random.default_rng(0).normal(size=(100, 2))
    bad[5, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert main(["teacher", "--data", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "t")]) == 2
    assert "NaN" in capsys.readouterr().err
    assert (
        main(
            ["backtrack", "--teacher", str(tmp_path / "missing"), "--path", str(tmp_path), "--out", str(tmp_path / "b")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_demo_teacher_takes_a_teacher_file_and_the_old_spelling_of_pretrained_is_deprecated(tmp_path, capsys):
    (tmp_path / "ddpm" / "unet").mkdir(parents=True)  # a diffusers model: --teacher means --pretrained, deprecated
    assert (
        main(["demo", "--teacher", str(tmp_path / "ddpm"), "--out", str(tmp_path / "x"), "--set", "distill.stpes=1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "warning: `demo --teacher` with a diffusers model is deprecated: use --pretrained" in err
    assert "did you mean 'distill.steps'" in err  # the config is checked as before
    assert main(["demo", "--teacher", str(tmp_path / "ddpm"), "--pretrained", "x", "--out", str(tmp_path / "y")]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_teacher_that_is_not_a_teacher_is_refused_before_overwrite_deletes(tmp_path, capsys):
    t, d = tmp_path / "teacher", tmp_path / "d"
    assert main(["teacher", "--out", str(t), *TINY_ARGS, "--set", "teacher.steps=20"]) == 0
    assert main(["distill", "--teacher", str(t), "--out", str(d), *TINY_ARGS, "--set", "distill.steps=2"]) == 0
    before = sorted(p.name for p in d.iterdir())
    for command in (["degrade"], ["distill"]):  # a generator given as the teacher
        args = [*command, "--teacher", str(d / "generator.safetensors"), "--out", str(d), "--overwrite", *TINY_ARGS]
        assert main(args) == 2
        assert "is a generator, not a teacher denoiser" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == before
    assert main(["demo", "--teacher", str(tmp_path / "tacher.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "no teacher file at" in capsys.readouterr().err  # a typo, not a deprecated diffusers model
    assert main(["demo", "--teacher", str(t), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "would delete the teacher" in capsys.readouterr().err and (t / "teacher.safetensors").is_file()
