"""Flow-matching transformer teachers through `disback text`: tiny Stable Diffusion 3 and FLUX.1 (dev and schnell)
pipelines built offline (flow_pipelines.py), both stages, the export sampled by plain diffusers, resume after a kill,
and the errors a user meets first."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import in_fresh_process
from disback.cli import main
from flow_pipelines import build_flux, build_sd3

PROMPTS = ["a red square", "a blue circle", "green stripes"]
TINY = [
    "degrade.steps=6",
    "degrade.nodes=2",
    "degrade.batch=4",
    "degrade.spacing=steps",
    "degrade.plateau=0",
    "distill.steps=6",
    "distill.batch=4",
    "distill.fake_updates=1",
    "distill.schedule=fixed",
    "distill.switch_every=2",
    "eval.every=3",
    "data.n_eval=10",
    "run.precision=fp32",
    "run.gradient_checkpointing=false",
    "network.lora_rank=4",
    "network.generator_lora_rank=0",
]


def settings(*values: str) -> list[str]:
    return [arg for value in (*TINY, *values) for arg in ("--set", value)]


def prompts_file(root: Path) -> Path:
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root / "prompts.txt"


def text_command(pipeline: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "disback", "text", "--pretrained", str(pipeline), "--prompts", str(prompts)] + [
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


# In a fresh process, plain diffusers: the exported folder loaded by DiffusionPipeline (no disback code) and sampled
# with the call its disback.json records, from given latents (FLUX.1's packed 2 x 2) and with the global RNG seeded,
# which is where FlowMatchEulerDiscreteScheduler's stochastic steps draw their fresh noise; disback's generator given
# the same draws must give the same latents. A LoRA generator's adapters, loaded into the base pipeline and fused,
# must sample what the merged export samples.
SAMPLE = """
import json, sys, torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
folder, generator_file = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder)
assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler), type(pipe.scheduler)
record = json.loads(open(folder + "/disback.json").read())
call = record["call"]
image = pipe("a blue circle", output_type="np", **call).images[0]
assert image.shape == (call["height"], call["width"], 3) and image.min() >= 0 and image.max() <= 1, image.shape


def pack(x):
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, 4 * c)


def unpack(x, h, w):
    n, _, d = x.shape
    return x.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


from disback.storage.models import load_model
generator, meta = load_model(generator_file)
c, h, w = meta.shape
flux = type(pipe).__name__ == "FluxPipeline"
z = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(1))
given = pack(z) if flux else z


def sample(pipe):
    torch.manual_seed(5)
    out = pipe("a red square", latents=given, output_type="latent", **call).images
    return unpack(out, h, w) if flux else out


theirs = sample(pipe)
torch.manual_seed(5)
draws = [torch.randn(*given.shape) for _ in range(generator.steps - 1)]
noise = torch.stack([unpack(d, h, w) if flux else d for d in draws], 1) if draws else None
with torch.no_grad():
    ours = generator(z, torch.tensor([0]), noise)  # prompt 0 of the prompts file is "a red square"
print("max difference", float((theirs - ours).abs().max()))
assert torch.allclose(theirs, ours, atol=1e-5), float((theirs - ours).abs().max())
if "lora" in record:
    base = DiffusionPipeline.from_pretrained(record["source"])
    base.load_lora_weights(folder)
    base.fuse_lora()
    base.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        base.scheduler.config, shift=1.0, use_dynamic_shifting=False, stochastic_sampling=generator.steps > 1
    )
    fused = sample(base)
    print("lora difference", float((fused - theirs).abs().max()))
    assert torch.allclose(fused, theirs, atol=1e-5), float((fused - theirs).abs().max())
