"""Files on disk: every file disback writes goes through ``atomic_write`` (a temporary file, flushed, then renamed
over the target), so a reader or a killed run never sees half a file, and only the main process writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from disback.distributed import is_writer


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``: readers never see half a file. Under
    several processes only the main one writes (disback.distributed)."""
    if not is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_array(path: Path, array) -> None:
    """np.save, atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256, for files last changed 2 s before hashing


def sha256_file(path: Path) -> str:
    """The file's sha256. A file whose last change was over 2 s before it was hashed is hashed once per process (an
    SDXL teacher is 10 GB, and every stage checks it): any later change gets another mtime, however coarse the file
    system's clock, so a changed file is always hashed again."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    settled = time.time() - st.st_mtime > 2.0
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if settled:
        _DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()


def write_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp_folder)`` on a temporary folder beside ``out``, then rename it into place (replacing an
    earlier ``out``): a reader never sees half a folder. Under several processes only the main one writes."""
    out = Path(out)
    if not is_writer():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
