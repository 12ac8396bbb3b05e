"""Runs that survive: faults injected for real (killed processes, truncated and bit-flipped files, NaN in a weight)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_ARGS, tiny_config
from disback import stages
from disback.cli import main
from disback.data import load_data
from disback.engine.checkpoint import Checkpoints
from disback.engine.log import read_metrics
from disback.errors import DisbackError
from disback.method.path import DegradationPath
from disback.stages.common import DataSource

CKPT = {"run": {"checkpoint_every": 5, "keep": 3}}


class Crash:
    """A loop callback that dies after step ``at`` has trained, before anything of that step is saved: a kill."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, step, task):
        if step == self.at:
            raise KeyboardInterrupt


def interrupted(run, at: int):
    """``run(resume, callbacks)`` crashed at step ``at``, then resumed."""
    with pytest.raises(KeyboardInterrupt):
        run(False, [Crash(at)])
    return run(True, [])


def same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{name} differs after resuming"


def same_metrics(a: Path, b: Path) -> None:
    strip = lambda recs: [{k: v for k, v in r.items() if k != "wall_s"} for r in recs]  # noqa: E731
    assert strip(read_metrics(a / "metrics.jsonl")) == strip(read_metrics(b / "metrics.jsonl"))


def test_teacher_resumes_bit_identically(monkeypatch, tmp_path):
    cfg = tiny_config(teacher={"steps": 40}, **CKPT)
    data = load_data(cfg.data, cfg.seed)
    stages.train_teacher(cfg, data, tmp_path / "a", show_progress=False)
    interrupted(lambda resume, cbs: stages.train_teacher(cfg, data, tmp_path / "b", False, resume, cbs), at=17)
    same_files(tmp_path / "a", tmp_path / "b", ["teacher.safetensors"])
    same_metrics(tmp_path / "a", tmp_path / "b")
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "b" / "samples.npy"))


@pytest.mark.parametrize("spacing", ["steps", "distance"])
def test_degradation_recording_resumes_bit_identically(tiny_teacher, monkeypatch, tmp_path, spacing):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, degrade={"spacing": spacing, "steps": 30}, **CKPT)
    a = stages.record_path(cfg, teacher_file, tmp_path / "a", show_progress=False)
    b = interrupted(
        lambda resume, cbs: stages.record_path(cfg, teacher_file, tmp_path / "b", False, resume, cbs), at=13
    )
    assert b.complete and [(n.step, n.sha256, n.distance) for n in a.nodes] == [
        (n.step, n.sha256, n.distance) for n in b.nodes
    ]


