"""Stable Diffusion 1.5, SDXL, SD3.5-medium and FLUX.1-dev at their published sizes, without downloads: pipelines built
from the configs in benchmarks/configs/ (random weights, stand-in tokenizers), timed one-step sampling of a `disback
text` export against the base pipeline, and a summary of a `disback text` run folder.

    python benchmarks/real_size.py build sdxl --out /tmp/sdxl-pipe                  # on a GPU: fp16, about 7 GB
    python benchmarks/real_size.py build flux-dev --out /tmp/flux-pipe              # fp16, about 34 GB (T5-XXL: 9.5)
    python benchmarks/real_size.py build sd15 --out /tmp/pipe --tiny --device cpu    # small widths, for a CPU
    python benchmarks/real_size.py sample --base /tmp/sdxl-pipe --export runs/sdxl/pipeline --batch 4 --results r.jsonl
    python benchmarks/real_size.py ceilings                # the card's bf16 matrix rate and copy bandwidth
    python benchmarks/real_size.py summary runs/sdxl --started 1733300000 --results r.jsonl

benchmarks/gpu_real.sh runs all three on the lent GPU. The tokenizers are character-level stand-ins (a CLIPTokenizer, and
a fast T5-style one; the real vocabularies are downloads): prompts encode to other token ids, which changes no shape
and no cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

CONFIGS = Path(__file__).parent / "configs"
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd35m": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
}
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "sd35m": 7.0, "flux-dev": 3.5}  # the base pipelines' default guidance scales
# --tiny: the same architectures at widths a CPU runs in seconds (for checking this script, not for timing)
TINY = {
    "UNet2DConditionModel": {
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": 4,
        "norm_num_groups": 8,
        "sample_size": 16,
    },
    "AutoencoderKL": {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 8, "sample_size": 128},
    "CLIPTextModel": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "T5EncoderModel": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 2},
    "SD3Transformer2DModel": {
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "caption_projection_dim": 32,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 64,  # both stand-in CLIPs' projections
        "dual_attention_layers": [0],
        "pos_embed_max_size": 32,
        "sample_size": 16,
    },
    "FluxTransformer2DModel": {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": [4, 4, 8],
    },
}
TINY["CLIPTextModelWithProjection"] = {**TINY["CLIPTextModel"], "projection_dim": 32}
TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def configs(family: str, tiny: bool) -> dict[str, tuple[str, dict]]:
    """Each component's class and published config (benchmarks/configs/FAMILY/*.json), shrunk with --tiny."""
    out = {}
    for file in sorted((CONFIGS / family).glob("*.json")):
        raw = json.loads(file.read_text())
        config = {k: v for k, v in raw.items() if not k.startswith("_")}
        if tiny:
            config.update(TINY.get(raw["_class_name"], {}))
        out[file.stem] = (raw["_class_name"], config)
    if tiny and family == "sd15":
        out["unet"][1].update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32)
    if tiny and family == "sdxl":  # SDXL's UNet reads both encoders' widths and the pooled projection
        out["unet"][1].update(
            attention_head_dim=[2, 4, 4], cross_attention_dim=64, transformer_layers_per_block=[1, 1, 2]
        )
        out["unet"][1].update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    return out


