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
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml

from disback.config import Config, build_config, from_dict
from disback.config.checks import validate
from disback.data import load_data, to_units
from disback.data.images import read_image_source
from disback.engine.progress import progress
from disback.errors import DisbackError
from disback.jobs.export import find_generator
from disback.metrics.images import ImageMetrics, cache_dir, image_features, reference_stats, statistics
from disback.storage.files import atomic_write, sha256_file, write_json
from disback.storage.kinds import kind_of
from disback.storage.meta import ModelMeta, read_meta
from disback.storage.models import load_model

log = logging.getLogger(__name__)
EVAL = "eval.json"
Draw = Callable[[int, int], torch.Tensor]  # (first index, count) -> samples: images in [0, 1], or points


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
    """Measure ``target`` (see the module's docstring); write and return eval.json's content."""
    if n < 1 or batch < 1:
        raise DisbackError("--n and --batch must be positive")
    begun = time.perf_counter()
    target = Path(target)
    if (target / "model_index.json").is_file():
        kind, draw, meta, cfg = _pipeline(target, n, seed, prompts)
    else:
        kind, draw, meta, cfg = _generator(target, seed)
    if kind == "text" and clip is None and ref is None:
        raise DisbackError(
            "a text pipeline is measured with a CLIP score (--clip MODEL, e.g. openai/clip-vit-base-patch32) "
            "or a Fréchet distance against reference images (--ref)"
        )
    samples = torch.cat(list(_batches(draw, n, batch, show_progress)))
    results = []
    if kind == "points":
        results.append(_points(samples.numpy(), cfg, n))
    elif kind == "images" or ref is not None:
        results.append(_fid(samples, cfg, ref, features))
    if kind == "text" and clip is not None:
        results.append(_clip(samples, clip, draw.prompts))  # type: ignore[attr-defined]
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


def _batches(draw: Draw, n: int, batch: int, show: bool) -> Iterator[torch.Tensor]:
    bar = progress(range(0, n, batch), "eval", show)
    for i in bar:
        yield draw(i, min(batch, n - i)).detach().cpu().float()


# ---------------------------------------------------------------- what is measured


def _generator(target: Path, seed: int) -> tuple[str, Draw, ModelMeta, Config]:
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
    cfg = _run_config(file, meta)

    @torch.no_grad()
    def draw(first: int, count: int) -> torch.Tensor:
        z = _noise(first, count, meta.shape, seed)
        labels = torch.arange(first, first + count) % meta.num_classes if meta.num_classes else None
        return torch.from_numpy(to_units(model(z, labels), meta.normaliser, images=meta.is_images))

    return ("images" if meta.is_images else "points"), draw, meta, cfg


def _pipeline(
    folder: Path, n: int, seed: int, prompts: Path | None
) -> tuple[str, Draw, ModelMeta | None, Config | None]:
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") == "OneStepPipeline":
        from disback.jobs.pipeline_onestep import OneStepPipeline

        pipe = OneStepPipeline.from_pretrained(folder)
        shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)

        def draw(first: int, count: int) -> torch.Tensor:
            return pipe(batch_size=count, noise=_noise(first, count, shape, seed), output_type="pt").images

        return "images", draw, None, None
    if prompts is None:
        raise DisbackError(
            f"{folder} is a text-to-image pipeline ({index.get('_class_name')}): give --prompts (a .txt file "
            "with one prompt per line, or .jsonl)"
        )
    from diffusers import DiffusionPipeline

    texts = _read_prompts(prompts)
    pipe = DiffusionPipeline.from_pretrained(folder)
    timestep = (
        json.loads((folder / "disback.json").read_text())["timestep"] if (folder / "disback.json").is_file() else 399
    )

    def draw_text(first: int, count: int) -> torch.Tensor:
        batch = [texts[i % len(texts)] for i in range(first, first + count)]
        generator = torch.Generator().manual_seed(seed + first)
        return pipe(
            prompt=batch,
            num_inference_steps=1,
            guidance_scale=0,
            timesteps=[timestep],
            generator=generator,
            output_type="pt",
        ).images

    draw_text.prompts = [texts[i % len(texts)] for i in range(n)]  # type: ignore[attr-defined]
    return "text", draw_text, None, None


def _noise(first: int, count: int, shape: tuple[int, ...] | list[int], seed: int) -> torch.Tensor:
    """The same noise for sample i whatever the batch size: one generator per sample index."""
    return torch.stack(
        [
            torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            for i in range(first, first + count)
        ]
    )


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


