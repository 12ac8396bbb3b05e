"""`disback eval TARGET`: a one-step generator measured as the field measures it, so that a disback run can stand
beside a published number.

TARGET is a run or demo folder or a generator file (points: SWD and MMD; images: a Fréchet distance), an exported
one-step image pipeline (a Fréchet distance), or an exported text pipeline (a CLIP score against the prompts, and a
Fréchet distance when a reference is given). Images are drawn from fixed noise (``seed``), balanced over classes,
``batch`` at a time; the papers use 50,000 samples (10,000 for quick checks). The result goes to eval.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import yaml

from disback.config import Config, build_config, from_dict
from disback.config.checks import validate
from disback.data import load_data, to_units
from disback.data.images import read_image_source
from disback.diffusion.generator import with_steps
from disback.engine.progress import progress
from disback.errors import DisbackError
from disback.jobs.export import find_generator
from disback.metrics.images import (
    ImageMetrics,
    RunningStatistics,
    cache_dir,
    frechet_distance,
    image_features,
    reference_stats,
    statistics,
)
from disback.storage.files import atomic_write, sha256_file, write_json
from disback.storage.kinds import kind_of
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.models import load_model

log = logging.getLogger(__name__)
EVAL = "eval.json"
Draw = Callable[[int, int], torch.Tensor]  # (first index, count) -> samples: images in [0, 1], or points


@dataclass
class Target:
    """What is measured: its kind ("points", "images" or "text"), a draw function, the shape of one sample, the run's
    settings (a generator file's run; None for a pipeline) and, for text, the prompt of each sample."""

    kind: str
    draw: Draw
    shape: tuple[int, ...]
    cfg: Config | None = None
    prompts: Callable[[int, int], list[str]] | None = None


class Measure(Protocol):
    """A measure fed one batch of samples at a time (so that 50,000 images are never held at once)."""

    def add(self, samples: torch.Tensor, first: int) -> None: ...

    def result(self) -> dict[str, Any]: ...


def evaluate(
    target: Path,
    *,
    n: int = 50_000,
    batch: int = 250,
    seed: int = 0,
    ref: Path | None = None,
    features: str = "classifier",
    prompts: Path | None = None,
    clip: str | None = None,
    out: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Measure ``target`` (see the module's docstring); write and return eval.json's content. Every input (the feature
    network, the reference, the CLIP model, the prompts) is checked before the first sample is drawn."""
    if n < 1 or batch < 1:
        raise DisbackError("--n and --batch must be positive")
    begun = time.perf_counter()
    target = Path(target)
    what = _pipeline(target, seed, prompts) if (target / "model_index.json").is_file() else _generator(target, seed)
    measures = _measures(what, n, ref, features, clip)
    for first in progress(range(0, n, batch), "eval", show_progress):
        samples = what.draw(first, min(batch, n - first)).detach().cpu().float()
        for measure in measures:
            measure.add(samples, first)
    results = [measure.result() for measure in measures]
    record = {
        "target": str(target),
        "n": n,
        "seed": seed,
        "batch": batch,
        **results[0],
        "results": results,
        "time_s": round(time.perf_counter() - begun, 1),
    }
    file = Path(out) if out else (target if target.is_dir() else target.parent) / EVAL
    write_json(file, record)
    record["file"] = str(file)
    return record


def line(record: dict[str, Any]) -> str:
    """eval.json in one line."""
    parts = [f"{r['measure']} {r['value']:.4g} ({r['network']['name']})" for r in record["results"]]
    return f"{', '.join(parts)}  {record['n']} samples, seed {record['seed']}, {record['time_s']} s -> {record['file']}"


def _measures(what: Target, n: int, ref: Path | None, features: str, clip: str | None) -> list[Measure]:
    if what.kind == "points":
        return [_Points(what.cfg)]
    if what.kind == "text" and clip is None and ref is None:
        raise DisbackError(
            "a text pipeline is measured with a CLIP score (--clip MODEL, e.g. openai/clip-vit-base-patch32) "
            "or a Fréchet distance against reference images (--ref)"
        )
    measures: list[Measure] = []
    if what.kind == "images" or ref is not None:
        measures.append(_Fid(what, n, ref, features))
    if what.kind == "text" and clip is not None:
        measures.append(_Clip(clip, what.prompts))
    return measures


# ---------------------------------------------------------------- what is measured


def _generator(target: Path, seed: int) -> Target:
    file = find_generator(target)
    meta = read_meta(file)
    if meta.role != "generator":
        raise DisbackError(f"{file} is a {meta.role}; give a generator (a run folder or generator.safetensors)")
    if kind_of(meta, file).sampled_by is not None:
        raise DisbackError(
            f"{file} is a {meta.kind} generator: measure its exported pipeline (`disback export`) with --prompts"
        )
    model, meta = load_model(file)
    model.eval()
    steps = getattr(model, "steps", 1)  # a k-step generator's noise is every step's, fixed like the start's

    @torch.no_grad()
    def draw(first: int, count: int) -> torch.Tensor:
        noise = _noise(first, count, (steps, *meta.shape), seed)
        labels = torch.arange(first, first + count) % meta.num_classes if meta.num_classes else None
        return torch.from_numpy(to_units(with_steps(model)(noise, labels), meta.normaliser, images=meta.is_images))

    kind = "images" if meta.is_images else "points"
    return Target(kind, draw, tuple(meta.shape), _run_config(file, meta))


def _pipeline(folder: Path, seed: int, prompts: Path | None) -> Target:
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") == "OneStepPipeline":
        from disback.jobs.pipeline_onestep import OneStepPipeline

        pipe = OneStepPipeline.from_pretrained(folder)
        config = pipe.unet.config
        size = config.sample_size if isinstance(config.sample_size, (list, tuple)) else [config.sample_size] * 2
        shape, classes = (config.in_channels, *size), config.num_class_embeds

        def draw(first: int, count: int) -> torch.Tensor:
            labels = torch.arange(first, first + count) % classes if classes else None  # balanced over all classes
            noise = _noise(first, count, (pipe.steps, *shape), seed)  # every step's: the generator file's draws
            return pipe(batch_size=count, noise=noise, class_labels=labels, output_type="pt").images

        return Target("images", draw, tuple(shape))
    if prompts is None:
        raise DisbackError(
            f"{folder} is a text-to-image pipeline ({index.get('_class_name')}): give --prompts (a .txt file "
            "with one prompt per line, or .jsonl)"
        )
    from diffusers import DiffusionPipeline

    texts = _read_prompts(prompts)
    pipe = DiffusionPipeline.from_pretrained(folder)
    record = json.loads((folder / "disback.json").read_text()) if (folder / "disback.json").is_file() else {}
    call = record.get("call")  # how the export samples its generator (a disback export records it)
    if call is None:  # a UNet pipeline exported before the call was recorded, or none of disback's: LCM's
        timestep = record.get("timestep", 399)
        timesteps = list(timestep) if isinstance(timestep, list) else [timestep]  # a k-step generator's list
        call = {"num_inference_steps": len(timesteps), "guidance_scale": 0, "timesteps": timesteps}
    size = call.get("height") or pipe.unet.config.sample_size * pipe.vae_scale_factor

    def prompts_of(first: int, count: int) -> list[str]:
        return [texts[i % len(texts)] for i in range(first, first + count)]

    def draw_text(first: int, count: int) -> torch.Tensor:
        return pipe(
            prompt=prompts_of(first, count),
            **call,
            generator=[_sample_generator(seed, i) for i in range(first, first + count)],  # whatever the batch size
            output_type="pt",
        ).images

    return Target("text", draw_text, (3, size, size), prompts=prompts_of)


def _sample_generator(seed: int, index: int) -> torch.Generator:
    """One generator per sample index, so that sample i is the same whatever the batch size."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _noise(first: int, count: int, shape: tuple[int, ...] | list[int], seed: int) -> torch.Tensor:
    """The same noise for sample i whatever the batch size."""
    return torch.stack([torch.randn(*shape, generator=_sample_generator(seed, i)) for i in range(first, first + count)])


def _read_prompts(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DisbackError(f"prompts file {path} does not exist; give a .txt file with one prompt per line, or .jsonl")
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    texts = (
        [str(json.loads(x).get("prompt", json.loads(x).get("text", ""))) for x in lines]
        if path.suffix == ".jsonl"
        else lines
    )
    if not texts:
        raise DisbackError(f"{path} holds no prompts")
    return texts


def _run_config(file: Path, meta: ModelMeta) -> Config:
    """The settings the generator was trained with (its run's config.yaml), or a preset for its data."""
    saved = Path(file).parent / "config.yaml"
    if saved.is_file():
        return validate(from_dict(Config, yaml.safe_load(saved.read_text()), ""))
    if meta.is_images:
        return build_config(
            "digits", overrides={"data": {"name": meta.data, "channels": meta.shape[0], "resolution": meta.shape[-1]}}
        )
    return build_config("toy2d", overrides={"data": {"name": meta.data}})


# ---------------------------------------------------------------- the measures


class _Points:
    """SWD and MMD of points against the run's reference (points are small: they are kept)."""

    def __init__(self, cfg: Config) -> None:
        from disback.metrics.points import PointMetrics

        self.data = load_data(cfg.data, cfg.seed)
        self.metrics = PointMetrics(self.data.reference, cfg.eval.projections, self.data.modes, self.data.mode_std)
        self.samples: list[np.ndarray] = []

    def add(self, samples: torch.Tensor, first: int) -> None:
        self.samples.append(samples.numpy())

    def result(self) -> dict[str, Any]:
        values = self.metrics(np.concatenate(self.samples))
        return {
            "measure": "swd",
            "value": values["swd"],
            "values": values,
            "network": {"name": "no feature network", "sha256": None},
            "reference": {"data": self.data.name, "n": len(self.data.reference)},
        }


class _Fid:
    """The Fréchet distance in a feature network's space; the features' statistics are accumulated batch by batch."""

    def __init__(self, what: Target, n: int, ref: Path | None, features: str) -> None:
        if n < 2:
            raise DisbackError(f"a Fréchet distance needs at least 2 samples (a covariance), got --n {n}")
        cfg = what.cfg
        data = load_data(cfg.data, cfg.seed) if cfg is not None else None
        if ref is None and data is None:
            raise DisbackError(
                "an exported pipeline has no data to compare with: give --ref (an .npz of mu/sigma as EDM's "
                "fid.py ref writes it, or a folder / .npz of images) and --features inception=FILE"
            )
        if features == "classifier" and data is None:
            raise DisbackError(
                "the classifier features are trained on the run's data set, which an exported pipeline does not "
                "name; give --features inception=FILE"
            )
        fn, info = image_features(
            features,
            None if data is None else data.train,
            None if data is None else data.labels,
            cfg.eval.classifier_steps if cfg is not None else 1500,
        )
        self.metrics = ImageMetrics((np.zeros(1), np.eye(1)), fn, info)  # its reference comes next
        if ref is None:
            self.metrics.ref_stats = statistics(self.metrics.embed(data.reference))
            self.reference: dict[str, Any] = {"data": data.name, "n": len(data.reference)}
        else:
            self.metrics.ref_stats, self.reference = _reference(Path(ref), self.metrics, what.shape)
        dimension, fewest = len(self.metrics.ref_stats[0]), min(n, self.reference.get("n", n))
        if fewest < dimension:
            log.warning(
                "FID from %d samples (reference: %s) of %d-d features is biased (a covariance of rank below its "
                "size); the papers use 50,000 samples, 10,000 for quick checks",
                n,
                self.reference.get("n", "statistics"),
                dimension,
            )
        self.stats, self.finite = RunningStatistics(), True

    def add(self, samples: torch.Tensor, first: int) -> None:
        if not torch.isfinite(samples).all():
            self.finite = False
        if self.finite:
            self.stats.add(self.metrics.embed(samples.numpy()))

    def result(self) -> dict[str, Any]:
        value = frechet_distance(*self.stats.value(), *self.metrics.ref_stats) if self.finite else float("nan")
        info = self.metrics.info
        name = {"inception": "inception", "plugged": f"plugged {info.get('spec')}"}.get(
            info["task"], "classifier (not Inception FID)"
        )
        keep = ("file", "sha256", "spec", "accuracy", "task")
        network = {"name": name, **{k: v for k, v in info.items() if k in keep}}
        if "sha256" not in network and info.get("file"):
            network["sha256"] = sha256_file(info["file"])
        return {"measure": "fid", "value": value, "network": network, "reference": self.reference}


class _Clip:
    """100 x the mean cosine similarity of each image with its prompt."""

    def __init__(self, spec: str, prompts: Callable[[int, int], list[str]] | None) -> None:
        from disback.metrics.clip import ClipScore

        self.score, self.prompts, self.sims = ClipScore(spec), prompts, []
        self.seen: set[str] = set()

    def add(self, images: torch.Tensor, first: int) -> None:
        texts = self.prompts(first, len(images))
        self.seen.update(texts)
        for i in range(0, len(images), 64):
            self.sims.append(self.score.similarities(images[i : i + 64], texts[i : i + 64]))

    def result(self) -> dict[str, Any]:
        info = self.score.info
        return {
            "measure": "clip_score",
            "value": 100.0 * float(torch.cat(self.sims).mean()),
            "network": {"name": f"CLIP {info['model']}", **info},
            "reference": {"prompts": len(self.seen)},
        }


def _reference(ref: Path, metrics: ImageMetrics, shape: tuple[int, ...]) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """Reference statistics from an .npz of mu/sigma, or from images (a folder or an .npz), embedded once at the
    generated images' size and cached in $DISBACK_CACHE for reuse."""
    if not ref.exists():
        raise DisbackError(f"reference {ref} does not exist; give an .npz of mu/sigma, or a folder / .npz of images")
    if ref.suffix == ".npz" and _holds_stats(ref):
        dimension = metrics.embed(np.zeros((2, *shape), dtype=np.float32)).shape[1]
        return reference_stats(ref, dimension), {"stats": str(ref), "sha256": sha256_file(ref), **_count(ref)}
    network = metrics.info.get("sha256") or metrics.info.get("file") or metrics.info.get("spec")
    source = sha256_file(ref) if ref.is_file() else _folder_fingerprint(ref)
    key = hashlib.sha256(f"{source}|{network}|{shape}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"ref-{key}.npz"
    if not cached.is_file():
        images = read_image_source(ref, shape[-1], shape[0])  # at the size of the generated images
        mu, sigma = statistics(metrics.embed(images))
        cached.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, mu=mu, sigma=sigma, n=len(images))  # n: the images they come from

        atomic_write(cached, write)
        log.warning(
            "reference statistics of %s (%d images) saved to %s; give --ref %s to reuse them",
            ref,
            len(images),
            cached,
            cached,
        )
    return reference_stats(cached), {"images": str(ref), "stats": str(cached), **_count(cached)}


def _count(stats: Path) -> dict[str, int]:
    """How many images the statistics come from, where the file says (disback's cache does; EDM's files do not)."""
    with np.load(stats, allow_pickle=False) as z:
        return {"n": int(z["n"])} if "n" in z.files and z["n"].ndim == 0 else {}


def _folder_fingerprint(folder: Path) -> str:
    """A folder of images by each file's name, size and modification time: replacing an image is a new reference."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return "|".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _holds_stats(file: Path) -> bool:
    """An .npz of statistics (mu and sigma, or one of them: reference_stats names what is missing) or one holding no
    image array, rather than an .npz of images (one 3-d or 4-d array)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            if "mu" in z.files or "sigma" in z.files:
                return True
            return not any(z[k].ndim in (3, 4) for k in z.files)
    except (OSError, ValueError):
        return True