print("ok", type(pipe).__name__, generator.steps)
"""


def real_images(root: Path, side: int) -> Path:
    """Three captioned images for dmd2's GAN term (sizes that are not the teacher's: they are cropped and resized)."""
    from PIL import Image

    (root / "images").mkdir()
    rows = []
    for i, (colour, caption) in enumerate([((255, 0, 0), "a red square"), ((0, 0, 255), "a blue square")] * 2):
        Image.new("RGB", (side + 4 * i, side), colour).save(root / "images" / f"{i}.png")
        rows.append(json.dumps({"image": f"images/{i}.png", "prompt": caption}))
    (root / "real.jsonl").write_text("\n".join(rows) + "\n")
    return root / "real.jsonl"


CASES = {
    # SD3 (static shift 3) with dmd2: the GAN head on the fake transformer's middle block, real images encoded once
    "sd3": (
        lambda root: build_sd3(root, width=24),
        ["text.guidance=3", "distill.fake_updates=2"],
        True,
        math.log(3.0),
        1,
    ),
    # FLUX.1-dev (dynamic shift: exp(mu) at 16 tokens), a 3-step LoRA generator, SiD
    "flux-dev": (
        lambda root: build_flux(root, dev=True),
        ["text.resolution=16", "text.timestep=[1000,600,300]", "network.generator_lora_rank=4", "distill.method=sid"],
        False,
        0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256),
        3,
    ),
    # FLUX.1-schnell: no guidance, no shift; VSD
    "flux-schnell": (
        lambda root: build_flux(root, dev=False),
        ["text.resolution=24", "distill.method=vsd"],
        False,
        0,
        1,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CASES))
def test_flow_teachers_run_both_stages_and_export_a_pipeline_plain_diffusers_samples_exactly(tmp_path, family):
    build, extra, gan, p_mean, steps = CASES[family]
    pipeline = build(tmp_path)
    out = tmp_path / "run"
    args = settings(*extra)
    if gan:
        args += ["--method", "dmd2", "--real", str(real_images(tmp_path, 16))]
    proc = subprocess.run(text_command(pipeline, prompts_file(tmp_path), out, *args), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"num_inference_steps={steps}" in proc.stdout and "DiffusionPipeline.from_pretrained" in proc.stdout

    manifest = json.loads((out / "path" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["nodes"]) == 3
    config = manifest["config"]
    # the losses' logit-normal t, centred where the teacher samples: ln(shift) added to the preset's p_mean of 0
    assert config["edm"]["p_mean"] == pytest.approx(p_mean, abs=1e-9)
    assert config["distill"]["noise"] == "lognormal"
    from disback.storage.meta import read_meta

    meta = read_meta(out / "teacher" / "teacher.safetensors")
    assert meta.spec["family"] == family and meta.kind == "text"
    records = [json.loads(line) for line in (out / "disback" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss_generator"]) for r in records[1:])
    if gan:
        assert all(r["loss_head"] > 0 and "loss_generator_gan" in r for r in records[1:])
        assert (out / "teacher" / "real.safetensors").is_file()
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")
    assert index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"

    sampled = in_fresh_process(SAMPLE, out / "pipeline", out / "disback" / "generator.safetensors")
    assert f"ok {index['_class_name']} {steps}" in sampled
    assert ("lora difference" in sampled) == (family == "flux-dev")


@pytest.mark.slow
def test_a_killed_flow_run_resumes_bit_identically(tmp_path, monkeypatch):
    """FLUX.1-dev through run_text, killed in stage 1 and again in stage 2, resumed each time: every file ends as an
    uninterrupted run's."""
    from disback import stages
    from disback.config import build_config, parse_overrides
    from disback.text import run_text
    from test_resume import Crash, same_files, same_metrics

    pipeline = build_flux(tmp_path, dev=True)
    prompts = prompts_file(tmp_path)
    values = [*TINY, "text.resolution=16", "run.checkpoint_every=2", "text.timestep=[1000,500]"]
    cfg = build_config("flux-dev", None, parse_overrides(values))
    run_text(cfg, str(pipeline), prompts, tmp_path / "a", show_progress=False)

    for stage in ("record_path", "distill"):  # killed after step 3 of that stage, then resumed
        original = getattr(stages, stage)
        monkeypatch.setattr(stages, stage, lambda *a, _f=original, **k: _f(*a, **k, callbacks=[Crash(3)]))
        with pytest.raises(KeyboardInterrupt):
            run_text(cfg, str(pipeline), prompts, tmp_path / "b", show_progress=False, resume=stage == "distill")
        monkeypatch.setattr(stages, stage, original)
    run_text(cfg, str(pipeline), prompts, tmp_path / "b", show_progress=False, resume=True)
    same_files(tmp_path / "a" / "path", tmp_path / "b" / "path", ["node-000.safetensors", "node-002.safetensors"])
    same_files(tmp_path / "a" / "disback", tmp_path / "b" / "disback", ["generator.safetensors", "fake.safetensors"])
    same_metrics(tmp_path / "a" / "disback", tmp_path / "b" / "disback")
    transformer = "pipeline/transformer/diffusion_pytorch_model.safetensors"
    same_files(tmp_path / "a", tmp_path / "b", [transformer])