def stand_in_tokenizer(folder: Path, max_length: int):
    """A CLIPTokenizer over single characters (no merges), written to ``folder``: real code, no download."""
    from transformers import CLIPTokenizer

    words = [c + end for c in "abcdefghijklmnopqrstuvwxyz0123456789" for end in ("", "</w>")]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "!", *words])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def stand_in_t5_tokenizer(max_length: int = 512):
    """A fast T5-style tokenizer over single characters (pad 0, eos 1, unk 2), ending every text with </s>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz0123456789 "])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


def text_encoder(cls_name: str, config: dict):
    import transformers

    if cls_name == "T5EncoderModel":
        ids = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}  # the stand-in tokenizer's
        return transformers.T5EncoderModel(transformers.T5Config(**{**config, **ids}))
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**{**config, **ids}))


def build(family: str, out: Path, device: str, tiny: bool) -> dict:
    """The pipeline at its published shapes with random weights, built on ``device`` and saved in fp16 (fp32 with
    --tiny, as a CPU computes)."""
    import diffusers

    start = time.perf_counter()
    torch.manual_seed(0)
    clip = stand_in_tokenizer(out.parent / f".{out.name}-tokenizer", 77)
    parts = {}
    with torch.device(device):
        for name, (cls_name, config) in configs(family, tiny).items():
            if name in TOKENIZER:
                parts[name] = text_encoder(cls_name, config)
                parts[TOKENIZER[name]] = stand_in_t5_tokenizer() if cls_name == "T5EncoderModel" else clip
            elif name != "scheduler":
                parts[name] = getattr(diffusers, cls_name).from_config(config)
    scheduler_config = json.loads((CONFIGS / family / "scheduler.json").read_text())
    parts["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, PIPELINES[family])(**parts, **(extra if family == "sd15" else {}))
    built = time.perf_counter() - start
    pipe.to(torch.float32 if tiny else torch.float16).save_pretrained(out)
    params = {
        name: round(sum(p.numel() for p in module.parameters()) / 1e6, 2)
        for name, module in parts.items()
        if isinstance(module, torch.nn.Module)
    }
    return {
        "part": "build",
        "family": family,
        "tiny": tiny,
        "params_M": params,
        "build_s": round(built, 1),
        "save_s": round(time.perf_counter() - start - built, 1),
        "folder_GB": round(folder_bytes(out) / 1e9, 2),
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sample(base: Path, export: Path, batch: int, steps: int, repeats: int, device: str) -> dict:
    """Seconds per batch (VAE decode included) of the export's one-step sampling (the call its disback.json records)
    against the base pipeline's ``steps``-step sampling with its default guidance, both in fp16 on a GPU, after one
    warm-up call each."""
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    record = json.loads((export / "disback.json").read_text())
    timestep = record["timestep"]
    ts = list(timestep) if isinstance(timestep, list) else [timestep]  # a k-step generator's timesteps
    call = record.get("call") or {"num_inference_steps": len(ts), "guidance_scale": 0.0, "timesteps": ts}
    prompts = ["a photograph of an astronaut riding a horse"] * batch
    kind = json.loads((base / "model_index.json").read_text())["_class_name"]
    family = next(f for f, name in PIPELINES.items() if name == kind)
    size = {k: call[k] for k in ("height", "width", "max_sequence_length") if k in call}  # flow pipelines
    out = {"part": "sampling", "family": family, "batch": batch, "device": device}
    for name, folder, kwargs in (
        ("one_step", export, call),
        ("base", base, {"num_inference_steps": steps, "guidance_scale": GUIDANCE[family], **size}),
    ):
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        warm = {**kwargs, "num_inference_steps": 1} if name == "base" else kwargs
        pipe(prompts, output_type="np", **warm)  # cuDNN's search, allocator
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            pipe(prompts, output_type="np", **kwargs)
            sync()
            times.append(time.perf_counter() - t)
        out[f"{name}_s"] = round(min(times), 3)
        network = getattr(pipe, "unet", None)
        out[f"{name}_resolution"] = size.get("height") or network.config.sample_size * pipe.vae_scale_factor
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out.update(base_steps=steps, guidance=GUIDANCE[family], speed_up=round(out["base_s"] / out["one_step_s"], 1))
    return out


def ceilings(size: int, repeats: int) -> dict:
    """The card's measured ceilings (METHOD.md): a bf16 matrix product on random data, and a device-to-device copy
    (bytes read plus written), each the median of ``repeats`` event-timed runs after three warm-ups."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    big = torch.randn(2**28 if device == "cuda" else 2**22, device=device)  # 1 GiB on a GPU
    spare = torch.empty_like(big)

    def median_s(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    matmul = median_s(lambda: a @ b)
    copy = median_s(lambda: spare.copy_(big))
    return {
        "part": "ceilings",
        "matmul_size": size,
        "matmul_dtype": str(dtype),
        "matmul_TFLOP_per_s": round(2 * size**3 / matmul / 1e12, 1),
        "copy_TB_per_s": round(2 * big.numel() * 4 / copy / 1e12, 2),
    }


def stage_rows(metrics: Path) -> dict:
    """Seconds per step after the first (which holds cuDNN's search and the allocator's warm-up) and the peak GPU
    memory of one stage's metrics.jsonl (evaluated every step); the slowest step separately (a target switch)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    walls = {r["iteration"]: r["wall_s"] for r in records}
    steps = sorted(i for i in walls if i > 0)
    times = [walls[i] - walls[i - 1] for i in steps if i - 1 in walls]
    later = times[1:] or times
    return {
        "steps": len(steps),
        "first_step_s": round(times[0], 3) if times else None,
        "s_per_step": round(sorted(later)[len(later) // 2], 3) if later else None,  # the median
        "slowest_later_step_s": round(max(later), 3) if later else None,
        "peak_GiB": max((r.get("gpu_peak_GiB") or 0 for r in records), default=None),
        "switch_nodes": [r["target_node"] for r in records],
    }


def summary(run: Path, started: float) -> dict:
    """A `disback text` run: teacher import, stage 1 and stage 2 per step and peaks, the switch, the export."""
    stage2 = next(d for d in (run / "disback", run / "baseline") if d.is_dir())
    result = json.loads((stage2 / "result.json").read_text())
    exported = max(f.stat().st_mtime for f in (run / "pipeline").rglob("*") if f.is_file())
    teacher = run / "teacher" / "teacher.safetensors"
    config = yaml.safe_load((stage2 / "config.yaml").read_text())
    return {
        "part": "text_run",
        "run": str(run),
        "fake_updates": config["distill"]["fake_updates"],
        "batch": config["distill"]["batch"],
        "lora_rank": config["network"]["lora_rank"],
        "teacher_import_s": round(teacher.stat().st_mtime - started, 1),
        "stage1": stage_rows(run / "path" / "metrics.jsonl") if (run / "path").is_dir() else None,
        "stage2": stage_rows(stage2 / "metrics.jsonl"),
        "switches": result["switches"],
        "switch_s": result.get("switch_seconds"),
        "export_s": round(exported - (stage2 / "result.json").stat().st_mtime, 1),
        "sizes_GB": {d.name: round(folder_bytes(d) / 1e9, 2) for d in sorted(run.iterdir()) if d.is_dir()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("family", choices=list(PIPELINES))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p = sub.add_parser("sample")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--export", type=Path, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p = sub.add_parser("ceilings")
    p.add_argument("--size", type=int, default=8192 if torch.cuda.is_available() else 512)
    p.add_argument("--repeats", type=int, default=10)
    p = sub.add_parser("summary")
    p.add_argument("run", type=Path)
    p.add_argument("--started", type=float, required=True, help="the run's start, seconds since the epoch")
    for p in sub.choices.values():
        p.add_argument("--results", type=Path, help="append the result as a JSON line to this file")
    args = parser.parse_args()
    if args.command == "build":
        row = build(args.family, args.out, args.device, args.tiny)
    elif args.command == "sample":
        row = sample(args.base, args.export, args.batch, args.steps, args.repeats, args.device)
    elif args.command == "ceilings":
        row = ceilings(args.size, args.repeats)
    else:
        row = summary(args.run, args.started)
    row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(row), flush=True)
    if args.results:
        with open(args.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
