"""Every named choice a user makes, in one place: the config checks, the CLI's choices and help, `disback list`
and the benchmarks read these tables. The code that implements a choice is bound to the same names (the tests check
that every name has its implementation and no implementation lacks a name)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """A score-distillation method: its generator loss (a key of disback.diffusion.losses.GENERATOR_LOSSES), whether
    that loss differentiates through the score networks' inputs (SiD) rather than through x0 alone (VSD, DMD), and
    whether it adds DMD2's GAN term (which needs real data and a fake score on a faster time-scale)."""

    help: str
    loss: str
    through_scores: bool = False
    gan: bool = False
    min_fake_updates: int = 0


METHODS: dict[str, MethodSpec] = {
    "vsd": MethodSpec("Diff-Instruct / VSD: the generator moves along D_fake - D_target", loss="vsd"),
    "dmd": MethodSpec("DMD (DisBack's Eq. 8): the same, divided per sample by mean|x0 - D_target|", loss="dmd"),
    "dmd2": MethodSpec(
        "DMD2: DMD plus a GAN head on the fake score's bottleneck (needs real data)",
        loss="dmd",
        gan=True,
        min_fake_updates=2,
    ),
    "sid": MethodSpec(
        "SiD: a Fisher-divergence loss, gradients through the score networks' inputs", loss="sid", through_scores=True
    ),
}

SCHEDULES: dict[str, str] = {
    "fixed": "the target moves one node every distill.switch_every generator steps (the paper)",
    "adaptive": "the target moves when the generator has caught up with it (the fake-target gap has fallen)",
    "warm_start": "the fake score starts at the path's last node, the target is the teacher from the first step",
}

SPACINGS: dict[str, str] = {
    "steps": "a node every degrade.steps / degrade.nodes stage-1 steps (the paper)",
    "geometric": "nodes at stage-1 steps K_1^(k/N): dense early, where the model moves fastest",
    "distance": "nodes evenly spaced in measured distance from the teacher; stage 1 may end at a plateau",
}

DATASETS: dict[str, str] = {
    "ring8": "2-D: 8 Gaussians on a circle of radius 2",
    "grid25": "2-D: 25 Gaussians on a 5 x 5 grid",
    "moons": "2-D: two interleaved half circles",
    "swissroll": "2-D: a spiral",
    "checkerboard": "2-D: 8 squares of a 4 x 4 board",
    "digits": "images: scikit-learn's 1,797 8 x 8 digits (in its wheel)",
    "fashion": "images: Fashion-MNIST 28 x 28 (Debian package dataset-fashion-mnist)",
}
USER_DATA = "an .npy/.csv file of N x D points, or a folder / .npz of images"

NETWORKS: dict[str, str] = {
    "mlp": "an MLP for points",
    "unet": "diffusers' UNet2DModel for images",
}

PRECISIONS: dict[str, str] = {
    "fp32": "everything in fp32",
    "bf16": "bf16 autocast with fp32 master weights; the frozen target held in bf16",
    "fp64": "everything in fp64 (networks, data, noise, optimiser states): slow, for debugging and verification",
}

STEP_INPUTS: dict[str, str] = {
    "simulate": "DMD2's backward simulation: the steps before the trained one run from pure noise, without gradients",
    "data": "FastGen's: the trained step's input is real data noised to its level (needs the data)",
}

NOISE_LEVELS: dict[str, str] = {
    "karras": "uniform in the Karras schedule's parameter between distill.sigma_min and sigma_max (DMD2's EDM trainer)",
    "lognormal": "ln(sigma) ~ N(edm.p_mean, edm.p_std^2) clipped to that range: a flow teacher's (shifted) logit-normal t",
}

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # any one of them will do
TRACKERS: dict[str, str] = {
    "": "no tracker (metrics.jsonl only)",
    "tensorboard": "TensorBoard event files in each stage's folder (pip install tensorboard)",
    "wandb": "Weights & Biases runs (pip install wandb)",
}

ON_NONFINITE: dict[str, str] = {
    "stop": "stop with a clear error; the last good checkpoint is kept",
    "skip": "skip the update and go on, up to run.max_skipped in a row",
}


def described(table: dict) -> str:
    """``name (what it is); ...`` for help texts and `disback list`."""
    return "; ".join(f"{name} ({getattr(v, 'help', v)})" for name, v in table.items())
