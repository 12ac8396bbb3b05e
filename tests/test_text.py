"""Text-to-image on tiny Stable Diffusion pipelines built from configs, saved, and loaded through the real code path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import in_fresh_process
from disback.cli import main
from disback.errors import DisbackError
from disback.text import read_prompts

PROMPTS = ["a red square", "a blue circle", "green stripes"]
TINY_TEXT = [
    "--set",
    "degrade.steps=6",
    "--set",
    "degrade.nodes=2",
    "--set",
    "degrade.batch=4",
    "--set",
    "degrade.spacing=steps",
    "--set",
    "degrade.plateau=0",
    "--set",
    "distill.steps=6",
    "--set",
    "distill.batch=4",
    "--set",
    "distill.fake_updates=1",
    "--set",
    "distill.schedule=fixed",
    "--set",
    "distill.switch_every=2",
    "--set",
    "eval.every=3",
    "--set",
    "data.n_eval=10",
    "--set",
    "run.precision=fp32",
    "--set",
    "run.gradient_checkpointing=false",
    "--set",
    "text.guidance=3",
    "--quiet",
]


def tokenizer_files(folder: Path) -> None:
    """A CLIP tokenizer's files with a vocabulary of single characters (no merges): small, and a real CLIPTokenizer."""
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_clip(root: Path) -> Path:
    """A tiny CLIPModel and CLIPProcessor built from a config and saved, as a CLIP model folder is laid out."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer_files(root / "clip-tok")
    tokenizer = CLIPTokenizer(
        str(root / "clip-tok" / "vocab.json"), str(root / "clip-tok" / "merges.txt"), model_max_length=77
    )
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root / "clip")
    return root / "clip"


def build_pipeline(root: Path, xl: bool) -> Path:
    """A tiny StableDiffusionPipeline (or StableDiffusionXLPipeline) saved with save_pretrained."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer_files(root / "tok")
    tokenizer = CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), model_max_length=77)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=16,
    )
    extra = (
        dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4,
            cross_attention_dim=32,
        )
        if xl
        else dict(cross_attention_dim=16)
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


