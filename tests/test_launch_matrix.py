"""The launch matrix: two processes (gloo, on the CPU) compute what one process computes, in a pairwise cover of
{DDP, FSDP} x {plain order, reused samples} x {vsd, dmd, dmd2, sid} x {full networks, LoRA fake score} x
{fixed, adaptive, warm start}. Every cell runs the tiny demo (stage 1 with distance-spaced nodes and the plateau
stop, DisBack and the baseline) from one teacher trained by the same launch; one process runs the same cells
unsharded, side by side. Both sides run in float64 (run.precision=fp64), where the order of a reduction no longer
shows, so that the comparison can be tight."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_ARGS
from test_distributed import TORCHRUN, env, free_port, metrics

AXES = {
    "launch": ("ddp", "fsdp"),
    "order": ("plain", "reused"),
    "method": ("vsd", "dmd", "dmd2", "sid"),
    "fake": ("full", "lora"),
    "schedule": ("fixed", "adaptive", "warm_start"),
}
# 13 cells cover every pair of values of every two axes (LoRA runs data parallel: run.fsdp shards full networks).
CELLS = [
    ("ddp", "plain", "dmd2", "full", "adaptive"),
    ("fsdp", "reused", "dmd2", "full", "adaptive"),
    ("ddp", "reused", "vsd", "lora", "warm_start"),
    ("fsdp", "plain", "dmd", "full", "fixed"),
    ("fsdp", "plain", "sid", "full", "warm_start"),
    ("ddp", "reused", "sid", "lora", "fixed"),
    ("ddp", "reused", "dmd", "lora", "adaptive"),
    ("fsdp", "plain", "vsd", "full", "fixed"),
    ("ddp", "plain", "dmd2", "lora", "warm_start"),
    ("fsdp", "reused", "vsd", "full", "adaptive"),
    ("ddp", "reused", "sid", "full", "adaptive"),
    ("fsdp", "reused", "dmd", "full", "warm_start"),
    ("ddp", "reused", "dmd2", "lora", "fixed"),
]
# Beyond the pairwise cover, the generator's own settings, each on a cell of the cover: k-step generators (DMD2's
# backward simulation: every process must draw the same step each iteration) and the LoRA generator.
EXTRA = {
    "2-step": (("ddp", "plain", "dmd", "full", "fixed"), ["--set", "distill.sigma_g=[2.5,0.5]"]),
    "3-step-fsdp": (("fsdp", "reused", "dmd2", "full", "adaptive"), ["--set", "distill.sigma_g=[2.5,1.0,0.3]"]),
    "lora-generator": (("ddp", "reused", "sid", "full", "warm_start"), ["--set", "network.generator_lora_rank=4"]),
}
# Nodes spaced by distance with the plateau stop, short adaptive dwells: the paths where processes must agree (probe
# distances, the plateau, the gap) and that switch the target several times within the tiny budget.
COMMON = [
    "--set",
    "degrade.spacing=distance",
    "--set",
    "degrade.plateau=0.05",
    "--set",
    "distill.min_dwell=2",
    "--set",
    "distill.max_dwell=4",
]
# Gradients are averaged over 2 half batches instead of one batch: the sums differ in rounding only, and Adam's
# normalised steps carry the rounding difference of a near-zero gradient into the weights. In float32 that reached
# 1.7e-5 on one machine (ddp-reused-sid-lora-fixed's baseline generator), over the 1e-5 + 1e-4 relative allowed then.
# Both sides therefore run in float64 (FP64), where the largest difference measured over every weight of every cell
# is 1.2e-14 (the reused-sample SiD cells' baseline generators; under 2e-15 elsewhere), and the swd curves and path
# distances agree to 2e-14 relative. A real mismatch is orders above: one generator step in 25 without its gradient
# all-reduce (DDP cells) moved the generator by 1.5e-4 to 4e-4, and one in 25 with the second process's half batch
# weighted 0.1% too much (a wrong share) by 9e-8 to 9e-7 (swd: 6e-8 to 4e-6 relative), which the float32 tolerance
# let through. 1e-9 sits 1e5 above the rounding and 90x below that smallest bug measured.
FP64 = ["--set", "run.precision=fp64"]
ATOL = 1e-9  # absolute only: every weight is below 1 in magnitude (0.76 at most)
REL = 1e-9  # on the swd curves and the path's distance


def name(cell: tuple[str, ...]) -> str:
    return "-".join(cell)


def cell_args(cell: tuple[str, ...], processes: int) -> list[str]:
    launch, order, method, fake, schedule = cell
    args = [
        *COMMON,
        "--method",
        method,
        "--set",
        f"distill.schedule={schedule}",
        "--set",
        f"distill.reuse_samples={order == 'reused'}",
    ]
    if fake == "lora":
        args += ["--set", "network.lora_rank=4"]
    if launch == "fsdp" and processes > 1:  # one process is the unsharded reference
        args += ["--set", "run.fsdp=true"]
    return args


def test_the_cells_cover_every_pair():
    names = list(AXES)
    assert all(len(c) == len(names) and all(v in AXES[k] for k, v in zip(names, c)) for c in CELLS)
    assert not any(c[0] == "fsdp" and c[3] == "lora" for c in CELLS)  # refused by the config, with the fix
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        wanted = {
            (x, y) for x in AXES[a] for y in AXES[b] if not {(a, x), (b, y)} >= {("launch", "fsdp"), ("fake", "lora")}
        }
        assert wanted <= {(c[i], c[j]) for c in CELLS}, (a, b, wanted - {(c[i], c[j]) for c in CELLS})


# Every cell in one process of each launch: one import and one process group, a teacher shared by the cells.
SCRIPT = """
import json, sys
from pathlib import Path
from disback.cli import run
from disback.distributed import finish
out, runs, common = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
assert run(["teacher", "--out", str(out / "teacher"), *common]) == 0
for folder, args in runs:
    assert run(["demo", "--teacher", str(out / "teacher"), "--out", str(out / folder), *common, *args]) == 0
