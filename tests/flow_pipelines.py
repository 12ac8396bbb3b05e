"""Tiny Stable Diffusion 3 and FLUX.1 pipelines built offline (word-level tokenizers made here, T5 from an explicit
config), saved with save_pretrained: the real loading code paths, at a size a CPU runs in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "red", "square", "blue", "circle", "green", "stripes", "photo", "of", "cat", "dog", "the", "on", "in"]


def word_tokenizer(kind: str, max_length: int):
    """A fast tokenizer over a few words: CLIP-style (<|startoftext|> ... <|endoftext|>) or T5-style (... </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "clip":
        special = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"}
        tokens = ["<|startoftext|>", "<|endoftext|>", "<unk>", *WORDS]
        template = "<|startoftext|> $A <|endoftext|>"
    else:
        special = {"bos": None, "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
        tokens = ["<pad>", "</s>", "<unk>", *WORDS]
        template = "$A </s>"
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    pieces = [p for p in template.split() if p != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(p, vocab[p]) for p in pieces])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=special["pad"],
        unk_token=special["unk"],
        model_max_length=max_length,
    )


def clip_text(tokenizer, hidden: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_text(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    )


def vae(latent_channels: int, scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling,
        shift_factor=shift,
        sample_size=16,
    )


def build_sd3(root: Path, shift: float = 3.0, width: int = 32, sample_size: int = 8) -> Path:
    """A StableDiffusion3Pipeline: two CLIPs with projections, T5, an SD3 transformer, a 2-level VAE (8 x 8 latents
    of 16 x 16 images), FlowMatchEulerDiscreteScheduler with the SD3.5 releases' shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    clip, t5 = word_tokenizer("clip", 77), word_tokenizer("t5", 32)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=width,
        pooled_projection_dim=2 * 16,
        out_channels=4,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae(4, 1.5305, 0.0609),
        text_encoder=clip_text(clip, 16, 16, True),
        tokenizer=clip,
        text_encoder_2=clip_text(clip, 16, 16, True),
        tokenizer_2=clip,
        text_encoder_3=t5_text(t5, width),
        tokenizer_3=t5,
    )
    pipe.save_pretrained(root / "sd3")
    return root / "sd3"


def build_flux(root: Path, dev: bool = True, width: int = 32) -> Path:
    """A FluxPipeline: CLIP (pooled) and T5, a Flux transformer (with embedded guidance for dev, without for
    schnell), a VAE with 1 latent channel (packed 2 x 2 into 4), FlowMatchEulerDiscreteScheduler as the releases set
    it (dev: dynamic shifting; schnell: none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip, t5 = word_tokenizer("clip", 77), word_tokenizer("t5", 32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=width,
        pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=dev,
    )
    scheduler = (
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        if dev
        else FlowMatchEulerDiscreteScheduler(shift=1.0)
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae(1, 0.3611, 0.1159),
        text_encoder=clip_text(clip, 16, 16, False),
        tokenizer=clip,
        text_encoder_2=t5_text(t5, width),
        tokenizer_2=t5,
    )
    name = "flux-dev" if dev else "flux-schnell"
    pipe.save_pretrained(root / name)
    return root / name
