"""The configuration's sections as typed dataclasses. Values live in YAML presets (``presets/``); loading.py reads
them into these types and checks.py checks them, so a misspelt key or an out-of-range value fails before any work
starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    name: str  # built-in (`disback list`), or the user's: .npy/.csv points, an .npz or a folder of images
    n_train: int  # points drawn once from a built-in 2-D distribution (ignored by data sets of fixed size)
    n_eval: int  # generator samples per evaluation (and reference points for built-in 2-D data)
    root: str = ""  # where a built-in image data set lives, if not in its usual place
    resolution: int = 0  # images: side in pixels that every image is resized to (0 for point data)
    channels: int = 0  # images: 1 (grayscale) or 3 (RGB) (0 for point data)


@dataclass
class NetworkConfig:
    kind: str  # "mlp" for points, "unet" (diffusers UNet2DModel) for images
    hidden: int = 128  # mlp
    depth: int = 3  # mlp
    emb_dim: int = 32  # mlp
    channels: list[int] = field(default_factory=lambda: [32, 64])  # unet: block_out_channels
    layers_per_block: int = 1  # unet
    attention: list[bool] = field(default_factory=lambda: [False, True])  # unet: self-attention in each level
    norm_groups: int = 8  # unet
    num_classes: int = 0  # unet: > 0 makes every network class-conditional (UNet2DModel's num_class_embeds)
    lora_rank: int = 0  # > 0: the fake score and the degrading model are LoRA adapters on the frozen teacher
    generator_lora_rank: int = 0  # > 0: the generator too is LoRA adapters on the teacher (DMD2's --generator_lora)


@dataclass
class EDMConfig:
    sigma_data: float  # data are standardised to unit scale, so 1.0 fits every point set
    sigma_min: float
    sigma_max: float
    rho: float
    p_mean: float  # ln(sigma) ~ N(p_mean, p_std^2) in the denoising score matching loss
    p_std: float
    # The teacher's sampler: EDM's Heun, deterministic when s_churn is 0; EDM samples ImageNet-64 with s_churn 40,
    # s_min 0.05, s_max 50, s_noise 1.003 (its stochastic sampler, Algorithm 2 of the paper)
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = 1e6  # no upper bound
    s_noise: float = 1.0


@dataclass
class TeacherConfig:
    steps: int
    batch: int
    lr: float
    ema_decay: float
    heun_steps: int  # steps of the EDM Heun sampler when the teacher is sampled
    pretrained: str = ""  # a diffusers UNet2DModel folder or hub id to distil instead of training a teacher


@dataclass
class DegradeConfig:
    steps: int  # K_1: fine-tuning steps of the teacher copy on initial-generator samples
    nodes: int  # N: nodes after the teacher; the path holds N + 1
    batch: int
    lr: float
    spacing: str = "distance"  # where nodes go: a key of choices.SPACINGS
    probes: int = 0  # distance measurements during stage 1 (dense early); 0 = 16 per node
    candidates: int = 4  # "distance": checkpoints per node held in CPU memory until the nodes are chosen
    plateau: float = 0.05  # "distance" only: end stage 1 once the distance grew < this fraction over the last half


@dataclass
class DistillConfig:
    steps: int  # generator steps ("iterations")
    batch: int
    lr_generator: float
    lr_fake: float
    fake_updates: int  # fake-score updates per generator update
    sigma_g: float | list[float]  # the generator's noise level: one denoiser call at it; a descending list, e.g.
    #                               [80, 2.5, 0.6], makes a k-step generator (DMD2's backward simulation trains it)
    switch_every: int  # M: generator steps between target switches ("fixed" schedule)
    sigma_min: float  # noise levels of the generator loss, inside [sigma_min, sigma_max] ...
    sigma_max: float
    noise: str = "karras"  # ... spread on the Karras schedule ("karras", DMD2's EDM trainer), or "lognormal":
    #                        ln(sigma) ~ N(edm.p_mean, edm.p_std^2) clipped to the range (a flow teacher's
    #                        logit-normal t, sigma = t / (1 - t), shifted as the teacher samples)
    method: str = "dmd"  # the generator loss: a key of choices.METHODS
    sid_alpha: float = 1.2  # sid: the alpha of SiD's loss (1.2 in the SiD paper)
    gan_weight: float = 0.003  # dmd2: weight of the GAN term in the generator's loss (DMD2's ImageNet value)
    gan_head_weight: float = 0.01  # dmd2: weight of the GAN head's loss in the fake score's loss (DMD2's)
    schedule: str = "warm_start"  # how the target walks back: a key of choices.SCHEDULES
    switch_ratio: float = 0.5  # adaptive: advance when the fake-target gap falls to this fraction of its start
    min_dwell: int = 10  # adaptive: generator steps on a node before it may advance (both bounds shrink so that
    #                      the walk reaches the teacher by half of distill.steps)
    max_dwell: int = 100  # adaptive: generator steps after which it advances regardless
    step_input: str = "simulate"  # k steps: a training step's input is "simulate"d from pure noise by the steps
    #                               before it (DMD2's backward simulation), or real "data" noised to its level (FastGen)
    reuse_samples: bool = False  # DMD2's order: the generator step first, and its samples (detached) train the fake
    #                              score's first update, which so skips a generator forward pass


@dataclass
class EvalConfig:
    every: int  # evaluate every this many iterations
    projections: int  # directions of the sliced Wasserstein distance
    threshold_factor: float  # "converged" = the measure at most this times the teacher's
    features: str = "classifier"  # images: "classifier" (trained on the data, cached; not Inception FID),
    #                               "inception=FILE" or a URL (Inception FID, as NVlabs/edm), or "module:function"
    classifier_steps: int = 1500  # images: training steps of that classifier
    ref: str = ""  # images: reference statistics (.npz of mu/sigma, a path or URL, e.g. EDM's FID refs) for the
    #                Fréchet distance in the loop, instead of the held-out images
    clip: str = (
        ""  # text: a CLIP model (folder, hub id, or open_clip:ARCH/PRETRAINED) for a CLIP score at each evaluation
    )


@dataclass
class RunConfig:
    checkpoint_every: int = 500  # steps between checkpoints of every stage (and one at its end); resume with --resume.
    #                              0: none (a killed stage starts again; for short runs of large networks, where one
    #                              checkpoint of the generator with its Adam states is 4x the network on disk)
    keep: int = 2  # checkpoints kept per stage; older ones are deleted only once a newer one is complete
    on_nonfinite: str = "stop"  # a non-finite loss: "stop" (an error; the last good checkpoint kept) or "skip"
    max_skipped: int = 20  # "skip": stop after this many consecutive skipped steps
    # "bf16": autocast in bf16 with fp32 master weights, and the frozen target held in bf16; "fp64": everything in fp64
    precision: str = "fp32"
    channels_last: bool = False  # UNets in channels-last memory format (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the networks' forward (state_dict keys unchanged)
    gradient_checkpointing: bool = False  # UNets recompute activations in the backward pass: less memory, more time
    fsdp: bool = False  # several processes: stages 1 and 2 shard their trained networks and Adam states (FSDP2);
    #                     a teacher trained here is data parallel (docs/scaling.md)
    log_with: str = (
        ""  # "tensorboard" or "wandb": every logged metric to that tracker too (metrics.jsonl stays the record)
    )


@dataclass
class TextConfig:
    """Text-to-image runs (`disback text`): the pipeline's UNet distilled on a prompts file."""

    guidance: float = 8.0  # classifier-free guidance scale of the target score (the original's 8), not the fake's
    timestep: int | list[int] = 399  # the generator is the UNet at this timestep on pure noise, as LCMScheduler samples
    #                                  in one step; a descending list, e.g. [999, 749, 499, 249], makes it k steps.
    #                                  Flow teachers (SD3, FLUX.1): flow time t = timestep / 1000, 1000 = pure noise
    resolution: int = 0  # flow teachers: image side in pixels (0: the pipeline's default, 1024 for SD3.5 and FLUX.1)
    max_sequence_length: int = 0  # flow teachers: T5 tokens per prompt (0: the family's, SD3 256, FLUX.1 512/256)
    shift: float = 0.0  # flow teachers: time shift s of the losses' noise levels, ln(sigma) ~ N(edm.p_mean + ln s,
    #                     edm.p_std^2); 0: the teacher scheduler's own (static shift, or exp(mu) at the resolution)


@dataclass
class Config:
    seed: int
    data: DataConfig
    network: NetworkConfig
    edm: EDMConfig
    teacher: TeacherConfig
    degrade: DegradeConfig
    distill: DistillConfig
    eval: EvalConfig
    run: RunConfig = field(default_factory=RunConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