def _points(samples: np.ndarray, cfg: Config, n: int) -> dict[str, Any]:
    from disback.metrics.points import PointMetrics

    data = load_data(cfg.data, cfg.seed)
    values = PointMetrics(data.reference, cfg.eval.projections, data.modes, data.mode_std)(samples)
    return {
        "measure": "swd",
        "value": values["swd"],
        "values": values,
        "network": {"name": "no feature network", "sha256": None},
        "reference": {"data": data.name, "n": len(data.reference)},
    }


def _fid(samples: torch.Tensor, cfg: Config | None, ref: Path | None, features: str) -> dict[str, Any]:
    data = load_data(cfg.data, cfg.seed) if cfg is not None else None
    if ref is None and data is None:
        raise DisbackError(
            "an exported pipeline has no data to compare with: give --ref (an .npz of mu/sigma as EDM's "
            "fid.py ref writes it, or a folder / .npz of images)"
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
    metrics = ImageMetrics((np.zeros(1), np.eye(1)), fn, info)  # its reference comes next
    if ref is None:
        metrics.ref_stats, reference = (
            statistics(metrics.embed(data.reference)),
            {"data": data.name, "n": len(data.reference)},
        )
    else:
        metrics.ref_stats, reference = _reference(Path(ref), metrics, tuple(samples.shape[1:]))
    dimension, fewest = len(metrics.ref_stats[0]), min(len(samples), reference.get("n", len(samples)))
    if fewest < dimension:
        log.warning(
            "FID from %d samples (reference: %s) of %d-d features is biased (a covariance of rank below its size); "
            "the papers use 50,000 samples, 10,000 for quick checks",
            len(samples),
            reference.get("n", "statistics"),
            dimension,
        )
    value = metrics(samples.numpy())["fid"]
    name = {"inception": "inception", "plugged": f"plugged {info.get('spec')}"}.get(
        info["task"], "classifier (not Inception FID)"
    )
    network = {"name": name, **{k: v for k, v in info.items() if k in ("file", "sha256", "spec", "accuracy", "task")}}
    if "sha256" not in network and info.get("file"):
        network["sha256"] = sha256_file(info["file"])
    return {"measure": "fid", "value": value, "network": network, "reference": reference}


def _reference(ref: Path, metrics: ImageMetrics, shape: tuple[int, ...]) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """Reference statistics from an .npz of mu/sigma, or from images (a folder or an .npz), embedded once at the
    generated images' size and cached in $DISBACK_CACHE for reuse."""
    if ref.suffix == ".npz" and _holds_stats(ref):
        dimension = metrics.embed(np.zeros((2, *shape), dtype=np.float32)).shape[1]
        return reference_stats(ref, dimension), {"stats": str(ref), "sha256": sha256_file(ref)}
    if not ref.exists():
        raise DisbackError(f"reference {ref} does not exist; give an .npz of mu/sigma, or a folder / .npz of images")
    network = metrics.info.get("sha256") or metrics.info.get("file") or metrics.info.get("spec")
    source = sha256_file(ref) if ref.is_file() else "|".join(sorted(str(p.relative_to(ref)) for p in ref.rglob("*")))
    key = hashlib.sha256(f"{source}|{network}|{shape}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"ref-{key}.npz"
    if not cached.is_file():
        images = read_image_source(ref, shape[-1], shape[0])  # at the size of the generated images
        mu, sigma = statistics(metrics.embed(images))
        cached.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, mu=mu, sigma=sigma)

        atomic_write(cached, write)
        log.warning(
            "reference statistics of %s (%d images) saved to %s; give --ref %s to reuse them",
            ref,
            len(images),
            cached,
            cached,
        )
    return reference_stats(cached), {"images": str(ref), "stats": str(cached)}


def _holds_stats(file: Path) -> bool:
    """An .npz of statistics (mu, sigma), not of images (reference_stats names what is wrong with a bad one)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            return not any(k in z.files for k in ("images", "arr_0")) or "mu" in z.files
    except (OSError, ValueError):
        return True


def _clip(images: torch.Tensor, spec: str, prompts: list[str]) -> dict[str, Any]:
    from disback.metrics.clip import ClipScore

    score = ClipScore(spec)
    sims = torch.cat([score.similarities(images[i : i + 64], prompts[i : i + 64]) for i in range(0, len(images), 64)])
    info = score.info
    return {
        "measure": "clip_score",
        "value": 100.0 * float(sims.mean()),
        "network": {"name": f"CLIP {info['model']}", **info},
        "reference": {"prompts": len(set(prompts))},
    }
