"""NVIDIA's EDM and EDM2 networks as disback models (the model kind "nvlabs").

A teacher comes from a network snapshot (``--pretrained network-snapshot.pkl`` or its URL), read by
disback.storage.snapshot without running anything it carries, and rebuilt by disback's own networks
(disback.diffusion.preconditioners, networks/edm.py, networks/edm2.py) under the checkpoint's own parameter names, so
that the snapshot's state dict loads strictly. The model file records the preconditioner's class and the constructor
arguments the snapshot recorded; rebuilding is then ``build_precond(class, arguments)``.

disback trains these networks in the precision ``run.precision`` sets (autocast), as DMD2 does for EDM's ImageNet
model: a teacher's file records ``use_fp16`` false. ``load_network`` of a snapshot keeps the value the snapshot
recorded, so that D(x; sigma) is the original's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from torch import nn

from disback.config import EDMConfig
from disback.errors import DisbackError
from disback.storage.fetch import fetch, is_url
from disback.storage.meta import ModelMeta
from disback.storage.snapshot import Snapshot, read_snapshot
from disback.storage.weights import load_state

KIND = "nvlabs"
IMAGE_UNITS = {"mean": 0.5, "scale": 0.5}  # EDM's images live in [-1, 1]


def is_snapshot(source: str | Path) -> bool:
    """A path or URL that names an EDM / EDM2 network snapshot (a pickle)."""
    name = str(source).split("#", 1)[0]
    return name.endswith(".pkl")


def snapshot_of(source: str | Path) -> Snapshot:
    """The snapshot a path or URL names (a URL is downloaded once into $DISBACK_CACHE, with its #sha256 checked);
    read once per process for each version of the file."""
    file, _ = fetch(
        str(source), what="EDM network snapshot", hint="give the .pkl file of an EDM or EDM2 network, or its URL"
    )
    return _read(str(Path(file).resolve()), os.stat(file).st_mtime_ns)


@functools.lru_cache(maxsize=1)  # a job reads a snapshot for its shape, then imports it: one read
def _read(file: str, mtime_ns: int) -> Snapshot:
    return read_snapshot(Path(file))


def spec_of(snapshot: Snapshot) -> dict[str, Any]:
    """What a model file of this kind records to rebuild the network."""
    return {"family": snapshot.family, "precond": snapshot.class_name, "kwargs": dict(snapshot.init_kwargs)}


def build(spec: dict[str, Any], use_fp16: bool | None = False) -> nn.Module:
    """The preconditioned network a spec describes; ``use_fp16`` None keeps the recorded value."""
    from disback.diffusion.preconditioners import build_precond

    kwargs = dict(spec["kwargs"])
    if use_fp16 is not None:
        kwargs["use_fp16"] = use_fp16
    try:
        return build_precond(spec["precond"], kwargs)
    except TypeError as exc:  # an argument the network does not take: the snapshot is of another version
        raise DisbackError(
            f"cannot build {spec['precond']} from the snapshot's arguments {sorted(kwargs)}: {exc}"
        ) from None


def rebuild(meta: ModelMeta, folder: Path) -> nn.Module:
    return build(meta.spec)


def load_network(source: str | Path, use_fp16: bool | None = None) -> tuple[nn.Module, Snapshot]:
    """The snapshot's network with its weights, loaded strictly (every key and shape of the checkpoint; EDM2's fp16
    weights are upcast into the network's fp32 tensors, which changes no value)."""
    snapshot = snapshot_of(source)
    network = build(spec_of(snapshot), use_fp16)
    load_state(network, snapshot.state, snapshot.file)
    return network.eval().requires_grad_(False), snapshot


def sampler_settings(network: nn.Module, edm: EDMConfig) -> dict[str, Any]:
    """The EDM settings a teacher of this kind is sampled and distilled with: the run's, with the noise levels kept
    inside the range the network was trained for (EDM's sampler clamps them so too)."""
    settings = dataclasses.asdict(edm)
    low, high = float(getattr(network, "sigma_min", 0.0)), float(getattr(network, "sigma_max", float("inf")))
    settings["sigma_min"] = max(settings["sigma_min"], low)
    settings["sigma_max"] = min(settings["sigma_max"], high)
    return settings


def import_snapshot(source: str, edm: EDMConfig) -> tuple[nn.Module, ModelMeta]:
    """A snapshot as a disback teacher: its network in the run's precision, and the file's description."""
    snapshot = snapshot_of(source)
    network = build(spec_of(snapshot))
    load_state(network, snapshot.state, snapshot.file)
    kwargs = snapshot.init_kwargs
    channels, resolution = int(kwargs["img_channels"]), int(kwargs["img_resolution"])
    spec = {**spec_of(snapshot), "kwargs": {**snapshot.init_kwargs, "use_fp16": False}}
    origin = {"source": str(source), "format": "edm-snapshot", "file": str(snapshot.file)}
    meta = ModelMeta(
        role="denoiser",
        kind=KIND,
        shape=[channels, resolution, resolution],
        normaliser=dict(IMAGE_UNITS),
        spec=spec,
        source=str(source),
        num_classes=int(kwargs.get("label_dim", 0) or 0),
        edm=sampler_settings(network, edm),
        origin=origin,
    )
    return network, meta


def shape_of(source: str | Path) -> tuple[int, int, int]:
    """(channels, resolution, classes) of a snapshot, for the data to be read at its size."""
    kwargs = snapshot_of(source).init_kwargs
    return int(kwargs["img_channels"]), int(kwargs["img_resolution"]), int(kwargs.get("label_dim", 0) or 0)


def source_label(source: str | Path) -> str:
    return str(source) if is_url(str(source)) else str(Path(source).resolve())
