"""`disback sample`: samples of a saved model in the data's units: EDM's Heun sampler for a denoiser (a teacher or
a path node), one call for a one-step generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from disback.data import to_units
from disback.diffusion.generator import with_steps
from disback.diffusion.sampling import churn_of, heun_sample, karras_schedule
from disback.errors import DisbackError
from disback.stages.common import in_batches
from disback.storage.files import save_array
from disback.storage.kinds import kind_of
from disback.storage.meta import read_meta
from disback.storage.models import load_model


def sample_to_file(model_file: Path, n: int, steps: int, seed: int, out: Path, plot: str | None = None) -> np.ndarray:
    """``n`` samples from fixed noise (``seed``), balanced over the classes of a class-conditional model."""
    if n < 1 or steps < 1:
        raise DisbackError("--n and --steps must be positive")
    meta = read_meta(Path(model_file))
    how = kind_of(meta, model_file).sampled_by
    if how is not None:  # checked before the network is built: such models are large, and this command cannot use them
        raise DisbackError(f"{model_file} is a {meta.kind} model, which `disback sample` does not draw; {how(meta)}")
    if meta.role == "denoiser" and not meta.edm:
        raise DisbackError(
            f"{model_file} is a denoiser of kind {meta.kind} without sampling settings; sample a generator"
        )
    model, meta = load_model(Path(model_file))
    k = getattr(model, "steps", None) if meta.role == "generator" else None
    size = (n, *meta.shape) if k is None else (n, k, *meta.shape)  # a generator's noise: every step's
    z = torch.randn(*size, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % meta.num_classes if meta.num_classes else None
    if meta.role == "generator":
        x = in_batches(with_steps(model), z, labels)
    else:
        edm = meta.edm
        sigmas = karras_schedule(steps, edm["sigma_min"], edm["sigma_max"], edm["rho"])
        churn = churn_of(edm) | {"seed": seed}
        x = in_batches(lambda zz, yy: heun_sample(model.eval(), zz, sigmas, yy, **churn), z, labels)
    samples = to_units(x, meta.normaliser, images=meta.is_images)
    save_array(Path(out), samples)
    if plot:
        from disback.jobs.report import picture

        picture(samples, Path(plot), title=f"{meta.role} samples ({n})")
    return samples
