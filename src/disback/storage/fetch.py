"""Files named by a path or a URL: a URL is downloaded once into ``$DISBACK_CACHE`` (one file per URL), and a
``#sha256=HEX`` fragment on it is checked; without one, a warning says the file is unverified. Either way the file's
sha256 is returned, so that whoever reads the file can record what it read."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from disback.errors import DisbackError
from disback.storage.files import sha256_file

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("DISBACK_CACHE", Path.home() / ".cache" / "disback"))


def is_url(spec: str) -> bool:
    return urllib.parse.urlparse(str(spec)).scheme in ("http", "https")


def fetch(spec: str, cache: Path | None = None, what: str = "file", hint: str = "") -> tuple[Path, str]:
    """The local file ``spec`` names (a path, or a URL downloaded once into ``cache``), and its sha256. ``what`` and
    ``hint`` make the error for a missing path say what was wanted and where to get it."""
    if not is_url(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DisbackError(f"{what} {path} does not exist" + (f"; {hint}" if hint else ""))
        return path, sha256_file(path)
    cache = Path(cache) if cache is not None else cache_dir()
    parsed = urllib.parse.urlparse(spec)
    expected = urllib.parse.parse_qs(parsed.fragment).get("sha256", [None])[0]
    url = urllib.parse.urlunparse(parsed._replace(fragment=""))
    name = Path(parsed.path).name
    file = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"  # one file per URL
    if not file.is_file() and (cache / name).is_file():  # cached by its bare name before
        file = cache / name
    if not file.is_file():
        _download(url, file, expected)
    digest = sha256_file(file)
    if not expected:
        log.warning("%s: sha256 %s recorded, not verified; add #sha256=HEX to the URL to have it checked", spec, digest)
    elif digest != expected:
        raise DisbackError(
            f"{file} (cached from {spec}) has sha256 {digest[:12]}..., not {expected[:12]}...; delete it"
        )
    return file, digest


def _download(url: str, file: Path, expected: str | None) -> None:
    """Stream ``url`` into a temporary file beside ``file``, check ``expected``, then rename it into place: a killed
    download leaves nothing, and processes that download the same URL at once each rename a whole file."""
    digest = hashlib.sha256()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=file.parent)
    tmp = Path(name)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if expected and digest.hexdigest() != expected:
            raise DisbackError(
                f"{url} downloaded with sha256 {digest.hexdigest()[:12]}..., not the {expected[:12]}... asked for"
            )
        os.replace(tmp, file)
    except OSError as exc:
        raise DisbackError(f"cannot download {url} ({exc}); download it by hand and give its path instead") from None
    finally:
        tmp.unlink(missing_ok=True)