# In a fresh process: plain diffusers code, sampled as the original DisBack README does; then the same latents and
# prompt through disback's own generator, which the one-step pipeline must reproduce.
SAMPLE = """
import sys, torch
from diffusers import DiffusionPipeline, LCMScheduler
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert isinstance(pipe.scheduler, LCMScheduler), type(pipe.scheduler)
image = pipe("a red square", num_inference_steps=1, guidance_scale=0, timesteps=[399], output_type="np").images[0]
assert image.shape[-1] == 3 and image.min() >= 0 and image.max() <= 1, image.shape
z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
latents = pipe("a red square", num_inference_steps=1, guidance_scale=0, timesteps=[399], latents=z, output_type="latent").images
from disback.storage.models import load_model
generator, meta = load_model(sys.argv[2])
with torch.no_grad():
    ours = generator(z, torch.tensor([0]))  # prompt 0 of the prompts file is "a red square"
print("max difference", float((latents - ours).abs().max()))
assert torch.allclose(latents, ours, atol=1e-4), float((latents - ours).abs().max())
print("ok", type(pipe).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
def test_both_stages_from_a_prompts_file_and_the_export_samples_with_plain_diffusers(tmp_path, capsys, xl):
    pipeline = build_pipeline(tmp_path, xl)
    prompts = tmp_path / ("prompts.jsonl" if xl else "prompts.txt")
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) if xl else "\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "run"
    # SDXL as docs/text-to-image.md runs it: LoRA fake score and nodes
    lora = ["--set", "network.lora_rank=4"] if xl else []
    clip = build_clip(tmp_path)  # a CLIP score at every evaluation: text runs get curves like the other tracks
    command = ["-m", "disback", "text", "--pretrained", str(pipeline), "--prompts", str(prompts), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, *command, *TINY_TEXT, *lora, "--set", f"eval.clip={clip}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timesteps=[399]" in proc.stdout

    manifest = json.loads((out / "path" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["nodes"]) == 3
    assert manifest["config"]["network"]["lora_rank"] == (4 if xl else 0)
    records = [json.loads(line) for line in (out / "disback" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["target_node"]) for r in records] == [(0, 1), (3, 0), (6, 0)]  # the teacher from step 2
    assert json.loads((out / "disback" / "result.json").read_text())["switches"] == [2]
    table = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(out / "teacher" / "prompts.safetensors")
    )
    assert table["embeds"].shape[0] == len(PROMPTS) + 1  # the prompts and the unconditional row
    assert ("pooled" in table) == xl

    sampled = in_fresh_process(SAMPLE, out / "pipeline", out / "disback" / "generator.safetensors")
    assert ("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline") in sampled

    # `disback sample` does not draw text models: it says in one line how to sample them (their one-step pipeline)
    capsys.readouterr()
    for model in (out / "teacher" / "teacher.safetensors", out / "disback" / "generator.safetensors"):
        assert main(["sample", str(model), "--out", str(tmp_path / "x.npy")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert "DiffusionPipeline.from_pretrained" in err and "timesteps=[399]" in err
    assert not (tmp_path / "x.npy").exists()
    # the in-loop CLIP score: a curve and a report
    assert all(np.isfinite(r["clip_score"]) for r in records) and len(records) == 3
    assert (out / "curves.png").stat().st_size > 0 and "CLIP score" in (out / "report.md").read_text()
    # `disback eval` on the exported pipeline: a CLIP score of its images against the prompts
    assert main(["eval", str(out / "pipeline"), "--n", "6", "--batch", "3", "--quiet", "--clip", str(clip)]) == 2
    assert "give --prompts" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                str(out / "pipeline"),
                "--n",
                "6",
                "--batch",
                "3",
                "--quiet",
                "--prompts",
                str(prompts),
                "--clip",
                str(clip),
            ]
        )
        == 0
    )
    record = json.loads((out / "pipeline" / "eval.json").read_text())
    assert record["measure"] == "clip_score" and record["n"] == 6 and np.isfinite(record["value"])
    assert record["network"]["sha256"] and record["network"]["model"] == str(clip)
    again = [str(out / "pipeline"), "--n", "6", "--batch", "2", "--quiet", "--prompts", str(prompts)]
    assert main(["eval", *again, "--clip", str(clip), "--out", str(tmp_path / "b2.json")]) == 0
    assert json.loads((tmp_path / "b2.json").read_text())["value"] == pytest.approx(record["value"], rel=1e-5)
    capsys.readouterr()
    # `disback export` writes a text generator's pipeline as the text plugin does
    assert main(["export", str(out / "disback"), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["scheduler"][1] == "LCMScheduler"


# In a fresh process: a k-step export sampled by plain diffusers with DMD2's call and a seeded torch.Generator, which
# draws the initial latents and then each step's fresh noise (LCMScheduler.step), in that order; disback's generator
# given the same draws must give the same latents. Then the LoRA generator's adapters, loaded into the base pipeline
# and fused, must sample what the merged export samples.
SAMPLE_STEPS = """
import json, sys, torch
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from disback.storage.models import load_model
export, base, generator_file, table_file = sys.argv[1:5]
TIMESTEPS = [999, 749, 499, 249]

def sample(pipe, seed, **prompt):
    generator = torch.Generator().manual_seed(seed)
    return pipe(**prompt, num_inference_steps=4, guidance_scale=0, timesteps=TIMESTEPS, generator=generator,
                output_type="latent").images

def ours(seed):
    draws = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 8, 8, generator=draws)  # the pipeline's initial latents
    noise = torch.stack([torch.randn(1, 4, 8, 8, generator=draws) for _ in TIMESTEPS[1:]], dim=1)  # steps 2, 3, 4
    with torch.no_grad():
        return generator(z, torch.tensor([0]), noise)  # prompt 0 is "a red square"

def most(a, b):
    return float((a - b).abs().max())

pipe = DiffusionPipeline.from_pretrained(export)
assert isinstance(pipe.scheduler, LCMScheduler), type(pipe.scheduler)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # DMD2's snippet sets it; it changes nothing
generator, _ = load_model(generator_file)
assert generator.steps == 4
table = load_file(table_file)
embeds = dict(prompt_embeds=table["embeds"][:1], pooled_prompt_embeds=table["pooled"][:1])
out = {"embeds": [], "text": [], "lora": [], "base": []}
base_pipe = DiffusionPipeline.from_pretrained(base)
base_pipe.scheduler = LCMScheduler.from_config(base_pipe.scheduler.config)
merged = {}
for seed in range(3):
    mine = ours(seed)
    out["embeds"].append(most(sample(pipe, seed, **embeds), mine))  # the table's own embeddings
    merged[seed] = sample(pipe, seed, prompt="a red square")
    out["text"].append(most(merged[seed], mine))  # the prompt encoded again, alone
    out["base"].append(most(sample(base_pipe, seed, prompt="a red square"), merged[seed]))
