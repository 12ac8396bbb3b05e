"""The degradation path and the target schedule: the two places where the original release went wrong."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from disback import stages
from disback.diffusion.denoisers import build_denoiser
from disback.engine.loop import train_loop
from disback.errors import DisbackError
from disback.method.distillation import Distillation
from disback.method.path import DegradationPath
from disback.method.recording import DistanceProbe, StepRecorder
from disback.method.schedules import AdaptiveSchedule, FixedSchedule, WarmStart
from disback.method.score_fitting import ScoreFitting
from disback.stages.distill import warn_short_walk
from disback.stages.runtime import accelerator
from disback.storage.files import sha256_file
from disback.storage.meta import ModelMeta
from disback.storage.models import generator_from_teacher, load_model, save_model
from disback.storage.weights import load_weights, save_weights

POINT_META = ModelMeta(role="denoiser", kind="edm", shape=[2], normaliser={"mean": 0.0, "scale": 1.0})


def _equal(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k].cpu(), state[k]) for k in own)


class Snapshots:
    """A loop callback that copies the model's weights after every step, independently of the recorder."""

    def __init__(self, model):
        self.model, self.states = model, {}

    def on_step_end(self, step, task):
        self.states[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def test_recorder_writes_n_plus_one_nodes_matching_sha_and_the_model_at_their_step(tiny_teacher, tmp_path):
    teacher_file, cfg = tiny_teacher
    teacher, meta = load_model(teacher_file)
    degrading = copy.deepcopy(teacher).requires_grad_(True)
    gen0 = generator_from_teacher(teacher, meta, cfg.distill.sigma_g).requires_grad_(False)
    path = DegradationPath.create(tmp_path / "path", {})
    path.add_node(degrading, 0, meta)
    task = ScoreFitting(
        degrading,
        lambda n: (gen0(torch.randn(n, 2)), None),
        batch=32,
        lr=1e-3,
        edm=cfg.edm,
        accelerator=accelerator(),
        stage="degrade",
    )
    snaps = Snapshots(degrading)
    probe = DistanceProbe(teacher, gen0(torch.randn(32, 2)), None, cfg.edm)
    train_loop(task, 12, callbacks=[StepRecorder(path, degrading, [4, 8, 12], meta, probe), snaps], show_progress=False)

    reloaded = DegradationPath.load(tmp_path / "path")
    assert [n.index for n in reloaded.nodes] == [0, 1, 2, 3]
    assert [n.step for n in reloaded.nodes] == [0, 4, 8, 12]
    for node in reloaded.nodes:
        file = tmp_path / "path" / node.file
        assert sha256_file(file) == node.sha256
        expected = teacher.state_dict() if node.step == 0 else snaps.states[node.step]
        state = load_file(str(file))
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state), (
            f"node {node.index} differs from the model at step {node.step}"
        )
    # Each node's recorded distance is the probe's measure of that node's weights.
    for node in reloaded.nodes[1:]:
        model = copy.deepcopy(teacher)
        model.load_state_dict(snaps.states[node.step])
        assert node.distance == pytest.approx(probe(model)) and node.distance > 0
    # The model kept training after a node was saved: consecutive nodes must differ.
    a, b = (
        load_file(str(tmp_path / "path" / reloaded.nodes[1].file)),
        load_file(str(tmp_path / "path" / reloaded.nodes[2].file)),
    )
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_record_path_stage_makes_the_configured_number_of_nodes(tiny_teacher, tmp_path):
    teacher_file, cfg = tiny_teacher
    path = stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    assert len(path) == cfg.degrade.nodes + 1
    manifest = DegradationPath.load(tmp_path / "path")
    assert manifest.config["teacher_sha256"] == sha256_file(teacher_file)
    assert manifest.nodes[-1].step == cfg.degrade.steps
    teacher, _ = load_model(teacher_file)
    node0, _ = load_model(tmp_path / "path" / manifest.nodes[0].file)
    assert _equal(node0, teacher.state_dict())


def test_fixed_schedule_order_and_dwell():
    s = FixedSchedule(num_nodes=5, every=3)
    visited = [s.current]
    for _ in range(30):
        if s.step():
            visited.append(s.current)
    assert visited == [3, 2, 1, 0]
    assert s.at_teacher
    one = FixedSchedule(num_nodes=1, every=1)
    assert one.current == 0 and not any(one.step() for _ in range(5))


def test_warm_start_targets_the_teacher_from_the_first_step():
    s = WarmStart(num_nodes=6)
    assert s.current == 0 and not any(s.step(1.0) for _ in range(50))


