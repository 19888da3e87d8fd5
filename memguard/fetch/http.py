"""One file over HTTP(S): time-outs, retries with backoff (on 5xx, time-outs and dropped connections; never on
404/410 or another 4xx), redirects, and resume of a partial file (``Range``). The file is written to
``NAME.part`` and renamed when whole and its sha256 matches; a mismatch leaves it ``.part``."""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import requests

from memguard.errors import UserError
from memguard.fetch.manifest import sha256_of
from memguard.fetch.sources import safe_join

CHUNK = 2**20
USER_AGENT = "memguard-fetch"


class FetchError(Exception):
    """A source could not be reached or served something unusable (one line: what and why); ``resumable``: running
    the same command again may get it (a host down, a time-out, a partial file kept), unlike a 404."""

    def __init__(self, message: str, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable


def reason(err: BaseException) -> str:
    """Why a request failed, in words (no exception class names)."""
    text = f"{type(err).__name__} {err}".lower()
    if "proxy" in text:
        return "the proxy refused the connection"
    if "timeout" in text or "timed out" in text:
        return "timed out"
    if "name or service not known" in text or "nameresolution" in text or "getaddrinfo" in text:
        return "the host name does not resolve"
    if "refused" in text:
        return "connection refused"
    if "ssl" in text or "certificate" in text:
        return "the secure connection failed"
    if "chunked" in text or "closed early" in text or "incomplete" in text:
        return "the connection closed early"
    if "offline" in text or "dryrun" in text or "connection" in text:
        return "no connection"
    first = str(err).splitlines()[0][:120] if str(err) else ""
    return first or "failed"


def human(n: int | float | None) -> str:
    """A size in human units (1.5 GiB, 113.6 KiB, 512 bytes)."""
    if n is None:
        return "size not announced"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


class Retry(Exception):
    pass


def session() -> requests.Session:
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    return s


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def probe(url: str, timeout: float, s: requests.Session | None = None) -> int | None:
    """The size the server announces for ``url`` (redirects followed), or None where it announces none."""
    s = s or session()
    try:
        with s.get(url, stream=True, timeout=timeout, allow_redirects=True,
                   headers={"Accept-Encoding": "identity"}) as response:
            if response.status_code >= 400:
                raise FetchError(f"{url}: HTTP {response.status_code}", resumable=response.status_code >= 500)
            length = response.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except requests.RequestException as err:
        raise FetchError(f"{url} could not be reached ({reason(err)})") from err


def check_hash(name: str, digest: str, sha256: str | None, prefix: str | None, part: Path) -> None:
    sha256, prefix = (str(sha256) if sha256 else None), (str(prefix) if prefix else None)  # Hydra reads 123... as int
    if sha256 and digest != sha256.lower():
        raise UserError(f"{name}: sha256 {digest} does not match the expected {sha256}; refused, left as {part} "
                        "(delete it to fetch again from the start)")
    if prefix and not digest.startswith(prefix.lower()):
        raise UserError(f"{name}: sha256 {digest} does not start with the pinned {prefix}; refused, left as {part} "
                        "(delete it to fetch again from the start)")


def download(url: str, dest: Path, *, sha256: str | None = None, sha256_prefix: str | None = None,
             timeout: float = 30.0, retries: int = 4, backoff: float = 0.5,
             s: requests.Session | None = None) -> str:
    """Fetch ``url`` into ``dest`` (through ``dest.part``, resumed where one is left); the file's sha256."""
    s = s or session()
    part = part_of(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        try:
            with s.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as response:
                status = response.status_code
                if status == 416 and offset:  # the part is already whole
                    break
                if status >= 500:
                    raise Retry(f"HTTP {status}")
                if status >= 400:
                    raise FetchError(f"{url}: HTTP {status}", resumable=False)
                resumed = offset and status == 206
                length = response.headers.get("Content-Length")
                expected = (offset if resumed else 0) + int(length) if length and length.isdigit() else None
                with open(part, "ab" if resumed else "wb") as handle:
                    for chunk in response.iter_content(CHUNK):
                        handle.write(chunk)
                if expected is not None and part.stat().st_size < expected:
                    raise Retry("the connection closed early")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, Retry) as err:
            if attempt == retries:
                kept = f"; {part.name} kept to resume" if part.exists() and part.stat().st_size else ""
                raise FetchError(f"{url} could not be fetched ({reason(err)}; {retries + 1} tries{kept})") from err
            time.sleep(backoff * 2**attempt)
    digest = sha256_of(part)
    check_hash(dest.name, digest, sha256, sha256_prefix, part)
    os.replace(part, dest)
    return digest


def free_space(folder: Path) -> int:
    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free


def archive_kind(path: Path) -> str | None:
    """zip, tar (any compression tarfile reads) or None, by the file's content."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except OSError:
        return None


def unpack(archive: Path, kind: str, subfolder: str | None, dest: Path, key: str,
           members: list[str] | None = None) -> list[Path]:
    """Unpack ``archive`` (zip or tar; auto: either, by its content) and move its ``subfolder`` (or the whole) to
    ``dest``; the files written. Members whose names would leave the folder are refused before anything is written.
    ``members`` (glob patterns of member paths, ``fnmatch``): only the members that match are unpacked."""
    def wanted(name: str) -> bool:
        return members is None or any(fnmatch(name.rstrip("/"), pattern) for pattern in members)

    if kind == "auto":
        kind = archive_kind(archive)
        if kind is None:
            raise UserError(f"sources.{key}: {archive.name} is neither a zip nor a tar archive; refused")

    staging = dest.with_name(f".{dest.name}.unpack")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if name.strip("/"):
                        safe_join(staging, name.rstrip("/"), key)
                names = [n for n in z.namelist() if wanted(n)]
                if not names:
                    raise UserError(f"sources.{key}.members={members} match no member of {archive.name}")
                z.extractall(staging, members=names)
        else:
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    safe_join(staging, member.name, key)
                    if member.issym() or member.islnk():
                        raise UserError(f"sources.{key}: the archive holds a link ({member.name}); refused")
                chosen = [m for m in t.getmembers() if wanted(m.name)]
                if not chosen:
                    raise UserError(f"sources.{key}.members={members} match no member of {archive.name}")
                t.extractall(staging, members=chosen, filter="data")
        root = staging
        if subfolder:
            root = safe_join(staging, subfolder, key)
            if not root.is_dir():
                raise UserError(f"sources.{key}.subfolder={subfolder!r} is not a folder of {archive.name}")
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(p for p in dest.rglob("*") if p.is_file())