def refused(capsys, args: list[str]) -> str:
    """``disback text ARGS`` fails with one line on stderr and no traceback; returns the line."""
    capsys.readouterr()
    assert main(["text", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_flow_settings_that_cannot_work_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    prompts = prompts_file(tmp_path)
    flux, schnell = build_flux(tmp_path, dev=True), build_flux(tmp_path, dev=False)
    out = tmp_path / "run"
    common = ["--prompts", str(prompts), "--out", str(out), *settings()]

    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    err = refused(capsys, ["--pretrained", str(other), *common])
    assert "KandinskyV22Pipeline" in err and "FluxPipeline" in err and "StableDiffusion3Pipeline" in err
    assert "takes no guidance" in refused(capsys, ["--pretrained", str(schnell), *common, "--set", "text.guidance=3.5"])
    assert "(0, 1000]" in refused(capsys, ["--pretrained", str(flux), *common, "--set", "text.timestep=1200"])
    err = refused(capsys, ["--pretrained", str(flux), *common, "--set", "text.resolution=18"])
    assert "multiple of 4" in err and "text.resolution" in err
    assert not out.exists()


def test_flux_latents_pack_into_tokens_as_flux_pipeline_packs_them():
    from diffusers import FluxPipeline

    from disback.text.networks import image_ids, pack, unpack

    x = torch.randn(2, 3, 6, 10)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 3, 6, 10))
    assert torch.equal(unpack(pack(x), 6, 10), x)
    # _unpack_latents takes the image size and the VAE's factor (here 8): 48 x 80 pixels are 6 x 10 latents
    assert torch.equal(unpack(pack(x), 6, 10), FluxPipeline._unpack_latents(pack(x), 48, 80, 8))
    assert torch.equal(
        image_ids(6, 10, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    )


def test_the_time_shift_is_the_schedulers_static_or_resolution_dependent_one():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from disback.text.families import flow_shift

    assert flow_shift(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config), 4096) == 3.0
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for tokens in (16, 1024, 4096):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert flow_shift(dict(dynamic.config), tokens) == pytest.approx(math.exp(mu), rel=1e-12)
        # what the scheduler does to t = 0.5 at that mu is the shift map with s = exp(mu)
        dynamic.set_timesteps(sigmas=[0.5], mu=mu)
        s = flow_shift(dict(dynamic.config), tokens)
        assert float(dynamic.sigmas[0]) == pytest.approx(s * 0.5 / (1 + (s - 1) * 0.5), rel=1e-6)


@pytest.mark.slow
def test_a_flow_student_starts_from_a_transformer_folder_or_state_dict_and_is_measured_by_clip(tmp_path, capsys):
    """--generator takes a transformer (a pipeline folder, or its state dict in fp16 as DMD2 publishes UNets); one of
    another family is refused in one line; the in-loop CLIP score and `disback eval` read the flow latents."""
    from safetensors.torch import load_file

    from test_text import build_clip

    sd3, flux = build_sd3(tmp_path, width=24), build_flux(tmp_path, dev=False)
    prompts, clip = prompts_file(tmp_path), build_clip(tmp_path)
    weights = load_file(str(sd3 / "transformer" / "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(1)
    student = {k: (v + 0.01 * torch.randn_like(v)).half() for k, v in weights.items()}  # not the teacher
    torch.save(student, tmp_path / "student.bin")
    common = ["--prompts", str(prompts), *settings("degrade.steps=8", f"eval.clip={clip}"), "--quiet"]

    err = refused(capsys, ["--pretrained", str(sd3), "--out", str(tmp_path / "no"), "--generator", str(flux), *common])
    assert "FluxTransformer2DModel" in err and "SD3Transformer2DModel" in err and not (tmp_path / "no").exists()
    for source, out in ((sd3, tmp_path / "folder"), (tmp_path / "student.bin", tmp_path / "bin")):
        assert main(["text", "--pretrained", str(sd3), "--out", str(out), "--generator", str(source), *common]) == 0
        records = [json.loads(line) for line in (out / "disback" / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["clip_score"]) for r in records)
    converted = load_file(str(tmp_path / "bin" / "initial-generator.safetensors"))
    prefix = "denoiser.transformer."
    assert all(torch.equal(converted[prefix + k], v.float()) for k, v in student.items())

    capsys.readouterr()
    folder = tmp_path / "bin" / "pipeline"
    args = ["eval", str(folder), "--n", "4", "--batch", "2", "--prompts", str(prompts), "--clip", str(clip), "--quiet"]
    assert main(args) == 0
    record = json.loads((folder / "eval.json").read_text())
    assert record["measure"] == "clip_score" and record["n"] == 4 and math.isfinite(record["value"])


def test_a_text_teacher_refuses_a_list_of_noise_levels_for_its_generator():
    """`disback distill` on a text teacher: the generator's steps are text.timestep, so a sigma_g list is refused."""
    from disback.errors import DisbackError
    from disback.storage.meta import ModelMeta
    from disback.text.networks import generator

    meta = ModelMeta(role="denoiser", kind="text", shape=[4, 8, 8], normaliser={}, spec={"timestep": 1000})
    with pytest.raises(DisbackError, match="text.timestep"):
        generator(None, meta, [2.0, 1.0])