def _distinct_path(root, cfg, n_nodes):
    """A path whose every node has different weights, so that a wrong or missing load is visible."""
    model = build_denoiser(cfg.network, (2,), cfg.edm.sigma_data)
    path = DegradationPath.create(root, {})
    for i in range(n_nodes):
        torch.manual_seed(100 + i)
        for p in model.parameters():
            p.data.normal_(0, 0.1)
        path.add_node(model, i * 10, POINT_META)
    return path, model


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_schedule_visits_every_node_in_order_ends_at_teacher_and_loads_each_exactly(tmp_path, kind):
    cfg = tiny_config(distill={"switch_every": 3, "steps": 20})
    schedule = FixedSchedule(5, 3) if kind == "fixed" else AdaptiveSchedule(5, ratio=0.5, min_dwell=2, max_dwell=4)
    path, model = _distinct_path(tmp_path / "path", cfg, n_nodes=5)
    node_states = {n.index: load_file(str(tmp_path / "path" / n.file)) for n in path.nodes}
    generator = generator_from_teacher(model, POINT_META, cfg.distill.sigma_g)
    fake, target = copy.deepcopy(model), copy.deepcopy(model)
    task = Distillation(
        generator,
        fake,
        target,
        path,
        schedule,
        cfg=cfg.distill,
        edm=cfg.edm,
        shape=(2,),
        accelerator=accelerator(),
        stage="backtrack",
    )
    assert _equal(fake, node_states[4]), "the fake score must start at the last node"

    seen = []

    class Watch:
        def on_step_end(self, step, t):
            node = t.target_node()
            seen.append(node)
            assert _equal(t.target, node_states[node]), f"target at step {step} is not node {node}'s file"
            # the next node is being read ahead, so that the switch to it only copies weights
            assert (t.nodes.ahead[0] if t.nodes.ahead else None) == t.schedule.upcoming

    assert _equal(task.target, node_states[3])
    train_loop(task, 20, callbacks=[Watch()], show_progress=False)
    visits = [n for i, n in enumerate(seen) if i == 0 or seen[i - 1] != n]
    assert visits[0] == 3 and visits == [3, 2, 1, 0], visits
    assert seen[-1] == 0 and task.schedule.at_teacher
    assert len(task.switch_seconds) == len(task.switches) and all(0 <= s < 5 for s in task.switch_seconds)
    if kind == "fixed":
        assert task.switches == [3, 6, 9]
    else:
        assert all(2 <= b - a <= 4 for a, b in zip([0] + task.switches, task.switches)), task.switches


def test_loading_a_node_whose_keys_do_not_match_fails_loudly(tmp_path):
    cfg = tiny_config()
    model = build_denoiser(cfg.network, (2,), cfg.edm.sigma_data)
    # The original release's node files: the whole guidance model, keys prefixed by its submodule names.
    wrapped = {f"module.fake_unet.{k}": v.clone() for k, v in model.state_dict().items()}
    save_file(wrapped, str(tmp_path / "node.safetensors"))
    with pytest.raises(DisbackError, match="missing keys.*unexpected keys"):
        load_weights(model, tmp_path / "node.safetensors")
    wider = build_denoiser(tiny_config(network={"hidden": 48}).network, (2,), cfg.edm.sigma_data)
    save_weights(wider, tmp_path / "wide.safetensors")
    with pytest.raises(DisbackError, match="shape mismatch"):
        load_weights(model, tmp_path / "wide.safetensors")


def _flip_a_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_corrupted_node_is_refused(tmp_path):
    cfg = tiny_config()
    path, model = _distinct_path(tmp_path / "path", cfg, n_nodes=2)
    _flip_a_byte(tmp_path / "path" / path.nodes[1].file)
    with pytest.raises(DisbackError, match="sha256"):
        DegradationPath.load(tmp_path / "path").load_node(1, model)


def test_a_node_corrupted_before_it_is_read_ahead_fails_the_switch(tmp_path):
    cfg = tiny_config()
    path, model = _distinct_path(tmp_path / "path", cfg, n_nodes=3)
    _flip_a_byte(tmp_path / "path" / path.nodes[0].file)
    generator = generator_from_teacher(model, POINT_META, cfg.distill.sigma_g)
    task = Distillation(
        generator,
        copy.deepcopy(model),
        copy.deepcopy(model),
        path,
        FixedSchedule(3, 2),
        cfg=cfg.distill,
        edm=cfg.edm,
        shape=(2,),
        accelerator=accelerator(),
        stage="backtrack",
    )
    task.train_step()  # on node 1; node 0 (the corrupted one) is read ahead in the background
    with pytest.raises(DisbackError, match="sha256"):
        task.train_step()  # the switch to node 0


def test_a_path_from_another_teacher_is_refused(tiny_teacher, tmp_path):
    teacher_file, cfg = tiny_teacher
    stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    other = tmp_path / "other.safetensors"
    teacher, meta = load_model(teacher_file)
    torch.nn.init.zeros_(next(teacher.parameters()))
    save_model(teacher, other, meta)
    with pytest.raises(DisbackError, match="another teacher"):
        stages.load_path_for(other, tmp_path / "path")


def test_a_fixed_walk_that_ends_after_the_budget_is_warned_with_the_fix(caplog):
    cfg = tiny_config(distill={"steps": 30, "switch_every": 10, "schedule": "fixed"})
    with caplog.at_level(logging.WARNING, logger="disback"):
        warn_short_walk(cfg, 4)  # 3 switches x 10 steps: the teacher only when the budget has ended
    assert re.search(r"reaches the teacher at step 30.*switch_every to at most 5", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="disback"):
        warn_short_walk(cfg, 3)  # at step 20 of 30: fine
        warn_short_walk(tiny_config(distill={"steps": 30, "switch_every": 10, "schedule": "adaptive"}), 4)
    assert caplog.text == ""
