"""Node placement (distance-spaced recording) and the adaptive target schedule."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import tiny_config
from disback import stages
from disback.method.path import DegradationPath
from disback.method.recording import DistanceRecorder, evenness, node_steps, probe_steps
from disback.method.schedules import AdaptiveSchedule
from disback.storage.meta import ModelMeta

WALKER_META = ModelMeta(role="denoiser", kind="edm", shape=[1], normaliser={"mean": 0.0, "scale": 1.0})


class Walker(torch.nn.Module):
    """A 'model' whose one weight walks along a known distance curve, fast early as a degrading model does."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def test_distance_recorder_spaces_nodes_evenly_on_a_fast_early_curve(tmp_path):
    steps, nodes = 400, 8
    curve = lambda t: 1.0 - math.exp(-t / 12.0)  # 97% of the way within the first 10% of the steps
    model = Walker()
    path = DegradationPath.create(tmp_path / "path", {})
    path.add_node(model, 0, WALKER_META, 0.0)
    recorder = DistanceRecorder(
        path, model, nodes, steps, probes=0, candidates=4, meta=WALKER_META, probe=lambda m: float(m.w.detach())
    )
    for t in range(1, steps + 1):
        model.w.data.fill_(curve(t))
        recorder.on_step_end(t, None)
    assert len(recorder.candidates) <= 4 * nodes + 1  # bounded memory however long stage 1 is
    recorder.finish()
    reloaded = DegradationPath.load(tmp_path / "path")
    distances = [n.distance for n in reloaded.nodes]
    steps_of = [n.step for n in reloaded.nodes]
    assert len(distances) == nodes + 1 and steps_of[-1] == steps
    assert steps_of == sorted(set(steps_of)), "nodes must be in stage-1 order, each a different checkpoint"
    # Stated tolerance: every node within 5% of the total distance of k/N of it (the spacing is 12.5%).
    assert evenness(distances) <= 0.05, distances
    # Evenly stepped nodes on the same curve are far from even: the case distance spacing exists for.
    assert evenness([0.0] + [curve(s) for s in node_steps("steps", steps, nodes)]) > 0.5
    # The weights written are the model's at that step.
    for node in reloaded.nodes[1:]:
        reloaded.load_node(node.index, model)
        assert float(model.w.detach()) == pytest.approx(curve(node.step))


def test_record_path_with_distance_spacing_on_a_real_teacher(tiny_teacher, tmp_path):
    teacher_file, cfg = tiny_teacher
    cfg = tiny_config(network={"hidden": 64}, degrade={"steps": 60, "nodes": 4, "spacing": "distance"})
    path = stages.record_path(cfg, teacher_file, tmp_path / "path", show_progress=False)
    distances = [n.distance for n in path.nodes]
    assert distances[0] == 0.0 and all(d > 0 for d in distances[1:])
    # Stated tolerance for SGD's noisy distance curve: within a quarter of the node spacing.
    assert evenness(distances) <= 0.25 / cfg.degrade.nodes, distances
    assert path.nodes[-1].step == cfg.degrade.steps


def test_step_spacings():
    assert node_steps("steps", 100, 4) == [25, 50, 75, 100]
    geo = node_steps("geometric", 100, 4)
    assert geo[-1] == 100 and geo == sorted(set(geo)) and geo[0] < 25
    assert node_steps("geometric", 5, 5) == [1, 2, 3, 4, 5]  # strictly increasing even when K_1^(k/N) repeats
    probes = probe_steps(400, 64)
    assert probes[0] == 1 and probes[-1] == 400 and sum(p <= 40 for p in probes) > len(probes) / 3


def _run(schedule: AdaptiveSchedule, gaps) -> list[int]:
    """Generator steps at which the schedule switched, feeding it one gap per step."""
    return [t for t, gap in enumerate(gaps, start=1) if schedule.step(gap)]


def test_adaptive_schedule_advances_when_the_gap_has_fallen():
    s = AdaptiveSchedule(num_nodes=3, ratio=0.5, min_dwell=10, max_dwell=100)
    # window = 5: reference = mean of the first 5 gaps (1.0); then the gap falls to 0.4 from step 11 on.
    gaps = [1.0] * 10 + [0.4] * 30
    switches = _run(s, gaps)
    # At step 15 the last 5 gaps average 0.4 <= 0.5 * 1.0 for the first time.
    assert switches[0] == 15 and s.current == 0


def test_adaptive_schedule_respects_the_dwell_bounds():
    early = AdaptiveSchedule(num_nodes=4, ratio=0.5, min_dwell=10, max_dwell=40)
    assert _run(early, [1.0] * 5 + [0.0] * 30)[0] == 10  # caught up at once: still waits min_dwell
    never = AdaptiveSchedule(num_nodes=4, ratio=0.5, min_dwell=10, max_dwell=40)
    assert _run(never, [1.0] * 200) == [40, 80]  # never caught up: moves at max_dwell; stays at the teacher (node 0)


@pytest.mark.parametrize("seed", range(5))
def test_adaptive_schedule_never_skips_a_node(seed):
    rng = random.Random(seed)
    s = AdaptiveSchedule(num_nodes=7, ratio=0.6, min_dwell=4, max_dwell=30)
    visits, switches = [s.current], []
    for t in range(1, 400):
        if s.step(rng.random() * (1.0 if s.since_switch < 3 else rng.random())):
            visits.append(s.current), switches.append(t)
    assert visits == [5, 4, 3, 2, 1, 0]
    assert all(4 <= b - a <= 30 for a, b in zip([0] + switches, switches))


def test_adaptive_schedule_state_round_trips():
    gaps = [1.0] * 7 + [0.3] * 50
    a = AdaptiveSchedule(num_nodes=4, ratio=0.5, min_dwell=6, max_dwell=50)
    first = _run(a, gaps[:9])
    b = AdaptiveSchedule(num_nodes=4, ratio=0.5, min_dwell=6, max_dwell=50)
    b.load_state_dict(a.state_dict())
    assert _run(a, gaps[9:]) == _run(b, gaps[9:]) and not first


def test_adaptive_schedule_ignores_skipped_steps():
    s = AdaptiveSchedule(num_nodes=3, ratio=0.5, min_dwell=10, max_dwell=100)
    gaps = [1.0, float("nan")] + [1.0] * 8 + [0.4] * 30  # a non-finite gap in the reference window
    assert _run(s, gaps)[0] == 15  # as without it: a NaN in the reference would otherwise block until max_dwell (100)
