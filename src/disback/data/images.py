"""Image data: scikit-learn's digits, Fashion-MNIST from its IDX files, or the user's own images (a folder, an .npz
array, or a zip as NVlabs/edm's dataset_tool.py writes it: image files and a dataset.json with their labels).

Every loader returns float arrays N x C x H x W in [0, 1] at the preset's resolution, and labels where it has them.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from disback.errors import DisbackError

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MIN_IMAGES = 20


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (16 grey levels), shipped inside its wheel."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DisbackError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DisbackError(f"{path} is truncated: {data.size} values for shape {dims}")
    return data.reshape(dims)


def fashion(root: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's 60,000 training images and labels (28x28)."""
    dirs = [Path(root)] if root else [Path(d) for d in FASHION_DIRS]
    for d in dirs:
        images = _find(d, "train-images-idx3-ubyte")
        labels = _find(d, "train-labels-idx1-ubyte")
        if images and labels:
            return (read_idx(images)[:, None] / 255.0).astype(np.float32), read_idx(labels).astype(np.int64)
    raise DisbackError(
        f"Fashion-MNIST not found in {', '.join(map(str, dirs))}; install it with `apt-get install dataset-fashion-mnist` "
        "(the Makefile does), or point --set data.root=DIR at a folder with train-images-idx3-ubyte[.gz]"
    )


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_image_source(path: Path, resolution: int, channels: int) -> np.ndarray:
    """A folder of image files, an .npz array or an EDM dataset zip, as N x C x H x W floats in [0, 1] at
    ``resolution``."""
    return read_labelled_images(path, resolution, channels)[0]


def read_labelled_images(path: Path, resolution: int, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``read_image_source`` with the images' class labels where the source has them (an EDM zip's dataset.json)."""
    labels = None
    if path.is_dir():
        arrays = _read_folder(path, channels)
    elif path.suffix.lower() == ".npz":
        arrays = _read_npz(path, channels)
    elif path.suffix.lower() == ".zip":
        arrays, labels = read_edm_zip(path, channels)
    else:
        raise DisbackError(f"{path}: images must be a folder of PNG/JPEG files, an .npz array or an EDM dataset .zip")
    if len(arrays) < MIN_IMAGES:
        raise DisbackError(f"{path} holds {len(arrays)} images; at least {MIN_IMAGES} are needed")
    return np.stack([resize(a, resolution, path) for a in arrays]).astype(np.float32), labels


def read_edm_zip(path: Path, channels: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """A zip of image files as NVlabs/edm's dataset_tool.py writes it, in the order of their names, and the labels
    that its dataset.json gives them (``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``null``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DisbackError(f"cannot read {path} as a zip of images: {exc}") from None
    with archive:
        names = sorted(n for n in archive.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise DisbackError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        images = []
        for name in names:
            try:
                with Image.open(io.BytesIO(archive.read(name))) as im:
                    pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError, zipfile.BadZipFile) as exc:
                raise DisbackError(f"cannot read image {name} in {path}: {exc}") from None
            images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
        labels = _zip_labels(archive, path, names)
    return images, labels


def _zip_labels(archive: zipfile.ZipFile, path: Path, names: list[str]) -> np.ndarray | None:
    if "dataset.json" not in archive.namelist():
        return None
    try:
        table = json.loads(archive.read("dataset.json")).get("labels")
    except (ValueError, AttributeError) as exc:
        raise DisbackError(f"{path}: dataset.json is not EDM's {{'labels': [[file, label], ...]}} ({exc})") from None
    if table is None:
        return None
    by_name = {str(f).replace("\\", "/"): label for f, label in table}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DisbackError(f"{path}: dataset.json gives no label for {len(missing)} images (first: {missing[0]})")
    labels = np.asarray([by_name[n] for n in names])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.min() < 0:
        raise DisbackError(f"{path}: dataset.json's labels must be class indices (non-negative integers)")
    return labels.astype(np.int64)


def _read_folder(folder: Path, channels: int) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DisbackError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0)
        except (UnidentifiedImageError, OSError) as exc:
            raise DisbackError(f"cannot read image {f}: {exc}; remove or replace it") from None
    return [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in out]


def _read_npz(path: Path, channels: int) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            # "images", else the first array of N x H x W or N x C x H x W (or N x H x W x C) images
            key = "images" if "images" in z.files else next((k for k in z.files if z[k].ndim in (3, 4)), z.files[0])
            arr = z[key]
    except Exception as exc:
        raise DisbackError(f"cannot read {path}: {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise DisbackError(f"{path}: '{key}' holds {arr.dtype} values; images must be numbers")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)  # N x H x W x C -> N x C x H x W
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise DisbackError(
            f"{path}: '{key}' has shape {arr.shape}; expected N x H x W, N x H x W x C or N x C x H x W with C = 1 or 3"
        )
    arr = arr.astype(np.float32)
    if arr.max() > 1.0:
        arr = arr / 255.0  # 8-bit images
    if not np.isfinite(arr).all() or arr.min() < 0:
        raise DisbackError(f"{path}: images must be finite and non-negative (0..1 floats or 0..255 integers)")
    if arr.shape[1] != channels:
        arr = arr.mean(1, keepdims=True) if channels == 1 else np.repeat(arr, 3, axis=1)
    return list(arr)


def resize(image: np.ndarray, resolution: int, where: Path) -> np.ndarray:
    """Centre-crop to a square, then resize with a box filter (area average), so any size maps to the preset's."""
    from PIL import Image

    c, h, w = image.shape
    if min(h, w) < 2:
        raise DisbackError(f"{where}: an image of {h}x{w} pixels is too small to resize to {resolution}x{resolution}")
    if (h, w) == (resolution, resolution):
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[:, top : top + side, left : left + side]
    chans = [np.asarray(Image.fromarray(ch, mode="F").resize((resolution, resolution), Image.BOX)) for ch in image]
    return np.clip(np.stack(chans), 0.0, 1.0)
