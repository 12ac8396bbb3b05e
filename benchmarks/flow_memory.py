"""How much GPU memory SD3.5 and FLUX.1 need per GPU under each memory saver: an estimate from exact parameter counts
and activation bytes measured at small size on the CPU (the GPU measurement belongs to the GPU issue).

    .venv/bin/python benchmarks/flow_memory.py --out benchmarks/results/flow-memory-cpu    # about a minute here

Parameters: each release's transformer built from its published configuration on the meta device (no weights, no
download) and counted. Activations: tiny transformers of the same block types (SD3's JointTransformerBlock, FLUX.1's
double- and single-stream blocks) run forward in float32 on the CPU under ``saved_tensors_hooks``, which sums the
bytes autograd keeps for the backward pass, at two depths and two token counts; the differences give bytes per block
per token per unit of width, which scale to the real width, depth and token count (1024 x 1024: 4096 image tokens, plus
the text's), halved for bf16. With gradient checkpointing (one block at a time, as diffusers does it) autograd keeps
each block's input and, during the backward pass, one block's own activations.

The model of a distillation step (run.precision=bf16, method dmd: no gradient through the score networks):
- the frozen target in bf16: 2 bytes per parameter (a LoRA fake score and nodes, and a LoRA generator, share it);
- each trained full network (the generator; the fake score without LoRA): fp32 weights, gradients and Adam's two
  moments, 16 bytes per parameter; under run.fsdp divided among the GPUs (the target is not sharded);
- activations of one network's backward at a time (the generator step, then the fake score's), per sample.
- LoRA adapters (rank 64, the presets', on every linear layer) are trained networks too: 16 bytes per adapter
  parameter (FLUX.1: 346 M of them, 5.2 GiB per adapted network).
Not counted: CUDA's context and allocator slack (typically 1-3 GB), the prompt table, and stage 1 (which holds less:
one trained network). Not yet checked on a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

GiB = 2**30

# the published transformer configurations (diffusers' config.json of each release)
RELEASES = {
    "SD3.5-medium": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        77 + 256,  # text tokens: CLIP's 77 and T5's 256
    ),
    "SD3.5-large": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
        77 + 256,
    ),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True), 512),
    "FLUX.1-schnell": ("FluxTransformer2DModel", dict(guidance_embeds=False), 256),
}
RANK = 64  # the sd3 and flux presets' LoRA rank
IMAGE_TOKENS = (1024 // 8 // 2) ** 2  # 1024 x 1024 pixels: 128 x 128 latents in 2 x 2 patches


def count_parameters(cls_name: str, config: dict, rank: int) -> tuple[int, int]:
    """The transformer's parameters, and those of rank-``rank`` LoRA adapters on every linear and convolution layer
    (what network.lora_rank and generator_lora_rank adapt)."""
    import diffusers
    from torch import nn

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    adapters = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            adapters += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            adapters += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return sum(p.numel() for p in model.parameters()), adapters


def saved_bytes(run) -> int:
    """Bytes autograd keeps for the backward pass while ``run()`` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def tiny_sd3(layers: int, width: int = 64, heads: int = 2):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        joint_attention_dim=32,
        caption_projection_dim=width,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
    )


def tiny_flux(double: int, single: int, width: int = 64, heads: int = 2):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=[8, 12, 12],
        guidance_embeds=True,
    )


def run_sd3(model, side: int, text: int, checkpointing: bool):
    if checkpointing:
        model.enable_gradient_checkpointing()
    x = torch.randn(1, 4, side, side)
    return lambda: model(
        hidden_states=x,
        encoder_hidden_states=torch.randn(1, text, 32),
        pooled_projections=torch.randn(1, 16),
        timestep=torch.tensor([500.0]),
    ).sample.sum()


def run_flux(model, side: int, text: int, checkpointing: bool):
    from disback.text.networks import image_ids, pack

    if checkpointing:
        model.enable_gradient_checkpointing()
    x = torch.randn(1, 4, side, side)
    return lambda: model(
        hidden_states=pack(x),
        encoder_hidden_states=torch.randn(1, text, 32),
        pooled_projections=torch.randn(1, 16),
        timestep=torch.tensor([0.5]),
        img_ids=image_ids(side, side, "cpu", torch.float32),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5]),
    ).sample.sum()


