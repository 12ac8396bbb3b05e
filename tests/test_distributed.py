"""Several processes (torchrun / accelerate launch, gloo on the CPU) compute what one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_ARGS

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
# DMD2 (GAN head, two fake updates), nodes spaced by distance, the adaptive schedule with short dwells: the paths where
# processes must agree (probe distances, the gap, the head's gradients) and at least one target switch.
SETTINGS = ["--method", "dmd2", "--set", "distill.fake_updates=2", "--set", "degrade.spacing=distance",
            "--set", "degrade.plateau=0.05", "--set", "distill.schedule=adaptive", "--set", "distill.min_dwell=2",
            "--set", "distill.max_dwell=4"]
# Gradients are averaged over 2 half batches instead of one batch: the sums differ in rounding only.
TOLERANCE = 1e-5


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    demo = ["-m", "disback", "demo", *TINY_ARGS, *SETTINGS]
    one = subprocess.Popen([sys.executable, *demo, "--out", str(tmp_path / "one")], env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    two = subprocess.run([*TORCHRUN, "29631", *demo, "--out", str(tmp_path / "two")], env=env(),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.wait(timeout=600) == 0, one.stderr.read()[-3000:]
    assert two.stdout.count("report:") == 1  # the main process alone prints the report

    a, b = tmp_path / "one", tmp_path / "two"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) >= 8  # teacher, nodes, two generators and fake scores
    for f in weights:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        worst = max((x[k] - y[k]).abs().max().item() for k in x)
        assert worst < TOLERANCE, f"{f}: differs by {worst:.2e}"
    for run in ("disback", "baseline"):
        ra, rb = metrics(a / run), metrics(b / run)
        assert [(r["iteration"], r["target_node"]) for r in ra] == [(r["iteration"], r["target_node"]) for r in rb]
        assert [r["swd"] for r in rb] == pytest.approx([r["swd"] for r in ra], rel=1e-4)
    switches = json.loads((b / "disback" / "result.json").read_text())["switches"]
    assert switches and switches == json.loads((a / "disback" / "result.json").read_text())["switches"]
    assert metrics(b / "path")[-1]["distance"] == pytest.approx(metrics(a / "path")[-1]["distance"], rel=1e-4)


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
assert seen == [labels[rank::2].tolist()]  # every process evaluates every class
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
    proc = subprocess.run([*TORCHRUN, "29632", str(script), str(tmp_path)], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank-0.ok", "rank-1.ok"]
