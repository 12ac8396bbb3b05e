"""Several processes (torchrun / accelerate launch, gloo on the CPU): a sharded run resumes, the helpers split and
gather; test_launch_matrix.py checks that two processes compute what one computes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]


def free_port() -> str:
    """A port no other process is listening on now (fixed ports collide with a lingering or concurrent run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# Under run.fsdp: a distillation killed after step 6 and resumed from its step-4 checkpoint (sharded model and Adam
# states gathered into the file, then scattered back) ends where an uninterrupted one does; the networks are sharded.
RESUME = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from conftest import tiny_config
from torch.distributed.tensor import DTensor
from disback import stages
from disback.data import load_data
from disback.distributed import finish, state

out = Path(sys.argv[1])
cfg = tiny_config(distill={"steps": 12, "switch_every": 3, "method": "dmd2", "fake_updates": 2},
                  run={"fsdp": True, "checkpoint_every": 4})
data = load_data(cfg.data, cfg.seed)
teacher = stages.train_teacher(cfg, data, out / "teacher", show_progress=False)
path = stages.record_path(cfg, teacher, out / "path", show_progress=False)


class Crash:
    def on_step_end(self, step, task):
        if step == 6:
            raise KeyboardInterrupt


class Count:
    def __init__(self):
        self.steps, self.task = [], None

    def on_step_end(self, step, task):
        self.steps.append(step)
        self.task = task


try:
    stages.distill(cfg, data, teacher, path, out / "resumed", show_progress=False, callbacks=[Crash()])
    raise AssertionError("the run was not interrupted")
except KeyboardInterrupt:
    pass
count = Count()
stages.distill(cfg, data, teacher, path, out / "resumed", show_progress=False, resume=True, callbacks=[count])
assert count.steps == list(range(5, 13)), count.steps  # steps 5 to 12: from the step-4 checkpoint, not from the start
for module in (count.task.generator, count.task.fake, count.task.head):
    p = next(module.parameters())
    assert isinstance(p, DTensor) and p.to_local().shape[0] == -(-p.shape[0] // 2), (type(p), p.shape)
stages.distill(cfg, data, teacher, path, out / "straight", show_progress=False)
open(out / f"rank-{state().process_index}.ok", "w").write("ok")
finish()
"""


@pytest.mark.slow
def test_a_sharded_run_resumes_where_it_was_killed(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    proc = subprocess.run(
        [*TORCHRUN, free_port(), str(script), str(tmp_path), str(Path(__file__).parent)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank-0.ok", "rank-1.ok"]
    a, b = tmp_path / "resumed", tmp_path / "straight"
    assert json.loads((a / "result.json").read_text())["switches"] == [3, 6, 9]
    for name in ("generator.safetensors", "fake.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-6, name
    assert [r["swd"] for r in metrics(a)] == pytest.approx([r["swd"] for r in metrics(b)], rel=1e-5)


def test_fsdp_needs_several_processes_and_full_networks():
    from conftest import tiny_config
    from disback.errors import DisbackError
    from disback.stages.runtime import accelerator, sharded

    with pytest.raises(DisbackError, match="one process"):
        sharded(tiny_config(run={"fsdp": True}), accelerator())
    assert sharded(tiny_config(), accelerator()) is False
    with pytest.raises(DisbackError, match="lora_rank"):
        tiny_config(run={"fsdp": True}, network={"lora_rank": 4})


def test_a_sharded_demo_in_one_process_stops_before_it_writes_anything(tmp_path, capsys):
    from disback.cli import main

    assert main(["demo", "--set", "run.fsdp=true", "--out", str(tmp_path / "demo")]) == 2
    assert "torch.distributed.run --nproc_per_node" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


HELPERS = """
import sys
import torch
from disback.distributed import local, state, strided, world
from disback.errors import DisbackError
rank = state().process_index
assert world() == 2
z = torch.arange(7.0)
labels = torch.arange(7) % 3  # balanced labels, as the evaluation draws them
seen = []
out = strided(lambda zz, yy: (seen.append(yy.tolist()), zz * 10)[1], z, labels)
assert out.tolist() == (z * 10).tolist(), out  # gathered back in z's order, the odd item included
mine = labels[rank::2].tolist()  # every class in every process; the shorter share padded with its first item
assert seen == [mine + mine[:1] * (4 - len(mine))]  # (both processes run fn on 4 items: a sharded network needs both)
assert local(torch.arange(8)).tolist() == list(range(4 * rank, 4 * rank + 4))
try:
    local(torch.arange(7))
except DisbackError as exc:
    assert "multiples of 2" in str(exc)
else:
    raise AssertionError("a batch of 7 was split over 2 processes")
open(sys.argv[1] + f"/rank-{rank}.ok", "w").write("ok")  # a file per process: their stdout may interleave
from disback.distributed import finish
finish()
"""


def test_helpers_split_and_gather_across_two_processes(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    proc = subprocess.run(
        [*TORCHRUN, free_port(), str(script), str(tmp_path)], env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank-0.ok", "rank-1.ok"]