finish()
"""


@pytest.mark.slow
def test_two_processes_match_one_process_in_every_cell(tmp_path):
    script = tmp_path / "cells.py"
    script.write_text(SCRIPT)

    def runs(processes: int) -> str:
        cells = [(name(c), cell_args(c, processes)) for c in CELLS]
        return json.dumps(cells + [(key, cell_args(c, processes) + args) for key, (c, args) in EXTRA.items()])

    one = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "one"), runs(1), json.dumps([*TINY_ARGS, *FP64])],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    two = subprocess.run(
        [*TORCHRUN, free_port(), str(script), str(tmp_path / "two"), runs(2), json.dumps([*TINY_ARGS, *FP64])],
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert two.returncode == 0, failure(two.stderr)
    assert one.wait(timeout=900) == 0, failure(one.stderr.read())
    assert two.stdout.count("report:") == len(CELLS) + len(EXTRA)  # the main process alone prints each report
    same_weights(tmp_path / "one" / "teacher", tmp_path / "two" / "teacher", ["teacher.safetensors"])
    for folder, cell in [(name(c), c) for c in CELLS] + [(key, c) for key, (c, _) in EXTRA.items()]:
        a, b = tmp_path / "one" / folder, tmp_path / "two" / folder
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
        weights = [f for f in files if f.suffix == ".safetensors"]
        assert len(weights) >= 7, cell  # nodes, two generators and fake scores
        same_weights(a, b, weights, cell)
        for run in ("disback", "baseline"):
            ra, rb = metrics(a / run), metrics(b / run)
            assert [(r["iteration"], r["target_node"]) for r in ra] == [
                (r["iteration"], r["target_node"]) for r in rb
            ], cell
            assert [r["swd"] for r in rb] == pytest.approx([r["swd"] for r in ra], rel=REL), cell
        switches = json.loads((b / "disback" / "result.json").read_text())["switches"]
        assert switches == json.loads((a / "disback" / "result.json").read_text())["switches"], cell
        assert bool(switches) == (cell[4] != "warm_start"), (cell, switches)  # warm start: the teacher from step 1
        assert metrics(b / "path")[-1]["distance"] == pytest.approx(metrics(a / "path")[-1]["distance"], rel=REL), cell


def test_fp64_runs_the_demo_in_float64_and_its_files_load_in_float32(tmp_path):
    """run.precision=fp64 (in a process of its own: it sets torch's default dtype): every network, node, checkpoint
    (Adam's states too) is float64, which a float32 input to a float64 layer would have stopped with an error; the
    files load into this float32 process as float32 files do."""
    from disback.errors import DisbackError
    from disback.stages.runtime import accelerator
    from disback.storage.models import load_model

    short = [f"--set={kv}" for kv in ("teacher.steps=20", "degrade.steps=8", "distill.steps=4", "eval.every=2")]
    proc = subprocess.run(
        [sys.executable, "-m", "disback", "demo", "--out", str(tmp_path), *TINY_ARGS, *short, *FP64],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*.safetensors")]
    assert {p.parent.name for p in files} >= {"teacher", "path", "disback", "baseline", "checkpoints"}
    for f in files:
        floats = {str(v.dtype) for v in load_file(str(f)).values() if v.is_floating_point()}
        assert floats == {"torch.float64"}, (f, floats)
    generator, _ = load_model(tmp_path / "baseline" / "generator.safetensors")
    assert next(generator.parameters()).dtype == torch.float32  # this process runs fp32
    assert torch.isfinite(generator(torch.randn(4, 2))).all()
    accelerator()
    with pytest.raises(DisbackError, match="process of its own"):
        accelerator("fp64")


def same_weights(a: Path, b: Path, files: list, cell: tuple = ()) -> None:
    for f in files:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys(), (cell, f)
        for k in x:
            assert x[k].dtype == y[k].dtype == torch.float64, (cell, f, k, x[k].dtype, y[k].dtype)
            torch.testing.assert_close(
                y[k], x[k], atol=ATOL, rtol=0, msg=lambda m, c=cell, f=f, k=k: f"{c} {f} {k}: {m}"
            )


def failure(stderr: str) -> str:
    """Each process's last lines (a dying rank's error comes before the others' connection errors)."""
    lines = stderr.splitlines()
    ranks = {line.split("]:")[0] for line in lines if line.startswith("[rank")}
    tails = ["\n".join([line for line in lines if line.startswith(rank)][-12:]) for rank in sorted(ranks)]
    return "\n\n".join(tails) or stderr[-3000:]


@pytest.mark.slow
def test_an_edm_teacher_shards_by_block_and_two_processes_match_one(tmp_path):
    """EDM's networks under run.fsdp (one unit per UNetBlock) and DDP with a LoRA fake score, in 2 processes against
    one unsharded process, in float64: every weight file to 1e-9. (This found EDM's attention computing its softmax
    in float32 under fp64 too, which made 2 processes differ from one by 1.6e-5.)"""
    from test_edm_teacher import SHORT, SONG, image_folder, snapshot

    pkl, _ = snapshot(tmp_path / "edm.pkl", "EDMPrecond", SONG)
    data = image_folder(tmp_path / "images")
    common = ["--pretrained", str(pkl), "--data", str(data), "--preset", "digits", *SHORT, *FP64]
    common += ["--set", "distill.batch=8", "--set", "degrade.batch=8"]  # shares of 4 per process
    for sharding, extra in (("fsdp", ["--set", "run.fsdp=true"]), ("lora", ["--set", "network.lora_rank=2"])):
        outs = {}
        for processes in (1, 2):
            out = tmp_path / f"{sharding}-{processes}"
            launch = [*TORCHRUN, free_port()] if processes == 2 else [sys.executable]
            args = ["-m", "disback", "demo", *common, "--out", str(out)]
            args += extra if (processes == 2 or sharding == "lora") else []
            done = subprocess.run([*launch, *args], env=env(), capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, failure(done.stderr)
            outs[processes] = out
        files = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.safetensors") if "checkpoints" not in p.parts)
        assert len(files) >= 7
        same_weights(outs[1], outs[2], files, (sharding,))  # measured: 5e-14 at most


@pytest.mark.slow
def test_a_flux_transformer_shards_by_block_and_two_processes_match_one(tmp_path):
    """`disback text` on a tiny FLUX.1-dev pipeline under run.fsdp (one unit per transformer block) in 2 processes
    against one unsharded process, in float64: every weight file to 1e-9 (measured: 1.3e-15)."""
    from flow_pipelines import build_flux

    pipeline = build_flux(tmp_path, dev=True)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\ngreen stripes\n")
    common = ["text", "--pretrained", str(pipeline), "--prompts", str(tmp_path / "prompts.txt"), *SHORT_TEXT, *FP64]
    outs = {}
    for processes in (1, 2):
        out = tmp_path / f"flux-{processes}"
        launch = [*TORCHRUN, free_port()] if processes == 2 else [sys.executable]
        args = ["-m", "disback", *common, "--out", str(out)] + (["--set", "run.fsdp=true"] if processes == 2 else [])
        done = subprocess.run([*launch, *args], env=env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, failure(done.stderr)
        outs[processes] = out
    files = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.safetensors") if "checkpoints" not in p.parts)
    assert Path("disback/generator.safetensors") in files and Path("path/node-002.safetensors") in files
    trained = [f for f in files if f.parts[0] in ("path", "disback")]  # the imported teacher is the same file
    same_weights(outs[1], outs[2], trained, ("flux-fsdp",))


SHORT_TEXT = [
    arg
    for value in (
        "degrade.steps=4",
        "degrade.nodes=2",
        "degrade.batch=4",
        "degrade.spacing=steps",
        "degrade.plateau=0",
        "distill.steps=4",
        "distill.batch=4",
        "distill.fake_updates=1",
        "distill.schedule=fixed",
        "distill.switch_every=2",
        "eval.every=2",
        "data.n_eval=10",
        "run.gradient_checkpointing=false",
        "network.lora_rank=0",
        "network.generator_lora_rank=0",
        "text.resolution=16",
    )
    for arg in ("--set", value)
] + ["--quiet"]