@pytest.mark.parametrize("method,schedule", [("dmd", "adaptive"), ("dmd2", "fixed")])
def test_backtracking_resumes_bit_identically(tiny_teacher, monkeypatch, tmp_path, method, schedule):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(
        network={"hidden": 64},
        distill={"method": method, "schedule": schedule, "steps": 24, "min_dwell": 2, "max_dwell": 4},
        **CKPT,
    )
    data = load_data(cfg.data, cfg.seed)
    path = stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    a = stages.distill(cfg, data, teacher_file, path, tmp_path / "a", show_progress=False)
    b = interrupted(
        lambda resume, cbs: stages.distill(cfg, data, teacher_file, path, tmp_path / "b", False, resume, cbs), at=13
    )
    assert a["switches"] == b["switches"] and len(a["switches"]) == 3
    same_files(tmp_path / "a", tmp_path / "b", ["generator.safetensors", "fake.safetensors"])
    same_metrics(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_teacher, tmp_path, caplog, damage):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, distill={"steps": 20}, **CKPT)
    data = load_data(cfg.data, cfg.seed)
    stages.distill(cfg, data, teacher_file, None, tmp_path / "a", show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        stages.distill(cfg, data, teacher_file, None, tmp_path / "b", show_progress=False, callbacks=[Crash(17)])
    folder = tmp_path / "b" / "checkpoints"
    entries = Checkpoints(folder).entries()
    assert [e["step"] for e in entries] == [5, 10, 15]  # keep=3, each complete
    newest = folder / entries[-1]["file"]
    raw = bytearray(newest.read_bytes())
    newest.write_bytes(
        bytes(raw[: len(raw) // 2]) if damage == "truncate" else bytes(raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
    )
    (folder / ".checkpoint-000000020.safetensors.tmp").write_bytes(b"half a save")  # a save the kill interrupted
    stages.distill(cfg, data, teacher_file, None, tmp_path / "b", show_progress=False, resume=True)
    assert "trying an older checkpoint" in caplog.text
    same_files(tmp_path / "a", tmp_path / "b", ["generator.safetensors"])


def test_old_checkpoints_are_pruned_and_none_readable_is_a_clear_error(tiny_teacher, tmp_path):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, distill={"steps": 20}, run={"checkpoint_every": 5, "keep": 2})
    data = load_data(cfg.data, cfg.seed)
    stages.distill(cfg, data, teacher_file, None, tmp_path / "a", show_progress=False)
    folder = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-000000015.safetensors",
        "checkpoint-000000020.safetensors",
        "index.json",
    ]
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(DisbackError, match="no checkpoint .* can be read; delete"):
        Checkpoints(folder).latest()


class Poison:
    """Puts NaN into one weight of the generator after step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, step, task):
        if step == self.at:
            with torch.no_grad():
                next(task.generator.parameters()).view(-1)[0] = float("nan")


@pytest.mark.parametrize(
    "at,message",
    [
        (12, r"loss 'generator' became non-finite at step 13; the last good checkpoint \(step 10\)"),
        (10, r"weights became non-finite by step 10; the last good checkpoint \(step 5\)"),
    ],
)
def test_nan_in_a_weight_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_teacher, tmp_path, at, message):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, distill={"steps": 20}, **CKPT)
    with pytest.raises(DisbackError, match=message):
        stages.distill(
            cfg,
            load_data(cfg.data, cfg.seed),
            teacher_file,
            None,
            tmp_path / "run",
            show_progress=False,
            callbacks=[Poison(at)],
        )
    step, state = Checkpoints(tmp_path / "run" / "checkpoints").latest()
    assert step == (10 if at == 12 else 5)
    assert all(torch.isfinite(v).all() for v in state["task"]["generator"].values())


def test_skip_mode_skips_a_bad_batch_and_counts_it(monkeypatch, tmp_path):
    cfg = tiny_config(teacher={"steps": 20}, run={"on_nonfinite": "skip", "checkpoint_every": 5})
    calls = {"n": 0}
    real_call = DataSource.__call__

    def flaky(self, n):
        calls["n"] += 1
        x, y = real_call(self, n)
        return (x * float("nan"), y) if calls["n"] == 7 else (x, y)

    monkeypatch.setattr(DataSource, "__call__", flaky)
    stages.train_teacher(cfg, load_data(cfg.data, cfg.seed), tmp_path / "t", show_progress=False)
    assert read_metrics(tmp_path / "t" / "metrics.jsonl")[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "t" / "teacher.safetensors")).values())


def test_a_broken_path_fails_before_any_training(tiny_teacher, tmp_path, capsys):
    teacher_file, cfg = tiny_teacher
    stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    manifest = json.loads((tmp_path / "path" / "manifest.json").read_text())
    args = [
        "backtrack",
        "--teacher",
        str(teacher_file),
        "--path",
        str(tmp_path / "path"),
        *TINY_ARGS,
        "--set",
        "network.hidden=64",
    ]
    # A node file that is not safetensors, even with a matching sha256 in the manifest.
    node = tmp_path / "path" / manifest["nodes"][2]["file"]
    node.write_text("these are not weights")
    import hashlib

    manifest["nodes"][2]["sha256"] = hashlib.sha256(node.read_bytes()).hexdigest()
    (tmp_path / "path" / "manifest.json").write_text(json.dumps(manifest))
    assert main([*args, "--out", str(tmp_path / "r1")]) == 2
    assert f"{node} is not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()
    # A manifest that names a missing file.
    node.unlink()
    assert main([*args, "--out", str(tmp_path / "r2")]) == 2
    assert "names node files that are missing" in capsys.readouterr().err
    # An interrupted recording is refused, with the command that finishes it.
    manifest["complete"] = False
    (tmp_path / "path" / "manifest.json").write_text(json.dumps(manifest))
    node.write_text("x")
    assert main([*args, "--out", str(tmp_path / "r3")]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_stage_folders_are_not_overwritten_without_being_asked(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["teacher", "--out", str(out), *TINY_ARGS, "--set", "teacher.steps=20"]) == 0
    before = (out / "teacher.safetensors").read_bytes()
    assert main(["teacher", "--out", str(out), *TINY_ARGS, "--set", "teacher.steps=20"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["teacher", "--out", str(out), *TINY_ARGS, "--set", "teacher.steps=30", "--resume"]) == 2
    assert "teacher.steps: 20 -> 30" in capsys.readouterr().err
    assert (out / "teacher.safetensors").read_bytes() == before
    assert main(["teacher", "--out", str(out), *TINY_ARGS, "--set", "teacher.steps=30", "--overwrite"]) == 0


@pytest.mark.slow
def test_a_demo_killed_at_a_random_moment_resumes_to_the_same_result(tmp_path):
    """A real SIGKILL of a real process, at a random moment after its first checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = [
        sys.executable,
        "-m",
        "disback",
        "demo",
        *TINY_ARGS,
        "--set",
        "teacher.steps=600",
        "--set",
        "distill.steps=150",
        "--set",
        "run.checkpoint_every=10",
    ]
    whole = subprocess.Popen(
        [*args, "--out", str(tmp_path / "a")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        [*args, "--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list((tmp_path / "b").glob("*/checkpoints/index.json")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 3.0))
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run([*args, "--out", str(tmp_path / "b"), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert whole.wait() == 0, whole.stderr.read()
    same_files(tmp_path / "a" / "teacher", tmp_path / "b" / "teacher", ["teacher.safetensors"])
    assert [n.sha256 for n in DegradationPath.load(tmp_path / "a" / "path").nodes] == [
        n.sha256 for n in DegradationPath.load(tmp_path / "b" / "path").nodes
    ]
    for run in ("disback", "baseline"):
        same_files(tmp_path / "a" / run, tmp_path / "b" / run, ["generator.safetensors"])


def test_a_recording_stopped_at_its_plateau_stays_stopped_when_resumed(tiny_teacher, monkeypatch, tmp_path):
    """Killed after the loop ended early (plateau) but before the nodes were written: resuming must not train on."""
    from disback.method.recording import DistanceRecorder

    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, degrade={"spacing": "distance", "steps": 400, "plateau": 0.2}, **CKPT)
    a = stages.record_path(cfg, teacher_file, tmp_path / "a", show_progress=False)
    assert a.nodes[-1].step < 400, "this test needs a plateau stop"
    real = DistanceRecorder.finish
    monkeypatch.setattr(DistanceRecorder, "finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        stages.record_path(cfg, teacher_file, tmp_path / "b", show_progress=False)
    monkeypatch.setattr(DistanceRecorder, "finish", real)
    b = stages.record_path(cfg, teacher_file, tmp_path / "b", show_progress=False, resume=True)
    assert [(n.step, n.sha256) for n in a.nodes] == [(n.step, n.sha256) for n in b.nodes]


def test_resuming_from_another_teacher_is_refused(tiny_teacher, tmp_path, capsys):
    teacher_file, _ = tiny_teacher
    other = tmp_path / "other.safetensors"
    other.write_bytes(teacher_file.read_bytes())
    args = ["degrade", "--out", str(tmp_path / "p"), *TINY_ARGS, "--set", "network.hidden=64"]
    assert main([*args, "--teacher", str(teacher_file)]) == 0
    from disback.storage.models import load_model, save_model

    model, meta = load_model(teacher_file)
    torch.nn.init.zeros_(next(model.parameters()))
    save_model(model, other, meta)
    assert main([*args, "--teacher", str(other), "--resume"]) == 2
    assert "another teacher or path" in capsys.readouterr().err
    # --overwrite checks the new settings before it deletes anything: a typo leaves the old run in place.
    assert main([*args, "--teacher", str(other), "--overwrite", "--set", "degrade.stpes=3"]) == 2
    assert "did you mean 'degrade.steps'" in capsys.readouterr().err
    assert DegradationPath.load(tmp_path / "p").complete


def test_too_few_distance_probes_fail_before_training(tiny_teacher, tmp_path):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, degrade={"spacing": "distance", "probes": 3, "plateau": 0.0})
    with pytest.raises(DisbackError, match="raise degrade.probes"):
        stages.record_path(cfg, teacher_file, tmp_path / "p", show_progress=False)
    assert not (tmp_path / "p" / "metrics.jsonl").exists()


def test_a_teacher_for_other_data_is_refused_before_training(tiny_teacher, tmp_path, capsys):
    teacher_file, _ = tiny_teacher
    points = tmp_path / "xyz.csv"
    np.savetxt(points, np.random.default_rng(0).normal(size=(200, 3)), delimiter=",")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher_file), "--data", str(points), "--out", str(out), *TINY_ARGS]) == 2
    err = capsys.readouterr().err
    assert "takes samples of shape (2,)" in err and "has shape (3,)" in err
    assert not (out / "metrics.jsonl").exists()


def test_checkpoint_every_zero_saves_none_and_a_negative_value_is_refused(tiny_teacher, tmp_path):
    teacher_file, _ = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, distill={"steps": 6}, run={"checkpoint_every": 0})
    result = stages.distill(cfg, load_data(cfg.data, cfg.seed), teacher_file, None, tmp_path / "a", show_progress=False)
    assert (tmp_path / "a" / "generator.safetensors").is_file() and result["records"][-1]["iteration"] == 6
    assert not (tmp_path / "a" / "checkpoints").exists()
    with pytest.raises(DisbackError, match=r"'run.checkpoint_every' must be 0 \(no checkpoints\) or positive, got -1"):
        tiny_config(run={"checkpoint_every": -1})


def test_a_file_changed_in_place_is_hashed_again_and_a_settled_one_once(tmp_path, monkeypatch):
    from disback.storage import files

    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 1000)
    first = files.sha256_file(file)
    file.write_bytes(b"b" * 1000)  # same size, same inode, within the file system clock's tick
    assert files.sha256_file(file) != first
    old = time.time() - 60
    os.utime(file, (old, old))  # a file last changed a minute ago: hashed once, then remembered
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    assert files.sha256_file(file) == files.sha256_file(file)
    assert len(opened) == 1