def per_block(measure, build, runner, tokens_of, width: int) -> dict:
    """Saved bytes per block per token per unit of width (fp32), without and with checkpointing: per block from the
    difference of 3 blocks and 1, per token from the difference of two token counts (what a block keeps whatever
    the token count, e.g. its modulation vectors, drops out); ``build(n)`` makes a model with n of the blocks
    measured (the other kind fixed)."""
    out = {}
    for ckpt in (False, True):
        block = {}
        for side in (16, 32):
            one = measure(runner(build(1), side, 8, ckpt))
            three = measure(runner(build(3), side, 8, ckpt))
            block[tokens_of(side)] = (three - one) / 2
        (t0, b0), (t1, b1) = sorted(block.items())
        out["checkpointed" if ckpt else "plain"] = (b1 - b0) / ((t1 - t0) * width)
    return out


def activations(width: int = 64) -> dict:
    """Per-block coefficients: bytes kept per token per unit of width, fp32, for each block kind."""
    torch.manual_seed(0)
    sd3_tokens = lambda side: (side // 2) ** 2 + 8  # noqa: E731 (image patches and the text)
    flux_tokens = lambda side: (side // 2) ** 2 + 8  # noqa: E731
    return {
        "sd3 joint block": per_block(saved_bytes, lambda n: tiny_sd3(n, width), run_sd3, sd3_tokens, width),
        "flux double block": per_block(saved_bytes, lambda n: tiny_flux(n, 1, width), run_flux, flux_tokens, width),
        "flux single block": per_block(saved_bytes, lambda n: tiny_flux(1, n, width), run_flux, flux_tokens, width),
    }


def estimate(params: int, adapters: int, blocks: list[tuple[int, float, float]], tokens: int, width: int) -> dict:
    """GiB per GPU for each saver at batch 1 per GPU; ``blocks``: (count, plain, checkpointed) coefficients."""
    bf16 = 0.5  # the coefficients are fp32 bytes; autocast keeps bf16 activations
    plain = sum(n * c for n, c, _ in blocks) * tokens * width * bf16
    # checkpointed: every block's input, plus the largest block's own activations during its recompute
    ckpt = (sum(n * k for n, _, k in blocks) + max(c for _, c, _ in blocks)) * tokens * width * bf16
    target, trained, lora = 2 * params, 16 * params, 16 * adapters
    rows = {
        "full copies, 1 GPU": target + 2 * trained,
        "full copies, run.fsdp on 8 GPUs": target + 2 * trained / 8,
        "LoRA fake score and nodes, 1 GPU": target + trained + lora,
        "LoRA fake score, nodes and generator, 1 GPU": target + 2 * lora,
    }
    return {
        "parameters": params,
        "adapter_parameters": adapters,
        "activations_GiB_per_sample": {"plain": plain / GiB, "checkpointed": ckpt / GiB},
        "states_GiB": {k: v / GiB for k, v in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    coeff = activations()
    mean = coeff
    results = {"coefficients_bytes_per_token_width_block_fp32": coeff, "releases": {}}
    for name, (cls_name, config, text) in RELEASES.items():
        params, adapters = count_parameters(cls_name, config, RANK)
        tokens = IMAGE_TOKENS + text
        if cls_name == "SD3Transformer2DModel":
            width = config["num_attention_heads"] * config["attention_head_dim"]
            c = mean["sd3 joint block"]
            blocks = [(config["num_layers"], c["plain"], c["checkpointed"])]
        else:
            width = 24 * 128
            d, s = mean["flux double block"], mean["flux single block"]
            blocks = [(19, d["plain"], d["checkpointed"]), (38, s["plain"], s["checkpointed"])]
        results["releases"][name] = {
            "tokens": tokens,
            "width": width,
            **estimate(params, adapters, blocks, tokens, width),
        }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| release | parameters (LoRA rank 64) | activations per sample (GiB, bf16): plain / checkpointed | "
        + " | ".join(next(iter(results["releases"].values()))["states_GiB"])
        + " |",
    ]
    lines.append("|" + "---|" * (3 + len(next(iter(results["releases"].values()))["states_GiB"])))
    lines[0] = lines[0].replace("parameters (LoRA rank 64)", "parameters (of LoRA rank 64)")
    for name, r in results["releases"].items():
        act = r["activations_GiB_per_sample"]
        states = " | ".join(f"{v:.0f}" for v in r["states_GiB"].values())
        lines.append(
            f"| {name} | {r['parameters'] / 1e9:.2f} B ({r['adapter_parameters'] / 1e6:.0f} M) | "
            f"{act['plain']:.1f} / {act['checkpointed']:.2f} | {states} |"
        )
    coeff = results["coefficients_bytes_per_token_width_block_fp32"]
    lines.append("")
    lines.append(
        "Measured coefficients (fp32 bytes kept per block per token per unit of width; from 72 and 264 tokens, "
        "width 64):"
    )
    for kind, c in coeff.items():
        lines.append(f"- {kind}: plain {c['plain']:.1f}; checkpointed {c['checkpointed']:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