base_pipe.load_lora_weights(export)  # DMD2's LoRA snippet: into the base pipeline, fused at scale 1
base_pipe.fuse_lora()
for seed in range(3):
    out["lora"].append(most(sample(base_pipe, seed, prompt="a red square"), merged[seed]))
# DMD2's 4-step snippet, unchanged but for the model, the file, the device and the dtype
unet = UNet2DConditionModel.from_config(base, subfolder="unet")
unet.load_state_dict(torch.load(export + "/disback_unet_fp16.bin", map_location="cpu", weights_only=True))
pipe = DiffusionPipeline.from_pretrained(base, unet=unet)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
image = pipe(prompt="a red square", num_inference_steps=4, guidance_scale=0, timesteps=[999, 749, 499, 249]).images[0]
assert image.size == (16, 16), image.size
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_four_step_lora_generator_exports_a_pipeline_that_dmd2s_snippets_sample_exactly(tmp_path, capsys):
    """DMD2's 4-step SDXL recipe on a tiny SDXL-style pipeline: text.timestep=[999, 749, 499, 249] and a LoRA
    generator (network.generator_lora_rank), both stages. The export sampled by plain diffusers (stock LCMScheduler,
    a seeded torch.Generator) equals disback's own rollout given the same draws; the adapters, in diffusers' LoRA
    format, loaded into the base pipeline and fused, sample what the merged export samples."""
    from safetensors import safe_open

    pipeline = build_pipeline(tmp_path, xl=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    few = ["--set", "text.timestep=[999,749,499,249]", "--set", "network.generator_lora_rank=4"]
    # LoRA fake score and nodes, as the SDXL recipe runs; a large step so that the adapters change the samples
    more = ["--set", "network.lora_rank=4", "--set", "distill.lr_generator=0.001"]
    command = ["-m", "disback", "text", "--pretrained", str(pipeline), "--prompts", str(prompts), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, *command, *TINY_TEXT, *few, *more], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "num_inference_steps=4, guidance_scale=0, timesteps=[999, 749, 499, 249]" in proc.stdout, proc.stdout

    folder = out / "pipeline"
    record = json.loads((folder / "disback.json").read_text())
    assert record["timestep"] == [999, 749, 499, 249] and record["source"] == str(pipeline)
    assert record["lora"] == {"file": "pytorch_lora_weights.safetensors", "rank": 4, "lora_alpha": 4}
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") and ".default." not in k and ".lora_" in k for k in keys)
    assert config["unet.r"] == config["unet.lora_alpha"] == 4
    guide = (folder / "DISBACK.md").read_text()
    assert (
        guide.startswith("4-step generator") and "pipe.load_lora_weights(" in guide and "timesteps=[999, 749" in guide
    )
    assert "takes 4 steps, at timesteps [999, 749, 499, 249]" in (out / "report.md").read_text()

    sample = subprocess.run(
        [
            sys.executable,
            "-c",
            SAMPLE_STEPS,
            str(folder),
            str(pipeline),
            str(out / "disback" / "generator.safetensors"),
            str(out / "teacher" / "prompts.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    measured = json.loads(sample.stdout.strip().splitlines()[-1])
    print("max differences", measured)
    assert max(measured["embeds"]) <= 1e-5, measured  # the scheduler's draws and arithmetic, exactly
    # the prompt encoded alone rather than in the table's batch differs in its last bits, which 4 steps amplify
    assert max(measured["text"]) <= 1e-4, measured
    assert max(measured["lora"]) <= 1e-4, measured  # base + fused adapters = the merged export
    assert min(measured["base"]) > 1e-2, measured  # and the adapters matter: the base pipeline alone differs

    # `disback sample` says how to sample a k-step generator
    assert main(["sample", str(out / "disback" / "generator.safetensors"), "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' warnings on its first import here
    assert err.startswith("error: ") and "4-step pipeline" in err and "timesteps=[999, 749, 499, 249]" in err, err


def test_text_steps_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    """distill.sigma_g as a list (a text generator's steps are text.timestep), and text.timestep entries outside the
    teacher's schedule: one line each, naming the fix, and no folder written."""
    pipeline = build_pipeline(tmp_path, xl=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["text", "--pretrained", str(pipeline), "--prompts", str(prompts), *TINY_TEXT, "--out", str(tmp_path / "o")]
    for setting, message in (
        ("distill.sigma_g=[10,1]", "a text generator's steps are text.timestep"),
        ("text.timestep=[1200,500]", "text.timestep must lie in the teacher's schedule [0, 1000)"),
    ):
        capsys.readouterr()
        assert main([*args, "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert "[999, 749, 499, 249]" in err or "[999,749,499,249]" in err  # the fix, by example
        assert not (tmp_path / "o").exists()


def test_a_student_of_another_architecture_is_refused_before_the_teacher_is_imported(tmp_path, capsys):
    """An SD1.5 UNet state dict given for an SDXL pipeline (and an SDXL one for SD1.5): one line naming the keys that
    differ, and nothing written."""
    from diffusers import UNet2DConditionModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    pipelines = {xl: build_pipeline(tmp_path / ("xl" if xl else "sd15"), xl) for xl in (False, True)}
    for xl, pipeline in pipelines.items():
        other = UNet2DConditionModel.from_pretrained(pipelines[not xl], subfolder="unet")
        torch.save({k: v.half() for k, v in other.state_dict().items()}, tmp_path / "other.bin")
        out = tmp_path / f"out-{xl}"
        args = ["text", "--pretrained", str(pipeline), "--prompts", str(prompts), *TINY_TEXT, "--out", str(out)]
        assert main([*args, "--generator", str(tmp_path / "other.bin")]) == 2
        err = capsys.readouterr().err
        assert "other.bin does not match the model" in err and "is this a UNet of another model?" in err, err
        assert "keys (e.g." in err or "shape mismatch (" in err, err  # the first keys or shapes that differ
        assert not out.exists()


def test_prompts_files_are_read_or_refused_clearly(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "a.txt") == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{"text": "y"}\n')
    assert read_prompts(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(DisbackError, match="line 2"):
        read_prompts(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("\n\n")
    with pytest.raises(DisbackError, match="no prompts"):
        read_prompts(tmp_path / "d.txt")
    with pytest.raises(DisbackError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.slow
def test_dmd2_takes_real_images_with_captions_for_its_gan_term(tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import load_file

    from disback.text import encode_images

    pipeline = build_pipeline(tmp_path, xl=False)
    (tmp_path / "images").mkdir()
    rows = []
    for i, (colour, caption) in enumerate(
        [((255, 0, 0), "a red square"), ((0, 0, 255), "a blue square"), ((0, 255, 0), "a red square")]
    ):
        Image.new("RGB", (24 + 8 * i, 16), colour).save(
            tmp_path / "images" / f"{i}.png"
        )  # not square, not 16: cropped and resized
        rows.append(json.dumps({"image": f"images/{i}.png", "prompt": caption}))
    (tmp_path / "real.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = [
        "--pretrained",
        str(pipeline),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        *TINY_TEXT,
        "--method",
        "dmd2",
        "--set",
        "distill.fake_updates=2",
        "--no-backtrack",
    ]
    refused = subprocess.run(
        [sys.executable, "-m", "disback", "text", *args, "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "--real" in refused.stderr and not (tmp_path / "none" / "teacher").exists()

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "disback", "text", *args, "--real", str(tmp_path / "real.jsonl"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = load_file(str(out / "teacher" / "real.safetensors"))
    # the captions join the prompt table (once each); each image is labelled with its caption's row
    assert real["labels"].tolist() == [0, 3, 0]
    assert load_file(str(out / "teacher" / "prompts.safetensors"))["embeds"].shape[0] == len(PROMPTS) + 2
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    assert real["latents"].shape == (3, 4, 8, 8)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16)  # the first image, as [-1, 1] pixels
    with torch.no_grad():
        expected = vae.encode(red).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(real["latents"][:1], expected, atol=1e-4)
    assert torch.allclose(
        encode_images(str(pipeline), [tmp_path / "images" / "2.png"], 16), real["latents"][2:], atol=1e-5
    )
    records = [json.loads(line) for line in (out / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_head"] > 0 and "loss_generator_gan" in r for r in records[1:])
    assert (out / "pipeline" / "model_index.json").is_file()


def test_real_images_files_are_read_or_refused_clearly(tmp_path):
    from disback.text import read_captions

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "ok.jsonl").write_text('{"image": "a.png", "prompt": "x"}\n\n{"image": "a.png", "text": "y"}\n')
    assert read_captions(tmp_path / "ok.jsonl") == [(tmp_path / "a.png", "x"), (tmp_path / "a.png", "y")]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DisbackError, match='line 1.*"prompt"'):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "gone.jsonl").write_text('{"image": "b.png", "prompt": "x"}\n')
    with pytest.raises(DisbackError, match="b.png does not exist"):
        read_captions(tmp_path / "gone.jsonl")


# The original DisBack README's inference snippet, run as it is written but for the model, the file, the device and the
# dtype (a tiny pipeline on the CPU in fp32): a UNet built from the base model's config, the released state dict loaded
# into it with torch.load, the base pipeline around it, an LCMScheduler, one step at timestep 399.
README_SNIPPET = """
import sys, torch
from diffusers import DiffusionPipeline, UNet2DConditionModel, LCMScheduler
base_model_id, ckpt = sys.argv[1], sys.argv[2]
unet = UNet2DConditionModel.from_config(base_model_id, subfolder="unet")
unet.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
pipe = DiffusionPipeline.from_pretrained(base_model_id, unet=unet)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
prompt = "a red square"
image = pipe(prompt=prompt, num_inference_steps=1, guidance_scale=0, timesteps=[399], height=64, width=64).images[0]
assert image.size == (64, 64), image.size
print("sampled", type(pipe).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("xl", [False, True], ids=["sd15-fp16-bin", "sdxl-diffusers-folder"])
def test_the_original_recipe_refines_a_distilled_student(tmp_path, xl):
    """disback text --generator: a student made by a short baseline run and saved as the field publishes it (an fp16
    UNet state dict .bin, or a diffusers UNet folder) is refined by DisBack: stage 1 records the path toward its
    samples, stage 2 starts from it, and the export samples with the original README's snippet."""
    from safetensors.torch import load_file

    from disback.storage.models import load_model

    pipeline = build_pipeline(tmp_path, xl)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    lora = ["--set", "network.lora_rank=4"] if xl else []
    common = ["-m", "disback", "text", "--pretrained", str(pipeline), "--prompts", str(prompts), *TINY_TEXT, *lora]
    made = subprocess.run(
        [sys.executable, *common, "--no-backtrack", "--out", str(tmp_path / "student")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    student, _ = load_model(tmp_path / "student" / "baseline" / "generator.safetensors")
    unet = student.denoiser.unet.state_dict()
    if xl:
        student.denoiser.unet.save_pretrained(tmp_path / "student-unet")
        source, fmt, expected = tmp_path / "student-unet", "unet-folder", unet
    else:
        torch.save({k: v.half() for k, v in unet.items()}, tmp_path / "student_fp16.bin")
        source, fmt, expected = (
            tmp_path / "student_fp16.bin",
            "state-dict",
            {k: v.half().float() for k, v in unet.items()},
        )
    out = tmp_path / "refined"
    run = subprocess.run(
        [sys.executable, *common, "--generator", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    initial = load_file(str(out / "initial-generator.safetensors"))  # converted once, into the run folder
    assert all(torch.equal(initial[f"denoiser.unet.{k}"], v) for k, v in expected.items())
    manifest = json.loads((out / "path" / "manifest.json").read_text())
    origin = manifest["config"]["initial_generator"]["origin"]
    assert origin["format"] == fmt and origin["dtype"] == (["float32"] if xl else ["float16"])
    assert json.loads((out / "disback" / "inputs.json").read_text())["generator_sha256"] == origin["sha256"]
    far = json.loads((out / "start_far.json").read_text())
    assert len(far["generator"]) == 4 and far["data"] is None and far["path_distance"] > 0
    sample = subprocess.run(
        [sys.executable, "-c", README_SNIPPET, str(pipeline), str(out / "pipeline" / "disback_unet_fp16.bin")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert ("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline") in sample.stdout
